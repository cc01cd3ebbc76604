"""lstmfast: fast LSTM, GRU and Elman-RNN layers for the CPU, with torch.nn's API.

``backend="fused"`` runs the C++ kernels, ``backend="numpy"`` the readable NumPy
reference in :mod:`lstmfast.reference`.
"""

from ._native import _core
from ._config import get_num_threads, set_num_threads, show_config
from .interop import from_onnx_lstm
from .onnx_nodes import from_onnx, run_onnx_node
from .modules import (CTRNN, GRU, LSTM, RNN, GRUCell, LayerNormLSTM, LSTMCell, RNNCell, freeze,
                      quantize)

__version__ = _core.__version__

__all__ = [
    "__version__",
    "LSTM",
    "GRU",
    "RNN",
    "CTRNN",
    "LayerNormLSTM",
    "LSTMCell",
    "GRUCell",
    "RNNCell",
    "quantize",
    "freeze",
    "from_onnx_lstm",
    "from_onnx",
    "run_onnx_node",
    "get_num_threads",
    "set_num_threads",
    "show_config",
]
