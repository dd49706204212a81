"""minitodi.conformance: correct float32 implementations pass, each single-bug variant fails and is named.

The implementations under test are written here, in the style of public code (the official ToDi code's
float32 log-softmaxes, masked_fill of -inf entries, a sum over positions divided by the counted ones),
once for PyTorch (autograd gives the gradient; skipped without torch) and once for NumPy (the gradient
written out). Each bug is one change to a correct implementation.
"""

import functools
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from minitodi import cli
from minitodi.conformance import ConformanceError, _todi_attached_extra, _variants, battery, check
from minitodi.gradcheck import central_difference
from minitodi.losses import LOSSES, log_softmax

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


@pytest.mark.parametrize("loss", ["jsd", "tvd", "sfkl", "srkl", "akl"])
def test_torch_official_baselines(loss):
    """Measured worst 7.2e-5 (srkl, seeds 0 to 5); the same code with a T^2 factor is caught."""
    assert check(torch_baseline(loss), loss).passed
    report = check(torch_baseline(loss, "t2"), loss)
    assert not report.passed and "T^2 factor applied" in report.diagnosis, report


@pytest.mark.parametrize("loss, options", CORRECT_CASES)
def test_torch_float32_official_style_passes(loss, options):
    report = check(torch_loss(loss), loss, framework="torch", **options)
    assert report.passed, report
    worst = max(max(r.value_error, r.grad_error) for r in report.rows if r.status == "ok")
    assert worst < 3e-5  # float32 rounding, measured worst 1.1e-5: 1e-3 leaves a wide margin
    if loss == "todi":  # sigmoid(-inf - -inf) = NaN: the official code's gradient is NaN there, reported
        assert [r.status for r in report.rows].count("nan") == 1 and "Non-finite" in report.diagnosis


@pytest.mark.parametrize("loss, options, bug", BUG_CASES)
def test_torch_single_bug_fails_and_is_named(loss, options, bug):
    report = check(torch_loss(loss, bug), loss, framework="torch", **options)
    assert not report.passed
    assert BUGS[bug] in report.diagnosis and "; or" not in report.diagnosis, report.diagnosis
    assert min(max(r.value_error, r.grad_error) for r in report.rows if r.status == "FAIL") > 1e-3


def test_torch_other_convention_is_declared():
    fn = torch_loss("todi", "t2")  # T^2 times the mean
    assert check(fn, "todi", t_squared=True).passed

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
    assert check(lambda *args: fkl(*args, "batchmean"), "fkl").passed


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
    assert not report.passed and sum(r.status == "FAIL" for r in report.rows) == len(report.rows) - 1


# --------------------------------------------------------------------------------------------------
# NumPy implementations: value and gradient written out, float32


def numpy_loss(kind, bug=None):
    """fn(s, t, mask, temperature, beta=1) -> (loss, grad) in float32, with one bug."""
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
        n = mask.sum() * (1 / T ** 2 if bug == "t2" else 1) / (mask.sum() if bug == "sum" else 1)
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
        lp, lq = log_softmax(t / T), log_softmax(s / T)
        value = -(np.exp(lp) * np.where(np.isneginf(lq), 0, lq)).sum(-1)[mask].mean()
        return value, LOSSES["fkl"](s, t, mask, temperature=T)[1]
    report = check(cross_entropy, "fkl", framework="numpy")
    assert not report.passed and "likely bug: cross-entropy" in report.diagnosis, report.diagnosis

    def shifted(s, t, mask, T):
        value, grad = LOSSES["rkl"](s, t, mask, temperature=T)
        return value + 0.5, grad
    report = check(shifted, "rkl", framework="numpy")
    assert not report.passed and "the gradient agrees but the value does not" in report.diagnosis


def test_value_right_gradient_wrong_is_said():
    def wrong_grad(s, t, mask, T):
        value, grad = LOSSES["fkl"](s, t, mask, temperature=T)
        return value, grad * 1.5
    report = check(wrong_grad, "fkl", framework="numpy")
    assert not report.passed and "the value agrees but the gradient does not" in report.diagnosis


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


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_todi_not_detached_is_the_gradient_of_the_value(beta):
    """ToDi's value as a function of the student (its weight moving too) against finite differences."""
    cases = battery(seed=3)
    for case in (cases[1], cases[9]):
        s = case.student.copy()
        _, grad = LOSSES["todi"](s, case.teacher, case.mask, temperature=case.temperature, beta=beta)
        attached = grad + _todi_attached_extra(case, beta)
        error = fd_error(functools.partial(_todi_value, s, case, beta), s, attached)
        assert error < 1e-9, (case.name, error)
        detached_error = np.abs(attached - grad).max() / np.abs(grad).max()
        assert detached_error > 1e-2  # the check above could tell the two apart


def test_todi_not_detached_at_beta_1_is_fkl_plus_rkl():
    """At beta = 1 ToDi's value equals FKL + RKL, so the weight's full gradient is theirs."""
    for case in battery(seed=4):
        args = (case.student, case.teacher, case.mask)
        _, grad = LOSSES["todi"](*args, temperature=case.temperature)
        full = grad + _todi_attached_extra(case, 1.0)
        fkl_rkl = LOSSES["fkl"](*args, temperature=case.temperature)[1] + LOSSES["rkl"](
            *args, temperature=case.temperature)[1]
        assert np.abs(full - fkl_rkl).max() <= 1e-12 * np.abs(fkl_rkl).max(), case.name


def test_todi_reversed_weight_variant():
    """FKL + RKL - ToDi equals sum (1 - a) p d - a q d; its gradient holds a at the base point."""
    case = battery(seed=5)[2]
    variants = _variants("todi", {"beta": 2.0}, "mean", False)
    f, _ = variants["ToDi's weight reversed (a on RKL's term, 1 - a on FKL's)"]
    value, grad = f(case)
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


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown loss"):
        check(numpy_loss("fkl"), "kl", framework="numpy")
    with pytest.raises(ValueError, match="framework"):
        check(numpy_loss("fkl"), "fkl", framework="jax")
    with pytest.raises(ConformanceError, match="raised TypeError"):
        check(numpy_loss("fkl"), "fkl", framework="numpy", gamma=1.0)


SOURCE = '''
import numpy as np
from minitodi.losses import LOSSES

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


@pytest.mark.usefixtures("torch")
def test_example_verdicts(capsys):
    """examples/check_your_loss.py: the official-style ToDi passes, the attached weight and T^2 fail."""
    path = Path(__file__).parent.parent / "examples" / "check_your_loss.py"
    spec = importlib.util.spec_from_file_location("check_your_loss", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main() == 0
    out = capsys.readouterr().out
    assert "weight not detached" in out and "T^2 factor applied" in out
