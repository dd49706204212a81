r"""Exercises: write a gradient by hand, and be told whether it is right and, if not, what went wrong.

    from minitodi.exercises import check
    report = check("rkl", my_rkl)
    print(report)      # "rkl: passed — ..." or "rkl: not yet — ..." and what to look at
    report.passed      # True when every output agrees with the reference on every case

Notebook 06 states each task with its math; :data:`EXERCISES` lists them. NumPy, float64, one position
per row, temperature 1 unless an argument says otherwise:

    fkl(s, t) -> (D, dD_ds)                   s, t (n, V) student and teacher logits; D (n,), one
    rkl(s, t) -> (D, dD_ds)                   divergence per row (no mean); dD_ds (n, V)
    todi(s, t, beta) -> (D, dD_ds)            the weight a = sigmoid(beta log(p/q)) held constant
    linear_backward(dy, x, w, b) -> (dx, dw, db)            y = x @ w + b, x (N, Cin), w (Cin, Cout)
    layernorm_backward(dy, x, w, b, eps) -> (dx, dw, db)    x (N, C), biased variance (as PyTorch)
    gelu_backward(dy, x) -> dx                y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's
    cross_entropy_backward(logits, targets) -> dlogits      the mean cross-entropy over N rows
    attention_backward(dy, q, k, v) -> (dq, dk, dv)         one causal head, (T, hs), scores q k^T / sqrt(hs)
    rmsnorm_backward(dy, x, w, eps) -> (dx, dw)
    kd_loss(s, t, labels, temperature) -> (L, dL_ds)        s, t (B, T, V); the mean over labels != -100 of
                                                            KL(softmax(t/tau) || softmax(s/tau))

Then :func:`assemble` puts the learner's layer backwards into minitodi's GPT-2, checks each one where
the model calls it, names the layer that differs, and trains a small ToDi student with them
(:mod:`minitodi.exercises.assembly`).

One module per topic: :mod:`.divergences`, :mod:`.training_loss`, :mod:`.layers`, :mod:`.attention`;
the grading in :mod:`.grading`. Each topic's known mistakes are a table of :class:`Mistake` rows
(a key, what the answer did, the formula that should have been used, a function computing that wrong
answer).

**How an answer is graded.** The learner's function runs on three fixed cases per exercise (small float64
arrays from fixed seeds, one with edge structure: equal or tied rows, a constant row, a single position,
saturated values), each call on fresh copies of the inputs. Every output is compared, entry by entry,
with the reference answer: minitodi's own code (minitodi.core.losses for the divergences and the
training loss; minitodi.core.layers for the layers), which tests/test_exercises.py checks against
float64 finite differences. An output agrees when every entry's relative error

    |a - e| / max(|a| + |e|, FLOOR * scale)        scale = the output's largest |e| over the cases

is at most TOL. The floor keeps an entry that is 0 by cancellation (dq of a position that sees only
itself, GELU far below 0) from failing a correct answer on its last bits.

**Known mistakes.** A mistake "matches" when the learner's outputs agree, to the same TOL, with that
mistake's on every output the mistake changes; its explanation, with the formula that should have been
used, goes into the diagnosis. Where no known mistake explains an output, the diagnosis says where its
largest error is: which entry, in which case, the value against the expected one, written with the
digits that show they differ.

**What is never a pass and never a traceback.** An exception (NotImplementedError: "not implemented
yet"), a return value of the wrong kind or length, a dtype other than float64, NaN or inf, a wrong shape:
each gives a failed report saying so. An unknown exercise name is a ValueError listing the names.
"""

from . import attention, divergences, layers, training_loss
from .assembly import Assembly, assemble
from .grading import FLOOR, TOL, WIDTH, Case, Exercise, Mistake, Output, Report, check_exercise

EXERCISES = {exercise.name: exercise for exercise in (
    *divergences.EXERCISES,
    layers.LINEAR,
    layers.LAYERNORM,
    layers.GELU,
    layers.CROSS_ENTROPY,
    attention.ATTENTION,
    layers.RMSNORM,
    *training_loss.EXERCISES,
)}
"""Every exercise by name, in the order of notebook 06."""


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
    return check_exercise(EXERCISES[name], fn)


__all__ = ["EXERCISES", "FLOOR", "TOL", "WIDTH", "Assembly", "Case", "Exercise", "Mistake", "Output",
           "Report", "assemble", "check"]
