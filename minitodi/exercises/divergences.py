"""The divergences: forward KL, reverse KL and ToDi per row, their references and known mistakes.

Each row is one position: student logits s and teacher logits t of shape (n, V), p = softmax(t),
q = softmax(s), temperature 1. The learner returns D (n,), one divergence per row, and dD_ds (n, V).
The references are minitodi.core.losses' public functions called on one row at a time (on one position
the mean over positions is that row's D). Every mistake below is the computation written out with one
thing wrong; none is a switch inside a shared function.
"""

import numpy as np

from ..core import losses
from ..core.losses import log_softmax, todi_attached_rows, todi_rows, todi_weights
from .grading import Case, Exercise, Mistake, Output


def _per_row(loss, s, t, **options):
    """(D (n,), dD/ds (n, V)) from one of minitodi.core.losses' public functions, one row at a time."""
    values = np.empty(s.shape[0])
    grads = np.empty_like(s)
    for i in range(s.shape[0]):
        values[i], grads[i] = loss(s[i], t[i], **options)
    return values, grads


def fkl_reference(s, t):
    """Forward KL per row and its gradient, from minitodi.core.losses.fkl."""
    return _per_row(losses.fkl, s, t)


def rkl_reference(s, t):
    """Reverse KL per row and its gradient, from minitodi.core.losses.rkl."""
    return _per_row(losses.rkl, s, t)


def todi_reference(s, t, beta):
    """ToDi per row and its gradient, the weight held constant, from minitodi.core.losses.todi."""
    return _per_row(losses.todi, s, t, beta=beta)


# ---- pieces the mistakes are written with ---------------------------------------------------------


def _probabilities(s, t, axis=-1):
    """(log p, log q, p, q): the teacher's and the student's log-probabilities along ``axis``, and exp."""
    lp = log_softmax(t, axis=axis)
    lq = log_softmax(s, axis=axis)
    return lp, lq, np.exp(lp), np.exp(lq)


def _through_softmax(g, q):
    """dD/ds = g - q sum_v g_v from g = dD/d(log q): the step every divergence's gradient shares."""
    return g - q * g.sum(axis=-1, keepdims=True)


def _value_of_with_gradient_of(value_of, gradient_of):
    """An answer mixing two divergences: the value of one, the gradient of the other."""
    def answer(s, t):
        return value_of(s, t)[0], gradient_of(s, t)[1]
    return answer


def _averaged(reference):
    """An answer averaged over rows: D's mean (one number), and every gradient row divided by n."""
    def answer(s, t, *options):
        values, grads = reference(s, t, *options)
        return values.mean(), grads / s.shape[0]
    return answer


def _over_the_rows_axis(rows):
    """An answer whose softmax normalises over axis 0 (the rows), then sums over the vocabulary."""
    def answer(s, t):
        lp, lq, p, q = _probabilities(s, t, axis=0)
        values, g = rows(lp, lq, p, q)
        return values, _through_softmax(g, q)
    return answer


# ---- forward KL: D = sum_v p_v log(p_v / q_v), dD/ds = q - p --------------------------------------


def _fkl_wrong_sign(s, t):
    values, grads = fkl_reference(s, t)
    return values, -grads


def _fkl_derivative_in_log_q(s, t):
    values, _ = fkl_reference(s, t)
    _, _, p, _ = _probabilities(s, t)
    return values, -p


def _fkl_derivative_in_q(s, t):
    values, _ = fkl_reference(s, t)
    _, _, p, q = _probabilities(s, t)
    return values, -p / q


def _fkl_as_cross_entropy(s, t):
    values, grads = fkl_reference(s, t)
    lp, _, p, _ = _probabilities(s, t)
    return values - (p * lp).sum(axis=-1), grads  # + H(p)


MEAN_OVER_ROWS = ("you averaged over the rows: your D is one number and your dD_ds is divided by n.",
                  "This exercise wants one divergence per row, D of shape (n,), and each row's own gradient "
                  "dD[i]/ds[i], with no 1/n. The mean over positions is taken later, once, by the loss in "
                  "minitodi.core.losses.")
SOFTMAX_AXIS = ("your softmax normalises the wrong axis: over the rows (axis 0), not over the vocabulary.",
                "Each row is one position, with its distribution over the V vocabulary entries along the "
                "last axis: log q = s - logsumexp(s, axis=-1, keepdims=True), and the same for p from t.")
DERIVATIVE_IN_Q = ("The logits s are what the model outputs, so the gradient is taken with respect to s. "
                   "q = softmax(s) ties every q_v to every s_j: dq_v / ds_j = q_v (delta_vj - q_j). Easiest "
                   "through log q: d log q_v / d s_j = delta_vj - q_j, so dD/ds_j = g_j - q_j sum_v g_v with "
                   "g = dD/d log q = q dD/dq.")

FKL_MISTAKES = (
    Mistake("rkl_gradient",
            "your dD_ds is reverse KL's gradient: were FKL's and RKL's gradients swapped?",
            "For FKL, D = sum_v p_v (log p_v - log q_v), and only log q depends on s. With "
            "d log q_v / d s_j = delta_vj - q_j, dD/ds_j = -p_j + q_j sum_v p_v = q_j - p_j: the gradient is "
            "simply q - p.",
            _value_of_with_gradient_of(fkl_reference, rkl_reference)),
    Mistake("value_direction_swapped",
            "your D is KL(q || p): the KL's two distributions are swapped in the value (your dD_ds is "
            "right).",
            "Forward KL puts the teacher first and weights by it: D = KL(p || q) = sum_v p_v log(p_v / q_v). "
            "sum_v q_v log(q_v / p_v) is reverse KL, another number (the two agree only when q = p).",
            _value_of_with_gradient_of(rkl_reference, fkl_reference)),
    Mistake("computed_rkl",
            "you computed reverse KL, KL(q || p), for both D and dD_ds.",
            "Forward KL puts the teacher first: D = KL(p || q) = sum_v p_v log(p_v / q_v), with "
            "p = softmax(t) and q = softmax(s); its gradient is dD/ds = q - p. (RKL, "
            "sum_v q_v log(q_v / p_v), is the next exercise.)",
            rkl_reference),
    Mistake("wrong_sign",
            "your dD_ds has the wrong sign: p - q instead of q - p.",
            "dD/ds = q - p. A check of the sign: where the student gives a token more probability than the "
            "teacher (q_v > p_v), raising its logit increases the divergence, so the derivative is positive "
            "there, and gradient descent lowers that logit.",
            _fkl_wrong_sign),
    Mistake("softmax_step_missing",
            "your dD_ds is -p, the derivative with respect to log q, not to the logits s.",
            "One step remains: log q_v = s_v - log sum_w exp(s_w), so d log q_v / d s_j = delta_vj - q_j, "
            "and with g = dD/d log q = -p, dD/ds_j = g_j - q_j sum_v g_v = q_j - p_j. (Every row of a "
            "correct gradient sums to 0: adding a constant to all the logits of a row changes nothing.)",
            _fkl_derivative_in_log_q),
    Mistake("gradient_in_probabilities",
            "your dD_ds is -p / q, the derivative with respect to the probabilities q, not to the logits s.",
            DERIVATIVE_IN_Q + " Here g = q (-p / q) = -p, and dD/ds = -p + q sum_v p_v = q - p.",
            _fkl_derivative_in_q),
    Mistake("cross_entropy",
            "your D is the cross-entropy -sum_v p_v log q_v, not the KL divergence.",
            "The two differ by the teacher's entropy: -sum_v p_v log q_v = KL(p || q) + H(p), with H(p) = "
            "-sum_v p_v log p_v. H(p) does not depend on s, so the gradient q - p is the same; but D must be "
            "sum_v p_v (log p_v - log q_v), which is 0 when q = p.",
            _fkl_as_cross_entropy),
    Mistake("mean_over_rows", *MEAN_OVER_ROWS, _averaged(fkl_reference)),
    Mistake("softmax_axis", *SOFTMAX_AXIS, _over_the_rows_axis(losses.fkl_rows)),
)


# ---- reverse KL: D = sum_v q_v r_v, r = log q - log p, dD/ds = q (r - D) ---------------------------


def _rkl_without_qD(s, t):
    values, _ = rkl_reference(s, t)
    lp, lq, _, q = _probabilities(s, t)
    return values, q * (lq - lp)


def _rkl_derivative_in_log_q(s, t):
    values, _ = rkl_reference(s, t)
    lp, lq, _, q = _probabilities(s, t)
    return values, q * (lq - lp + 1.0)


def _rkl_derivative_in_q(s, t):
    values, _ = rkl_reference(s, t)
    lp, lq, _, _ = _probabilities(s, t)
    return values, lq - lp + 1.0


def _rkl_wrong_sign(s, t):
    values, grads = rkl_reference(s, t)
    return values, -grads


RKL_MISTAKES = (
    Mistake("fkl_gradient",
            "your dD_ds is forward KL's gradient, q - p: were FKL's and RKL's gradients swapped?",
            "In RKL, D = sum_v q_v r_v with r_v = log q_v - log p_v, and q appears twice, as the weight and "
            "inside the log: dD/d log q_v = q_v r_v + q_v = q_v (r_v + 1). Through the softmax step, "
            "dD/ds = q (r + 1) - q sum_v q_v (r_v + 1) = q (r - D).",
            _value_of_with_gradient_of(rkl_reference, fkl_reference)),
    Mistake("value_direction_swapped",
            "your D is KL(p || q): the KL's two distributions are swapped in the value (your dD_ds is "
            "right).",
            "Reverse KL puts the student first and weights by it: D = KL(q || p) = sum_v q_v log(q_v / p_v). "
            "sum_v p_v log(p_v / q_v) is forward KL, another number (the two agree only when q = p).",
            _value_of_with_gradient_of(fkl_reference, rkl_reference)),
    Mistake("computed_fkl",
            "you computed forward KL, KL(p || q), for both D and dD_ds.",
            "Reverse KL puts the student first: D = KL(q || p) = sum_v q_v log(q_v / p_v), with "
            "p = softmax(t) and q = softmax(s); its gradient is dD/ds = q (r - D), r = log q - log p.",
            fkl_reference),
    Mistake("minus_qD_lost",
            "your dD_ds is q r: the term -q D is missing.",
            "With g = dD/d log q = q (r + 1), the softmax step subtracts q times the whole sum of g, and "
            "sum_v q_v (r_v + 1) = D + 1, not just 1. So dD/ds = q (r + 1) - q (D + 1) = q (r - D).",
            _rkl_without_qD),
    Mistake("softmax_step_missing",
            "your dD_ds is q (r + 1), the derivative with respect to log q, not to the logits s.",
            "One step remains: log q_v = s_v - log sum_w exp(s_w), so d log q_v / d s_j = delta_vj - q_j, "
            "and dD/ds_j = g_j - q_j sum_v g_v with g = q (r + 1), which gives q (r - D). (Every row of a "
            "correct gradient sums to 0.)",
            _rkl_derivative_in_log_q),
    Mistake("gradient_in_probabilities",
            "your dD_ds is r + 1 = log(q / p) + 1, the derivative with respect to the probabilities q, not "
            "to the logits s.",
            DERIVATIVE_IN_Q + " Here g = q (r + 1), and dD/ds = q (r + 1) - q (D + 1) = q (r - D).",
            _rkl_derivative_in_q),
    Mistake("wrong_sign",
            "your dD_ds has the wrong sign: q (D - r) instead of q (r - D).",
            "dD/ds = q (r - D) with r = log q - log p. A check of the sign: where the student's log ratio "
            "r_v is above its average D, raising that logit increases the divergence.",
            _rkl_wrong_sign),
    Mistake("mean_over_rows", *MEAN_OVER_ROWS, _averaged(rkl_reference)),
    Mistake("softmax_axis", *SOFTMAX_AXIS, _over_the_rows_axis(losses.rkl_rows)),
)


# ---- ToDi: D = sum_v [a_v p_v d_v - (1 - a_v) q_v d_v], d = log p - log q, a = sigmoid(beta d) held ----


def _todi_parts(s, t, beta):
    """(log p, log q, p, q, a, 1 - a) of ToDi, the weight computed as minitodi.core.losses does."""
    lp, lq, p, q = _probabilities(s, t)
    a, one_minus_a = todi_weights(lp, lq, p, q, beta)
    return lp, lq, p, q, a, one_minus_a


def _todi_g(s, t, beta):
    """(D, g = dD/d log q, q) of ToDi, the weight held constant: g = -a p + (1 - a) q (1 - d)."""
    lp, lq, p, q, a, one_minus_a = _todi_parts(s, t, beta)
    values, g = todi_rows(lp, lq, p, q, a, one_minus_a)
    return values, g, q


def _todi_weight_reversed(s, t, beta):
    lp, lq, p, q, a, one_minus_a = _todi_parts(s, t, beta)
    values, g = todi_rows(lp, lq, p, q, one_minus_a, a)
    return values, _through_softmax(g, q)


def _todi_weight_differentiated(s, t, beta):
    lp, lq, p, q, a, one_minus_a = _todi_parts(s, t, beta)
    values, g = todi_attached_rows(lp, lq, p, q, a, one_minus_a, beta)
    return values, _through_softmax(g, q)


def _todi_beta_ignored(s, t, beta):
    return todi_reference(s, t, 1.0)


def _todi_weight_of_probabilities(s, t, beta):
    lp, lq, p, q = _probabilities(s, t)
    h = 0.5 * np.tanh(0.5 * beta * (p - q))  # sigmoid(beta (p - q)) = 1/2 + h
    values, g = todi_rows(lp, lq, p, q, 0.5 + h, 0.5 - h)
    return values, _through_softmax(g, q)


def _todi_rkl_q_constant(s, t, beta):
    lp, lq, p, q, a, one_minus_a = _todi_parts(s, t, beta)
    values, _ = todi_rows(lp, lq, p, q, a, one_minus_a)
    g = -a * p - one_minus_a * q * (lp - lq)  # the "+ q" of differentiating q_v itself left out
    return values, _through_softmax(g, q)


def _todi_finished_gradients_mixed(s, t, beta):
    values, _ = todi_reference(s, t, beta)
    _, _, _, _, a, one_minus_a = _todi_parts(s, t, beta)
    _, fkl_grad = fkl_reference(s, t)
    _, rkl_grad = rkl_reference(s, t)
    return values, a * fkl_grad + one_minus_a * rkl_grad


def _todi_derivative_in_log_q(s, t, beta):
    values, g, _ = _todi_g(s, t, beta)
    return values, g


def _todi_derivative_in_q(s, t, beta):
    values, g, q = _todi_g(s, t, beta)
    return values, g / q


TODI_G = "g_v = dD/d log q_v = -a_v p_v + (1 - a_v) q_v (1 - d_v), d_v = log p_v - log q_v"

TODI_MISTAKES = (
    Mistake("weight_reversed",
            "your answer has ToDi's weight reversed: 1 - a on the FKL term and a on the RKL term.",
            "a_v = sigmoid(beta log(p_v / q_v)) is near 1 where the student underestimates the teacher "
            "(p_v > q_v), and that is where FKL's term belongs: D = sum_v [a_v p_v log(p_v / q_v) + "
            "(1 - a_v) q_v log(q_v / p_v)]. (Reversed, the answer is FKL + RKL - ToDi, value and gradient.)",
            _todi_weight_reversed),
    Mistake("weight_differentiated",
            "your dD_ds differentiates ToDi's weight a, which must be held constant (a stop-gradient).",
            "ToDi treats a as a constant, as the paper does and its code does with a.detach(). With a fixed, "
            + TODI_G + ", and dD/ds = g - q sum_v g_v. Differentiating a adds -beta a_v (1 - a_v) "
            "(p_v + q_v) d_v to g_v.",
            _todi_weight_differentiated),
    Mistake("gradients_mixed",
            "your dD_ds is a (q - p) + (1 - a) q (r - D_RKL): the finished gradients of the whole FKL and "
            "RKL losses, mixed by a, instead of the gradient of the per-entry mix.",
            "The whole divergence's gradient q - p already holds every entry's share through the softmax "
            "step (its -q sum_v), and so does RKL's; weighting those finished vectors by a_v mixes shares "
            "that belong to other entries. Mix the per-entry terms first, then take one softmax step: "
            + TODI_G + ", dD/ds = g - q sum_v g_v.",
            _todi_finished_gradients_mixed),
    Mistake("beta_ignored",
            "your answer ignores beta: a = sigmoid(log(p / q)), as if beta were 1.",
            "The weight is a_v = sigmoid(beta log(p_v / q_v)); beta sets how sharply it switches between FKL "
            "(a -> 1) and RKL (a -> 0). The cases use beta = 1, 0.5 and 2.",
            _todi_beta_ignored),
    Mistake("weight_of_probabilities",
            "your weight is sigmoid(beta (p - q)): the difference of the probabilities, not of their logs.",
            "a_v = sigmoid(beta log(p_v / q_v)) = sigmoid(beta (log p_v - log q_v)). (At beta = 1 this is "
            "p_v / (p_v + q_v).)",
            _todi_weight_of_probabilities),
    Mistake("rkl_q_constant",
            "in the RKL term of your dD_ds, q was treated as a constant: the derivative of q itself is "
            "missing.",
            "In (1 - a_v) q_v log(q_v / p_v), q_v appears twice: d/d log q_v [q_v (log q_v - log p_v)] = "
            "q_v (log q_v - log p_v) + q_v = q_v (1 - d_v), with d_v = log p_v - log q_v. So "
            "g_v = -a_v p_v + (1 - a_v) q_v (1 - d_v), and dD/ds = g - q sum_v g_v.",
            _todi_rkl_q_constant),
    Mistake("softmax_step_missing",
            "your dD_ds is g = dD/d log q, the derivative with respect to log q, not to the logits s.",
            "One step remains: with d log q_v / d s_j = delta_vj - q_j, dD/ds_j = g_j - q_j sum_v g_v, where "
            "g_v = -a_v p_v + (1 - a_v) q_v (1 - d_v). (Every row of a correct gradient sums to 0.)",
            _todi_derivative_in_log_q),
    Mistake("gradient_in_probabilities",
            "your dD_ds is dD/dq = -a p / q + (1 - a) (1 - d), the derivative with respect to the "
            "probabilities q, not to the logits s.",
            DERIVATIVE_IN_Q + " Here " + TODI_G + ".",
            _todi_derivative_in_q),
    Mistake("mean_over_rows", *MEAN_OVER_ROWS, _averaged(todi_reference)),
)


# ---- the cases and the exercises ------------------------------------------------------------------


def _loss_cases(betas=None):
    """Three cases of logits (n, V); with ``betas``, each case gets one (ToDi's argument).

    Case 2 has edge rows: the student equal to the teacher (D = 0), shifted by a constant (the same
    distribution), and a uniform student against a teacher with repeated logits.
    """
    rng = np.random.default_rng(6)
    s1 = rng.standard_normal((4, 7))
    t1 = rng.standard_normal((4, 7))
    t2 = 3.0 * rng.standard_normal((3, 5))
    t2[2] = [1.0, 1.0, -2.0, 1.0, -2.0]
    s2 = np.stack([t2[0], t2[1] + 2.0, np.zeros(5)])
    s3 = 2.0 * rng.standard_normal((6, 2))
    t3 = 2.0 * rng.standard_normal((6, 2))
    cases = [("random logits", s1, t1), ("equal, shifted and tied rows", s2, t2), ("V = 2", s3, t3)]
    if betas is None:
        return [Case(what, {"s": s, "t": t}) for what, s, t in cases]
    return [Case(what, {"s": s, "t": t, "beta": beta}) for (what, s, t), beta in zip(cases, betas)]


def _todi_cases():
    return _loss_cases(betas=(1.0, 0.5, 2.0))


OUTPUTS = (Output("D", "(n,): one divergence per row, no mean"), Output("dD_ds", "(n, V), like s"))

EXERCISES = (
    Exercise("fkl", "fkl(s, t) -> (D, dD_ds)", OUTPUTS, fkl_reference, _loss_cases, FKL_MISTAKES),
    Exercise("rkl", "rkl(s, t) -> (D, dD_ds)", OUTPUTS, rkl_reference, _loss_cases, RKL_MISTAKES),
    Exercise("todi", "todi(s, t, beta) -> (D, dD_ds)", OUTPUTS, todi_reference, _todi_cases, TODI_MISTAKES),
)
