"""Worked solutions to notebook 06's exercises, each with its derivation in the comments.

Open this file when you are stuck on one exercise, read that one solution, and go back to the notebook.
Run it to grade every solution:

    python notebooks/solutions/06_exercises_solutions.py      # prints the reports; exit status 1 if any fails

The last part puts the layer solutions into minitodi's GPT-2 (``assemble``), where each is checked
against minitodi's own backward at every layer, and trains a small ToDi student with them.

Conventions, as in the notebook: NumPy, float64, one position per row, temperature 1. Shape names: n rows
of V logits for the divergences, N rows of C (or Cin / Cout) channels for the layers, T positions of hs
channels for attention. A ``d`` prefix marks a gradient of the final scalar loss: dy = dL/dy.
"""

import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # checkout

from minitodi.exercises import EXERCISES, assemble, check  # noqa: E402


def log_softmax(x):
    """log softmax over the last axis (the vocabulary).

    log softmax(x)_v = x_v - log sum_w exp(x_w). Subtracting the row maximum m first changes nothing
    (it cancels between the two terms) and keeps every exp(x_w - m) <= 1, so nothing overflows.
    """
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# ---- the one step every divergence shares ---------------------------------------------------------
# Write a divergence D as a function of log q and let g_v = dD/d(log q_v). The logits enter through
#     log q_v = s_v - log sum_w exp(s_w),   so   d(log q_v)/d s_j = delta_vj - q_j,
# and the chain rule gives
#     dD/ds_j = sum_v g_v (delta_vj - q_j) = g_j - q_j sum_v g_v.
# Each row of the result sums to 0 (sum_j q_j = 1): adding a constant to every logit of a row changes
# nothing, as it should.
def through_softmax(g, q):
    """dD/ds from g = dD/d(log q), row by row."""
    return g - q * g.sum(axis=-1, keepdims=True)


# ---- exercise 1: forward KL -----------------------------------------------------------------------
def fkl(s, t):
    """D = KL(p || q) = sum_v p_v (log p_v - log q_v) per row, and dD/ds = q - p."""
    log_p = log_softmax(t)
    log_q = log_softmax(s)
    p = np.exp(log_p)
    q = np.exp(log_q)
    D = (p * (log_p - log_q)).sum(axis=-1)  # (n,)
    # Only log q depends on s, with coefficient -p: g = dD/d(log q) = -p.
    # Through the softmax step: dD/ds = -p - q sum_v(-p_v) = -p + q (the p_v sum to 1).
    dD_ds = q - p
    return D, dD_ds


# ---- exercise 2: reverse KL -----------------------------------------------------------------------
def rkl(s, t):
    """D = KL(q || p) = sum_v q_v r_v with r = log q - log p, and dD/ds = q (r - D)."""
    log_p = log_softmax(t)
    log_q = log_softmax(s)
    q = np.exp(log_q)
    r = log_q - log_p
    D = (q * r).sum(axis=-1)  # (n,)
    # q appears twice, as the weight and inside r. With q_v = exp(log q_v), dq_v/d(log q_v) = q_v, so
    #     g_v = d(q_v r_v)/d(log q_v) = q_v r_v + q_v = q_v (r_v + 1).
    # sum_v g_v = D + 1, and the softmax step gives dD/ds = q (r + 1) - q (D + 1) = q (r - D).
    dD_ds = q * (r - D[:, None])
    return D, dD_ds


# ---- exercise 3: ToDi -----------------------------------------------------------------------------
def todi(s, t, beta):
    """D = sum_v [a_v p_v d_v - (1 - a_v) q_v d_v], d = log p - log q, a = sigmoid(beta d) held constant."""
    log_p = log_softmax(t)
    log_q = log_softmax(s)
    p = np.exp(log_p)
    q = np.exp(log_q)
    d = log_p - log_q
    # sigmoid(z) = 1/2 + 1/2 tanh(z/2): the same function, and tanh never overflows for large |z|.
    a = 0.5 + 0.5 * np.tanh(0.5 * beta * d)
    # FKL's term a p log(p/q) = a p d; RKL's term (1 - a) q log(q/p) = -(1 - a) q d.
    D = (a * p * d - (1 - a) * q * d).sum(axis=-1)
    # a is a constant here (a stop-gradient, as in the paper). With dd_v/d(log q_v) = -1:
    #     FKL's term:  d(a p d)/d(log q) = -a p
    #     RKL's term:  d(-(1 - a) q d)/d(log q) = -(1 - a) (q d - q) = (1 - a) q (1 - d)
    # (the second, like RKL's, has q twice: q's own derivative gives the "+ q").
    g = -a * p + (1 - a) * q * (1 - d)
    return D, through_softmax(g, q)


# ---- exercise 4: linear ---------------------------------------------------------------------------
def linear_backward(dy, x, w, b):
    """y = x @ w + b, x (N, Cin), w (Cin, Cout), b (Cout,)."""
    # y[n, j] = sum_i x[n, i] w[i, j] + b[j].
    # dx[n, i] = sum_j dy[n, j] w[i, j]         -> dx = dy @ w.T        (N, Cout) @ (Cout, Cin)
    # dw[i, j] = sum_n x[n, i] dy[n, j]         -> dw = x.T @ dy        (Cin, N) @ (N, Cout)
    # db[j]    = sum_n dy[n, j]                 -> b reaches every row, so its gradient sums over rows
    dx = dy @ w.T
    dw = x.T @ dy
    db = dy.sum(axis=0)
    return dx, dw, db


# ---- exercise 5: layer norm -----------------------------------------------------------------------
def layernorm_backward(dy, x, w, b, eps):
    """y = xhat * w + b, xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps), var over C (biased)."""
    C = x.shape[-1]
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)  # divided by C, as PyTorch's LayerNorm
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = centred * rstd
    # The parameters first: w and b act elementwise on every row, so their gradients sum over rows.
    dw = (dy * xhat).sum(axis=0)
    db = dy.sum(axis=0)
    dxhat = dy * w
    # xhat_i = (x_i - mean) rstd, and mean and rstd depend on every x_j of the row:
    #     d mean / d x_j = 1/C,   d rstd / d x_j = -1/2 rstd^3 d var / d x_j = -rstd^3 (x_j - mean) / C
    # (in d var / d x_j = 2/C sum_i (x_i - mean)(delta_ij - 1/C) the 1/C part vanishes, as sum_i (x_i - mean)
    # = 0).
    # So d xhat_i / d x_j = rstd (delta_ij - 1/C) - (x_i - mean) rstd^3 (x_j - mean) / C
    #                     = rstd (delta_ij - 1/C - xhat_i xhat_j / C), and summing dxhat_i times this over i:
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).sum(axis=-1, keepdims=True) / C)
    return dx, dw, db


# ---- exercise 6: GELU -----------------------------------------------------------------------------
def gelu_backward(dy, x):
    """y = 0.5 x (1 + tanh(u)), u = k (x + a x^3), k = sqrt(2 / pi), a = 0.044715 (GPT-2's form)."""
    k = math.sqrt(2.0 / math.pi)
    a = 0.044715
    tanh_u = np.tanh(k * (x + a * x**3))
    # The product rule on 0.5 x (1 + tanh u):
    #     dy/dx = 0.5 (1 + tanh u) + 0.5 x d(tanh u)/dx,
    # with d tanh(u)/du = 1 - tanh(u)^2 and du/dx = k (1 + 3 a x^2).
    local = 0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u**2) * k * (1.0 + 3.0 * a * x**2)
    return dy * local  # the chain rule: dL/dx = dL/dy * dy/dx, entry by entry


# ---- exercise 7: cross-entropy --------------------------------------------------------------------
def cross_entropy_backward(logits, targets):
    """L = -(1/N) sum_n log softmax(logits[n])[targets[n]]."""
    N = logits.shape[0]
    q = np.exp(log_softmax(logits))
    # -log q[n, t] = -logits[n, t] + log sum_v exp(logits[n, v]). The first term gives -1 at the target;
    # the log-sum-exp gives softmax = q on every entry. Then the mean's 1/N: dlogits = (q - onehot) / N.
    dlogits = q.copy()
    dlogits[np.arange(N), targets] -= 1.0
    return dlogits / N


# ---- exercise 8: attention ------------------------------------------------------------------------
def attention_backward(dy, q, k, v):
    """att = softmax(q k^T / sqrt(hs) + causal mask), y = att v; q, k, v, dy (T, hs)."""
    T, hs = q.shape
    scale = 1.0 / math.sqrt(hs)
    # Recompute the forward's attention, mask included: query i sees keys j <= i only.
    pre = q @ k.T * scale  # (T, T)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # j > i
    pre[future] = -np.inf
    att = np.exp(log_softmax(pre))  # exp(-inf) = 0: masked entries get no weight, and no gradient below
    # y[i] = sum_j att[i, j] v[j]:
    #     dv[j] = sum_i att[i, j] dy[i]        -> dv = att^T dy
    #     datt[i, j] = dy[i] . v[j]            -> datt = dy v^T
    dv = att.T @ dy
    datt = dy @ v.T
    # The softmax of each row: d att_j / d pre_i = att_j (delta_ij - att_i), so
    #     dpre_i = att_i (datt_i - sum_j att_j datt_j).
    dpre = att * (datt - (att * datt).sum(axis=-1, keepdims=True))
    # pre[i, j] = q[i] . k[j] * scale:
    #     dq[i] = sum_j dpre[i, j] k[j] scale  -> dq = dpre k * scale
    #     dk[j] = sum_i dpre[i, j] q[i] scale  -> dk = dpre^T q * scale
    dq = dpre @ k * scale
    dk = dpre.T @ q * scale
    return dq, dk, dv


# ---- exercise 9: RMSNorm --------------------------------------------------------------------------
def rmsnorm_backward(dy, x, w, eps):
    """y = xhat * w, xhat = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps) (no mean subtracted, no bias)."""
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    dw = (dy * xhat).sum(axis=0)
    dxhat = dy * w
    # d rstd / d x_j = -1/2 rstd^3 (2 x_j / C) = -rstd^3 x_j / C, so
    #     d xhat_i / d x_j = rstd delta_ij - x_i rstd^3 x_j / C = rstd (delta_ij - xhat_i xhat_j / C),
    # and summing dxhat_i times this over i (layer norm's formula without its mean term):
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dw


# ---- exercise 10: the distillation loss as training computes it -----------------------------------
def kd_loss(s, t, labels, temperature):
    """L = (1/N) sum over counted positions of KL(softmax(t/tau) || softmax(s/tau)), and dL/ds (B, T, V)."""
    tau = temperature
    counted = labels != -100  # (B, T): the prompt and the padding do not count
    N = counted.sum()
    # Exercise 1 at every position, on the logits divided by tau (both sides: the teacher is softened too)
    D, dD = fkl(s.reshape(-1, s.shape[-1]) / tau, t.reshape(-1, t.shape[-1]) / tau)
    D = D.reshape(counted.shape)
    dD = dD.reshape(s.shape)  # dD/d(s/tau) at each position
    L = D[counted].sum() / N  # the mean over counted positions only: N, not B T
    # The chain rule through s / tau adds 1/tau; the mean adds 1/N; a position that does not count gets 0.
    # (No tau^2 factor: the paper's code and minitodi leave it out.)
    dL_ds = dD * counted[..., None] / (N * tau)
    return L, dL_ds


SOLUTIONS = {
    "fkl": fkl,
    "rkl": rkl,
    "todi": todi,
    "linear_backward": linear_backward,
    "layernorm_backward": layernorm_backward,
    "gelu_backward": gelu_backward,
    "cross_entropy_backward": cross_entropy_backward,
    "attention_backward": attention_backward,
    "rmsnorm_backward": rmsnorm_backward,
    "kd_loss": kd_loss,
}
LAYERS = ("linear_backward", "layernorm_backward", "gelu_backward", "attention_backward",
          "cross_entropy_backward")  # the GPT-2 block's layers and the loss's: what assemble() plugs in


def main():
    reports = [check(name, SOLUTIONS[name]) for name in EXERCISES]
    for report in reports:
        print(report)
    assembly = assemble(**{name: SOLUTIONS[name] for name in LAYERS})
    print(assembly)
    return 0 if all(report.passed for report in reports) and assembly.passed else 1


if __name__ == "__main__":
    sys.exit(main())
