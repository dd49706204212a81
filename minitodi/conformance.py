r"""Check someone else's distillation loss against minitodi's: the same function and gradient, or what differs.

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
normwise, u = 1/(N T) the gradient's unit (FKL's |q - p| <= 1) times the convention's factor; the floor
matters only where distributions saturate (JSD, TVD at large logits: gradients ~1e-4 u, float32
cancellation). A case passes when both are below ``tol``. The default, 1e-3, is 100 times the worst
error of FKL, RKL and ToDi computed in float32 as the official code does (7.4e-6; its JSD, TVD, skew
KLs, AKL: 7.2e-5); every single-bug variant of them misses by more than 0.18 (seeds 0 to 5).

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
    """The function under test could not be run (raised, returned the wrong thing, needs a missing framework)."""


@dataclass
class Case:
    """One input of the battery: float64 logits (..., V), a bool mask (...), a temperature."""
    name: str
    student: np.ndarray
    teacher: np.ndarray
    mask: np.ndarray
    temperature: float


def battery(seed=0):
    """The cases: (B, T, V) and (N, V); V = 2 to 1000; T = 0.5, 1, 2; logits ~ scale * N(0, 1) with
    scales 0.01 to 6; partial, single-position and full masks (a partial mask always has positions on and
    off); a teacher near one-hot (p of the runner-up ~ e^-22); -inf in both logits at the same entries.
    """
    rng = np.random.default_rng(seed)

    def case(name, shape, s_scale, t_scale, temperature, mask="partial"):
        student, teacher = s_scale * rng.standard_normal(shape), t_scale * rng.standard_normal(shape)
        if mask == "partial":
            counted = rng.random(shape[:-1]) < 0.6
            counted.flat[0], counted.flat[-1] = True, False
        else:
            counted = np.zeros(shape[:-1], dtype=bool) if mask == "single" else np.ones(shape[:-1], dtype=bool)
            counted.flat[shape[0] // 2] = True
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
    np.put_along_axis(one_hot, rng.integers(0, 100, one_hot.shape[:-1])[..., None], 25.0, axis=-1)
    holes = rng.random(cases[9].student.shape) < 0.3
    holes[..., 0] = False  # every row keeps a finite entry
    cases[9].student[holes] = cases[9].teacher[holes] = -math.inf
    return cases


# --------------------------------------------------------------------------------------------------
# the reference and its known wrong variants, in float64
def _todi_attached_extra(case, beta):
    """What autograd adds to ToDi's gradient when the weight is not detached (module docstring)."""
    T = case.temperature
    lq, lp = log_softmax(case.student / T), log_softmax(case.teacher / T)
    both = np.isneginf(lq) & np.isneginf(lp)  # p = q = 0: no term
    d = np.where(both, 0.0, lp) - np.where(both, 0.0, lq)
    q, p = np.exp(lq), np.exp(lp)
    a = 0.5 + 0.5 * np.tanh(0.5 * beta * d)  # sigmoid(beta d), no overflow
    h = -beta * a * (1 - a) * (p + q) * d
    dz = h - q * h.sum(axis=-1, keepdims=True)
    return np.where(case.mask[..., None], dz, 0.0) / (case.mask.sum() * T)


def _variants(loss, options, reduction, t_squared):
    """{description: (f, k)}: f(case) -> (value, grad) in minitodi's convention and k(case) the factor to
    the declared one (N for a sum, T^2); "reference" first, then the known wrong variants.
    """
    def call(name=loss, opts=options, masked=True, teacher=lambda c: c.teacher, T=None):
        return lambda c: LOSSES[name](c.student, teacher(c), c.mask if masked else None,
                                      temperature=T or c.temperature, **opts)

    def k(red=reduction, t2=t_squared, positions=lambda c: c.mask.sum()):
        return lambda c: (positions(c) if red == "sum" else 1) * (c.temperature ** 2 if t2 else 1)

    other = "mean" if reduction == "sum" else "sum"
    out = {"reference": (call(), k()),
           "T^2 factor " + ("missing" if t_squared else "applied"): (call(), k(t2=not t_squared)),
           f"{other} over positions instead of {reduction}": (call(), k(red=other)),
           "mask ignored (every position counted)": (call(masked=False), k(positions=lambda c: c.mask.size)),
           "temperature on the student only": (call(teacher=lambda c: c.teacher * c.temperature), k()),
           "temperature on the teacher only": (call(teacher=lambda c: c.teacher / c.temperature, T=1.0), k())}
    out["divided by V too (F.kl_div's reduction='mean' averages over every element)"] = (
        call(), lambda c: k()(c) / c.student.shape[-1])
    if reduction == "mean":
        out["mean over all positions, masked ones in the count"] = (
            call(), lambda c: c.mask.sum() / c.mask.size * k()(c))
    if swap := {"fkl": "rkl", "rkl": "fkl"}.get(loss):
        out[f"FKL and RKL swapped ({swap} computed)"] = (call(swap, {}), k())
    if loss == "fkl":
        def plus_entropy(c):  # KL + H(p), H(p) = -sum_v p_v log p_v (0 log 0 = 0), mean over counted rows
            (v, g), lp = call()(c), log_softmax(c.teacher / c.temperature)
            return v - float((np.exp(lp) * np.where(np.isneginf(lp), 0.0, lp)).sum(axis=-1)[c.mask].mean()), g
        out["cross-entropy -sum p log q instead of KL (value off by the teacher's entropy)"] = (plus_entropy, k())
    if loss == "todi":
        def reversed_weight(c):  # (1 - a) on FKL's term, a on RKL's: FKL + RKL - ToDi (weight detached)
            (vf, gf), (vr, gr), (vt, gt) = call("fkl", {})(c), call("rkl", {})(c), call()(c)
            return vf + vr - vt, gf + gr - gt

        def attached(c):
            v, g = call()(c)
            return v, g + _todi_attached_extra(c, options.get("beta", 1.0))

        out["ToDi's weight reversed (a on RKL's term, 1 - a on FKL's)"] = (reversed_weight, k())
        out["ToDi's weight not detached (gradient flows through a)"] = (attached, k())
        out["beta ignored (beta = 1 used)"] = (call(opts={**options, "beta": 1.0}), k())
    return out


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
            return fn(s, t, mask, temperature=T, **options) if by_name else fn(s, t, mask, T, **options)
        except Exception as err:
            raise ConformanceError(f"{getattr(fn, '__name__', 'the function')} raised {type(err).__name__} "
                                   f"on logits {tuple(s.shape)} at temperature {T:g}: {err}") from err
    if framework == "torch":
        return _torch_adapter(call)

    def run(case, options):
        value, grad = call(case.student.copy(), case.teacher.copy(), case.mask.copy(), case.temperature, options)
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
        loss = call(s, torch.tensor(case.teacher, dtype=torch.float64), torch.tensor(case.mask),
                    case.temperature, options)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise ConformanceError(f"the function must return a scalar tensor, got {type(loss).__name__} "
                                   f"{tuple(getattr(loss, 'shape', ()))}")
        grad = torch.autograd.grad(loss, s, allow_unused=True)[0] if loss.requires_grad else None
        return loss.item(), np.zeros(s.shape) if grad is None else grad.detach().numpy().astype(np.float64)
    return run


def _errors(got, want, scale):
    """(value error, gradient error) of ``got`` against ``want``, inf where ``got`` is not finite; the
    denominators are at least ``scale`` = the reference's (value, gradient) sizes (some variants are ~0).
    """
    (v, g), (rv, rg), (sv, sg) = got, want, scale
    if g.shape != rg.shape:
        raise ConformanceError(f"the gradient has shape {g.shape}; the logits have {rg.shape}")
    if not (math.isfinite(v) and np.isfinite(g).all()):
        return math.inf, math.inf
    return abs(v - rv) / max(abs(rv), sv, 1e-300), float(np.abs(g - rg).max() / max(np.abs(rg).max(), sg, 1e-300))


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
        lines += [f"{r.case:<36}{r.value:>13.6g}{r.reference:>13.6g}{r.value_error:>11.1e}"
                  f"{r.grad_error:>11.1e}  {r.status}" for r in self.rows]
        count = {s: sum(r.status == s for r in self.rows) for s in ("ok", "FAIL", "nan")}
        lines += [f"{'passed' if self.passed else 'FAILED'}: " + ", ".join(f"{n} {s}" for s, n in count.items() if n)
                  + f" of {len(self.rows)} cases", self.diagnosis]
        return "\n".join(lines)


def check(fn, loss, *, framework="torch", reduction="mean", t_squared=False, tol=DEFAULT_TOL, seed=0,
          **options):
    """Run ``fn`` over :func:`battery` (``seed``) and compare it with ``LOSSES[loss]`` (``**options``: the
    loss's options, passed to both). ``reduction`` and ``t_squared`` declare ``fn``'s convention; ``tol``:
    the largest relative error that passes. -> Report.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known: {', '.join(sorted(LOSSES))}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    run, cases = _adapter(fn, framework), battery(seed)
    got = [run(case, options) for case in cases]
    table = _variants(loss, options, reduction, t_squared)
    variants = {name: [tuple(x * k(c) for x in f(c)) for c in cases] for name, (f, k) in table.items()}
    reference = variants.pop("reference")
    units = [table["reference"][1](c) / (c.mask.sum() * c.temperature) for c in cases]
    scales = [(abs(v), max(np.abs(g).max(), GRAD_FLOOR * u)) for (v, g), u in zip(reference, units)]
    rows = []
    for case, g, r, scale in zip(cases, got, reference, scales):
        ve, ge = _errors(g, r, scale)
        excused = not math.isfinite(ve) and bool(np.isneginf(case.student).any())
        rows.append(Row(case.name, g[0], r[0], ve, ge, "nan" if excused else "ok" if max(ve, ge) < tol else "FAIL"))
    settings = ", ".join([f"{k}={v}" for k, v in options.items()] + [
        framework, f"{reduction} over counted positions", "times T^2" if t_squared else "no T^2"])
    return Report(loss, settings, tol, rows, _diagnose(rows, got, reference, scales, variants, tol))


def _diagnose(rows, got, reference, scales, variants, tol):
    """The likely bug: every wrong variant that matches the function on each case it can be judged on."""
    judged = [i for i, row in enumerate(rows) if row.status != "nan"]
    nan_note = ("" if len(judged) == len(rows) else
                " Non-finite results where logits are -inf (reported, not failed; the official code does "
                "this too): leave entries with p = q = 0 out of every product, the weight's included.")
    if all(rows[i].status == "ok" for i in judged):
        return "diagnosis: conforms: the same value and gradient as minitodi's on every case." + nan_note

    def worst(want, against=got):  # the largest error of `against` relative to `want` over the judged cases
        return max(max(_errors(against[i], want[i], scales[i])) for i in judged)

    distinct = {name: want for name, want in variants.items() if worst(reference, want) >= tol}
    matches = [name for name, want in distinct.items() if worst(want) < tol]
    if matches:
        return "diagnosis: likely bug: " + "; or ".join(matches) + "." + nan_note
    values_ok, grads_ok = (all(getattr(rows[i], e) < tol for i in judged) for e in ("value_error", "grad_error"))
    hint = ("the value agrees but the gradient does not (a stop-gradient missing or extra, or a hand-written "
            "backward)" if values_ok else "the gradient agrees but the value does not (a constant added?)"
            if grads_ok else "no single known bug matches")
    closest = min(distinct, key=lambda name: worst(distinct[name]), default=None)
    return (f"diagnosis: {hint}; closest known variant: {closest} (worst error "
            f"{worst(distinct[closest]):.1e})." if closest else f"diagnosis: {hint}.") + nan_note


def load_function(target):
    """``FILE.py:FUNCTION`` -> the function; FileNotFoundError or ValueError with a one-line message."""
    path, sep, name = target.rpartition(":")
    if not sep or not path.endswith(".py") or not name:
        raise ValueError(f"expected FILE.py:FUNCTION, got {target!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
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
    report = check(load_function(target), loss, framework=framework, tol=DEFAULT_TOL if tol is None else tol,
                   **settings)
    print(report)
    return 0 if report.passed else 1
