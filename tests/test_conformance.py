"""minitodi.conformance: correct float32 implementations pass, each known deviation fails and is named.

The implementations under test are written here, in the style of public code (the official ToDi code's
float32 log-softmaxes, masked_fill of -inf entries, a sum over positions divided by the counted ones),
once for PyTorch (autograd gives the gradient; skipped without torch) and once for NumPy (the gradient
written out). Each bug is one change to a correct implementation; the diagnoses of factors, temperatures,
entropies, pairs, non-finite results and no match are tested on minitodi's own losses, changed by hand.
At the end, examples/check_libraries.py's verdicts on TRL and Liger-Kernel, where they are installed.
"""

import functools
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import exit_status

from minitodi import cli, conformance
from minitodi.conformance import NEGATED, ConformanceError, battery, check, computations
from minitodi.core.gradcheck import central_difference
from minitodi.core.losses import LOSSES, log_softmax

BUGS = {  # bug -> words the diagnosis must contain
    "t2": "T^2 factor applied",
    "sum": "sum over positions instead of mean",
    "mean_all": "mean over all positions",
    "mask": "mask ignored",
    "student_T": "temperature on the student only",
    "teacher_T": "temperature on the teacher only",
    "swap": "FKL and RKL swapped",
    "reversed": "weight reversed",
    "attached": "weight not detached",
    "beta": "beta ignored",
}
# (loss, options, bug): a correct implementation of the loss with that one bug
BUG_CASES = (
    [("fkl", {}, bug) for bug in ("t2", "sum", "mean_all", "mask", "student_T", "teacher_T", "swap")]
    + [("rkl", {}, bug) for bug in ("t2", "sum", "mask", "swap")]
    + [("todi", {}, bug) for bug in ("t2", "sum", "mean_all", "mask", "student_T", "teacher_T", "reversed",
                                     "attached")]
    + [("todi", {"beta": 2.0}, bug) for bug in ("reversed", "attached", "beta")]
)
# numpy_loss below writes every bug but these two
NUMPY_BUG_CASES = [c for c in BUG_CASES if c[2] not in ("mean_all", "teacher_T")]
CORRECT_CASES = [("fkl", {}), ("rkl", {}), ("todi", {}), ("todi", {"beta": 2.0}), ("todi", {"beta": 0.5})]


# --------------------------------------------------------------------------------------------------
# PyTorch implementations


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The battery's tensors are tiny: on two shared cores torch's thread pool costs 10 times the work."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torch_loss(kind, bug=None):
    """fn(s, t, mask, temperature, beta=1) computed in float32 as the official code does, with one bug."""
    torch = pytest.importorskip("torch")

    def fn(s, t, mask, temperature, beta=1.0):
        s_t = s if bug == "teacher_T" else s / temperature
        t_t = t if bug == "student_T" else t / temperature
        q, lq = torch.softmax(s_t, -1, dtype=torch.float32), torch.log_softmax(s_t, -1, dtype=torch.float32)
        p, lp = torch.softmax(t_t, -1, dtype=torch.float32), torch.log_softmax(t_t, -1, dtype=torch.float32)
        name = {"fkl": "rkl", "rkl": "fkl"}[kind] if bug == "swap" else kind
        if name == "fkl":
            div = p * (lp - lq)
        elif name == "rkl":
            div = q * (lq - lp)
        else:
            a = torch.sigmoid((1.0 if bug == "beta" else beta) * (lp - lq))
            a = a if bug == "attached" else a.detach()
            a = 1 - a if bug == "reversed" else a
            div = a * p * (lp - lq) + (1 - a) * q * (lq - lp)
        div = div.masked_fill(s_t.isinf() | t_t.isinf(), 0.0).sum(-1)
        counted = torch.ones_like(mask) if bug == "mask" else mask
        total = div.masked_fill(~counted, 0.0).sum()
        if bug == "mean_all":
            return total / mask.numel()
        loss = total if bug == "sum" else total / counted.sum()
        return loss * temperature ** 2 if bug == "t2" else loss
    return fn


def torch_baseline(kind, bug=None):
    """The official code's JSD (with its 1e-9 inside the logs), TVD, skew KLs and AKL, in float32."""
    torch = pytest.importorskip("torch")

    def fn(s, t, mask, temperature, lam=0.1, mu=0.5):
        s, t = s / temperature, t / temperature
        q, p = torch.softmax(s, -1, dtype=torch.float32), torch.softmax(t, -1, dtype=torch.float32)
        lq, lp = torch.log_softmax(s, -1, dtype=torch.float32), torch.log_softmax(t, -1, dtype=torch.float32)
        if kind == "jsd":
            lm = torch.log((p + q) / 2 + 1e-9)
            div = (p * (torch.log(p + 1e-9) - lm) + q * (torch.log(q + 1e-9) - lm)) / 2
        elif kind == "tvd":
            div = 0.5 * (p - q).abs()
        elif kind in ("sfkl", "srkl"):
            x, y, lx = (p, q, lp) if kind == "sfkl" else (q, p, lq)
            div = x * (lx - torch.log(lam * x + (1 - lam) * y))
        else:
            p_sorted, order = p.sort(-1)
            gap = (p_sorted - q.gather(-1, order)).abs()
            tail = (torch.cumsum(p_sorted, -1) <= mu).float()
            head_w, tail_w = ((gap * (1 - tail)).sum(-1, keepdim=True).detach(),
                              (gap * tail).sum(-1, keepdim=True).detach())
            div = (head_w * p * (lp - lq) + tail_w * q * (lq - lp)) / (head_w + tail_w)
        div = div.masked_fill(s.isinf() | t.isinf(), 0.0).sum(-1).masked_fill(~mask, 0.0).sum() / mask.sum()
        return div * temperature ** 2 if bug == "t2" else div
    return fn


# masked_fill after the product: 0 * NaN = NaN in the backward pass where both logits are -inf
NAN_GRADIENT = {"rkl", "todi", "sfkl", "srkl", "akl"}


def assert_nan_gradient_only(report):
    """The -inf case fails with a non-finite gradient and a finite value; every other case agrees."""
    assert not report.passed
    assert [r.status for r in report.rows].count("FAIL") == 1, report
    assert "Non-finite on case" in report.diagnosis and "the value is finite" in report.diagnosis, report
    assert "-inf entries" in report.diagnosis and "Every other case agrees" in report.diagnosis


@pytest.mark.parametrize("loss", ["jsd", "tvd", "sfkl", "srkl", "akl"])
def test_torch_official_baselines(loss):
    """Measured worst 7.2e-5 (srkl, seeds 0 to 5); the same code with a T^2 factor is caught."""
    assert check(torch_baseline(loss), loss, neginf=False).passed
    report = check(torch_baseline(loss), loss)
    if loss in NAN_GRADIENT:
        assert_nan_gradient_only(report)
    else:
        assert report.passed, report
    report = check(torch_baseline(loss, "t2"), loss)
    assert not report.passed and "T^2 factor applied" in report.diagnosis, report


@pytest.mark.parametrize("loss, options", CORRECT_CASES)
def test_torch_float32_official_style_passes(loss, options):
    """Passes without the -inf case; with it, RKL's and ToDi's gradient is NaN there, and that fails."""
    report = check(torch_loss(loss), loss, framework="torch", neginf=False, **options)
    assert report.passed and len(report.rows) == len(battery()), report  # -inf case out, all-masked in
    assert "left out" in str(report) and "-inf" in report.notes[0]
    worst = max(max(r.value_error, r.grad_error) for r in report.rows)
    assert worst < 3e-5  # float32 rounding, measured worst 1.1e-5: 1e-3 leaves a wide margin
    report = check(torch_loss(loss), loss, framework="torch", **options)
    if loss in NAN_GRADIENT:  # sigmoid(-inf - -inf), p * (-inf - -inf): NaN behind masked_fill
        assert_nan_gradient_only(report)
    else:
        assert report.passed, report


@pytest.mark.parametrize("loss, options, bug", BUG_CASES)
def test_torch_single_bug_fails_and_is_named(loss, options, bug):
    report = check(torch_loss(loss, bug), loss, framework="torch", **options)
    assert not report.passed
    assert BUGS[bug] in report.diagnosis and "; or" not in report.diagnosis, report.diagnosis
    assert min(max(r.value_error, r.grad_error) for r in report.rows if r.status == "FAIL") > 1e-3


def test_torch_other_convention_is_declared():
    fn = torch_loss("todi", "t2")  # T^2 times the mean
    assert check(fn, "todi", t_squared=True, neginf=False).passed

    def summed(s, t, mask, temperature):
        return torch_loss("fkl")(s, t, mask, temperature) * mask.sum()
    assert check(summed, "fkl", reduction="sum").passed
    report = check(summed, "fkl")
    assert not report.passed and "sum over positions instead of mean" in report.diagnosis
    assert "T^2 factor missing" in check(torch_loss("rkl"), "rkl", t_squared=True).diagnosis


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # PyTorch's own warning of this pitfall
def test_torch_kl_div_reduction_mean(torch):
    """F.kl_div(..., reduction="mean") is said to divide by V too; "batchmean" passes.

    reduction="mean" averages over positions and the vocabulary; declared with "batchmean" (per row, here
    per counted position) the same loss passes.
    """

    def fkl(s, t, mask, temperature, reduction):
        log_q = torch.log_softmax(s[mask] / temperature, -1)
        log_p = torch.log_softmax(t[mask] / temperature, -1)
        return torch.nn.functional.kl_div(log_q, log_p, reduction=reduction, log_target=True)
    report = check(lambda *args: fkl(*args, "mean"), "fkl")
    assert not report.passed and "divided by V too" in report.diagnosis, report.diagnosis
    assert check(lambda *args: fkl(*args, "batchmean"), "fkl", neginf=False).passed


def test_torch_neginf_safe_and_nan_elsewhere(torch):
    official = torch_loss("todi")

    def safe(s, t, mask, temperature):  # the weight from d = 0 where p = q = 0: no NaN anywhere
        lq, lp = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
        both = lq.isinf() & lp.isinf()
        d = torch.where(both, 0.0, lp) - torch.where(both, 0.0, lq)
        a = torch.sigmoid(d).detach()
        div = (a * lp.exp() - (1 - a) * lq.exp()) * d
        return div.sum(-1)[mask].mean()
    assert all(r.status == "ok" for r in check(safe, "todi").rows)

    def nan_everywhere(s, t, mask, temperature):
        return official(s, t, mask, temperature) * torch.tensor(math.nan)
    report = check(nan_everywhere, "todi")
    *rows, all_masked = report.rows
    assert all(r.status == "FAIL" for r in rows)
    assert report.diagnosis.count("Non-finite on case") == len(rows)
    assert report.diagnosis.count("The case has no -inf logits") == len(rows) - 1
    assert all_masked.status == "ok" and math.isnan(all_masked.value)  # NaN, gradient 0: accepted, noted
    assert "the value is NaN (0 / 0) and the gradient 0: accepted" in report.notes[0]


# --------------------------------------------------------------------------------------------------
# NumPy implementations: value and gradient written out, float32


def numpy_loss(kind, bug=None):
    """fn(s, t, mask, temperature, beta=1) -> (loss, grad) in float32 with one bug; 0 where nothing counts."""
    def fn(s, t, mask, temperature, beta=1.0):
        T = temperature
        if bug == "swap":
            return numpy_loss({"fkl": "rkl", "rkl": "fkl"}[kind])(s, t, mask, T)
        if bug == "student_T":
            return numpy_loss(kind)(s, t * T, mask, T, beta)  # softmax(t T / T): the teacher at T = 1
        mask = np.ones_like(mask) if bug == "mask" else mask
        lq, lp = (log_softmax((x / T).astype(np.float32)) for x in (s, t))
        both = np.isneginf(lq) & np.isneginf(lp)
        d = np.where(both, 0, lp) - np.where(both, 0, lq)
        q, p = np.exp(lq), np.exp(lp)
        a = {"fkl": 1.0, "rkl": 0.0}.get(kind)
        if a is None:
            a = 0.5 + 0.5 * np.tanh(0.5 * (1.0 if bug == "beta" else beta) * d)  # sigmoid
            a = 1 - a if bug == "reversed" else a
        g = -a * p + (1 - a) * q * (1 - d)  # dD/dlog q with a held constant
        if bug == "attached":
            g -= beta * a * (1 - a) * (p + q) * d
        counted = max(mask.sum(), 1)  # 0 / 1 where nothing counts: no NaN gradient there (TRL's guard)
        n = counted * (1 / T ** 2 if bug == "t2" else 1) / (counted if bug == "sum" else 1)
        value = ((a * p - (1 - a) * q) * d).sum(-1)[mask].sum() / n
        return value, np.where(mask[..., None], g - q * g.sum(-1, keepdims=True), 0) / (n * T)
    return fn


@pytest.mark.parametrize("loss, options", CORRECT_CASES)
def test_numpy_float32_passes(loss, options):
    report = check(numpy_loss(loss), loss, framework="numpy", **options)
    assert report.passed and all(r.status == "ok" for r in report.rows), report


@pytest.mark.parametrize("loss, options, bug", NUMPY_BUG_CASES)
def test_numpy_single_bug_fails_and_is_named(loss, options, bug):
    report = check(numpy_loss(loss, bug), loss, framework="numpy", **options)
    assert not report.passed and BUGS[bug] in report.diagnosis, report.diagnosis


def test_losses_conform_to_themselves():
    """LOSSES' signature has temperature keyword-only: it is passed by name; each loss agrees exactly."""
    for name, fn in LOSSES.items():
        report = check(fn, name, framework="numpy")
        assert report.passed and max(max(r.value_error, r.grad_error) for r in report.rows) < 1e-12, report


def test_value_wrong_gradient_right_is_said():
    def cross_entropy(s, t, mask, T):  # -sum p log q: FKL plus the teacher's entropy, FKL's gradient
        grad = LOSSES["fkl"](s, t, mask, temperature=T)[1]  # first: it raises where no position counts
        lp, lq = log_softmax(t / T), log_softmax(s / T)
        value = -(np.exp(lp) * np.where(np.isneginf(lq), 0, lq)).sum(-1)[mask].mean()
        return value, grad
    report = check(cross_entropy, "fkl", framework="numpy")
    assert not report.passed and "likely bug: cross-entropy" in report.diagnosis, report.diagnosis

    def shifted(s, t, mask, T):
        value, grad = LOSSES["rkl"](s, t, mask, temperature=T)
        return value + 0.5, grad
    report = check(shifted, "rkl", framework="numpy")
    assert not report.passed and "the gradient agrees but the value does not" in report.diagnosis
    assert "value - reference: 0.5 on every case" in report.diagnosis, report.diagnosis


def test_value_right_gradient_wrong_is_said():
    def wrong_grad(s, t, mask, T):
        value, grad = LOSSES["fkl"](s, t, mask, temperature=T)
        return value, grad * 1.5
    report = check(wrong_grad, "fkl", framework="numpy")
    assert not report.passed and "the value agrees but the gradient does not" in report.diagnosis


# --------------------------------------------------------------------------------------------------
# diagnoses: minitodi's own losses changed by hand (NumPy), each change a known deviation or none


def teacher_entropy(t, mask, T):
    """Mean over counted positions of H(p), p = softmax(t / T), 0 log 0 = 0."""
    lp = log_softmax(t / T)
    return float(-(np.exp(lp) * np.where(np.isneginf(lp), 0.0, lp)).sum(-1)[mask].mean())


def scaled(loss, factor, masked=True, **options):
    """LOSSES[loss] times factor(s, mask, temperature), value and gradient; every position if not masked."""
    def fn(s, t, mask, temperature):
        counted = mask if masked else None
        value, grad = LOSSES[loss](s, t, counted, temperature=temperature, **options)
        k = factor(s, mask, temperature)
        return value * k, grad * k
    return fn


def test_constant_factor_is_named():
    """Liger's fused JSD module with its default weight_soft_loss: 0.5 x the divergence."""
    report = check(scaled("gjsd", lambda s, m, T: 0.5, beta=0.1), "gjsd", framework="numpy", beta=0.1)
    assert report.diagnosis == "diagnosis: likely bug: value and gradient scaled by 0.5.", report
    report = check(scaled("todi", lambda s, m, T: -1.0), "todi", framework="numpy", neginf=False)
    assert report.diagnosis == f"diagnosis: likely bug: {NEGATED}.", report.diagnosis  # maximised

    def half_value(s, t, mask, temperature):  # the value alone halved: no constant factor explains it
        value, grad = LOSSES["fkl"](s, t, mask, temperature=temperature)
        return 0.5 * value, grad
    report = check(half_value, "fkl", framework="numpy")
    assert "scaled" not in report.diagnosis and "no known mistake" in report.diagnosis, report.diagnosis


def test_temperature_ignored_is_named():
    """DistiLLM's losses take no temperature: run at T != 1 they compute the divergence at T = 1."""
    def at_one(s, t, mask, temperature):
        return LOSSES["rkl"](s, t, mask, temperature=1.0)
    report = check(at_one, "rkl", framework="numpy")
    assert report.diagnosis == "diagnosis: likely bug: temperature ignored (the divergence at T = 1).", report
    *rows, all_masked = report.rows
    assert all((row.status == "ok") == ("temp 1" in row.case) for row in rows)
    assert all_masked.value == "raised" and all_masked.status == "ok"  # LOSSES["rkl"] raises there


@pytest.mark.parametrize("loss", ["fkl", "sfkl", "gjsd"])
def test_entropy_added_is_named(loss):
    """-sum p log q = FKL + H(p); DistiLLM's skewed_forward_kl, -sum p log m = SFKL + H(p)."""
    def cross_entropy(s, t, mask, temperature):
        value, grad = LOSSES[loss](s, t, mask, temperature=temperature)
        return value + teacher_entropy(t, mask, temperature), grad
    report = check(cross_entropy, loss, framework="numpy")
    assert "likely bug: cross-entropy in place of KL: the teacher's entropy H(p) added to the value" in (
        report.diagnosis), report.diagnosis
    assert " and " not in report.diagnosis.split("(")[0]  # one deviation, not a pair


PAIRS = [  # (loss, fn, the diagnosis's words): two deviations at once
    ("fkl", scaled("fkl", lambda s, m, T: m.size / m.shape[0], masked=False),  # TRL's loss without labels
     "likely bug: mask ignored (every position counted) and the sum divided by the batch size B "
     "(the first dimension) instead of by the counted positions. Where no position counts (case "
     "'(2, 5, 16) no position counted'), the gradient is not 0"),
    ("todi", scaled("todi", lambda s, m, T: m.sum() * T ** 2),
     "likely bug: T^2 factor applied and sum over positions instead of mean."),
    ("rkl", scaled("rkl", lambda s, m, T: 0.25 * T ** 2), "likely bug: T^2 factor applied and value and "
     "gradient scaled by 0.25."),
]


@pytest.mark.parametrize("loss, fn, words", PAIRS, ids=["mask+batch", "t2+sum", "t2+scaled"])
def test_pairs_are_named(loss, fn, words):
    report = check(fn, loss, framework="numpy")
    assert report.diagnosis.startswith("diagnosis: " + words), report


def test_temperature_ignored_and_entropy_added_is_named():
    """DistiLLM's forward_kl: -sum p log q at T = 1 whatever the temperature."""
    def forward_kl(s, t, mask, temperature):
        value, grad = LOSSES["fkl"](s, t, mask, temperature=1.0)
        return value + teacher_entropy(t, mask, 1.0), grad
    report = check(forward_kl, "fkl", framework="numpy")
    assert report.diagnosis.startswith("diagnosis: likely bug: temperature ignored (the divergence at T = 1) "
                                       "and cross-entropy in place of KL"), report.diagnosis


def test_no_match_says_where_the_largest_error_sits():
    """TVD is no known mistake of JSD: no closest variant, but the case and positions."""
    def other_divergence(s, t, mask, temperature):
        return LOSSES["tvd"](s, t, mask, temperature=temperature)
    report = check(other_divergence, "jsd", framework="numpy")
    diagnosis = report.diagnosis
    assert "no known mistake, alone or in pairs, matches" in diagnosis, diagnosis
    assert "likely bug" not in diagnosis and "Closest" not in diagnosis
    worst = max(report.rows, key=lambda r: max(r.value_error, r.grad_error))
    part = "gradient" if worst.grad_error > worst.value_error else "value"
    assert f"Largest error: the {part} of case '{worst.case}'" in diagnosis, diagnosis

    def leaky(s, t, mask, temperature):  # right value; gradient also at the positions the mask leaves out
        value, grad = LOSSES["fkl"](s, t, mask, temperature=temperature)
        everywhere = LOSSES["fkl"](s, t, None, temperature=temperature)[1]
        return value, np.where(mask[..., None], grad, everywhere)
    diagnosis = check(leaky, "fkl", framework="numpy").diagnosis
    assert "the value agrees but the gradient does not" in diagnosis, diagnosis
    assert "outside the mask, where the gradient should be 0" in diagnosis


def test_closest_is_shown_only_when_nearly_matching():
    """Half the loss, drifting by 0.3% per unit of T: no constant fits within 1e-3, 0.5 within 1e-2."""
    fn = scaled("fkl", lambda s, m, T: 0.5 * (1 + 0.003 * T))
    report = check(fn, "fkl", framework="numpy")
    assert "no known mistake" in report.diagnosis
    assert "Closest, nearly matching: value and gradient scaled by 0.5" in report.diagnosis, report.diagnosis
    assert "Closest" not in check(fn, "fkl", framework="numpy", tol=1e-4).diagnosis  # 10 tol: too far


def test_nonfinite_value_fails_and_neginf_false_leaves_the_case_out():
    """What F.kl_div(log_target=True) does where p = q = 0: a NaN value (and TRL's gradient NaN too)."""
    def nan_value(s, t, mask, temperature):
        value, grad = LOSSES["fkl"](s, t, mask, temperature=temperature)
        if np.isneginf(s).any():
            value = math.nan
        return value, grad
    report = check(nan_value, "fkl", framework="numpy")
    assert not report.passed
    assert ("Non-finite on case '(2, 4, 20) -inf entries, temp 2': the value is nan; the gradient is finite. "
            "Both logits are -inf at the same entries there") in report.diagnosis, report.diagnosis
    assert "pass neginf=False" in report.diagnosis and "weight" not in report.diagnosis
    report = check(nan_value, "fkl", framework="numpy", neginf=False)
    assert report.passed and len(report.rows) == len(battery())  # -inf case out, all-masked in
    assert "-inf" not in "".join(r.case for r in report.rows)
    assert "note: left out: case '(2, 4, 20) -inf entries, temp 2' (neginf=False" in str(report)


@pytest.mark.parametrize("loss, declared, actual, words", [
    ("jsd", {}, ("gjsd", {"beta": 0.1}), "likely bug: this is gjsd beta=0.1 (jsd is gjsd at beta 0.5)."),
    ("gjsd", {"beta": 0.5}, ("gjsd", {"beta": 0.9}), "likely bug: this is gjsd beta=0.9, not beta=0.5 as "
     "declared."),
    ("todi", {}, ("todi", {"beta": 2.0}), "likely bug: this is todi beta=2, not beta=1 as declared."),
    ("sfkl", {"lam": 0.3}, ("sfkl", {}), "likely bug: lam ignored (the default lam=0.1 used)."),
    ("akl", {}, ("akl", {"mu": 0.9}), "likely bug: this is akl mu=0.9, not mu=0.5 as declared."),
])
def test_wrong_option_value_is_named(loss, declared, actual, words):
    """The option searched over a grid: GJSD at beta 0.1 declared as JSD said to be just that."""
    name, options = actual

    def fn(s, t, mask, temperature):
        return LOSSES[name](s, t, mask, temperature=temperature, **options)
    report = check(fn, loss, framework="numpy", **declared)
    assert report.diagnosis == "diagnosis: " + words, report.diagnosis


@pytest.mark.parametrize("power, words", [
    (1, "a factor T applied (the loss times T)"),
    (-1, "divided by T (the temperature applied as a factor 1/T)"),
    (-2, "divided by T^2 (the temperature applied as a factor 1/T^2)"),
])
def test_temperature_as_a_factor_is_named(power, words):
    report = check(scaled("fkl", lambda s, m, T: T ** power), "fkl", framework="numpy")
    assert report.diagnosis == f"diagnosis: likely bug: {words}.", report.diagnosis
    times_t2 = scaled("fkl", lambda s, m, T: T ** (2 + power))
    declared = check(times_t2, "fkl", framework="numpy", t_squared=True)
    assert declared.diagnosis.endswith(", where T^2 is declared."), declared.diagnosis


def test_gradient_sign_flipped_is_named():
    def flipped(s, t, mask, temperature):
        value, grad = LOSSES["todi"](s, t, mask, temperature=temperature)
        return value, -grad
    report = check(flipped, "todi", framework="numpy")
    assert report.diagnosis == ("diagnosis: likely bug: the gradient's sign flipped, the value right (a step "
                                "along it increases the loss)."), report.diagnosis


def test_mask_applied_wrongly_is_hinted():
    """The mask shifted by one position: only the case where every position counts agrees."""
    def shifted(s, t, mask, temperature):
        return LOSSES["fkl"](s, t, np.roll(mask, 1), temperature=temperature)
    report = check(shifted, "fkl", framework="numpy")
    assert "no known mistake" in report.diagnosis
    assert "1 of 12 cases agree: '(5, 7) all positions, temp 0.5'." in report.diagnosis, report.diagnosis
    assert "Only where every position counts does it agree: the mask is applied wrongly" in report.diagnosis
    other = check(scaled("fkl", lambda s, m, T: 0.5 * (1 + 0.003 * T)), "fkl", framework="numpy")
    assert "Only where every position counts" not in other.diagnosis  # 'temp 1' cases agree there


def test_nonfinite_advice_says_value_or_gradient():
    """A NaN value and a NaN gradient have different causes, with and without -inf logits."""
    def nan_value(s, t, mask, temperature):
        value, grad = LOSSES["fkl"](s, t, mask, temperature=temperature)
        return math.nan, grad

    def nan_gradient(s, t, mask, temperature):
        value, grad = LOSSES["fkl"](s, t, mask, temperature=temperature)
        return value, grad * math.nan
    value_advice = check(nan_value, "fkl", framework="numpy").diagnosis
    gradient_advice = check(nan_gradient, "fkl", framework="numpy").diagnosis
    assert "here in the value itself" in value_advice and "backward pass" not in value_advice
    assert "fixed the value but not the gradient" in gradient_advice and "value itself" not in gradient_advice
    assert "an overflow in the value" in value_advice and "the backward pass alone" not in value_advice
    assert "the backward pass alone meets a division by 0" in gradient_advice
    assert "an overflow in the value" not in gradient_advice


def all_masked_variant(outcome):
    """LOSSES["fkl"]; where no position counts: raise, 0, NaN, a NaN gradient, 0.5 or the unmasked loss."""
    def fn(s, t, mask, temperature):
        if mask.any():
            return LOSSES["fkl"](s, t, mask, temperature=temperature)
        if outcome == "raises":
            raise ZeroDivisionError("no position counts")
        zero = np.zeros(s.shape)
        if outcome == "zero":
            return 0.0, zero
        if outcome == "nan value":
            return math.nan, zero
        if outcome == "nan gradient":
            return 0.0, zero * math.nan
        if outcome == "a value":
            return 0.5, zero
        return LOSSES["fkl"](s, t, None, temperature=temperature)  # "every position": the mask ignored
    return fn


@pytest.mark.parametrize("outcome, passed, words", [
    ("raises", True, None),
    ("zero", True, None),
    ("nan value", True, "the value is NaN (0 / 0) and the gradient 0: accepted"),
    ("nan gradient", False, "the gradient is not 0 (largest entry nan)"),
    ("a value", False, "the value is 0.5, not 0: positions that do not count are counted"),
    ("every position", False, "the gradient is not 0 (largest entry 0.0"),
])
def test_all_masked_batch_may_raise_or_give_0(outcome, passed, words):
    """minitodi raises where no position counts; 0 (TRL, Liger-Kernel, torchtune) passes too."""
    report = check(all_masked_variant(outcome), "fkl", framework="numpy")
    assert report.passed == passed, report
    assert report.rows[-1].case == "(2, 5, 16) no position counted"
    if words:
        assert words in str(report), report
    if not passed:
        assert report.diagnosis.startswith("diagnosis: Where no position counts"), report.diagnosis


def test_long_sequences_are_checked():
    """A loss that counts only the first 32 positions of a sequence passed the battery of ten cases."""
    def first_32(s, t, mask, temperature):
        kept = mask.copy()
        if mask.ndim == 2:
            kept[:, 32:] = False
        return LOSSES["fkl"](s, t, kept, temperature=temperature)
    report = check(first_32, "fkl", framework="numpy")
    failing = [row.case for row in report.rows if row.status == "FAIL"]
    assert failing == ["(1, 256, 24) B=1, temp 1", "(3, 64, 40) long, temp 2"], report


def test_the_attached_formula_is_the_loss(monkeypatch):
    """The variant "weight not detached" calls minitodi.core.losses' ToDi (detach=False), not a copy."""
    from minitodi.core import losses
    calls = []
    original = losses.todi_attached_rows

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(losses, "todi_attached_rows", counted)
    attached_gradient(battery()[1], 2.0)
    assert calls


# --------------------------------------------------------------------------------------------------
# the variants themselves, in float64


def fd_error(f, x, grad):
    """max |grad - central differences of f| / max |grad| over the finite entries of x (x restored).

    Normwise: entries small by cancellation (1e-8 next to 1e-4) carry rounding of the difference quotient
    that an entrywise relative error would blow up. Fourth order, eps 1e-3: worst 1.4e-11 measured.
    """
    numeric = np.zeros_like(x)
    for i in zip(*np.nonzero(np.isfinite(x))):
        numeric[i] = central_difference(f, x, i, eps=1e-3, order=4)
    return np.abs(numeric - grad).max() / np.abs(grad).max()


def _todi_value(student, case, beta):
    """ToDi's value at ``student`` for the case's teacher, mask and temperature."""
    return LOSSES["todi"](student, case.teacher, case.mask, temperature=case.temperature, beta=beta)[0]


def attached_gradient(case, beta):
    """The gradient of the check's variant "ToDi's weight not detached" on ``case``."""
    named = {c.description: c for c in computations("todi", {"beta": beta})}
    return named["ToDi's weight not detached (gradient flows through a)"].value_and_grad(case)[1]


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_todi_not_detached_is_the_gradient_of_the_value(beta):
    """ToDi's value as a function of the student (its weight moving too) against finite differences."""
    cases = battery(seed=3)
    for case in (cases[1], cases[9]):
        s = case.student.copy()
        _, grad = LOSSES["todi"](s, case.teacher, case.mask, temperature=case.temperature, beta=beta)
        attached = attached_gradient(case, beta)
        error = fd_error(functools.partial(_todi_value, s, case, beta), s, attached)
        assert error < 1e-9, (case.name, error)
        detached_error = np.abs(attached - grad).max() / np.abs(grad).max()
        assert detached_error > 1e-2  # the check above could tell the two apart


def test_todi_not_detached_at_beta_1_is_fkl_plus_rkl():
    """At beta = 1 ToDi's value equals FKL + RKL, so the weight's full gradient is theirs."""
    for case in battery(seed=4):
        args = (case.student, case.teacher, case.mask)
        full = attached_gradient(case, 1.0)
        fkl_rkl = LOSSES["fkl"](*args, temperature=case.temperature)[1] + LOSSES["rkl"](
            *args, temperature=case.temperature)[1]
        assert np.abs(full - fkl_rkl).max() <= 1e-12 * np.abs(fkl_rkl).max(), case.name


def test_todi_reversed_weight_variant():
    """FKL + RKL - ToDi equals sum (1 - a) p d - a q d; its gradient holds a at the base point."""
    case = battery(seed=5)[2]
    named = {c.description: c for c in computations("todi", {"beta": 2.0})}
    value, grad = named["ToDi's weight reversed (a on RKL's term, 1 - a on FKL's)"].value_and_grad(case)
    s, T = case.student.copy(), case.temperature
    lp = log_softmax(case.teacher / T)
    a0 = 1 / (1 + np.exp(-2.0 * (lp - log_softmax(s / T))))

    def direct():
        lq = log_softmax(s / T)
        return float((((1 - a0) * np.exp(lp) - a0 * np.exp(lq)) * (lp - lq)).sum(-1)[case.mask].mean())
    assert abs(direct() - value) <= 1e-12 * abs(value)
    assert fd_error(direct, s, grad) < 1e-9


def test_battery_covers_what_it_claims():
    cases = battery()
    assert {c.student.ndim for c in cases} == {2, 3}
    assert min(c.student.shape[-1] for c in cases) == 2 and max(c.student.shape[-1] for c in cases) >= 1000
    assert {c.temperature for c in cases} == {0.5, 1.0, 2.0}
    sequences = [c for c in cases if c.student.ndim == 3]
    assert any(c.student.shape[0] == 1 and c.student.shape[1] >= 256 for c in sequences)  # B = 1, long
    assert sum(c.student.shape[1] >= 64 for c in sequences) >= 2
    assert any(c.mask.sum() == 1 for c in cases) and any(c.mask.all() for c in cases)
    assert sum(0 < c.mask.sum() < c.mask.size for c in cases) >= 6
    assert any((np.exp(log_softmax(c.teacher / c.temperature)).max(-1) > 1 - 1e-6).all() for c in cases)
    with_inf = [c for c in cases if np.isneginf(c.student).any()]
    assert with_inf and all(np.array_equal(np.isneginf(c.student), np.isneginf(c.teacher)) for c in with_inf)
    for fn in LOSSES.values():  # the divergence stays finite there
        values = [fn(c.student, c.teacher, c.mask, temperature=c.temperature)[0] for c in with_inf]
        assert all(math.isfinite(v) for v in values)


# --------------------------------------------------------------------------------------------------
# errors and the command line


def test_torch_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ConformanceError, match="needs PyTorch"):
        check(lambda *a: 0.0, "fkl", framework="torch")


def recording(loss):
    """fn(s, t, mask, temperature, beta=0.5) = LOSSES[loss] (numpy), and the list of its calls."""
    calls = []

    def fn(s, t, mask, temperature, beta=0.5):
        calls.append(beta)
        return LOSSES[loss](s, t, mask, temperature=temperature)
    return fn, calls


BAD_TOLS = (0, -1e-3, math.nan, math.inf, "1e-3", True, None)


@pytest.mark.parametrize("loss, settings, words", [
    ("fkl", {"beta": 0.0}, "fkl has no option 'beta'; its options: none"),
    ("gjsd", {"gamma": 1.0}, "gjsd has no option 'gamma'; its options: beta"),
    ("todi", {"beta": 1.0, "lam": 0.1}, "todi has no option 'lam'; its options: beta"),
    ("gjsd", {"beta": 1.5}, "beta must be 0 <= beta <= 1, got 1.5"),
    ("sfkl", {"lam": "0.1"}, "lam must be 0 < lam < 1"),
    ("fkl", {"temperature": 2.0}, "'temperature' is not an option of a check (the battery sets it"),
    ("todi", {"detach": False}, "'detach' is not an option of a check"),
    ("kl", {}, "unknown loss 'kl'; known: akl, fkl"),
    ("fkl", {"framework": "jax"}, "framework must be one of"),
    ("fkl", {"reduction": "batchmean"}, "reduction must be one of"),
    ("fkl", {"neginf": "no"}, "neginf must be True or False"),
    ("fkl", {"t_squared": 1}, "t_squared must be True or False"),
    ("fkl", {"seed": -1}, "seed must be an integer >= 0"),
] + [("fkl", {"tol": tol}, "tol must be a finite number > 0") for tol in BAD_TOLS])
def test_settings_checked_before_the_function_runs(loss, settings, words):
    """Each bad setting is a one-line ValueError that names it, raised before ``fn`` is ever called."""
    fn, calls = recording("fkl")
    with pytest.raises(ValueError) as raised:
        check(fn, loss, **settings)  # framework="torch" by default: not even imported first
    assert words in str(raised.value) and "\n" not in str(raised.value), raised.value
    assert calls == []


def test_options_given_where_the_signature_takes_them():
    fn, calls = recording("gjsd")  # takes beta, but computes beta = 0.5: the option reaches it
    check(fn, "gjsd", framework="numpy", beta=0.3)
    assert set(calls) == {0.3}

    def fixed_beta(s, t, mask, temperature):  # beta 0.3 built in: it cannot be given
        return LOSSES["gjsd"](s, t, mask, temperature=temperature, beta=0.3)
    report = check(fixed_beta, "gjsd", framework="numpy", beta=0.3)
    assert report.passed and report.notes == [
        "not given to the function (its signature does not take them): beta; the reference uses them"]
    assert "note: not given to the function" in str(report)

    def any_options(s, t, mask, temperature, **options):
        return LOSSES["gjsd"](s, t, mask, temperature=temperature, **options)
    report = check(any_options, "gjsd", framework="numpy", beta=0.3)
    assert report.passed and report.notes == []


SOURCE = '''
import numpy as np
from minitodi.core.losses import LOSSES

def good(s, t, mask, temperature):
    return LOSSES["fkl"](s, t, mask, temperature=temperature)

def summed(s, t, mask, temperature):
    value, grad = LOSSES["fkl"](s, t, mask, temperature=temperature)
    return value * mask.sum(), grad * mask.sum()
'''


def test_cli_exit_status(tmp_path, capsys, monkeypatch):
    path = tmp_path / "mine.py"
    path.write_text(SOURCE)
    base = ["conformance", "--loss", "fkl", "--framework", "numpy"]
    assert cli.main(base + [f"{path}:good"]) == 0
    assert "conforms" in capsys.readouterr().out
    assert cli.main(base + [f"{path}:summed"]) == 1
    assert "sum over positions instead of mean" in capsys.readouterr().out
    assert cli.main(base + [f"{path}:summed", "--reduction", "sum"]) == 0
    capsys.readouterr()
    for target, words in [(f"{tmp_path}/none.py:good", "no such file"),
                          (f"{path}:absent", "no function 'absent'"),
                          (str(path), "FILE.py:FUNCTION")]:
        assert cli.main(base + [target]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "torch", None)
    assert cli.main(["conformance", f"{path}:good", "--loss", "fkl"]) == 2
    assert "needs PyTorch" in capsys.readouterr().err


IMPORT_MARK = """
import pathlib
pathlib.Path(__file__).with_suffix(".imported").touch()
"""


def test_cli_bad_settings_are_one_line_and_exit_2(tmp_path, capsys):
    """Every bad setting is said in one line, exit status 2, before FILE.py is even imported."""
    path = tmp_path / "mine.py"
    path.write_text(SOURCE + IMPORT_MARK)
    bad = [(["--loss", "fkl", "--option", "beta=0"], "fkl has no option 'beta'; its options: none"),
           (["--loss", "gjsd", "--option", "beta=2"], "beta must be 0 <= beta <= 1, got 2"),
           (["--loss", "fkl", "--tol", "0"], "--tol: must be a number in (0, 1), got '0'"),
           (["--loss", "fkl", "--tol", "nan"], "--tol: must be a number in (0, 1), got 'nan'"),
           (["--loss", "fkl", "--tol", "1e300"], "--tol: must be a number in (0, 1), got '1e300'"),
           (["--loss", "fkl", "--timeout", "1e300"],
            "--timeout: must be a number in (0, 604800], got '1e300'"),
           (["--loss", "fkl", "--timeout", "0"], "--timeout: must be a number in (0, 604800], got '0'"),
           (["--loss", "fkl", "--framework", "numpy", "--option", "gamma=1"], "no option 'gamma'"),
           (["--loss", "todi", "--option", "beta=1", "--option", "beta=2"],
            "--option beta given more than once")]
    for extra, words in bad:
        assert exit_status(["conformance", f"{path}:good"] + extra) == 2, extra
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "mine.imported").exists()
    assert cli.main(["conformance", f"{path}:good", "--loss", "fkl", "--framework", "numpy"]) == 0
    assert (tmp_path / "mine.imported").exists()  # the check above could see an import


def load_example(name):
    """examples/NAME.py as a module (examples are scripts, not a package)."""
    path = Path(__file__).parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.mark.usefixtures("torch")
def test_example_verdicts(capsys):
    """examples/check_your_loss.py: the official-style ToDi passes (neginf=False), the rest fail.

    The attached weight and T^2 fail, and so does the official-style ToDi with the case of -inf logits.
    """
    example = load_example("check_your_loss")
    assert example.main() == 0  # the -inf case in, the official-style ToDi fails: that verdict is right too
    out = capsys.readouterr().out
    assert "weight not detached" in out and "T^2 factor applied" in out
    assert "Non-finite on case '(2, 4, 20) -inf entries, temp 2': the gradient is non-finite" in out


# --------------------------------------------------------------------------------------------------
# the libraries people use: examples/check_libraries.py's checks, where the pinned versions are installed


@pytest.mark.parametrize("distribution", ["trl", "liger-kernel"])
def test_library_verdicts(distribution):
    """Every verdict of the example, and the ones issue 24 names, said here again in plain words.

    TRL's generalized_jsd_loss passes at beta 0, 0.1, 0.5, 0.9 and 1 with labels (without the -inf case);
    without labels it ignores the mask and divides the sum by the batch size; on the -inf case its value
    is NaN. Liger's LigerFusedLinearJSDLoss with its default weights is 0.5 x GJSD. Given the mask, each
    returns 0 with a zero gradient where no position counts: accepted.
    """
    example = load_example("check_libraries")
    pinned = example.PINNED[distribution]
    version = example.installed(distribution)
    if version is None:
        pytest.skip(f"{distribution} or torch not installed (.ci/run installs {distribution}=={pinned})")
    if version != pinned:
        pytest.skip(f"{distribution} {version} installed: the verdicts are {pinned}'s")
    _, make_checks = example.LIBRARIES[distribution]
    reports = {item.setting: (item, item.run()) for item in make_checks()}
    wrong = [f"{setting}: {example.summary(report)}" for setting, (item, report) in reports.items()
             if not item.verdict_right(report)]
    assert not wrong, wrong
    no_position = [report.rows[-1] for setting, (_, report) in reports.items()
                   if "no " not in setting and "all labels" not in setting]  # the mask given to the loss
    assert all(row.value == 0 and row.grad_error == 0 for row in no_position), no_position  # 0: accepted
    if distribution == "trl":
        for beta in example.TRL_BETAS:
            assert reports[f"labels, beta={beta:g}"][1].passed
        with_inf = reports["labels, beta=0.5, -inf logits"][1]
        assert not with_inf.passed
        assert "the value is nan and the gradient is non-finite" in with_inf.diagnosis
        without_labels = reports["no labels, beta=0.5"][1].diagnosis
        assert "likely bug: mask ignored" in without_labels
        assert "divided by the batch size B" in without_labels
    else:
        default = reports["LigerFusedLinearJSDLoss, default weights, beta=0.1"][1]
        assert default.diagnosis == "diagnosis: likely bug: value and gradient scaled by 0.5."
        assert reports["LigerFusedLinearJSDLoss, weight_soft_loss=1, beta=0.1"][1].passed


RUNAWAY = '''
import os
import signal
import sys
import time
import numpy as np


def exits(s, t, mask, temperature):
    sys.exit(0)


def exits_at_once(s, t, mask, temperature):  # ended the command with exit status 0 and no output
    os._exit(0)


def raises_keyboard_interrupt(s, t, mask, temperature):
    raise KeyboardInterrupt


def presses_ctrl_c(s, t, mask, temperature):  # as the user's Ctrl-C would
    signal.raise_signal(signal.SIGINT)


def returns_objects(s, t, mask, temperature):
    return 0.5, np.zeros(s.shape, dtype=object)


def returns_a_vector(s, t, mask, temperature):
    return np.zeros(s.shape[:-1]), np.zeros(s.shape)


def returns_a_float(s, t, mask, temperature):
    return 0.5


def returns_none(s, t, mask, temperature):
    return None


def returns_nan(s, t, mask, temperature):
    return float("nan"), np.zeros(s.shape)


def hangs(s, t, mask, temperature):
    time.sleep(60)


STUBBORN_UNTIL = time.monotonic() + 10.0


def stubborn(s, t, mask, temperature):  # swallows whatever a timer raises; then returns a wrong loss
    while time.monotonic() < STUBBORN_UNTIL:
        try:
            time.sleep(0.05)
        except BaseException:
            pass
    return 0.0, np.zeros(s.shape)


def generator_exit(s, t, mask, temperature):
    raise GeneratorExit


def complex_gradient(s, t, mask, temperature):
    from minitodi.core.losses import LOSSES
    value, grad = LOSSES["fkl"](s, t, mask, temperature=temperature)
    return value, grad + 1j


def complex_value(s, t, mask, temperature):
    from minitodi.core.losses import LOSSES
    value, grad = LOSSES["fkl"](s, t, mask, temperature=temperature)
    return complex(value), grad


def divides_in_place(s, t, mask, temperature):
    from minitodi.core.losses import LOSSES
    s /= temperature
    return LOSSES["fkl"](s, t, mask, temperature=1.0)
'''


@pytest.mark.parametrize("name, words", [
    ("exits", "raised SystemExit"),
    ("generator_exit", "raised GeneratorExit"),
    ("raises_keyboard_interrupt", "raises_keyboard_interrupt raised KeyboardInterrupt on logits"),
    ("returns_objects", "got ndarray of shape (6, 2) and dtype object"),
    ("complex_gradient", "the gradient it returned is complex (complex128)"),
    ("complex_value", "the loss it returned is complex"),
    ("divides_in_place", "changed its argument student_logits in place"),
    ("returns_a_vector", "must be one number"),
    ("returns_a_float", "must return (loss, grad)"),
    ("returns_none", "must return (loss, grad), got NoneType"),
])
def test_cli_a_function_that_cannot_be_run_exits_3_with_one_line(tmp_path, capsys, name, words):
    """'Could not run' (exit 3) is never 'passes' (0) nor 'differs' (1), and never a traceback."""
    path = tmp_path / "runaway.py"
    path.write_text(RUNAWAY)
    assert cli.main(["conformance", f"{path}:{name}", "--loss", "fkl", "--framework", "numpy"]) == 3
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_cli_the_users_ctrl_c_is_an_interruption(tmp_path, capsys):
    """SIGINT while the function runs is the user's Ctrl-C (exit 130), not the function's own raise (3)."""
    path = tmp_path / "runaway.py"
    path.write_text(RUNAWAY)
    argv = ["conformance", f"{path}:presses_ctrl_c", "--loss", "fkl", "--framework", "numpy"]
    sigint_before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    exit_before = os._exit
    try:
        assert cli.main(argv) == 130
        assert "interrupted" in capsys.readouterr().err
        assert os._exit is exit_before  # restored after
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job started in the background: left ignored
        assert cli.main(argv) == 3
        assert "must return (loss, grad), got NoneType" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, sigint_before)


def test_cli_keyboard_interrupt_in_the_timed_process_is_one_line(tmp_path, capfd):
    """The child's KeyboardInterrupt was a 25-line traceback on stderr (the child's, seen at the fd)."""
    path = tmp_path / "runaway.py"
    path.write_text(RUNAWAY)
    argv = ["conformance", f"{path}:raises_keyboard_interrupt", "--loss", "fkl", "--framework", "numpy",
            "--timeout", "20"]
    assert cli.main(argv) == 3
    err = capfd.readouterr().err
    assert "raised KeyboardInterrupt" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("target, words", [
    ("runaway.py:exits_at_once", "exits_at_once called os._exit(0) on logits"),
    ("quits_at_once.py:fn", "quits_at_once.py failed: ExitCalled: os._exit(0)"),
])
def test_cli_os_exit_is_not_a_pass(tmp_path, target, words):
    """os._exit(0), in the function or at import, ended the command with exit status 0 and no output.

    Run as a command: in this process the bug would end pytest itself, as quietly.
    """
    (tmp_path / "runaway.py").write_text(RUNAWAY)
    (tmp_path / "quits_at_once.py").write_text("import os\nos._exit(0)\n")
    argv = [sys.executable, "-m", "minitodi", "conformance", f"{tmp_path}/{target}", "--loss", "fkl",
            "--framework", "numpy"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and done.stdout == ""
    assert words in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_cli_a_file_that_exits_at_import_is_not_a_pass(tmp_path, capsys):
    path = tmp_path / "quits.py"
    path.write_text("import sys\nsys.exit(0)\n")
    assert cli.main(["conformance", f"{path}:fn", "--loss", "fkl", "--framework", "numpy"]) == 3
    err = capsys.readouterr().err
    assert "importing" in err and "failed: SystemExit" in err


def test_cli_a_nan_loss_differs_and_is_said_to(tmp_path, capsys):
    path = tmp_path / "runaway.py"
    path.write_text(RUNAWAY)
    assert cli.main(["conformance", f"{path}:returns_nan", "--loss", "fkl", "--framework", "numpy"]) == 1
    out = capsys.readouterr().out
    assert "T^2" not in out.split("diagnosis", 1)[-1]


@pytest.mark.parametrize("name", ["hangs", "stubborn"])
def test_cli_a_hanging_function_gives_up_at_the_timeout(tmp_path, capsys, name):
    """A function that catches what a timer raises (``except BaseException``) is stopped all the same.

    Without a process of its own, ``stubborn`` ran 10 s past the timeout, then returned a wrong loss:
    exit 1.
    """
    path = tmp_path / "runaway.py"
    path.write_text(RUNAWAY)
    argv = ["conformance", f"{path}:{name}", "--loss", "fkl", "--framework", "numpy", "--timeout", "0.5"]
    start = time.monotonic()
    assert cli.main(argv) == 3
    assert time.monotonic() - start < 9  # before stubborn would have given up by itself
    err = capsys.readouterr().err
    assert "did not return within 0.5 s (--timeout); it was stopped" in err and len(err.splitlines()) == 1
    assert exit_status(argv[:-1] + ["-1"]) == 2


def test_cli_without_timeout_runs_in_this_process(tmp_path, capsys, monkeypatch):
    """The default path starts no process (a fresh interpreter costs 0.1 s, 0.9 s with PyTorch)."""
    def no_process(*args, **kwargs):
        raise AssertionError("a process was started without --timeout")
    monkeypatch.setattr(conformance, "_run_in_process", no_process)
    path = tmp_path / "mine.py"
    path.write_text(SOURCE)
    assert cli.main(["conformance", f"{path}:good", "--loss", "fkl", "--framework", "numpy"]) == 0
    assert "conforms" in capsys.readouterr().out


def test_cli_timeout_reports_as_in_process(tmp_path, capsys):
    """With --timeout the report comes back from the child: the same verdicts, exit statuses and lines."""
    path = tmp_path / "mine.py"
    path.write_text(SOURCE)
    base = ["conformance", "--loss", "fkl", "--framework", "numpy", "--timeout", "60"]
    assert cli.main(base + [f"{path}:summed"]) == 1
    assert "sum over positions instead of mean" in capsys.readouterr().out
    assert cli.main(base + [f"{path}:absent"]) == 2  # known only once the child has imported the file
    err = capsys.readouterr().err
    assert "no function 'absent'" in err and len(err.splitlines()) == 1


TORCH_RUNAWAY = '''
import torch


def fkl(s, t, mask, temperature):
    log_q = torch.log_softmax(s / temperature, -1)
    log_p = torch.log_softmax(t / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)[mask].mean()


def calls_backward(s, t, mask, temperature):
    loss = fkl(s, t, mask, temperature)
    loss.backward()
    return loss


def divides_teacher_in_place(s, t, mask, temperature):
    t /= temperature  # the caller's teacher logits changed; the loss itself is right
    return fkl(s, t * temperature, mask, temperature)


def complex_loss(s, t, mask, temperature):
    return fkl(s, t, mask, temperature).to(torch.complex128)


def changes_the_mask(s, t, mask, temperature):
    loss = fkl(s, t, mask, temperature)
    mask.fill_(True)
    return loss
'''


@pytest.mark.usefixtures("torch")
@pytest.mark.parametrize("name, words", [
    ("calls_backward", "calls_backward called backward() itself"),
    ("divides_teacher_in_place", "changed its argument teacher_logits in place"),
    ("complex_loss", "the loss it returned is complex (torch.complex128)"),
    ("changes_the_mask", "changed its argument mask in place"),
])
def test_cli_torch_function_that_cannot_be_run_exits_3(tmp_path, capsys, name, words):
    """Each of these once raised out of the check (exit 2, a usage error) or passed; now exit 3, one line."""
    path = tmp_path / "runaway.py"
    path.write_text(TORCH_RUNAWAY)
    assert cli.main(["conformance", f"{path}:{name}", "--loss", "fkl", "--no-neginf"]) == 3
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("raised", ["KeyboardInterrupt", "GeneratorExit"])
def test_cli_a_file_that_raises_keyboard_interrupt_at_import_could_not_run(tmp_path, capsys, raised):
    """A KeyboardInterrupt raised at import was taken for the user's Ctrl-C: exit 130 "interrupted"."""
    path = tmp_path / "interrupts.py"
    path.write_text(f"raise {raised}\n")
    assert cli.main(["conformance", f"{path}:fn", "--loss", "fkl", "--framework", "numpy"]) == 3
    err = capsys.readouterr().err
    assert f"importing {path} failed: {raised}" in err and len(err.strip().splitlines()) == 1, err
