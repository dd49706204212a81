"""The memory estimates the command line checks before a run: close to what a training step allocates."""

import tracemalloc

import numpy as np
import pytest

from minitodi import memory
from minitodi.core import optim
from minitodi.core.model import init_params
from minitodi.data import BatchIterator
from minitodi.presets import TrainConfig, model_config
from minitodi.train import step_loss


def _lm_rows(n, length, vocab_size, seed=0):
    """``n`` language-modelling examples of ``length`` tokens, every label counted."""
    rng = np.random.default_rng(seed)
    return [(list(row[:-1]), list(row[1:])) for row in rng.integers(0, vocab_size, (n, length + 1))]


@pytest.mark.parametrize("arch, size, batch, length", [("gpt2", "small", 16, 64), ("llama", "small", 8, 96),
                                                       ("gpt2", "tiny", 32, 32)])
def test_the_estimate_covers_a_training_step_and_is_not_far_above_it(arch, size, batch, length):
    """NumPy's allocations (traced by tracemalloc) in init, one step and AdamW's update: estimate >= peak."""
    config = model_config(size, 512, length + 8, arch)
    examples = _lm_rows(4 * batch, length, 512)
    idx, labels = next(BatchIterator(examples, batch, pad_id=0))
    tracemalloc.start()
    try:
        params = init_params(config)
        state = optim.adamw_init(params)
        _, _, _, grads = step_loss(params, config, idx, labels, TrainConfig(batch_size=batch))
        optim.adamw_step(params, grads, state, lr=1e-3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimate = sum(memory.training_bytes(config, examples, batch, eval_batch_size=batch).values())
    assert peak <= estimate <= 2 * peak, (peak, estimate)


def test_counted_positions_and_the_longest_example_size_the_logits_and_activations():
    config = model_config("tiny", 300, 64, "gpt2")
    rows = [([1] * 10, [-100] * 8 + [5, 0]), ([1] * 40, [-100] * 35 + [5] * 4 + [0])]
    parts = memory.training_bytes(config, rows, 4, eval_batch_size=1)
    n = 4 * 5  # 4 rows of the most counted example's 5 positions
    assert parts["logits"] == int(3.2 * n * 300) * 4
    L, C, H = 1, 32, 2
    assert parts["activations"] == int(4 * 40 * (L * (10 * C + 2 * 4 * C + 1.5 * H * 40) + 32 * C)) * 4
    with_teacher = memory.training_bytes(config, rows, 4, eval_batch_size=1, teacher_config=config)
    assert with_teacher["logits"] == int(6.2 * n * 300) * 4
    cache = (2 + 5) * 300 * 4  # the teacher's logits at every counted position of the two examples
    assert with_teacher["teacher"] == parts["weights and AdamW"] // 5 + parts["activations"] + cache


def test_the_tokenizers_table_is_what_it_asked_for():
    """The allocations tokenizers reported when it aborted, for vocab_size 5e8 and 1e9."""
    assert memory.tokenizer_bytes(500_000_000) == 35_433_480_208
    assert memory.tokenizer_bytes(1_000_000_000) == 70_866_960_400


def test_check_fits_refuses_in_one_line_with_the_estimate(monkeypatch):
    assert memory.available() > 0  # this machine says what it has free
    monkeypatch.setattr(memory, "available", lambda device="cpu": 3 << 30)
    memory.check_fits("a small job", {"weights": 1 << 30, "activations": 2 << 30})
    with pytest.raises(ValueError) as refused:
        memory.check_fits("a big job", {"weights": 1 << 30, "activations": 5 << 30})
    assert str(refused.value) == ("a big job needs about 6 GiB of memory (activations 5 GiB, weights 1 GiB); "
                                  "3 GiB is available on the cpu")


def test_on_the_gpu_the_free_memory_is_cudas(monkeypatch):
    """available("gpu") reads CUDA's free bytes of the current device (a stand-in for CuPy here)."""
    import types

    from minitodi.core import device

    runtime = types.SimpleNamespace(memGetInfo=lambda: (5 << 30, 80 << 30))
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setattr(device, "get_xp", lambda name=None: fake_cupy)
    assert memory.available("gpu") == 5 << 30
