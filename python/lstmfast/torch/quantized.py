"""torch's dynamically quantized int8 layers (``torch.ao.nn.quantized.dynamic.LSTM`` /
``GRU``) on lstmfast's int8 kernels: ``QuantizedLSTM``, ``QuantizedGRU``.

bfloat16 autocast, the other reduced precision, is a path of the float layers'
forward (layers.py).
"""

import numpy as np
import torch
from torch.ao.nn.quantized import dynamic as nnqd

from ..modules.precision import _backend_weight
from ._backend import _backend, _packed_for
from .layers import _PLAIN_LAYERS, _FastRNNMixin


def _int8_weight(qweight):
    """A reference.Int8Weight holding a torch quantized weight as it is: its int8
    values and its scale (per tensor, or per output row), when it is symmetric
    (zero point 0), which torch's dynamic quantization makes. Any other scheme is
    quantized again per output row from its float values."""
    from .. import reference

    M = qweight.shape[0]
    scheme = qweight.qscheme()
    if qweight.dtype == torch.qint8:
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric) and \
                qweight.q_zero_point() == 0:
            return reference.Int8Weight(qweight.int_repr().numpy(),
                                        np.full(M, qweight.q_scale(), dtype=np.float32))
        if scheme in (torch.per_channel_affine, torch.per_channel_symmetric) and \
                qweight.q_per_channel_axis() == 0 and not qweight.q_per_channel_zero_points().any():
            return reference.Int8Weight(qweight.int_repr().numpy(),
                                        qweight.q_per_channel_scales().numpy().astype(np.float32))
    return reference.Int8Weight(*reference.quantize_int8(qweight.dequantize().numpy()))


class _QuantizedRNNMixin(_FastRNNMixin):
    """torch's dynamically quantized LSTM / GRU (``torch.ao.nn.quantized.dynamic``) on
    lstmfast's int8 kernels, with the module's own int8 weights and scales.

    Activations are quantized as lstmfast does (per row and per product, 7 bits),
    not per tensor as torch does, so results differ from torch's within int8's
    error, which is no larger than torch's (README "Reduced precision"). Modules of
    another dtype (float16 weights) and calls that need gradients run torch's forward.
    """

    _lstmfast_quantized = True
    proj_size = 0  # torch's quantized layers have no projection

    def _lstmfast_weights(self):
        if self.dtype != torch.qint8:
            return None
        backend = _backend(self._lstmfast_backend)
        key = tuple(v.param for v in self._all_weight_values) + (backend,)

        def make():
            weight_bias = self._weight_bias()
            weights, names = [], []
            for layer in range(self.num_layers):
                for suffix in ("", "_reverse")[: 2 if self.bidirectional else 1]:
                    for kind in ("ih", "hh"):
                        name = f"weight_{kind}_l{layer}{suffix}"
                        names.append(name)
                        weights.append(_backend_weight(backend, _int8_weight(weight_bias["weight"][name])))
                    for kind in ("ih", "hh"):
                        name = f"bias_{kind}_l{layer}{suffix}"
                        bias = weight_bias["bias"].get(name)
                        if bias is not None:
                            names.append(name)
                            weights.append(bias.detach().float().contiguous())
            return weights, names

        weights, names = _packed_for(self, key, make)
        return weights, names, True


class QuantizedLSTM(_QuantizedRNNMixin, nnqd.LSTM):
    """``torch.ao.nn.quantized.dynamic.LSTM`` computed by lstmfast's int8 kernels."""

    _lstmfast_torch_class = nnqd.LSTM


class QuantizedGRU(_QuantizedRNNMixin, nnqd.GRU):
    """``torch.ao.nn.quantized.dynamic.GRU`` computed by lstmfast's int8 kernels."""

    _lstmfast_torch_class = nnqd.GRU


_PLAIN_LAYERS.update({QuantizedLSTM, QuantizedGRU})  # their plain calls take the short path
