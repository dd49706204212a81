"""Each layer's backward against central differences in float64, plus attention's causality and KV cache.

A layer is checked through the fake loss L = sum(y * dy) with a fixed random dy: then dL/dy = dy, and
the layer's backward called with dy must return dL/d(every input), which finite differences of L see.
"""

import warnings

import numpy as np
import pytest
from helpers import check_layer_gradients, fake_loss

from minitodi.core import layers, model
from minitodi.core.gradcheck import check_array

TOL = 1e-6


def _rng(seed):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------ embedding


def test_embedding_backward_with_repeated_ids():
    rng = _rng(0)
    V, P, C = 11, 9, 6
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((P, C))
    idx = np.array([[3, 7, 3, 0, 7], [7, 7, 1, 3, 3]])  # 3 and 7 repeat within and across rows
    pos0 = 2
    y, cache = layers.embedding_forward(wte, wpe, idx, pos0)
    dy = rng.standard_normal(y.shape)
    dwte, dwpe = layers.embedding_backward(dy, cache)
    f = fake_loss(lambda: layers.embedding_forward(wte, wpe, idx, pos0), dy)
    used = np.unique(idx)
    assert check_array(f, wte, dwte, rows=used).max_rel_error < TOL
    assert check_array(f, wpe, dwpe).max_rel_error < TOL
    # rows no token uses get exactly nothing; a repeated id sums its contributions (scatter-add)
    unused = np.setdiff1d(np.arange(V), used)
    assert np.all(dwte[unused] == 0)
    np.testing.assert_allclose(dwte[7], dy[idx == 7].sum(axis=0), rtol=1e-14)
    assert np.all(dwpe[:pos0] == 0) and np.all(dwpe[pos0 + idx.shape[1]:] == 0)


# ------------------------------------------------------------------------------------------ layer norm


def test_layernorm_backward():
    rng = _rng(1)
    C = 7
    x = rng.standard_normal((2, 3, C)) * 2.0 + 0.5
    w, b = 1.0 + 0.3 * rng.standard_normal(C), 0.3 * rng.standard_normal(C)
    y, cache = layers.layernorm_forward(x, w, b)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = layers.layernorm_backward(dy, cache)
    f = fake_loss(lambda: layers.layernorm_forward(x, w, b), dy)
    check_layer_gradients(f, ((x, dx), (w, dw), (b, db)), TOL)


# ------------------------------------------------------------------------------------------ linear


def test_linear_backward_with_3d_input():
    rng = _rng(2)
    x = rng.standard_normal((2, 4, 5))
    w, b = rng.standard_normal((5, 3)), rng.standard_normal(3)
    y, cache = layers.linear_forward(x, w, b)
    assert y.shape == (2, 4, 3)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = layers.linear_backward(dy, cache)
    f = fake_loss(lambda: layers.linear_forward(x, w, b), dy)
    check_layer_gradients(f, ((x, dx), (w, dw), (b, db)), TOL)


# ------------------------------------------------------------------------------------------ GELU


def test_gelu_backward():
    rng = _rng(3)
    # a grid over the negative tail, the bend and the linear part, plus random points
    x = np.concatenate([np.linspace(-4.0, 4.0, 25), rng.standard_normal(35)]).reshape(3, 4, 5)
    y, cache = layers.gelu_forward(x)
    dy = rng.standard_normal(y.shape)
    dx = layers.gelu_backward(dy, cache)
    f = fake_loss(lambda: layers.gelu_forward(x), dy)
    assert check_array(f, x, dx).max_rel_error < TOL


def test_gelu_is_gpt2_tanh_form():
    """GELU equals GPT-2's tanh form 0.5 x (1 + tanh(u)), the readable reference, to float64 rounding.

    The reference is evaluated in extended precision: in float64 its 1 + tanh(u) cancels for negative x
    (6e-15 relative at x = -3), which the layer's sigmoid form avoids.
    """
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    xl = x.astype(np.longdouble)
    k = np.sqrt(np.longdouble(2) / np.longdouble(np.pi))
    expected = 0.5 * xl * (1 + np.tanh(k * (xl + np.longdouble(0.044715) * xl**3)))
    np.testing.assert_allclose(layers.gelu_forward(x)[0], expected.astype(np.float64), rtol=1e-15, atol=0)
    # far in the negative tail, float32 neither overflows nor warns: the output is 0 to within 1e-30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tail = layers.gelu_forward(np.array([-12.0, -60.0], dtype=np.float32))[0]
    assert tail.dtype == np.float32 and np.all(np.abs(tail) < 1e-30)


# ------------------------------------------------------------------------------------------ attention


def _qkv(seed, B=2, T=5, C=12):
    return _rng(seed).standard_normal((B, T, 3 * C))


def test_attention_backward_several_heads():
    rng = _rng(4)
    qkv = _qkv(4)
    H = 3
    y, cache = layers.attention_forward(qkv, H)
    assert y.shape == (2, 5, 12)
    dy = rng.standard_normal(y.shape)
    dqkv = layers.attention_backward(dy, cache)
    assert dqkv.shape == qkv.shape
    f = fake_loss(lambda: layers.attention_forward(qkv, H), dy)
    assert check_array(f, qkv, dqkv).max_rel_error < TOL


def test_attention_matches_a_plain_reference():
    """The in-place fast path against softmax(q k^T / sqrt(hs) + mask) v written out head by head."""
    qkv, H, hs = _qkv(12, T=6), 3, 4
    q, k, v = np.split(qkv, 3, axis=-1)
    expected = np.empty_like(q)
    for h in range(H):
        cols = slice(h * hs, (h + 1) * hs)
        scores = q[:, :, cols] @ k[:, :, cols].transpose(0, 2, 1) / np.sqrt(hs)
        scores[:, np.triu(np.ones((6, 6), bool), k=1)] = -np.inf  # key after the query
        att = np.exp(scores - scores.max(axis=-1, keepdims=True))
        expected[:, :, cols] = (att / att.sum(axis=-1, keepdims=True)) @ v[:, :, cols]
    np.testing.assert_allclose(layers.attention_forward(qkv, H)[0], expected, rtol=1e-13, atol=1e-14)


def test_attention_is_causal():
    qkv = _qkv(5, T=6)
    y, _ = layers.attention_forward(qkv, 3)
    changed = qkv.copy()
    changed[:, 4:] += _rng(6).standard_normal(changed[:, 4:].shape)  # alter positions 4 and 5 only
    y2, _ = layers.attention_forward(changed, 3)
    np.testing.assert_array_equal(y2[:, :4], y[:, :4])
    assert np.abs(y2[:, 4:] - y[:, 4:]).min() > 0
    # the first position sees only itself: its output is its own value vector
    C = 12
    np.testing.assert_allclose(y[:, 0], qkv[:, 0, 2 * C:], rtol=1e-14)


def test_attention_past_equals_full_sequence():
    qkv = _qkv(7, T=7)
    H = 3
    y, _ = layers.attention_forward(qkv, H)
    y1, c1 = layers.attention_forward(qkv[:, :4], H)
    k, v = c1[1:3]  # the cache is (q, k, v, att, scale): k and v are the KV cache
    y2, c2 = layers.attention_forward(qkv[:, 4:], H, past=(k, v))
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y, rtol=0, atol=1e-12)
    assert c2[1].shape == (2, H, 7, 4)


# ------------------------------------------------------------------------------------------ cross-entropy


def test_cross_entropy_backward_with_ignored_targets():
    rng = _rng(8)
    V = 9
    logits = rng.standard_normal((2, 6, V)) * 2.0
    targets = rng.integers(0, V, size=(2, 6))
    targets[0, 1] = targets[1, 4] = targets[1, 5] = layers.IGNORE_INDEX
    dloss = 1.7
    loss, cache = layers.cross_entropy_forward(logits, targets)
    dlogits = layers.cross_entropy_backward(dloss, cache)
    f = lambda: dloss * float(layers.cross_entropy_forward(logits, targets)[0])  # noqa: E731
    # Logits of spread 2 give entries as small as 1e-5, where the default step's rounding error
    # (~|L| 1e-16 / eps) is 1e-6 relative; measured worst errors: order 2, eps 1e-5: 1.0e-6;
    # order 4, eps 1e-4: 2.5e-7; order 4, eps 1e-3: 4e-9 (the fourth-order stencil's truncation stays small).
    assert check_array(f, logits, dlogits, eps=1e-3, order=4).max_rel_error < TOL
    # ignored positions get exactly no gradient; the loss is the mean over the 9 counted positions
    assert np.all(dlogits[targets == layers.IGNORE_INDEX] == 0)
    counted = targets != layers.IGNORE_INDEX
    logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logq, np.where(counted, targets, 0)[..., None], -1)[..., 0][counted].mean()
    assert float(loss) == pytest.approx(expected, rel=1e-13)


def test_cross_entropy_rejects_bad_targets():
    logits = np.zeros((1, 3, 4))
    with pytest.raises(ValueError, match="ignore index"):
        layers.cross_entropy_forward(logits, np.full((1, 3), layers.IGNORE_INDEX))
    with pytest.raises(ValueError, match="targets must be in"):
        layers.cross_entropy_forward(logits, np.array([[0, 4, 1]]))
    with pytest.raises(ValueError, match="targets must be in"):
        layers.cross_entropy_forward(logits, np.array([[0, -2, 1]]))


# ------------------------------------------------------------------------------------------ through the model


def test_model_is_causal(small_gpt2):
    config, params = small_gpt2
    idx = _rng(9).integers(0, config.vocab_size, size=(2, 10))
    logits, _ = model.forward(params, idx, config)
    changed = idx.copy()
    changed[:, 6] = (changed[:, 6] + 5) % config.vocab_size
    logits2, _ = model.forward(params, changed, config)
    np.testing.assert_array_equal(logits2[:, :6], logits[:, :6])
    assert np.abs(logits2[:, 6:] - logits[:, 6:]).max() > 1e-3


@pytest.mark.parametrize("split", [1, 4, 9])
def test_model_kv_cache_equals_full_forward(small_gpt2, split):
    config, params = small_gpt2
    idx = _rng(10).integers(0, config.vocab_size, size=(2, 10))
    full, _ = model.forward(params, idx, config)
    first, cache = model.forward(params, idx[:, :split], config)
    rest, cache2 = model.forward(params, idx[:, split:], config, past=cache["present"])
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), full, rtol=0, atol=1e-12)
    assert len(cache2["present"]) == config.n_layer
    assert cache2["present"][0][0].shape[2] == 10


def test_model_kv_cache_one_token_at_a_time(small_gpt2):
    config, params = small_gpt2
    idx = _rng(11).integers(0, config.vocab_size, size=(1, 16))  # the whole context
    full, _ = model.forward(params, idx, config)
    past, steps = None, []
    for t in range(idx.shape[1]):
        out, cache = model.forward(params, idx[:, t:t + 1], config, past=past)
        past = cache["present"]
        steps.append(out)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-12)
