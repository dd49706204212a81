"""The divergences: values against a plain float64 reference, gradients against finite differences."""

import math

import numpy as np
import pytest
from helpers import reference_log_softmax

from minitodi import fused, parallel
from minitodi.core import device, gradcheck, losses
from minitodi.core.gradcheck import LOSS_CHECK_EPS, LOSS_CHECK_ORDER
from minitodi.core.losses import LOSSES, InfiniteDivergenceError

NAMES = sorted(LOSSES)
# every loss with its defaults, plus option values that change the gradient
CASES = [(n, {}) for n in NAMES] + [
    ("todi", {"beta": 2.0}), ("todi", {"beta": 0.0}), ("todi", {"detach": False}),
    ("gjsd", {"beta": 0.0}), ("gjsd", {"beta": 0.3}), ("gjsd", {"beta": 0.9}), ("gjsd", {"beta": 1.0}),
    ("sfkl", {"lam": 0.4}), ("srkl", {"lam": 0.4}), ("akl", {"mu": 0.8}),
]
CASE_IDS = [f"{n}-{','.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for n, o in CASES]


# ---------------------------------------------------------------- an independent, unblocked reference


def _xlogy_diff(w, la, lb):
    """w * (la - lb) with 0 wherever w == 0 (0 log 0 = 0)."""
    with np.errstate(invalid="ignore"):
        return np.where(w > 0, w * (la - lb), 0.0)


def reference(name, s, t, mask=None, temperature=1.0, frozen_s=None, **o):
    """The divergence's value from its textbook formula, per position, then the masked mean.

    ``frozen_s``: student logits from which stop-gradient weights are computed (ToDi, AKL).
    """
    lq, lp = reference_log_softmax(s / temperature), reference_log_softmax(t / temperature)
    q, p = np.exp(lq), np.exp(lp)
    qw = q if frozen_s is None else np.exp(reference_log_softmax(frozen_s / temperature))
    lqw = lq if frozen_s is None else reference_log_softmax(frozen_s / temperature)
    fkl = _xlogy_diff(p, lp, lq).sum(-1)
    rkl = _xlogy_diff(q, lq, lp).sum(-1)
    if name == "fkl":
        d = fkl
    elif name == "rkl":
        d = rkl
    elif name == "todi":
        with np.errstate(invalid="ignore", over="ignore"):  # exp overflow -> a = 0, as it should
            a = 1 / (1 + np.exp(-o.get("beta", 1.0) * (lp - lqw)))
        d = (a * _xlogy_diff(p, lp, lq) + (1 - a) * _xlogy_diff(q, lq, lp)).sum(-1)
    elif name == "jsd":
        m = (p + q) / 2
        with np.errstate(divide="ignore"):
            lm = np.log(m)
        d = 0.5 * _xlogy_diff(p, lp, lm).sum(-1) + 0.5 * _xlogy_diff(q, lq, lm).sum(-1)
    elif name == "gjsd":
        beta = o.get("beta", 0.5)
        if beta == 0:  # TRL's and Liger's convention at the ends
            d = fkl
        elif beta == 1:
            d = rkl
        else:
            m = beta * p + (1 - beta) * q
            with np.errstate(divide="ignore"):
                lm = np.log(m)
            d = beta * _xlogy_diff(p, lp, lm).sum(-1) + (1 - beta) * _xlogy_diff(q, lq, lm).sum(-1)
    elif name == "tvd":
        d = 0.5 * np.abs(p - q).sum(-1)
    elif name in ("sfkl", "srkl"):
        lam = o.get("lam", 0.1)
        m = lam * p + (1 - lam) * q if name == "sfkl" else (1 - lam) * p + lam * q
        with np.errstate(divide="ignore"):
            lm = np.log(m)
        d = _xlogy_diff(p, lp, lm).sum(-1) if name == "sfkl" else _xlogy_diff(q, lq, lm).sum(-1)
    elif name == "akl":
        mu = o.get("mu", 0.5)
        head, tail = np.zeros(p.shape[:-1]), np.zeros(p.shape[:-1])
        for i in np.ndindex(p.shape[:-1]):
            order = np.argsort(p[i])
            gaps = np.abs(p[i][order] - qw[i][order])
            tail_set = np.cumsum(p[i][order]) <= mu
            gh, gt = gaps[~tail_set].sum(), gaps[tail_set].sum()
            head[i], tail[i] = (gh / (gh + gt), gt / (gh + gt)) if gh + gt > 0 else (0.5, 0.5)
        d = head * fkl + tail * rkl
    mask = np.ones(d.shape, bool) if mask is None else mask
    return d[mask].mean()


def _inputs(shape=(3, 4, 13), scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    s = scale * rng.standard_normal(shape)
    t = scale * rng.standard_normal(shape)
    mask = rng.random(shape[:-1]) < 0.6
    mask.flat[0] = True
    mask.flat[-1] = False
    return s, t, mask


# ---------------------------------------------------------------------------------------- the registry


def test_registry_names():
    assert set(LOSSES) == {"fkl", "rkl", "todi", "jsd", "gjsd", "tvd", "sfkl", "srkl", "akl"}


# --------------------------------------------------------------------------- values against reference


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_value_matches_reference(name, options, temperature):
    s, t, mask = _inputs()
    value, grad = LOSSES[name](s, t, mask, temperature=temperature, **options)
    assert isinstance(value, float)
    assert grad.shape == s.shape and grad.dtype == s.dtype
    ref = reference(name, s, t, mask, temperature, **options)
    assert value == pytest.approx(ref, rel=1e-12, abs=1e-15)


# ------------------------------------------------------------------- gradients against finite differences


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_gradient_matches_finite_differences_of_the_reference(name, options, temperature):
    """d loss / d student, every entry, against central differences of the *reference* value.

    Stop-gradient weights (ToDi detach=True, AKL) are held at the base point, as training uses them.
    """
    s, t, mask = _inputs()
    _, grad = LOSSES[name](s, t, mask, temperature=temperature, **options)
    frozen = None
    if name in losses.STOPGRAD_LOSSES and options.get("detach", True):
        frozen = s.copy()
    x = s.copy()
    res = gradcheck.check_array(lambda: reference(name, x, t, mask, temperature, frozen, **options),
                                x, grad, eps=LOSS_CHECK_EPS, order=LOSS_CHECK_ORDER)
    assert res.n_checked == s.size
    assert res.max_rel_error < 1e-6, res
    assert np.all(grad[~mask] == 0)


def test_gradcheck_table_covers_every_loss_and_catches_a_wrong_gradient(monkeypatch):
    rows = gradcheck.gradcheck_table(names=["fkl", "todi"])
    assert [(r[0], r[1], r[2]) for r in rows] == [(n, o, T) for n, o in gradcheck.GRADCHECK_CASES
                                                  if n in ("fkl", "todi") for T in (1.0, 2.0)]
    assert {n for n, _ in gradcheck.GRADCHECK_CASES} == set(LOSSES)
    assert all(r[3] == 66 and r[4] < 1e-6 for r in rows)
    # one gradient entry off by 1e-3 of itself must show in the table
    real = LOSSES["fkl"]

    def wrong(*args, **kwargs):
        value, grad = real(*args, **kwargs)
        grad = grad.copy()
        grad.flat[0] *= 1.001
        return value, grad

    monkeypatch.setitem(LOSSES, "fkl", wrong)
    assert all(r[4] > 1e-4 for r in gradcheck.gradcheck_table(names=["fkl"]))


def test_cli_gradcheck_exit_code(capsys):
    from minitodi.cli import main

    assert main(["gradcheck", "--losses", "todi"]) == 0
    out = capsys.readouterr().out
    assert "todi" in out and "FAIL" not in out
    # an absurd tolerance makes every row fail, and the command says so with its exit code
    assert main(["gradcheck", "--losses", "fkl", "--tol", "1e-30"]) == 1
    assert "FAIL" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- ToDi specifically


def test_todi_stop_gradient_is_not_the_gradient_of_the_value():
    """Finite differences see ToDi's gradient only with its weight held at the base point.

    At beta = 1 the value is FKL + RKL: plain finite differences (weight recomputed at every step)
    measure grad FKL + grad RKL, not ToDi's; with the weight frozen at the base point they measure ToDi's.
    """
    s, t, mask = _inputs(seed=1)
    _, g_todi = losses.todi(s, t, mask)
    g_value = losses.fkl(s, t, mask)[1] + losses.rkl(s, t, mask)[1]
    x = s.copy()

    def check(f, grad):
        return gradcheck.check_array(f, x, grad, eps=LOSS_CHECK_EPS, order=LOSS_CHECK_ORDER).max_rel_error

    plain = lambda: losses.todi(x, t, mask)[0]  # noqa: E731
    frozen = lambda: losses.todi(x, t, mask, stopgrad_at=s)[0]  # noqa: E731
    assert check(plain, g_value) < 1e-6
    assert check(plain, g_todi) > 1e-2
    assert check(frozen, g_todi) < 1e-6
    # detach=False differentiates the weight too: at beta = 1 that is the gradient of FKL + RKL
    _, g_attached = losses.todi(s, t, mask, detach=False)
    np.testing.assert_allclose(g_attached, g_value, rtol=1e-10, atol=1e-15)
    assert check(plain, g_attached) < 1e-6


def test_todi_detach_option_is_checked():
    s, t, mask = _inputs(seed=2)
    with pytest.raises(ValueError, match="detach must be True or False"):
        losses.todi(s, t, mask, detach=0)
    with pytest.raises(ValueError, match="pass one or the other"):
        losses.todi(s, t, mask, detach=False, stopgrad_at=s)


def test_todi_limits_are_fkl_and_rkl():
    """On a block of rows, a = 1 everywhere gives FKL's D and g; a = 0 gives RKL's."""
    s, t, _ = _inputs(shape=(6, 13), seed=2)
    lq, lp = reference_log_softmax(s / 2), reference_log_softmax(t / 2)
    rows = (lp, lq, np.exp(lp), np.exp(lq))
    one, zero = np.ones(s.shape), np.zeros(s.shape)
    for (a, one_minus_a), other in (((one, zero), losses.fkl_rows), ((zero, one), losses.rkl_rows)):
        d, g = losses.todi_rows(*rows, a, one_minus_a)
        d_ref, g_ref = other(*rows)
        np.testing.assert_allclose(d, d_ref, rtol=1e-13)
        np.testing.assert_allclose(g, g_ref, rtol=1e-13, atol=1e-17)


def test_todi_weight_direction_and_beta_one_identity():
    s, t, _ = _inputs(seed=3)
    a = losses.todi_weight(s, t, temperature=1.5, beta=1.0)
    p, q = np.exp(reference_log_softmax(t / 1.5)), np.exp(reference_log_softmax(s / 1.5))
    np.testing.assert_allclose(a, p / (p + q), rtol=1e-12)  # sigmoid(log p/q) = p / (p + q)
    assert np.all((a > 0.5) == (p > q))
    # at beta = 1 the value is FKL + RKL (the gradients differ: the weight is detached)
    v = losses.todi(s, t, temperature=1.5)[0]
    assert v == pytest.approx(losses.fkl(s, t, temperature=1.5)[0] + losses.rkl(s, t, temperature=1.5)[0],
                              rel=1e-12)


def test_sigmoid_weight_has_no_overflow():
    s = np.array([[0.0, 800.0, -800.0]])
    t = np.array([[0.0, -800.0, 800.0]])
    with np.errstate(all="raise", under="ignore"):
        a = losses.todi_weight(s, t)
        value, grad = losses.todi(s, t)
    assert np.all(np.isfinite(a)) and np.isfinite(value) and np.all(np.isfinite(grad))
    assert a[0, 1] == 0.0 and a[0, 2] == 1.0


# --------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_properties(name, options):
    s, t, mask = _inputs(seed=4)
    fn = LOSSES[name]
    value, grad = fn(s, t, mask, temperature=2.0, **options)
    assert value > 0
    # gradient rows sum to zero: softmax does not see a constant added to a row
    np.testing.assert_allclose(grad.sum(-1), 0, atol=1e-16)
    # adding a constant per row to either input changes nothing
    shift = np.random.default_rng(5).standard_normal(s.shape[:-1] + (1,)) * 10
    v2, g2 = fn(s + shift, t - shift, mask, temperature=2.0, **options)
    assert v2 == pytest.approx(value, rel=1e-9)
    np.testing.assert_allclose(g2, grad, rtol=1e-7, atol=1e-14)
    # student equals teacher: zero loss, zero gradient
    v0, g0 = fn(t, t, mask, temperature=2.0, **options)
    assert abs(v0) < 1e-15 and np.abs(g0).max() < 1e-15
    # mask=None counts every position
    v_all, _ = fn(s, t, None, **options)
    v_true, _ = fn(s, t, np.ones(mask.shape, bool), **options)
    assert v_all == v_true


def test_blocking_does_not_change_results(monkeypatch):
    s, t, mask = _inputs(shape=(5, 7, 29), seed=6)
    whole = {n: LOSSES[n](s, t, mask, temperature=2.0) for n in NAMES}
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 3 * 29)  # blocks of 3 rows, a ragged last block
    for n in NAMES:
        v, g = LOSSES[n](s, t, mask, temperature=2.0)
        assert v == pytest.approx(whole[n][0], rel=1e-13)
        np.testing.assert_allclose(g, whole[n][1], rtol=1e-13, atol=1e-18)


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_pieces_on_threads_give_the_pure_gradient_bit_for_bit(name, options, monkeypatch):
    """parallel.loss_and_grad hands out pieces of rows: the pure gradient bit for bit, the loss to rounding.

    With -inf logits too, and whatever the thread count.
    """
    s, t, mask = _inputs(shape=(6, 7, 29), seed=17)
    s[..., 3] = t[..., 3] = -np.inf  # the -inf path too
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 2 * 29)  # 21 blocks of 2 rows, 12 of them with the mask
    calls = []
    real = LOSSES[name]
    monkeypatch.setitem(LOSSES, name, lambda *a, **k: calls.append(k.get("n_counted")) or real(*a, **k))
    for m in (None, mask):
        v1, g1 = real(s, t, m, temperature=2.0, **options)
        n = 42 if m is None else int(m.sum())
        runs = []
        for threads in (2, 3):
            monkeypatch.setattr(parallel, "THREADS", threads)
            calls.clear()
            runs.append(parallel.loss_and_grad(name, s, t, m, temperature=2.0, **options))
            assert len(calls) == math.ceil(n / (2 * parallel.PIECE_BLOCKS))  # pieces of 8 blocks of 2 rows
            assert calls == [n] * len(calls)  # each piece divides by the whole batch's N
        for v, g in runs:
            assert v == pytest.approx(v1, rel=1e-14, abs=1e-300)
            np.testing.assert_array_equal(g, g1)
        assert runs[0][0] == runs[1][0]  # the loss does not depend on the thread count


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_an_error_in_a_piece_names_its_position_in_the_batch(name, options, monkeypatch):
    s, t, mask = _inputs(shape=(6, 7, 29), seed=17)
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 2 * 29)
    monkeypatch.setattr(parallel, "THREADS", 3)
    s[..., 3] = t[..., 3] = -np.inf
    t[4, 5, 3] = 1.0  # the teacher has mass where the student has none: FKL-like losses are infinite
    everywhere = np.ones_like(mask)
    try:
        LOSSES[name](s, t, everywhere, temperature=2.0, **options)
    except InfiniteDivergenceError as error:
        with pytest.raises(InfiniteDivergenceError, match=r"position \(4, 5\)") as raised:
            parallel.loss_and_grad(name, s, t, everywhere, temperature=2.0, **options)
        assert str(raised.value) == str(error)
    s[..., 3] = 0.0
    s[5, 6, 7] = np.nan
    with pytest.raises(ValueError, match=r"student_logits contains NaN \(first at index \(5, 6, 7\)\)"):
        parallel.loss_and_grad(name, s, t, mask, temperature=2.0, **options)


def test_parts_with_n_counted_add_up_to_the_whole_batch():
    """Two halves, each divided by the whole batch's N: their losses and gradients are the batch's."""
    s, t, _ = _inputs(shape=(6, 7, 29), seed=3)
    for name in NAMES:
        whole, g = LOSSES[name](s, t, temperature=2.0)
        first, g1 = LOSSES[name](s[:2], t[:2], temperature=2.0, n_counted=42)
        second, g2 = LOSSES[name](s[2:], t[2:], temperature=2.0, n_counted=42)
        assert first + second == pytest.approx(whole, rel=1e-13)
        np.testing.assert_allclose(np.concatenate([g1, g2]), g, rtol=1e-13, atol=1e-18)
    for bad in (13, 0, 41.0, True, -1):
        with pytest.raises(ValueError, match="n_counted"):
            LOSSES["fkl"](s[:2], t[:2], n_counted=bad)


# ------------------------------------------------------------------------------------------ -inf logits

FINITE_WITH_TEACHER_ZEROS = ["fkl", "jsd", "tvd", "sfkl", "srkl"]


@pytest.mark.parametrize("name", NAMES)
def test_shared_neginf_entries_drop_out_of_the_vocabulary(name):
    """-inf in both teacher and student at the same entries = the loss over the other entries."""
    s, t, mask = _inputs(seed=7)
    banned = np.zeros(s.shape, bool)
    banned[..., [2, 5, 11]] = True
    s_inf, t_inf = np.where(banned, -np.inf, s), np.where(banned, -np.inf, t)
    keep = [v for v in range(s.shape[-1]) if v not in (2, 5, 11)]
    with np.errstate(all="raise", under="ignore"):
        v, g = LOSSES[name](s_inf, t_inf, mask, temperature=2.0)
    v_ref, g_ref = LOSSES[name](s[..., keep], t[..., keep], mask, temperature=2.0)
    assert v == pytest.approx(v_ref, rel=1e-12)
    np.testing.assert_allclose(g[..., keep], g_ref, rtol=1e-10, atol=1e-18)
    assert np.all(g[banned] == 0)


@pytest.mark.parametrize("name", FINITE_WITH_TEACHER_ZEROS)
def test_teacher_neginf_alone_gives_finite_values_with_zero_log_zero(name):
    s, t, mask = _inputs(seed=8)
    t[..., 3] = -np.inf
    with np.errstate(all="raise", under="ignore"):
        v, g = LOSSES[name](s, t, mask, temperature=2.0)
    assert math.isfinite(v) and np.all(np.isfinite(g))
    assert v == pytest.approx(reference(name, s, t, mask, 2.0), rel=1e-12)
    x = s.copy()
    res = gradcheck.check_array(lambda: reference(name, x, t, mask, 2.0), x, g, eps=LOSS_CHECK_EPS,
                                order=LOSS_CHECK_ORDER)
    assert res.max_rel_error < 1e-6


@pytest.mark.parametrize("name", ["rkl", "todi", "akl"])
def test_student_mass_where_teacher_is_neginf_is_infinite_and_said(name):
    s, t, mask = _inputs(seed=9)
    t[1, 2, 4] = -np.inf
    mask[1, 2] = True
    with pytest.raises(InfiniteDivergenceError, match=rf"{name} is infinite at position \(1, 2\)"):
        LOSSES[name](s, t, mask)
    mask[1, 2] = False  # the same entry at an uncounted position does not matter
    v, g = LOSSES[name](s, t, mask)
    assert math.isfinite(v) and np.all(np.isfinite(g))


@pytest.mark.parametrize("name", ["fkl", "todi"])
def test_teacher_mass_where_student_is_neginf_is_infinite_and_said(name):
    s, t, mask = _inputs(seed=10)
    s[0, 0, 1] = -np.inf
    with pytest.raises(InfiniteDivergenceError, match=r"infinite at position \(0, 0\)"):
        LOSSES[name](s, t, mask)


@pytest.mark.parametrize("name", NAMES)
def test_all_neginf_row_is_a_clear_error(name):
    s, t, mask = _inputs(seed=11)
    t[0, 0, :] = -np.inf
    message = r"teacher_logits are -inf for every vocabulary entry at position \(0, 0\)"
    with pytest.raises(ValueError, match=message):
        LOSSES[name](s, t, mask)


# ------------------------------------------------------------------------------------ precision, range


@pytest.mark.parametrize("name", NAMES)
def test_huge_logits_are_finite_and_correct(name):
    s, t, mask = _inputs(seed=12, scale=1e4)
    with np.errstate(all="raise", under="ignore"):
        v, g = LOSSES[name](s, t, mask, temperature=2.0)
    assert math.isfinite(v) and np.all(np.isfinite(g))
    assert v == pytest.approx(reference(name, s, t, mask, 2.0), rel=1e-10)
    x = s.copy()  # near-one-hot distributions: the check needs no special care
    frozen = s.copy() if name in losses.STOPGRAD_LOSSES else None
    res = gradcheck.check_array(lambda: reference(name, x, t, mask, 2.0, frozen), x, g, eps=1e-2)
    assert res.max_rel_error < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_float32_agrees_with_float64(name):
    s, t, mask = _inputs(shape=(4, 6, 300), seed=13)
    v64, g64 = LOSSES[name](s, t, mask, temperature=2.0)
    v32, g32 = LOSSES[name](s.astype(np.float32), t.astype(np.float32), mask, temperature=2.0)
    assert g32.dtype == np.float32
    assert v32 == pytest.approx(v64, rel=1e-5)
    assert np.abs(g32 - g64).max() <= 1e-5 * np.abs(g64).max()


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_clear_errors(name):
    fn = LOSSES[name]
    s, t, mask = _inputs(seed=14)
    with pytest.raises(ValueError, match="differ in shape"):
        fn(s, t[..., :-1])
    with pytest.raises(TypeError, match="float32 or float64"):
        fn(s.astype(np.int64), t)
    with pytest.raises(TypeError, match="float32 or float64"):
        fn(s, t.astype(np.float16))
    bad = t.copy()
    bad[2, 1, 5] = np.nan
    with pytest.raises(ValueError, match=r"teacher_logits contains NaN \(first at index \(2, 1, 5\)\)"):
        fn(s, bad, mask)
    bad = s.copy()
    bad[0, 3, 0] = np.inf
    with pytest.raises(ValueError, match=r"student_logits contains \+inf"):
        fn(bad, t, mask)
    with pytest.raises(ValueError, match="mask has shape"):
        fn(s, t, mask[:, :2])
    with pytest.raises(TypeError, match="mask must be boolean"):
        fn(s, t, mask.astype(np.int64))
    with pytest.raises(ValueError, match="no position counts"):
        fn(s, t, np.zeros_like(mask))
    for temperature in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            fn(s, t, temperature=temperature)
    with pytest.raises(TypeError):
        fn(s, t, no_such_option=1)


def test_bad_options_are_clear_errors():
    s, t, _ = _inputs(seed=15)
    with pytest.raises(ValueError, match="beta"):
        losses.todi(s, t, beta=-1.0)
    with pytest.raises(ValueError, match="stopgrad_at"):
        losses.todi(s, t, stopgrad_at=s[..., :-1])
    with pytest.raises(TypeError):
        losses.todi(s, t, weight=np.full(s.shape, 0.5))  # one way to fix the weight: stopgrad_at
    for lam in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="lam"):
            losses.sfkl(s, t, lam=lam)
        with pytest.raises(ValueError, match="lam"):
            losses.srkl(s, t, lam=lam)
    with pytest.raises(ValueError, match="mu"):
        losses.akl(s, t, mu=1.5)


# ------------------------------------------------------------------------------------------------ CuPy


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_cupy_matches_numpy(name, options, dtype):
    s, t, mask = _inputs(shape=(4, 9, 257), seed=16)
    s, t = s.astype(dtype), t.astype(dtype)
    t[..., 7] = -np.inf
    s[..., 7] = -np.inf
    v_np, g_np = LOSSES[name](s, t, mask, temperature=2.0, **options)
    dev = lambda a: device.to_device(a, "gpu")  # noqa: E731
    v_cp, g_cp = LOSSES[name](dev(s), dev(t), dev(mask), temperature=2.0, **options)
    assert device.device_of(g_cp) == "gpu" and g_cp.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert v_cp == pytest.approx(v_np, rel=tol)
    g_cp = device.to_numpy(g_cp)
    assert np.abs(g_cp - g_np).max() <= tol * np.abs(g_np).max()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,options", [("fkl", {}), ("rkl", {}), ("todi", {}), ("todi", {"beta": 2.0})])
def test_fused_cupy_kernels_match_the_numpy_path(name, options, dtype, monkeypatch):
    """No -inf: FKL, RKL and ToDi take minitodi.fused on CuPy; it must give the array path's numbers."""
    s, t, mask = _inputs(shape=(5, 7, 1031), seed=21)
    s, t = 3 * s.astype(dtype), 3 * t.astype(dtype)
    v_np, g_np = LOSSES[name](s, t, mask, temperature=2.0, **options)
    dev = lambda a: device.to_device(a, "gpu")  # noqa: E731
    calls = []
    real = fused.loss_and_grad
    monkeypatch.setattr(fused, "loss_and_grad", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    v_cp, g_cp = parallel.loss_and_grad(name, dev(s), dev(t), dev(mask), temperature=2.0, **options)
    assert calls == [name]  # the fused path ran
    tol = 1e-10 if dtype == np.float64 else 1e-5
    assert v_cp == pytest.approx(v_np, rel=tol)
    g_cp = device.to_numpy(g_cp)
    assert g_cp.dtype == dtype and np.all(g_cp[~mask] == 0)
    assert np.abs(g_cp - g_np).max() <= tol * np.abs(g_np).max()


def test_numpy_scalars_are_numbers_and_numpy_bools_are_not():
    """np.float32(2.0) is a temperature and np.float64(0.25) a lam, as 2.0 and 0.25 are; np.True_ is not."""
    s, t, mask = _inputs(seed=9)
    value, grad = LOSSES["todi"](s, t, mask, temperature=np.float32(2.0), beta=np.float32(1.5))
    expected_value, expected_grad = LOSSES["todi"](s, t, mask, temperature=2.0, beta=1.5)
    assert value == expected_value
    np.testing.assert_array_equal(grad, expected_grad)
    assert LOSSES["sfkl"](s, t, lam=np.float64(0.25))[0] == LOSSES["sfkl"](s, t, lam=0.25)[0]
    assert LOSSES["fkl"](s, t, temperature=np.int64(3))[0] == LOSSES["fkl"](s, t, temperature=3)[0]
    for bad in (np.True_, True, "2", np.float64("nan")):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            LOSSES["fkl"](s, t, temperature=bad)


@pytest.mark.parametrize("detach", [True, False])
def test_todi_beta_beyond_float32_saturates_without_nan(detach):
    """beta = 1e300 is inf in float32: a weight of inf * 0 would be NaN where p = q. It saturates instead."""
    s, t, _ = _inputs(seed=12)
    s, t = s.astype(np.float32), t.astype(np.float32)
    s[0, 0] = t[0, 0]  # one position where the distributions are equal: every d = log p - log q = 0
    huge = LOSSES["todi"](s, t, temperature=2.0, beta=1e300, detach=detach)
    largest = LOSSES["todi"](s, t, temperature=2.0, beta=float(np.finfo(np.float32).max), detach=detach)
    assert np.isfinite(huge[0]) and np.all(np.isfinite(huge[1]))
    assert huge[0] == largest[0]
    np.testing.assert_array_equal(huge[1], largest[1])
