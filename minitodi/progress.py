"""A one-line progress bar for long loops: step, named values, tokens per second and time left.

Writes to stderr with a carriage return when stderr is a terminal, and a plain line every
``every`` updates otherwise (CI logs stay readable). No dependency.
"""

import sys
import time


def _clock(seconds: float) -> str:
    """``h:mm:ss``, or ``m:ss`` under an hour."""
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}:{m:02d}:{s:02d}"
    return f"{m}:{s:02d}"


def _shown(name, value) -> str:
    """``name value``, a float to four significant digits."""
    if isinstance(value, float):
        return f"{name} {value:.4g}"
    return f"{name} {value}"


class Progress:
    """``with Progress(total, "train") as bar: ... bar.update(tokens=n, loss=x)``."""

    def __init__(self, total: int, label: str = "", *, stream=None, every: int = 50, enabled: bool = True):
        self.total = total
        self.label = label
        self.every = every
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        # a terminal gets one line rewritten in place; a file or a pipe gets a line every `every` updates
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.done = 0
        self.tokens = 0
        self.start = time.perf_counter()

    def line(self, **values) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0  # at the rate so far
        shown = " ".join(_shown(name, value) for name, value in values.items())
        speed = ""
        if self.tokens:
            speed = f" | {rate / 1000:.1f}k tok/s"
        return (f"{self.label} {self.done}/{self.total} {shown}{speed} | "
                f"{_clock(elapsed)} elapsed, {_clock(left)} left")

    def update(self, n: int = 1, *, tokens: int = 0, **values):
        self.done += n
        self.tokens += tokens
        if not self.enabled:
            return
        if self.live:  # back to the line's start, write, clear what an older, longer line left
            self.stream.write("\r" + self.line(**values) + "\033[K")
            self.stream.flush()
        elif self.done % self.every == 0 or self.done == self.total:
            self.stream.write(self.line(**values) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.enabled and self.live:  # end the live line
            self.stream.write("\n")
