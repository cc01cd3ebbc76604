"""lstmfast's compiled kernels (private; use the lstmfast package)."""

from typing import Literal, Optional, Sequence

import numpy as np
import numpy.typing as npt

__version__: str

_Float = np.float32 | np.float64
_Mode = Literal["LSTM", "GRU", "RNN_TANH", "RNN_RELU", "CTRNN_TANH", "CTRNN_RELU", "LN_LSTM"]

# --- BLAS --------------------------------------------------------------------

def matmul_f32(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...
def matmul_f64(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]: ...
def blas_set_num_threads(n: int) -> None: ...
def blas_get_num_threads() -> int: ...
def blas_config() -> str: ...
def blas_corename() -> str: ...

# --- recurrent stacks ----------------------------------------------------------

class RnnCache:
    """What a training forward keeps for backward (opaque)."""

    @property
    def nbytes(self) -> int: ...
    @property
    def dtype(self) -> np.dtype: ...

def rnn_forward(
    mode: _Mode,
    x: npt.NDArray[_Float],  # (T, N, I)
    h0: npt.NDArray[_Float],  # (L*D, N, H_out)
    c0: Optional[npt.NDArray[_Float]],  # (L*D, N, H), LSTM only
    weights: Sequence[Sequence[Optional[npt.NDArray[_Float]]]],  # per layer*D+direction: W_ih, W_hh, b_ih, b_hh, W_hr
    num_layers: int,
    bidirectional: bool,
    proj_size: int,
    lengths: Optional[npt.NDArray[np.integer]],  # (N,), each in 1..T
    dropout_masks: Optional[Sequence[npt.NDArray[_Float]]],  # num_layers-1 of (T, N, D*H_out)
    training: bool,
    alpha: float = 1.0,  # CTRNN: dt / tau, in (0, 1]
    leak: Literal["outside", "inside"] = "outside",  # CTRNN
    noise: Optional[npt.NDArray[_Float]] = None,  # CTRNN: (L*D, T, N, H) added to each step's state
    layer_norm_eps: float = 1e-5,  # LN_LSTM
    recurrent_dropout_masks: Optional[npt.NDArray[_Float]] = None,  # (L*D, N, H_out)
    zoneout_masks: Optional[Sequence[object]] = None,  # (m_h, m_c): None, a probability or (L*D, T, N, width)
    zoneout_seed: Optional[int] = None,  # draw the masks with those probabilities from this seed
) -> tuple[npt.NDArray[_Float], npt.NDArray[_Float], Optional[npt.NDArray[_Float]], Optional[RnnCache]]:
    """Returns (output (T, N, D*H_out), h_n, c_n or None, cache or None)."""

def rnn_backward(
    cache: RnnCache,
    d_output: Optional[npt.NDArray[_Float]],
    d_h_n: Optional[npt.NDArray[_Float]],
    d_c_n: Optional[npt.NDArray[_Float]],
    grads: Sequence[Sequence[Optional[npt.NDArray[_Float]]]],  # like weights; added into in place
    consume: bool = False,
    assign: bool = False,  # write the gradients over grads instead of adding into them
) -> tuple[npt.NDArray[_Float], npt.NDArray[_Float], Optional[npt.NDArray[_Float]]]:
    """Returns (dx, dh0, dc0 or None)."""

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...

# --- instruction sets ------------------------------------------------------------

def simd_target() -> str: ...
def simd_targets() -> list[str]: ...
def set_simd_target(name: str) -> None: ...
def _activation(name: Literal["exp", "sigmoid", "tanh"], x: npt.NDArray[_Float]) -> npt.NDArray[_Float]: ...
