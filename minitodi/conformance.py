r"""Check someone else's distillation loss against minitodi's: the same value and gradient, or what differs.

    report = check(fn, "todi", framework="torch", beta=2.0)
    print(report)      # a row per case, then the diagnosis
    report.passed      # True when every case agrees with LOSSES["todi"] within ``tol``

``fn(student_logits, teacher_logits, mask, temperature, **options)`` gets logits (..., V) and a bool mask
(...), True where a position counts (``temperature`` goes by name where ``fn`` has a parameter so named,
else fourth). framework="torch": float64 tensors, the student's with requires_grad; ``fn`` returns a
scalar tensor, differentiated by autograd. framework="numpy": arrays; ``fn`` returns (loss, dloss/ds).

**Options.** check's keyword options are the loss's (``beta=2.0`` for ToDi). They are checked against
``LOSSES[loss]``, by name and by value, before ``fn`` is called: an unknown or invalid one is a one-line
ValueError, as are a bad ``tol``, loss, framework or reduction. ``fn`` is given an option only where its
signature takes it (or has ``**kwargs``); the report says which it was not given.

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

**Non-finite results fail**, value or gradient, and the diagnosis says where, with advice for a NaN in
the value and for one in the gradient alone. One case has -inf in both logits at the same entries (p = q
= 0 there; every divergence is finite): 0 * log 0 = 0 * (-inf) is NaN in floating point, and zeroing
such a term afterwards (masked_fill) fixes the value but not the gradient (0 * NaN = NaN in the backward
pass). Code that never sees -inf logits (logits straight from a linear layer) can leave that case out
with ``neginf=False``; the report says it was left out.

**No position counted.** The last case has every position masked. The mean over no position is 0 / 0:
minitodi's loss raises there. The check accepts that (any exception), 0 with a zero gradient (TRL,
Liger-Kernel and torchtune guard the division: nothing counts, nothing is learnt), and NaN with a zero
gradient (0 / 0 computed, noted in the report). A value other than 0 or NaN, or a gradient not 0, fails:
positions that do not count would be learnt from.

**Could not run** (a ConformanceError; exit status 3 from the command line): ``fn`` raised (anything,
sys.exit() and GeneratorExit too), returned something else than a real loss (a complex loss or gradient
included: taking the real part would hide a bug), changed one of its arguments in place (compared with
a copy), or called backward() itself. From the command line also: it called os._exit, or raised
KeyboardInterrupt itself (the user's Ctrl-C is still "interrupted", exit status 130): see :func:`_guarded`.

**Diagnosis.** Known deviations are tried alone, then in pairs, in float64 from LOSSES:
- what is computed: the mask ignored; the temperature on the student only, on the teacher only, or
  ignored (the divergence at T = 1); the gradient's sign flipped; FKL and RKL swapped; ToDi's weight
  reversed (FKL + RKL - ToDi: ToDi is linear in its detached weight), or not detached (the loss with
  ``detach=False``); GJSD's beta taken as 1 - beta;
- an option's value: the option ignored (its default used), or another value of a grid
  (:data:`OPTION_GRIDS`: "this is todi beta=2, not beta=1 as declared"); JSD is GJSD at beta 0.5, so a
  function declared as jsd is tried as gjsd at the grid's betas ("this is gjsd beta=0.1");
- the value: the teacher's entropy H(p) added, gradient unchanged (a cross-entropy -sum p log(.) in place
  of a KL term sum p log(p / .));
- a factor: T^k for k = 2, 1, -1, -2 (T^2 applied or missing, the temperature as a factor), a sum for
  the mean or back, the mean over all positions or also over V, the sum divided by the batch size B (the
  first dimension), a constant c fitted by least squares on value and gradient (each case weighed by its
  scale, as the errors are); c = -1 is named: the loss negated.
The variants that match on every case are named. Otherwise a variant is shown as the closest only when it
nearly matches (worst error below NEAR * tol and below 1/NEAR of the reference's), and the diagnosis
says that no known mistake matches and where the largest error sits: case, positions, value or gradient;
where only the cases with every position counted agree, that the mask is applied wrongly.

**The command line's --timeout** runs the function in a process of its own, stopped at the timeout
(:func:`run_target`): a function can catch what a timer raises, not a kill.
"""

import contextlib
import importlib.util
import inspect
import itertools
import math
import multiprocessing
import numbers
import os
import signal
import sys
import threading
from dataclasses import dataclass, field

import numpy as np

from .core.losses import LOSSES, log_softmax

DEFAULT_TOL = 1e-3
# The longest --timeout: a week. A wait on the child's pipe takes at most about 9.2e9 s; --timeout 1e300
# raised OverflowError.
TIMEOUT_MAX = 7 * 24 * 3600.0
GRAD_FLOOR = 1e-2  # gradient errors are relative to at least this fraction of the unit 1/(N T)
# A variant is shown as the closest only within NEAR * tol on every case and NEAR times closer than the
# reference: the misleading "closest" variants of the past missed by 0.5 to 4.1 at tol 1e-3.
NEAR = 10
SMALLEST_SCALE = 1e-3  # a fitted constant factor below this says "the result is ~0", not "scaled by c"
FRAMEWORKS = ("torch", "numpy")
REDUCTIONS = ("mean", "sum")
NOT_OPTIONS = {  # keyword arguments of LOSSES that are not options of a check, and why
    "temperature": "the battery sets it, per case",
    "detach": "the check compares with ToDi's detached weight and names a weight not detached",
    "stopgrad_at": "it is for finite differences",
    "n_counted": "each case of the battery is a whole batch",
}


class ConformanceError(RuntimeError):
    """The function under test could not be run.

    It raised, returned the wrong thing, changed its inputs, or needs a framework that is not installed.
    """


class FunctionRaised(ConformanceError):
    """The function under test raised (the exception is the ``__cause__``)."""


class Interrupted(KeyboardInterrupt):
    """The user's Ctrl-C during a check under :func:`_guarded`, told apart from a function's own raise."""


class ExitCalled(SystemExit):
    """Raised instead of ending the process when the function calls os._exit under :func:`_guarded`."""


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
    near one-hot (p of the runner-up ~ e^-22); -inf in both logits at the same entries; sequences of 64
    and 256 positions, one of them a batch of one (B = 1: code that squeezes or loops over the batch).
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
    # drawn last, so that the cases above are the same numbers as before these were added
    cases += [case("B=1, temp 1", (1, 256, 24), 2, 2, 1.0),
              case("long, temp 2", (3, 64, 40), 1, 1, 2.0)]
    return cases


def all_masked_case(seed=0):
    """A batch in which no position counts: the mean over no position is undefined (0 / 0).

    minitodi's losses raise there. Code that returns 0 with a zero gradient (TRL, Liger-Kernel and
    torchtune guard the division) is as right: nothing counts, so nothing is learnt. See :func:`_masked_row`.
    """
    rng = np.random.default_rng([seed, 1])
    shape = (2, 5, 16)
    student = rng.standard_normal(shape)
    teacher = rng.standard_normal(shape)
    return Case(f"{shape} no position counted", student, teacher, np.zeros(shape[:-1], dtype=bool), 1.0)


def has_neginf(case):
    """True for the case with -inf logits (both sides, the same entries)."""
    return bool(np.isneginf(case.student).any())


# --------------------------------------------------------------------------------------------------
# checking the settings, before anything runs
def loss_options(loss):
    """The options ``check`` accepts for ``LOSSES[loss]``: its keyword-only parameters not in NOT_OPTIONS."""
    parameters = inspect.signature(LOSSES[loss]).parameters.values()
    return [p.name for p in parameters if p.kind == p.KEYWORD_ONLY and p.name not in NOT_OPTIONS]


def check_options(loss, options):
    """Raise a one-line ValueError unless every option is one of ``loss``'s, with a value it accepts."""
    valid = loss_options(loss)
    known = ", ".join(valid) if valid else "none"
    for name in options:
        if name in NOT_OPTIONS:
            raise ValueError(f"{name!r} is not an option of a check ({NOT_OPTIONS[name]}); "
                             f"{loss}'s options: {known}")
        if name not in valid:
            raise ValueError(f"{loss} has no option {name!r}; its options: {known}")
    tiny = np.zeros((1, 2))
    LOSSES[loss](tiny, tiny, temperature=1.0, **options)  # minitodi's own checks of the values


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_settings(loss, *, framework="torch", reduction="mean", t_squared=False, tol=DEFAULT_TOL, seed=0,
                   neginf=True, **options):
    """Raise a one-line ValueError for the first setting of :func:`check` that is not valid."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known: {', '.join(sorted(LOSSES))}")
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (_is_number(tol) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    for name, flag in (("t_squared", t_squared), ("neginf", neginf)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    check_options(loss, options)


def _options_for(fn, options):
    """(the options ``fn``'s signature takes, the names of those it does not).

    All of them where it has ``**kwargs`` or no signature Python can read.
    """
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return dict(options), []
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return dict(options), []
    taken = {name: value for name, value in options.items() if name in parameters}
    return taken, [name for name in options if name not in parameters]


# --------------------------------------------------------------------------------------------------
# the reference and the known deviations, in float64
def _mean_entropy(teacher_logits, counted):
    """Mean over the ``counted`` positions of H(p) = -sum_v p_v log p_v, p = softmax(teacher_logits)."""
    lp = log_softmax(teacher_logits)
    plogp = np.exp(lp) * np.where(np.isneginf(lp), 0.0, lp)  # 0 log 0 = 0
    return -float(plogp.sum(axis=-1)[counted].mean())


@dataclass
class Computation:
    """What a variant computes before any factor, per case, in minitodi's convention.

    ``value_and_grad(case)``: the mean over its positions (the counted ones, or all where ``masked`` is
    False) and the gradient; ``entropy(case)``: the teacher's H(p) averaged over the same positions, at
    the same temperature.
    """

    description: str
    value_and_grad: object
    entropy: object
    masked: bool = True


def _computation(description, loss, options, *, masked=True, student_t=True, teacher_t=True):
    """``LOSSES[loss]`` with the mask or not, and the temperature on each side or not (then T = 1)."""
    def temperatures(case):
        student_T = case.temperature if student_t else 1.0
        teacher_T = case.temperature if teacher_t else 1.0
        return student_T, teacher_T

    def value_and_grad(case):
        student_T, teacher_T = temperatures(case)
        mask = case.mask if masked else None
        # softmax(teacher / student_T) is then softmax(case.teacher / teacher_T)
        teacher = case.teacher * (student_T / teacher_T)
        return LOSSES[loss](case.student, teacher, mask, temperature=student_T, **options)

    def entropy(case):
        _, teacher_T = temperatures(case)
        counted = case.mask if masked else np.ones_like(case.mask)
        return _mean_entropy(case.teacher / teacher_T, counted)

    return Computation(description, value_and_grad, entropy, masked)


def computations(loss, options):
    """minitodi's ``loss`` (first, "reference") and the known wrong computations of it."""
    reference = _computation("reference", loss, options)
    out = [reference,
           _computation("mask ignored (every position counted)", loss, options, masked=False),
           _computation("temperature on the student only", loss, options, teacher_t=False),
           _computation("temperature on the teacher only", loss, options, student_t=False),
           _computation("temperature ignored (the divergence at T = 1)", loss, options, student_t=False,
                        teacher_t=False),
           _sign_flipped(reference)]
    swap = {"fkl": "rkl", "rkl": "fkl"}.get(loss)
    if swap:
        out.append(_computation(f"FKL and RKL swapped ({swap} computed)", swap, {}))
    if loss == "todi":
        out += _todi_computations(reference, options)
    if loss == "gjsd":
        beta = options.get("beta", 0.5)
        out.append(_computation("beta taken as 1 - beta (p's and q's roles exchanged)", loss,
                                {**options, "beta": 1 - beta}))
    return out + _option_computations(loss, options)


def _sign_flipped(reference):
    """The reference's value with its gradient negated (a hand-written backward's sign error)."""
    def value_and_grad(case):
        value, grad = reference.value_and_grad(case)
        return value, -grad

    return Computation("the gradient's sign flipped, the value right (a step along it increases the loss)",
                       value_and_grad, reference.entropy)


def _todi_computations(reference, options):
    """ToDi's own wrong computations; ``reference`` is minitodi's ToDi with ``options``."""
    fkl = _computation("FKL", "fkl", {})
    rkl = _computation("RKL", "rkl", {})

    def reversed_weight(c):  # (1 - a) on FKL's term, a on RKL's: FKL + RKL - ToDi (weight detached)
        vf, gf = fkl.value_and_grad(c)
        vr, gr = rkl.value_and_grad(c)
        vt, gt = reference.value_and_grad(c)
        return vf + vr - vt, gf + gr - gt

    return [Computation("ToDi's weight reversed (a on RKL's term, 1 - a on FKL's)", reversed_weight,
                        reference.entropy),
            _computation("ToDi's weight not detached (gradient flows through a)", "todi",
                         {**options, "detach": False})]


# The values of a loss's option tried when the declared one does not match. Left out: the declared value,
# the default ("ignored", a variant of its own) and gjsd's 1 - beta (also its own).
OPTION_GRIDS = {
    "todi": (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0),
    "gjsd": (0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0),
    "sfkl": (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99),
    "srkl": (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99),
    "akl": (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
}
# A loss that is another loss at one value of its option: (that loss, the option, the value).
FAMILIES = {"jsd": ("gjsd", "beta", 0.5)}


def _option_computations(loss, options):
    """``loss`` at other values of its option: the option ignored (the default) and the grid's values.

    For jsd: gjsd at the grid's betas ("this is gjsd beta=0.1"; jsd is gjsd at beta 0.5).
    """
    if loss in FAMILIES:
        relative, name, equal = FAMILIES[loss]
        out = []
        for value in OPTION_GRIDS[relative]:
            if math.isclose(value, equal):
                continue
            description = f"this is {relative} {name}={value:g} ({loss} is {relative} at {name} {equal:g})"
            out.append(_computation(description, relative, {name: value}))
        return out
    names = loss_options(loss)
    if not names:
        return []
    (name,) = names  # every loss with options has one
    default = inspect.signature(LOSSES[loss]).parameters[name].default
    declared = options.get(name, default)
    out = []
    if not math.isclose(declared, default):
        out.append(_computation(f"{name} ignored (the default {name}={default:g} used)", loss,
                                {**options, name: default}))
    left_out = [declared, default]
    if loss == "gjsd":
        left_out.append(1 - declared)
    for value in OPTION_GRIDS[loss]:
        if any(math.isclose(value, other, abs_tol=1e-12) for other in left_out):
            continue
        out.append(_computation(f"this is {loss} {name}={value:g}, not {name}={declared:g} as declared",
                                loss, {**options, name: value}))
    return out


NEGATED = ("the loss negated (-loss: value and gradient of the opposite sign; minimising it maximises the "
           "divergence)")


def _scaled(c, tol):
    """The description of a fitted constant factor c: the loss negated where c is -1."""
    if abs(c + 1) < tol:
        return NEGATED
    return f"value and gradient scaled by {c:.3g}"


ENTROPY_ADDED = ("cross-entropy in place of KL: the teacher's entropy H(p) added to the value "
                 "(-sum p log(.) for sum p log(p/.); the gradient is the same)")


@dataclass
class Factor:
    """A known wrong factor: ``factor(case, counted)`` = the variant's result over the declared one.

    ``counted``: the number of positions the computation averages over.
    """

    description: str
    factor: object


def _declared(reduction, t_squared):
    """(case, counted) -> the declared convention's result over minitodi's mean: N for a sum, T^2."""
    def factor(case, counted):
        k = 1.0
        if reduction == "sum":
            k *= counted
        if t_squared:
            k *= case.temperature ** 2
        return k
    return factor


def _temperature_factor(k, t_squared):
    """T^k relative to the declared convention: the temperature applied as a factor once too often or few."""
    declared = 2 if t_squared else 0
    power = declared + k
    if k == 2 and not t_squared:
        description = "T^2 factor applied"
    elif k == -2 and t_squared:
        description = "T^2 factor missing"
    elif power == 1:
        description = "a factor T applied (the loss times T)"
    elif power == -1:
        description = "divided by T (the temperature applied as a factor 1/T)"
    elif power == -2:
        description = "divided by T^2 (the temperature applied as a factor 1/T^2)"
    else:
        description = f"a factor T^{power} applied"
    if t_squared:
        description += ", where T^2 is declared"

    def factor(case, counted):
        return case.temperature ** k

    return Factor(description, factor)


def factors(reduction, t_squared):
    """The known wrong factors, relative to the declared convention."""
    out = [_temperature_factor(k, t_squared) for k in (2, 1, -1, -2)]
    if reduction == "mean":
        out.append(Factor("sum over positions instead of mean", lambda c, n: n))
        out.append(Factor("mean over all positions, masked ones in the count", lambda c, n: n / c.mask.size))
        batch = Factor("the sum divided by the batch size B (the first dimension) instead of by the "
                       "counted positions", lambda c, n: n / c.mask.shape[0])
    else:
        out.append(Factor("mean over positions instead of sum", lambda c, n: 1 / n))
        batch = Factor("the sum divided by the batch size B (the first dimension)",
                       lambda c, n: 1 / c.mask.shape[0])
    out.append(batch)
    out.append(Factor("divided by V too (F.kl_div's reduction='mean' averages over every element)",
                      lambda c, n: 1 / c.student.shape[-1]))
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
    name = getattr(fn, "__name__", "the function")

    def call(s, t, mask, T, options):
        try:
            if by_name:
                return fn(s, t, mask, temperature=T, **options)
            return fn(s, t, mask, T, **options)
        except KeyboardInterrupt as err:
            if _from_the_user(err):
                raise
            raise FunctionRaised(_raised(name, err, s, T)) from err
        except ExitCalled as err:
            raise FunctionRaised(f"{name} called {err} on logits {tuple(s.shape)} at temperature {T:g}: "
                                 "it would have ended the command without a verdict") from err
        except BaseException as err:  # sys.exit(), GeneratorExit, ...: no verdict either
            raise FunctionRaised(_raised(name, err, s, T)) from err

    if framework == "torch":
        return _torch_adapter(call, name)

    def run(case, options):
        inputs = (case.student.copy(), case.teacher.copy(), case.mask.copy())
        result = call(*inputs, case.temperature, options)
        _check_unchanged(name, case, inputs)
        return _numpy_result(result, case.student.shape)

    return run


def _raised(name, err, s, T):
    """The message for an exception the function raised on logits ``s`` at temperature ``T``."""
    where = f"{name} raised {type(err).__name__} on logits {tuple(s.shape)} at temperature {T:g}"
    if not str(err):  # raise KeyboardInterrupt, raise GeneratorExit: nothing more to say
        return where
    return f"{where}: {err}"


def _from_the_user(interrupt):
    """Whether a KeyboardInterrupt is the user's Ctrl-C, not the function's own raise.

    Told apart under :func:`_guarded`, where Ctrl-C raises :class:`Interrupted`, and where SIGINT is
    ignored (a job started in the background): no Ctrl-C arrives. Elsewhere it is taken as the user's.
    """
    if isinstance(interrupt, Interrupted):
        return True
    return signal.getsignal(signal.SIGINT) not in (_on_sigint, signal.SIG_IGN)


def _on_sigint(signum, frame):
    """SIGINT's handler under :func:`_guarded`: the user pressed Ctrl-C."""
    raise Interrupted


@contextlib.contextmanager
def _guarded():
    """Within: nothing the function under test does ends the command without a verdict; restored after.

    os._exit would end the process at once, with the status the function chose and no word (os._exit(0)
    read as a pass): it raises :class:`ExitCalled` instead, "could not run" (exit status 3). Ctrl-C raises
    :class:`Interrupted`, so that a KeyboardInterrupt the function raises itself is told apart: that one
    is "could not run" too, the user's Ctrl-C stays "interrupted" (130). Two swaps, 9 us in all (measured),
    where a process of its own for every check would cost 0.1 s with NumPy and 0.9 s with PyTorch
    (:func:`_run_in_process`), and tests/test_conformance.py's command-line tests 0.2 s to 1.4 s each.
    A process ended otherwise (a signal, a crash in C code, posix._exit) is caught only with --timeout,
    which runs the function in a process of its own. Signal handlers can be set in the main thread only:
    elsewhere every KeyboardInterrupt is left to the caller, as :func:`check` does (:func:`_from_the_user`).
    """
    exit_before = os._exit

    def exit_called(status):
        raise ExitCalled(f"os._exit({status})")

    os._exit = exit_called
    sigint_before = signal.getsignal(signal.SIGINT)
    # an ignored SIGINT stays ignored: a background job is not to be stopped by a terminal's Ctrl-C
    handled = threading.current_thread() is threading.main_thread() and sigint_before is not signal.SIG_IGN
    if handled:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        os._exit = exit_before
        if handled:
            signal.signal(signal.SIGINT, sigint_before)


INPUT_NAMES = ("student_logits", "teacher_logits", "mask")


def _check_unchanged(name, case, inputs):
    """A ConformanceError naming the first of ``inputs`` (NumPy arrays) that differs from the case's."""
    for what, given, original in zip(INPUT_NAMES, inputs, (case.student, case.teacher, case.mask)):
        if not np.array_equal(given, original):
            raise ConformanceError(f"{name} changed its argument {what} in place (on logits "
                                   f"{case.student.shape} at temperature {case.temperature:g}): a loss must "
                                   f"leave the caller's arrays as they are (x = x / T, not x /= T)")


def _numpy_result(result, shape):
    """(value, grad) from what a NumPy function returned, or a ConformanceError saying what it returned."""
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ConformanceError(f"a numpy function must return (loss, grad), got {_described(result)}")
    value, grad = result
    if np.ndim(value) != 0 or not np.issubdtype(np.asarray(value).dtype, np.number):
        raise ConformanceError(f"the loss it returned must be one number, got {_described(value)}")
    grad = np.asarray(grad)
    if grad.shape != shape or not np.issubdtype(grad.dtype, np.number):
        raise ConformanceError(f"the gradient it returned must be an array of numbers shaped like the "
                               f"student's logits {shape}, got {_described(grad)}")
    for what, dtype in (("loss", np.asarray(value).dtype), ("gradient", grad.dtype)):
        if np.issubdtype(dtype, np.complexfloating):
            raise ConformanceError(_complex(what, dtype))
    return float(value), grad.astype(np.float64)


def _complex(what, dtype):
    """The message for a complex loss or gradient: a loss and its gradient are real numbers."""
    return (f"the {what} it returned is complex ({dtype}): a loss and its gradient are real (taking the "
            "real part would drop the imaginary one without a word)")


def _described(x):
    """What a returned object is, for a message: its type, and its shape where it has one."""
    shape = getattr(x, "shape", None)
    if shape is None:
        return type(x).__name__
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return f"{type(x).__name__} of shape {tuple(shape)}"
    return f"{type(x).__name__} of shape {tuple(shape)} and dtype {dtype}"


def _torch_adapter(call, name):
    """PyTorch is imported here and nowhere else: it is never a dependency of minitodi."""
    try:
        import torch
    except ImportError:
        raise ConformanceError("framework 'torch' needs PyTorch, which is not installed "
                               "(pip install torch, or check with framework='numpy')") from None

    def run(case, options):
        s = torch.tensor(case.student, dtype=torch.float64, requires_grad=True)
        t = torch.tensor(case.teacher, dtype=torch.float64)
        mask = torch.tensor(case.mask)
        loss = call(s, t, mask, case.temperature, options)
        _check_unchanged(name, case, [x.detach().numpy() for x in (s, t, mask)])
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise ConformanceError(f"the function must return a scalar tensor, got {type(loss).__name__} "
                                   f"{tuple(getattr(loss, 'shape', ()))}")
        if loss.is_complex():
            raise ConformanceError(_complex("loss", loss.dtype))
        if s.grad is not None:
            raise ConformanceError(f"{name} called backward() itself (the student's logits have a .grad): "
                                   "return the loss, the check differentiates it")
        return loss.item(), _torch_gradient(loss, s, name)

    return run


def _torch_gradient(loss, s, name):
    """d loss / d s by autograd as float64 NumPy; zeros where the loss does not depend on ``s``."""
    import torch

    if not loss.requires_grad:
        return np.zeros(s.shape)
    try:
        grad = torch.autograd.grad(loss, s, allow_unused=True)[0]
    except RuntimeError as err:  # the graph freed by a backward() of its own, modified in place, ...
        raise ConformanceError(f"differentiating what {name} returned failed: {err}") from err
    if grad is None:  # the loss does not depend on the student's logits
        return np.zeros(s.shape)
    return grad.detach().numpy().astype(np.float64)


def _errors(got, want, scale):
    """(value error, gradient error) of ``got`` against ``want``, each inf where ``got``'s is not finite.

    The denominators are at least ``scale`` = the reference's (value, gradient) sizes (some variants
    are ~0).
    """
    v, g = got
    rv, rg = want
    sv, sg = scale
    if g.shape != rg.shape:
        raise ConformanceError(f"the gradient has shape {g.shape}; the logits have {rg.shape}")
    value_error = math.inf
    if math.isfinite(v):
        value_error = abs(v - rv) / max(abs(rv), sv, 1e-300)
    grad_error = math.inf
    if np.isfinite(g).all():
        grad_error = float(np.abs(g - rg).max() / max(np.abs(rg).max(), sg, 1e-300))
    return value_error, grad_error


@dataclass
class Row:
    """One case: the function's value, the reference's, both errors and "ok" or "FAIL".

    On the case where no position counts, ``value`` is "raised" where the function raised, and
    ``reference`` is "undefined" (:func:`_masked_row`).
    """

    case: str
    value: object
    reference: object
    value_error: float
    grad_error: float
    status: str

    @property
    def finite(self):
        return math.isfinite(self.value_error) and math.isfinite(self.grad_error)


def _cell(x):
    """A number of the table, or a word in its place, 13 wide."""
    if isinstance(x, str):
        return f"{x:>13}"
    return f"{x:>13.6g}"


@dataclass
class Report:
    """The outcome: a Row per case, ``passed``, the ``diagnosis``; ``str(report)`` is the table.

    ``notes``: what was left out of the check or not given to the function, and what was accepted
    where no position counts.
    """

    loss: str
    settings: str
    tol: float
    rows: list
    diagnosis: str
    notes: list = field(default_factory=list)

    @property
    def passed(self):
        return bool(self.rows) and all(row.status == "ok" for row in self.rows)

    def __str__(self):
        lines = [f"{self.loss} ({self.settings}), tolerance {self.tol:g}",
                 f"{'case':<36}{'value':>13}{'reference':>13}{'value err':>11}{'grad err':>11}"]
        for r in self.rows:
            lines.append(f"{r.case:<36}{_cell(r.value)}{_cell(r.reference)}{r.value_error:>11.1e}"
                         f"{r.grad_error:>11.1e}  {r.status}")
        failed = sum(r.status == "FAIL" for r in self.rows)
        verdict = "passed" if self.passed else "FAILED"
        counts = f"{len(self.rows) - failed} ok"
        if failed:
            counts += f", {failed} FAIL"
        lines.append(f"{verdict}: {counts} of {len(self.rows)} cases")
        lines += [f"note: {note}" for note in self.notes]
        lines.append(self.diagnosis)
        return "\n".join(lines)


def check(fn, loss, *, framework="torch", reduction="mean", t_squared=False, tol=DEFAULT_TOL, seed=0,
          neginf=True, **options):
    """Run ``fn`` over :func:`battery` (``seed``) and compare it with ``LOSSES[loss]``; returns a Report.

    ``**options``: the loss's options, checked against minitodi's before ``fn`` runs, given to ``fn``
    where its signature takes them. ``reduction`` and ``t_squared`` declare ``fn``'s convention; ``tol``:
    the largest relative error that passes; ``neginf=False`` leaves out the case with -inf logits.
    Last, :func:`all_masked_case`, where minitodi's loss has no value (:func:`_masked_row`).
    """
    check_settings(loss, framework=framework, reduction=reduction, t_squared=t_squared, tol=tol, seed=seed,
                   neginf=neginf, **options)
    run = _adapter(fn, framework)
    given, not_given = _options_for(fn, options)
    cases = battery(seed)
    notes = []
    if not neginf:
        notes += [f"left out: case '{c.name}' (neginf=False: -inf logits not checked)"
                  for c in cases if has_neginf(c)]
        cases = [c for c in cases if not has_neginf(c)]
    if not_given:
        notes.append(f"not given to the function (its signature does not take them): {', '.join(not_given)}; "
                     f"the reference uses them")
    got = [run(case, given) for case in cases]
    masked_row, masked_failure, masked_note = _masked_row(run, all_masked_case(seed), given, tol)
    if masked_note:
        notes.append(masked_note)
    comparison = _Comparison(cases, got, computations(loss, options), _declared(reduction, t_squared),
                             factors(reduction, t_squared), tol)
    t2 = "times T^2" if t_squared else "no T^2"
    settings = [f"{k}={v}" for k, v in options.items()]
    settings += [framework, f"{reduction} over counted positions", t2]
    return Report(loss, ", ".join(settings), tol, comparison.rows + [masked_row],
                  comparison.diagnose(masked_failure), notes)


def _masked_row(run, case, options, tol):
    """The Row of the case where no position counts; the sentence saying why it fails, or a note; or None.

    The mean over no position is 0 / 0: minitodi's loss raises there, and so may the function. Returning
    0 with a zero gradient is as right (nothing counts, nothing is learnt; TRL, Liger-Kernel and
    torchtune do that), and so is NaN with a zero gradient (0 / 0 computed: IEEE's "undefined"; a note
    says that a loop which stops at a non-finite loss stops there). A value other than 0 or NaN, or a
    gradient other than 0, fails: positions that do not count would be learnt from.
    """
    where = f"Where no position counts (case '{case.name}')"
    try:
        value, grad = run(case, options)
    except FunctionRaised as err:
        if not isinstance(err.__cause__, Exception):  # sys.exit(), GeneratorExit: could not run
            raise
        return Row(case.name, "raised", "undefined", 0.0, 0.0, "ok"), None, None
    grad_size = float(np.abs(grad).max())  # NaN where an entry is NaN
    row = Row(case.name, value, "undefined", abs(value), grad_size, "FAIL")
    if not np.isfinite(grad).all() or grad_size > 0:
        return row, (f"{where}, the gradient is not 0 (largest entry {grad_size:.3g}): positions that do "
                     f"not count would be learnt from (minitodi raises there; 0 with a zero gradient is "
                     f"right too)."), None
    if value == 0:
        row.status = "ok"
        return row, None, None
    if math.isnan(value):
        row.status = "ok"
        note = (f"{where.lower()}, the value is NaN (0 / 0) and the gradient 0: accepted, the mean over no "
                "position is undefined (minitodi raises); a training loop that stops at a non-finite loss "
                "stops at such a batch")
        return row, None, note
    return row, (f"{where}, the value is {value:.6g}, not 0: positions that do not count are counted "
                 f"(minitodi raises there; 0 with a zero gradient is right too)."), None


# --------------------------------------------------------------------------------------------------
# comparing and diagnosing
class _Comparison:
    """The function's results against the reference and its variants, case by case, and the diagnosis.

    ``computed``: :func:`computations` (the reference first); ``declared``: the declared convention's
    factor; ``known_factors``: :func:`factors`.
    """

    def __init__(self, cases, got, computed, declared, known_factors, tol):
        self.cases = cases
        self.got = got
        self.computed = computed
        self.declared = declared
        self.factors = known_factors
        self.tol = tol
        self.results = {}  # computation index -> (value, grad) per case, computed when first needed
        self.entropies = {}  # computation index -> H(p) per case, computed when a variant needs it
        self.reference = self.variant(0, False, ())
        self.scales = [self._scale(case, ref) for case, ref in zip(cases, self.reference)]
        self.rows = []
        for case, result, ref, scale in zip(cases, got, self.reference, self.scales):
            value_error, grad_error = _errors(result, ref, scale)
            status = "ok" if max(value_error, grad_error) < tol else "FAIL"
            self.rows.append(Row(case.name, result[0], ref[0], value_error, grad_error, status))

    def _scale(self, case, reference):
        """The (value, gradient) sizes errors are relative to: the reference's, the gradient's floored."""
        value, grad = reference
        counted = case.mask.sum()
        unit = self.declared(case, counted) / (counted * case.temperature)
        return abs(value), max(np.abs(grad).max(), GRAD_FLOOR * unit)

    def variant(self, index, with_entropy, factor_indices):
        """(value, grad) per case of computation ``index``, + H(p) if ``with_entropy``, times its factors."""
        computation = self.computed[index]
        if index not in self.results:
            self.results[index] = [computation.value_and_grad(case) for case in self.cases]
        if with_entropy and index not in self.entropies:
            self.entropies[index] = [computation.entropy(case) for case in self.cases]
        out = []
        for i, (case, (value, grad)) in enumerate(zip(self.cases, self.results[index])):
            counted = case.mask.sum() if computation.masked else case.mask.size
            k = self.declared(case, counted)
            for f in factor_indices:
                k *= self.factors[f].factor(case, counted)
            if with_entropy:
                value = value + self.entropies[index][i]
            out.append((value * k, grad * k))
        return out

    def worst(self, results, expected, indices):
        """The largest error of ``results`` against ``expected`` over the cases ``indices``."""
        return max(max(_errors(results[i], expected[i], self.scales[i])) for i in indices)

    def fit_scale(self, results, indices):
        """The c minimising sum_i ((v_i - c r_i) / sv_i)^2 + mean((g_i - c dr_i)^2) / sg_i^2; None if none.

        Each case weighs by its scales, as its errors do, so that no case (or vocabulary size) dominates.
        """
        numerator = 0.0
        denominator = 0.0
        for i in indices:
            value, grad = self.got[i]
            ref_value, ref_grad = results[i]
            sv, sg = self.scales[i]
            sv = max(sv, 1e-300)
            numerator += value * ref_value / sv ** 2 + float((grad * ref_grad).mean()) / sg ** 2
            denominator += ref_value ** 2 / sv ** 2 + float((ref_grad * ref_grad).mean()) / sg ** 2
        if denominator == 0:
            return None
        return numerator / denominator

    def candidates(self, level):
        """(computation, with_entropy, factors, scaled) for every variant of ``level`` deviations."""
        for index in range(len(self.computed)):
            for with_entropy in (False, True):
                for count in range(level + 1):
                    for factor_indices in itertools.combinations(range(len(self.factors)), count):
                        for scaled in (False, True):
                            deviations = (index > 0) + with_entropy + count + scaled
                            if deviations == level:
                                yield index, with_entropy, factor_indices, scaled

    def search(self, indices):
        """(the variants matching on every case of ``indices``, fewest deviations first; the closest).

        Each variant is its description; the closest is (worst error, description) of those tried.
        """
        closest = (math.inf, "")
        for level in (1, 2):
            matches = []
            for index, with_entropy, factor_indices, scaled in self.candidates(level):
                results = self.variant(index, with_entropy, factor_indices)
                parts = [self.computed[index].description] if index else []
                if with_entropy:
                    parts.append(ENTROPY_ADDED)
                parts += [self.factors[f].description for f in factor_indices]
                if scaled:
                    c = self.fit_scale(results, indices)
                    if c is None or abs(c) < SMALLEST_SCALE:
                        continue
                    results = [(value * c, grad * c) for value, grad in results]
                    parts.append(_scaled(c, self.tol))
                if self.worst(results, self.reference, indices) < self.tol:
                    continue  # the same as the reference on these cases: it names no bug
                error = self.worst(self.got, results, indices)
                if error < self.tol:
                    matches.append(" and ".join(parts))
                elif error < closest[0]:
                    closest = (error, " and ".join(parts))
            if matches:
                return matches, closest
        return [], closest

    def diagnose(self, also=None):
        """The diagnosis: non-finite results and where; then conforms, the likely bug, or where it differs.

        ``also``: a sentence said last (the case where no position counts, when it fails).
        """
        parts = [self.nonfinite(i) for i, row in enumerate(self.rows) if not row.finite]
        finite = [i for i, row in enumerate(self.rows) if row.finite]
        failing = [i for i in finite if self.rows[i].status == "FAIL"]
        if failing:
            matches, closest = self.search(finite)
            if matches:
                found = "likely bug: " + "; or ".join(matches) + "."
            else:
                found = self.no_match(finite, closest)
            if parts:  # after the non-finite cases
                found = "On the other cases, " + found
            parts.append(found)
        elif parts and finite and also:
            parts.append("Every other case with counted positions agrees with minitodi's value and gradient.")
        elif parts and finite:
            parts.append("Every other case agrees with minitodi's value and gradient.")
        elif not parts and not also:
            parts.append("conforms: the same value and gradient as minitodi's on every case.")
        if also:
            parts.append(also)
        return "diagnosis: " + " ".join(parts)

    def nonfinite(self, i):
        """What is not finite on case ``i`` (value, gradient entries and positions), and the likely cause."""
        case = self.cases[i]
        value, grad = self.got[i]
        bad = ~np.isfinite(grad)
        bad_positions = bad.any(axis=-1)  # (...)
        inf_positions = np.isneginf(case.student).any(axis=-1)  # (...)
        gradient = "the gradient is finite"
        if bad.any():
            positions = f"{int(bad_positions.sum())} of {bad_positions.size} positions"
            if inf_positions.any() and not inf_positions.all() and not (bad_positions & ~inf_positions).any():
                positions += ", all of them with -inf entries"
            gradient = f"the gradient is non-finite at {int(bad.sum())} entries ({positions})"
        if math.isfinite(value):
            what = f"{gradient}; the value is finite"
        elif bad.any():
            what = f"the value is {value} and {gradient}"
        else:
            what = f"the value is {value}; {gradient}"
        summary = f"Non-finite on case '{case.name}': {what}."
        return summary + " " + _nonfinite_advice(has_neginf(case), math.isfinite(value))

    def no_match(self, finite, closest):
        """No variant matches: how value and gradient differ, the closest variant if near, the worst error."""
        parts = [_mismatch_hint(self, finite) + "; no known mistake, alone or in pairs, matches."]
        error, description = closest
        reference_error = self.worst(self.got, self.reference, finite)
        if error < NEAR * self.tol and error < reference_error / NEAR:
            parts.append(f"Closest, nearly matching: {description} (worst error {error:.1e}).")
        parts.append("Largest error: " + self.where(finite) + ".")
        agreeing = [i for i in finite if self.rows[i].status == "ok"]
        if agreeing:
            listed = ", ".join(f"'{self.rows[i].case}'" for i in agreeing)
            parts.append(f"{len(agreeing)} of {len(self.rows)} cases agree: {listed}.")
        every_position = [bool(self.cases[i].mask.all()) for i in finite]
        if agreeing and all(self.cases[i].mask.all() for i in agreeing) and not all(every_position):
            parts.append("Only where every position counts does it agree: the mask is applied wrongly "
                         "(inverted, shifted by a position, or along another axis?).")
        return " ".join(parts)

    def where(self, finite):
        """Where the largest error sits: which case, value or gradient, at which positions."""
        i = max(finite, key=lambda j: max(self.rows[j].value_error, self.rows[j].grad_error))
        row = self.rows[i]
        case = self.cases[i]
        if row.value_error >= row.grad_error:
            return (f"the value of case '{case.name}' ({row.value:.6g} against {row.reference:.6g}, error "
                    f"{row.value_error:.1e})")
        grad = self.got[i][1]
        per_position = np.abs(grad - self.reference[i][1]).max(axis=-1) / self.scales[i][1]  # (...)
        wrong = per_position >= self.tol
        worst = tuple(int(x) for x in np.unravel_index(per_position.argmax(), per_position.shape))
        text = (f"the gradient of case '{case.name}' (error {row.grad_error:.1e}), at {int(wrong.sum())} "
                f"of its {wrong.size} positions, the worst {worst}")
        outside = int((wrong & ~case.mask).sum())
        if outside:
            text += f"; {outside} of them outside the mask, where the gradient should be 0"
        return text


def _nonfinite_advice(neginf, value_finite):
    """The likely cause of a non-finite result: in the value, or in the gradient alone; -inf logits or not."""
    if neginf and not value_finite:
        return ("Both logits are -inf at the same entries there (p = q = 0, every divergence finite): "
                "0 * log 0 = 0 * (-inf) is NaN in floating point, here in the value itself (F.kl_div with "
                "log_target=True computes exp(-inf) * (-inf - -inf)). Give those terms 0 before they are "
                "summed: replace the log-probabilities at those entries first (e.g. torch.where), or pass "
                "neginf=False if your code never sees -inf logits.")
    if neginf:
        return ("Both logits are -inf at the same entries there (p = q = 0, every divergence finite): "
                "0 * log 0 = 0 * (-inf) is NaN in floating point; zeroing the term afterwards (masked_fill) "
                "fixed the value but not the gradient, where the backward pass meets 0 * NaN = NaN. Replace "
                "the log-probabilities at those entries before using them (e.g. torch.where), or pass "
                "neginf=False if your code never sees -inf logits.")
    if not value_finite:
        return ("The case has no -inf logits: an overflow in the value (exp of a large logit), or a log of "
                "an underflowed probability (log(softmax(x)) in place of log_softmax(x))?")
    return ("The case has no -inf logits and the value is finite: the backward pass alone meets a division "
            "by 0, or a log or square root at 0 (a torch.where leaves the NaN gradient of its unused side)?")


def _mismatch_hint(comparison, finite):
    """How a failure with no matching variant looks: the value or the gradient alone wrong, or both."""
    rows = comparison.rows
    tol = comparison.tol
    if all(rows[i].value_error < tol for i in finite):
        return ("the value agrees but the gradient does not (a stop-gradient missing or extra, or a "
                "hand-written backward)")
    if not all(rows[i].grad_error < tol for i in finite):
        return "the value and the gradient both differ"
    differences = [comparison.got[i][0] - comparison.reference[i][0] for i in finite]
    low = min(differences)
    high = max(differences)
    if high - low <= tol * max(abs(low), abs(high)):
        added = f"{low:.4g} on every case"
    else:
        added = f"from {low:.4g} to {high:.4g} across cases"
    return (f"the gradient agrees but the value does not: a term constant in the student's logits added? "
            f"(value - reference: {added})")


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
    except KeyboardInterrupt as err:
        if _from_the_user(err):
            raise
        raise ConformanceError(_import_failed(path, err)) from None
    except BaseException as err:  # a script's sys.exit() or GeneratorExit at import is no verdict either
        raise ConformanceError(_import_failed(path, err)) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{path} defines no function {name!r}")
    return fn


def _import_failed(path, err):
    """The message for an exception raised while importing the file at ``path``."""
    where = f"importing {path} failed: {type(err).__name__}"
    if not str(err):  # raise KeyboardInterrupt: nothing more to say
        return where
    return f"{where}: {err}"


PASSED, DIFFERS, COULD_NOT_RUN = 0, 1, 3  # the command's exit statuses (2: a usage error)


def run_target(target, loss, *, framework="torch", tol=None, timeout=None, **settings):
    """``minitodi conformance``: check ``FILE.py:FUNCTION`` and print the report; an exit status.

    :data:`PASSED` (0) if it passes, :data:`DIFFERS` (1) if the check ran and the function differs,
    :data:`COULD_NOT_RUN` (3) if it could not be run (it raised, exited, returned something else than a
    loss, changed its inputs, called backward() itself, or did not return within ``timeout`` seconds).
    Every setting is checked before the file is imported (a one-line ValueError, exit status 2 from the
    command line), then the framework (a missing PyTorch is a ConformanceError, exit status 2 too).

    With a ``timeout`` the file is imported and checked in a process of its own (:func:`_run_in_process`),
    stopped at the timeout whatever the function does; without one, in this process, at no extra cost,
    under :func:`_guarded` (os._exit and a KeyboardInterrupt of the function's own are "could not run").
    """
    if tol is None:
        tol = DEFAULT_TOL
    check_settings(loss, framework=framework, tol=tol, **settings)
    valid_timeout = _is_number(timeout) and 0 < timeout <= TIMEOUT_MAX
    if timeout is not None and not valid_timeout:
        raise ValueError(f"timeout must be a number of seconds in (0, {TIMEOUT_MAX:g}], got {timeout!r}")
    _adapter(None, framework)  # a missing framework is a usage error, said before the file is imported
    try:
        if timeout is None:
            with _guarded():
                report = check(load_function(target), loss, framework=framework, tol=tol, **settings)
        else:
            report = _run_in_process(timeout, target, loss, framework=framework, tol=tol, **settings)
    except ConformanceError as err:
        print(f"could not run {target}: {err}", file=sys.stderr)
        return COULD_NOT_RUN
    print(report)
    if report.passed:
        return PASSED
    return DIFFERS


def _run_in_process(timeout, target, loss, **settings):
    """:func:`check` of ``FILE.py:FUNCTION`` in a fresh process, stopped after ``timeout`` seconds.

    A function can catch the exception a signal raises (``except BaseException``) and run on; a process
    can be stopped. "spawn" starts a fresh interpreter: a fork of this process would inherit PyTorch's
    OpenMP threads, and its first parallel operation can then hang (measured: a forked child's 300 x 300
    matmul never returned). The clock starts once the child has imported minitodi and the framework, so
    that the timeout is the function's. That start costs the command about 0.1 s with NumPy (0.17 s
    without a timeout, 0.28 s with) and 0.9 s with PyTorch (1.4 s, 2.3 s), measured on two cores. The
    report, or what went wrong, comes back through a pipe.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, target, loss, settings), daemon=True)
    process.start()
    sender.close()  # the child's end: EOF here once the child has ended
    try:
        kind, payload = _receive(receiver, process, None)
        if kind == "ready":  # minitodi and the framework imported: the clock starts
            kind, payload = _receive(receiver, process, timeout)
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receiver.close()
    if kind == "usage":
        raise ValueError(payload)
    if kind == "could not run":
        raise ConformanceError(payload)
    return payload


def _receive(receiver, process, timeout):
    """The child's next message; a ConformanceError if it ends without one or sends none in ``timeout``."""
    if not receiver.poll(timeout):
        raise ConformanceError(f"it did not return within {timeout:g} s (--timeout); it was stopped")
    try:
        return receiver.recv()
    except EOFError:
        process.join()
        raise ConformanceError(f"the process running it ended (exit status {process.exitcode}) without a "
                               "result") from None


def _child(sender, target, loss, settings):
    """In the child process: import, check, send ("report", Report) or what went wrong, as one line."""
    try:
        _adapter(None, settings["framework"])  # PyTorch imported before the clock starts
        sender.send(("ready", None))
        with _guarded():
            report = check(load_function(target), loss, **settings)
        sender.send(("report", report))
    except (ValueError, OSError) as err:  # no such file or function: a usage error
        sender.send(("usage", str(err)))
    except ConformanceError as err:
        sender.send(("could not run", str(err)))
    except Interrupted:
        pass  # the user's Ctrl-C reached this process's group: the parent, interrupted too, says so
    finally:
        sender.close()
