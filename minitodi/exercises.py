r"""Exercises: write a gradient by hand, and be told whether it is right and, if not, what went wrong.

    from minitodi.exercises import check
    report = check("rkl", my_rkl)
    print(report)      # "rkl: passed — ..." or "rkl: not yet — ..." and what to look at
    report.passed      # True when every output agrees with the reference on every case

Notebook 06 states each task with its math; :data:`EXERCISES` lists them. NumPy, float64, one position
per row, temperature 1:

    fkl(s, t) -> (D, dD_ds)                   s, t (n, V) student and teacher logits; D (n,), one
    rkl(s, t) -> (D, dD_ds)                   divergence per row (no mean); dD_ds (n, V)
    todi(s, t, beta) -> (D, dD_ds)            the weight a = sigmoid(beta log(p/q)) held constant
    linear_backward(dy, x, w, b) -> (dx, dw, db)            y = x @ w + b, x (N, Cin), w (Cin, Cout)
    layernorm_backward(dy, x, w, b, eps) -> (dx, dw, db)    x (N, C), biased variance (as PyTorch)
    gelu_backward(dy, x) -> dx                y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's
    cross_entropy_backward(logits, targets) -> dlogits      the mean cross-entropy over N rows
    attention_backward(dy, q, k, v) -> (dq, dk, dv)         one causal head, (T, hs), scores q k^T / sqrt(hs)
    rmsnorm_backward(dy, x, w, eps) -> (dx, dw)

**How an answer is graded.** The learner's function runs on three fixed cases per exercise (small float64
arrays from fixed seeds, one with edge structure: equal or tied rows, a constant row, a single position,
saturated values), each call on fresh copies of the inputs. Every output is compared, entry by entry,
with the reference answer: minitodi's own code (minitodi.core.losses for the divergences, one row at a time;
minitodi.core.layers for the layers), which tests/test_exercises.py checks against float64 finite differences.
An output agrees when every entry's relative error

    |a - e| / max(|a| + |e|, FLOOR * scale)        scale = the output's largest |e| over the cases

is at most TOL. The floor keeps an entry that is 0 by cancellation (dq of a position that sees only
itself, GELU far below 0) from failing a correct answer on its last bits.

**Known mistakes.** Every exercise carries the typical wrong answers (each a working implementation of
the reference with one thing wrong). A mistake "matches" when the learner's outputs agree, to the same
TOL, with that mistake's on every output the mistake changes; its explanation, with the formula that
should have been used, goes into the diagnosis. Where no known mistake explains an output, the diagnosis
says where its largest error is: which entry, in which case, the value against the expected one.

**What is never a pass and never a traceback.** An exception (NotImplementedError: "not implemented
yet"), a return value of the wrong kind or length, a dtype other than float64, NaN or inf, a wrong shape:
each gives a failed report saying so. An unknown exercise name is a ValueError listing the names.
"""

import math
import os
import textwrap
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .core import layers, losses
from .core.losses import fkl_rows, log_softmax, rkl_rows, todi_attached_rows, todi_rows, todi_weights

TOL = 1e-8
"""Largest relative error that agrees. Correct answers written independently of minitodi (the worked
solutions, and variants: softmax without the max shift, GELU through a sigmoid, np.var, a -1e9 mask)
came within 1.2e-12 of the references on these cases; the nearest known mistake (layer norm's unbiased
variance) is 0.09 away. 1e-8 leaves room on both sides."""

FLOOR = 1e-4
"""The denominator's floor, as a fraction of the output's largest expected entry (module docstring). With
1e-6, a correct dq on equal keys (0 in exact arithmetic, rounding noise of 1e-16 in both answers) measured
7e-10, too near TOL; with 1e-4 it is 7e-12, and an entry below the floor is still held to an absolute
error of TOL * FLOOR * scale = 1e-12 * scale."""

WIDTH = 100  # str(report) wraps its lines at this many columns


# --------------------------------------------------------------------------------------------------
# what an exercise is made of


@dataclass(frozen=True)
class Output:
    """One output of the learner's function: its name and its expected shape, in words."""

    name: str
    shape: str


@dataclass(frozen=True)
class Case:
    """One input of an exercise: a description and the arguments, by name, in the signature's order."""

    description: str
    inputs: dict

    def arguments(self):
        """Fresh copies of the inputs, in order: a function changing them in place changes nothing here."""
        return [np.copy(value) if isinstance(value, np.ndarray) else value for value in self.inputs.values()]

    def label(self, number):
        """'case 2 (a constant row; x (3, 5), eps = 0.1)': the number, what it is, the shapes."""
        parts = []
        for key, value in self.inputs.items():
            if isinstance(value, np.ndarray):
                parts.append(f"{key} {value.shape}")
            else:
                parts.append(f"{key} = {value:g}")
        return f"case {number} ({self.description}; {', '.join(parts)})"


@dataclass(frozen=True)
class Mistake:
    """A typical wrong answer: a key for code, a title and an explanation for the learner, an implementation.

    ``answer`` has the learner's signature and returns the wrong outputs; ``explanation`` gives the
    formula that should have been used.
    """

    key: str
    title: str
    explanation: str
    answer: Callable


@dataclass(frozen=True)
class Exercise:
    """A function to write: its signature and outputs, the reference answer, the cases, the known mistakes."""

    name: str
    signature: str
    outputs: tuple
    reference: Callable
    cases: Callable  # () -> list of Case; built at each check, so nothing a learner does can change them
    mistakes: tuple

    @property
    def output_names(self):
        return [output.name for output in self.outputs]


@dataclass
class Report:
    """The outcome of :func:`check`: ``passed``, a ``diagnosis`` in words, and ``str(report)`` to print.

    ``max_error`` is the largest relative error over every output and case (inf where an output has
    the wrong shape; None where nothing could be compared), ``output`` the output where it is, and
    ``mistakes`` the keys of the known mistakes recognised (see :data:`EXERCISES`).
    """

    name: str
    passed: bool
    diagnosis: str
    max_error: float | None = None
    output: str | None = None
    mistakes: tuple = ()

    def __str__(self):
        verdict = "passed" if self.passed else "not yet"
        paragraphs = self.diagnosis.split("\n")
        wrap = {"width": WIDTH, "break_long_words": False, "break_on_hyphens": False}
        lines = [textwrap.fill(f"{self.name}: {verdict} — {paragraphs[0]}", subsequent_indent="    ", **wrap)]
        for paragraph in paragraphs[1:]:
            lines.append(textwrap.fill(paragraph, initial_indent="    ", subsequent_indent="    ", **wrap))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the divergences: references from minitodi.core.losses, and the known mistakes


def _per_row(loss, s, t, **options):
    """(D (n,), dD/ds (n, V)) from one of minitodi.core.losses' public functions, called on one row at a time.

    On a single position the mean over positions is that row's D, and the gradient that row's own.
    """
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


def _probabilities(s, t, axis=-1):
    """(log p, log q, p, q): the teacher's and the student's log-probabilities along ``axis``, and exp."""
    lp = log_softmax(t, axis=axis)
    lq = log_softmax(s, axis=axis)
    return lp, lq, np.exp(lp), np.exp(lq)


def _through_softmax(g, q):
    """dD/ds = g - q sum_v g_v from g = dD/d(log q): the step every divergence's gradient shares."""
    return g - q * g.sum(axis=-1, keepdims=True)


def _averaged(reference):
    """The mistake of averaging over rows: D's mean (one number), and every gradient row divided by n."""
    def answer(s, t, *options):
        values, grads = reference(s, t, *options)
        return values.mean(), grads / s.shape[0]
    return answer


def _with_gradient_of(value_of, gradient_of):
    """The mistake of mixing two divergences: the value of one, the gradient of the other."""
    def answer(s, t):
        return value_of(s, t)[0], gradient_of(s, t)[1]
    return answer


def _fkl_wrong_sign(s, t):
    values, grads = fkl_reference(s, t)
    return values, -grads


def _fkl_without_softmax_step(s, t):
    values, _ = fkl_reference(s, t)
    _, _, p, _ = _probabilities(s, t)
    return values, -p


def _fkl_as_cross_entropy(s, t):
    values, grads = fkl_reference(s, t)
    lp, _, p, _ = _probabilities(s, t)
    return values - (p * lp).sum(axis=-1), grads  # + H(p)


def _divergence_over_rows_axis(rows):
    """The mistake of normalising the softmax over axis 0 (the rows), then summing over the vocabulary."""
    def answer(s, t):
        lp, lq, p, q = _probabilities(s, t, axis=0)
        values, g = rows(lp, lq, p, q)
        return values, _through_softmax(g, q)
    return answer


def _rkl_gradient(s, t, with_qD=True, with_step=True, sign=1.0):
    """RKL's gradient written out, q (r - D), with one of its parts changed: the known mistakes."""
    values, _ = rkl_reference(s, t)
    lp, lq, _, q = _probabilities(s, t)
    r = lq - lp
    if not with_step:
        return values, q * (r + 1)  # dD/d(log q): the softmax step skipped
    if not with_qD:
        return values, q * r
    return values, sign * q * (r - values[:, None])


def _todi_parts(s, t, beta):
    """(log p, log q, p, q, a, 1 - a) of ToDi, the weight computed as minitodi.core.losses does."""
    lp, lq, p, q = _probabilities(s, t)
    a, one_minus_a = todi_weights(lp, lq, p, q, beta)
    return lp, lq, p, q, a, one_minus_a


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


def _todi_rkl_weight_constant(s, t, beta):
    lp, lq, p, q, a, one_minus_a = _todi_parts(s, t, beta)
    values, _ = todi_rows(lp, lq, p, q, a, one_minus_a)
    d = lp - lq
    g = -a * p - one_minus_a * q * d  # the "+ q" of differentiating q_v itself left out
    return values, _through_softmax(g, q)


def _todi_without_softmax_step(s, t, beta):
    lp, lq, p, q, a, one_minus_a = _todi_parts(s, t, beta)
    return todi_rows(lp, lq, p, q, a, one_minus_a)


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


DIVERGENCE_OUTPUTS = (Output("D", "(n,): one divergence per row, no mean"), Output("dD_ds", "(n, V), like s"))

_MEAN_OVER_ROWS = ("you averaged over the rows: your D is one number and your dD_ds is divided by n.",
                   "This exercise wants one divergence per row, D of shape (n,), and each row's own gradient "
                   "dD[i]/ds[i], with no 1/n. The mean over positions is taken later, once, by the loss in "
                   "minitodi.core.losses.")

FKL_MISTAKES = (
    Mistake("rkl_gradient",
            "your dD_ds is reverse KL's gradient: were FKL's and RKL's gradients swapped?",
            "For FKL, D = sum_v p_v (log p_v - log q_v), and only log q depends on s. With "
            "d log q_v / d s_j = delta_vj - q_j, dD/ds_j = -p_j + q_j sum_v p_v = q_j - p_j: the gradient is "
            "simply q - p.",
            _with_gradient_of(fkl_reference, rkl_reference)),
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
            _fkl_without_softmax_step),
    Mistake("cross_entropy",
            "your D is the cross-entropy -sum_v p_v log q_v, not the KL divergence.",
            "The two differ by the teacher's entropy: -sum_v p_v log q_v = KL(p || q) + H(p), with H(p) = "
            "-sum_v p_v log p_v. H(p) does not depend on s, so the gradient q - p is the same; but D must be "
            "sum_v p_v (log p_v - log q_v), which is 0 when q = p.",
            _fkl_as_cross_entropy),
    Mistake("mean_over_rows", *_MEAN_OVER_ROWS, _averaged(fkl_reference)),
    Mistake("softmax_axis",
            "your softmax normalises the wrong axis: over the rows (axis 0), not over the vocabulary.",
            "Each row is one position, with its distribution over the V vocabulary entries along the last "
            "axis: log q = s - logsumexp(s, axis=-1, keepdims=True), and the same for p from t.",
            _divergence_over_rows_axis(fkl_rows)),
)

RKL_MISTAKES = (
    Mistake("fkl_gradient",
            "your dD_ds is forward KL's gradient, q - p: were FKL's and RKL's gradients swapped?",
            "In RKL, D = sum_v q_v r_v with r_v = log q_v - log p_v, and q appears twice, as the weight and "
            "inside the log: dD/d log q_v = q_v r_v + q_v = q_v (r_v + 1). Through the softmax step, "
            "dD/ds = q (r + 1) - q sum_v q_v (r_v + 1) = q (r - D).",
            _with_gradient_of(rkl_reference, fkl_reference)),
    Mistake("computed_fkl",
            "you computed forward KL, KL(p || q), for both D and dD_ds.",
            "Reverse KL puts the student first: D = KL(q || p) = sum_v q_v log(q_v / p_v), with "
            "p = softmax(t) and q = softmax(s); its gradient is dD/ds = q (r - D), r = log q - log p.",
            fkl_reference),
    Mistake("minus_qD_lost",
            "your dD_ds is q r: the term -q D is missing.",
            "With g = dD/d log q = q (r + 1), the softmax step subtracts q times the whole sum of g, and "
            "sum_v q_v (r_v + 1) = D + 1, not just 1. So dD/ds = q (r + 1) - q (D + 1) = q (r - D).",
            lambda s, t: _rkl_gradient(s, t, with_qD=False)),
    Mistake("softmax_step_missing",
            "your dD_ds is q (r + 1), the derivative with respect to log q, not to the logits s.",
            "One step remains: log q_v = s_v - log sum_w exp(s_w), so d log q_v / d s_j = delta_vj - q_j, "
            "and dD/ds_j = g_j - q_j sum_v g_v with g = q (r + 1), which gives q (r - D). (Every row of a "
            "correct gradient sums to 0.)",
            lambda s, t: _rkl_gradient(s, t, with_step=False)),
    Mistake("wrong_sign",
            "your dD_ds has the wrong sign: q (D - r) instead of q (r - D).",
            "dD/ds = q (r - D) with r = log q - log p. A check of the sign: where the student's log ratio "
            "r_v is above its average D, raising that logit increases the divergence.",
            lambda s, t: _rkl_gradient(s, t, sign=-1.0)),
    Mistake("mean_over_rows", *_MEAN_OVER_ROWS, _averaged(rkl_reference)),
    Mistake("softmax_axis",
            "your softmax normalises the wrong axis: over the rows (axis 0), not over the vocabulary.",
            "Each row is one position, with its distribution over the V vocabulary entries along the last "
            "axis: log q = s - logsumexp(s, axis=-1, keepdims=True), and the same for p from t.",
            _divergence_over_rows_axis(rkl_rows)),
)

TODI_MISTAKES = (
    Mistake("weight_reversed",
            "your answer has ToDi's weight reversed: 1 - a on the FKL term and a on the RKL term.",
            "a_v = sigmoid(beta log(p_v / q_v)) is near 1 where the student underestimates the teacher "
            "(p_v > q_v), and that is where FKL's term belongs: D = sum_v [a_v p_v log(p_v / q_v) + "
            "(1 - a_v) q_v log(q_v / p_v)]. (Reversed, the answer is FKL + RKL - ToDi, value and gradient.)",
            _todi_weight_reversed),
    Mistake("weight_differentiated",
            "your dD_ds differentiates ToDi's weight a, which must be held constant (a stop-gradient).",
            "ToDi treats a as a constant, as the paper does and its code does with a.detach(). With a fixed "
            "and d_v = log p_v - log q_v, g_v = dD/d log q_v = -a_v p_v + (1 - a_v) q_v (1 - d_v), and "
            "dD/ds = g - q sum_v g_v. Differentiating a adds -beta a_v (1 - a_v) (p_v + q_v) d_v to g_v.",
            _todi_weight_differentiated),
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
            _todi_rkl_weight_constant),
    Mistake("softmax_step_missing",
            "your dD_ds is g = dD/d log q, the derivative with respect to log q, not to the logits s.",
            "One step remains: with d log q_v / d s_j = delta_vj - q_j, dD/ds_j = g_j - q_j sum_v g_v, where "
            "g_v = -a_v p_v + (1 - a_v) q_v (1 - d_v). (Every row of a correct gradient sums to 0.)",
            _todi_without_softmax_step),
    Mistake("mean_over_rows", *_MEAN_OVER_ROWS, _averaged(todi_reference)),
)


# --------------------------------------------------------------------------------------------------
# linear: y = x @ w + b


def linear_reference(dy, x, w, b):
    """(dx, dw, db) from minitodi.core.layers' linear_forward and linear_backward."""
    _, cache = layers.linear_forward(x, w, b)
    return layers.linear_backward(dy, cache)


def _linear_variant(dy, x, w, b, *, db_rows="sum", dw_transposed=False, dw_averaged=False):
    """The linear backward written out, dx = dy w^T, dw = x^T dy, db = sum_n dy[n], with one part changed."""
    N = x.shape[0]
    dx = dy @ w.T
    dw = x.T @ dy
    if dw_transposed:
        dw = dy.T @ x  # (Cout, Cin)
    if dw_averaged:
        dw = dw / N
    db = dy.sum(axis=0)
    if db_rows == "none":
        db = dy.copy()  # (N, Cout)
    if db_rows == "mean":
        db = dy.mean(axis=0)
    return dx, dw, db


def _linear_cases():
    """Random shapes; one row; repeated rows of x with a square w (a transposed dw has the right shape)."""
    rng = np.random.default_rng(7)

    def case(what, N, Cin, Cout):
        x = rng.standard_normal((N, Cin))
        w = rng.standard_normal((Cin, Cout))
        b = rng.standard_normal(Cout)
        dy = rng.standard_normal((N, Cout))
        return what, x, w, b, dy

    cases = [case("random", 5, 3, 4), case("one row", 1, 4, 2), case("repeated rows, square w", 4, 3, 3)]
    what, x, w, b, dy = cases[2]
    x[2] = x[0]
    return [Case(what, {"dy": dy, "x": x, "w": w, "b": b}) for what, x, w, b, dy in cases]


LINEAR_MISTAKES = (
    Mistake("db_not_summed",
            "your db is dy itself, one row per position: it is not summed over the rows.",
            "b is added to every row, y[n] = x[n] w + b, so every row's dy[n] reaches b: db = sum_n dy[n], "
            "of shape (Cout,) like b.",
            lambda dy, x, w, b: _linear_variant(dy, x, w, b, db_rows="none")),
    Mistake("db_averaged",
            "your db is the mean of dy over the rows; it is their sum.",
            "y[n] = x[n] w + b adds b to every row with weight 1, so db = sum_n dy[n]. If the loss is a "
            "mean, its 1/N is already inside dy.",
            lambda dy, x, w, b: _linear_variant(dy, x, w, b, db_rows="mean")),
    Mistake("dw_transposed",
            "your dw is transposed: dy^T x, shaped (Cout, Cin), instead of x^T dy.",
            "y[n, j] = sum_i x[n, i] w[i, j] + b[j], so dw[i, j] = sum_n x[n, i] dy[n, j]: dw = x^T dy, of "
            "shape (Cin, Cout) like w. (A gradient always has the shape of what it differentiates.)",
            lambda dy, x, w, b: _linear_variant(dy, x, w, b, dw_transposed=True)),
    Mistake("dw_averaged",
            "your dw is x^T dy / N: divided by the number of rows.",
            "dw = x^T dy = sum_n outer(x[n], dy[n]): each row adds its own contribution and nothing divides "
            "it. If the loss is a mean, its 1/N is already inside dy.",
            lambda dy, x, w, b: _linear_variant(dy, x, w, b, dw_averaged=True)),
)


# --------------------------------------------------------------------------------------------------
# layer norm: y = xhat * w + b, xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps)


def layernorm_reference(dy, x, w, b, eps):
    """(dx, dw, db) from minitodi.core.layers' layernorm_forward and layernorm_backward."""
    _, cache = layers.layernorm_forward(x, w, b, eps)
    return layers.layernorm_backward(dy, cache)


def _layernorm_variant(dy, x, w, b, eps, *, mean_term=True, variance_term=True, w_in_dxhat=True,
                       xhat_in_dw=True, ddof=0):
    """Layer norm's backward written out, with one of its terms dropped or changed: the known mistakes.

    dx = rstd (dxhat - mean(dxhat) - xhat sum(dxhat * xhat) / (C - ddof)), dxhat = dy * w; ddof = 1 is
    the backward of a layer norm that divides the variance by C - 1 (its forward changes too).
    """
    C = x.shape[-1]
    centred = x - x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt((centred * centred).sum(axis=-1, keepdims=True) / (C - ddof) + eps)
    xhat = centred * rstd
    dxhat = dy * w if w_in_dxhat else dy
    dx = dxhat.copy()
    if mean_term:
        dx -= dxhat.mean(axis=-1, keepdims=True)
    if variance_term:
        dx -= xhat * (dxhat * xhat).sum(axis=-1, keepdims=True) / (C - ddof)
    dx *= rstd
    w_input = xhat  # what w multiplies in the forward
    if not xhat_in_dw:
        w_input = x  # the mistake: dw computed against the raw input
    dw = (dy * w_input).sum(axis=0)
    db = dy.sum(axis=0)
    return dx, dw, db


def _layernorm_cases():
    """Random rows; a constant row (variance 0) with a large eps; rows with a large mean and spread."""
    rng = np.random.default_rng(8)

    def case(what, N, C, eps, loc=0.0, scale=1.0):
        x = loc + scale * rng.standard_normal((N, C))
        w = 1.0 + 0.3 * rng.standard_normal(C)
        b = 0.3 * rng.standard_normal(C)
        dy = rng.standard_normal((N, C))
        return Case(what, {"dy": dy, "x": x, "w": w, "b": b, "eps": eps})

    cases = [case("random", 4, 6, 1e-5), case("a constant row", 3, 5, 0.1),
             case("large mean and spread", 2, 8, 1e-5, loc=5.0, scale=10.0)]
    cases[1].inputs["x"][1] = 2.0
    return cases


NORM_W_FORGOTTEN = ("your dx was computed from dy, not from dxhat = dy * w.",
                    "y = xhat * w (+ b), so the gradient reaching xhat is dxhat = dy * w, elementwise; dx is "
                    "then computed from dxhat.")
NORM_DW_WITH_X = ("your dw is the sum over rows of dy * x; it is the sum of dy * xhat.",
                  "w multiplies the normalised xhat, not x: y = xhat * w (+ b), so dw = sum over rows of "
                  "dy * xhat.")
LAYERNORM_DX = ("dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat * xhat)), the means over the row, "
                "dxhat = dy * w.")

LAYERNORM_MISTAKES = (
    Mistake("normalisation_constant",
            "your dx is rstd * dy * w: the mean and rstd were treated as constants.",
            "mean and rstd depend on every x_j of the row: d xhat_i / d x_j = rstd (delta_ij - 1/C - "
            "xhat_i xhat_j / C). This gives " + LAYERNORM_DX,
            lambda dy, x, w, b, eps: _layernorm_variant(dy, x, w, b, eps, mean_term=False,
                                                        variance_term=False)),
    Mistake("mean_term_dropped",
            "your dx lacks the term -mean(dxhat): the derivative of the mean was dropped.",
            "x - mean(x) moves with every x_j: d(x_i - mean) / d x_j = delta_ij - 1/C, which contributes "
            "-rstd mean(dxhat). In full, " + LAYERNORM_DX,
            lambda dy, x, w, b, eps: _layernorm_variant(dy, x, w, b, eps, mean_term=False)),
    Mistake("variance_term_dropped",
            "your dx lacks the term -xhat mean(dxhat * xhat): the derivative of rstd was dropped.",
            "rstd = 1 / sqrt(var + eps) depends on every x_j: d rstd / d x_j = -rstd^3 (x_j - mean) / C, "
            "which contributes -rstd xhat mean(dxhat * xhat). In full, " + LAYERNORM_DX,
            lambda dy, x, w, b, eps: _layernorm_variant(dy, x, w, b, eps, variance_term=False)),
    Mistake("w_forgotten", NORM_W_FORGOTTEN[0], NORM_W_FORGOTTEN[1] + " " + LAYERNORM_DX,
            lambda dy, x, w, b, eps: _layernorm_variant(dy, x, w, b, eps, w_in_dxhat=False)),
    Mistake("dw_with_x", *NORM_DW_WITH_X,
            lambda dy, x, w, b, eps: _layernorm_variant(dy, x, w, b, eps, xhat_in_dw=False)),
    Mistake("unbiased_variance",
            "your answer uses the unbiased variance, divided by C - 1.",
            "Layer norm (PyTorch's included) divides by C: var = mean((x - mean(x))^2), NumPy's default "
            "ddof=0, not torch.var's default. The C appears twice: in rstd, and as the 1/C of the term "
            "xhat mean(dxhat * xhat).",
            lambda dy, x, w, b, eps: _layernorm_variant(dy, x, w, b, eps, ddof=1)),
)


# --------------------------------------------------------------------------------------------------
# GELU, GPT-2's tanh form: y = 0.5 x (1 + tanh(u)), u = k (x + a x^3)

GELU_K = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def gelu_reference(dy, x):
    """dx from minitodi.core.layers' gelu_forward and gelu_backward."""
    _, cache = layers.gelu_forward(x)
    return layers.gelu_backward(dy, cache)


def _gelu_variant(dy, x, *, x_dtanh_term=True, cubic_term=True, tanh_squared=True, times_dy=True):
    """GELU's derivative written out in its tanh form, with one part dropped or changed: the known mistakes.

    gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh(u)^2) du/dx, du/dx = k (1 + 3 a x^2); dx = dy gelu'(x).
    """
    tanh_u = np.tanh(GELU_K * (x + GELU_A * x**3))
    du_dx = GELU_K * (1.0 + 3.0 * GELU_A * x**2) if cubic_term else GELU_K * np.ones_like(x)
    dtanh = 1.0 - tanh_u**2 if tanh_squared else 1.0 - tanh_u
    local = 0.5 * (1.0 + tanh_u)
    if x_dtanh_term:
        local = local + 0.5 * x * dtanh * du_dx
    return dy * local if times_dy else local


def _gelu_exact(dy, x):
    """The derivative of the exact GELU, x Phi(x): Phi(x) + x phi(x) (close to the tanh form, not equal)."""
    phi_cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    phi_pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return dy * (phi_cdf + x * phi_pdf)


def _gelu_cases():
    """Random values; edge values (0, tiny, saturated at +-10); a vector of evenly spaced values."""
    rng = np.random.default_rng(9)
    x1 = 2.0 * rng.standard_normal((3, 5))
    x2 = np.array([[0.0, 1e-3, -1e-3, 0.5, -0.5, 3.0, -3.0, 10.0, -10.0]])
    x3 = np.linspace(-6.0, 6.0, 13)
    return [Case(what, {"dy": rng.standard_normal(x.shape), "x": x})
            for what, x in [("random", x1), ("edge values", x2), ("a vector from -6 to 6", x3)]]


GELU_DERIVATIVE = ("gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh(u)^2) k (1 + 3 a x^2), with "
                   "u = k (x + a x^3), k = sqrt(2/pi), a = 0.044715, and dx = dy * gelu'(x).")

GELU_MISTAKES = (
    Mistake("x_dtanh_term_missing",
            "your dx is dy * 0.5 (1 + tanh(u)): the term from differentiating tanh(u) is missing.",
            "y = 0.5 x (1 + tanh u) is a product of x and (1 + tanh u); the product rule gives two terms. "
            + GELU_DERIVATIVE,
            lambda dy, x: _gelu_variant(dy, x, x_dtanh_term=False)),
    Mistake("cubic_term_missing",
            "your du/dx is k: the derivative of the cubic term a x^3 is missing.",
            "u = k (x + a x^3), so du/dx = k (1 + 3 a x^2). " + GELU_DERIVATIVE,
            lambda dy, x: _gelu_variant(dy, x, cubic_term=False)),
    Mistake("tanh_derivative",
            "your derivative of tanh is 1 - tanh(u); it is 1 - tanh(u)^2.",
            "d tanh(u) / du = 1 - tanh(u)^2 (which is 1 / cosh(u)^2). " + GELU_DERIVATIVE,
            lambda dy, x: _gelu_variant(dy, x, tanh_squared=False)),
    Mistake("dy_not_multiplied",
            "your dx is gelu'(x) alone: it is not multiplied by the incoming gradient dy.",
            "The chain rule: dL/dx = dL/dy * dy/dx, elementwise. " + GELU_DERIVATIVE,
            lambda dy, x: _gelu_variant(dy, x, times_dy=False)),
    Mistake("exact_gelu",
            "your dx is the derivative of the exact GELU, x Phi(x), not of GPT-2's tanh approximation.",
            "GPT-2 uses y = 0.5 x (1 + tanh(u)), close to x Phi(x) but not equal (about 1e-3 apart); "
            "differentiate that one. " + GELU_DERIVATIVE,
            _gelu_exact),
)


# --------------------------------------------------------------------------------------------------
# cross-entropy: L = -(1/N) sum_n log q[n, t_n], q = softmax(logits)


def cross_entropy_reference(logits, targets):
    """dlogits from minitodi.core.layers' cross_entropy_forward and cross_entropy_backward (dL = 1)."""
    _, cache = layers.cross_entropy_forward(logits, targets)
    return layers.cross_entropy_backward(1.0, cache)


def _softmax_onehot(logits, targets):
    """(q, onehot(targets), N) of the cross-entropy."""
    q = np.exp(log_softmax(logits))
    onehot = np.zeros_like(logits)
    onehot[np.arange(len(targets)), targets] = 1.0
    return q, onehot, logits.shape[0]


def _cross_entropy_variant(logits, targets, *, mean=True, with_q=True, with_onehot=True, sign=1.0):
    """(q - onehot) / N written out, with one part dropped or changed: the known mistakes."""
    q, onehot, N = _softmax_onehot(logits, targets)
    dlogits = np.zeros_like(logits)
    if with_q:
        dlogits += q
    if with_onehot:
        dlogits -= onehot
    if mean:
        dlogits /= N
    return sign * dlogits


def _cross_entropy_cases():
    """Random rows; a single row; confident logits (x4) whose targets are all the same class."""
    rng = np.random.default_rng(10)
    logits1 = rng.standard_normal((5, 7))
    targets1 = rng.integers(0, 7, 5)
    logits2 = rng.standard_normal((1, 3))
    targets2 = np.array([1])
    logits3 = 4.0 * rng.standard_normal((6, 4))
    targets3 = np.full(6, 2)
    return [Case("random", {"logits": logits1, "targets": targets1}),
            Case("one row", {"logits": logits2, "targets": targets2}),
            Case("confident logits, one target class", {"logits": logits3, "targets": targets3})]


CROSS_ENTROPY_GRADIENT = "dlogits = (q - onehot(t)) / N, with q = softmax(logits) row by row."

CROSS_ENTROPY_MISTAKES = (
    Mistake("one_over_n_missing",
            "your dlogits is q - onehot(targets): the 1/N of the mean is missing.",
            "The loss is the mean over the N rows, L = -(1/N) sum_n log q[n, t_n], so every row's gradient "
            "carries 1/N: " + CROSS_ENTROPY_GRADIENT,
            lambda logits, targets: _cross_entropy_variant(logits, targets, mean=False)),
    Mistake("one_hot_not_subtracted",
            "your dlogits is q / N: the one-hot of the targets is not subtracted.",
            "-log q[n, t] = -logits[n, t] + log sum_v exp(logits[n, v]): the first term gives -1 at the "
            "target, the second gives q. So " + CROSS_ENTROPY_GRADIENT,
            lambda logits, targets: _cross_entropy_variant(logits, targets, with_onehot=False)),
    Mistake("wrong_sign",
            "your dlogits has the wrong sign: (onehot(targets) - q) / N.",
            "A check of the sign: raising the target's logit lowers the loss, so its derivative, "
            "(q_t - 1) / N, is negative. " + CROSS_ENTROPY_GRADIENT,
            lambda logits, targets: _cross_entropy_variant(logits, targets, sign=-1.0)),
    Mistake("softmax_forgotten",
            "your dlogits is -onehot(targets) / N: the softmax's normalisation is missing.",
            "log q[n, t] = logits[n, t] - log sum_v exp(logits[n, v]), and the log-sum-exp depends on every "
            "logit of the row, with derivative q. So " + CROSS_ENTROPY_GRADIENT,
            lambda logits, targets: _cross_entropy_variant(logits, targets, with_q=False)),
)


# --------------------------------------------------------------------------------------------------
# attention, one causal head: att = softmax(q k^T / sqrt(hs) + mask), y = att v


def attention_reference(dy, q, k, v):
    """(dq, dk, dv) from minitodi.core.layers' grouped attention with one head, on (1, T, hs)."""
    _, cache = layers.grouped_attention_forward(q[None], k[None], v[None], 1, 1)
    dq, dk, dv = layers.grouped_attention_backward(dy[None], cache)
    return dq[0], dk[0], dv[0]


def _attention_variant(dy, q, k, v, *, scale_in_backward=True, mask_in_backward=True, softmax_sum=True,
                       dk_transposed=True, dv_transposed=True):
    """One causal head's backward written out, with one part dropped or changed: the known mistakes.

    datt = dy v^T, dpre = att * (datt - rowsum(datt * att)), dq = dpre k / sqrt(hs), dk = dpre^T q / sqrt(hs),
    dv = att^T dy, with att the forward's masked softmax (recomputed here).
    """
    T, hs = q.shape
    scale = 1.0 / math.sqrt(hs)
    pre = q @ k.T * scale  # (T, T)
    if mask_in_backward:
        future = np.arange(T)[None, :] > np.arange(T)[:, None]  # key j after query i
        pre = np.where(future, -np.inf, pre)
    att = np.exp(log_softmax(pre))
    dv = att.T @ dy if dv_transposed else att @ dy
    datt = dy @ v.T
    if softmax_sum:
        dpre = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    else:
        dpre = att * datt
    if scale_in_backward:
        dpre = dpre * scale
    dq = dpre @ k
    dk = dpre.T @ q if dk_transposed else dpre @ q
    return dq, dk, dv


def _attention_cases():
    """Random; a single position (it attends to itself only); keys all equal (uniform attention)."""
    rng = np.random.default_rng(11)

    def case(what, T, hs):
        q, k, v, dy = rng.standard_normal((4, T, hs))
        return Case(what, {"dy": dy, "q": q, "k": k, "v": v})

    cases = [case("random", 5, 4), case("one position", 1, 3), case("equal keys", 6, 8)]
    cases[2].inputs["k"][:] = cases[2].inputs["k"][0]
    return cases


ATTENTION_GRADIENTS = ("With datt = dy v^T and dpre = att * (datt - rowsum(datt * att)): "
                       "dq = dpre k / sqrt(hs), dk = dpre^T q / sqrt(hs), dv = att^T dy.")

ATTENTION_MISTAKES = (
    Mistake("scale_forgotten",
            "your dq and dk lack the scale 1/sqrt(hs).",
            "The scores are pre = q k^T / sqrt(hs), so the scale multiplies both of their gradients. "
            + ATTENTION_GRADIENTS,
            lambda dy, q, k, v: _attention_variant(dy, q, k, v, scale_in_backward=False)),
    Mistake("mask_forgotten",
            "your gradients come from an attention without the causal mask: recomputed in the backward, "
            "att lets a position attend to later ones.",
            "The forward's att has att[i, j] = 0 for j > i (the scores there are -inf before the softmax). "
            "Use that same masked att in the backward; its zeros keep every future entry out of dq, dk and "
            "dv. " + ATTENTION_GRADIENTS,
            lambda dy, q, k, v: _attention_variant(dy, q, k, v, mask_in_backward=False)),
    Mistake("softmax_sum_dropped",
            "your dpre is att * datt: the softmax's -rowsum term is missing.",
            "Each row's softmax couples its entries: d att_j / d pre_i = att_j (delta_ij - att_i), so "
            "dpre_i = att_i (datt_i - sum_j datt_j att_j), a sum over the row. " + ATTENTION_GRADIENTS,
            lambda dy, q, k, v: _attention_variant(dy, q, k, v, softmax_sum=False)),
    Mistake("dk_not_transposed",
            "your dk is dpre q / sqrt(hs); it is dpre^T q / sqrt(hs).",
            "pre[i, j] = q[i] . k[j] / sqrt(hs): key j is read by every query i, so dk[j] = sum_i dpre[i, j] "
            "q[i] / sqrt(hs), that is dk = dpre^T q / sqrt(hs). (dpre is T x T, square, so the shapes "
            "cannot catch a missing transpose.)",
            lambda dy, q, k, v: _attention_variant(dy, q, k, v, dk_transposed=False)),
    Mistake("dv_not_transposed",
            "your dv is att dy; it is att^T dy.",
            "y[i] = sum_j att[i, j] v[j]: value j reaches every query i, so dv[j] = sum_i att[i, j] dy[i], "
            "that is dv = att^T dy. (att is T x T, square, so the shapes cannot catch a missing transpose.)",
            lambda dy, q, k, v: _attention_variant(dy, q, k, v, dv_transposed=False)),
)


# --------------------------------------------------------------------------------------------------
# RMSNorm: y = xhat * w, xhat = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps)


def rmsnorm_reference(dy, x, w, eps):
    """(dx, dw) from minitodi.core.layers' rmsnorm_forward and rmsnorm_backward."""
    _, cache = layers.rmsnorm_forward(x, w, eps)
    return layers.rmsnorm_backward(dy, cache)


def _rmsnorm_variant(dy, x, w, eps, *, xhat_term=True, w_in_dxhat=True, xhat_in_dw=True, mean_term=False):
    """RMSNorm's backward written out, dx = rstd (dxhat - xhat mean(dxhat * xhat)), with one part changed.

    ``mean_term`` adds layer norm's -mean(dxhat), which RMSNorm does not have.
    """
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    dxhat = dy * w if w_in_dxhat else dy
    dx = dxhat.copy()
    if mean_term:
        dx -= dxhat.mean(axis=-1, keepdims=True)
    if xhat_term:
        dx -= xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    dx *= rstd
    w_input = xhat  # what w multiplies in the forward
    if not xhat_in_dw:
        w_input = x  # the mistake: dw computed against the raw input
    dw = (dy * w_input).sum(axis=0)
    return dx, dw


def _rmsnorm_cases():
    """Random rows; a row of zeros with a large eps; large values."""
    rng = np.random.default_rng(12)

    def case(what, N, C, eps, scale=1.0):
        x = scale * rng.standard_normal((N, C))
        w = 1.0 + 0.3 * rng.standard_normal(C)
        dy = rng.standard_normal((N, C))
        return Case(what, {"dy": dy, "x": x, "w": w, "eps": eps})

    cases = [case("random", 4, 6, 1e-6), case("a row of zeros", 3, 5, 0.1),
             case("large values", 2, 8, 1e-6, scale=10.0)]
    cases[1].inputs["x"][1] = 0.0
    return cases


RMSNORM_DX = "dx = rstd (dxhat - xhat mean(dxhat * xhat)), the mean over the row, dxhat = dy * w."

RMSNORM_MISTAKES = (
    Mistake("xhat_term_dropped",
            "your dx is rstd * dy * w: the term from rstd's dependence on x is missing.",
            "rstd = 1 / sqrt(mean(x^2) + eps) depends on every x_j of the row: d rstd / d x_j = "
            "-rstd^3 x_j / C, so d xhat_i / d x_j = rstd (delta_ij - xhat_i xhat_j / C) and " + RMSNORM_DX,
            lambda dy, x, w, eps: _rmsnorm_variant(dy, x, w, eps, xhat_term=False)),
    Mistake("w_forgotten", NORM_W_FORGOTTEN[0], NORM_W_FORGOTTEN[1] + " " + RMSNORM_DX,
            lambda dy, x, w, eps: _rmsnorm_variant(dy, x, w, eps, w_in_dxhat=False)),
    Mistake("dw_with_x", *NORM_DW_WITH_X,
            lambda dy, x, w, eps: _rmsnorm_variant(dy, x, w, eps, xhat_in_dw=False)),
    Mistake("mean_subtracted",
            "your dx subtracts mean(dxhat), as layer norm's does; RMSNorm has no mean to differentiate.",
            "RMSNorm divides by the root mean square without centring x first, so layer norm's -mean(dxhat) "
            "term does not appear: " + RMSNORM_DX,
            lambda dy, x, w, eps: _rmsnorm_variant(dy, x, w, eps, mean_term=True)),
)


# --------------------------------------------------------------------------------------------------
# the exercises

_NORM_OUTPUTS = (Output("dx", "(N, C), like x"), Output("dw", "(C,), like w"))

EXERCISES = {e.name: e for e in (
    Exercise("fkl", "fkl(s, t) -> (D, dD_ds)", DIVERGENCE_OUTPUTS, fkl_reference, _loss_cases,
             FKL_MISTAKES),
    Exercise("rkl", "rkl(s, t) -> (D, dD_ds)", DIVERGENCE_OUTPUTS, rkl_reference, _loss_cases,
             RKL_MISTAKES),
    Exercise("todi", "todi(s, t, beta) -> (D, dD_ds)", DIVERGENCE_OUTPUTS, todi_reference,
             lambda: _loss_cases(betas=(1.0, 0.5, 2.0)), TODI_MISTAKES),
    Exercise("linear_backward", "linear_backward(dy, x, w, b) -> (dx, dw, db)",
             (Output("dx", "(N, Cin), like x"), Output("dw", "(Cin, Cout), like w"),
              Output("db", "(Cout,), like b")),
             linear_reference, _linear_cases, LINEAR_MISTAKES),
    Exercise("layernorm_backward", "layernorm_backward(dy, x, w, b, eps) -> (dx, dw, db)",
             (*_NORM_OUTPUTS, Output("db", "(C,), like b")),
             layernorm_reference, _layernorm_cases, LAYERNORM_MISTAKES),
    Exercise("gelu_backward", "gelu_backward(dy, x) -> dx", (Output("dx", "like x"),),
             gelu_reference, _gelu_cases, GELU_MISTAKES),
    Exercise("cross_entropy_backward", "cross_entropy_backward(logits, targets) -> dlogits",
             (Output("dlogits", "(N, V), like logits"),),
             cross_entropy_reference, _cross_entropy_cases, CROSS_ENTROPY_MISTAKES),
    Exercise("attention_backward", "attention_backward(dy, q, k, v) -> (dq, dk, dv)",
             (Output("dq", "(T, hs), like q"), Output("dk", "(T, hs), like k"),
              Output("dv", "(T, hs), like v")),
             attention_reference, _attention_cases, ATTENTION_MISTAKES),
    Exercise("rmsnorm_backward", "rmsnorm_backward(dy, x, w, eps) -> (dx, dw)", _NORM_OUTPUTS,
             rmsnorm_reference, _rmsnorm_cases, RMSNORM_MISTAKES),
)}
"""Every exercise by name, in the order of notebook 06."""


# --------------------------------------------------------------------------------------------------
# grading


class _NotGradable(Exception):
    """The learner's function could not be graded: it raised, or returned something that is not an answer."""

    def __init__(self, message, output=None):
        super().__init__(message)
        self.output = output


@dataclass
class _Worst:
    """Where one output's largest relative error is, over every case."""

    error: float
    case: int  # index into the cases
    entry: tuple
    answer: float
    expected: float
    n_wrong: int  # entries above TOL, over every case
    n_entries: int


def check(name, fn) -> Report:
    """Run the learner's ``fn`` on exercise ``name``'s cases and grade it; returns a :class:`Report`.

    ``fn`` is called positionally, with the exercise's signature (:data:`EXERCISES`). Whatever ``fn`` does,
    the outcome is a report (an exception raised by ``fn`` is described in it); only an unknown ``name``
    or an ``fn`` that is not callable raise.
    """
    if name not in EXERCISES:
        raise ValueError(f"unknown exercise {name!r}; the exercises are: {', '.join(EXERCISES)}")
    if not callable(fn):
        raise TypeError(f"check({name!r}, fn): fn must be a function, got {type(fn).__name__}")
    exercise = EXERCISES[name]
    cases = exercise.cases()
    expected = [_outputs_of(exercise.reference, case, len(exercise.outputs)) for case in cases]
    try:
        answers = [_learner_outputs(exercise, fn, case, number) for number, case in enumerate(cases, 1)]
    except _NotGradable as problem:
        return Report(name, False, str(problem), output=problem.output)
    return _grade(exercise, cases, expected, answers)


def _outputs_of(function, case, n_outputs):
    """A reference's or a mistake's outputs on ``case``, always as a tuple."""
    result = function(*case.arguments())
    if n_outputs == 1:
        return (result,)
    return tuple(result)


def _learner_outputs(exercise, fn, case, number):
    """The learner's outputs on one case, a tuple of float64 arrays; :class:`_NotGradable` if none."""
    try:
        result = fn(*case.arguments())
    except NotImplementedError:
        raise _NotGradable("not implemented yet: the function raises NotImplementedError. Write it, then run "
                           "the check again.") from None
    except Exception as error:
        raise _NotGradable(_describe_exception(error, case.label(number))) from None
    names = exercise.output_names
    if result is None:
        raise _NotGradable("your function returned None: is a `return` missing?")
    if len(names) == 1:
        if isinstance(result, tuple):
            raise _NotGradable(f"your function returned a tuple of {len(result)}; it should return one "
                               f"array, {names[0]}.")
        items = (result,)
    else:
        expected = f"a tuple of {len(names)}, ({', '.join(names)})"
        if not isinstance(result, (tuple, list)):
            raise _NotGradable(f"your function returned {_kind(result)}; it should return {expected}.")
        if len(result) != len(names):
            raise _NotGradable(f"your function returned {len(result)} values; it should return {expected}.")
        items = result
    return tuple(_as_float64(name, item, case.label(number)) for name, item in zip(names, items))


def _kind(value):
    """'None', 'a float', 'a list': what a value is, in words."""
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


def _as_float64(name, item, where):
    """One output as a finite float64 array, or :class:`_NotGradable` saying why it is not one."""
    try:
        array = np.asarray(item)
    except Exception:  # a ragged list, an object NumPy cannot read
        raise _NotGradable(f"your {name} is {_kind(item)} that is not an array of numbers.", name) from None
    if array.dtype.kind not in "biufc":
        raise _NotGradable(f"your {name} is {_kind(item)}, not an array of numbers (dtype {array.dtype}).",
                           name)
    if array.dtype != np.float64:
        raise _NotGradable(f"your {name} has dtype {array.dtype}; it should be float64. The check compares "
                           "at float64 rounding: keep every step in float64.", name)
    bad = ~np.isfinite(array)
    if bad.any():
        entry = tuple(int(i) for i in np.argwhere(bad)[0])
        value = array[entry]
        kind = "NaN" if np.isnan(value) else f"{value}"
        raise _NotGradable(f"your {name} contains {kind}, first at {name}{list(entry)} on {where}. A log of "
                           "0, a division by 0, or an exp that overflowed (shift by the row maximum first)?",
                           name)
    return array


def _describe_exception(error, where):
    """'your function raised ValueError: ... on case 1 (...), at line 3 in fkl: `...`'."""
    message = str(error)
    text = f"your function raised {type(error).__name__}"
    if message:
        text += f": {message}"
    text += f" — on {where}"
    numpy_dir = os.path.dirname(np.__file__)
    frames = [f for f in traceback.extract_tb(error.__traceback__)  # the learner's own frames, innermost last
              if f.filename != __file__ and not f.filename.startswith(numpy_dir)]
    if frames:
        frame = frames[-1]
        text += f", at line {frame.lineno} in {frame.name}"
        if frame.line:
            text += f": {frame.line.strip()}"
    return text + "."


def _floors(expected):
    """Per output, the denominator's floor: FLOOR times its largest |entry| over the cases (see the top)."""
    floors = []
    for i in range(len(expected[0])):
        scale = max(float(np.abs(outputs[i]).max(initial=0.0)) for outputs in expected)
        floors.append(max(FLOOR * scale, 1e-300))
    return floors


def _relative_errors(answer, expected, floor):
    """|a - e| / max(|a| + |e|, floor), entry by entry."""
    return np.abs(answer - expected) / np.maximum(np.abs(answer) + np.abs(expected), floor)


def _agree(answers, wanted, i, floor):
    """Whether output ``i`` of ``answers`` has ``wanted``'s shape and agrees within TOL, on every case."""
    for got, want in zip(answers, wanted):
        a = np.asarray(got[i])
        e = np.asarray(want[i])
        if a.shape != e.shape or _relative_errors(a, e, floor).max(initial=0.0) > TOL:
            return False
    return True


def _worst(answers, expected, i, floor):
    """Output ``i``'s largest relative error over the cases, a :class:`_Worst`; None where a shape differs."""
    worst = None
    n_wrong = 0
    n_entries = 0
    for case, (got, want) in enumerate(zip(answers, expected)):
        if got[i].shape != want[i].shape:
            return None
        errors = _relative_errors(got[i], want[i], floor)
        n_wrong += int((errors > TOL).sum())
        n_entries += errors.size
        if errors.size and (worst is None or errors.max() > worst.error):
            entry = np.unravel_index(int(np.argmax(errors)), errors.shape)
            entry = tuple(int(j) for j in entry)
            worst = _Worst(float(errors[entry]), case, entry, float(got[i][entry]), float(want[i][entry]),
                           n_wrong=0, n_entries=0)  # the counts are filled in below, over every case
    if worst is not None:
        worst.n_wrong = n_wrong
        worst.n_entries = n_entries
    return worst


def _grade(exercise, cases, expected, answers):
    """The report on answers that are float64 arrays: passed, or the known mistakes, or the largest errors."""
    names = exercise.output_names
    floors = _floors(expected)
    worst = [_worst(answers, expected, i, floor) for i, floor in enumerate(floors)]
    errors = [math.inf if w is None else w.error for w in worst]
    largest = int(np.argmax(errors))
    summary = {"max_error": errors[largest], "output": names[largest]}
    wrong = [i for i in range(len(names)) if errors[i] > TOL]
    if not wrong:
        verb = "matches" if len(names) == 1 else "match"
        diagnosis = (f"{_listing(names)} {verb} the reference on {len(cases)} cases (largest relative error "
                     f"{errors[largest]:.1e}).")
        return Report(exercise.name, True, diagnosis, **summary)
    matched = _matching_mistakes(exercise, cases, expected, answers, floors)
    findings = []  # (heading, details or None): a known mistake and its explanation, or an error's place
    explained = set()
    for mistake, changed in matched:
        findings.append((mistake.title, mistake.explanation))
        explained |= changed
    for i in wrong:
        if i not in explained:
            where = _what_is_wrong(exercise.outputs[i], i, cases, answers, expected, worst[i])
            findings.append((where, None))
    paragraphs = []
    for number, (heading, details) in enumerate(findings):
        if number > 0:  # the first follows "name: not yet — " in str(report); the others start a line
            heading = heading[0].upper() + heading[1:]
        paragraphs.append(heading)
        if details:
            paragraphs.append(details)
    right = [names[i] for i in range(len(names)) if i not in wrong]
    if right:
        paragraphs.append(f"({_listing(right)} {'is' if len(right) == 1 else 'are'} right.)")
    keys = tuple(mistake.key for mistake, _ in matched)
    return Report(exercise.name, False, "\n".join(paragraphs), mistakes=keys, **summary)


def _matching_mistakes(exercise, cases, expected, answers, floors):
    """The known mistakes the answers match, each with the set of outputs it changes.

    A mistake matches when the answers agree with it on every output it changes (those where it differs
    from the reference on some case). Of two matches, one whose outputs are a strict subset of the other's
    is left out: the most complete explanation is given.
    """
    n_outputs = len(exercise.outputs)
    found = []
    for mistake in exercise.mistakes:
        outputs = [_outputs_of(mistake.answer, case, n_outputs) for case in cases]
        changed = {i for i in range(n_outputs) if not _agree(outputs, expected, i, floors[i])}
        if changed and all(_agree(answers, outputs, i, floors[i]) for i in changed):
            found.append((mistake, changed))
    return [(mistake, changed) for mistake, changed in found
            if not any(changed < other for _, other in found)]


def _what_is_wrong(output, i, cases, answers, expected, worst):
    """A wrong output that no known mistake explains: its wrong shape, or where its largest error is."""
    name = output.name
    if worst is None:
        for number, (got, want) in enumerate(zip(answers, expected), 1):
            if got[i].shape != want[i].shape:
                where = cases[number - 1].label(number)
                return (f"your {name} has shape {got[i].shape} on {where}; it should be {want[i].shape}: "
                        f"{output.shape}.")
    where = cases[worst.case].label(worst.case + 1)
    text = (f"your {name} is not right yet: the largest error is at {name}{list(worst.entry)} on {where}: "
            f"you have {worst.answer:.6g}, expected {worst.expected:.6g} (relative error {worst.error:.1e}); "
            f"{worst.n_wrong} of its {worst.n_entries} entries over the cases are off.")
    return text + _pattern(name, [a[i] for a in answers], [e[i] for e in expected])


def _pattern(name, answers, expected):
    """A hint where the wrong output has a simple form: zero everywhere, or a factor times the expected.

    A factor that differs from case to case points at a size (1/N for 1/V, say): the factors are listed.
    """
    if not any(answer.any() for answer in answers):
        return f" Your {name} is zero everywhere: is a term missing, or a placeholder returned?"
    factors = [_factor(answer, want) for answer, want in zip(answers, expected)]
    if None in factors:
        return ""
    if np.allclose(factors, factors[0], rtol=1e-8, atol=0.0):
        hint = f" On every entry it is {factors[0]:.6g} times the expected value"
        if abs(factors[0] + 1.0) < 1e-8:
            hint += ": the sign is flipped"
        return hint + "."
    per_case = ", ".join(f"{factor:.4g} in case {number}" for number, factor in enumerate(factors, 1))
    return (f" In each case it is the expected value times a factor ({per_case}): a size such as N, V or C "
            "in the wrong place?")


def _factor(answer, expected):
    """c where ``answer`` = c ``expected`` on every entry (to rounding), else None."""
    if not expected.any():
        return None
    c = float(answer.ravel() @ expected.ravel() / (expected.ravel() @ expected.ravel()))
    if np.allclose(answer, c * expected, rtol=1e-8, atol=1e-8 * np.abs(answer).max()):
        return c
    return None


def _listing(names):
    """'dx', 'dx and dw', 'dx, dw and db'."""
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]
