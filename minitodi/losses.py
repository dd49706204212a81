r"""The divergences of token-wise distillation: value and gradient w.r.t. the student's logits.

Every function in :data:`LOSSES` has the signature

    loss, grad = LOSSES[name](student_logits, teacher_logits, mask=None, *, temperature=1.0, **options)

- ``student_logits``, ``teacher_logits``: float arrays shaped (..., V), NumPy or CuPy;
- ``mask``: bool array shaped (...), True where a position counts (None: every position counts);
- ``loss``: a Python float, the mean over counted positions of the divergence summed over the vocabulary;
- ``grad``: d loss / d student_logits, same shape and dtype as ``student_logits``, zero where the mask is off.

Notation (one position; every sum runs over the vocabulary v):

    z = s / T,  log q = log_softmax(z)        the student, at temperature T
    log p = log_softmax(t / T)                 the teacher (a constant: no gradient flows into it)
    N = number of counted positions,  loss = (1/N) sum_counted D(p, q)

No T^2 factor is applied (the official ToDi code applies none).

**The one step every gradient shares.** Each D is written as a function of log q. Let
g_v = dD/d(log q_v). Since log q_v = z_v - logsumexp(z), d(log q_v)/dz_j = delta_vj - q_j, so

    dD/dz_j = sum_v g_v (delta_vj - q_j) = g_j - q_j * sum_v g_v
    dloss/ds = (1 / (N T)) * (g - q * sum_v g_v)        at counted positions, 0 elsewhere.

The gradient rows therefore sum to zero (sum_j q_j = 1) and a constant added to a row of logits changes
nothing. Each docstring below gives D's per-token term and g_v; the rest is this step.

**Stop-gradient weights.** ToDi's weight a_v and AKL's head/tail weights are constants in the
gradient (the paper says so; the official code detaches them). Finite differences of the loss value
measure a different gradient, so these functions take ``stopgrad_at=``: logits from which the weights are
computed (default: ``student_logits``). With ``stopgrad_at`` held at a base point s0, the loss is a
function whose true gradient at s0 is the stop-gradient gradient: that is what :func:`check_loss` checks.

**-inf logits.** A logit of -inf is a vocabulary entry with probability exactly 0 (forbidden or padded).
Terms use 0 * log 0 = 0. Where the divergence is truly infinite (FKL when the student has -inf where the
teacher has mass; RKL the other way round) the functions raise :class:`InfiniteDivergenceError`
instead of returning inf or NaN.

**Blocking.** Positions are processed in blocks of about ``BLOCK_ELEMENTS / V`` rows, so temporaries are
O(block x V) and only the output gradient is full size; only counted positions are computed.
"""

import math

import numpy as np

from .backend import array_module, to_numpy
from .gradcheck import check_array

BLOCK_ELEMENTS = 1 << 20
USE_FUSED = True  # on CuPy arrays, FKL, RKL and ToDi use the fused kernels of minitodi.fused


class InfiniteDivergenceError(ValueError):
    """The divergence is +inf: one distribution has mass where the other has none (-inf logits)."""


# --------------------------------------------------------------------------------------------------
# input checks


def _as_logits(x, what, xp):
    x = xp.asarray(x)
    if x.dtype.kind != "f" or x.dtype.itemsize < 4:
        raise TypeError(f"{what} must be float32 or float64, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{what} must be shaped (..., V) with V >= 1, got shape {x.shape}")
    top = float(x.max())
    if math.isnan(top) or top == math.inf:
        bad = to_numpy(xp.isnan(x) | (x == math.inf))
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        kind = "NaN" if math.isnan(float(x[where])) else "+inf"
        raise ValueError(f"{what} contains {kind} (first at index {where})")
    return x


def _check_inputs(student_logits, teacher_logits, mask, temperature, stopgrad_at):
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
    if s.size == 0:
        raise ValueError(f"logits of shape {s.shape} hold no position")
    if mask is not None:
        mask = xp.asarray(mask)
        if mask.shape != s.shape[:-1]:
            raise ValueError(f"mask has shape {mask.shape}; expected the logits' shape without the "
                             f"vocabulary axis, {s.shape[:-1]}")
        if mask.dtype != bool:
            raise TypeError(f"mask must be boolean (e.g. labels != -100), got dtype {mask.dtype}")
        if not bool(mask.any()):
            raise ValueError("mask is False everywhere: no position counts, the mean is undefined")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return xp, s, t, mask, stopgrad_at


def _check_fraction(name, value, low_open=True):
    if not (isinstance(value, (int, float)) and (0 < value < 1 if low_open else 0 <= value <= 1)):
        bounds = "0 < {} < 1" if low_open else "0 <= {} <= 1"
        raise ValueError(f"{bounds.format(name)} is required, got {value!r}")


# --------------------------------------------------------------------------------------------------
# one block of positions


class _NoMass(Exception):
    def __init__(self, what, row):
        self.what, self.row = what, row


def _log_softmax(z, xp, what):
    """log_softmax over the last axis of a block (n, V); a row of all -inf raises _NoMass."""
    m = z.max(axis=-1, keepdims=True)
    dead = ~xp.isfinite(m[:, 0])
    if bool(dead.any()):
        raise _NoMass(what, int(to_numpy(xp.flatnonzero(dead))[0]))
    shifted = z - m
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


class _Block:
    """log p, log q, p, q for a block of rows (n, V), with 0 * log 0 = 0 made safe.

    ``lp`` and ``lq`` have -inf replaced by 0 where the probability is exactly 0: every term that reads
    them is multiplied by that zero probability, and the support checks (``fkl_infinite``,
    ``rkl_infinite``) decide beforehand whether a zero meets mass on the other side.
    """

    def __init__(self, s, t, temperature, xp, has_neginf):
        self.xp = xp
        self.lq_raw = _log_softmax(s / temperature, xp, "student_logits")
        self.lp_raw = _log_softmax(t / temperature, xp, "teacher_logits")
        self.q = xp.exp(self.lq_raw)
        self.p = xp.exp(self.lp_raw)
        self.has_neginf = has_neginf
        if has_neginf:
            self.lq = xp.where(self.lq_raw == -math.inf, 0, self.lq_raw)
            self.lp = xp.where(self.lp_raw == -math.inf, 0, self.lp_raw)
        else:
            self.lq, self.lp = self.lq_raw, self.lp_raw

    def fkl_infinite(self):
        """Rows (n,) where the teacher has mass on an entry whose student logit is -inf."""
        if not self.has_neginf:
            return self.xp.zeros(self.p.shape[0], dtype=bool)
        return ((self.lq_raw == -math.inf) & (self.lp_raw > -math.inf)).any(axis=-1)

    def rkl_infinite(self):
        """Rows (n,) where the student has mass on an entry whose teacher logit is -inf."""
        if not self.has_neginf:
            return self.xp.zeros(self.p.shape[0], dtype=bool)
        return ((self.lp_raw == -math.inf) & (self.lq_raw > -math.inf)).any(axis=-1)

    def safe(self, log_values):
        """``log_values`` with -inf (from an entry where both probabilities are 0) replaced by 0."""
        if not self.has_neginf:
            return log_values
        return self.xp.where(log_values == -math.inf, 0, log_values)

    def sigmoid_weight(self, beta):
        """(a, 1 - a) with a = sigmoid(beta * (log p - log q)): 1 where only q is 0, 0 where only p
        is 0, 1/2 where both are. Computed through tanh: no overflow, accurate near 0 and 1."""
        xp = self.xp
        if beta == 0:
            return xp.full_like(self.p, 0.5), xp.full_like(self.p, 0.5)
        if self.has_neginf:
            both = (self.lp_raw == -math.inf) & (self.lq_raw == -math.inf)
            ratio = xp.where(both, 0, self.lp_raw) - xp.where(both, 0, self.lq_raw)
        else:
            ratio = self.lp_raw - self.lq_raw
        h = 0.5 * xp.tanh((0.5 * beta) * ratio)
        return 0.5 + h, 0.5 - h


def _through_log_softmax(g, q):
    """dD/dz = g - q * sum_v g_v, the log-softmax Jacobian step shared by every divergence."""
    return g - q * g.sum(axis=-1, keepdims=True)


def _reduce(kernel, name, student_logits, teacher_logits, mask, temperature, stopgrad_at=None, fused=None):
    """Run ``kernel`` over blocks of counted positions and average.

    ``kernel(block, weights_block, sel)`` returns (D per row (n,), dD/dz (n, V), infinite rows (n,) bool),
    where ``weights_block`` is a :class:`_Block` built from ``stopgrad_at`` (or the block itself) and
    ``sel`` selects the block's rows of the inputs flattened to (positions, V).

    ``fused``: for FKL, RKL and ToDi, the options of :func:`minitodi.fused.loss_and_grad`, which computes
    the same numbers in a few fused passes on CuPy arrays (when :data:`USE_FUSED` is true and no logit is
    -inf); None keeps this array path.
    """
    xp, s, t, mask, w = _check_inputs(student_logits, teacher_logits, mask, temperature, stopgrad_at)
    shape, V = s.shape, s.shape[-1]
    s2, t2 = s.reshape(-1, V), t.reshape(-1, V)
    w2 = None if w is None else w.reshape(-1, V)
    rows = None if mask is None or bool(mask.all()) else xp.flatnonzero(mask.reshape(-1))
    n = s2.shape[0] if rows is None else int(rows.size)
    has_neginf = float(s2.min()) == -math.inf or float(t2.min()) == -math.inf
    if fused is not None and USE_FUSED and xp is not np and w is None and not has_neginf:
        from .fused import loss_and_grad

        loss, grad = loss_and_grad(name, s2, t2, rows, temperature, **fused)
        return loss, grad.reshape(shape)

    grad = xp.zeros_like(s2)
    scale = 1.0 / (n * temperature)
    total = 0.0
    step = max(1, BLOCK_ELEMENTS // V)
    for start in range(0, n, step):
        sel = slice(start, min(start + step, n)) if rows is None else rows[start:start + step]
        try:
            b = _Block(s2[sel], t2[sel], temperature, xp, has_neginf)
            wb = b if w2 is None else _Block(w2[sel], t2[sel], temperature, xp, True)
        except _NoMass as e:
            raise ValueError(f"{e.what} are -inf for every vocabulary entry at position "
                             f"{_position(sel, start, e.row, shape)}: that is no distribution") from None
        values, dz, infinite = kernel(b, wb, sel)
        if bool(infinite.any()):
            row = int(to_numpy(xp.flatnonzero(infinite))[0])
            pos = _position(sel, start, row, shape)
            raise InfiniteDivergenceError(
                f"{name} is infinite at position {pos}: one distribution has mass on a vocabulary entry "
                f"where the other's logits are -inf (mask that entry in both, or drop the position)")
        total += float(values.sum())
        grad[sel] = dz * scale
    return total / n, grad.reshape(shape)


def _position(sel, start, row, shape):
    flat = start + row if isinstance(sel, slice) else int(sel[row])
    return tuple(int(i) for i in np.unravel_index(flat, shape[:-1]))



# --------------------------------------------------------------------------------------------------
# the divergences


def fkl(student_logits, teacher_logits, mask=None, *, temperature=1.0):
    """Forward KL, KL(p || q): mode covering, lifts tokens the student underestimates.

    Per token:  p_v (log p_v - log q_v)
    g_v = dD/d(log q_v) = -p_v;  sum_v g_v = -1
    dD/dz = -p + q * 1 = q - p
    """
    def kernel(b, _, __):
        values = (b.p * (b.lp - b.lq)).sum(axis=-1)
        return values, b.q - b.p, b.fkl_infinite()
    return _reduce(kernel, "fkl", student_logits, teacher_logits, mask, temperature, fused={})


def rkl(student_logits, teacher_logits, mask=None, *, temperature=1.0):
    """Reverse KL, KL(q || p): mode seeking, pushes down tokens the student overestimates.

    Per token:  q_v r_v  with r_v = log q_v - log p_v
    g_v = d(q_v r_v)/d(log q_v) = q_v r_v + q_v = q_v (r_v + 1);  sum_v g_v = D + 1
    dD/dz = q (r + 1) - q (D + 1) = q (r - D)
    """
    def kernel(b, _, __):
        r = b.lq - b.lp
        values = (b.q * r).sum(axis=-1)
        return values, b.q * (r - values[:, None]), b.rkl_infinite()
    return _reduce(kernel, "rkl", student_logits, teacher_logits, mask, temperature, fused={})


def todi(student_logits, teacher_logits, mask=None, *, temperature=1.0, beta=1.0, detach=True,
         stopgrad_at=None, weight=None):
    """ToDi: FKL and RKL mixed per vocabulary entry by a = sigmoid(beta * log(p/q)).

    With d_v = log p_v - log q_v and a_v = sigmoid(beta d_v):
    Per token:  a_v p_v d_v + (1 - a_v) q_v (-d_v) = (a_v p_v - (1 - a_v) q_v) d_v
    Where the student underestimates (p > q) a -> 1 and the term is FKL's; where it overestimates,
    a -> 0 and it is RKL's. (At beta = 1, a = p / (p + q) and the value equals FKL + RKL.)

    detach=True (default, the paper and its official code): a is a constant in the gradient.
        g_v = -a_v p_v + (1 - a_v) q_v (1 - d_v)       (FKL's -p and RKL's q (r + 1), weighted)
    detach=False: the gradient of the value itself adds the path through a. With
        da_v/d(log q_v) = -beta a_v (1 - a_v)  and  dD_v/da_v = (p_v + q_v) d_v,
        g_v += -beta a_v (1 - a_v) (p_v + q_v) d_v
    then dD/dz = g - q sum_v g_v. ``stopgrad_at`` (logits; default the student's) is where a is
    evaluated; it is meaningful only with detach=True. ``weight`` (an array shaped like the logits,
    values in [0, 1]) replaces a altogether, as a constant: a = 1 everywhere gives FKL, a = 0 RKL.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if not detach and (stopgrad_at is not None or weight is not None):
        raise ValueError("stopgrad_at and weight fix ToDi's weight, a constant only with detach=True")
    if weight is not None:
        if stopgrad_at is not None:
            raise ValueError("give ToDi's weight either through stopgrad_at or through weight, not both")
        weight = _fixed_weight(weight, student_logits)

    def kernel(b, wb, sel):
        if weight is None:
            a, one_minus_a = wb.sigmoid_weight(beta)
        else:
            a = weight[sel]
            one_minus_a = 1 - a
        d = b.lp - b.lq
        values = ((a * b.p - one_minus_a * b.q) * d).sum(axis=-1)
        g = one_minus_a * b.q * (1 - d) - a * b.p
        if not detach:
            g -= beta * a * one_minus_a * (b.p + b.q) * d
        return values, _through_log_softmax(g, b.q), b.fkl_infinite() | b.rkl_infinite()
    fused = {"beta": beta} if detach and weight is None else None
    return _reduce(kernel, "todi", student_logits, teacher_logits, mask, temperature, stopgrad_at, fused)


def _fixed_weight(weight, student_logits):
    """ToDi's explicit weight, checked and flattened to (positions, V) in the student's dtype."""
    xp = array_module(weight, student_logits)
    w, s = xp.asarray(weight), xp.asarray(student_logits)
    if w.shape != s.shape:
        raise ValueError(f"weight has shape {w.shape}; it must match the logits, {s.shape}")
    if w.dtype.kind != "f" or not bool(((w >= 0) & (w <= 1)).all()):
        raise ValueError("weight must be a float array with every value in [0, 1]")
    return w.astype(s.dtype, copy=False).reshape(-1, w.shape[-1])


def todi_weight(student_logits, teacher_logits, *, temperature=1.0, beta=1.0):
    """ToDi's weight a = sigmoid(beta * (log p - log q)) per position and vocabulary entry, (..., V).

    Near 1 where the student underestimates the teacher (FKL dominates), near 0 where it
    overestimates (RKL dominates). Entries where both probabilities are 0 get a = 1/2.
    """
    xp, s, t, _, _ = _check_inputs(student_logits, teacher_logits, None, temperature, None)
    V = s.shape[-1]
    b = _Block(s.reshape(-1, V), t.reshape(-1, V), temperature, xp, has_neginf=True)
    return b.sigmoid_weight(beta)[0].reshape(s.shape)


def jsd(student_logits, teacher_logits, mask=None, *, temperature=1.0):
    """Jensen-Shannon divergence, 1/2 KL(p || m) + 1/2 KL(q || m) with m = (p + q) / 2.

    log m = logaddexp(log p, log q) - log 2 is formed in log space, so it is never the log of an
    underflowed zero. Per token:  1/2 p_v (log p_v - log m_v) + 1/2 q_v (log q_v - log m_v)
    dD/dq_v = 1/2 [-p_v / (2 m_v) + log q_v - log m_v + 1 - q_v / (2 m_v)] = 1/2 (log q_v - log m_v)
    since (p_v + q_v) / (2 m_v) = 1;  so  g_v = 1/2 q_v (log q_v - log m_v),  dD/dz = g - q sum_v g_v.
    Always finite.
    """
    def kernel(b, _, __):
        lm = b.safe(b.xp.logaddexp(b.lp_raw, b.lq_raw) - math.log(2.0))
        g = 0.5 * b.q * (b.lq - lm)
        values = (0.5 * b.p * (b.lp - lm)).sum(axis=-1) + g.sum(axis=-1)
        return values, _through_log_softmax(g, b.q), b.xp.zeros(values.shape, dtype=bool)
    return _reduce(kernel, "jsd", student_logits, teacher_logits, mask, temperature)


def tvd(student_logits, teacher_logits, mask=None, *, temperature=1.0):
    """Total variation distance, 1/2 sum_v |p_v - q_v|.

    Per token:  1/2 |q_v - p_v|;  dD/dq_v = 1/2 sign(q_v - p_v)  (0 at a tie: a subgradient)
    g_v = 1/2 sign(q_v - p_v) q_v,  dD/dz = g - q sum_v g_v.  Always finite.
    """
    def kernel(b, _, __):
        diff = b.q - b.p
        values = 0.5 * b.xp.abs(diff).sum(axis=-1)
        g = 0.5 * b.xp.sign(diff) * b.q
        return values, _through_log_softmax(g, b.q), b.xp.zeros(values.shape, dtype=bool)
    return _reduce(kernel, "tvd", student_logits, teacher_logits, mask, temperature)


def _safe_ratio(x, m, xp):
    """x / m where m > 0, and 0 where m == 0 (there x == 0 too)."""
    return x / xp.where(m > 0, m, 1)


def sfkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, lam=0.1):
    """Skew forward KL, KL(p || m) with m = lam p + (1 - lam) q.

    Per token:  p_v (log p_v - log m_v),  log m_v = logaddexp(log lam + log p_v, log(1-lam) + log q_v)
    dD/dq_v = -p_v (1 - lam) / m_v,  so  g_v = -(1 - lam) p_v q_v / m_v,  dD/dz = g - q sum_v g_v.
    m >= lam p keeps it finite wherever p has mass.
    """
    _check_fraction("lam", lam)

    def kernel(b, _, __):
        xp = b.xp
        lm = b.safe(xp.logaddexp(math.log(lam) + b.lp_raw, math.log1p(-lam) + b.lq_raw))
        m = lam * b.p + (1 - lam) * b.q
        values = (b.p * (b.lp - lm)).sum(axis=-1)
        g = -(1 - lam) * b.p * _safe_ratio(b.q, m, xp)
        return values, _through_log_softmax(g, b.q), xp.zeros(values.shape, dtype=bool)
    return _reduce(kernel, "sfkl", student_logits, teacher_logits, mask, temperature)


def srkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, lam=0.1):
    """Skew reverse KL, KL(q || m) with m = (1 - lam) p + lam q.

    Per token:  q_v (log q_v - log m_v),  log m_v = logaddexp(log(1-lam) + log p_v, log lam + log q_v)
    dD/dq_v = log q_v + 1 - log m_v - lam q_v / m_v,
    so  g_v = q_v (log q_v - log m_v + 1) - lam q_v^2 / m_v,  dD/dz = g - q sum_v g_v.
    m >= lam q keeps it finite wherever q has mass.
    """
    _check_fraction("lam", lam)

    def kernel(b, _, __):
        xp = b.xp
        lm = b.safe(xp.logaddexp(math.log1p(-lam) + b.lp_raw, math.log(lam) + b.lq_raw))
        m = (1 - lam) * b.p + lam * b.q
        kl_terms = b.q * (b.lq - lm)
        g = kl_terms + b.q - lam * b.q * _safe_ratio(b.q, m, xp)
        return kl_terms.sum(axis=-1), _through_log_softmax(g, b.q), xp.zeros(kl_terms.shape[0], dtype=bool)
    return _reduce(kernel, "srkl", student_logits, teacher_logits, mask, temperature)


def akl_weights(p, q, mu, xp):
    """AKL's head and tail weights (n,), from probabilities (n, V); constants in the gradient.

    Sort the teacher's probabilities in ascending order; the tail is the entries whose cumulative
    mass (from the smallest) is <= mu, the head the rest. With gap_v = |p_v - q_v|,
    g_head = sum over head of gap, g_tail = sum over tail, the weights are g_head / (g_head + g_tail)
    on FKL and g_tail / (g_head + g_tail) on RKL. Where p == q exactly both gaps vanish (and so do
    both divergences): the weights are then 1/2 each.
    """
    order = xp.argsort(p, axis=-1)
    p_sorted = xp.take_along_axis(p, order, axis=-1)
    gap = xp.abs(p_sorted - xp.take_along_axis(q, order, axis=-1))
    in_tail = xp.cumsum(p_sorted, axis=-1) <= mu
    g_tail = (gap * in_tail).sum(axis=-1)
    g_all = gap.sum(axis=-1)
    both_zero = g_all == 0
    g_tail = xp.where(both_zero, 0.5, g_tail)
    g_all = xp.where(both_zero, 1.0, g_all)
    return (g_all - g_tail) / g_all, g_tail / g_all


def akl(student_logits, teacher_logits, mask=None, *, temperature=1.0, mu=0.5, stopgrad_at=None):
    """Adaptive KL (Wu et al., 2024): FKL and RKL mixed per position by head/tail error shares.

    D = h FKL + t RKL with (h, t) = :func:`akl_weights` (p, q, mu), constants in the gradient:
    dD/dz = h (q - p) + t q (r - RKL)   (FKL's and RKL's gradients, weighted).
    ``stopgrad_at`` (logits; default the student's) is where h and t are evaluated.
    """
    _check_fraction("mu", mu, low_open=False)

    def kernel(b, wb, sel):
        head, tail = akl_weights(b.p, wb.q, mu, b.xp)
        r = b.lq - b.lp
        fkl_rows = (b.p * (b.lp - b.lq)).sum(axis=-1)
        rkl_rows = (b.q * r).sum(axis=-1)
        values = head * fkl_rows + tail * rkl_rows
        dz = head[:, None] * (b.q - b.p) + tail[:, None] * b.q * (r - rkl_rows[:, None])
        infinite = (b.fkl_infinite() & (head > 0)) | (b.rkl_infinite() & (tail > 0))
        return values, dz, infinite
    return _reduce(kernel, "akl", student_logits, teacher_logits, mask, temperature, stopgrad_at)


LOSSES = {
    "fkl": fkl,
    "rkl": rkl,
    "todi": todi,
    "jsd": jsd,
    "tvd": tvd,
    "sfkl": sfkl,
    "srkl": srkl,
    "akl": akl,
}
"""Name -> ``loss, grad = f(student_logits, teacher_logits, mask=None, *, temperature=1.0, **options)``."""

STOPGRAD_LOSSES = {"todi", "akl"}
"""Losses with stop-gradient weights: finite differences must hold them at the base point."""


LOSS_CHECK_EPS = 1e-4
LOSS_CHECK_ORDER = 4
"""Step and stencil for loss checks, measured on logits ~ N(0, 1), every loss and option, T in {1, 2},
eight seeds, worst relative error: second order 1.1e-5 at eps 1e-3, 2.5e-6 at 1e-4; fourth order
8.5e-8 at 1e-4, 5.4e-8 at 3e-4 (but at 1e-3 TVD's kink |q - p| = 0 falls inside the stencil).
Entries whose gradient is small by cancellation set the worst case; the fourth-order stencil
removes their truncation error."""


def check_loss(name, student_logits, teacher_logits, mask=None, *, temperature=1.0, eps=LOSS_CHECK_EPS,
               order=LOSS_CHECK_ORDER, max_entries=None, rng=None, **options):
    """Check ``LOSSES[name]``'s gradient against central differences of its value, in float64.

    Stop-gradient weights (ToDi with detach=True, AKL) are frozen at the base point by passing
    ``stopgrad_at`` = the base student logits to every evaluation: finite differences then measure
    exactly the gradient training uses. Returns a :class:`minitodi.gradcheck.CheckResult`.
    """
    fn = LOSSES[name]
    student = student_logits.copy()
    base = student.copy()
    if name in STOPGRAD_LOSSES and options.get("detach", True):
        options = {**options, "stopgrad_at": base}
    _, grad = fn(student, teacher_logits, mask, temperature=temperature, **options)
    return check_array(lambda: fn(student, teacher_logits, mask, temperature=temperature, **options)[0],
                       student, grad, eps=eps, order=order, max_entries=max_entries, rng=rng)
