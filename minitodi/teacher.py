"""A frozen teacher: a model whose logits distillation matches, its tokenizer, and a cache of its logits.

The teacher never changes, so its logits for a training example are the same at every epoch and for
every student. :meth:`Teacher.precompute` runs it once over the distinct training examples (in a fixed
order and batch size, so every process gets the same numbers, which keeps resume exact) and keeps the
logits at their counted positions only: for instruction data that is a few response tokens per example.
:meth:`Teacher.batch_logits` then gathers a batch's teacher logits at its counted positions from that
cache instead of a forward pass. Causal attention makes an example's logits independent of the padding
that follows it in a batch (the batch contract of :mod:`minitodi.data`), so the cache holds what a forward
pass would give, up to float rounding.
"""

import numpy as np

from . import checkpoint
from .core.device import array_module, to_numpy
from .core.layers import IGNORE_INDEX
from .data import collate
from .parallel import forward_in_shards
from .tokenizer import Tokenizer


class Teacher:
    """``params`` and ``config`` of a frozen model and its ``tokenizer`` (which must be the student's)."""

    CACHE_BYTES = 1 << 30  # keep no cache larger than this (language-modelling data counts every token)
    CACHE_BATCH = 64

    def __init__(self, params, config, tokenizer):
        self.params = params
        self.config = config
        self.tokenizer = tokenizer
        self._cache = {}  # example ids (int64 bytes) -> logits at its counted positions (n, V)

    @classmethod
    def load(cls, directory, *, dtype="float32", device="cpu"):
        params, config = checkpoint.load(directory, dtype=dtype, device=device)
        return cls(params, config, Tokenizer.load_for_model(directory))

    def logits(self, idx, rows=None):
        """(B, T) token ids -> (B, T, V) logits, or (n, V) at the positions of a boolean mask ``rows``."""
        return forward_in_shards(self.params, idx, self.config, rows=rows)[0]

    def precompute(self, examples, device="cpu", stop=()):
        """Cache the logits at counted positions of every distinct example; False if it would not fit.

        ``stop``: a list that Ctrl-C makes non-empty (:func:`minitodi.rundir.ctrl_c_flag`), looked at
        between batches: the work stops there, the cache is left empty and False is returned.
        """
        unique = {}  # an example's ids (int64 bytes) -> the example, first occurrence kept
        for x, y in examples:
            unique.setdefault(np.asarray(x, dtype=np.int64).tobytes(), (x, y))
        if unique.keys() <= self._cache.keys():
            return True
        n_counted = sum(sum(label != IGNORE_INDEX for label in y) for x, y in unique.values())
        itemsize = next(iter(self.params.values())).dtype.itemsize
        if n_counted * self.config.vocab_size * itemsize > self.CACHE_BYTES:
            return False
        self._cache = {}
        items = list(unique.items())
        for start in range(0, len(items), self.CACHE_BATCH):
            if stop:
                self._cache = {}
                return False
            chunk = items[start:start + self.CACHE_BATCH]
            # padding (the tokenizer's eos id) follows every counted position: causal attention ignores it
            idx, labels = collate([example for _, example in chunk], pad_id=self.tokenizer.eos_id,
                                  device=device)
            counted = labels != IGNORE_INDEX
            logits = self.logits(idx, counted)  # (n, V), the counted positions in row-major order
            ends = np.cumsum(to_numpy(counted).sum(axis=1))[:-1]  # where each example's rows end
            per_example = array_module(idx).split(logits, ends)
            for (key, _), rows in zip(chunk, per_example):
                self._cache[key] = rows  # (n_b, V)
        return True

    def batch_logits(self, idx, labels):
        """The teacher's logits at a training batch's counted positions, (n, V) in row-major order.

        They come from the cache when every row is in it, else from a forward pass.
        """
        counted = labels != IGNORE_INDEX
        if self._cache:
            rows = [self._cache.get(key) for key in self._row_keys(idx, counted)]
            if all(r is not None for r in rows):
                return array_module(idx).concatenate(rows)
        return self.logits(idx, counted)

    @staticmethod
    def _row_keys(idx, counted):
        """Each row's cache key: its ids up to its last counted position, the padding after it dropped."""
        keys = []
        for ids, row_counted in zip(to_numpy(idx), to_numpy(counted)):
            positions = np.flatnonzero(row_counted)
            length = int(positions[-1]) + 1 if positions.size else 0  # an example ends with its eos, counted
            keys.append(ids[:length].tobytes())
        return keys


def require_same_tokenizer(teacher, tokenizer):
    """A clear error when the teacher's tokenizer is not the student's (their logits would not align).

    It names the two tokenizer.json files (one trained in this process, from the data, is said so).
    """
    if teacher.tokenizer.fingerprint() != tokenizer.fingerprint():
        raise ValueError(f"the teacher's tokenizer ({_named(teacher.tokenizer)}) is not the student's "
                         f"({_named(tokenizer)}): "
                         "their logits are over different tokens and cannot be compared; a student is "
                         "trained and compared with its teacher's tokenizer.json")


def _named(tokenizer):
    """The tokenizer.json a tokenizer was read from, or a few words for one made in this process."""
    if tokenizer.path is None:
        return "one trained from the data"
    return str(tokenizer.path)
