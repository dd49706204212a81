"""NumPy or CuPy, through one code path.

Every function in minitodi takes the array module from its arguments (``xp = array_module(x)``),
so the same code runs on the CPU (NumPy) and on a GPU (CuPy). This module decides which one to use
when new arrays are made, moves arrays between the two, and initialises random weights on the host
so that both backends start from identical numbers.

A GPU counts as available only when ``cupy`` imports *and* a CUDA device can be used: CuPy imports
fine on a machine without a GPU and only fails at the first allocation, so we allocate and reduce a
tiny array to find out.

The device is chosen by argument, or by the environment variable ``MINITODI_DEVICE`` = ``cpu`` |
``gpu`` | ``auto`` (default ``auto``: the GPU when one is usable, else the CPU).
"""

import concurrent.futures
import contextvars
import ctypes
import functools
import os
import threading
import types
from contextlib import contextmanager

import numpy as np

DEVICES = ("cpu", "gpu", "auto")


def _reuse_freed_memory():
    """Let glibc's malloc keep freed memory for the next allocation instead of handing it back to the system:
    by default every block of 128 KiB or more is mapped fresh and unmapped when freed, so each of a training
    step's NumPy temporaries faults its pages in again (1.0 million page faults in 120 steps of the demo's
    teacher, 36 thousand with these thresholds; see benchmarks/README.md). Linux with glibc only."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if os.name == "posix" else None
    if mallopt is not None:
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD


_reuse_freed_memory()


@functools.lru_cache(maxsize=1)
def _usable_cupy():
    """The cupy module if it imports and a device runs a kernel; None otherwise (cached)."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        float(cupy.arange(4, dtype=cupy.float32).sum())  # first allocation + kernel launch
        return cupy
    except Exception:  # ImportError, CUDARuntimeError, missing driver or libraries: all mean "no GPU"
        return None


def gpu_available() -> bool:
    """True when CuPy imports and a CUDA device can actually be used."""
    return _usable_cupy() is not None


def resolve_device(device: str | None = None) -> str:
    """Turn ``device`` (or ``$MINITODI_DEVICE``, or ``auto``) into ``"cpu"`` or ``"gpu"``."""
    if device is None:
        device = os.environ.get("MINITODI_DEVICE", "auto")
    device = device.strip().lower()
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        raise RuntimeError("device 'gpu' was requested but no usable GPU was found: install the CuPy "
                           "extra (pip install 'minitodi[cuda]') on a machine with a CUDA device, or use "
                           "device='cpu'")
    return device


def cores() -> int:
    """The CPU cores this process may run on (its affinity where the system tells it, as on Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


THREADS = None  # threads for the losses' blocks of rows and the model's shards of a batch; None: cores()


def threads(xp=np) -> int:
    """:data:`THREADS`, or the cores this process may run on; 1 on CuPy (the GPU is the parallel part)."""
    return 1 if xp is not np else THREADS or cores()


def in_order(fn, items, threads):
    """[fn(item) for item in items], on up to ``threads`` threads (NumPy releases the GIL in its loops),
    results in item order. Each task runs in a copy of the caller's context, so np.errstate and the like
    apply in the workers too. Inside a task the items run in turn (the pool is shared: no waiting on itself)."""
    if threads <= 1 or len(items) <= 1 or threading.current_thread().name.startswith("minitodi"):
        return [fn(item) for item in items]
    pool = _pool(threads)
    return [f.result() for f in [pool.submit(contextvars.copy_context().run, fn, item) for item in items]]


@functools.lru_cache(maxsize=None)
def _pool(threads):
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="minitodi")


@functools.lru_cache(maxsize=1)
def _openblas():
    """(get, set) of the thread count of the OpenBLAS that NumPy loaded (its wheels bundle one), or None:
    another BLAS (MKL, Accelerate), or a system without /proc/self/maps to find it in."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        return None
    for lib in map(ctypes.CDLL, paths):
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
            get, set_ = (getattr(lib, f"{prefix}_{verb}_num_threads{suffix}", None) for verb in ("get", "set"))
            if get and set_:
                return get, set_
    return None


def parallel_blas_calls() -> bool:
    """Whether :func:`one_blas_thread` can make BLAS calls from several threads at once run side by side."""
    return _openblas() is not None


_BLAS_LOCK, _blas_state = threading.Lock(), {"inside": 0, "before": None}  # one_blas_thread's, process-wide


@contextmanager
def one_blas_thread():
    """BLAS on one thread inside the block, for threads that each run their own matrix products: a
    multithreaded OpenBLAS called from two threads at once runs them in turn. The count is process-wide, so
    blocks open in several threads at once share it: the first one in sets it, the last one out restores it."""
    get, set_ = _openblas()
    with _BLAS_LOCK:
        if not _blas_state["inside"]:
            _blas_state["before"] = get()
        _blas_state["inside"] += 1
        set_(1)
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _blas_state["inside"] -= 1
            set_(1 if _blas_state["inside"] else _blas_state["before"])


def get_xp(device: str | None = None) -> types.ModuleType:
    """The array module for ``device`` (see :func:`resolve_device`): numpy or cupy."""
    return _usable_cupy() if resolve_device(device) == "gpu" else np


def is_cupy_array(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def array_module(*arrays) -> types.ModuleType:
    """The module (numpy or cupy) the given arrays belong to; mixing the two is an error."""
    kinds = {is_cupy_array(a) for a in arrays if a is not None}
    if len(kinds) > 1:
        raise TypeError("arrays mix NumPy and CuPy: move them to one device first (backend.to_device)")
    if kinds == {True}:
        import cupy

        return cupy
    return np


def device_of(x) -> str:
    """``"gpu"`` for a CuPy array, ``"cpu"`` otherwise."""
    return "gpu" if is_cupy_array(x) else "cpu"


def to_numpy(x) -> np.ndarray:
    """A NumPy copy (or view) of ``x``, explicit for logging and tests."""
    return x.get() if is_cupy_array(x) else np.asarray(x)


def to_device(x, device: str | None = None):
    """``x`` as an array of ``device``'s module (no copy when it already lives there)."""
    xp = get_xp(device)
    return to_numpy(x) if xp is np else xp.asarray(x)


def to_float(x) -> float:
    """A Python float from a 0-d array of either backend (CuPy reductions return 0-d arrays)."""
    return float(to_numpy(x))


def host_rng(seed: int) -> np.random.Generator:
    """NumPy's generator: weights are drawn on the host, then moved, so both backends agree."""
    return np.random.default_rng(seed)


def log_softmax(x, axis=-1):
    """log softmax(x) along ``axis``, shifted by the row maximum so that exp never overflows.

    Entries at -inf give -inf (probability 0); a row with no finite entry gives NaN: callers that
    accept -inf check for such rows themselves. The one log-softmax of the package.
    """
    xp = array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
