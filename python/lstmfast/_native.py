"""Loads the compiled module ``_core`` after the OpenBLAS it links against.

``import scipy_openblas32`` loads ``libscipy_openblas.so`` into the process with
RTLD_GLOBAL, so the extension's dependency is already resolved whatever its RPATH.

OpenBLAS's worker threads keep spinning for about 2**28 cycles (~0.1 s) after each
job by default. The kernels alternate large BLAS calls with their own thread pool
for the time loop, and the spinning BLAS workers would take the cores from that
pool: 2-thread training of an LSTM (T=100, N=8..32, H=256) ran no faster than
1-thread training. OpenBLAS reads OPENBLAS_THREAD_TIMEOUT (log2 of the spin in
cycles) once, when the library loads; ours is loaded here with 2**16 cycles
(~25 us) unless the user set the variable. The variable is restored afterwards and
NumPy is imported first, so NumPy's own OpenBLAS keeps its settings.
"""

import os

import numpy  # noqa: F401  (its own OpenBLAS loads with the environment as the user set it)

_TIMEOUT = "OPENBLAS_THREAD_TIMEOUT"
_saved = os.environ.get(_TIMEOUT)
if _saved is None:
    os.environ[_TIMEOUT] = "16"
try:
    import scipy_openblas32  # noqa: F401  (imported for its side effect)
finally:
    if _saved is None:
        del os.environ[_TIMEOUT]

from . import _core  # noqa: E402

__all__ = ["_core"]
