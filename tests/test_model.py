"""The whole GPT: every parameter's gradient against finite differences, and the model's API.

The gradients are checked for cross-entropy and ToDi; then the API's errors, dtypes, initialisation,
and NumPy/CuPy parity.
"""

import numpy as np
import pytest
from helpers import cross_entropy_pass, perturbed_params, small_gpt2_config

from minitodi import parallel
from minitodi.core import device, layers, model
from minitodi.core.gradcheck import check_array, check_arrays, directional_check
from minitodi.core.losses import LOSSES

TOL = 1e-6
# Whole-model checks use the fourth-order stencil at eps = 1e-3. Measured over EVERY checkable entry of
# the model and batch below (7008 entries): order 2, eps 1e-5 leaves 0.09 % (CE, worst 5.1e-6) and 0.29 %
# (ToDi, worst 1.0e-5) above 1e-6 -- entries whose gradient is ~1e-8 by cancellation, next to a loss ~1,
# where rounding (|L| 1e-16 / eps) and truncation (eps^2 f''') both matter; order 4, eps 1e-3: worst
# 1.4e-7 (CE) and 1.5e-7 (ToDi), so any sample of entries passes with margin.
FD_EPS, FD_ORDER = 1e-3, 4
MAX_ENTRIES = 8


@pytest.fixture
def gpt2_batch(small_gpt2):
    """(config, params, idx, targets, teacher): the small GPT-2 and a batch of 2 x 8 tokens for it.

    Three targets are ignored; ``teacher`` is random teacher logits of spread 2 for ToDi.
    """
    config, params = small_gpt2
    rng = np.random.default_rng(1)
    idx = rng.integers(0, config.vocab_size, size=(2, 8))
    targets = rng.integers(0, config.vocab_size, size=(2, 8))
    targets[0, :2] = targets[1, 5] = layers.IGNORE_INDEX
    teacher = 2.0 * rng.standard_normal((2, 8, config.vocab_size))
    return config, params, idx, targets, teacher


def _checked_rows(config, idx):
    """Embedding rows the batch uses, and c_attn.bias without its key third.

    The key bias has a gradient of exactly 0: it adds q_t . b_k to every score of query t, a constant
    along the softmax's axis. Finite differences of an exact 0 are pure rounding noise (relative error
    ~1), so those entries are checked separately, in absolute terms.
    """
    C = config.n_embd
    q_and_v = np.r_[0:C, 2 * C:3 * C]
    rows = {"transformer.wte.weight": np.unique(idx)}
    rows.update({f"transformer.h.{l}.attn.c_attn.bias": q_and_v for l in range(config.n_layer)})
    return rows


def _assert_key_bias_gradient_is_zero(config, grads):
    C = config.n_embd
    scale = max(np.abs(g).max() for g in grads.values())
    for l in range(config.n_layer):
        assert np.abs(grads[f"transformer.h.{l}.attn.c_attn.bias"][C:2 * C]).max() <= 1e-14 * scale


def _check_every_parameter(f, params, grads, config, idx):
    results = check_arrays(f, params, grads, eps=FD_EPS, order=FD_ORDER, max_entries=MAX_ENTRIES,
                           rows=_checked_rows(config, idx))
    assert set(results) == set(params)
    worst = max(results.items(), key=lambda kv: kv[1].max_rel_error)
    assert worst[1].max_rel_error < TOL, worst
    # rows no token uses get gradient only through the tied output head: check some of those too
    unused = np.setdiff1d(np.arange(config.vocab_size), np.unique(idx))
    wte = "transformer.wte.weight"
    res = check_array(f, params[wte], grads[wte], eps=FD_EPS, order=FD_ORDER, max_entries=MAX_ENTRIES,
                      rows=unused)
    assert res.max_rel_error < TOL
    a, n, err = directional_check(f, params, grads)
    assert err < TOL and abs(a) > 1e-6


def test_cross_entropy_gradient_of_every_parameter(gpt2_batch):
    config, params, idx, targets, _ = gpt2_batch
    _, _, grads = cross_entropy_pass(params, idx, targets, config)
    assert list(grads) == list(params)
    assert all(grads[k].shape == params[k].shape and grads[k].dtype == np.float64 for k in params)
    _assert_key_bias_gradient_is_zero(config, grads)

    def f():
        return float(layers.cross_entropy_forward(model.forward(params, idx, config)[0], targets)[0])
    _check_every_parameter(f, params, grads, config, idx)


def test_todi_gradient_of_every_parameter(gpt2_batch):
    config, params, idx, targets, teacher = gpt2_batch
    mask = targets != layers.IGNORE_INDEX
    logits, cache = model.forward(params, idx, config)
    _, dlogits = LOSSES["todi"](logits, teacher, mask, temperature=2.0)
    grads = model.backward(dlogits, cache)
    assert list(grads) == list(params)
    _assert_key_bias_gradient_is_zero(config, grads)
    base = logits.copy()  # ToDi's weight is a stop-gradient: held at the base student logits

    def f():
        student = model.forward(params, idx, config)[0]
        return LOSSES["todi"](student, teacher, mask, temperature=2.0, stopgrad_at=base)[0]
    _check_every_parameter(f, params, grads, config, idx)


@pytest.mark.parametrize("sharded", [False, True], ids=["whole batch", "two shards"])
def test_gradient_with_the_head_at_counted_rows_only(gpt2_batch, sharded, monkeypatch):
    """Training's path: forward(rows=mask), CE on those rows, backward scattering dx; finite differences.

    Also with the batch of 2 x 8 tokens of width 16 run as two shards, one sequence each, as training runs
    it (parallel.forward_in_shards): fails when a shard's gradient is dropped.
    """
    config, params, idx, targets, _ = gpt2_batch
    monkeypatch.setattr(parallel, "SHARD_WORK", 8 * 16 if sharded else 10**9)
    mask = targets != layers.IGNORE_INDEX
    logits, cache = parallel.forward_in_shards(params, idx, config, rows=mask)
    assert len(cache["shards"]) == (2 if sharded else 1)
    _, ce_cache = layers.cross_entropy_forward(logits, targets[mask])
    grads = parallel.backward_in_shards(layers.cross_entropy_backward(1.0, ce_cache), cache)

    def f():
        logits = model.forward(params, idx, config, rows=mask)[0]
        return float(layers.cross_entropy_forward(logits, targets[mask])[0])
    _check_every_parameter(f, params, grads, config, idx)


def test_wrong_gradient_is_caught(gpt2_batch):
    """The check above can fail: a gradient off by 1 % in one tensor does."""
    config, params, idx, targets, _ = gpt2_batch
    _, _, grads = cross_entropy_pass(params, idx, targets, config)
    grads["transformer.h.1.ln_2.bias"] *= 1.01

    def f():
        return float(layers.cross_entropy_forward(model.forward(params, idx, config)[0], targets)[0])
    results = check_arrays(f, params, grads, eps=FD_EPS, order=FD_ORDER, max_entries=MAX_ENTRIES,
                           rows=_checked_rows(config, idx))
    assert results["transformer.h.1.ln_2.bias"].max_rel_error > 1e-3
    assert results["transformer.h.1.ln_1.bias"].max_rel_error < TOL


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_head_at_selected_rows_equals_the_full_head_there(arch, request):
    """forward(rows=mask) gives the full logits at the masked positions, and the full backward's gradients.

    Backward from those rows gives the gradients of the full backward with dlogits zero elsewhere
    (float64, to rounding). The models: the small GPT-2 and the small Llama of conftest.py.
    """
    config, params = request.getfixturevalue(f"small_{arch}")
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 37, size=(3, 10))
    rows = rng.random((3, 10)) < 0.4
    full, full_cache = model.forward(params, idx, config)
    some, some_cache = model.forward(params, idx, config, rows=rows)
    assert some.shape == (rows.sum(), 37)
    np.testing.assert_allclose(some, full[rows], rtol=1e-13, atol=1e-13)
    dlogits = np.zeros_like(full)
    dlogits[rows] = rng.standard_normal((rows.sum(), 37))
    want, got = model.backward(dlogits, full_cache), model.backward(dlogits[rows], some_cache)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-13, err_msg=name)


# ------------------------------------------------------------------------------------------ API errors


def test_token_id_errors():
    config = small_gpt2_config()
    params = model.init_params(config)
    for bad in (np.array([[0, -1, 2]]), np.array([[0, config.vocab_size, 2]])):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 37\)"):
            model.forward(params, bad, config)
    with pytest.raises(TypeError, match="integers"):
        model.forward(params, np.array([[0.0, 1.0]]), config)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model.forward(params, np.array([0, 1]), config)
    with pytest.raises(ValueError, match="exceeds n_positions = 16"):
        model.forward(params, np.zeros((1, 17), dtype=np.int64), config)
    # with a KV cache the new tokens start after the cached ones
    _, cache = model.forward(params, np.zeros((1, 10), dtype=np.int64), config)
    with pytest.raises(ValueError, match="sequence of 17 positions exceeds"):
        model.forward(params, np.zeros((1, 7), dtype=np.int64), config, past=cache["present"])
    logits, _ = model.forward(params, np.zeros((1, 6), dtype=np.int32), config, past=cache["present"])
    assert logits.shape == (1, 6, 37)


def test_check_params_errors():
    config = small_gpt2_config()
    params = model.init_params(config)
    model.check_params(params, config)  # fine as made
    missing = dict(params)
    del missing["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(KeyError, match="transformer.h.1.mlp.c_fc.bias"):
        model.check_params(missing, config)
    with pytest.raises(KeyError, match="lm_head.weight"):
        model.check_params({**params, "lm_head.weight": params["transformer.wte.weight"]}, config)
    wrong = {**params, "transformer.h.0.attn.c_attn.weight": np.zeros((16, 32), np.float32)}
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.weight has shape \(16, 32\)"):
        model.check_params(wrong, config)
    mixed = {**params, "transformer.ln_f.bias": params["transformer.ln_f.bias"].astype(np.float64)}
    with pytest.raises(TypeError, match="one float dtype"):
        model.check_params(mixed, config)


def test_backward_after_forward_with_past_raises():
    config = small_gpt2_config()
    params = model.init_params(config, dtype=np.float64)
    idx = np.arange(8).reshape(1, 8)
    _, cache = model.forward(params, idx[:, :5], config)
    logits, cache2 = model.forward(params, idx[:, 5:], config, past=cache["present"])
    with pytest.raises(ValueError, match="KV cache"):
        model.backward(np.ones_like(logits), cache2)


def test_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        small_gpt2_config(n_head=3)
    with pytest.raises(ValueError, match="n_layer"):
        small_gpt2_config(n_layer=0)


# ------------------------------------------------------------------------------------------ dtype, init


def test_computes_in_the_params_dtype():
    config = small_gpt2_config()
    idx = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 5))
    out = {}
    for dtype in (np.float32, np.float64):
        params = perturbed_params(config, dtype=dtype)
        assert all(x.dtype == dtype for x in params.values())
        logits, cache = model.forward(params, idx, config)
        assert logits.dtype == dtype
        loss, ce_cache = layers.cross_entropy_forward(logits, np.zeros_like(idx))
        dlogits = layers.cross_entropy_backward(1.0, ce_cache)
        assert loss.dtype == dtype and dlogits.dtype == dtype
        grads = model.backward(dlogits, cache)
        assert {g.dtype for g in grads.values()} == {np.dtype(dtype)}
        out[dtype] = logits
    # the same weights in two precisions agree to float32 rounding
    np.testing.assert_allclose(out[np.float32], out[np.float64], rtol=0, atol=1e-5)


def test_init_is_seeded():
    config = small_gpt2_config()
    a, b, c = model.init_params(config, 3), model.init_params(config, 3), model.init_params(config, 4)
    assert list(a) == list(model.param_shapes(config))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["transformer.wte.weight"], c["transformer.wte.weight"])
    assert not np.array_equal(a["transformer.h.1.mlp.c_proj.weight"], c["transformer.h.1.mlp.c_proj.weight"])
    assert np.all(a["transformer.h.0.ln_1.weight"] == 1)
    assert np.all(a["transformer.h.0.attn.c_attn.bias"] == 0)


def test_init_scales():
    """N(0, 0.02) everywhere, N(0, 0.02 / sqrt(2 n_layer)) for the projections into the residual."""
    config = model.GPTConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=4, n_head=4)
    params = model.init_params(config, 0, dtype=np.float64)
    resid = np.concatenate([params[f"transformer.h.{l}.{m}.c_proj.weight"].ravel()
                            for l in range(4) for m in ("attn", "mlp")])
    other = np.concatenate([params[k].ravel() for k in params if k.endswith(("wte.weight", "c_fc.weight",
                                                                             "c_attn.weight"))])
    assert resid.std() == pytest.approx(0.02 / np.sqrt(8), rel=0.03)  # 163840 draws: std error 0.2 %
    assert other.std() == pytest.approx(0.02, rel=0.03)
    assert abs(resid.mean()) < 1e-4 and abs(other.mean()) < 1e-4


def test_n_params_counts_gpt2_by_hand():
    """n_params against the count by hand, and against GPT-2 small's (124M) 124,439,808.

    Embeddings V C + P C; per block 2 norms (4C), c_attn (3C^2 + 3C), c_proj (C^2 + C), c_fc (4C^2 + 4C),
    mlp.c_proj (4C^2 + C): 12 C^2 + 13 C; ln_f 2C; the tied head adds nothing.
    """
    V, P, C, L = 37, 16, 16, 2
    assert model.n_params(small_gpt2_config()) == V * C + P * C + L * (12 * C * C + 13 * C) + 2 * C
    gpt2_124m = small_gpt2_config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12)
    assert model.n_params(gpt2_124m) == 124_439_808


# ------------------------------------------------------------------------------------------ CuPy


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-11), (np.float32, 1e-4)])
def test_cupy_matches_numpy(dtype, tol):
    config = small_gpt2_config()
    params = perturbed_params(config, dtype=dtype)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, config.vocab_size, size=(3, 12))
    targets = rng.integers(0, config.vocab_size, size=(3, 12))
    targets[0, :4] = layers.IGNORE_INDEX
    logits, loss, grads = cross_entropy_pass(params, idx, targets, config)
    gpu = {k: device.to_device(x, "gpu") for k, x in params.items()}
    idx_g, targets_g = device.to_device(idx, "gpu"), device.to_device(targets, "gpu")
    logits_g, loss_g, grads_g = cross_entropy_pass(gpu, idx_g, targets_g, config)
    assert device.device_of(logits_g) == "gpu" and logits_g.dtype == dtype
    assert device.to_float(loss_g) == pytest.approx(float(loss), rel=tol)
    np.testing.assert_allclose(device.to_numpy(logits_g), logits, rtol=0, atol=tol * np.abs(logits).max())
    assert list(grads_g) == list(grads)
    for k, g in grads.items():
        assert device.device_of(grads_g[k]) == "gpu" and grads_g[k].dtype == dtype
        np.testing.assert_allclose(device.to_numpy(grads_g[k]), g, rtol=0, atol=tol * np.abs(g).max(),
                                   err_msg=k)
    # CuPy would wrap an out-of-range id silently: the model must refuse it on the GPU too
    with pytest.raises(ValueError, match="token ids must be in"):
        model.forward(gpu, device.to_device(np.array([[0, config.vocab_size]]), "gpu"), config)
