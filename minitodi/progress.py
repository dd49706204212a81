"""A one-line progress bar for long loops: step, named values, tokens per second and time left.

Writes to stderr with a carriage return when stderr is a terminal, and a plain line every
``every`` updates otherwise (CI logs stay readable). No dependency.
"""

import sys
import time


def _clock(seconds: float) -> str:
    h, rest = divmod(int(max(seconds, 0)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``with Progress(total, "train") as bar: ... bar.update(tokens=n, loss=x)``."""

    def __init__(self, total: int, label: str = "", *, stream=None, every: int = 50, enabled: bool = True):
        self.total, self.label, self.every, self.enabled = total, label, every, enabled
        self.stream = sys.stderr if stream is None else stream
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.done = self.tokens = 0
        self.start = time.perf_counter()

    def line(self, **values) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        speed = f" | {rate / 1000:.1f}k tok/s" if self.tokens else ""
        return (f"{self.label} {self.done}/{self.total} {shown}{speed} | "
                f"{_clock(elapsed)} elapsed, {_clock(left)} left")

    def update(self, n: int = 1, *, tokens: int = 0, **values):
        self.done += n
        self.tokens += tokens
        if self.live:
            self.stream.write("\r" + self.line(**values) + "\033[K")
            self.stream.flush()
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            self.stream.write(self.line(**values) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.live:  # live implies enabled
            self.stream.write("\n")
