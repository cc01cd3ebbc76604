"""The layers ``LSTM``, ``GRU``, ``RNN``, and the forward every layer class of
lstmfast.torch shares (``_FastRNNMixin``, also under variants.py and quantized.py).

The forward follows torch's steps and calls torch's checks, then calls the kernels
(``_layer_forward_on``) or hands the call to torch's forward; it draws the
regularizers' masks (recurrent dropout, zoneout). Under CPU bfloat16 autocast it runs
the kernels' bfloat16 weights path (``_bfloat16_autocast_forward``): that is the
float layers' own forward under autocast, so it lives here, beside the call it makes.
"""

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..modules.options import (_GateOptions, _check_flag, _check_probability, _check_zoneout,
                               _rnn_nonlinearity)
from ..modules.precision import _backend_weight
from ._backend import (_as_class, _backend, _in_torch_only_context, _packed_for,
                       _unsupported_reason, _warn_once, _weight_arrays)
from .autograd import _RecurrentFunction, _stack_step, _weight_gradient_sums_for
from .loops import _torch_loop_forward, _torch_loop_stack
from .onnx_export import exported_as_nodes


def _packed_rows(batch_sizes, N):
    """The rows t*N + n of a padded (T, N, ...) tensor that a PackedSequence with these
    batch sizes holds, in its order, and each sequence's length."""
    inside = torch.arange(N)[None, :] < batch_sizes[:, None]  # (T, N)
    return inside.reshape(-1).nonzero().squeeze(1), inside.sum(0).numpy().astype(np.int64)


def _regularizer_masks(cls_name, masks):
    """(recurrent_dropout_mask, zoneout_mask) of a forward's **masks; TypeError, as
    Python raises it, for any other keyword."""
    for name in masks:
        if name not in ("recurrent_dropout_mask", "zoneout_mask"):
            raise TypeError(f"{cls_name}.forward() got an unexpected keyword argument {name!r}")
    return masks.get("recurrent_dropout_mask"), masks.get("zoneout_mask")


class _FastRNNMixin(_GateOptions):
    """The forward shared by the three layer classes; the rest is torch's nn.RNNBase.

    It follows torch's own forward step by step and calls torch's own checks, so
    shapes, errors and messages are torch's; where it is unsure (a malformed call),
    it hands the call to torch's forward, which raises exactly what torch raises.
    """

    _lstmfast_backend = "fused"
    _lstmfast_quantized = False  # QuantizedLSTM / QuantizedGRU: int8 weights, inference only
    _lstmfast_autocast = True  # bfloat16 autocast runs on the bfloat16 weights path
    _lstmfast_frozen = False  # freeze: weight_ih and weight_hh packed once (swap.py)
    recurrent_dropout = 0.0  # docs/cells.md, Recurrent dropout and zoneout
    zoneout = (0.0, 0.0)

    def __init__(self, *args, recurrent_dropout=0.0, zoneout=0.0, activations=None,
                 activation_alpha=None, activation_beta=None, clip=None, input_forget=False,
                 reverse=False, **kwargs):
        """torch's constructor, then what torch lacks (keyword-only): the regularizers
        and ONNX's activations, clip, input_forget and reverse (_GateOptions)."""
        super().__init__(*args, **kwargs)
        self.recurrent_dropout = _check_probability("recurrent_dropout", recurrent_dropout,
                                                    upper_open=True)
        self.zoneout = _check_zoneout(zoneout, "LSTM" if self.mode == "LSTM" else "GRU")
        self._set_onnx_options(activations, activation_alpha, activation_beta, clip,
                               input_forget, reverse, self.bidirectional)
        if self._lstmfast_quantized and self._onnx_options():
            raise ValueError(f"{type(self).__name__}: torch's int8 layers take none of ONNX's "
                             "activations, clip, input_forget or reverse")

    @property
    def _gate_options_mode(self):  # GRU and GRU_RESET_BEFORE take the same options
        return self._lstmfast_mode

    @property
    def _lstmfast_beyond_torch(self):
        """Whether no torch class computes this layer (restore leaves it as it is)."""
        return bool(self._onnx_options())

    def forward(self, input, hx=None, **masks):  # noqa: A002  (torch's name)
        """torch's forward; ``recurrent_dropout_mask=`` and ``zoneout_mask=`` (keywords)
        give the regularizers' masks. They are taken as ``**masks`` because torch's
        legacy ONNX exporter passes every named parameter with a default positionally."""
        recurrent_dropout_mask, zoneout_mask = _regularizer_masks(type(self).__name__, masks)
        given = None
        if recurrent_dropout_mask is not None or zoneout_mask is not None:
            given = {"recurrent_dropout_mask": recurrent_dropout_mask, "zoneout_mask": zoneout_mask}
        if torch.compiler.is_exporting():
            return _torch_only_forward(self, input, hx, given)
        return _fused_layer_forward(self, input, hx, given)

    def _regularized(self, given):
        return bool(self.recurrent_dropout or any(self.zoneout) or given)

    def extra_repr(self):
        s = super().extra_repr()
        if self.recurrent_dropout:
            s += f", recurrent_dropout={self.recurrent_dropout}"
        if any(self.zoneout):
            s += f", zoneout={self.zoneout}"
        return s + self._gate_options_repr()

    def _torch_forward(self, input, hx, given=None):
        # torch has no recurrent dropout, zoneout or ONNX's options: a loop of its ops
        if self._regularized(given) or self._onnx_options():
            return _torch_loop_forward(self, input, hx, _torch_loop_stack, given)
        return self._lstmfast_torch_class.forward(self, input, hx)

    @property
    def _lstmfast_mode(self):
        """The backends' name of this layer's cell (a variant's differs from torch's mode)."""
        return self.mode

    def _lstmfast_cell_options(self, T, N, like, given):
        """Keyword arguments of the backend forward beyond torch's, from ``given``, what
        the caller passed beyond torch's arguments: here recurrent dropout's and
        zoneout's masks (given, or drawn from torch's generator in training), or
        zoneout's probabilities (eval), and ONNX's options; a variant's own otherwise."""
        options = self._onnx_options()
        if not self._regularized(given):
            return options or None
        given = given or {}
        LD = self.num_layers * (2 if self.bidirectional else 1)
        H = self.hidden_size
        H_out = self.proj_size if self.proj_size > 0 else H

        def checked(name, value, shape):
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name}: expected a tensor of shape {shape}, got {got}")
            if not self.training:
                raise ValueError(f"{name}: given in eval mode, where there is no mask")
            return value.detach().to(like.dtype)

        rec = given.get("recurrent_dropout_mask")
        if rec is not None:
            options["recurrent_dropout_masks"] = checked("recurrent_dropout_mask", rec, (LD, N, H_out))
        elif self.training and self.recurrent_dropout > 0:
            keep = 1.0 - self.recurrent_dropout
            options["recurrent_dropout_masks"] = like.new_full((LD, N, H_out), keep).bernoulli() / keep
        zone = given.get("zoneout_mask")
        if zone is not None:
            if not isinstance(zone, (tuple, list)) or len(zone) != 2:
                raise ValueError("zoneout_mask: expected a pair (m_h, m_c)")
            options["zoneout_masks"] = tuple(
                None if m is None else checked(f"zoneout_mask[{i}]", m, (LD, T, N, width))
                for i, (m, width) in enumerate(zip(zone, (H_out, H))))
        elif any(self.zoneout):
            # training: masks drawn inside the kernels from a seed of torch's generator
            # (reference.zoneout_masks_from_seed), nothing stored; eval: the expectation
            options["zoneout_masks"] = tuple(p or None for p in self.zoneout)
            if self.training:
                options["zoneout_seed"] = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return options or None

    def _lstmfast_weights(self):
        """The weights for _layer_forward_on: the flat weights, their names, and
        whether they are reduced (QuantizedLSTM / QuantizedGRU: packed int8); None
        when only torch's forward can run them. Read from the parameter registry when
        every weight is there (torch's _update_flat_weights looks each up twice to see
        whether one was replaced: about 5 us a call). A parametrization or a weight-norm
        hook serves a weight through the attribute instead, and may compute it anew at
        every lookup (spectral_norm's power iteration in training): then torch's own
        update, so that the weights are the ones torch's forward would use."""
        params = self._parameters
        names = self._flat_weights_names
        if all(name in params for name in names):
            return [params[name] for name in names], list(names), False
        self._update_flat_weights()
        return list(self._flat_weights), list(names), False

    def _lstmfast_packs(self):
        """Whether the kernels read this layer's weight_ih and weight_hh packed, so that a
        frozen layer is given them packed: the fused backend, no projection, and none of
        ONNX's options that the kernels lack (they run in the reference)."""
        if self._lstmfast_backend != "fused" or self.proj_size:
            return False
        options = {k: v for k, v in self._onnx_options().items() if k != "reverse"}
        return _backend("fused").fused(self._lstmfast_mode, **options)

    def __prepare_scriptable__(self):
        """``torch.jit.script`` compiles torch's class on the same parameters."""
        if self._onnx_options():
            raise TypeError(f"{type(self).__name__} with ONNX's activations, clip, input_forget "
                            "or reverse cannot be scripted: torch has no such layer to compile; "
                            "use torch.jit.trace")
        return _as_class(self, self._lstmfast_torch_class)


def _torch_only_forward(self, input, hx, given):
    """A call only torch can compute (export, tracing, torch.func; see
    _in_torch_only_context): ONNX's standard nodes while exporting to ONNX a layer
    whose options they hold (onnx_export.py), torch's class or the loop otherwise."""
    result = exported_as_nodes(self, input, hx, given)
    return result if result is not None else self._torch_forward(input, hx, given)


# torch.compile cannot trace into the kernels: the fused call runs eagerly behind a
# graph break. Dynamo never traces torch's own nn.LSTM/GRU/RNN either (it runs
# them eagerly), so a layer costs the same break either way; a cell costs one
# break per call, where torch's cell compiles into the graph. Disabled also when
# called eagerly, because dynamo would otherwise try to compile the frames this
# function runs on behalf of a compiled caller (about 1 us per call).
@torch.compiler.disable
def _fused_layer_forward(self, input, hx, given=None):
    if given is None and type(self) in _PLAIN_LAYERS:
        result = _plain_inference_forward(self, input, hx)
        if result is not None:
            return result
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    is_lstm = self.mode == "LSTM"
    if hx is None:
        hx_list = []
    elif is_lstm and isinstance(hx, (tuple, list)) and len(hx) == 2:
        hx_list = list(hx)
    elif not is_lstm and isinstance(hx, torch.Tensor):
        hx_list = [hx]
    else:
        return self._torch_forward(input, hx, given)  # torch's answer to a malformed hx
    if not all(isinstance(h, torch.Tensor) for h in hx_list):
        return self._torch_forward(input, hx, given)
    if (_in_torch_only_context(autocast=False) or not isinstance(data, torch.Tensor)
            or data.numel() == 0):
        return _torch_only_forward(self, input, hx, given)
    if torch.is_autocast_enabled("cpu") and not self._lstmfast_quantized:
        if (not self._lstmfast_autocast or self._onnx_options()
                or not _autocast_serves(self, data)):
            return self._torch_forward(input, hx, given)
        return _bfloat16_autocast_forward(self, input, hx, hx_list)
    weights = self._lstmfast_weights()
    if weights is None:
        return self._torch_forward(input, hx, given)
    return _layer_forward_on(self, input, hx, hx_list, *weights, given=given)


def _layer_forward_on(self, input, hx, hx_list, weights, names, reduced=False, given=None):
    """The rest of _fused_layer_forward with the given weights: tensors, or for
    ``reduced`` the packed reduced weights (and bias tensors) of an inference-only path.
    ``given``: what the caller passed beyond torch's arguments (a CTRNN's noise)."""
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    is_lstm = self.mode == "LSTM"
    tensors = [w for w in weights if isinstance(w, torch.Tensor)]
    reason = _unsupported_reason(data, hx_list + tensors)
    if reason is not None:
        if reason:
            _warn_once((type(self).__name__, reason),
                       f"lstmfast.torch.{type(self).__name__}: {reason} is not supported by the "
                       "fused kernels; using torch's implementation")
        return self._torch_forward(input, hx, given)

    D = 2 if self.bidirectional else 1
    H_out = self.proj_size if self.proj_size > 0 else self.hidden_size
    batch_sizes = rows = lengths = None
    if packed:
        x, batch_sizes, sorted_indices, unsorted_indices = input
        N = int(batch_sizes[0])
        T = batch_sizes.shape[0]
        if hx is not None:
            hx = self.permute_hidden(hx, sorted_indices)
    else:
        if data.dim() not in (2, 3) or any(h.dim() != data.dim() for h in hx_list):
            return self._torch_forward(input, hx, given)  # raises torch's own error
        batch_dim = 0 if self.batch_first else 1
        x = input if input.dim() == 3 else input.unsqueeze(batch_dim)
        if hx is not None and input.dim() == 2:
            hx = tuple(h.unsqueeze(1) for h in hx) if is_lstm else hx.unsqueeze(1)
        N = x.shape[batch_dim]
    if hx is None:  # check_forward_args without the states': those made below fit
        self.check_input(x, batch_sizes)
    else:
        self.check_forward_args(x, hx, batch_sizes)  # torch's own checks and messages
    if not packed:
        x = x.transpose(0, 1) if self.batch_first else x
        T = x.shape[0]
    if packed:
        rows, lengths = _packed_rows(batch_sizes, N)
        x = x.new_zeros(T * N, x.shape[1]).index_copy(0, rows, x).view(T, N, -1)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(t.requires_grad for t in hx_list + tensors))
    if needs_grad and reduced:  # reduced weights have no backward: torch's answer
        return self._torch_forward(input, hx, given)
    if hx is None:  # zeros; as arrays where no autograd node needs tensors
        zeros = torch.zeros if needs_grad else _numpy_zeros
        h0 = zeros(D * self.num_layers, N, H_out, dtype=data.dtype)
        c0 = zeros(D * self.num_layers, N, self.hidden_size, dtype=data.dtype) if is_lstm else None
    else:
        h0, c0 = hx if is_lstm else (hx, None)
    if c0 is None:
        c0 = torch.empty(0, dtype=data.dtype)

    masks = torch.empty(0, dtype=data.dtype)
    if self.training and self.dropout > 0 and self.num_layers > 1:
        keep = 1.0 - self.dropout
        shape = (self.num_layers - 1, T, N, D * H_out)
        masks = (torch.bernoulli(torch.full(shape, keep, dtype=data.dtype)) / keep
                 if keep > 0 else torch.zeros(shape, dtype=data.dtype))

    settings = {
        "backend": _backend(self._lstmfast_backend),
        "mode": self._lstmfast_mode,
        "cell_options": self._lstmfast_cell_options(T, N, x, given),
        "names": names,
        "num_layers": self.num_layers,
        "bidirectional": self.bidirectional,
        "bias": self.bias,
        "proj_size": self.proj_size,
        "lengths": lengths,
        "rows": rows,
        "batch_sizes": batch_sizes,
        "keep_for_backward": needs_grad,
    }
    options = settings["cell_options"]
    if packed and sorted_indices is not None and options:
        # masks and noise have their rows in the caller's batch order; x's here is the packed order
        def to_packed_order(value, dim):
            return value.index_select(dim, sorted_indices) if isinstance(value, torch.Tensor) else value

        options = dict(options)
        if options.get("noise") is not None:
            options["noise"] = to_packed_order(options["noise"], 2)
        if options.get("recurrent_dropout_masks") is not None:
            options["recurrent_dropout_masks"] = to_packed_order(options["recurrent_dropout_masks"], 1)
        if options.get("zoneout_masks") is not None:
            options["zoneout_masks"] = tuple(to_packed_order(m, 2) for m in options["zoneout_masks"])
        settings["cell_options"] = options
    if needs_grad:
        if not reduced:  # the weights' views made once, not at every call (_weight_arrays)
            settings["weight_arrays"] = _weight_arrays(self, weights, names)
        # a layer stepped in a loop makes its calls' weight gradients once per backward
        # pass, as a cell does (autograd.py, _WeightGradientSums)
        sums = settings["weight_gradient_sums"] = _weight_gradient_sums_for(
            self, settings["backend"], weights, names)
        out, h_n, c_n = _RecurrentFunction.apply(settings, x, h0, c0, masks,
                                                 None if sums is None else sums.token, *weights)
    else:  # nothing to differentiate: the kernels alone, no autograd node
        arrays = None if reduced else _weight_arrays(self, weights, names)
        out, h_n, c_n, _ = _stack_step(settings, x, h0, c0, masks, weights, arrays)

    if packed:
        output = PackedSequence(out.reshape(T * N, -1).index_select(0, rows), batch_sizes,
                                sorted_indices, unsorted_indices)
        return output, self.permute_hidden((h_n, c_n) if is_lstm else h_n, unsorted_indices)
    if input.dim() == 2:
        output, h_n, c_n = out.squeeze(1), h_n.squeeze(1), c_n.squeeze(1) if is_lstm else c_n
    else:
        output = out.transpose(0, 1) if self.batch_first else out
    return output, ((h_n, c_n) if is_lstm else h_n)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _plain_inference_forward(self, input, hx):
    """The call a stream makes at every frame, and a batch at inference: a plain
    (T, N, I) or (N, T, I) tensor, states given whole or None, nothing to
    differentiate, no dropout, none of ONNX's options, on the fused kernels (float
    weights, or a quantized layer's int8 ones). It costs about half the full path
    (GRU(64, 128), one frame at N=1: 16.5 us against 32.5, of which the kernels 7),
    which follows torch's forward step by step for every kind of call.
    Returns None, for the full path to take the call (and raise torch's errors),
    unless every condition holds; with them the full path would pass the kernels
    the same arrays."""
    # Every check is a plain attribute or a cheap test, cheapest first: each property
    # or helper called here cost a frame a tenth of a microsecond or more.
    if (type(input) is not torch.Tensor or input.dim() != 3 or self._lstmfast_backend != "fused"
            or (self.training and self.dropout > 0 and self.num_layers > 1)
            or self.recurrent_dropout or self.zoneout[0] or self.zoneout[1]
            or self._activations is not None or self.clip is not None or self.input_forget
            or self.reverse):  # ONNX's options (_onnx_options), spelled out
        return None
    dtype = input.dtype
    T, N, I = input.shape
    if self.batch_first:
        T, N = N, T
    if (dtype not in _NUMPY_DTYPES or not input.is_cpu or not T or not N
            or I != self.input_size or _in_torch_only_context()):
        return None
    grad = torch.is_grad_enabled()
    if grad and input.requires_grad:
        return None
    if self._lstmfast_quantized:  # int8 weights packed once, float32 biases, no gradient
        packed = self._lstmfast_weights()
        if packed is None or dtype is not torch.float32:
            return None
        weights, names, _ = packed
        arrays = [w.numpy() if isinstance(w, torch.Tensor) else w for w in weights]
    else:
        params = self._parameters
        names = self._flat_weights_names
        weights = []
        for name in names:
            w = params.get(name)
            if w is None or w.dtype is not dtype or not w.is_cpu or (grad and w.requires_grad):
                return None  # served through a parametrization, or torch's path decides
            weights.append(w)
        arrays = _weight_arrays(self, weights, names)
    is_lstm = self.mode == "LSTM"
    one_way = not self.bidirectional
    LD, H = self.num_layers if one_way else 2 * self.num_layers, self.hidden_size
    H_out = self.proj_size or H
    if hx is None:
        h0 = np.zeros((LD, N, H_out), dtype=_NUMPY_DTYPES[dtype])
        c0 = np.zeros((LD, N, H), dtype=h0.dtype) if is_lstm else None
    else:
        if is_lstm:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                return None
            h, c = hx
        else:
            h, c = hx, None
        # one state at a time, not a loop: this runs at every frame of a stream
        if (type(h) is not torch.Tensor or h.dtype is not dtype or not h.is_cpu
                or h.shape != (LD, N, H_out) or (grad and h.requires_grad)):
            return None
        if c is not None and (type(c) is not torch.Tensor or c.dtype is not dtype or not c.is_cpu
                              or c.shape != (LD, N, H) or (grad and c.requires_grad)):
            return None
        h0, c0 = h.numpy(), None if c is None else c.numpy()
    x = input.transpose(0, 1) if self.batch_first else input
    core = _backend("fused")._core
    if T == 1 and one_way and self.num_layers == 1 and not self.proj_size:
        # one frame of one layer: the lean entry, as plain_forward takes it, with the
        # weights by position (a dict of them for plain_forward costs 1.5 us a frame)
        if not self.bias:
            arrays = list(arrays) + [None, None]
        output, h_n, c_n, _ = core.cell_step(self._lstmfast_mode, x.numpy(), h0, c0, *arrays,
                                             False)
    else:
        output, h_n, c_n = _backend("fused").plain_forward(
            self._lstmfast_mode, x.numpy(), (h0, c0) if is_lstm else h0,
            dict(zip(names, arrays)), self.num_layers, self.bidirectional, self.proj_size)
    output = torch.from_numpy(output)
    if self.batch_first:
        output = output.transpose(0, 1)
    if is_lstm:
        return output, (torch.from_numpy(h_n), torch.from_numpy(c_n))
    return output, torch.from_numpy(h_n)


def _numpy_zeros(*shape, dtype):
    """torch.zeros as an array (about a microsecond less a call)."""
    return np.zeros(shape, dtype=_NUMPY_DTYPES[dtype])


def _autocast_serves(self, data):
    """Whether the kernels give torch's result under this autocast: CPU bfloat16
    autocast, float32 weights, input of float32 or bfloat16."""
    if torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    self._update_flat_weights()
    return (data.is_cpu and data.dtype in (torch.float32, torch.bfloat16)
            and all(w.dtype == torch.float32 and w.is_cpu for w in self._flat_weights))


def _bfloat16_autocast_forward(self, input, hx, hx_list):
    """A layer under CPU bfloat16 autocast: torch multiplies by bfloat16 weights.
    Here the weights are rounded to bfloat16 once (until they change), state and
    gate math stay float32 (README "Reduced precision"), and the results get the
    dtypes torch gives them (_autocast_dtypes). Training under autocast needs
    torch's backward: torch's path."""
    from .. import reference

    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in [input.data if isinstance(input, PackedSequence) else input]
        + hx_list + list(self._flat_weights))
    if needs_grad:
        return self._torch_forward(input, hx)
    backend = _backend(self._lstmfast_backend)
    weights = list(self._flat_weights)
    names = list(self._flat_weights_names)
    key = tuple((w.data_ptr(), w._version, tuple(w.shape)) for w in weights) + (backend,)

    def make():
        return [_backend_weight(backend, reference.BFloat16Weight(
                    reference.to_bfloat16_bits(w.detach().numpy())))
                if name.startswith("weight") else w.detach().clone()
                for name, w in zip(names, weights)]

    reduced = _packed_for(self, key, make)
    data_dtype = (input.data if isinstance(input, PackedSequence) else input).dtype
    as_float = [h.float() for h in hx_list]
    if isinstance(input, PackedSequence):
        input = PackedSequence(input.data.float(), input.batch_sizes, input.sorted_indices,
                               input.unsorted_indices)
    else:
        input = input.float()
    hx = None if hx is None else (tuple(as_float) if self.mode == "LSTM" else as_float[0])
    with torch.autocast("cpu", enabled=False):
        output, state = _layer_forward_on(self, input, hx, as_float, reduced, names, True)
    out_dtype, h_dtype, c_dtype = _autocast_dtypes(self.mode, self.proj_size, data_dtype)
    if isinstance(output, PackedSequence):
        output = PackedSequence(output.data.to(out_dtype), output.batch_sizes,
                                output.sorted_indices, output.unsorted_indices)
    else:
        output = output.to(out_dtype)
    if self.mode == "LSTM":
        return output, (state[0].to(h_dtype), state[1].to(c_dtype))
    return output, state.to(h_dtype)


def _autocast_dtypes(mode, proj_size, input_dtype):
    """The dtypes of (output, h_n, c_n) that torch's layer returns under CPU bfloat16
    autocast (torch 2.13; tests/torch_adapter/test_torch_quantized.py compares them with torch's
    wherever torch's kernels run). Autocast lowers the LSTM and RNN ops to bfloat16,
    but not the GRU, whose results keep the input's dtype; a projected LSTM's
    float32 input keeps c_n in float32 (it never passes through the projection)."""
    bf16 = torch.bfloat16
    if mode == "GRU":
        return input_dtype, input_dtype, None
    if mode == "LSTM":
        return bf16, bf16, torch.float32 if proj_size and input_dtype == torch.float32 else bf16
    return bf16, bf16, None


class LSTM(_FastRNNMixin, nn.LSTM):
    """``torch.nn.LSTM`` computed by lstmfast's fused kernels; ``recurrent_dropout=p`` and
    ``zoneout`` (a probability, or (p_h, p_c) for h and c)
    add the regularizers of docs/cells.md, Recurrent dropout and zoneout (``lstmfast.LSTM``'s);
    ONNX's ``activations`` (with ``activation_alpha``, ``activation_beta``), ``clip``,
    ``input_forget`` and ``reverse`` (one direction, each sequence from its end) are
    ``lstmfast.LSTM``'s too (docs/onnx.md)."""

    _lstmfast_torch_class = nn.LSTM


class GRU(_FastRNNMixin, nn.GRU):
    """``torch.nn.GRU`` computed by lstmfast's fused kernels; ``recurrent_dropout=p`` and
    ``zoneout`` (a probability, or (p_h, p_c), p_c 0)
    add the regularizers of docs/cells.md, Recurrent dropout and zoneout (``lstmfast.GRU``'s);
    ONNX's ``activations`` (with ``activation_alpha``, ``activation_beta``), ``clip`` and
    ``reverse`` are ``lstmfast.GRU``'s too (docs/onnx.md).

    ``linear_before_reset=False`` gives the GRU of the original paper (ONNX's
    ``linear_before_reset=0``, Keras's ``reset_after=False``; ``lstmfast.GRU``'s), which
    torch.nn lacks: n = tanh(W_in x + b_in + W_hn (r * h) + b_hn), on the same
    parameters. Where only torch can compute (CUDA, other dtypes, tracing, export,
    ``torch.func``, autocast, double backward) a loop of torch ops computes it; ONNX
    export writes ONNX's GRU node with ``linear_before_reset=0`` (onnx_export.py)."""

    _lstmfast_torch_class = nn.GRU
    linear_before_reset = True  # accelerate() swaps torch's GRU in without __init__

    def __init__(self, *args, linear_before_reset=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.linear_before_reset = _check_flag("linear_before_reset", linear_before_reset)

    @property
    def _lstmfast_mode(self):
        return "GRU" if self.linear_before_reset else "GRU_RESET_BEFORE"

    @property
    def _lstmfast_autocast(self):  # torch's ops under autocast for the GRU torch lacks
        return self.linear_before_reset

    @property
    def _lstmfast_beyond_torch(self):
        return not self.linear_before_reset or super()._lstmfast_beyond_torch

    def _torch_forward(self, input, hx, given=None):
        if not self.linear_before_reset:  # torch has no such GRU: a loop of its ops
            return _torch_loop_forward(self, input, hx, _torch_loop_stack, given)
        return super()._torch_forward(input, hx, given)

    def extra_repr(self):
        return super().extra_repr() + ("" if self.linear_before_reset else ", linear_before_reset=False")

    def __prepare_scriptable__(self):
        if not self.linear_before_reset:
            raise TypeError("GRU(linear_before_reset=False) cannot be scripted: torch has no such GRU "
                            "to compile; use torch.jit.trace")
        return super().__prepare_scriptable__()


class RNN(_FastRNNMixin, nn.RNN):
    """``torch.nn.RNN`` computed by lstmfast's fused kernels; ``recurrent_dropout=p`` and
    ``zoneout`` (a probability, or (p_h, p_c), p_c 0)
    add the regularizers of docs/cells.md, Recurrent dropout and zoneout (``lstmfast.RNN``'s);
    ONNX's ``activations`` (with ``activation_alpha``, ``activation_beta``), ``clip`` and
    ``reverse`` are ``lstmfast.RNN``'s too (docs/onnx.md): ``activations=["Relu"]`` is
    ``nonlinearity="relu"``; another of ONNX's replaces ``nonlinearity``, which must then
    stay "tanh"."""

    _lstmfast_torch_class = nn.RNN

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # torch's reads nonlinearity, by keyword or place
        self.nonlinearity = _rnn_nonlinearity(self, self.nonlinearity)
        self.mode = "RNN_RELU" if self.nonlinearity == "relu" else "RNN_TANH"


# The classes whose call _plain_inference_forward may take: torch's three layers
# with nothing added to their forward, and their int8 twins (quantized.py adds
# them); the variants' cells and a subclass's overrides take the full path.
_PLAIN_LAYERS = {LSTM, GRU, RNN}
