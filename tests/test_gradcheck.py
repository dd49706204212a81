"""minitodi.core.gradcheck: central differences, sampled and directional checks, and that they can fail."""

import numpy as np
import pytest

from minitodi.core import gradcheck


def _cubic():
    """f(x) = sum(x^3 * w): gradient 3 x^2 w, known exactly."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5))
    w = rng.standard_normal((4, 5))
    return x, w, (lambda: float(np.sum(x**3 * w))), 3 * x**2 * w


def test_correct_gradient_passes_with_small_error():
    x, w, f, grad = _cubic()
    before = x.copy()
    res = gradcheck.check_array(f, x, grad)
    assert res.n_checked == x.size
    assert res.max_rel_error < 1e-8
    np.testing.assert_array_equal(x, before)  # restored


def test_wrong_gradient_is_caught():
    x, w, f, grad = _cubic()
    wrong = grad.copy()
    wrong[2, 3] *= 1.01
    res = gradcheck.check_array(f, x, wrong)
    assert not res.passed(1e-6)
    assert res.worst_index == (2, 3)


def test_sampling_and_rows():
    x, w, f, grad = _cubic()
    res = gradcheck.check_array(f, x, grad, max_entries=7)
    assert res.n_checked == 7
    wrong = grad.copy()
    wrong[0] += 1.0  # row 0 is wrong, but only rows 1 and 3 are checked
    res = gradcheck.check_array(f, x, wrong, rows=[3, 1])
    assert res.n_checked == 10 and res.passed(1e-8)


def test_check_arrays_covers_every_tensor():
    x, w, f, grad = _cubic()
    b = np.array([0.5])
    g = lambda: f() + float(np.sum(np.sin(b)))  # noqa: E731
    results = gradcheck.check_arrays(g, {"x": x, "b": b}, {"x": grad, "b": np.cos(b)}, max_entries=3)
    assert set(results) == {"x", "b"}
    assert results["b"].n_checked == 1
    assert all(r.passed(1e-8) for r in results.values())
    with pytest.raises(KeyError):
        gradcheck.check_arrays(g, {"x": x}, {"x": grad, "b": b})


def test_directional_check():
    x, w, f, grad = _cubic()
    before = x.copy()
    a, n, err = gradcheck.directional_check(f, {"x": x}, {"x": grad})
    assert err < 1e-8 and abs(a) > 0
    np.testing.assert_array_equal(x, before)
    _, _, err = gradcheck.directional_check(f, {"x": x}, {"x": grad * 1.001})
    assert err > 1e-5


def test_float32_is_refused():
    x = np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError, match="float64"):
        gradcheck.check_array(lambda: float(x.sum()), x, np.ones(3, dtype=np.float32))


def test_rel_error_definition():
    assert gradcheck.rel_error(1.0, 1.0) == 0.0
    assert gradcheck.rel_error(0.0, 0.0) == 0.0
    np.testing.assert_allclose(gradcheck.rel_error(1.0, 3.0), 0.5)


def test_fourth_order_stencil_beats_second_order_on_truncation():
    """f = sin(x): with a large step the O(eps^2) error is visible, the O(eps^4) one much smaller."""
    x = np.array([0.7])
    f = lambda: float(np.sin(x[0]))  # noqa: E731
    exact = np.cos(0.7)
    err2 = abs(gradcheck.central_difference(f, x, (0,), eps=1e-2, order=2) - exact)
    err4 = abs(gradcheck.central_difference(f, x, (0,), eps=1e-2, order=4) - exact)
    assert err2 > 1e-6 and err4 < 1e-9
    assert x[0] == 0.7
    assert gradcheck.central_difference(lambda: 3.0, x, (0,), order=4) == 0.0
    with pytest.raises(ValueError, match="order"):
        gradcheck.central_difference(f, x, (0,), order=3)
