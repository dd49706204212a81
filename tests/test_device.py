"""The device module: choosing NumPy or CuPy, conversions, and the one log-softmax."""

import numpy as np
import pytest

from minitodi.core import device, losses


def test_cpu_device_gives_numpy(monkeypatch):
    monkeypatch.setenv("MINITODI_DEVICE", "cpu")
    assert device.get_xp() is np
    assert device.resolve_device("CPU") == "cpu"


def test_bad_device_name_is_a_clear_error():
    with pytest.raises(ValueError, match="device must be one of"):
        device.resolve_device("tpu")


def test_gpu_request_without_gpu_fails_clearly():
    if device.gpu_available():
        pytest.skip("a GPU is available here")
    with pytest.raises(RuntimeError, match="no usable GPU"):
        device.get_xp("gpu")
    assert device.resolve_device("auto") == "cpu"


def test_array_module_and_conversions():
    x = np.arange(3.0)
    assert device.array_module(x, None, x) is np
    assert device.device_of(x) == "cpu"
    assert device.to_float(np.float64(2.5)) == 2.5
    assert device.to_numpy(x) is x
    np.testing.assert_array_equal(device.to_device(x, "cpu"), x)


def test_log_softmax_against_float64_definition():
    """log softmax = x - log sum exp x, checked against an independent float64 computation.

    Also: no overflow at 1e4, -inf stays -inf (probability 0), the input's dtype is kept, and the
    requested axis is the one reduced.
    """
    x = np.random.default_rng(0).standard_normal((3, 5, 7)) * 4.0
    for axis in (-1, 1, 0):
        expected = x - np.log(np.exp(x).sum(axis=axis, keepdims=True))
        np.testing.assert_allclose(losses.log_softmax(x, axis=axis), expected, rtol=1e-13, atol=1e-13)
    big = np.array([[1e4, 1e4 - 1.0, -np.inf]], dtype=np.float32)
    out = losses.log_softmax(big)
    assert out.dtype == np.float32 and out[0, 2] == -np.inf
    log_norm = np.log1p(np.exp(-1.0))  # log(e^0 + e^-1) once the 1e4 is subtracted
    np.testing.assert_allclose(out[0, :2], [-log_norm, -1.0 - log_norm], rtol=1e-6)


@pytest.mark.gpu
def test_roundtrip_through_gpu():
    import cupy

    x = np.random.default_rng(0).standard_normal((3, 4))
    g = device.to_device(x, "gpu")
    assert isinstance(g, cupy.ndarray) and device.array_module(g) is cupy
    with pytest.raises(TypeError, match="mix NumPy and CuPy"):
        device.array_module(x, g)
    np.testing.assert_array_equal(device.to_numpy(g), x)


def test_a_bad_minitodi_device_names_the_variable(monkeypatch):
    monkeypatch.setenv("MINITODI_DEVICE", "bogus")
    with pytest.raises(ValueError, match="^MINITODI_DEVICE must be one of .*got 'bogus'"):
        device.resolve_device()
    with pytest.raises(ValueError, match="^device must be one of"):  # the argument, not the variable
        device.resolve_device("bogus")
