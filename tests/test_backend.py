import threading

import numpy as np
import pytest

from minitodi import backend


def test_cpu_device_gives_numpy(monkeypatch):
    monkeypatch.setenv("MINITODI_DEVICE", "cpu")
    assert backend.get_xp() is np
    assert backend.resolve_device("CPU") == "cpu"


def test_bad_device_name_is_a_clear_error():
    with pytest.raises(ValueError, match="device must be one of"):
        backend.resolve_device("tpu")


def test_gpu_request_without_gpu_fails_clearly():
    if backend.gpu_available():
        pytest.skip("a GPU is available here")
    with pytest.raises(RuntimeError, match="no usable GPU"):
        backend.get_xp("gpu")
    assert backend.resolve_device("auto") == "cpu"


def test_array_module_and_conversions():
    x = np.arange(3.0)
    assert backend.array_module(x, None, x) is np
    assert backend.device_of(x) == "cpu"
    assert backend.to_float(np.float64(2.5)) == 2.5
    assert backend.to_numpy(x) is x
    np.testing.assert_array_equal(backend.to_device(x, "cpu"), x)


def test_log_softmax_against_float64_definition():
    """log softmax = x - log sum exp x, here from an independent float64 computation; no overflow at 1e4,
    -inf stays -inf (probability 0), in the input's dtype, along the requested axis."""
    x = np.random.default_rng(0).standard_normal((3, 5, 7)) * 4.0
    for axis in (-1, 1, 0):
        expected = x - np.log(np.exp(x).sum(axis=axis, keepdims=True))
        np.testing.assert_allclose(backend.log_softmax(x, axis=axis), expected, rtol=1e-13, atol=1e-13)
    big = np.array([[1e4, 1e4 - 1.0, -np.inf]], dtype=np.float32)
    out = backend.log_softmax(big)
    assert out.dtype == np.float32 and out[0, 2] == -np.inf
    np.testing.assert_allclose(out[0, :2], [-np.log1p(np.exp(-1.0)), -1.0 - np.log1p(np.exp(-1.0))], rtol=1e-6)


@pytest.mark.gpu
def test_roundtrip_through_gpu():
    if not backend.gpu_available():
        pytest.skip("no usable GPU")
    import cupy

    x = np.random.default_rng(0).standard_normal((3, 4))
    g = backend.to_device(x, "gpu")
    assert isinstance(g, cupy.ndarray) and backend.array_module(g) is cupy
    with pytest.raises(TypeError, match="mix NumPy and CuPy"):
        backend.array_module(x, g)
    np.testing.assert_array_equal(backend.to_numpy(g), x)


@pytest.mark.skipif(not backend.parallel_blas_calls(), reason="NumPy's BLAS is not an OpenBLAS found in /proc/self/maps")
def test_one_blas_thread_sets_one_and_restores_the_count():
    get, set_ = backend._openblas()
    before = get()
    try:
        set_(2)
        with backend.one_blas_thread():
            assert get() == 1
        assert get() == 2
        with pytest.raises(RuntimeError), backend.one_blas_thread():
            raise RuntimeError("restored on the way out of an error too")
        assert get() == 2
    finally:
        set_(before)


def test_one_blas_thread_in_two_threads_at_once_restores_the_count_when_the_last_leaves():
    """Thread a enters, b enters, a leaves while b is still inside, then b leaves: BLAS stays on one thread
    until b is out, and is restored after (each block restoring its own "before" would leave it at 1)."""
    get, set_ = backend._openblas()
    before, seen = get(), []
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with backend.one_blas_thread():
            a_in.set()
            b_in.wait()
        a_out.set()

    def b():
        a_in.wait()
        with backend.one_blas_thread():
            b_in.set()
            a_out.wait()
            seen.append(get())

    try:
        set_(2)
        workers = [threading.Thread(target=f) for f in (a, b)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(10)
        assert seen == [1] and get() == 2
    finally:
        set_(before)


def test_in_order_keeps_the_order_and_runs_nested_calls_in_the_calling_task():
    """A task's own in_order runs its items in that task's thread (two of three workers busy: without the
    rule the items would go to the third, and with every worker busy they would wait forever)."""
    def outer(i):
        me = threading.current_thread()
        return backend.in_order(lambda j: (i, j, threading.current_thread() is me), range(3), 3)
    assert backend.in_order(outer, range(2), 3) == [[(i, j, True) for j in range(3)] for i in range(2)]
