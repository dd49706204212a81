"""What an exercise is made of, and how a learner's answer is graded (see the package docstring).

:func:`check` runs the learner's function on an exercise's cases, compares every output with the
reference entry by entry, and writes a :class:`Report`: passed, or the known mistakes the answer matches,
or where its largest error is.
"""

import math
import os
import textwrap
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TOL = 1e-8
"""Largest relative error that agrees. Correct answers written independently of minitodi (the worked
solutions, and variants: softmax without the max shift, GELU through a sigmoid, np.var, a -1e9 mask)
came within 1.2e-12 of the references on these cases; the nearest known mistake (layer norm's unbiased
variance) is 0.09 away. 1e-8 leaves room on both sides."""

FLOOR = 1e-4
"""The denominator's floor, as a fraction of the output's largest expected entry (package docstring). With
1e-6, a correct dq on equal keys (0 in exact arithmetic, rounding noise of 1e-16 in both answers) measured
7e-10, too near TOL; with 1e-4 it is 7e-12, and an entry below the floor is still held to an absolute
error of TOL * FLOOR * scale = 1e-12 * scale."""

WIDTH = 100  # str(report) wraps its lines at this many columns


@dataclass(frozen=True)
class Output:
    """One output of the learner's function: its name and its expected shape, in words."""

    name: str
    shape: str


@dataclass(frozen=True)
class Case:
    """One input of an exercise: a description and the arguments, by name, in the signature's order."""

    description: str
    inputs: dict

    def arguments(self):
        """Fresh copies of the inputs, in order: a function changing them in place changes nothing here."""
        return [np.copy(value) if isinstance(value, np.ndarray) else value for value in self.inputs.values()]

    def label(self, number):
        """'case 2 (a constant row; x (3, 5), eps = 0.1)': the number, what it is, the shapes."""
        parts = []
        for key, value in self.inputs.items():
            if isinstance(value, np.ndarray):
                parts.append(f"{key} {value.shape}")
            else:
                parts.append(f"{key} = {value:g}")
        return f"case {number} ({self.description}; {', '.join(parts)})"


@dataclass(frozen=True)
class Mistake:
    """One row of an exercise's catalogue of typical wrong answers.

    ``key`` names it for code (``Report.mistakes``); ``title`` says, in one sentence, what the answer
    did; ``explanation`` gives the formula that should have been used; ``answer`` has the learner's
    signature and returns the mistaken outputs (the reference's computation, written out with that one
    thing wrong).
    """

    key: str
    title: str
    explanation: str
    answer: Callable


@dataclass(frozen=True)
class Exercise:
    """A function to write: its signature and outputs, the reference answer, the cases, the known mistakes.

    ``nan_hint``, where given, replaces the general guess of what made an output NaN or inf.
    """

    name: str
    signature: str
    outputs: tuple
    reference: Callable
    cases: Callable  # () -> list of Case; built at each check, so nothing a learner does can change them
    mistakes: tuple
    nan_hint: str = ("A log of 0, a division by 0, or an exp that overflowed (shift by the row maximum "
                     "first)?")

    @property
    def output_names(self):
        return [output.name for output in self.outputs]


@dataclass
class Report:
    """The outcome of :func:`check`: ``passed``, a ``diagnosis`` in words, and ``str(report)`` to print.

    ``max_error`` is the largest relative error over every output and case (inf where an output has
    the wrong shape; None where nothing could be compared), ``output`` the output where it is, and
    ``mistakes`` the keys of the known mistakes recognised.
    """

    name: str
    passed: bool
    diagnosis: str
    max_error: float | None = None
    output: str | None = None
    mistakes: tuple = ()

    def __str__(self):
        verdict = "passed" if self.passed else "not yet"
        return wrapped(f"{self.name}: {verdict} — ", self.diagnosis)


def wrapped(heading, text):
    """``heading`` and the first paragraph of ``text`` on one line, the others indented, at :data:`WIDTH`."""
    paragraphs = text.split("\n")
    wrap = {"width": WIDTH, "break_long_words": False, "break_on_hyphens": False}
    lines = [textwrap.fill(heading + paragraphs[0], subsequent_indent="    ", **wrap)]
    for paragraph in paragraphs[1:]:
        lines.append(textwrap.fill(paragraph, initial_indent="    ", subsequent_indent="    ", **wrap))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# running the learner's function


class NotGradable(Exception):
    """The learner's function could not be graded: it raised, or returned something that is not an answer."""

    def __init__(self, message, output=None):
        super().__init__(message)
        self.output = output


class NotImplementedYet(NotGradable):
    """The learner's function raised NotImplementedError: a stub not written yet."""


def check_exercise(exercise, fn) -> Report:
    """Run ``fn`` on ``exercise``'s cases and grade it (``check(name, fn)`` looks the exercise up)."""
    cases = exercise.cases()
    expected = [outputs_of(exercise.reference, case, len(exercise.outputs)) for case in cases]
    try:
        answers = [learner_outputs(exercise, fn, case.arguments(), case.label(number))
                   for number, case in enumerate(cases, 1)]
    except NotGradable as problem:
        return Report(exercise.name, False, str(problem), output=problem.output)
    return _grade(exercise, cases, expected, answers)


def outputs_of(function, case, n_outputs):
    """A reference's or a mistake's outputs on ``case``, always as a tuple."""
    result = function(*case.arguments())
    if n_outputs == 1:
        return (result,)
    return tuple(result)


def learner_outputs(exercise, fn, arguments, where):
    """The learner's outputs on ``arguments``, a tuple of float64 arrays; :class:`NotGradable` if none.

    ``where`` names the input in messages ('case 2 (...)', or a layer of the assembled model).
    """
    try:
        result = fn(*arguments)
    except NotImplementedError:
        raise NotImplementedYet("not implemented yet: the function raises NotImplementedError. Write it, "
                                "then run the check again.") from None
    except Exception as error:
        raise NotGradable(_describe_exception(error, where)) from None
    names = exercise.output_names
    if result is None:
        raise NotGradable("your function returned None: is a `return` missing?")
    if len(names) == 1:
        if isinstance(result, tuple):
            raise NotGradable(f"your function returned a tuple of {len(result)}; it should return one "
                              f"array, {names[0]}.")
        items = (result,)
    else:
        expected = f"a tuple of {len(names)}, ({', '.join(names)})"
        if not isinstance(result, (tuple, list)):
            raise NotGradable(f"your function returned {_kind(result)}; it should return {expected}.")
        if len(result) != len(names):
            raise NotGradable(f"your function returned {len(result)} values; it should return {expected}.")
        items = result
    return tuple(_as_float64(exercise, name, item, where) for name, item in zip(names, items))


def _kind(value):
    """'None', 'a float', 'a list': what a value is, in words."""
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


def _as_float64(exercise, name, item, where):
    """One output as a finite float64 array, or :class:`NotGradable` saying why it is not one."""
    try:
        array = np.asarray(item)
    except Exception:  # a ragged list, an object NumPy cannot read
        raise NotGradable(f"your {name} is {_kind(item)} that is not an array of numbers.", name) from None
    if array.dtype.kind not in "biufc":
        raise NotGradable(f"your {name} is {_kind(item)}, not an array of numbers (dtype {array.dtype}).",
                          name)
    if array.dtype != np.float64:
        raise NotGradable(f"your {name} has dtype {array.dtype}; it should be float64. The check compares "
                          "at float64 rounding: keep every step in float64.", name)
    bad = ~np.isfinite(array)
    if bad.any():
        entry = tuple(int(i) for i in np.argwhere(bad)[0])
        value = array[entry]
        kind = "NaN" if np.isnan(value) else f"{value}"
        raise NotGradable(f"your {name} contains {kind}, first at {_at(name, entry)} on {where}. "
                          f"{exercise.nan_hint}", name)
    return array


def _describe_exception(error, where):
    """'your function raised ValueError: ... on case 1 (...), at line 3 in fkl: `...`'."""
    message = str(error)
    text = f"your function raised {type(error).__name__}"
    if message:
        text += f": {message}"
    text += f" — on {where}"
    numpy_dir = os.path.dirname(np.__file__)
    package_dir = os.path.dirname(__file__)
    frames = [f for f in traceback.extract_tb(error.__traceback__)  # the learner's own frames, innermost last
              if not f.filename.startswith((package_dir, numpy_dir))]
    if frames:
        frame = frames[-1]
        text += f", at line {frame.lineno} in {frame.name}"
        if frame.line:
            text += f": {frame.line.strip()}"
    return text + "."


def _at(name, entry):
    """'dx[0, 2]' for an entry of an array, 'L' for a number (a 0-d output)."""
    if not entry:
        return name
    return f"{name}{list(entry)}"


# --------------------------------------------------------------------------------------------------
# comparing with the reference and with the known mistakes


@dataclass
class _Worst:
    """Where one output's largest relative error is, over every case."""

    error: float
    case: int  # index into the cases
    entry: tuple
    answer: float
    expected: float
    n_wrong: int  # entries above TOL, over every case
    n_entries: int


def _floors(expected):
    """Per output, the denominator's floor: FLOOR times its largest |entry| over the cases (see the top)."""
    floors = []
    for i in range(len(expected[0])):
        scale = max(float(np.abs(outputs[i]).max(initial=0.0)) for outputs in expected)
        floors.append(max(FLOOR * scale, 1e-300))
    return floors


def _relative_errors(answer, expected, floor):
    """|a - e| / max(|a| + |e|, floor), entry by entry."""
    return np.abs(answer - expected) / np.maximum(np.abs(answer) + np.abs(expected), floor)


def _agree(answers, wanted, i, floor):
    """Whether output ``i`` of ``answers`` has ``wanted``'s shape and agrees within TOL, on every case."""
    for got, want in zip(answers, wanted):
        a = np.asarray(got[i])
        e = np.asarray(want[i])
        if a.shape != e.shape or _relative_errors(a, e, floor).max(initial=0.0) > TOL:
            return False
    return True


def _worst(answers, expected, i, floor):
    """Output ``i``'s largest relative error over the cases, a :class:`_Worst`; None where a shape differs."""
    worst = None
    n_wrong = 0
    n_entries = 0
    for case, (got, want) in enumerate(zip(answers, expected)):
        if got[i].shape != np.shape(want[i]):
            return None
        errors = _relative_errors(got[i], want[i], floor)
        n_wrong += int((errors > TOL).sum())
        n_entries += errors.size
        if errors.size and (worst is None or errors.max() > worst.error):
            entry = np.unravel_index(int(np.argmax(errors)), errors.shape)
            entry = tuple(int(j) for j in entry)
            worst = _Worst(float(errors[entry]), case, entry, float(got[i][entry]),
                           float(np.asarray(want[i])[entry]), n_wrong=0, n_entries=0)  # counts below
    if worst is not None:
        worst.n_wrong = n_wrong
        worst.n_entries = n_entries
    return worst


def _grade(exercise, cases, expected, answers):
    """The report on answers that are float64 arrays: passed, or the known mistakes, or the largest errors."""
    names = exercise.output_names
    floors = _floors(expected)
    worst = [_worst(answers, expected, i, floor) for i, floor in enumerate(floors)]
    errors = [math.inf if w is None else w.error for w in worst]
    largest = int(np.argmax(errors))
    summary = {"max_error": errors[largest], "output": names[largest]}
    wrong = [i for i in range(len(names)) if errors[i] > TOL]
    if not wrong:
        verb = "matches" if len(names) == 1 else "match"
        diagnosis = (f"{listing(names)} {verb} the reference on {len(cases)} cases (largest relative error "
                     f"{errors[largest]:.1e}).")
        return Report(exercise.name, True, diagnosis, **summary)
    matched = _matching_mistakes(exercise, cases, expected, answers, floors)
    findings = []  # (heading, details or None): a known mistake and its explanation, or an error's place
    explained = set()
    for mistake, changed in matched:
        findings.append((mistake.title, mistake.explanation))
        explained |= changed
    for i in wrong:
        if i not in explained:
            where = _what_is_wrong(exercise.outputs[i], i, cases, answers, expected, worst[i])
            findings.append((where, None))
    paragraphs = []
    for number, (heading, details) in enumerate(findings):
        if number > 0:  # the first follows "name: not yet — " in str(report); the others start a line
            heading = heading[0].upper() + heading[1:]
        paragraphs.append(heading)
        if details:
            paragraphs.append(details)
    right = [names[i] for i in range(len(names)) if i not in wrong]
    if right:
        verb = "are"
        if len(right) == 1:
            verb = "is"
        paragraphs.append(f"({listing(right)} {verb} right.)")
    keys = tuple(mistake.key for mistake, _ in matched)
    return Report(exercise.name, False, "\n".join(paragraphs), mistakes=keys, **summary)


def _matching_mistakes(exercise, cases, expected, answers, floors):
    """The known mistakes the answers match, each with the set of outputs it changes.

    A mistake matches when the answers agree with it on every output it changes (those where it differs
    from the reference on some case). Of two matches, one whose outputs are a strict subset of the other's
    is left out: the most complete explanation is given.
    """
    n_outputs = len(exercise.outputs)
    found = []
    for mistake in exercise.mistakes:
        outputs = [outputs_of(mistake.answer, case, n_outputs) for case in cases]
        changed = {i for i in range(n_outputs) if not _agree(outputs, expected, i, floors[i])}
        if changed and all(_agree(answers, outputs, i, floors[i]) for i in changed):
            found.append((mistake, changed))
    return [(mistake, changed) for mistake, changed in found
            if not any(changed < other for _, other in found)]


# --------------------------------------------------------------------------------------------------
# describing a wrong output that no known mistake explains


def _what_is_wrong(output, i, cases, answers, expected, worst):
    """A wrong output that no known mistake explains: its wrong shape, or where its largest error is."""
    name = output.name
    if worst is None:
        for number, (got, want) in enumerate(zip(answers, expected), 1):
            if got[i].shape != np.shape(want[i]):
                where = cases[number - 1].label(number)
                return (f"your {name} has shape {got[i].shape} on {where}; it should be {np.shape(want[i])}: "
                        f"{output.shape}.")
    where = cases[worst.case].label(worst.case + 1)
    answer, wanted = distinguishable(worst.answer, worst.expected)
    text = (f"your {name} is not right yet: the largest error is at {_at(name, worst.entry)} on {where}: "
            f"you have {answer}, expected {wanted} (relative error {worst.error:.1e}); "
            f"{worst.n_wrong} of its {worst.n_entries} entries over the cases are off.")
    return text + _pattern(name, [a[i] for a in answers], [np.asarray(e[i]) for e in expected])


def distinguishable(a, b):
    """``a`` and ``b`` as text with enough significant digits to see that they differ (at least 6).

    1.0000003 against 1 is written '1.0000003' and '1', not '1' and '1' (a near miss must show).
    """
    digits = 6
    while digits < 17 and f"{a:.{digits}g}" == f"{b:.{digits}g}":
        digits += 1
    return f"{a:.{digits}g}", f"{b:.{digits}g}"


def _pattern(name, answers, expected):
    """A hint where the wrong output has a simple form: zero everywhere, or a factor times the expected.

    A factor that differs from case to case points at a size (1/N for 1/V, say): the factors are listed,
    a case where the output is right (a factor of 1 to TOL) said to be right. A factor is written with
    the digits that tell it from 1.
    """
    if not any(answer.any() for answer in answers):
        return f" Your {name} is zero everywhere: is a term missing, or a placeholder returned?"
    factors = [_factor(answer, want) for answer, want in zip(answers, expected)]
    if None in factors:
        return ""
    if np.allclose(factors, factors[0], rtol=1e-8, atol=0.0):
        return _one_factor(factors[0])
    per_case = []
    for number, factor in enumerate(factors, 1):
        if abs(factor - 1.0) <= TOL:
            per_case.append(f"right in case {number}")
        else:
            per_case.append(f"{_factor_text(factor, 4)} in case {number}")
    return (f" In each case it is the expected value times a factor ({', '.join(per_case)}): a size such as "
            "N, V or C in the wrong place?")


def _one_factor(factor):
    """The hint for one factor c on every entry of every case (c is never 1 to TOL here: that passed)."""
    if abs(factor + 1.0) < 1e-8:
        return " On every entry it is -1 times the expected value: the sign is flipped."
    if abs(factor - 1.0) < 1e-4:
        return (f" On every entry it is {_factor_text(factor, 6)} times the expected value: off by a "
                f"relative {factor - 1.0:.1e} everywhere, a near miss (a constant rounded, or float32 "
                "somewhere?).")
    return f" On every entry it is {_factor_text(factor, 6)} times the expected value."


def _factor_text(factor, digits):
    """``factor`` with at least ``digits`` significant digits and as many more as tell it from 1."""
    text, _ = distinguishable(factor, 1.0)
    short = f"{factor:.{digits}g}"
    if short != f"{1.0:.{digits}g}":
        return short
    return text


def _factor(answer, expected):
    """c where ``answer`` = c ``expected`` on every entry (to rounding), else None."""
    if not expected.any():
        return None
    c = float(answer.ravel() @ expected.ravel() / (expected.ravel() @ expected.ravel()))
    if np.allclose(answer, c * expected, rtol=1e-8, atol=1e-8 * np.abs(answer).max()):
        return c
    return None


def listing(names):
    """'dx', 'dx and dw', 'dx, dw and db'."""
    names = list(names)
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]
