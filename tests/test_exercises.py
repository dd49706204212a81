"""minitodi.exercises: the references are right, every known mistake is named, no learner's answer raises.

The references are checked against central differences of forwards written here in plain NumPy (not
minitodi's), ToDi's weight held at the base point. Every known mistake, handed in as an answer, fails and
is named (that one alone); a wrong answer that is no known mistake is located; a function that raises,
returns the wrong thing, a wrong shape or dtype, NaN or inf gets a failed report, never an exception.
"""

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import reference_log_softmax

from minitodi import exercises
from minitodi.core.gradcheck import central_difference
from minitodi.exercises import EXERCISES, check

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "notebooks" / "solutions" / "06_exercises_solutions.py"
NAMES = list(EXERCISES)


def _outputs(name, function, case):
    """``function``'s outputs on ``case`` as a tuple (one array for a single-output exercise)."""
    result = function(*case.arguments())
    if len(EXERCISES[name].outputs) == 1:
        return (result,)
    return tuple(result)


def _with_outputs(name, change):
    """An answer: the reference's outputs, each passed through ``change(output_index, array)``."""
    reference = EXERCISES[name].reference
    n_outputs = len(EXERCISES[name].outputs)

    def answer(*args):
        result = reference(*args)
        if n_outputs == 1:
            return change(0, result)
        return tuple(change(i, x) for i, x in enumerate(result))

    return answer


# ---- the references against finite differences ---------------------------------------------------
# Forwards written out here, independent of minitodi.core.layers and minitodi.core.losses.


def _divergence_values(name, s, t, a=None):
    """Per row: FKL, RKL, or ToDi with the given weight a (held: a constant of s)."""
    lp = reference_log_softmax(t)
    lq = reference_log_softmax(s)
    p = np.exp(lp)
    q = np.exp(lq)
    if name == "fkl":
        return (p * (lp - lq)).sum(axis=-1)
    if name == "rkl":
        return (q * (lq - lp)).sum(axis=-1)
    d = lp - lq
    return (a * p * d - (1 - a) * q * d).sum(axis=-1)


def _todi_weight(s, t, beta):
    d = reference_log_softmax(t) - reference_log_softmax(s)
    return 1.0 / (1.0 + np.exp(-beta * d))


def _layernorm(x, w, b, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _attention(q, k, v):
    T, hs = q.shape
    scores = q @ k.T / math.sqrt(hs)
    scores[np.triu_indices(T, 1)] = -np.inf
    return np.exp(reference_log_softmax(scores)) @ v


def _rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def _scalar_loss(name, inputs):
    """f() -> the scalar whose gradients the exercise's outputs are, reading ``inputs`` (perturbed in place).

    A divergence: the sum of D over rows (rows are independent, so its gradient is each row's dD/ds);
    ToDi's weight is computed once, here, at the base point. A layer: sum(y * dy).
    """
    x = inputs
    if name in ("fkl", "rkl"):
        return lambda: float(_divergence_values(name, x["s"], x["t"]).sum())
    if name == "todi":
        a = _todi_weight(x["s"], x["t"], x["beta"])
        return lambda: float(_divergence_values(name, x["s"], x["t"], a).sum())
    forwards = {
        "linear_backward": lambda: x["x"] @ x["w"] + x["b"],
        "layernorm_backward": lambda: _layernorm(x["x"], x["w"], x["b"], x["eps"]),
        "gelu_backward": lambda: _gelu(x["x"]),
        "attention_backward": lambda: _attention(x["q"], x["k"], x["v"]),
        "rmsnorm_backward": lambda: _rmsnorm(x["x"], x["w"], x["eps"]),
    }
    if name == "cross_entropy_backward":
        rows = np.arange(len(x["targets"]))
        return lambda: float(-reference_log_softmax(x["logits"])[rows, x["targets"]].mean())
    return lambda: float((forwards[name]() * x["dy"]).sum())


GRADIENT_OF = {
    "fkl": {"dD_ds": "s"}, "rkl": {"dD_ds": "s"}, "todi": {"dD_ds": "s"},
    "linear_backward": {"dx": "x", "dw": "w", "db": "b"},
    "layernorm_backward": {"dx": "x", "dw": "w", "db": "b"},
    "gelu_backward": {"dx": "x"},
    "cross_entropy_backward": {"dlogits": "logits"},
    "attention_backward": {"dq": "q", "dk": "k", "dv": "v"},
    "rmsnorm_backward": {"dx": "x", "dw": "w"},
}
"""Which input each gradient output differentiates; every gradient output of every exercise is listed."""


def _numeric_gradient(f, x):
    """Central differences of ``f`` over every entry of ``x`` (step 1e-5, fourth order)."""
    return np.array([central_difference(f, x, index, eps=1e-5, order=4) for index in np.ndindex(x.shape)]
                    ).reshape(x.shape)


def test_every_gradient_output_is_checked():
    for name, exercise in EXERCISES.items():
        gradients = set(GRADIENT_OF[name])
        values = {"D"} if name in ("fkl", "rkl", "todi") else set()
        assert gradients | values == set(exercise.output_names)


@pytest.mark.parametrize("name", NAMES)
def test_reference_agrees_with_finite_differences(name):
    exercise = EXERCISES[name]
    for case in exercise.cases():
        inputs = dict(zip(case.inputs, case.arguments()))
        outputs = dict(zip(exercise.output_names, _outputs(name, exercise.reference, case)))
        f = _scalar_loss(name, inputs)
        for output, wrt in GRADIENT_OF[name].items():
            numeric = _numeric_gradient(f, inputs[wrt])
            scale = max(float(np.abs(numeric).max()), 1e-3)  # a gradient that is 0 (one position's dq)
            assert outputs[output].shape == inputs[wrt].shape
            # measured worst 7.9e-10 (layer norm): the rounding of f, ~1e-16 |f| / step, sets it
            assert np.abs(outputs[output] - numeric).max() <= 1e-7 * scale, (name, case.description, output)
        if "D" in outputs:
            a = _todi_weight(inputs["s"], inputs["t"], inputs["beta"]) if name == "todi" else None
            expected = _divergence_values(name, inputs["s"], inputs["t"], a)
            np.testing.assert_allclose(outputs["D"], expected, rtol=1e-12, atol=1e-14)


# ---- right answers pass --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_reference_passes(name):
    report = check(name, EXERCISES[name].reference)
    assert report.passed
    assert report.mistakes == ()
    assert report.max_error <= exercises.TOL
    assert str(report).startswith(f"{name}: passed — ")


def _load_solutions():
    spec = importlib.util.spec_from_file_location("exercises_solutions", SOLUTIONS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worked_solutions_pass_and_print_every_report(capsys):
    solutions = _load_solutions()
    assert set(solutions.SOLUTIONS) == set(EXERCISES)
    assert solutions.main() == 0
    lines = capsys.readouterr().out.splitlines()
    for name in EXERCISES:
        assert any(line.startswith(f"{name}: passed — ") for line in lines), name


def test_report_of_a_pass_reads_as_documented():
    text = str(check("fkl", EXERCISES["fkl"].reference))
    assert re.fullmatch(r"fkl: passed — D and dD_ds match the reference on 3 cases \(largest relative error "
                        r"\S+\)\.", text)


# ---- known mistakes are named --------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_exercise_knows_at_least_three_distinct_mistakes(name):
    keys = [mistake.key for mistake in EXERCISES[name].mistakes]
    assert len(keys) >= 3
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("name", NAMES)
def test_each_known_mistake_fails_and_is_named(name):
    for mistake in EXERCISES[name].mistakes:
        report = check(name, mistake.answer)
        assert not report.passed, mistake.key
        assert report.mistakes == (mistake.key,), (mistake.key, report.mistakes)
        assert report.diagnosis.startswith(mistake.title)
        assert mistake.explanation in report.diagnosis
        assert str(report).startswith(f"{name}: not yet — ")
        assert all(len(line) <= exercises.WIDTH for line in str(report).splitlines())


VARIANTS = [("rkl", exercises._rkl_gradient), ("linear_backward", exercises._linear_variant),
            ("layernorm_backward", exercises._layernorm_variant), ("gelu_backward", exercises._gelu_variant),
            ("cross_entropy_backward", exercises._cross_entropy_variant),
            ("attention_backward", exercises._attention_variant),
            ("rmsnorm_backward", exercises._rmsnorm_variant)]


@pytest.mark.parametrize(("name", "variant"), VARIANTS, ids=[name for name, _ in VARIANTS])
def test_the_written_out_backward_behind_the_mistakes_is_right_with_nothing_switched(name, variant):
    """Each mistake is that function with one switch flipped: with none flipped, it is the reference."""
    assert check(name, variant).passed


def test_two_mistakes_at_once_are_both_named():
    def answer(dy, x, w, b):
        return dy @ w.T, dy.T @ x, dy.mean(axis=0)  # dw transposed and db averaged

    report = check("linear_backward", answer)
    assert set(report.mistakes) == {"dw_transposed", "db_averaged"}
    assert "(dx is right.)" in report.diagnosis


def test_the_most_complete_explanation_is_given():
    # FKL computed for RKL: its gradient alone would match "fkl_gradient" too; only the whole is named
    report = check("rkl", EXERCISES["fkl"].reference)
    assert report.mistakes == ("computed_fkl",)
    assert str(report).startswith("rkl: not yet — you computed forward KL")


# ---- unknown wrong answers are located -----------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_wrong_answer_is_located_at_its_largest_error(name):
    last = len(EXERCISES[name].outputs) - 1
    output = EXERCISES[name].output_names[last]

    def change(i, x):
        if i == last:
            x = x.copy()
            x.flat[0] += 1.0 + abs(x.flat[0])  # far off, at the first entry only
        return x

    report = check(name, _with_outputs(name, change))
    assert not report.passed
    assert report.mistakes == ()
    assert report.output == output
    assert report.max_error > 0.3
    assert re.search(rf"at {output}\[0(, 0)*\] on case \d \(", report.diagnosis), report.diagnosis
    assert "you have" in report.diagnosis and "expected" in report.diagnosis


@pytest.mark.parametrize("name", NAMES)
def test_noise_and_zeros_fail_with_where_the_largest_error_is(name):
    rng = np.random.default_rng(0)
    noisy = _with_outputs(name, lambda i, x: x + 1e-3 * rng.standard_normal(np.shape(x)))
    zeros = _with_outputs(name, lambda i, x: np.zeros_like(x))
    for answer, hint in ((noisy, "largest error"), (zeros, "zero everywhere")):
        report = check(name, answer)
        assert not report.passed
        assert report.mistakes == ()
        assert report.output in EXERCISES[name].output_names
        assert f"at {report.output}[" in report.diagnosis
        assert hint in report.diagnosis


def test_a_constant_factor_is_pointed_out():
    report = check("gelu_backward", _with_outputs("gelu_backward", lambda i, x: -x))
    assert "-1 times the expected value: the sign is flipped" in report.diagnosis


def test_a_factor_that_changes_from_case_to_case_is_listed():
    def divided_by_v(logits, targets):  # the mean taken over V instead of N
        reference = EXERCISES["cross_entropy_backward"].reference(logits, targets)
        return reference * logits.shape[0] / logits.shape[1]

    report = check("cross_entropy_backward", divided_by_v)
    assert report.mistakes == ()
    assert "times a factor (0.7143 in case 1, 0.3333 in case 2, 1.5 in case 3)" in report.diagnosis


# ---- what is never a pass and never a traceback --------------------------------------------------


def _raises(error):
    def answer(*args):
        raise error

    return answer


def _bad_answers(name):
    """(answer, text the diagnosis must contain): answers that cannot be graded, or have a wrong shape."""
    names = EXERCISES[name].output_names
    first = names[0]
    if len(names) == 1:
        wrong_length = (lambda *args: (args[0], args[0]), "a tuple of 2")
    else:
        one_short = f"{len(names) - 1} values"
        wrong_length = (lambda *args: tuple(EXERCISES[name].reference(*args))[:-1], one_short)

    def set_first(value):
        def change(i, x):
            if i == 0:
                x = np.array(x, dtype=np.float64)
                x.flat[0] = value
            return x
        return _with_outputs(name, change)

    return [
        (_raises(NotImplementedError), "not implemented yet"),
        (_raises(ZeroDivisionError("division by zero")), "raised ZeroDivisionError: division by zero"),
        (lambda *args: None, "returned None"),
        (lambda: 0.0, "raised TypeError"),  # the wrong number of arguments
        wrong_length,
        (_with_outputs(name, lambda i, x: x[None]), "has shape"),
        (set_first(np.nan), f"your {first} contains NaN"),
        (set_first(np.inf), f"your {first} contains inf"),
        (_with_outputs(name, lambda i, x: x.astype(np.float32)), "float32"),
        (_with_outputs(name, lambda i, x: "0.5"), "not an array of numbers"),
    ]


@pytest.mark.parametrize("name", NAMES)
def test_anything_ungradable_is_a_failed_report_that_says_so(name):
    for answer, says in _bad_answers(name):
        report = check(name, answer)
        assert isinstance(report, exercises.Report)
        assert not report.passed, says
        assert says in report.diagnosis, (says, report.diagnosis)
        assert str(report).startswith(f"{name}: not yet — ")


def test_a_list_is_as_good_as_a_tuple_and_other_containers_are_reported():
    assert check("fkl", lambda s, t: list(EXERCISES["fkl"].reference(s, t))).passed
    assert "returned a float" in check("fkl", lambda s, t: 1.0).diagnosis
    assert "returned 3 values" in check("fkl", lambda s, t: (1.0, 2.0, 3.0)).diagnosis


def test_a_function_that_changes_its_inputs_changes_nothing():
    def answer(s, t):
        result = EXERCISES["fkl"].reference(s, t)
        s[...] = np.nan  # destroys its inputs after use
        t[...] = np.nan
        return result

    assert check("fkl", answer).passed
    assert check("fkl", EXERCISES["fkl"].reference).passed


def test_the_exception_report_points_at_the_learners_line():
    def linear_backward(dy, x, w, b):
        dx = dy @ w  # the transpose forgotten: the shapes do not fit
        return dx, x.T @ dy, dy.sum(axis=0)

    report = check("linear_backward", linear_backward)
    assert "raised ValueError" in report.diagnosis
    assert "in linear_backward: dx = dy @ w" in report.diagnosis


def test_an_unknown_name_is_a_value_error_listing_the_names():
    with pytest.raises(ValueError, match="unknown exercise 'kl'") as info:
        check("kl", EXERCISES["fkl"].reference)
    for name in EXERCISES:
        assert name in str(info.value)


def test_a_function_is_required():
    with pytest.raises(TypeError, match="must be a function"):
        check("fkl", None)
