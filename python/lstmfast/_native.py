"""Loads the compiled module ``_core`` after the OpenBLAS it links against.

``import scipy_openblas32`` loads ``libscipy_openblas.so`` into the process with
RTLD_GLOBAL, so the extension's dependency is already resolved whatever its RPATH.
"""

import scipy_openblas32  # noqa: F401  (imported for its side effect)

from . import _core  # noqa: E402

__all__ = ["_core"]
