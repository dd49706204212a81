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

import functools
import os
import types

import numpy as np

DEVICES = ("cpu", "gpu", "auto")


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
    source = "device"
    if device is None:
        device = os.environ.get("MINITODI_DEVICE", "auto")
        source = "MINITODI_DEVICE"  # the user set it outside the command: name it
    device = device.strip().lower()
    if device not in DEVICES:
        raise ValueError(f"{source} must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        if gpu_available():
            return "gpu"
        return "cpu"
    if device == "gpu" and not gpu_available():
        raise RuntimeError("device 'gpu' was requested but no usable GPU was found: install the CuPy "
                           "extra (pip install 'minitodi[cuda]') on a machine with a CUDA device, or use "
                           "device='cpu'")
    return device


def get_xp(device: str | None = None) -> types.ModuleType:
    """The array module for ``device`` (see :func:`resolve_device`): numpy or cupy."""
    if resolve_device(device) == "gpu":
        return _usable_cupy()
    return np


def is_cupy_array(x) -> bool:
    """Whether ``x`` is a CuPy array (checked by its type's module: this never imports CuPy)."""
    return type(x).__module__.split(".")[0] == "cupy"


def array_module(*arrays) -> types.ModuleType:
    """The module (numpy or cupy) the given arrays belong to; mixing the two is an error."""
    kinds = {is_cupy_array(a) for a in arrays if a is not None}
    if len(kinds) > 1:
        raise TypeError("arrays mix NumPy and CuPy: move them to one device first (device.to_device)")
    if kinds == {True}:
        import cupy

        return cupy
    return np


def device_of(x) -> str:
    """``"gpu"`` for a CuPy array, ``"cpu"`` otherwise."""
    if is_cupy_array(x):
        return "gpu"
    return "cpu"


def to_numpy(x) -> np.ndarray:
    """A NumPy copy (or view) of ``x``, explicit for logging and tests."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def to_device(x, device: str | None = None):
    """``x`` as an array of ``device``'s module (no copy when it already lives there)."""
    xp = get_xp(device)
    if xp is np:
        return to_numpy(x)
    return xp.asarray(x)


def to_float(x) -> float:
    """A Python float from a 0-d array of either backend (CuPy reductions return 0-d arrays)."""
    return float(to_numpy(x))


def host_rng(seed: int) -> np.random.Generator:
    """NumPy's generator: weights are drawn on the host, then moved, so both backends agree."""
    return np.random.default_rng(seed)
