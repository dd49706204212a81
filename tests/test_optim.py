"""AdamW against a hand-written reference, gradient clipping, and the learning-rate schedule."""

import math

import numpy as np
import pytest

from minitodi import parallel
from minitodi.core import optim

BETAS, ADAM_EPS, WD = (0.9, 0.95), 1e-8, 0.1


def _params(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((4, 3)).astype(dtype),     # a matrix: decayed
            "emb": rng.standard_normal((5, 2)).astype(dtype),   # an embedding: decayed
            "b": rng.standard_normal(3).astype(dtype),          # a bias: not decayed
            "ln": (1 + rng.standard_normal(2)).astype(dtype)}   # a norm weight: not decayed


def _grads(params, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(x.shape).astype(x.dtype) for k, x in params.items()}


def reference_adamw(x, grads, lrs, betas=BETAS, eps=ADAM_EPS, weight_decay=WD):
    """Textbook AdamW (Loshchilov & Hutter, torch.optim.AdamW), one entry at a time in Python floats."""
    b1, b2 = betas
    x = [float(v) for v in np.ravel(x)]
    m, v = [0.0] * len(x), [0.0] * len(x)
    decay = weight_decay if np.ndim(grads[0]) >= 2 else 0.0
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        for i, gi in enumerate(np.ravel(g)):
            gi = float(gi)
            x[i] = x[i] - lr * decay * x[i]
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            x[i] = x[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
    return np.array(x).reshape(np.shape(grads[0])), np.array(m), np.array(v)


def test_adamw_matches_reference_over_three_steps():
    params = _params()
    start = {k: x.copy() for k, x in params.items()}
    state = optim.adamw_init(params)
    lrs = [1e-2, 3e-2, 2e-2]
    history = [_grads(params, seed) for seed in (1, 2, 3)]
    for grads, lr in zip(history, lrs):
        optim.adamw_step(params, grads, state, lr=lr, betas=BETAS, eps=ADAM_EPS, weight_decay=WD)
    assert state["step"] == 3
    for k in params:
        x, m, v = reference_adamw(start[k], [g[k] for g in history], lrs)
        np.testing.assert_allclose(params[k], x, rtol=1e-13, atol=0, err_msg=k)
        np.testing.assert_allclose(state["m"][k].ravel(), m, rtol=1e-13, atol=0, err_msg=k)
        np.testing.assert_allclose(state["v"][k].ravel(), v, rtol=1e-13, atol=0, err_msg=k)


def test_weight_decay_only_on_matrices():
    """With zero gradients Adam's step is 0: what remains is the decay, on matrices only."""
    params = _params()
    start = {k: x.copy() for k, x in params.items()}
    state = optim.adamw_init(params)
    zeros = {k: np.zeros_like(x) for k, x in params.items()}
    optim.adamw_step(params, zeros, state, lr=0.5, weight_decay=0.1)
    np.testing.assert_array_equal(params["w"], start["w"] * (1 - 0.05))
    np.testing.assert_array_equal(params["emb"], start["emb"] * (1 - 0.05))
    np.testing.assert_array_equal(params["b"], start["b"])
    np.testing.assert_array_equal(params["ln"], start["ln"])
    assert optim.decays(params["w"]) and not optim.decays(params["b"])
    # and weight_decay = 0 leaves everything in place
    optim.adamw_step(params, zeros, state, lr=0.5, weight_decay=0.0)
    np.testing.assert_array_equal(params["w"], start["w"] * (1 - 0.05))


def test_first_step_moves_by_lr_times_sign():
    """Bias correction makes Adam's first step lr * g / (|g| + eps): lr * sign(g) for a vector."""
    params = _params()
    start = params["b"].copy()
    grads = _grads(params, 7)
    optim.adamw_step(params, grads, optim.adamw_init(params), lr=1e-3)
    np.testing.assert_allclose(params["b"] - start, -1e-3 * np.sign(grads["b"]), rtol=1e-6)


def test_adamw_keeps_float32():
    params = _params(np.float32)
    state = optim.adamw_init(params)
    optim.adamw_step(params, _grads(params, 1), state, lr=1e-2)
    assert all(x.dtype == np.float32 for x in params.values())
    assert all(state[s][k].dtype == np.float32 for s in ("m", "v") for k in params)


def _adamw_steps(step, dtype, steps):
    """Parameters and state after ``steps`` updates by ``step`` (the pure one or parallel's)."""
    params = _params(dtype)
    state = optim.adamw_init(params)
    for seed in range(steps):
        step(params, _grads(params, seed), state, lr=1e-2, betas=BETAS, eps=ADAM_EPS, weight_decay=WD)
    return params, state


def test_adamw_in_groups_on_threads_gives_the_pure_step_bit_for_bit(monkeypatch):
    """parallel.adamw_step: the parameters in groups on 3 threads, the pure step's numbers bit for bit."""
    calls = []
    monkeypatch.setattr(parallel, "in_order", lambda fn, items, n: calls.append([len(i) for i in items]) or
                        [fn(item) for item in items])
    monkeypatch.setattr(parallel, "GROUP_ENTRIES", 1)
    monkeypatch.setattr(parallel, "THREADS", 3)
    pure_params, pure_state = _adamw_steps(optim.adamw_step, np.float32, 3)
    params, state = _adamw_steps(parallel.adamw_step, np.float32, 3)
    for name in pure_params:
        np.testing.assert_array_equal(params[name], pure_params[name])
        np.testing.assert_array_equal(state["m"][name], pure_state["m"][name])
        np.testing.assert_array_equal(state["v"][name], pure_state["v"][name])
    assert state["step"] == pure_state["step"] == 3
    # each call: 12 and 10 entries alone, then 3 + 2 in the lightest group
    assert calls == [[1, 1, 2]] * 3


def test_adamw_in_groups_runs_the_threads(monkeypatch):
    """With a real pool of 2 threads the numbers are still the pure step's."""
    monkeypatch.setattr(parallel, "GROUP_ENTRIES", 1)
    monkeypatch.setattr(parallel, "THREADS", 2)
    pure_params, _ = _adamw_steps(optim.adamw_step, np.float64, 1)
    params, _ = _adamw_steps(parallel.adamw_step, np.float64, 1)
    for name in pure_params:
        np.testing.assert_array_equal(params[name], pure_params[name])
    assert parallel._pool.cache_info().currsize > 0  # the pool ran


def test_adamw_matches_torch(torch):
    params = _params()
    start = {k: x.copy() for k, x in params.items()}
    tp = {k: torch.tensor(x, requires_grad=True) for k, x in start.items()}
    opt = torch.optim.AdamW([{"params": [tp["w"], tp["emb"]], "weight_decay": WD},
                             {"params": [tp["b"], tp["ln"]], "weight_decay": 0.0}],
                            lr=1e-2, betas=BETAS, eps=ADAM_EPS)
    state = optim.adamw_init(params)
    for seed, lr in ((1, 1e-2), (2, 3e-2), (3, 2e-2)):
        grads = _grads(params, seed)
        optim.adamw_step(params, grads, state, lr=lr, betas=BETAS, eps=ADAM_EPS, weight_decay=WD)
        for group in opt.param_groups:
            group["lr"] = lr
        for k, t in tp.items():
            t.grad = torch.tensor(grads[k])
        opt.step()
    for k in params:
        np.testing.assert_allclose(params[k], tp[k].detach().numpy(), rtol=1e-13, atol=0, err_msg=k)


# ------------------------------------------------------------------------------------------ clipping


def test_clip_scales_to_max_norm_and_returns_norm_before():
    grads = _grads(_params(), 4)
    before = {k: g.copy() for k, g in grads.items()}
    expected = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
    assert optim.global_norm(grads) == pytest.approx(expected, rel=1e-14)
    norm = optim.clip_grad_norm(grads, 0.5)
    assert norm == pytest.approx(expected, rel=1e-14)
    assert optim.global_norm(grads) == pytest.approx(0.5, rel=1e-5)
    assert optim.global_norm(grads) <= 0.5
    scale = grads["w"][0, 0] / before["w"][0, 0]
    for k in grads:  # one common factor: the direction is kept
        np.testing.assert_allclose(grads[k], before[k] * scale, rtol=1e-14)


def test_clip_leaves_small_gradients_alone():
    grads = _grads(_params(), 5)
    before = {k: g.copy() for k, g in grads.items()}
    norm = optim.clip_grad_norm(grads, 100.0)
    assert norm == pytest.approx(optim.global_norm(before), rel=1e-14)
    norm = optim.clip_grad_norm(grads, None)  # no clipping at all, the norm is still reported
    assert norm == pytest.approx(optim.global_norm(before), rel=1e-14)
    for k in grads:
        np.testing.assert_array_equal(grads[k], before[k])


# ------------------------------------------------------------------------------------------ schedule


LR, MIN_LR, WARMUP, TOTAL = 1e-3, 1e-4, 10, 100


def _lr(step, **overrides):
    schedule = {"lr": LR, "total_steps": TOTAL, "warmup_steps": WARMUP, "min_lr": MIN_LR}
    return optim.lr_at(step, **{**schedule, **overrides})


def test_warmup_is_linear_and_peaks_at_its_end():
    warm = [_lr(s) for s in range(WARMUP)]
    assert warm[0] == pytest.approx(LR / WARMUP, rel=1e-14)
    np.testing.assert_allclose(np.diff(warm), LR / WARMUP, rtol=1e-12)
    assert warm[-1] == pytest.approx(LR, rel=1e-14)
    assert _lr(WARMUP) == pytest.approx(LR, rel=1e-14)
    assert max(_lr(s) for s in range(2 * TOTAL)) == pytest.approx(LR, rel=1e-14)


def test_cosine_decay_to_min_lr():
    decay = [_lr(s) for s in range(WARMUP, TOTAL)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing
    mid = WARMUP + (TOTAL - WARMUP) // 2
    assert _lr(mid) == pytest.approx((LR + MIN_LR) / 2, rel=1e-14)
    for s in (23, 61, TOTAL - 1):
        progress = (s - WARMUP) / (TOTAL - WARMUP)
        cosine = MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * progress)) / 2
        assert _lr(s) == pytest.approx(cosine, rel=1e-14)
    assert MIN_LR < _lr(TOTAL - 1) < MIN_LR * 1.01
    for s in (TOTAL, TOTAL + 1, 10 * TOTAL):
        assert _lr(s) == MIN_LR


def test_no_warmup_starts_at_peak():
    assert _lr(0, warmup_steps=0) == LR
    assert _lr(0, warmup_steps=0, min_lr=0.0) == LR and _lr(TOTAL, min_lr=0.0) == 0.0
