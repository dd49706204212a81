"""A frozen teacher: a model whose logits distillation matches, its tokenizer, and a cache of its logits.

The teacher never changes, so its logits for a training example are the same at every epoch and for
every student. :meth:`Teacher.precompute` runs it once over the distinct training examples (in a fixed
order and batch size, so every process gets the same numbers, which keeps resume exact) and keeps the
logits at their counted positions only: for instruction data that is a few response tokens per
example. :meth:`Teacher.batch_logits` then assembles a batch's teacher logits from that cache instead
of a forward pass (zeros at uncounted positions, which no loss reads). Causal attention makes an
example's logits independent of the padding that follows it in a batch, so the cache holds what a
forward pass would give, up to float rounding.
"""

import numpy as np

from . import checkpoint
from .backend import array_module, to_numpy
from .data import collate
from .layers import IGNORE_INDEX
from .model import forward
from .tokenizer import Tokenizer


class Teacher:
    """``params`` and ``config`` of a frozen model and its ``tokenizer`` (which must be the student's)."""

    CACHE_BYTES = 1 << 30  # keep no cache larger than this (language-modelling data counts every token)
    CACHE_BATCH = 64

    def __init__(self, params, config, tokenizer):
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self._cache = {}  # example ids (int64 bytes) -> logits at its counted positions (n, V)

    @classmethod
    def load(cls, directory, *, dtype="float32", device="cpu"):
        params, config = checkpoint.load(directory, dtype=dtype, device=device)
        return cls(params, config, Tokenizer.load(directory))

    def logits(self, idx):
        """(B, T) token ids -> (B, T, V) logits."""
        return forward(self.params, idx, self.config)[0]

    def precompute(self, examples, device="cpu"):
        """Cache the logits at counted positions of every distinct example; False if it would not fit."""
        unique = {}
        for x, y in examples:
            unique.setdefault(np.asarray(x, dtype=np.int64).tobytes(), (x, y))
        if unique.keys() <= self._cache.keys():
            return True
        counted = sum(sum(label != IGNORE_INDEX for label in y) for x, y in unique.values())
        itemsize = next(iter(self.params.values())).dtype.itemsize
        if counted * self.config.vocab_size * itemsize > self.CACHE_BYTES:
            return False
        self._cache = {}
        items = list(unique.items())
        for start in range(0, len(items), self.CACHE_BATCH):
            chunk = items[start:start + self.CACHE_BATCH]
            # padding (the tokenizer's eos id) follows every counted position: causal attention ignores it
            idx, labels = collate([example for _, example in chunk], pad_id=self.tokenizer.eos_id, device=device)
            logits = self.logits(idx)
            for b, (key, _) in enumerate(chunk):
                self._cache[key] = logits[b][labels[b] != IGNORE_INDEX]  # (n_b, V), a copy
        return True

    def batch_logits(self, idx, labels):
        """The teacher's logits for a training batch: from the cache when every row is in it (values at
        counted positions, zeros elsewhere), else a forward pass."""
        if not self._cache:
            return self.logits(idx)
        host_idx, host_counted = to_numpy(idx), to_numpy(labels) != IGNORE_INDEX
        rows = []
        for b in range(host_idx.shape[0]):
            positions = np.flatnonzero(host_counted[b])
            if positions.size == 0:
                return self.logits(idx)
            length = int(positions[-1]) + 1  # an example ends with a counted token (its eos)
            cached = self._cache.get(host_idx[b, :length].tobytes())
            if cached is None:
                return self.logits(idx)
            rows.append(cached)
        xp = array_module(idx)
        out = xp.zeros((*host_idx.shape, self.config.vocab_size), dtype=rows[0].dtype)
        out[labels != IGNORE_INDEX] = xp.concatenate(rows)  # row-major order: row by row, position by position
        return out


def require_same_tokenizer(teacher, tokenizer):
    """A clear error when the teacher's tokenizer is not the student's (their logits would not align)."""
    if teacher.tokenizer.fingerprint() != tokenizer.fingerprint():
        raise ValueError(f"teacher and student tokenizers differ ({teacher.tokenizer!r} vs {tokenizer!r}): "
                         "distillation compares distributions over the same vocabulary; use the teacher's "
                         "tokenizer.json for the student")
