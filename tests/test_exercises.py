"""minitodi.exercises: the references are right, every known mistake is named, no learner's answer raises.

The references are checked against central differences of forwards written here in plain NumPy (not
minitodi's), ToDi's weight held at the base point. Every known mistake, handed in as an answer, fails and
is named (that one alone); a wrong answer that is no known mistake is located, with the digits that show
the difference; a function that raises, returns the wrong thing, a wrong shape or dtype, NaN or inf gets
a failed report, never an exception. assemble(): the worked solutions pass inside the model and train a
student whose losses fall as with minitodi's layers; a wrong backward is named by its layer; the layers
are always restored.
"""

import importlib.util
import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
from helpers import reference_log_softmax

from minitodi import exercises
from minitodi.core import layers, model
from minitodi.core.gradcheck import central_difference
from minitodi.exercises import EXERCISES, assemble, check

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


def _kd_loss(s, t, labels, temperature):
    """The mean over labels != -100 of KL(softmax(t / T) || softmax(s / T)), written out."""
    counted = labels != -100
    D = _divergence_values("fkl", s[counted] / temperature, t[counted] / temperature)
    return float(D.mean())


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
    if name == "kd_loss":
        return lambda: _kd_loss(x["s"], x["t"], x["labels"], x["temperature"])
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
    "kd_loss": {"dL_ds": "s"},
}
VALUES = {"fkl": "D", "rkl": "D", "todi": "D", "kd_loss": "L"}  # the outputs that are values, not gradients
"""Which input each gradient output differentiates; every gradient output of every exercise is listed."""


def _numeric_gradient(f, x):
    """Central differences of ``f`` over every entry of ``x`` (step 1e-5, fourth order)."""
    return np.array([central_difference(f, x, index, eps=1e-5, order=4) for index in np.ndindex(x.shape)]
                    ).reshape(x.shape)


def test_every_gradient_output_is_checked():
    for name, exercise in EXERCISES.items():
        gradients = set(GRADIENT_OF[name])
        values = {VALUES[name]} if name in VALUES else set()
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
        if name == "kd_loss":
            np.testing.assert_allclose(outputs["L"], _kd_loss(**inputs), rtol=1e-12, atol=1e-14)
        elif name in VALUES:
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


NAMED_IN_ISSUE_29 = {
    "fkl": ["value_direction_swapped", "gradient_in_probabilities"],
    "rkl": ["value_direction_swapped", "gradient_in_probabilities"],
    "todi": ["gradients_mixed", "gradient_in_probabilities"],
    "attention_backward": ["scale_twice", "mask_sees_next", "mask_hides_itself"],
    "gelu_backward": ["cubic_factor_3_missing"],
    "kd_loss": ["mask_ignored", "student_temperature_forgotten", "teacher_temperature_forgotten",
                "tau_squared", "sum_not_mean"],
}


@pytest.mark.parametrize("name", list(NAMED_IN_ISSUE_29))
def test_the_mistakes_asked_for_are_in_the_catalogue(name):
    keys = [mistake.key for mistake in EXERCISES[name].mistakes]
    for key in NAMED_IN_ISSUE_29[name]:
        assert key in keys


def test_a_learners_mask_that_hides_the_diagonal_with_minus_inf_gets_the_masks_hint():
    def attention_backward(dy, q, k, v):  # j >= i hidden with -inf: the first row is all -inf, NaN
        T, hs = q.shape
        pre = q @ k.T / math.sqrt(hs)
        pre[np.triu_indices(T, 0)] = -np.inf
        att = np.exp(reference_log_softmax(pre))
        datt = dy @ v.T
        dpre = att * (datt - (att * datt).sum(axis=-1, keepdims=True)) / math.sqrt(hs)
        return dpre @ k, dpre.T @ q, att.T @ dy

    with np.errstate(invalid="ignore"):
        report = check("attention_backward", attention_backward)
    assert "contains NaN" in report.diagnosis
    assert "j >= i instead of j > i" in report.diagnosis


def test_the_mistake_that_hides_the_diagonal_is_named_when_the_mask_is_finite():
    def attention_backward(dy, q, k, v):  # the same, with -1e9: the first query attends evenly to all
        T, hs = q.shape
        pre = q @ k.T / math.sqrt(hs)
        pre[np.triu_indices(T, 0)] = -1e9
        att = np.exp(reference_log_softmax(pre))
        datt = dy @ v.T
        dpre = att * (datt - (att * datt).sum(axis=-1, keepdims=True)) / math.sqrt(hs)
        return dpre @ k, dpre.T @ q, att.T @ dy

    assert check("attention_backward", attention_backward).mistakes == ("mask_hides_itself",)


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
        assert re.search(rf"at {report.output}(\[| on case)", report.diagnosis), report.diagnosis
        assert hint in report.diagnosis


def test_a_constant_factor_is_pointed_out():
    report = check("gelu_backward", _with_outputs("gelu_backward", lambda i, x: -x))
    assert "-1 times the expected value: the sign is flipped" in report.diagnosis


def test_a_near_miss_shows_the_digits_that_differ():
    report = check("gelu_backward", _with_outputs("gelu_backward", lambda i, x: x * (1.0 + 3e-7)))
    assert not report.passed
    assert "On every entry it is 1.0000003 times the expected value" in report.diagnosis
    assert " 1 times" not in report.diagnosis
    have, expected = re.search(r"you have (\S+), expected (\S+) \(", report.diagnosis).groups()
    assert float(have) != float(expected)  # written with 6 digits both would read the same


def test_a_case_that_is_right_is_said_to_be_right_not_one_times_the_value():
    def doubled_but_one_row(logits, targets):
        reference = EXERCISES["cross_entropy_backward"].reference(logits, targets)
        if logits.shape[0] == 1:  # case 2 has one row: right there
            return reference
        return 2.0 * reference

    report = check("cross_entropy_backward", doubled_but_one_row)
    assert "(2 in case 1, right in case 2, 2 in case 3)" in report.diagnosis
    assert not re.search(r"\b1 (in case|times)", report.diagnosis)


def test_distinguishable_numbers_are_written_with_enough_digits():
    assert exercises.grading.distinguishable(1.0000003, 1.0) == ("1.0000003", "1")
    assert exercises.grading.distinguishable(0.25, 0.5) == ("0.25", "0.5")


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


# ---- the learner's layers in the model -----------------------------------------------------------


LAYER_SOLUTIONS = ("linear_backward", "layernorm_backward", "gelu_backward", "attention_backward",
                   "cross_entropy_backward")


@pytest.fixture(scope="module")
def solutions():
    return _load_solutions().SOLUTIONS


def _layer_solutions(solutions, **replaced):
    return {**{name: solutions[name] for name in LAYER_SOLUTIONS}, **replaced}


def _mistake(name, key):
    (mistake,) = [m for m in EXERCISES[name].mistakes if m.key == key]
    return mistake.answer


def test_the_worked_solutions_pass_in_the_model_and_train_a_student(solutions):
    originals = {name: getattr(layers, name) for name in dir(layers)
                 if name.endswith(("_forward", "_backward"))}
    result = assemble(**_layer_solutions(solutions))
    assert result.passed
    assert [check.place for check in result.checks] == [
        "block 0 ln_1", "block 0 attn.c_attn", "block 0 attention", "block 0 attn.c_proj", "block 0 ln_2",
        "block 0 mlp.c_fc", "block 0 GELU", "block 0 mlp.c_proj", "ln_f", "the loss"]
    assert all(check.agrees for check in result.checks)
    assert result.gradient_error < 1e-12
    assert len(result.losses) == 40
    assert result.losses[-1] < 0.5 * result.losses[0]  # measured 7.86 -> 1.99
    np.testing.assert_allclose(result.losses, result.reference_losses, rtol=1e-10)
    assert "the same losses as with minitodi's layers" in str(result)
    assert {name: getattr(layers, name) for name in originals} == originals  # every layer restored


def test_a_wrong_backward_is_named_by_its_layer_and_nothing_trains(solutions):
    scale_forgotten = _mistake("attention_backward", "scale_forgotten")
    functions = _layer_solutions(solutions, attention_backward=scale_forgotten)
    result = assemble(**functions)
    assert not result.passed
    (wrong,) = result.differing
    assert wrong.place == "block 0 attention"
    assert {name for name, error in wrong.errors.items() if error > 1e-3} == {"dq", "dk"}
    assert wrong.errors["dv"] < 1e-12
    assert re.search(r"block 0 attention backward: dq and dk differ from minitodi's \(relative error 3\); "
                     r"dv agrees\.", str(result)), str(result)
    assert result.losses == []
    assert "not trained: fix the layers named above first" in str(result)


def test_a_wrong_layer_norm_is_named_at_each_of_its_places(solutions):
    functions = _layer_solutions(solutions,
                                 layernorm_backward=_mistake("layernorm_backward", "variance_term_dropped"))
    result = assemble(**functions)
    assert [check.place for check in result.differing] == ["block 0 ln_1", "block 0 ln_2", "ln_f"]
    assert all(set(check.errors) == {"dx", "dw", "db"} for check in result.differing)
    assert "block 0 ln_2 (layer norm) backward: dx differs from minitodi's" in str(result)


def test_a_wrong_shape_or_an_exception_in_the_model_is_reported_with_its_layer(solutions):
    def gelu_backward(dy, x):
        return (dy * x)[..., :3]

    result = assemble(gelu_backward=gelu_backward)
    (check,) = result.checks
    assert check.place == "block 0 GELU"
    assert "returned dx of shape (4, 12, 3)" in check.problem
    assert not result.passed


def test_functions_not_written_yet_are_reported_and_minitodis_stand_in(solutions):
    def stub(*args):
        raise NotImplementedError

    result = assemble(**_layer_solutions(solutions, gelu_backward=stub), steps=5)
    assert result.not_implemented == ("gelu_backward",)
    assert "not implemented yet: gelu_backward" in str(result)
    assert result.losses  # the others train, with minitodi's GELU
    assert not result.passed
    nothing = assemble(**dict.fromkeys(LAYER_SOLUTIONS, stub))
    assert nothing.losses == []
    assert "none of your functions is implemented yet" in str(nothing)


def test_the_layers_are_restored_even_when_the_learners_function_interrupts():
    original = layers.gelu_backward

    def gelu_backward(dy, x):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assemble(gelu_backward=gelu_backward)
    assert layers.gelu_backward is original


def test_a_model_that_no_longer_calls_the_layers_module_is_caught(solutions, monkeypatch):
    snapshot = types.SimpleNamespace(**vars(layers))  # the model would call these, not the bound ones
    monkeypatch.setattr(model, "layers", snapshot)
    result = assemble(**_layer_solutions(solutions))
    # the cross-entropy is called by assemble's own loss, through the layers module: still bound
    assert set(result.never_called) == set(LAYER_SOLUTIONS) - {"cross_entropy_backward"}
    assert not result.passed
    assert "the model never called your" in str(result)


def test_assemble_refuses_unknown_names_and_values_that_are_not_functions(solutions):
    with pytest.raises(ValueError, match="rmsnorm_backward"):
        assemble(rmsnorm_backward=solutions["rmsnorm_backward"])
    with pytest.raises(ValueError, match="at least one"):
        assemble()
    with pytest.raises(TypeError, match="a function is needed"):
        assemble(gelu_backward=None)
