r"""Check someone else's distillation loss against minitodi's: the same value and gradient, or what differs.

    report = check(fn, "todi", framework="torch", beta=2.0)
    print(report)      # a row per case, then the diagnosis
    report.passed      # True when every case agrees with LOSSES["todi"] within ``tol``

``fn(student_logits, teacher_logits, mask, temperature, **options)`` gets logits (..., V) and a bool mask
(...), True where a position counts (``temperature`` goes by name where ``fn`` has a parameter so named,
else fourth). framework="torch": float64 tensors, the student's with requires_grad; ``fn`` returns a
scalar tensor, differentiated by autograd. framework="numpy": arrays; ``fn`` returns (loss, dloss/ds).

**Convention.** minitodi's: p = softmax(t / T), q = softmax(s / T), the mean over counted positions of
the divergence summed over the vocabulary, no T^2. Another is declared: ``reduction="sum"`` (over counted
positions), ``t_squared=True`` (times T^2); the reference is scaled to match.

**Errors.** Per case, value error |v - r| / |r| and gradient error max|g - dr| / max(max|dr|, 0.01 u),
normwise (an entry small by cancellation weighs no more than its size), u = 1/(N T) the gradient's unit
(FKL's |q - p| <= 1) times the convention's factor; the floor matters only where distributions saturate
(JSD, TVD at large logits: gradients ~1e-4 u, float32 cancellation). A case passes when both are below
``tol``. The default, 1e-3, is 100 times the worst error of FKL, RKL and ToDi computed in float32 as the
official code does (7.4e-6; its JSD, TVD, skew KLs, AKL: 7.2e-5); every single-bug variant of them
misses by more than 0.18 (seeds 0 to 5).

**-inf entries.** One case has -inf in both logits at the same entries (p = q = 0, every divergence
finite). The official ToDi code's gradient is NaN there (sigmoid(-inf - -inf), and 0 * NaN passes
masked_fill's backward): a non-finite result on that case is reported ("nan"), not failed.

**Diagnosis.** The known wrong variants matching ``fn`` on every case are named (float64, from LOSSES):
T^2 applied or missing, sum for mean or back, a mean over all positions or also over V, the mask ignored,
the temperature on one side only, FKL and RKL swapped, cross-entropy for FKL; ToDi's weight reversed
(FKL + RKL - ToDi: ToDi is linear in its detached weight), not detached, beta ignored.

**ToDi's weight not detached.** D = sum_v (a_v p_v - (1 - a_v) q_v) d_v, d_v = log p_v - log q_v,
a_v = sigmoid(beta d_v). Detached, g_v = dD/d(log q_v) = -a_v p_v + (1 - a_v) q_v (1 - d_v). Through the
weight autograd adds h_v = dD/da_v da_v/d(log q_v) = (p_v + q_v) d_v (-beta a_v (1 - a_v)), which reaches
the logits through log-softmax like any g: dloss/ds += (h - q sum_v h_v) / (N T) at counted positions.
"""

import importlib.util
import inspect
import math
import os
from dataclasses import dataclass

import numpy as np

from .losses import LOSSES, log_softmax

DEFAULT_TOL = 1e-3
GRAD_FLOOR = 1e-2  # gradient errors are relative to at least this fraction of the unit 1/(N T)
FRAMEWORKS = ("torch", "numpy")
REDUCTIONS = ("mean", "sum")


class ConformanceError(RuntimeError):
    """The function under test could not be run.

    It raised, returned the wrong thing, or needs a framework that is not installed.
    """


@dataclass
class Case:
    """One input of the battery: float64 logits (..., V), a bool mask (...), a temperature."""

    name: str
    student: np.ndarray
    teacher: np.ndarray
    mask: np.ndarray
    temperature: float


def battery(seed=0):
    """The cases the function under test is run on, drawn from ``seed``.

    (B, T, V) and (N, V); V = 2 to 1000; T = 0.5, 1, 2; logits ~ scale * N(0, 1) with scales 0.01 to 6;
    partial, single-position and full masks (a partial mask always has positions on and off); a teacher
    near one-hot (p of the runner-up ~ e^-22); -inf in both logits at the same entries.
    """
    rng = np.random.default_rng(seed)

    def case(name, shape, s_scale, t_scale, temperature, mask="partial"):
        student = s_scale * rng.standard_normal(shape)
        teacher = t_scale * rng.standard_normal(shape)
        positions = shape[:-1]
        if mask == "partial":
            counted = rng.random(positions) < 0.6
            counted.flat[0] = True  # a partial mask always has positions on and off
            counted.flat[-1] = False
        elif mask == "single":
            counted = np.zeros(positions, dtype=bool)
            counted.flat[shape[0] // 2] = True
        else:  # "all"
            counted = np.ones(positions, dtype=bool)
        return Case(f"{shape} {name}", student, teacher, counted, temperature)

    cases = [case("V=2, temp 1", (6, 2), 1, 1, 1.0),
             case("temp 0.5", (2, 3, 11), 2, 2, 0.5),
             case("temp 2", (3, 4, 50), 1, 1, 2.0),
             case("logits x4, temp 1", (2, 5, 1000), 4, 4, 1.0),
             case("one position, temp 2", (4, 64), 1, 1, 2.0, mask="single"),
             case("all positions, temp 0.5", (5, 7), 1, 1, 0.5, mask="all"),
             case("logits x6, temp 0.5", (2, 3, 32), 6, 6, 0.5),
             case("student ~uniform, temp 2", (2, 3, 16), 0.01, 2, 2.0),
             case("teacher ~one-hot, temp 1", (3, 4, 100), 1, 1, 1.0),
             case("-inf entries, temp 2", (2, 4, 20), 1, 1, 2.0)]
    one_hot = cases[8].teacher
    winners = rng.integers(0, 100, one_hot.shape[:-1])[..., None]
    np.put_along_axis(one_hot, winners, 25.0, axis=-1)
    holes = rng.random(cases[9].student.shape) < 0.3
    holes[..., 0] = False  # every row keeps a finite entry
    cases[9].student[holes] = -math.inf
    cases[9].teacher[holes] = -math.inf
    return cases


# --------------------------------------------------------------------------------------------------
# the reference and its known wrong variants, in float64
def _todi_attached_extra(case, beta):
    """What autograd adds to ToDi's gradient when the weight is not detached (module docstring)."""
    T = case.temperature
    lq = log_softmax(case.student / T)
    lp = log_softmax(case.teacher / T)
    both = np.isneginf(lq) & np.isneginf(lp)  # p = q = 0: no term
    d = np.where(both, 0.0, lp) - np.where(both, 0.0, lq)
    q = np.exp(lq)
    p = np.exp(lp)
    a = 0.5 + 0.5 * np.tanh(0.5 * beta * d)  # sigmoid(beta d), no overflow
    h = -beta * a * (1 - a) * (p + q) * d
    dz = h - q * h.sum(axis=-1, keepdims=True)
    return np.where(case.mask[..., None], dz, 0.0) / (case.mask.sum() * T)


def _teacher_entropy(case):
    """Mean over counted positions of H(p) = -sum_v p_v log p_v (0 log 0 = 0)."""
    lp = log_softmax(case.teacher / case.temperature)
    plogp = np.exp(lp) * np.where(np.isneginf(lp), 0.0, lp)
    return -float(plogp.sum(axis=-1)[case.mask].mean())


def _variants(loss, options, reduction, t_squared):
    """The reference and the known wrong variants of ``LOSSES[loss]``, as ``{description: (f, k)}``.

    f(case) -> (value, grad) in minitodi's convention and k(case) the factor to the declared one (N for a
    sum, T^2); "reference" first, then the known wrong variants.
    """
    def call(name=loss, opts=options, masked=True, teacher=lambda c: c.teacher, T=None):
        def f(c):
            mask = c.mask if masked else None
            temperature = T or c.temperature
            return LOSSES[name](c.student, teacher(c), mask, temperature=temperature, **opts)
        return f

    def k(red=reduction, t2=t_squared, positions=lambda c: c.mask.sum()):
        def factor(c):
            sum_factor = positions(c) if red == "sum" else 1  # a sum is N times the mean
            t2_factor = c.temperature ** 2 if t2 else 1
            return sum_factor * t2_factor
        return factor

    other = "mean" if reduction == "sum" else "sum"
    t2_bug = "missing" if t_squared else "applied"
    out = {
        "reference": (call(), k()),
        f"T^2 factor {t2_bug}": (call(), k(t2=not t_squared)),
        f"{other} over positions instead of {reduction}": (call(), k(red=other)),
        "mask ignored (every position counted)": (call(masked=False), k(positions=lambda c: c.mask.size)),
        "temperature on the student only": (call(teacher=lambda c: c.teacher * c.temperature), k()),
        "temperature on the teacher only": (call(teacher=lambda c: c.teacher / c.temperature, T=1.0), k()),
    }
    out["divided by V too (F.kl_div's reduction='mean' averages over every element)"] = (
        call(), lambda c: k()(c) / c.student.shape[-1])
    if reduction == "mean":
        out["mean over all positions, masked ones in the count"] = (
            call(), lambda c: c.mask.sum() / c.mask.size * k()(c))
    swap = {"fkl": "rkl", "rkl": "fkl"}.get(loss)
    if swap:
        out[f"FKL and RKL swapped ({swap} computed)"] = (call(swap, {}), k())
    if loss == "fkl":
        def plus_entropy(c):  # KL + H(p): cross-entropy
            v, g = call()(c)
            return v + _teacher_entropy(c), g
        out["cross-entropy -sum p log q instead of KL (value off by the teacher's entropy)"] = (
            plus_entropy, k())
    if loss == "todi":
        for name, f in _todi_variants(call, options).items():
            out[name] = (f, k())
    return out


def _todi_variants(call, options):
    """ToDi's own wrong variants, ``{description: f}``; ``call`` builds a loss as in :func:`_variants`."""
    def reversed_weight(c):  # (1 - a) on FKL's term, a on RKL's: FKL + RKL - ToDi (weight detached)
        vf, gf = call("fkl", {})(c)
        vr, gr = call("rkl", {})(c)
        vt, gt = call()(c)
        return vf + vr - vt, gf + gr - gt

    def attached(c):
        v, g = call()(c)
        return v, g + _todi_attached_extra(c, options.get("beta", 1.0))

    return {"ToDi's weight reversed (a on RKL's term, 1 - a on FKL's)": reversed_weight,
            "ToDi's weight not detached (gradient flows through a)": attached,
            "beta ignored (beta = 1 used)": call(opts={**options, "beta": 1.0})}


# --------------------------------------------------------------------------------------------------
# running the function under test
def _adapter(fn, framework):
    """f(case, options) -> (value, grad as float64 array), calling ``fn`` the framework's way."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    try:
        by_name = "temperature" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # None (only the framework is checked) or a callable with no signature
        by_name = False

    def call(s, t, mask, T, options):
        try:
            if by_name:
                return fn(s, t, mask, temperature=T, **options)
            return fn(s, t, mask, T, **options)
        except Exception as err:
            name = getattr(fn, "__name__", "the function")
            raise ConformanceError(f"{name} raised {type(err).__name__} "
                                   f"on logits {tuple(s.shape)} at temperature {T:g}: {err}") from err

    if framework == "torch":
        return _torch_adapter(call)

    def run(case, options):
        value, grad = call(case.student.copy(), case.teacher.copy(), case.mask.copy(), case.temperature,
                           options)
        return float(value), np.asarray(grad, dtype=np.float64)

    return run


def _torch_adapter(call):
    """PyTorch is imported here and nowhere else: it is never a dependency of minitodi."""
    try:
        import torch
    except ImportError:
        raise ConformanceError("framework 'torch' needs PyTorch, which is not installed "
                               "(pip install torch, or check with framework='numpy')") from None

    def run(case, options):
        s = torch.tensor(case.student, dtype=torch.float64, requires_grad=True)
        t = torch.tensor(case.teacher, dtype=torch.float64)
        loss = call(s, t, torch.tensor(case.mask), case.temperature, options)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise ConformanceError(f"the function must return a scalar tensor, got {type(loss).__name__} "
                                   f"{tuple(getattr(loss, 'shape', ()))}")
        grad = None
        if loss.requires_grad:
            grad = torch.autograd.grad(loss, s, allow_unused=True)[0]
        if grad is None:  # the loss does not depend on the student's logits
            return loss.item(), np.zeros(s.shape)
        return loss.item(), grad.detach().numpy().astype(np.float64)

    return run


def _errors(got, want, scale):
    """(value error, gradient error) of ``got`` against ``want``, inf where ``got`` is not finite.

    The denominators are at least ``scale`` = the reference's (value, gradient) sizes (some variants
    are ~0).
    """
    v, g = got
    rv, rg = want
    sv, sg = scale
    if g.shape != rg.shape:
        raise ConformanceError(f"the gradient has shape {g.shape}; the logits have {rg.shape}")
    if not (math.isfinite(v) and np.isfinite(g).all()):
        return math.inf, math.inf
    value_error = abs(v - rv) / max(abs(rv), sv, 1e-300)
    grad_error = float(np.abs(g - rg).max() / max(np.abs(rg).max(), sg, 1e-300))
    return value_error, grad_error


@dataclass
class Row:
    """One case: the function's value, the reference's, both errors and "ok", "FAIL" or "nan"."""

    case: str
    value: float
    reference: float
    value_error: float
    grad_error: float
    status: str


@dataclass
class Report:
    """The outcome: a Row per case, ``passed``, the ``diagnosis``; ``str(report)`` is the table."""

    loss: str
    settings: str
    tol: float
    rows: list
    diagnosis: str

    @property
    def passed(self):
        return all(row.status != "FAIL" for row in self.rows)

    def __str__(self):
        lines = [f"{self.loss} ({self.settings}), tolerance {self.tol:g}",
                 f"{'case':<36}{'value':>13}{'reference':>13}{'value err':>11}{'grad err':>11}"]
        for r in self.rows:
            lines.append(f"{r.case:<36}{r.value:>13.6g}{r.reference:>13.6g}{r.value_error:>11.1e}"
                         f"{r.grad_error:>11.1e}  {r.status}")
        count = {s: sum(r.status == s for r in self.rows) for s in ("ok", "FAIL", "nan")}
        verdict = "passed" if self.passed else "FAILED"
        counts = ", ".join(f"{n} {s}" for s, n in count.items() if n)
        lines.append(f"{verdict}: {counts} of {len(self.rows)} cases")
        lines.append(self.diagnosis)
        return "\n".join(lines)


def check(fn, loss, *, framework="torch", reduction="mean", t_squared=False, tol=DEFAULT_TOL, seed=0,
          **options):
    """Run ``fn`` over :func:`battery` (``seed``) and compare it with ``LOSSES[loss]``; returns a Report.

    ``**options``: the loss's options, passed to both. ``reduction`` and ``t_squared`` declare ``fn``'s
    convention; ``tol``: the largest relative error that passes.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known: {', '.join(sorted(LOSSES))}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    run = _adapter(fn, framework)
    cases = battery(seed)
    got = [run(case, options) for case in cases]
    table = _variants(loss, options, reduction, t_squared)
    variants = {}
    for name, (f, k) in table.items():  # each variant's (value, grad) per case, in the declared convention
        variants[name] = [tuple(x * k(c) for x in f(c)) for c in cases]
    reference = variants.pop("reference")
    reference_factor = table["reference"][1]
    units = [reference_factor(c) / (c.mask.sum() * c.temperature) for c in cases]
    scales = [(abs(v), max(np.abs(g).max(), GRAD_FLOOR * u)) for (v, g), u in zip(reference, units)]
    rows = []
    for case, g, r, scale in zip(cases, got, reference, scales):
        ve, ge = _errors(g, r, scale)
        excused = not math.isfinite(ve) and bool(np.isneginf(case.student).any())
        rows.append(Row(case.name, g[0], r[0], ve, ge, _status(ve, ge, excused, tol)))
    t2 = "times T^2" if t_squared else "no T^2"
    settings = [f"{k}={v}" for k, v in options.items()]
    settings += [framework, f"{reduction} over counted positions", t2]
    diagnosis = _diagnose(rows, got, reference, scales, variants, tol)
    return Report(loss, ", ".join(settings), tol, rows, diagnosis)


def _status(value_error, grad_error, excused, tol):
    """A row's status: "nan" for a non-finite result on a case with -inf logits, else "ok" or "FAIL"."""
    if excused:
        return "nan"
    if max(value_error, grad_error) < tol:
        return "ok"
    return "FAIL"


def _diagnose(rows, got, reference, scales, variants, tol):
    """The likely bug: every wrong variant that matches the function on each case it can be judged on."""
    judged = [i for i, row in enumerate(rows) if row.status != "nan"]
    nan_note = ""
    if len(judged) != len(rows):
        nan_note = (" Non-finite results where logits are -inf (reported, not failed; the official code does "
                    "this too): leave entries with p = q = 0 out of every product, the weight's included.")
    if all(rows[i].status == "ok" for i in judged):
        return "diagnosis: conforms: the same value and gradient as minitodi's on every case." + nan_note

    def worst_error(result, expected):
        """The largest error of ``result`` against ``expected`` over the judged cases."""
        return max(max(_errors(result[i], expected[i], scales[i])) for i in judged)

    # a variant that equals the reference on this battery names no bug
    distinct = {name: variant for name, variant in variants.items() if worst_error(variant, reference) >= tol}
    matches = [name for name, variant in distinct.items() if worst_error(got, variant) < tol]
    if matches:
        return "diagnosis: likely bug: " + "; or ".join(matches) + "." + nan_note
    hint = _mismatch_hint(rows, judged, tol)
    closest = min(distinct, key=lambda name: worst_error(got, distinct[name]), default=None)
    if not closest:
        return f"diagnosis: {hint}." + nan_note
    return (f"diagnosis: {hint}; closest known variant: {closest} (worst error "
            f"{worst_error(got, distinct[closest]):.1e})." + nan_note)


def _mismatch_hint(rows, judged, tol):
    """What a failure with no matching variant looks like: the value or the gradient alone wrong, or both."""
    values_ok = all(rows[i].value_error < tol for i in judged)
    grads_ok = all(rows[i].grad_error < tol for i in judged)
    if values_ok:
        return ("the value agrees but the gradient does not (a stop-gradient missing or extra, or a "
                "hand-written backward)")
    if grads_ok:
        return "the gradient agrees but the value does not (a constant added?)"
    return "no single known bug matches"


def load_function(target):
    """``FILE.py:FUNCTION`` -> the function; FileNotFoundError or ValueError with a one-line message."""
    path, sep, name = target.rpartition(":")
    if not sep or not path.endswith(".py") or not name:
        raise ValueError(f"expected FILE.py:FUNCTION, got {target!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    module_name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise ConformanceError(f"importing {path} failed: {type(err).__name__}: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{path} defines no function {name!r}")
    return fn


def run_target(target, loss, *, framework="torch", tol=None, **settings):
    """``minitodi conformance``: check ``FILE.py:FUNCTION``, print the report; 0 if it passes, 1 if not."""
    _adapter(None, framework)  # a missing framework is said before the file is imported
    if tol is None:
        tol = DEFAULT_TOL
    report = check(load_function(target), loss, framework=framework, tol=tol, **settings)
    print(report)
    return 0 if report.passed else 1
