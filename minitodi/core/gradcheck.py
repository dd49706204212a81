"""Finite-difference gradient checks in float64.

A hand-derived gradient is trusted only after it agrees with central differences of the loss value:

    dL/dx_i  ~  (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)

The truncation error of this quotient is O(eps^2) and its rounding error is O(machine_eps * |L| / eps),
so the total error is U-shaped in eps; in float64 the bottom of the U is near eps = 1e-5 for O(1)
functions, the default (it moves with the function: measure it; notebook 02 draws the curve; ``order=4``:
see :func:`central_difference`). Agreement is measured by the relative error

    |a - n| / max(|a| + |n|, 1e-12)

which is ~1e-10 for a correct gradient and O(1) for a wrong one. Every check here runs in float64:
in float32 the rounding term alone is ~1e-2 and a check says nothing.

Functions take a zero-argument callable ``f`` that returns the scalar loss and reads the array being
perturbed: the array is modified in place, one entry at a time, and always restored.

The entry points, from one number to the whole table:

- :func:`central_difference`: d f / d x[index] for one entry (second- or fourth-order stencil);
- :func:`check_array`: every entry of a small array, or a random sample of a large one (optionally
  restricted to some rows, e.g. the embedding rows a batch actually uses);
- :func:`check_arrays`: the same for a dict of parameters, never skipping a tensor;
- :func:`directional_check`: one number for a whole model, <grad, u> against the difference quotient
  along a random direction u (two loss evaluations instead of two per entry);
- :func:`check_loss`: one divergence of :mod:`minitodi.core.losses`, its stop-gradient weights (ToDi, AKL)
  held fixed at the base point so that finite differences see the gradient training uses;
- :func:`gradcheck_table`: every divergence and option of :data:`GRADCHECK_CASES` at each temperature,
  the table ``minitodi gradcheck`` prints.
"""

from dataclasses import dataclass

import numpy as np

from . import losses
from .device import array_module, to_float, to_numpy

DEFAULT_EPS = 1e-5


def rel_error(analytic, numeric):
    """Elementwise |a - n| / max(|a| + |n|, 1e-12) (NumPy arrays or floats)."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    return np.abs(a - n) / np.maximum(np.abs(a) + np.abs(n), 1e-12)


@dataclass
class CheckResult:
    """Outcome of a check: the worst relative error over the entries checked, and where it was."""

    max_rel_error: float
    n_checked: int
    worst_index: tuple
    analytic: float
    numeric: float

    def passed(self, tol: float = 1e-6) -> bool:
        return self.max_rel_error < tol


def _require_float64(x, what="x"):
    if x.dtype != np.float64:
        raise TypeError(f"gradient checks run in float64; {what} has dtype {x.dtype}")


def central_difference(f, x, index, eps=DEFAULT_EPS, order=2) -> float:
    """d f / d x[index] by central differences; x is restored afterwards.

    order=2:  (f(+eps) - f(-eps)) / (2 eps),                                  error O(eps^2)
    order=4:  (8 (f(+eps) - f(-eps)) - (f(+2 eps) - f(-2 eps))) / (12 eps),    error O(eps^4)
    The fourth-order stencil costs twice the evaluations and leaves only the rounding term; that
    matters for entries whose gradient is small by cancellation, where the truncation error
    (eps^2 times the third derivative) is large next to the gradient itself. Differences are taken
    before weighting, so a constant f gives exactly 0.
    """
    if order not in (2, 4):
        raise ValueError(f"order must be 2 or 4, got {order}")
    old = x[index].copy()

    def at(step):
        x[index] = old + step
        return to_float(f())

    try:
        d1 = at(eps) - at(-eps)
        if order == 2:
            return d1 / (2 * eps)
        d2 = at(2 * eps) - at(-2 * eps)
        return (8 * d1 - d2) / (12 * eps)
    finally:
        x[index] = old


def _choose_indices(shape, max_entries, rows, rng):
    """All multi-indices of `shape` (within `rows` along axis 0, if given), or a random sample."""
    if rows is None:
        flat = np.arange(int(np.prod(shape)))
    else:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        per_row = int(np.prod(shape[1:]))
        flat = (rows[:, None] * per_row + np.arange(per_row)[None, :]).ravel()
    if max_entries is not None and flat.size > max_entries:
        flat = rng.choice(flat, size=max_entries, replace=False)
    return [tuple(int(i) for i in np.unravel_index(k, shape)) for k in flat]


def check_array(f, x, analytic, *, eps=DEFAULT_EPS, order=2, max_entries=None, rows=None, rng=None,
                skip_nonfinite=True) -> CheckResult:
    """Compare ``analytic`` (d f / d x) with central differences of ``f`` over entries of ``x``.

    Args (``f`` and ``x`` as in the module docstring; ``x`` float64, NumPy or CuPy):
        analytic: the gradient to check, same shape as ``x``.
        max_entries: check every entry when ``x.size <= max_entries`` (or None), else a random sample.
        rows: only these indices along axis 0 (e.g. embedding rows that the batch uses).
        rng: a ``np.random.Generator`` for the sample (default: seeded 0).
        skip_nonfinite: leave out entries of ``x`` that are +-inf (a masked logit stays masked).
        order: 2 or 4, the stencil of :func:`central_difference`.
    """
    _require_float64(x)
    if analytic.shape != x.shape:
        raise ValueError(f"analytic gradient has shape {analytic.shape}, x has shape {x.shape}")
    rng = np.random.default_rng(0) if rng is None else rng
    host_x = to_numpy(x)
    host_a = to_numpy(analytic)
    indices = _choose_indices(x.shape, max_entries, rows, rng)
    if skip_nonfinite:
        indices = [i for i in indices if np.isfinite(host_x[i])]
    if not indices:
        raise ValueError("no entry to check")
    a = np.array([host_a[i] for i in indices])
    n = np.array([central_difference(f, x, i, eps, order) for i in indices])
    err = rel_error(a, n)
    k = int(np.argmax(err))
    return CheckResult(float(err[k]), len(indices), indices[k], float(a[k]), float(n[k]))


def check_arrays(f, arrays: dict, grads: dict, *, eps=DEFAULT_EPS, order=2, max_entries=None, rows=None,
                 rng=None) -> dict:
    """:func:`check_array` for every array of a dict (e.g. model parameters); no tensor is skipped.

    ``rows`` maps names to the rows to check (e.g. ``{"transformer.wte.weight": used_ids}``; for a
    vector, its entries). ``order``: the stencil, as in :func:`check_array`. Returns ``{name: CheckResult}``.
    """
    missing = set(arrays) ^ set(grads)
    if missing:
        raise KeyError(f"arrays and gradients have different keys: {sorted(missing)}")
    rng = np.random.default_rng(0) if rng is None else rng
    rows = rows or {}
    results = {}
    for name in arrays:
        results[name] = check_array(f, arrays[name], grads[name], eps=eps, order=order,
                                    max_entries=max_entries, rows=rows.get(name), rng=rng)
    return results


def directional_check(f, arrays: dict, grads: dict, *, eps=DEFAULT_EPS, rng=None):
    """Check a whole gradient at once along a random unit direction u.

    It costs two evaluations of f, not two per entry. Returns ``(analytic, numeric, rel_error)`` with
    analytic = sum_k <grads[k], u_k> and numeric = (f(x + eps u) - f(x - eps u)) / (2 eps). Arrays are
    restored afterwards.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    for name, x in arrays.items():
        _require_float64(x, name)
    xp = array_module(*arrays.values())
    u = {k: rng.standard_normal(x.shape) for k, x in arrays.items()}
    norm = np.sqrt(sum(float(np.sum(v * v)) for v in u.values()))
    u = {k: xp.asarray(v / norm) for k, v in u.items()}
    analytic = sum(to_float(xp.sum(grads[k] * u[k])) for k in arrays)
    saved = {k: x.copy() for k, x in arrays.items()}

    def at(step):  # f at x + step u
        for k, x in arrays.items():
            x[...] = saved[k] + step * u[k]
        return to_float(f())

    try:
        numeric = (at(eps) - at(-eps)) / (2 * eps)
    finally:
        for k, x in arrays.items():
            x[...] = saved[k]
    return analytic, numeric, float(rel_error(analytic, numeric))


# --------------------------------------------------------------------------------------------------
# the divergences of minitodi.core.losses

LOSS_CHECK_EPS = 1e-4
LOSS_CHECK_ORDER = 4
"""Step and stencil for loss checks, measured on logits ~ N(0, 1), every loss and option, T in {1, 2},
eight seeds, worst relative error: second order 1.1e-5 at eps 1e-3, 2.5e-6 at 1e-4; fourth order
8.5e-8 at 1e-4, 5.4e-8 at 3e-4 (but at 1e-3 TVD's kink |q - p| = 0 falls inside the stencil).
Entries whose gradient is small by cancellation set the worst case; the fourth-order stencil
removes their truncation error."""

GRADCHECK_CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("todi", {}),
    ("todi", {"beta": 2.0}),
    ("todi", {"beta": 0.0}),
    ("todi", {"detach": False}),
    ("jsd", {}),
    ("gjsd", {}),
    ("gjsd", {"beta": 0.0}),
    ("gjsd", {"beta": 0.3}),
    ("gjsd", {"beta": 1.0}),
    ("tvd", {}),
    ("sfkl", {}),
    ("sfkl", {"lam": 0.3}),
    ("srkl", {}),
    ("srkl", {"lam": 0.3}),
    ("akl", {}),
]
"""(loss, options) rows of :func:`gradcheck_table`: every loss with its defaults, plus options that
change the gradient (a sharper ToDi weight, a constant one a = 1/2, the weight differentiated, the
generalized JSD at its two KL ends and in between, other skews)."""


def check_loss(name, student_logits, teacher_logits, mask=None, *, temperature=1.0, eps=LOSS_CHECK_EPS,
               order=LOSS_CHECK_ORDER, max_entries=None, rng=None, **options):
    """Check ``LOSSES[name]``'s gradient against central differences of its value, in float64.

    Stop-gradient weights (ToDi, AKL) are frozen at the base point by passing ``stopgrad_at`` = the
    base student logits to every evaluation: finite differences then measure exactly the gradient
    training uses (the derivation is in :mod:`minitodi.core.losses`). Returns a :class:`CheckResult`.
    """
    fn = losses.LOSSES[name]
    student = student_logits.copy()  # perturbed in place by the check
    weights_detached = options.get("detach", True)  # ToDi's detach=False differentiates its weight
    if name in losses.STOPGRAD_LOSSES and weights_detached:
        options = {**options, "stopgrad_at": student.copy()}
    _, grad = fn(student, teacher_logits, mask, temperature=temperature, **options)

    def value():
        loss, _ = fn(student, teacher_logits, mask, temperature=temperature, **options)
        return loss

    return check_array(value, student, grad, eps=eps, order=order, max_entries=max_entries, rng=rng)


def gradcheck_table(seed=0, temperatures=(1.0, 2.0), names=None, eps=LOSS_CHECK_EPS):
    """The table ``minitodi gradcheck`` prints, in float64.

    Rows (name, options, temperature, entries checked, max relative error), one per case of
    :data:`GRADCHECK_CASES` (only the losses in ``names``, if given) and temperature. Logits (2, 3, 11)
    ~ N(0, 1) (an untrained model's scale), a mask that turns off two of the six positions; every entry
    of the student's logits is checked with :func:`check_loss`.
    """
    rng = np.random.default_rng(seed)
    student = rng.standard_normal((2, 3, 11))
    teacher = rng.standard_normal((2, 3, 11))
    mask = np.array([[True, False, True], [True, True, False]])
    rows = []
    for name, options in GRADCHECK_CASES:
        if names and name not in names:
            continue
        for temperature in temperatures:
            res = check_loss(name, student, teacher, mask, temperature=temperature, eps=eps, **options)
            rows.append((name, options, temperature, res.n_checked, res.max_rel_error))
    return rows
