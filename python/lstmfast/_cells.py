"""The cells the kernels run, as the compiled module describes them (``_core.cells()``).

The C++ cell table is the one place a cell is described; the modules, the fused
backend and the torch adapter read these names instead of keeping tables of their
own. The NumPy reference keeps its own (it is the independent specification), and a
test checks that the two agree.
"""

from ._native import _core

#: One dict per cell, by mode name: gates, cell_state, relu, continuous_time,
#: extra_params, optional_params, features (see ``_core.cells``).
CELLS = {cell["name"]: cell for cell in _core.cells()}

#: Every mode the kernels run, in the C++ order.
MODES = tuple(CELLS)

#: G: the blocks of H in weight_ih and weight_hh, by mode.
GATES = {name: cell["gates"] for name, cell in CELLS.items()}

#: The modes whose state is a pair (h, c).
CELL_STATE_MODES = tuple(name for name, cell in CELLS.items() if cell["cell_state"])


def supports(mode, feature):
    """Whether the kernels of ``mode`` have ``feature`` (projection, zoneout,
    recurrent_dropout, int8, bfloat16, onnx_gates: ONNX's hard sigmoid, clip and
    input_forget at inference)."""
    return feature in CELLS[mode]["features"]


def modes_with(feature):
    """The modes that have ``feature``, in the C++ order."""
    return tuple(name for name in MODES if supports(name, feature))
