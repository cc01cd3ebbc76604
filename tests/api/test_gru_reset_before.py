"""lstmfast.GRU(linear_before_reset=False): the NumPy API of the GRU of the original paper on
the fused kernels against the NumPy backend (the reference, whose oracles are ONNX
Runtime and Keras), through everything the layer does around the kernels."""

import pickle

import numpy as np
import pytest

import lstmfast

from helpers import assert_close, fused_available

pytestmark = pytest.mark.skipif(not fused_available(), reason="fused kernels not built")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", [dict(), dict(num_layers=2, bidirectional=True),
                                     dict(batch_first=True, bias=False),
                                     dict(recurrent_dropout=0.3, zoneout=0.2, num_layers=2)],
                         ids=["plain", "bidirectional", "batch_first", "regularizers"])
def test_fused_matches_the_numpy_backend_forward_and_backward(dtype, options):
    kw = dict(linear_before_reset=False, dtype=dtype, seed=3, **options)
    fused, numpy = lstmfast.GRU(5, 7, **kw), lstmfast.GRU(5, 7, backend="numpy", **kw)
    rng = np.random.default_rng(1)
    N, T = 4, 6
    x = rng.standard_normal((N, T, 5) if fused.batch_first else (T, N, 5)).astype(dtype)
    lengths = np.array([6, 2, 5, 3])
    outs = [layer.train()(x, lengths=lengths) for layer in (fused, numpy)]
    assert_close(outs[0][0], outs[1][0], name="output")
    assert_close(outs[0][1], outs[1][1], name="h_n")
    d_out = rng.standard_normal(outs[1][0].shape).astype(dtype)
    grads = [layer.backward(d_out) for layer in (fused, numpy)]
    assert_close(grads[0][0], grads[1][0], name="dx")
    for name in numpy.grad:
        assert_close(fused.grad[name], numpy.grad[name], name=f"grad {name}")


def test_options_survive_repr_pickle_and_state_dict():
    layer = lstmfast.GRU(3, 4, linear_before_reset=False, seed=0)
    assert repr(layer) == "GRU(3, 4, linear_before_reset=False)"
    twin = pickle.loads(pickle.dumps(layer))
    assert twin.linear_before_reset is False and twin._mode == "GRU_RESET_BEFORE"
    x = np.random.default_rng(0).standard_normal((2, 1, 3)).astype(np.float32)
    np.testing.assert_array_equal(twin(x)[0], layer(x)[0])
    plain = lstmfast.GRU(3, 4, seed=0)
    assert sorted(plain.state_dict()) == sorted(layer.state_dict())
    assert np.abs(plain(x)[0] - layer(x)[0]).max() > 1e-4  # the same weights, another cell
    with pytest.raises(TypeError, match="linear_before_reset should be of type bool"):
        lstmfast.GRU(3, 4, linear_before_reset=None)
