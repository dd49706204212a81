"""The progress line: printed every n steps and at the end, silent when disabled, clock format."""

import io

from minitodi.progress import Progress, _clock


def test_plain_stream_prints_every_n_and_at_the_end():
    out = io.StringIO()
    with Progress(5, "train", stream=out, every=2) as bar:
        for _ in range(5):
            bar.update(tokens=100, loss=1.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # steps 2, 4 and the last
    assert lines[-1].startswith("train 5/5 loss 1.5")
    assert "tok/s" in lines[-1] and "left" in lines[-1]


def test_disabled_prints_nothing_and_clock_format():
    out = io.StringIO()
    with Progress(3, stream=out, enabled=False) as bar:
        bar.update(3)
    assert out.getvalue() == ""
    assert _clock(65) == "1:05" and _clock(3725) == "1:02:05"
