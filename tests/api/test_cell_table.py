"""The cell table: the compiled module describes every cell once (``_core.cells()``),
the package reads it (``lstmfast._cells``), and the NumPy reference, which keeps its
own tables as the independent specification, agrees with it."""

import numpy as np
import pytest

from lstmfast import _cells, reference

from helpers import fused_available

pytestmark = pytest.mark.skipif(not fused_available(), reason="fused kernels not built")


def test_the_reference_knows_the_same_cells():
    assert set(reference.MODES) == set(_cells.MODES)
    assert {m: reference.GATES[m] for m in _cells.MODES} == _cells.GATES
    assert set(reference.CELL_STATE_MODES) == set(_cells.CELL_STATE_MODES)
    assert set(reference.CTRNN_MODES.values()) == {
        m for m, cell in _cells.CELLS.items() if cell["continuous_time"]}


@pytest.mark.parametrize("mode", _cells.MODES)
def test_parameters_named_by_the_table_are_the_references(mode):
    cell = _cells.CELLS[mode]
    rng = np.random.default_rng(0)
    params = reference.init_params(mode, 3, 4, 1, mode != "LN_LSTM", False, 0, np.float64, rng,
                                   peephole=bool(cell["optional_params"]))
    names = {name[:-len("_l0")] for name in params}
    for extra in cell["extra_params"] + cell["optional_params"]:
        assert extra in names, (mode, extra)
    assert names >= {"weight_ih", "weight_hh"}
    assert params["weight_hh_l0"].shape[0] == cell["gates"] * 4


@pytest.mark.parametrize("mode", _cells.MODES)
def test_features_are_what_the_layers_accept(mode):
    """A feature the table lists is one the kernels take; one it does not list is
    refused by name (quantize for int8/bfloat16; zoneout at construction)."""
    import lstmfast
    from lstmfast.modules.base import _RNNBase

    assert ("zoneout" in _cells.CELLS[mode]["features"]) == (mode in _RNNBase._zoneout_modes)
    assert ("projection" in _cells.CELLS[mode]["features"]) == (mode == "LSTM")
    if mode == "GRU_RESET_BEFORE":
        layer = lstmfast.GRU(3, 4, linear_before_reset=False)
        for precision in ("int8", "bfloat16"):
            if _cells.supports(mode, precision):
                assert lstmfast.quantize(layer, precision).precision == precision
            else:
                with pytest.raises(ValueError, match=f"quantize: {precision} kernels are for"):
                    lstmfast.quantize(layer, precision)


def test_quantize_refuses_a_cell_whose_row_lacks_the_precision(monkeypatch):
    import lstmfast

    features = [f for f in _cells.CELLS["GRU"]["features"] if f != "int8"]
    monkeypatch.setitem(_cells.CELLS["GRU"], "features", features)
    with pytest.raises(ValueError, match="quantize: int8 kernels are for the cells .*not GRU"):
        lstmfast.quantize(lstmfast.GRU(3, 4), "int8")
    assert lstmfast.quantize(lstmfast.GRU(3, 4), "bfloat16").precision == "bfloat16"
