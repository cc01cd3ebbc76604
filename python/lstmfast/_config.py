"""Thread count and the build/run-time configuration report."""

import os
import platform
import sys

import numpy as np

from ._native import _core

_ENV_THREADS = "LSTMFAST_NUM_THREADS"
_ENV_SIMD = "LSTMFAST_SIMD_TARGET"
_MAX_THREADS = 2**31 - 1  # the compiled module takes a C int


def _default_num_threads():
    value = os.environ.get(_ENV_THREADS)
    if value is not None and value.strip():
        try:
            n = int(value)
        except ValueError:
            raise ValueError(
                f"{_ENV_THREADS} must be a positive integer, got {value!r}") from None
        if n < 1:
            raise ValueError(f"{_ENV_THREADS} must be a positive integer, got {value!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_num_threads = None


def set_num_threads(n):
    """Use at most ``n`` threads in total (BLAS and the per-step kernels)."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    if n > _MAX_THREADS:
        raise ValueError(f"set_num_threads: n must be <= {_MAX_THREADS}, got {n}")
    n = int(n)
    _core.blas_set_num_threads(n)
    if hasattr(_core, "set_num_threads"):
        _core.set_num_threads(n)
    _num_threads = n


def get_num_threads():
    """The number of threads lstmfast uses (``LSTMFAST_NUM_THREADS`` or the CPUs available)."""
    if _num_threads is None:
        set_num_threads(_default_num_threads())
    return _num_threads


def _simd_target_from_env():
    """Use the SIMD target that ``LSTMFAST_SIMD_TARGET`` names, if it is set: a lower one
    than the best, to compare instruction sets (child processes inherit it, as the
    bench's do) or to step around a path. Unknown or unsupported names raise."""
    value = os.environ.get(_ENV_SIMD, "").strip()
    if not value or not hasattr(_core, "set_simd_target"):
        return
    try:
        _core.set_simd_target(value)
    except ValueError as e:
        raise ValueError(f"{_ENV_SIMD}: {e}") from None


def simd_target():
    """The instruction set the kernels dispatched to at import."""
    return _core.simd_target() if hasattr(_core, "simd_target") else "none (kernels not built)"


def show_config(file=None):
    """Print the version, the SIMD target, the BLAS and the thread count."""
    from . import __version__

    lines = [
        f"lstmfast {__version__}",
        f"  python        {platform.python_version()} ({sys.platform}, {platform.machine()})",
        f"  numpy         {np.__version__}",
        f"  simd target   {simd_target()} (env {_ENV_SIMD}={os.environ.get(_ENV_SIMD, '')!s})",
        f"  blas          OpenBLAS (scipy-openblas32): {_core.blas_config()}",
        f"  blas core     {_core.blas_corename()}",
        f"  threads       {get_num_threads()} (env {_ENV_THREADS}={os.environ.get(_ENV_THREADS, '')!s})",
    ]
    print("\n".join(lines), file=file)


_simd_target_from_env()  # at import, before any kernel runs
