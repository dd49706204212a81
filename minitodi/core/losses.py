r"""The divergences of token-wise distillation: value and gradient w.r.t. the student's logits.

Every function in :data:`LOSSES` has the signature

    loss, grad = LOSSES[name](student_logits, teacher_logits, mask=None, *, temperature=1.0, **options)

- ``student_logits``, ``teacher_logits``: float arrays shaped (..., V), NumPy or CuPy;
- ``mask``: bool array shaped (...), True where a position counts (None: every position counts);
- ``loss``: a Python float, the mean over counted positions of the divergence summed over the vocabulary;
- ``grad``: d loss / d student_logits, same shape and dtype as ``student_logits``, zero where the mask is off.

Notation (one position; every sum runs over the vocabulary v):

    z = s / temperature,  log q = log_softmax(z)       the student
    log p = log_softmax(t / temperature)                the teacher (a constant: no gradient flows into it)
    N = number of counted positions,  loss = (1/N) sum_counted D(p, q)

No temperature^2 factor is applied (the official ToDi code applies none).

**The one step every gradient shares.** Each divergence below is written as a function of log q and
returns g_v = dD/d(log q_v). Since log q_v = z_v - logsumexp(z), d(log q_v)/dz_j = delta_vj - q_j, so

    dD/dz_j = sum_v g_v (delta_vj - q_j) = g_j - q_j * sum_v g_v
    dloss/ds = (1 / (N temperature)) * (g - q * sum_v g_v)       at counted positions, 0 elsewhere.

The gradient rows therefore sum to zero (sum_j q_j = 1) and a constant added to a row of logits changes
nothing. This step, the mask and the mean are applied once, in :func:`_mean_over_positions`. Notebook
02 derives it, typeset ("The shared softmax step"), and the temperature's 1/T with it ("Temperature and
the τ² question"); each divergence's g below is derived there too ("Each loss: its g, the gradient, the
check").

**Rounding.** Every divergence is >= 0 (JSD <= log 2 and TVD <= 1 as well). Where distributions are
equal to within rounding, the computed D of a position can come out a few ulps below 0 (RKL at
temperature 1e6 in float32 gave -3.1e-08): D is clamped at 0 per position. The gradient is left as
computed (it is itself of the size of the rounding there).

**Stop-gradient weights.** ToDi's weight a_v and AKL's head/tail weights are constants in the gradient
(the paper says so; the official code detaches them). They are computed by their own functions and
handed to the divergence. ``stopgrad_at=`` (logits; default: the student's own) is where they are
evaluated: holding it at a base point s0 makes the loss a function whose true gradient at s0 is the
stop-gradient gradient, which is what :func:`minitodi.core.gradcheck.check_loss` checks.

Reading order: the divergences (pure functions of one block of rows, arrays (n, V) -> D (n,) and
g (n, V)), their weights, the public functions, then what runs around them: the mean over positions in
blocks of rows, input checks, -inf logits. The threads and the fused GPU kernels that run these functions
faster are outside core (:mod:`minitodi.parallel`, :mod:`minitodi.fused`): a reader of the math never meets
the machinery.
"""

import math
import numbers
from functools import partial

import numpy as np

from .device import array_module, to_numpy

# Entries per block of rows (256 KiB in float32): a block's temporaries stay in cache and below malloc's
# mmap threshold. With 2^20, every temporary was fresh pages from the system: ToDi at 512 x 32000 took
# 1.06 s of CPU, against 0.32-0.37 s at 2^16-2^17, float32 and float64 alike (2.5x and more).
BLOCK_ELEMENTS = 1 << 16
LOG_ZERO = -1e4  # stands for log 0 inside the math: exp(LOG_ZERO) == 0 in float32 and float64


class InfiniteDivergenceError(ValueError):
    """The divergence is +inf: one distribution has mass where the other has none (-inf logits)."""


def log_softmax(x, axis=-1):
    """log softmax(x) along ``axis``, shifted by the row maximum so that exp never overflows.

    log softmax(x)_v = x_v - log sum_w exp(x_w) = (x_v - m) - log sum_w exp(x_w - m) for any m; with m the
    maximum every exp is <= 1. Entries at -inf give -inf (probability 0); a row with no finite entry gives
    NaN: callers that accept -inf check for such rows themselves. The one log-softmax of the package.
    """
    xp = array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


# ---- the divergences: (log p, log q, p, q[, weights]) of a block of rows -> (D per row, g = dD/d log q)


def fkl_rows(lp, lq, p, q):
    """Forward KL, KL(p || q): mode covering, lifts tokens the student underestimates.

    D = sum_v p_v (log p_v - log q_v)
    g_v = -p_v;  through the shared step dD/dz = -p + q sum_v p_v = q - p.
    (Notebook 02, "Each loss: its g, the gradient, the check", FKL.)
    """
    return (p * (lp - lq)).sum(axis=-1), -p


def rkl_rows(lp, lq, p, q):
    """Reverse KL, KL(q || p): mode seeking, pushes down tokens the student overestimates.

    D = sum_v q_v r_v  with r_v = log q_v - log p_v
    g_v = d(q_v r_v)/d(log q_v) = q_v r_v + q_v = q_v (r_v + 1);  dD/dz = q (r + 1) - q (D + 1) = q (r - D).
    (Notebook 02, "Each loss: its g, the gradient, the check", RKL.)
    """
    r = lq - lp
    return (q * r).sum(axis=-1), q * (r + 1)


def todi_rows(lp, lq, p, q, a, one_minus_a):
    """ToDi: FKL and RKL mixed per vocabulary entry by the stop-gradient weight a (:func:`todi_weights`).

    With d_v = log p_v - log q_v:
    D = sum_v [a_v p_v d_v + (1 - a_v) q_v (-d_v)] = sum_v (a_v p_v - (1 - a_v) q_v) d_v
    g_v = -a_v p_v + (1 - a_v) q_v (1 - d_v)      (FKL's -p and RKL's q (r + 1), weighted; a constant)
    Where the student underestimates (p > q) a -> 1 and the term is FKL's; where it overestimates,
    a -> 0 and it is RKL's. (At beta = 1, a = p / (p + q) and the value equals FKL + RKL; its gradient
    does not, because a is held constant: notebook 01, "ToDi at β = 1: the value is FKL + RKL", and
    notebook 02, "ToDi (weight detached)".)
    """
    d = lp - lq
    return ((a * p - one_minus_a * q) * d).sum(axis=-1), one_minus_a * q * (1 - d) - a * p


def todi_attached_rows(lp, lq, p, q, a, one_minus_a, beta):
    """ToDi with its weight differentiated (``detach=False``): the ablation of the paper's stop-gradient.

    D is :func:`todi_rows`' D. The weight a_v = sigmoid(beta d_v), d_v = log p_v - log q_v, now moves
    with log q_v too: d a_v / d(log q_v) = -beta a_v (1 - a_v), and dD/da_v = (p_v + q_v) d_v, so

    g_v = todi_rows' g_v - beta a_v (1 - a_v) (p_v + q_v) d_v.

    The extra term is largest where a is near 1/2 (p and q close) and vanishes where either side
    dominates; notebook 01 ("Why the weight is detached") derives it and trains both ways.
    """
    values, g = todi_rows(lp, lq, p, q, a, one_minus_a)
    d = lp - lq
    through_the_weight = _finite_in(d.dtype, beta) * a * one_minus_a * (p + q) * d
    return values, g - through_the_weight


def jsd_rows(lp, lq, p, q):
    """Jensen-Shannon divergence, 1/2 KL(p || m) + 1/2 KL(q || m) with m = (p + q) / 2.

    log m = logaddexp(log p, log q) - log 2 is formed in log space, never the log of an underflowed 0.
    D = sum_v 1/2 p_v (log p_v - log m_v) + 1/2 q_v (log q_v - log m_v);  with (p_v + q_v) / (2 m_v) = 1,
    dD/dq_v = 1/2 [-p_v / (2 m_v) + log q_v - log m_v + 1 - q_v / (2 m_v)] = 1/2 (log q_v - log m_v)
    g_v = 1/2 q_v (log q_v - log m_v).  Bounded: 0 <= D <= log 2.
    """
    lm = array_module(p).logaddexp(lp, lq) - math.log(2.0)
    g = 0.5 * q * (lq - lm)
    return (0.5 * p * (lp - lm)).sum(axis=-1) + g.sum(axis=-1), g


def gjsd_rows(lp, lq, p, q, beta):
    """Generalized JSD of GKD (Agarwal et al., 2024), as TRL and Liger-Kernel define it, for 0 < beta < 1.

    m = beta p + (1 - beta) q, log m = logaddexp(log beta + log p, log(1 - beta) + log q), and
    D = beta KL(p || m) + (1 - beta) KL(q || m)
      = sum_v beta p_v (log p_v - log m_v) + (1 - beta) q_v (log q_v - log m_v).
    With d log m_v / d q_v = (1 - beta) / m_v and beta p_v + (1 - beta) q_v = m_v,
    dD/dq_v = (1 - beta) [-beta p_v / m_v + log q_v - log m_v + 1 - (1 - beta) q_v / m_v]
            = (1 - beta) (log q_v - log m_v),
    so g_v = (1 - beta) q_v (log q_v - log m_v). beta = 1/2 is :func:`jsd_rows`. Bounded:
    0 <= D <= -beta log beta - (1 - beta) log(1 - beta).
    """
    lm = array_module(p).logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
    student_terms = (1 - beta) * q * (lq - lm)
    teacher_terms = beta * p * (lp - lm)
    return teacher_terms.sum(axis=-1) + student_terms.sum(axis=-1), student_terms


def tvd_rows(lp, lq, p, q):
    """Total variation distance, 1/2 sum_v |p_v - q_v|.  Bounded: 0 <= D <= 1.

    dD/dq_v = 1/2 sign(q_v - p_v)  (0 at a tie: a subgradient);  g_v = 1/2 sign(q_v - p_v) q_v.
    """
    xp = array_module(p)
    diff = q - p
    return 0.5 * xp.abs(diff).sum(axis=-1), 0.5 * xp.sign(diff) * q


def _ratio(x, m):
    """x / m where m > 0, and 0 where m == 0 (both probabilities are 0 there, so x is too)."""
    return x / array_module(m).where(m > 0, m, 1)


def sfkl_rows(lp, lq, p, q, lam):
    """Skew forward KL, KL(p || m) with m = lam p + (1 - lam) q.

    D = sum_v p_v (log p_v - log m_v),  log m_v = logaddexp(log lam + log p_v, log(1 - lam) + log q_v)
    dD/dq_v = -p_v (1 - lam) / m_v,  so  g_v = -(1 - lam) p_v q_v / m_v.  m >= lam p keeps it finite.
    """
    lm = array_module(p).logaddexp(math.log(lam) + lp, math.log1p(-lam) + lq)
    g = -(1 - lam) * p * _ratio(q, lam * p + (1 - lam) * q)
    return (p * (lp - lm)).sum(axis=-1), g


def srkl_rows(lp, lq, p, q, lam):
    """Skew reverse KL, KL(q || m) with m = (1 - lam) p + lam q.

    D = sum_v q_v (log q_v - log m_v),  log m_v = logaddexp(log(1 - lam) + log p_v, log lam + log q_v)
    dD/dq_v = log q_v + 1 - log m_v - lam q_v / m_v,
    so  g_v = q_v (log q_v - log m_v + 1) - lam q_v^2 / m_v.  m >= lam q keeps it finite.
    """
    lm = array_module(p).logaddexp(math.log1p(-lam) + lp, math.log(lam) + lq)
    kl_terms = q * (lq - lm)
    g = kl_terms + q - lam * q * _ratio(q, (1 - lam) * p + lam * q)
    return kl_terms.sum(axis=-1), g


def akl_rows(lp, lq, p, q, head, tail):
    """Adaptive KL (Wu et al., 2024): D = head FKL + tail RKL with per-row weights (:func:`akl_weights`).

    The weights are constants, so g is FKL's and RKL's g weighted: g_v = -head p_v + tail q_v (r_v + 1),
    r_v = log q_v - log p_v.
    """
    fkl, g_fkl = fkl_rows(lp, lq, p, q)
    rkl, g_rkl = rkl_rows(lp, lq, p, q)
    return head * fkl + tail * rkl, head[:, None] * g_fkl + tail[:, None] * g_rkl


# ---- stop-gradient weights: (log p, log q, p, q) at the weights' logits -> weights


def todi_weights(lp, lq, p, q, beta):
    """(a, 1 - a) with a_v = sigmoid(beta (log p_v - log q_v)), each (n, V).

    Near 1 where the student underestimates the teacher (FKL dominates), near 0 where it overestimates
    (RKL dominates); 1/2 where both probabilities are 0. Computed as 1/2 +- 1/2 tanh(beta d / 2):
    no overflow, and 1 - a keeps its precision where a is near 1.
    """
    xp = array_module(p)
    d = lp - lq
    with np.errstate(over="ignore"):  # beta d beyond the dtype's range is +-inf, and tanh(+-inf) = +-1
        h = 0.5 * xp.tanh(_finite_in(d.dtype, 0.5 * beta) * d)
    return 0.5 + h, 0.5 - h


def _finite_in(dtype, factor):
    """``factor``, or the largest number of ``dtype`` where it is larger.

    A factor beyond float32's range (beta = 1e300) would become inf in float32 arithmetic, and inf * 0
    is NaN where d = 0; the largest float32 turns every d != 0 into the same saturated weight.
    """
    return min(factor, float(np.finfo(dtype).max))


def akl_weights(lp, lq, p, q, mu):
    """AKL's head and tail weights (n,), from probabilities (n, V).

    Sort the teacher's probabilities in ascending order; the tail is the entries whose cumulative mass (from
    the smallest) is <= mu, the head the rest. With gap_v = |p_v - q_v|, g_head = sum over head of gap,
    g_tail = sum over tail, the weights are g_head / (g_head + g_tail) on FKL and g_tail / (g_head + g_tail)
    on RKL. Where p == q exactly both gaps vanish (and so do both divergences): the weights are then 1/2 each.
    """
    xp = array_module(p)
    order = xp.argsort(p, axis=-1)
    p_sorted = xp.take_along_axis(p, order, axis=-1)
    gap = xp.abs(p_sorted - xp.take_along_axis(q, order, axis=-1))
    g_tail = (gap * (xp.cumsum(p_sorted, axis=-1) <= mu)).sum(axis=-1)
    g_all = gap.sum(axis=-1)
    both_zero = g_all == 0
    g_tail = xp.where(both_zero, 0.5, g_tail)  # no gap anywhere: half and half
    g_all = xp.where(both_zero, 1.0, g_all)
    return (g_all - g_tail) / g_all, g_tail / g_all


# ---- the public functions: options checked, then the mean over positions
#
# ``n_counted`` (every function): the N of the mean when these logits are one part of a larger batch (a
# shard, or one micro-batch of gradient accumulation): the loss is then this part's share, sum D / N, and
# the gradient is scaled by 1 / (N temperature), so that the parts' losses and gradients add up to the
# whole batch's. None: N is this call's own number of counted positions.


def fkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, n_counted=None):
    """Forward KL, :func:`fkl_rows`. Infinite where the teacher has mass on a student -inf logit."""
    return _mean_over_positions("fkl", fkl_rows, student_logits, teacher_logits, mask, temperature,
                                n_counted, infinite_where=("q=0<p",))


def rkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, n_counted=None):
    """Reverse KL, :func:`rkl_rows`. Infinite where the student has mass on a teacher -inf logit."""
    return _mean_over_positions("rkl", rkl_rows, student_logits, teacher_logits, mask, temperature,
                                n_counted, infinite_where=("p=0<q",))


def todi(student_logits, teacher_logits, mask=None, *, temperature=1.0, beta=1.0, detach=True,
         stopgrad_at=None, n_counted=None):
    """ToDi, :func:`todi_rows`, with a = sigmoid(beta log(p/q)) (beta >= 0).

    ``detach=True`` (the paper's ToDi and the official code's): a is held constant, at ``stopgrad_at``
    when given. ``detach=False`` differentiates through a (:func:`todi_attached_rows`), the ablation of
    that choice; ``stopgrad_at`` has no meaning then.
    """
    beta = check_option("beta", beta, lambda x: x >= 0, "a finite number >= 0")
    _check_flag("detach", detach)
    divergence = todi_rows
    if not detach:
        if stopgrad_at is not None:
            raise ValueError("stopgrad_at holds ToDi's weight fixed, detach=False differentiates it: "
                             "pass one or the other")
        divergence = partial(todi_attached_rows, beta=beta)
    return _mean_over_positions("todi", divergence, student_logits, teacher_logits, mask, temperature,
                                n_counted, weights=lambda *rows: todi_weights(*rows, beta),
                                stopgrad_at=stopgrad_at, infinite_where=("q=0<p", "p=0<q"))


def todi_weight(student_logits, teacher_logits, *, temperature=1.0, beta=1.0):
    """ToDi's weight a = sigmoid(beta * (log p - log q)) at every position and vocabulary entry, (..., V)."""
    beta = check_option("beta", beta, lambda x: x >= 0, "a finite number >= 0")
    xp, s, t, _, temperature, _ = check_inputs(student_logits, teacher_logits, None, temperature, None)
    check_values({"student_logits": s, "teacher_logits": t})
    _check_neginf("todi_weight", {"student_logits": s, "teacher_logits": t}, None, s.shape)
    lq, q = _log_probs(s, temperature, True)
    lp, p = _log_probs(t, temperature, True)
    return todi_weights(lp, lq, p, q, beta)[0]


def jsd(student_logits, teacher_logits, mask=None, *, temperature=1.0, n_counted=None):
    """Jensen-Shannon divergence, :func:`jsd_rows`. Always finite."""
    return _mean_over_positions("jsd", jsd_rows, student_logits, teacher_logits, mask, temperature,
                                n_counted)


def gjsd(student_logits, teacher_logits, mask=None, *, temperature=1.0, beta=0.5, n_counted=None):
    """Generalized JSD, :func:`gjsd_rows` (0 <= beta <= 1), as TRL's and Liger-Kernel's GKD losses.

    As their code does, beta = 0 is KL(p || q) (:func:`fkl`) and beta = 1 is KL(q || p) (:func:`rkl`),
    infinite where those are; in between it is always finite.
    """
    beta = check_option("beta", beta, lambda x: 0 <= x <= 1, "0 <= beta <= 1")
    if beta == 0:
        return _mean_over_positions("gjsd", fkl_rows, student_logits, teacher_logits, mask, temperature,
                                    n_counted, infinite_where=("q=0<p",))
    if beta == 1:
        return _mean_over_positions("gjsd", rkl_rows, student_logits, teacher_logits, mask, temperature,
                                    n_counted, infinite_where=("p=0<q",))
    divergence = partial(gjsd_rows, beta=beta)
    return _mean_over_positions("gjsd", divergence, student_logits, teacher_logits, mask, temperature,
                                n_counted)


def tvd(student_logits, teacher_logits, mask=None, *, temperature=1.0, n_counted=None):
    """Total variation distance, :func:`tvd_rows`. Always finite."""
    return _mean_over_positions("tvd", tvd_rows, student_logits, teacher_logits, mask, temperature,
                                n_counted)


def sfkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, lam=0.1, n_counted=None):
    """Skew forward KL, :func:`sfkl_rows` (0 < lam < 1). Always finite."""
    lam = check_option("lam", lam, lambda x: 0 < x < 1, "0 < lam < 1")
    divergence = partial(sfkl_rows, lam=lam)
    return _mean_over_positions("sfkl", divergence, student_logits, teacher_logits, mask, temperature,
                                n_counted)


def srkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, lam=0.1, n_counted=None):
    """Skew reverse KL, :func:`srkl_rows` (0 < lam < 1). Always finite."""
    lam = check_option("lam", lam, lambda x: 0 < x < 1, "0 < lam < 1")
    divergence = partial(srkl_rows, lam=lam)
    return _mean_over_positions("srkl", divergence, student_logits, teacher_logits, mask, temperature,
                                n_counted)


def akl(student_logits, teacher_logits, mask=None, *, temperature=1.0, mu=0.5, stopgrad_at=None,
        n_counted=None):
    """Adaptive KL, :func:`akl_rows`, split at teacher mass mu (0 <= mu <= 1), weights at ``stopgrad_at``."""
    mu = check_option("mu", mu, lambda x: 0 <= x <= 1, "0 <= mu <= 1")
    return _mean_over_positions("akl", akl_rows, student_logits, teacher_logits, mask, temperature,
                                n_counted, weights=lambda *rows: akl_weights(*rows, mu),
                                stopgrad_at=stopgrad_at, infinite_where=("q=0<p", "p=0<q"))


LOSSES = {f.__name__: f for f in (fkl, rkl, todi, jsd, gjsd, tvd, sfkl, srkl, akl)}
"""Every loss by name, with the signature of the module docstring."""

STOPGRAD_LOSSES = {"todi", "akl"}
"""Losses with stop-gradient weights (option ``stopgrad_at``): finite differences must hold them fixed."""


# ---- around the math: the mean over positions, in blocks of rows


def _mean_over_positions(name, divergence, student_logits, teacher_logits, mask, temperature, n_counted, *,
                         weights=None, stopgrad_at=None, infinite_where=()):
    """loss = (1/N) sum_counted max(D, 0) and its gradient (1/(N temperature)) (g - q sum_v g), blocked.

    ``divergence(lp, lq, p, q, *weights(lp, lq_w, p, q_w))`` -> (D (n,), g (n, V)) for a block of rows,
    the weights computed at ``stopgrad_at``'s rows (lq_w, q_w; default the student's). ``infinite_where``:
    "q=0<p" (the teacher has mass on a student -inf logit) and/or "p=0<q", where D is +inf, an error.
    N is ``n_counted``, by default the number of counted positions.

    Positions are processed in blocks of :func:`rows_per_block` rows, so temporaries are O(block x V) and
    only the output gradient is full size; only counted positions are computed. Each block adds its share
    of the mean, sum D / N, in block order. Every row's gradient is computed from that row alone, so a
    caller that hands out parts of the rows (:func:`minitodi.parallel.loss_and_grad`, with ``n_counted``)
    gets the same gradient bit for bit, and the loss to rounding.
    """
    xp, s, t, mask, temperature, w = check_inputs(student_logits, teacher_logits, mask, temperature,
                                                  stopgrad_at)
    check_values({"student_logits": s, "teacher_logits": t, "stopgrad_at": w})
    shape = s.shape
    V = shape[-1]
    s = s.reshape(-1, V)  # (..., V) -> (M, V)
    t = t.reshape(-1, V)
    if w is not None:
        w = w.reshape(-1, V)
    rows = None  # every row counts
    if mask is not None and not bool(mask.all()):
        rows = xp.flatnonzero(mask.reshape(-1))  # the counted rows' indices
    n = s.shape[0] if rows is None else int(rows.size)
    N = _check_n_counted(n_counted, n)
    named = {"student_logits": s, "teacher_logits": t, "stopgrad_at": w}
    has_neginf = any(float(x.min()) == -math.inf for x in named.values() if x is not None)
    if has_neginf:
        _check_neginf(name, named, rows, shape, infinite_where)
    grad = xp.zeros(s.shape, dtype=s.dtype)
    scale = 1.0 / (N * temperature)

    def block(sel):  # one block of rows: writes its rows of grad, returns its sum of D
        lq, q = _log_probs(s[sel], temperature, has_neginf)
        lp, p = _log_probs(t[sel], temperature, has_neginf)
        extra = ()
        if weights is not None:
            if w is None:  # the weights at the student's own logits
                lq_w, q_w = lq, q
            else:
                lq_w, q_w = _log_probs(w[sel], temperature, True)
            extra = weights(lp, lq_w, p, q_w)
        values, g = divergence(lp, lq, p, q, *extra)
        grad[sel] = (g - q * g.sum(axis=-1, keepdims=True)) * scale  # the shared step, over N temperature
        return float(xp.maximum(values, 0).sum())

    loss = 0.0
    for sel in row_blocks(rows, n, rows_per_block(V)):
        loss += block(sel) / N  # this block's share of the mean
    return loss, grad.reshape(shape)


def rows_per_block(V):
    """Rows per block of the mean over positions: about :data:`BLOCK_ELEMENTS` entries, at least one row."""
    return max(1, BLOCK_ELEMENTS // V)


def row_blocks(rows, n, step):
    """The blocks of ``step`` rows: slices of all rows, or pieces of the counted rows' indices ``rows``."""
    if rows is None:
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]
    return [rows[i:i + step] for i in range(0, n, step)]


def _check_n_counted(n_counted, n):
    """N of the mean: ``n_counted``, a whole number at least this call's ``n`` counted rows, or ``n``."""
    if n_counted is None:
        return n
    if isinstance(n_counted, bool) or not isinstance(n_counted, numbers.Integral) or n_counted < n:
        raise ValueError(f"n_counted must be a whole number >= the {n} positions counted here, "
                         f"got {n_counted!r}")
    return int(n_counted)


def _log_probs(logits, temperature, has_neginf):
    """(log softmax(logits / temperature), its exp) over the last axis.

    With ``has_neginf``, log 0 (a -inf logit) becomes :data:`LOG_ZERO`, whose exp is still exactly 0:
    every term reading it is then multiplied by a zero probability (0 log 0 = 0, never 0 * inf = NaN),
    and it sits below log q of any q > 0 (>= -746 in float64), so a log-space mixture such as
    logaddexp(log p, log q) is exactly the other side's. :func:`_check_support` has ruled out beforehand
    that a zero meets mass on the other side where that makes the divergence infinite.
    """
    lx = log_softmax(logits / temperature)
    if has_neginf:
        lx = array_module(lx).where(lx == -math.inf, LOG_ZERO, lx)
    return lx, array_module(lx).exp(lx)


# ---- input checks


def _as_logits(x, what, xp):
    x = xp.asarray(x)
    if x.dtype.kind != "f" or x.dtype.itemsize < 4:
        raise TypeError(f"{what} must be float32 or float64, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{what} must be shaped (..., V) with V >= 1, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{what} of shape {x.shape} hold no position: the mean over an empty batch is "
                         "undefined")
    return x


def check_values(named):
    """Raise at the first NaN or +inf of the arrays ``{name: logits or None}`` (-inf is a logit of p = 0).

    One pass over each array; a separate step from :func:`check_inputs`, which reads only shapes, so that
    :func:`minitodi.parallel.loss_and_grad` can leave the passes to the parts it hands out.
    """
    for what, x in named.items():
        if x is None:
            continue
        top = float(x.max())
        if math.isnan(top) or top == math.inf:
            xp = array_module(x)
            bad = to_numpy(xp.isnan(x) | (x == math.inf))
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            kind = "+inf"
            if math.isnan(float(x[where])):
                kind = "NaN"
            raise ValueError(f"{what} contains {kind} (first at index {where})")


def check_inputs(student_logits, teacher_logits, mask, temperature, stopgrad_at):
    """The checks of shapes, dtypes, the mask and the temperature (no pass over the logits' values).

    Returns ``(xp, student_logits, teacher_logits, mask, temperature, stopgrad_at)`` as arrays of one
    module and dtype, the temperature a Python float.
    """
    xp = array_module(student_logits, teacher_logits, mask, stopgrad_at)
    s = _as_logits(student_logits, "student_logits", xp)
    t = _as_logits(teacher_logits, "teacher_logits", xp)
    if s.shape != t.shape:
        raise ValueError(f"student_logits {s.shape} and teacher_logits {t.shape} differ in shape")
    t = t.astype(s.dtype, copy=False)
    if stopgrad_at is not None:
        stopgrad_at = _as_logits(stopgrad_at, "stopgrad_at", xp).astype(s.dtype, copy=False)
        if stopgrad_at.shape != s.shape:
            raise ValueError(f"stopgrad_at {stopgrad_at.shape} must have the student's shape {s.shape}")
    if mask is not None:
        mask = xp.asarray(mask)
        if mask.shape != s.shape[:-1]:
            raise ValueError(f"mask has shape {mask.shape}; expected the logits' shape without the "
                             f"vocabulary axis, {s.shape[:-1]}")
        if mask.dtype != bool:
            raise TypeError(f"mask must be boolean (e.g. labels != -100), got dtype {mask.dtype}")
        if not bool(mask.any()):
            raise ValueError("mask is False everywhere: no position counts, the mean is undefined")
    temperature = check_option("temperature", temperature, lambda x: x > 0, "a positive finite number")
    return xp, s, t, mask, temperature, stopgrad_at


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_option(name, value, ok, requirement):
    """``value`` as a Python float, once it is a real number (NumPy's too, never a bool) passing ``ok``."""
    is_bool = isinstance(value, (bool, np.bool_))  # True is an int to Python, never a number here
    if is_bool or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    return float(value)  # a NumPy float32 scalar would otherwise round the arithmetic it enters to float32


def _check_neginf(name, named, rows, shape, infinite_where=()):
    """Raise at the first counted position whose logits make the loss undefined or infinite.

    First where a row of logits is -inf throughout (no distribution), then where D is +inf
    (``infinite_where``: one side's logit is -inf where the other side's is finite).
    """
    for what, x in named.items():
        if x is None:
            continue
        no_distribution = x.reshape(-1, x.shape[-1]).max(axis=-1) == -math.inf  # (M,)
        pos = _first_counted(no_distribution, rows, shape)
        if pos is not None:
            raise ValueError(f"{what} are -inf for every vocabulary entry at position {pos}: that is no "
                             "distribution")
    s = named["student_logits"]
    t = named["teacher_logits"]
    for where in infinite_where:
        if where == "q=0<p":
            zero, mass = s, t
        else:
            zero, mass = t, s
        infinite = ((zero == -math.inf) & (mass > -math.inf)).any(axis=-1)  # (M,)
        pos = _first_counted(infinite, rows, shape)
        if pos is not None:
            raise InfiniteDivergenceError(
                f"{name} is infinite at position {pos}: one distribution has mass on a vocabulary entry "
                f"where the other's logits are -inf (mask that entry in both, or drop the position)")


def _first_counted(bad, rows, shape):
    """The position (a tuple into ``shape[:-1]``) of the first counted row flagged in ``bad``, or None."""
    if rows is not None:
        bad = bad[rows]
    hits = to_numpy(array_module(bad).flatnonzero(bad))
    if not hits.size:
        return None
    flat = int(hits[0])
    if rows is not None:
        flat = int(to_numpy(rows)[hits[0]])
    return tuple(int(i) for i in np.unravel_index(flat, shape[:-1]))
