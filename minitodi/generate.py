"""Text generation with a KV cache: greedy decoding and sampling (temperature, top-k, top-p).

Decoding runs the prompt through the model once, keeps every layer's keys and values (the cache's
``present``), then feeds one new token at a time, so step n costs O(n) attention instead of re-running
the whole prefix. Prompts of equal length are decoded together as one batch (no padding, so a batched
result is exactly the single-prompt result); a row stops at the end-of-text token, which is not returned.

Sampling draws on the host with NumPy's generator (``seed``): the same seed gives the same text on
NumPy and CuPy. The next-token distribution is softmax(logits / temperature), restricted to the
``top_k`` most likely tokens and then to the smallest set whose mass reaches ``top_p``.
"""

from collections import defaultdict

import numpy as np

from .backend import array_module, to_numpy
from .model import forward


def next_token(logits, rng=None, *, temperature=0.0, top_k=None, top_p=None):
    """Token ids (B,) chosen from host logits (B, V): argmax when ``temperature`` is 0, else a sample."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0.0:
        return logits.argmax(axis=-1)
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the strictly more likely tokens
        keep = np.zeros_like(probs, dtype=bool)
        np.put_along_axis(keep, order, before < top_p, axis=-1)  # the most likely token is always kept
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    u = rng.random((probs.shape[0], 1))
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)


def _decode_batch(params, config, prompts, max_new_tokens, eos_id, rng, sampling):
    xp = array_module(*params.values())
    idx = xp.asarray(np.array(prompts, dtype=np.int64))  # (B, P)
    out = [[] for _ in prompts]
    done = np.zeros(len(prompts), dtype=bool)
    past = None
    steps = min(max_new_tokens, config.n_positions - idx.shape[1] + 1)  # the last token needs no position
    for _ in range(steps):
        logits, cache = forward(params, idx, config, past=past)
        tokens = next_token(to_numpy(logits[:, -1]), rng, **sampling)
        for b, token in enumerate(tokens):
            if not done[b]:
                if token == eos_id:
                    done[b] = True
                else:
                    out[b].append(int(token))
        if done.all():
            break
        past = cache["present"]
        idx = xp.asarray(tokens[:, None].astype(np.int64))  # (B, 1): only the new token goes in
    return out


def generate(params, config, prompts, *, max_new_tokens=32, eos_id=None, temperature=0.0, top_k=None,
             top_p=None, seed=0, batch_size=64):
    """Continue each prompt (a list of token ids); returns the new ids per prompt, without the eos.

    A prompt plus its continuation must fit in ``config.n_positions``: decoding stops at the context's
    end. ``temperature=0`` is greedy decoding.
    """
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token")
        if len(p) > config.n_positions:
            raise ValueError(f"prompt {i} has {len(p)} tokens, the model's context is {config.n_positions}")
    rng = np.random.default_rng(seed)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    results = [None] * len(prompts)
    for length in sorted(by_length):
        rows = by_length[length]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            for i, ids in zip(chunk, _decode_batch(params, config, [prompts[i] for i in chunk],
                                                   max_new_tokens, eos_id, rng, sampling)):
                results[i] = ids
    return results
