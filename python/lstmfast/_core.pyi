"""lstmfast's compiled kernels (private; use the lstmfast package)."""

from typing import Literal, Mapping, Optional, Sequence, TypedDict

import numpy as np
import numpy.typing as npt

__version__: str

_Float = np.float32 | np.float64
_Mode = Literal["LSTM", "GRU", "RNN_TANH", "RNN_RELU", "CTRNN_TANH", "CTRNN_RELU", "LN_LSTM",
                "GRU_RESET_BEFORE"]

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
    @property
    def hands_back_gate_grads(self) -> bool:
        """Whether rnn_backward(..., gate_grads=True) serves this cache."""

class _CellOptions(TypedDict, total=False):
    alpha: float  # CTRNN: dt / tau, in (0, 1]
    leak: Literal["outside", "inside"]  # CTRNN
    noise: Optional[npt.NDArray[_Float]]  # CTRNN: (L*D, T, N, H) added to each step's state
    layer_norm_eps: float  # LN_LSTM

class _Regularizers(TypedDict, total=False):
    recurrent_dropout_masks: Optional[npt.NDArray[_Float]]  # (L*D, N, H_out)
    zoneout_masks: Optional[Sequence[object]]  # (m_h, m_c): None, a probability or (L*D, T, N, width)
    zoneout_seed: Optional[int]  # draw the masks with those probabilities from this seed

class _Cell(TypedDict):
    name: str
    gates: int
    cell_state: bool
    relu: bool
    continuous_time: bool
    extra_params: list[str]  # beyond torch's five, always present (without _l{k})
    optional_params: list[str]  # present when given
    features: list[str]  # among projection, zoneout, recurrent_dropout, int8, bfloat16

def cells() -> list[_Cell]: ...

def rnn_forward(
    mode: _Mode,
    x: npt.NDArray[_Float],  # (T, N, I)
    h0: npt.NDArray[_Float],  # (L*D, N, H_out)
    c0: Optional[npt.NDArray[_Float]],  # (L*D, N, H), LSTM only
    params: Mapping[str, object],  # torch's names (weight_ih_l0, ...) -> arrays, ReducedWeight or PackedWeight
    *,
    num_layers: int,
    bidirectional: bool,
    reverse: bool = False,  # one direction walking each sequence from its end
    proj_size: int = 0,
    lengths: Optional[npt.NDArray[np.integer]] = None,  # (N,), each in 1..T
    dropout_masks: Optional[Sequence[npt.NDArray[_Float]]] = None,  # num_layers-1 of (T, N, D*H_out)
    training: bool = False,
    cell_options: Optional[_CellOptions] = None,
    regularizers: Optional[_Regularizers] = None,
) -> tuple[npt.NDArray[_Float], npt.NDArray[_Float], Optional[npt.NDArray[_Float]], Optional[RnnCache]]:
    """Returns (output (T, N, D*H_out), h_n, c_n or None, cache or None)."""

def cell_step(
    mode: _Mode,
    x: npt.NDArray[_Float],  # (1, N, I): one step
    h0: npt.NDArray[_Float],  # (1, N, H)
    c0: Optional[npt.NDArray[_Float]],  # (1, N, H), LSTM only
    weight_ih: object,  # (G*H, I) array, ReducedWeight or PackedWeight
    weight_hh: object,  # (G*H, H) array, ReducedWeight or PackedWeight
    bias_ih: Optional[npt.NDArray[_Float]],  # (G*H,) or None (zeros)
    bias_hh: Optional[npt.NDArray[_Float]],  # (G*H,) or None (zeros)
    training: bool,
) -> tuple[npt.NDArray[_Float], npt.NDArray[_Float], Optional[npt.NDArray[_Float]], Optional[RnnCache]]:
    """rnn_forward for one step of one layer, one direction, no options, the parameters
    by position (the cells' lean entry). Returns (output, h_n, c_n or None, cache or None)."""

def rnn_backward(
    cache: RnnCache,
    d_output: Optional[npt.NDArray[_Float]],
    d_h_n: Optional[npt.NDArray[_Float]],
    d_c_n: Optional[npt.NDArray[_Float]],
    grads: Optional[Mapping[str, npt.NDArray[_Float]]],  # one per parameter of the forward; added
                                                          # into in place (None with gate_grads)
    consume: bool = False,
    assign: bool = False,  # write the gradients over grads instead of adding into them
    input_grad: bool = True,  # False: dx is neither computed nor returned (None)
    gate_grads: bool = False,  # no parameter gradients: the gate gradients come back instead
) -> tuple[Optional[npt.NDArray[_Float]], ...]:
    """Returns (dx or None, dh0, dc0 or None); with gate_grads also (dG_x, dG_h or None,
    h_prev): the weight gradients are then gate_weight_gradients' products of them."""

def gate_weight_gradients(
    dW: npt.NDArray[_Float],  # (G*H, width), written in place
    db: Optional[npt.NDArray[_Float]],  # (G*H,), written in place
    dG: npt.NDArray[_Float],  # (rows, G*H)
    inputs: npt.NDArray[_Float],  # (rows, width): x or h_prev of those rows
    assign: bool = False,  # write over dW and db instead of adding into them
) -> None: ...

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...

# --- float weights packed once (lstmfast.freeze) ----------------------------------

class PackedWeight:
    """weight_ih or weight_hh packed for the fused kernels in use; passed to rnn_forward
    and cell_step in place of the array."""

    @property
    def weight(self) -> npt.NDArray[_Float]: ...  # a read-only copy of the array packed
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def dtype(self) -> np.dtype: ...
    @property
    def mode(self) -> str: ...
    @property
    def recurrent(self) -> bool: ...  # weight_hh, else weight_ih
    @property
    def target(self) -> str: ...  # the kernels whose panels these are: generic, avx2, avx512
    @property
    def nbytes(self) -> int: ...

def pack_gates(mode: _Mode, weight: npt.NDArray[_Float], recurrent: bool) -> PackedWeight: ...

# --- instruction sets ------------------------------------------------------------

def simd_target() -> str: ...
def simd_targets() -> list[str]: ...
def set_simd_target(name: str) -> None: ...
def _activation(name: Literal["exp", "sigmoid", "tanh"], x: npt.NDArray[_Float]) -> npt.NDArray[_Float]: ...
