r"""The layers of GPT-2 and Llama, each as a pure forward/backward pair.

    y, cache = x_forward(inputs...)        grads = x_backward(dy, cache)

A ``d`` prefix marks a gradient of the final scalar loss: ``dy`` = dL/dy. Shapes use B (batch),
T (time), C (channels), V (vocabulary), H (heads), hs (head size, C / H). Every backward restates the
forward line it differentiates. No layer keeps state: parameters are passed in, and the cache holds
exactly what the backward needs. Everything runs on NumPy or CuPy arrays alike (``xp`` comes from the
arrays) and in the dtype of the inputs.
"""

import math

import numpy as np

from .device import array_module

IGNORE_INDEX = -100


# ---- token + position embedding ------------------------------------------------------------------
def embedding_forward(wte, wpe, idx, pos0=0):
    """x[b, t] = wte[idx[b, t]] + wpe[pos0 + t]: the token's row plus its position's row.

    wte (V, C), wpe (n_positions, C), idx (B, T) integer ids, already validated -> x (B, T, C). Without
    wpe (None: a Llama, whose positions enter later, as rotations of q and k) x[b, t] = wte[idx[b, t]].
    """
    x = wte[idx]  # (B, T) -> (B, T, C)
    wpe_shape = None
    if wpe is not None:
        x = x + wpe[pos0:pos0 + idx.shape[1]]  # (T, C), the same for every sequence
        wpe_shape = wpe.shape
    return x, (idx, wte.shape, wpe_shape, pos0)


def embedding_backward(dx, cache):
    """forward was: x[b, t] = wte[idx[b, t]] + wpe[pos0 + t], so

    dwte[v] = sum of dx[b, t] over every (b, t) with idx[b, t] = v (a token seen twice adds twice:
    a scatter-add, not an assignment), and dwpe[pos0 + t] = sum_b dx[b, t] (None without wpe).
    """
    idx, wte_shape, wpe_shape, pos0 = cache
    xp = array_module(dx)
    C = dx.shape[-1]
    dwte = xp.zeros(wte_shape, dtype=dx.dtype)
    # the scatter-add on the flattened table, one axis: entry (v, c) of dwte sits at v C + c. The same sums in
    # the same order as add.at on rows, 4x faster (614 -> 140 us at 512 tokens x 128)
    flat = (idx.reshape(-1, 1) * C + xp.arange(C)).reshape(-1)  # (B T C,)
    xp.add.at(dwte.reshape(-1), flat, dx.reshape(-1))
    if wpe_shape is None:
        return dwte, None
    dwpe = xp.zeros(wpe_shape, dtype=dx.dtype)
    dwpe[pos0:pos0 + dx.shape[1]] = dx.sum(axis=0)
    return dwte, dwpe


# ---- layer norm ----------------------------------------------------------------------------------
def layernorm_forward(x, w, b, eps=1e-5):
    """y = (x - mean) * rstd * w + b over the last axis, rstd = 1 / sqrt(var + eps).

    x (..., C), w (C,), b (C,) -> y (..., C); var is the biased variance (divided by C), as in PyTorch.
    The row sums of squares are dot products (no squared copy), and xhat is normalised in place.
    """
    xp = array_module(x)
    C = x.shape[-1]
    centered = x - x.sum(axis=-1, keepdims=True) / C  # x - mean(x)
    rstd = 1.0 / xp.sqrt(_row_dot(centered, centered) / C + eps)
    xhat = xp.multiply(centered, rstd, out=centered)  # in the same buffer
    y = xhat * w
    y += b
    return y, (xhat, rstd, w)


def layernorm_backward(dy, cache):
    """forward was: y = xhat * w + b, xhat = (x - mean(x)) * rstd, so

    dw = sum over positions of dy * xhat,  db = sum of dy,  dxhat = dy * w, and through the
    normalisation (mean and rstd depend on every x_j of the row; d xhat_i / d x_j =
    rstd * (delta_ij - 1/C - xhat_i xhat_j / C)):

        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).

    So sum_i dx_i = 0 exactly, and <dx, xhat> = rstd <dxhat, xhat> eps / (var + eps): zero only up to
    eps. Derived in notebook 03, "Layer norm backward".
    """
    xhat, rstd, w = cache
    xp = array_module(dy)
    C = dy.shape[-1]
    dy2 = dy.reshape(-1, C)  # (N, C)
    dw = (dy2 * xhat.reshape(-1, C)).sum(axis=0)
    db = dy2.sum(axis=0)
    dxhat = dy * w
    along_xhat = xhat * (_row_dot(dxhat, xhat) / C)  # xhat mean(dxhat * xhat)
    dx = xp.subtract(dxhat, along_xhat, out=along_xhat)  # dx takes over the buffer, built in place:
    dx -= dxhat.sum(axis=-1, keepdims=True) / C  # dxhat - mean(dxhat) - xhat mean(dxhat * xhat)
    dx *= rstd
    return dx, dw, db


def _row_dot(a, b):
    """sum over the last axis of a * b, kept as an axis of 1: one pass, no product array."""
    return array_module(a).einsum("...c,...c->...", a, b)[..., None]


# ---- linear (GPT-2's Conv1D: the weight is stored (in, out)) -------------------------------------
def linear_forward(x, w, b):
    """y = x @ w + b:   x (..., in), w (in, out), b (out,) or None (no bias) -> y (..., out).

    The product runs on x flattened to (N, in): one matrix product instead of a batch of small ones.
    """
    y = x.reshape(-1, x.shape[-1]) @ w  # (N, in) @ (in, out)
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[1]), (x, w, b is not None)


def linear_backward(dy, cache):
    """forward was: y = x @ w + b, so dx = dy @ w^T, dw = x^T @ dy (summed over positions), db = sum dy.

    Returns (dx, dw, db), db None without a bias. Derived in index notation in notebook 03, "Linear
    backward".
    """
    x, w, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    dx = (dy2 @ w.T).reshape(x.shape)  # (N, out) @ (out, in)
    dw = x.reshape(-1, x.shape[-1]).T @ dy2  # (in, N) @ (N, out)
    db = None
    if has_bias:
        db = dy2.sum(axis=0)
    return dx, dw, db


# ---- GELU, GPT-2's tanh form ("gelu_new") --------------------------------------------------------
_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu_forward(x):
    """y = 0.5 x (1 + tanh(u)),  u = k (x + a x^3),  k = sqrt(2 / pi), a = 0.044715.

    Computed as y = x s with s = sigmoid(2u) = 1 / (1 + exp(-2u)), the same function since
    0.5 (1 + tanh u) = sigmoid(2u): one exp (cheaper than tanh) and no cancellation in 1 + tanh(u) for
    negative x. In place on one temporary: GELU is the widest elementwise layer of the model.
    """
    xp = array_module(x)
    minus_2u = x * x
    minus_2u *= -2.0 * _GELU_K * _GELU_A
    minus_2u -= 2.0 * _GELU_K
    minus_2u *= x  # built in place: -2k (x + a x^3) = -2u
    with np.errstate(over="ignore"):  # x below about -10: exp overflows to inf, and s = 1 / inf is 0
        denominator = xp.exp(minus_2u, out=minus_2u)  # the same buffer from here on
    denominator += 1.0  # 1 + exp(-2u)
    s = xp.reciprocal(denominator, out=denominator)  # s = 1 / (1 + exp(-2u)) = sigmoid(2u)
    return x * s, (x, s)


def gelu_backward(dy, cache):
    """forward was: y = x s, s = sigmoid(2u), u = k (x + a x^3), so

    with d sigmoid(z) / dz = sigmoid(z) (1 - sigmoid(z)):

        dy/dx = s + x * 2 s (1 - s) * k (1 + 3 a x^2)

    (= 0.5 (1 + tanh u) + 0.5 x (1 - tanh(u)^2) du/dx), built below in that order, in place.
    Notebook 03, "GELU backward".
    """
    x, s = cache
    xp = array_module(x)
    dudx = x * x
    dudx *= 3.0 * _GELU_A * _GELU_K
    dudx += _GELU_K  # built in place: du/dx = k (1 + 3 a x^2)
    dsdu = 1.0 - s
    dsdu *= s
    dsdu *= 2.0  # built in place: ds/du = 2 s (1 - s)
    dydx = xp.multiply(dsdu, dudx, out=dsdu)  # ds/dx = ds/du du/dx, in the same buffer
    dydx *= x
    dydx += s  # built in place: dy/dx = s + x ds/dx
    return xp.multiply(dydx, dy, out=dydx)  # dx = dy dy/dx


# ---- causal multi-head self-attention (GPT-2's) ---------------------------------------------------
def _split_heads(x, H):
    B, T, C = x.shape
    return x.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)  # (B, T, C) -> (B, H, T, hs)


def _merge_heads(x):
    B, H, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * hs)  # (B, H, T, hs) -> (B, T, C)


def _causal_softmax(scores, scale):
    """att = softmax(scores * scale + causal mask) over the last axis, in the scores' buffer.

    scores (..., T, S): T queries at the last T of S positions (a KV cache holds the first S - T), each
    reading the keys up to its own position; a key after it gets -inf, so its weight is exactly 0.
    """
    xp = array_module(scores)
    T, S = scores.shape[-2:]
    future = xp.arange(S)[None, :] > xp.arange(S - T, S)[:, None]  # (T, S): the key comes after the query
    att = scores  # the same buffer from here on, turned into the weights in place:
    att *= scale
    att += xp.where(future, -xp.inf, 0.0).astype(att.dtype)
    att -= att.max(axis=-1, keepdims=True)  # the softmax, shifted by the row's max (no overflow)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    return att


def _causal_softmax_backward(datt, att):
    """dscores from datt, forward was att = softmax(scores * scale + mask) (its scale not applied here).

    The softmax's Jacobian row by row, d att_j / d pre_i = att_j (delta_ij - att_i), gives
    dpre = att * (datt - sum_j datt_j att_j); a masked entry has att = 0 and gets none.
    """
    centered = datt - _row_dot(datt, att)
    dpre = array_module(att).multiply(centered, att, out=centered)  # in the same buffer
    return dpre


def attention_forward(qkv, n_head, past=None):
    """GPT-2's causal self-attention from its fused projection qkv = [q | k | v] (c_attn's output).

    Per head, with hs the head size:

        att = softmax(q k^T / sqrt(hs) + causal mask),    y = att v,    heads merged.

    qkv (B, T, 3C) -> y (B, T, C). ``past``, for decoding with a KV cache, is ``(k, v)`` of the earlier
    positions, each (B, H, P, hs): the T new queries sit at positions P..P+T-1 and attend to all P + T
    keys up to their own. The cache is (q, k, v, att, scale), k and v with the earlier positions: the
    model passes ``(k, v)`` as ``past`` next time.
    """
    xp = array_module(qkv)
    q, k, v = xp.split(qkv, 3, axis=-1)  # (B, T, 3C) -> 3 x (B, T, C)
    q = _split_heads(q, n_head)  # (B, T, C) -> (B, H, T, hs)
    k = _split_heads(k, n_head)
    v = _split_heads(v, n_head)
    if past is not None:
        k = xp.concatenate([past[0], k], axis=2)  # (B, H, P + T, hs)
        v = xp.concatenate([past[1], v], axis=2)
    scale = 1.0 / math.sqrt(q.shape[-1])
    att = _causal_softmax(q @ k.swapaxes(-1, -2), scale)  # (B, H, T, hs) @ (B, H, hs, S) -> (B, H, T, S)
    y = _merge_heads(att @ v)  # (B, H, T, S) @ (B, H, S, hs) -> (B, H, T, hs) -> (B, T, C)
    return y, (q, k, v, att, scale)


def attention_backward(dy, cache):
    """forward was: pre = q k^T * scale (masked), att = softmax(pre), y = att v, so per head

        dv = att^T dy,    datt = dy v^T,    dpre = att * (datt - sum_j datt_j att_j),
        dscores = dpre * scale,    dq = dscores k,    dk = dscores^T q,

    and dqkv = [dq | dk | dv] (B, T, 3C). Only for a full sequence (no ``past``). Derived in index
    notation in notebook 03, "Attention backward".
    """
    q, k, v, att, scale = cache
    xp = array_module(dy)
    dyh = _split_heads(dy, q.shape[1])  # (B, T, C) -> (B, H, T, hs)
    dv = att.swapaxes(-1, -2) @ dyh  # (B, H, T, T) @ (B, H, T, hs)
    datt = dyh @ v.swapaxes(-1, -2)  # (B, H, T, hs) @ (B, H, hs, T)
    dpre = _causal_softmax_backward(datt, att)
    dscores = xp.multiply(dpre, scale, out=dpre)  # forward was: pre = scores * scale, scores = q k^T
    dq = dscores @ k  # (B, H, T, T) @ (B, H, T, hs)
    dk = dscores.swapaxes(-1, -2) @ q
    return xp.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)  # (B, T, 3C)


# ---- softmax cross-entropy with an ignore index --------------------------------------------------
def cross_entropy_forward(logits, targets, ignore_index=IGNORE_INDEX):
    """loss = mean over positions with targets != ignore_index of -log softmax(logits)[target].

    logits (..., V), targets (...) integer -> (loss as a 0-d array, cache). At least one position must
    count. Per row, with m its maximum and s = sum_v exp(x_v - m):

        -log softmax(x)[t] = -(x_t - m - log s) = log s - (x_t - m),

    and the softmax q = exp(x - m) / s is kept for the backward (one exp for both passes).
    """
    xp = array_module(logits)
    V = logits.shape[-1]
    counted = targets != ignore_index
    n = int(counted.sum())
    if n == 0:
        raise ValueError("cross-entropy: every target is the ignore index, nothing to average")
    safe = xp.where(counted, targets, 0)  # any valid id where ignored: those rows are multiplied by 0 below
    if int(safe.min()) < 0 or int(safe.max()) >= V:
        raise ValueError(f"cross-entropy: targets must be in [0, {V}) or {ignore_index}")
    x = logits.reshape(-1, V)  # (N, V)
    m = x.max(axis=-1, keepdims=True)  # (N, 1)
    shifted = x - m
    picked = xp.take_along_axis(shifted, safe.reshape(-1, 1), axis=-1)  # x_t - m, (N, 1)
    e = xp.exp(shifted, out=shifted)  # exp(x - m), in the same buffer
    s = e.sum(axis=-1, keepdims=True)  # (N, 1)
    q = xp.divide(e, s, out=e)  # q = softmax(x), in the same buffer
    nll = (xp.log(s) - picked)[:, 0]  # (N,)
    loss = (nll * counted.reshape(-1)).sum() / n
    return loss, (q.reshape(logits.shape), safe, counted, n)


def cross_entropy_backward(dloss, cache):
    """forward was: loss = -(1/N) sum_counted log q[target], q = softmax(logits), so

        dlogits = dloss * (q - onehot(target)) / N  at counted positions, 0 elsewhere.

    (Forward KL against a one-hot teacher: notebook 02, "Cross-entropy backward", and the training
    loss's (1 - kd_rate) CE + kd_rate KD in "The training loss: CE + KD".)
    """
    q, safe, counted, n = cache
    xp = array_module(q)
    scale = (counted * (dloss / n)).astype(q.dtype)
    dlogits = q * scale[..., None]
    rows = dlogits.reshape(-1, dlogits.shape[-1])  # a view: (..., V) -> (N, V)
    rows[xp.arange(rows.shape[0]), safe.reshape(-1)] -= scale.reshape(-1)
    return dlogits


# ---- RMSNorm (Llama's norm: layer norm without the mean and the bias) ----------------------------
def rmsnorm_forward(x, w, eps=1e-6):
    """y = x * rstd * w over the last axis, rstd = 1 / sqrt(mean(x^2) + eps).

    x (..., C), w (C,) -> y (..., C).
    """
    mean_square = _row_dot(x, x) / x.shape[-1]  # (..., 1)
    rstd = 1.0 / array_module(x).sqrt(mean_square + eps)
    xhat = x * rstd
    return xhat * w, (xhat, rstd, w)


def rmsnorm_backward(dy, cache):
    """forward was: y = xhat * w, xhat = x * rstd, rstd = (mean(x^2) + eps)^(-1/2), so

    dw = sum over positions of dy * xhat,  dxhat = dy * w, and with d rstd / d x_j = -rstd^3 x_j / C,
    d xhat_i / d x_j = rstd (delta_ij - xhat_i xhat_j / C):

        dx = rstd * (dxhat - xhat * mean(dxhat * xhat)).

    So <dx, xhat> = rstd <dxhat, xhat> eps / (mean(x^2) + eps): zero only up to eps, as for layer norm.
    Derived in notebook 05, "RMSNorm backward".
    """
    xhat, rstd, w = cache
    C = dy.shape[-1]
    dw = (dy.reshape(-1, C) * xhat.reshape(-1, C)).sum(axis=0)
    dxhat = dy * w
    along_xhat = xhat * (_row_dot(dxhat, xhat) / C)  # xhat mean(dxhat * xhat)
    dx = array_module(dy).subtract(dxhat, along_xhat, out=along_xhat)  # dx takes over the buffer:
    dx *= rstd  # rstd (dxhat - xhat mean(dxhat * xhat))
    return dx, dw


# ---- rotary position embeddings (RoPE), in transformers' rotate-half layout ----------------------
def rope_tables(pos0, T, hs, theta, like):
    """cos and sin (T, hs) of the angles (pos0 + t) theta^(-2i / hs), i < hs / 2.

    Each frequency is written twice ([f_0 .. f_{hs/2 - 1}, f_0 .. f_{hs/2 - 1}]): channel i is paired with
    channel i + hs/2. Angles are computed in float64, then cast to the dtype (and module) of ``like``.
    """
    xp = array_module(like)
    inv_freq = 1.0 / theta ** (xp.arange(0, hs, 2, dtype=xp.float64) / hs)  # (hs/2,)
    angles = xp.arange(pos0, pos0 + T, dtype=xp.float64)[:, None] * inv_freq  # (T, hs/2)
    angles = xp.concatenate([angles, angles], axis=-1)  # (T, hs)
    cos = xp.cos(angles).astype(like.dtype)
    sin = xp.sin(angles).astype(like.dtype)
    return cos, sin


def _rotate_half(x):
    """[x1, x2] -> [-x2, x1] on the last axis (hs/2 channels each): each pair (x1_i, x2_i) turned by pi/2."""
    half = x.shape[-1] // 2
    return array_module(x).concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotary_forward(x, cos, sin, n_head):
    """y = x cos + rotate_half(x) sin per head: the pair (x_i, x_{i+hs/2}) at position t turned by its angle.

    x (B, T, n_head hs), cos and sin (T, hs) from :func:`rope_tables` -> y (B, T, n_head hs).
    """
    B, T, C = x.shape
    xh = x.reshape(B, T, n_head, C // n_head)  # (B, T, C) -> (B, T, nh, hs)
    cos = cos[:, None, :]  # (T, hs) -> (T, 1, hs): the same angles for every head
    sin = sin[:, None, :]
    y = xh * cos + _rotate_half(xh) * sin
    return y.reshape(B, T, C), (cos, sin)


def rotary_backward(dy, cache):
    """forward was: y = R(a) x, turning each pair by its angle a:

        y_i = x_i cos a - x_{i+hs/2} sin a,    y_{i+hs/2} = x_{i+hs/2} cos a + x_i sin a.

    The backward of a rotation is the inverse rotation: dx = R(a)^T dy = R(-a) dy, that is
    dx = dy cos - rotate_half(dy) sin. Notebook 05, "Rotary embedding backward".
    """
    cos, sin = cache
    B, T, C = dy.shape
    dyh = dy.reshape(B, T, -1, cos.shape[-1])  # (B, T, nh, hs)
    dx = dyh * cos - _rotate_half(dyh) * sin
    return dx.reshape(B, T, C)


# ---- SwiGLU: Llama's gated unit between gate_proj / up_proj and down_proj ------------------------
def swiglu_forward(g, u):
    """y = silu(g) * u, silu(g) = g * sigmoid(g):   g, u (..., I) -> y (..., I).

    sigmoid(g) is computed as (1 + tanh(g / 2)) / 2, which never overflows.
    """
    xp = array_module(g)
    one_plus_tanh = xp.tanh(0.5 * g)
    one_plus_tanh += 1.0  # built in place: 1 + tanh(g / 2)
    s = xp.multiply(one_plus_tanh, 0.5, out=one_plus_tanh)  # s = sigmoid(g), in the same buffer
    return g * s * u, (g, u, s)


def swiglu_backward(dy, cache):
    """forward was: y = g s u, s = sigmoid(g), so with ds/dg = s (1 - s):

        dg = dy u (s + g s (1 - s)),    du = dy g s.       Returns (dg, du).

    Notebook 05, "SwiGLU backward".
    """
    g, u, s = cache
    gs = g * s
    dg = dy * u * (s + gs * (1.0 - s))
    du = dy * gs
    return dg, du


# ---- causal grouped-query attention (Llama's; with n_kv_head = n_head it is GPT-2's attention)
def grouped_attention_forward(q, k, v, n_head, n_kv_head, past=None):
    """Causal attention where G = n_head / n_kv_head query heads share one key/value head.

    Query head h reads key/value head h // G (transformers' repeat_kv order). Per query head:

        att = softmax(q k^T / sqrt(hs) + causal mask),   y = att v,   heads then merged.

    q (B, T, n_head hs), k and v (B, T, n_kv_head hs), already rotated -> y (B, T, n_head hs). ``past``
    as in :func:`attention_forward`, with n_kv_head heads; the cache is (q, k, v, att, scale) as there,
    q grouped (B, Hkv, G, T, hs) and k, v (B, Hkv, S, hs).
    """
    xp = array_module(q)
    k = _split_heads(k, n_kv_head)  # (B, T, Hkv hs) -> (B, Hkv, T, hs)
    v = _split_heads(v, n_kv_head)
    if past is not None:
        k = xp.concatenate([past[0], k], axis=2)  # (B, Hkv, P + T, hs)
        v = xp.concatenate([past[1], v], axis=2)
    B, T = q.shape[:2]
    G = n_head // n_kv_head  # query heads per key/value head
    hs = k.shape[3]
    q = _split_heads(q, n_head).reshape(B, n_kv_head, G, T, hs)  # the G query heads of each kv head
    scale = 1.0 / math.sqrt(hs)
    scores = q @ k[:, :, None].swapaxes(-1, -2)  # k broadcast over the group: (B, Hkv, G, T, S)
    att = _causal_softmax(scores, scale)
    y = _merge_heads((att @ v[:, :, None]).reshape(B, n_head, T, hs))  # (B, Hkv, G, T, hs) -> (B, T, H hs)
    return y, (q, k, v, att, scale)


def grouped_attention_backward(dy, cache):
    """forward was: pre = q k^T * scale (masked), att = softmax(pre), y = att v, so per query head

        datt = dy v^T,   dpre = att * (datt - sum_j datt_j att_j),   dq = dpre k * scale,

    as in :func:`attention_backward`, and a key/value head, read by G query heads, gets the sum of their
    gradients:

        dv = sum over the group of att^T dy,    dk = sum over the group of dpre^T q * scale.

    Returns dq (B, T, n_head hs), dk and dv (B, T, n_kv_head hs). Only for a full sequence (no ``past``).
    The group's sum is derived in notebook 05, "Grouped-query attention backward".
    """
    q, k, v, att, scale = cache
    B, Hkv, G, T, hs = q.shape
    dyg = _split_heads(dy, Hkv * G).reshape(q.shape)  # (B, T, H hs) -> (B, Hkv, G, T, hs)
    dv = _sum_over_group(att.swapaxes(-1, -2) @ dyg)  # (B, Hkv, T, hs)
    datt = dyg @ v[:, :, None].swapaxes(-1, -2)  # (B, Hkv, G, T, T)
    dpre = _causal_softmax_backward(datt, att)
    dscores = array_module(dy).multiply(dpre, scale, out=dpre)  # forward was: pre = scores * scale
    dq = (dscores @ k[:, :, None]).reshape(B, Hkv * G, T, hs)
    dk = _sum_over_group(dscores.swapaxes(-1, -2) @ q)
    return _merge_heads(dq), _merge_heads(dk), _merge_heads(dv)


def _sum_over_group(x):
    """(B, Hkv, G, T, hs) -> (B, Hkv, T, hs): the sum over a key/value head's G query heads.

    With G = 1 (as many key/value heads as query heads) there is nothing to add: a view, no summing pass.
    """
    if x.shape[2] == 1:
        return x[:, :, 0]
    return x.sum(axis=2)
