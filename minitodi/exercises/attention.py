"""Causal attention, one head: att = softmax(q k^T / sqrt(hs) + mask), y = att v.

    attention_backward(dy, q, k, v) -> (dq, dk, dv)        q, k, v, dy (T, hs)

The reference is minitodi.core.layers' grouped attention with one query head and one key/value head.
Every mistake is the backward written out with one thing wrong: the scale, the mask, the softmax's
Jacobian, a transpose.
"""

import math

import numpy as np

from ..core import layers
from ..core.losses import log_softmax
from .grading import Case, Exercise, Mistake, Output


def attention_reference(dy, q, k, v):
    """(dq, dk, dv) from minitodi.core.layers' grouped attention with one head, on (1, T, hs)."""
    _, cache = layers.grouped_attention_forward(q[None], k[None], v[None], 1, 1)
    dq, dk, dv = layers.grouped_attention_backward(dy[None], cache)
    return dq[0], dk[0], dv[0]


# ---- pieces the mistakes are written with ---------------------------------------------------------


def _masked_softmax(pre, hidden):
    """att: the softmax of each row of ``pre`` with the entries where ``hidden`` is True set to -inf."""
    return np.exp(log_softmax(np.where(hidden, -np.inf, pre)))


def _future(T, offset=0):
    """(T, T) True where key j is after query i + offset: the causal mask (offset 0) or a shifted one."""
    return np.arange(T)[None, :] > np.arange(T)[:, None] + offset


def _softmax_backward(datt, att):
    """dpre = att * (datt - rowsum(datt * att)): the softmax's Jacobian, row by row."""
    return att * (datt - (datt * att).sum(axis=-1, keepdims=True))


def _from_att(dy, q, k, v, att, scale):
    """(dq, dk, dv) given the attention matrix the forward used (or a mistaken one)."""
    dpre = _softmax_backward(dy @ v.T, att) * scale
    return dpre @ k, dpre.T @ q, att.T @ dy


def _scale(q):
    return 1.0 / math.sqrt(q.shape[-1])


# ---- the mistakes ---------------------------------------------------------------------------------


def _scale_forgotten(dy, q, k, v):
    att = _masked_softmax(q @ k.T * _scale(q), _future(len(q)))
    return _from_att(dy, q, k, v, att, 1.0)


def _scale_twice(dy, q, k, v):
    att = _masked_softmax(q @ k.T * _scale(q), _future(len(q)))
    return _from_att(dy, q, k, v, att, _scale(q) ** 2)


def _mask_forgotten(dy, q, k, v):
    att = _masked_softmax(q @ k.T * _scale(q), np.zeros((len(q), len(q)), dtype=bool))
    return _from_att(dy, q, k, v, att, _scale(q))


def _mask_sees_next(dy, q, k, v):
    att = _masked_softmax(q @ k.T * _scale(q), _future(len(q), offset=1))
    return _from_att(dy, q, k, v, att, _scale(q))


def _mask_hides_itself(dy, q, k, v):
    """The mask j >= i, with a large finite number for -inf as many write it.

    The first query, which then sees nothing, attends to every position evenly (with -inf it would be
    NaN, see NAN_HINT).
    """
    pre = np.where(_future(len(q), offset=-1), -1e9, q @ k.T * _scale(q))
    att = np.exp(log_softmax(pre))
    return _from_att(dy, q, k, v, att, _scale(q))


def _softmax_sum_dropped(dy, q, k, v):
    att = _masked_softmax(q @ k.T * _scale(q), _future(len(q)))
    dpre = att * (dy @ v.T) * _scale(q)
    return dpre @ k, dpre.T @ q, att.T @ dy


def _dk_not_transposed(dy, q, k, v):
    dq, _, dv = attention_reference(dy, q, k, v)
    att = _masked_softmax(q @ k.T * _scale(q), _future(len(q)))
    dpre = _softmax_backward(dy @ v.T, att) * _scale(q)
    return dq, dpre @ q, dv


def _dv_not_transposed(dy, q, k, v):
    dq, dk, _ = attention_reference(dy, q, k, v)
    att = _masked_softmax(q @ k.T * _scale(q), _future(len(q)))
    return dq, dk, att @ dy


def _attention_cases():
    """Random; a single position (it attends to itself only); keys all equal (uniform attention)."""
    rng = np.random.default_rng(11)

    def case(what, T, hs):
        q, k, v, dy = rng.standard_normal((4, T, hs))
        return Case(what, {"dy": dy, "q": q, "k": k, "v": v})

    cases = [case("random", 5, 4), case("one position", 1, 3), case("equal keys", 6, 8)]
    cases[2].inputs["k"][:] = cases[2].inputs["k"][0]
    return cases


GRADIENTS = ("With datt = dy v^T and dpre = att * (datt - rowsum(datt * att)): "
             "dq = dpre k / sqrt(hs), dk = dpre^T q / sqrt(hs), dv = att^T dy.")
MASK = ("Query i attends to keys j <= i, itself included: the scores are set to -inf where j > i, and "
        "nowhere else, before the softmax. ")

NAN_HINT = ("In attention, a row of scores that is -inf everywhere gives NaN: does your mask hide the "
            "diagonal too (j >= i instead of j > i)? Query i attends to itself. Otherwise: a log of 0, "
            "or an exp that overflowed (shift by the row maximum first)?")

ATTENTION_MISTAKES = (
    Mistake("scale_forgotten",
            "your dq and dk lack the scale 1/sqrt(hs).",
            "The scores are pre = q k^T / sqrt(hs), so the scale multiplies both of their gradients. "
            + GRADIENTS,
            _scale_forgotten),
    Mistake("scale_twice",
            "your dq and dk are divided by hs: the scale 1/sqrt(hs) was applied twice.",
            "The scale enters once: pre = q k^T / sqrt(hs), so dq = dpre k / sqrt(hs) and dk = dpre^T q / "
            "sqrt(hs). Multiply either dpre or the products by it, not both. " + GRADIENTS,
            _scale_twice),
    Mistake("mask_forgotten",
            "your gradients come from an attention without the causal mask: recomputed in the backward, "
            "att lets a position attend to later ones.",
            "The forward's att has att[i, j] = 0 for j > i (the scores there are -inf before the softmax). "
            "Use that same masked att in the backward; its zeros keep every future entry out of dq, dk and "
            "dv. " + GRADIENTS,
            _mask_forgotten),
    Mistake("mask_sees_next",
            "your causal mask is off by one: each query also attends to the next position (j <= i + 1).",
            MASK + "np.triu(ones, k=1) marks exactly the entries to hide; k=2 leaves the next one visible. "
            + GRADIENTS,
            _mask_sees_next),
    Mistake("mask_hides_itself",
            "your causal mask is off by one: it hides the diagonal, so no query attends to itself (j < i).",
            MASK + "np.triu(ones, k=1) marks exactly the entries to hide; k=0 hides the diagonal as well, "
            "and the first query is left with nothing to attend to. " + GRADIENTS,
            _mask_hides_itself),
    Mistake("softmax_sum_dropped",
            "your dpre is att * datt: the softmax's -rowsum term is missing.",
            "Each row's softmax couples its entries: d att_j / d pre_i = att_j (delta_ij - att_i), so "
            "dpre_i = att_i (datt_i - sum_j datt_j att_j), a sum over the row. " + GRADIENTS,
            _softmax_sum_dropped),
    Mistake("dk_not_transposed",
            "your dk is dpre q / sqrt(hs); it is dpre^T q / sqrt(hs).",
            "pre[i, j] = q[i] . k[j] / sqrt(hs): key j is read by every query i, so dk[j] = sum_i dpre[i, j] "
            "q[i] / sqrt(hs), that is dk = dpre^T q / sqrt(hs). (dpre is T x T, square, so the shapes "
            "cannot catch a missing transpose.)",
            _dk_not_transposed),
    Mistake("dv_not_transposed",
            "your dv is att dy; it is att^T dy.",
            "y[i] = sum_j att[i, j] v[j]: value j reaches every query i, so dv[j] = sum_i att[i, j] dy[i], "
            "that is dv = att^T dy. (att is T x T, square, so the shapes cannot catch a missing transpose.)",
            _dv_not_transposed),
)

ATTENTION = Exercise("attention_backward", "attention_backward(dy, q, k, v) -> (dq, dk, dv)",
                     (Output("dq", "(T, hs), like q"), Output("dk", "(T, hs), like k"),
                      Output("dv", "(T, hs), like v")),
                     attention_reference, _attention_cases, ATTENTION_MISTAKES, nan_hint=NAN_HINT)
