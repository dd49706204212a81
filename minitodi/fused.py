r"""Fused CuPy kernels for FKL, RKL and ToDi: value and gradient in five passes over the logits.

The array path of :mod:`minitodi.core.losses` builds log p, log q, p, q, the terms and g as arrays, block by
block; on a GPU each of those is a round trip through memory. Here, for logits flattened to (M, V):

1. per row, max and log-sum-exp of s / temperature and of t / temperature   (2 reads of each)
2. per row, D = sum_v term_v and G = sum_v g_v                     (2 reads; nothing is stored)
3. per entry, dloss/ds = (g_v - q_v G) * w_row                      (1 read, the one full-size write)

with w_row = 1 / (N temperature) on counted rows and 0 elsewhere. Every per-entry quantity (log q,
log p, q, p, ToDi's weight a, the term, g) is recomputed in registers from s and t where it is needed.
The formulas, and D clamped at 0, are those of :mod:`minitodi.core.losses`;
:func:`minitodi.parallel.loss_and_grad` comes here for CuPy arrays where :func:`applies`.
"""

import functools
import math
from string import Template

from .core.losses import check_option, check_values

# One entry's quantities from its two logits and its row's log-sum-exps (all of type T).
_PREAMBLE = r"""
template <typename T> struct Entry {
    T lq, lp, q, p, a;
    __device__ Entry(T s, T t, T lse_s, T lse_t, T inv_t, T beta) {
        lq = s * inv_t - lse_s;
        lp = t * inv_t - lse_t;
        q = exp(lq);
        p = exp(lp);
        a = T(1) / (T(1) + exp(-beta * (lp - lq)));  // ToDi's weight, sigmoid(beta log(p / q))
    }
};
"""

# name: (per-token divergence, g_v = dD / d log q_v), written with an Entry<T> e
TERMS = {
    "fkl": ("e.p * (e.lp - e.lq)", "-e.p"),
    "rkl": ("e.q * (e.lq - e.lp)", "e.q * (e.lq - e.lp + T(1))"),
    "todi": ("(e.a * e.p - (T(1) - e.a) * e.q) * (e.lp - e.lq)",
             "(T(1) - e.a) * e.q * (e.lq - e.lp + T(1)) - e.a * e.p"),
}

_ARGS = "T s, T t, T lse_s, T lse_t, T inv_t, T beta"  # an entry's inputs, as every kernel declares them

# A device function for one part of a divergence (its per-token term, or g), summed by a row reduction.
_PART_FUNCTION = Template("""\
template <typename T> __device__ T ${function}(${args}) {
    Entry<T> e(s, t, lse_s, lse_t, inv_t, beta);
    return ${expr};
}
""")

# The gradient kernel's body, per entry: dloss/ds = (g_v - q_v G) * w_row.
_GRAD_OPERATION = Template("""\
Entry<T> e(s, t, lse_s, lse_t, inv_t, beta);
dz = (${g} - e.q * G) * w;""")


def _sources(name):
    """The CUDA sources of ``name``'s kernels: ``(preamble, {part: row-sum map expression}, grad operation)``.

    Pure strings, built without CuPy; ``part`` is "term" or "g".
    """
    term, g = TERMS[name]
    preamble = _PREAMBLE
    map_exprs = {}
    for part, expr in (("term", term), ("g", g)):
        function = f"{name}_{part}"
        preamble += _PART_FUNCTION.substitute(function=function, args=_ARGS, expr=expr)
        map_exprs[part] = f"{function}(s, t, lse_s, lse_t, inv_t, beta)"
    grad_operation = _GRAD_OPERATION.substitute(g=g)
    return preamble, map_exprs, grad_operation


@functools.cache
def _kernels(name):
    """``(row sum of the terms, row sum of g, gradient)`` kernels of ``name``, compiled once."""
    import cupy

    preamble, map_exprs, grad_operation = _sources(name)
    row_sum = {}
    for part in ("term", "g"):
        row_sum[part] = cupy.ReductionKernel(_ARGS, "T y", map_exprs[part], "a + b", "y = a", "0",
                                             f"minitodi_{name}_{part}_sum", preamble=preamble)
    grad = cupy.ElementwiseKernel(_ARGS + ", T G, T w", "T dz", grad_operation, f"minitodi_{name}_grad",
                                  preamble=_PREAMBLE)
    return row_sum["term"], row_sum["g"], grad


@functools.cache
def _sumexp():
    import cupy

    return cupy.ReductionKernel("T x, T m, T inv_t", "T y", "exp((x - m) * inv_t)", "a + b", "y = a", "0",
                                "minitodi_sumexp")


def _log_sum_exp(x, inv_t):
    """(M, 1) log-sum-exp of x * inv_t over each row."""
    import cupy

    m = x.max(axis=1, keepdims=True)
    return m * inv_t + cupy.log(_sumexp()(x, m, inv_t, axis=1, keepdims=True))


def applies(name, options, s, t):
    """Whether ``LOSSES[name](s, t, **options)`` can run in these kernels.

    FKL and RKL without options, ToDi with its weight detached at the student's own logits (any beta);
    no -inf logits (0 log 0 stays with the array path).
    """
    allowed = set()
    if name == "todi":
        allowed = {"beta", "detach"}
    if name not in TERMS or not set(options) <= allowed:
        return False
    if options.get("detach", True) is not True:
        return False
    return float(s.min()) > -math.inf and float(t.min()) > -math.inf


def mean_loss(name, s, t, mask, temperature, beta=1.0, detach=True):
    """The loss and gradient of ``LOSSES[name]`` (where :func:`applies`), CuPy logits (..., V) checked.

    The checks :func:`minitodi.core.losses.check_inputs` makes have been made; beta and the values are
    checked here.
    """
    beta = check_option("beta", beta, lambda x: x >= 0, "a finite number >= 0")
    check_values({"student_logits": s, "teacher_logits": t})
    V = s.shape[-1]
    rows = None  # every row counts
    if mask is not None and not bool(mask.all()):
        rows = mask.reshape(-1).nonzero()[0]
    loss, grad = loss_and_grad(name, s.reshape(-1, V), t.reshape(-1, V), rows, temperature, beta)
    return loss, grad.reshape(s.shape)


def loss_and_grad(name, s2, t2, rows, temperature, beta=1.0):
    """Mean divergence over counted rows and its gradient, for CuPy logits (M, V) with no -inf.

    ``rows``: indices of the counted rows, or None when all count.
    """
    import cupy

    term_sum, g_sum, grad_kernel = _kernels(name)
    dtype = s2.dtype
    inv_t = cupy.asarray(1.0 / temperature, dtype=dtype)
    b = cupy.asarray(min(beta, float(cupy.finfo(dtype).max)), dtype=dtype)  # inf * 0 would be NaN
    lse_s = _log_sum_exp(s2, inv_t)  # (M, 1)
    lse_t = _log_sum_exp(t2, inv_t)
    values = cupy.maximum(term_sum(s2, t2, lse_s, lse_t, inv_t, b, axis=1), 0)  # (M,)
    G = g_sum(s2, t2, lse_s, lse_t, inv_t, b, axis=1, keepdims=True)  # (M, 1)
    if rows is None:
        counted = cupy.ones(s2.shape[0], dtype=dtype)
        n = s2.shape[0]
    else:
        counted = cupy.zeros(s2.shape[0], dtype=dtype)
        counted[rows] = 1
        n = int(rows.size)
    w = (counted * (1.0 / (n * temperature)))[:, None]
    grad = grad_kernel(s2, t2, lse_s, lse_t, inv_t, b, G, w)
    return float((values * counted).sum()) / n, grad
