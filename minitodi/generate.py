"""Text generation with a KV cache: greedy decoding and sampling (top-k, top-p, no-repeat n-grams).

Decoding runs the prompt through the model once, keeps every layer's keys and values (the cache's
``present``), then feeds one new token at a time, so step n costs O(n) attention instead of re-running
the whole prefix. Prompts of equal length are decoded together as one batch (no padding, so no row sees
another row's tokens or any padding); a row stops at the end-of-text token, which is not returned.

The next token follows transformers' ``generate``: ``no_repeat_ngram_size`` = n first bans (logit -inf)
every token that would complete an n-gram already in prompt + text (the tokens that followed an earlier
occurrence of the last n-1 tokens); then greedy decoding takes the argmax, or sampling draws from
softmax(logits / temperature) cut to the ``top_k`` most likely tokens (0 or None: all), then to the
smallest set whose mass reaches ``top_p`` (1 or None: all). The paper's evaluation samples at temperature
1, top_k 0, top_p 1, no_repeat_ngram_size 6. A row whose every token is banned (only when its text is
longer than the vocabulary) gets token 0, as transformers' argmax does.

Sampling draws on the host: prompt i's uniforms (one per step, inverse CDF over the token ids) come from
``default_rng([seed, i])``. So NumPy and CuPy give the same text, a sample does not depend on its batch, and
two models sampled with one seed share their uniforms (common random numbers): their difference in score
carries less sampling noise while each model's sampling law is unchanged.
"""

import math
import numbers
import sys
from collections import defaultdict

import numpy as np

from .core.device import array_module, to_numpy
from .core.losses import log_softmax
from .core.model import forward


def check_settings(*, max_new_tokens=1, temperature=0.0, top_k=None, top_p=None, no_repeat_ngram_size=0,
                   samples=1, batch_size=1):
    """Raise ValueError, naming the setting, unless every decoding number is usable."""
    integers = (
        ("max_new_tokens", max_new_tokens, 1),
        ("samples", samples, 1),
        ("batch_size", batch_size, 1),
        ("no_repeat_ngram_size", no_repeat_ngram_size, 0),
        ("top_k", 0 if top_k is None else top_k, 0),  # None means off, as 0 does
    )
    for name, value, low in integers:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def next_token(logits, rng=None, *, temperature=0.0, top_k=None, top_p=None, banned=None):
    """Token ids (B,) chosen from host logits (B, V): argmax when ``temperature`` is 0, else a sample.

    ``rng``: a NumPy Generator, or one per row (row b's uniform comes from ``rng[b]``).
    ``banned``: per row, token ids whose logit becomes -inf first (the no-repeat n-gram rule).
    """
    check_settings(temperature=temperature, top_k=top_k, top_p=top_p)
    z = np.array(logits, dtype=np.float64)
    for b, tokens in enumerate(banned or ()):
        z[b, list(tokens)] = -np.inf
    if temperature == 0.0:
        return z.argmax(axis=-1)
    # softmax(z / T) is unchanged when z is shifted: with its maximum at 0 first, z / T cannot overflow to
    # +inf at a tiny T (1e-310 made nan of every probability and drew token 0); the rest goes to -inf
    with np.errstate(invalid="ignore"):  # a row with every token banned: -inf - -inf, token 0 as documented
        z -= z.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore"):
        z /= temperature
    if top_k and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(log_softmax(z))
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the strictly more likely tokens
        keep = np.zeros_like(probs, dtype=bool)
        np.put_along_axis(keep, order, before < top_p, axis=-1)  # the most likely token is always kept
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    if isinstance(rng, np.random.Generator):
        u = rng.random((len(z), 1))
    else:  # one generator per row
        u = np.array([[g.random()] for g in rng])
    # inverse CDF: the first token whose cumulative mass reaches u (the last one if rounding leaves it short)
    chosen = (np.cumsum(probs, axis=-1) < u).sum(axis=-1)
    return np.minimum(chosen, probs.shape[-1] - 1)


class _NGrams:
    """Every n-gram of one row's text, as (its first n-1 tokens) -> {tokens that followed them}."""

    def __init__(self, tokens, n):
        self.n = n
        self.text = []
        self.followers = defaultdict(set)
        for token in tokens:
            self.append(token)

    def append(self, token):
        self.text.append(token)
        if len(self.text) >= self.n:
            start = len(self.text) - self.n
            self.followers[tuple(self.text[start:-1])].add(token)

    def banned(self):
        """The tokens that would complete an n-gram already present: the followers of the last n-1 tokens."""
        start = len(self.text) - self.n + 1
        return self.followers.get(tuple(self.text[start:]), ())


def _decode_batch(params, config, prompts, max_new_tokens, eos_id, rngs, sampling, ngram_size):
    """New tokens per row and whether each row ran out of context before eos or max_new_tokens."""
    xp = array_module(*params.values())
    idx = xp.asarray(np.array(prompts, dtype=np.int64))  # (B, P)
    out = [[] for _ in prompts]
    ngrams = [_NGrams(p, ngram_size) for p in prompts] if ngram_size else None
    done = np.zeros(len(prompts), dtype=bool)
    past = None
    steps = min(max_new_tokens, config.n_positions - idx.shape[1] + 1)  # the last token needs no position
    for _ in range(steps):
        logits, cache = forward(params, idx, config, past=past)
        banned = [g.banned() for g in ngrams] if ngrams else None
        tokens = next_token(to_numpy(logits[:, -1]), rngs, banned=banned, **sampling)
        for b, token in enumerate(tokens):
            if ngrams:
                ngrams[b].append(int(token))
            if not done[b]:
                if token == eos_id:  # a row ends at its eos, which is not returned
                    done[b] = True
                else:
                    out[b].append(int(token))
        if done.all():
            break
        past = cache["present"]
        idx = xp.asarray(tokens[:, None].astype(np.int64))  # (B, 1): only the new token goes in
    return out, steps < max_new_tokens and not done.all()


def generate(params, config, prompts, *, max_new_tokens=32, eos_id=None, temperature=0.0, top_k=None,
             top_p=None, no_repeat_ngram_size=0, seed=0, batch_size=64):
    """Continue each prompt (a list of token ids); returns the new ids per prompt, without the eos.

    ``temperature=0`` is greedy decoding. The continuation is promised R = max(1, min(max_new_tokens,
    n_positions // 2)) positions: a prompt longer than n_positions - R + 1 tokens (the last new token needs
    no position) is cut from the left, and a continuation longer than the context allows stops at its end;
    either is said on stderr.
    """
    check_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   no_repeat_ngram_size=no_repeat_ngram_size, batch_size=batch_size)
    reserve = max(1, min(max_new_tokens, config.n_positions // 2))
    room = config.n_positions - reserve + 1
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token")
    cut = [len(p) - room for p in prompts if len(p) > room]
    if cut:
        print(f"minitodi generate: warning: {len(cut)} prompt(s) cut from the left by up to {max(cut)} "
              f"tokens to leave room for {reserve} new tokens in the context of {config.n_positions}",
              file=sys.stderr)
    prompts = [p[-room:] for p in prompts]
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    by_length = defaultdict(list)  # a batch holds prompts of one length
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    results = [None] * len(prompts)
    truncated = False
    for length in sorted(by_length):
        rows = by_length[length]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            chunk_prompts = [prompts[i] for i in chunk]
            rngs = [np.random.default_rng([seed, i]) for i in chunk]  # prompt i's stream, whatever its batch
            outs, ran_out = _decode_batch(params, config, chunk_prompts, max_new_tokens, eos_id, rngs,
                                          sampling, no_repeat_ngram_size)
            truncated |= ran_out
            for i, ids in zip(chunk, outs):
                results[i] = ids
    if truncated:
        print(f"minitodi generate: warning: generation stopped at the end of the context "
              f"({config.n_positions} positions) before {max_new_tokens} new tokens or an end-of-text token",
              file=sys.stderr)
    return results
