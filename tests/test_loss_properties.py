"""Properties every divergence must have, on random shapes, scales, temperatures, masks and -inf patterns.

Tolerances are multiples of the dtype's machine epsilon times the size of what is rounded: with
R = max |log q - log p| over entries where both are finite, a gradient entry is at most about
(1 + R) / (N temperature) (g_v is -p_v, q_v (r_v + 1), or a mix; N counted positions), so
``natural = (1 + R) / (N temperature)`` is the scale gradient errors are measured against.
"""

import math

import numpy as np
import pytest
from helpers import reference_log_softmax
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from minitodi.core.losses import LOSSES, InfiniteDivergenceError

SETTINGS = settings(max_examples=30, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
INFINITE_WHEN_TEACHER_HAS_ZEROS = {"rkl", "todi", "akl"}  # the student keeps mass there: D = +inf
BOUND = {"jsd": math.log(2.0), "tvd": 1.0}
OPTIONS = {
    "todi": st.fixed_dictionaries({"beta": st.sampled_from([0.0, 0.5, 1.0, 4.0]),
                                   "detach": st.booleans()}),
    "gjsd": st.fixed_dictionaries({"beta": st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])}),
    "sfkl": st.fixed_dictionaries({"lam": st.sampled_from([0.05, 0.1, 0.5, 0.9])}),
    "srkl": st.fixed_dictionaries({"lam": st.sampled_from([0.05, 0.1, 0.5, 0.9])}),
    "akl": st.fixed_dictionaries({"mu": st.sampled_from([0.0, 0.3, 0.5, 1.0])}),
}


@st.composite
def cases(draw, teacher_zeros=False):
    """(name, options, student, teacher, mask, temperature): logits (B, T, V) or (positions, V)."""
    name = draw(st.sampled_from(sorted(LOSSES)))
    options = draw(OPTIONS.get(name, st.just({})))
    shape = draw(st.sampled_from([(1, 1, 1), (2, 3, 2), (3, 5), (2, 4, 17), (1, 64), (3, 2, 40)]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = draw(st.sampled_from([1e-3, 0.3, 1.0, 4.0, 30.0]))
    temperature = draw(st.sampled_from([0.5, 1.0, 2.0, 8.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = (scale * rng.standard_normal(shape)).astype(dtype)
    t = (scale * rng.standard_normal(shape)).astype(dtype)
    V = shape[-1]
    if V > 1 and draw(st.booleans()):  # entries forbidden to both (at most V - 1 of them)
        banned = rng.random(V) < 0.3
        banned[rng.integers(V)] = False
        s[..., banned] = -np.inf
        t[..., banned] = -np.inf
    if teacher_zeros and V > 1:  # the teacher alone gives an entry probability 0
        t[..., rng.integers(V)] = -np.inf
        t[..., np.isfinite(s[(0,) * (s.ndim - 1)]).argmax()] = 0.0  # keep a finite teacher entry
    mask = rng.random(shape[:-1]) < 0.7
    mask.flat[rng.integers(mask.size)] = True
    return name, options, s, t, mask, temperature


def _natural(s, t, mask, temperature):
    lq = reference_log_softmax(s.astype(np.float64) / temperature)
    lp = reference_log_softmax(t.astype(np.float64) / temperature)
    both = np.isfinite(lq) & np.isfinite(lp)
    r = np.abs(lq[both] - lp[both]).max()
    return (1 + r) / (mask.sum() * temperature)


def _infinite_when_teacher_has_zeros(name, options):
    """Whether D is +inf where the teacher has a zero that the student does not (gjsd at beta 1 is RKL)."""
    if name == "gjsd":
        return options.get("beta", 0.5) == 1.0
    return name in INFINITE_WHEN_TEACHER_HAS_ZEROS


def _bound(name, options):
    """The largest value the divergence can take: log 2 (JSD), 1 (TVD), the entropy of beta (GJSD)."""
    if name == "gjsd":
        beta = options.get("beta", 0.5)
        if 0 < beta < 1:
            return -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
        return math.inf  # the KL ends
    return BOUND.get(name, math.inf)


def _eps(x):
    return float(np.finfo(x.dtype).eps)


@SETTINGS
@given(cases(teacher_zeros=True))
def test_value_is_finite_nonnegative_and_bounded_or_infinite_is_said(case):
    name, options, s, t, mask, temperature = case
    teacher_zero_counted = bool((np.isneginf(t) & np.isfinite(s)).any(axis=-1)[mask].any())
    if _infinite_when_teacher_has_zeros(name, options) and teacher_zero_counted:
        with pytest.raises(InfiniteDivergenceError, match=f"{name} is infinite at position"):
            LOSSES[name](s, t, mask, temperature=temperature, **options)
        return
    value, grad = LOSSES[name](s, t, mask, temperature=temperature, **options)
    assert math.isfinite(value) and value >= 0
    assert value <= _bound(name, options) * (1 + 64 * _eps(s))
    assert grad.dtype == s.dtype and np.all(np.isfinite(grad))


@SETTINGS
@given(cases(), st.integers(0, 2**32 - 1))
def test_a_constant_added_to_a_row_changes_nothing(case, seed):
    """A constant added to a row of either input leaves loss and gradient the same, bit for bit.

    Logits on a grid and shifts that are multiples of its step keep every sum exact, so the shifted rows
    are the same rows after log_softmax subtracts the maximum. (With rounding, AKL's head/tail split can
    legitimately flip near a tie, hence the exact grid.)
    """
    name, options, s, t, mask, temperature = case
    rng = np.random.default_rng(seed)
    unit = 2.0 ** math.floor(math.log2(np.abs(np.where(np.isfinite(s), s, 0)).max() + 1e-3))
    s, t = (np.round(x * (256 / unit)) * (unit / 256) for x in (s, t))
    shift = lambda: (unit * rng.integers(-8, 9, s.shape[:-1] + (1,))).astype(s.dtype)  # noqa: E731
    v, g = LOSSES[name](s, t, mask, temperature=temperature, **options)
    v2, g2 = LOSSES[name](s + shift(), t + shift(), mask, temperature=temperature, **options)
    assert v2 == v
    np.testing.assert_array_equal(g2, g)


@SETTINGS
@given(cases())
def test_gradient_rows_sum_to_zero_and_vanish_off_the_mask(case):
    name, options, s, t, mask, temperature = case
    _, grad = LOSSES[name](s, t, mask, temperature=temperature, **options)
    V = s.shape[-1]
    row_sums = grad.sum(axis=-1, dtype=np.float64)
    assert np.abs(row_sums).max() <= 16 * V * _eps(s) * _natural(s, t, mask, temperature)
    assert np.all(grad[~mask] == 0)
    assert np.all(grad[np.isneginf(s)] == 0)  # an entry of probability 0 stays there


@SETTINGS
@given(cases())
def test_student_equal_to_teacher_gives_zero_loss_and_gradient(case):
    name, options, _, t, mask, temperature = case
    value, grad = LOSSES[name](t, t, mask, temperature=temperature, **options)
    lp = reference_log_softmax(t.astype(np.float64) / temperature)
    # mixtures round log p by eps |log p|
    tol = 16 * _eps(t) * (t.shape[-1] + np.abs(lp[np.isfinite(lp)]).max())
    assert 0 <= value <= tol
    assert np.abs(grad).max() <= tol / (mask.sum() * temperature)


@SETTINGS
@given(cases())
def test_positions_shaped_b_t_or_flat_agree_exactly(case):
    name, options, s, t, mask, temperature = case
    V = s.shape[-1]
    v, g = LOSSES[name](s, t, mask, temperature=temperature, **options)
    v_flat, g_flat = LOSSES[name](s.reshape(-1, V), t.reshape(-1, V), mask.reshape(-1),
                                  temperature=temperature, **options)
    assert v_flat == v
    np.testing.assert_array_equal(g_flat.reshape(g.shape), g)


@SETTINGS
@given(cases())
def test_float32_agrees_with_float64_to_float32_precision(case):
    name, options, s, t, mask, temperature = case
    s32, t32 = s.astype(np.float32), t.astype(np.float32)
    s64, t64 = s32.astype(np.float64), t32.astype(np.float64)
    p, q = np.exp(reference_log_softmax(t64 / temperature)), np.exp(reference_log_softmax(s64 / temperature))
    if name == "akl":  # its head/tail split jumps where the teacher's cumulative mass crosses mu
        p_sorted = np.sort(p, axis=-1)
        assume(np.abs(np.cumsum(p_sorted, axis=-1) - options["mu"])[p_sorted > 0].min() > 1e-4)
    if name == "tvd":  # its gradient 1/2 sign(q - p) q jumps where q crosses p
        assume(np.all((np.abs(q - p) > 1e-4 * (p + q))[p + q > 0]))
    v32, g32 = LOSSES[name](s32, t32, mask, temperature=temperature, **options)
    v64, g64 = LOSSES[name](s64, t64, mask, temperature=temperature, **options)
    z = np.abs(s64[np.isfinite(s64)]).max() / temperature + np.abs(t64[np.isfinite(t64)]).max() / temperature
    tol = 64 * float(np.finfo(np.float32).eps) * (1 + z)
    natural = _natural(s64, t64, mask, temperature)
    assert g32.dtype == np.float32
    assert abs(v32 - v64) <= tol * natural * mask.sum() * temperature
    assert np.abs(g32 - g64).max() <= tol * natural


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_rounding_never_makes_a_divergence_negative(name):
    """Near-equal distributions at a huge temperature: D is 0 up to rounding, clamped at 0, never below."""
    rng = np.random.default_rng(0)
    s = rng.standard_normal((64, 50)).astype(np.float32)
    t = s + rng.standard_normal(s.shape).astype(np.float32)
    for temperature in (1e4, 1e6):
        value, grad = LOSSES[name](s, t, temperature=temperature)
        assert value >= 0 and np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_an_empty_batch_is_a_clear_error(name):
    for shape in [(0, 7), (2, 0, 7)]:
        with pytest.raises(ValueError, match=r"hold no position: the mean over an empty batch is undefined"):
            LOSSES[name](np.zeros(shape), np.zeros(shape))
