"""lstmfast inside torch models: ``LSTM``, ``GRU``, ``RNN`` and ``accelerate``.

The classes are subclasses of ``torch.nn.LSTM`` / ``GRU`` / ``RNN``: same
constructor, parameters, ``state_dict`` keys and forward signature (a tensor or a
``PackedSequence``, and ``hx``). On CPU float32/float64 tensors the forward pass
and its backward run through lstmfast's fused kernels inside one
``torch.autograd.Function``; contiguous tensors are shared with the kernels, not
copied. Anything else (CUDA, other dtypes) falls back to torch's own
implementation, with a warning the first time.

``accelerate(model)`` swaps the class of every ``nn.LSTM``/``nn.GRU``/``nn.RNN``
inside ``model`` in place. The modules keep their parameter objects, so
optimizers built before the swap keep working.

This is the only module of lstmfast that imports torch.
"""

import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

__all__ = ["LSTM", "GRU", "RNN", "accelerate"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64)
_warned = set()


def _backend(name):
    if name == "numpy":
        from . import reference

        return reference
    from . import _fused

    if not getattr(_fused, "available", False):
        raise NotImplementedError("lstmfast's fused kernels are not built")
    return _fused


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _as_numpy(t):
    """A NumPy view of a CPU tensor (no copy); the kernels copy non-contiguous input themselves."""
    return t.detach().numpy()


class _RecurrentFunction(torch.autograd.Function):
    """Forward and BPTT of a whole stack through an lstmfast backend.

    Inputs: a dict of static settings, x (T, N, I), h0, c0 (or an empty tensor for
    non-LSTM), dropout masks (or an empty tensor), then the flat weights in the
    module's ``_flat_weights_names`` order.
    """

    @staticmethod
    def forward(ctx, settings, x, h0, c0, masks, *weights):
        backend = settings["backend"]
        is_lstm = settings["mode"] == "LSTM"
        params = {name: _as_numpy(w) for name, w in zip(settings["names"], weights)}
        hx = (_as_numpy(h0), _as_numpy(c0)) if is_lstm else _as_numpy(h0)
        dropout_masks = list(_as_numpy(masks)) if masks.numel() else None
        output, h_n, c_n, cache = backend.forward(
            settings["mode"], _as_numpy(x), hx, params,
            num_layers=settings["num_layers"], bidirectional=settings["bidirectional"],
            proj_size=settings["proj_size"], lengths=settings["lengths"],
            dropout_masks=dropout_masks, training=settings["keep_for_backward"])
        ctx.cache = cache
        ctx.settings = settings
        ctx.param_shapes = {name: tuple(w.shape) for name, w in zip(settings["names"], weights)}
        ctx.dtype = x.dtype
        out = torch.from_numpy(output)
        h_n = torch.from_numpy(h_n)
        c_n = torch.from_numpy(c_n) if is_lstm else torch.empty(0, dtype=x.dtype)
        if not is_lstm:
            ctx.mark_non_differentiable(c_n)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, d_output, d_h_n, d_c_n):
        settings = ctx.settings
        if ctx.cache is None:
            raise RuntimeError("lstmfast: this forward kept nothing for backward")
        is_lstm = settings["mode"] == "LSTM"
        np_dtype = np.float32 if ctx.dtype == torch.float32 else np.float64
        grads = {name: np.zeros(shape, np_dtype) for name, shape in ctx.param_shapes.items()}
        dx, dh0, dc0, grads = settings["backend"].backward(
            ctx.cache, _as_numpy(d_output.contiguous()), _as_numpy(d_h_n.contiguous()),
            _as_numpy(d_c_n.contiguous()) if is_lstm else None, grads)
        return (None, torch.from_numpy(dx), torch.from_numpy(dh0),
                torch.from_numpy(dc0) if is_lstm else None, None,
                *(torch.from_numpy(grads[name]) for name in settings["names"]))


class _FastRNNMixin:
    """The forward shared by the three classes; the rest is torch's nn.RNNBase."""

    _lstmfast_backend = "fused"

    def _lstmfast_mode(self):
        if self.mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
            return self.mode
        raise ValueError(f"lstmfast: unsupported mode {self.mode!r}")

    def _lstmfast_unsupported(self, data):
        """Why this call must take torch's own path, or None."""
        if data.device.type != "cpu":
            return f"device {data.device.type}"
        if data.dtype not in _SUPPORTED_DTYPES:
            return f"dtype {data.dtype}"
        for w in self._flat_weights:
            if w is None or w.device.type != "cpu" or w.dtype != data.dtype:
                return "weights of another device or dtype than the input"
        return None

    def forward(self, input, hx=None):  # noqa: A002  (torch's argument name)
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        if data.numel() == 0:  # an empty batch (or sequence): torch's answer, whatever it is
            return super().forward(input, hx)
        reason = self._lstmfast_unsupported(data)
        if reason is not None:
            _warn_once((type(self).__name__, reason),
                       f"lstmfast.torch.{type(self).__name__}: {reason} is not supported by the "
                       "fused kernels; using torch's implementation")
            return super().forward(input, hx)

        is_lstm = self.mode == "LSTM"
        D = 2 if self.bidirectional else 1
        H_out = self.proj_size if getattr(self, "proj_size", 0) > 0 else self.hidden_size
        lengths = None
        if packed:
            x, lengths_t = pad_packed_sequence(input)  # (T, N, I), batch in the caller's order
            lengths = lengths_t.numpy().astype(np.int64)
            unbatched = False
        else:
            x = input
            unbatched = x.dim() == 2
            if x.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__}: input must be 2-D (unbatched) or 3-D, got {x.dim()}-D")
            if unbatched:
                x = x.unsqueeze(1)
            elif self.batch_first:
                x = x.transpose(0, 1)
        T, N = x.shape[0], x.shape[1]
        if x.shape[2] != self.input_size:
            raise ValueError(f"{type(self).__name__}: input.size(-1) must be {self.input_size}, got {x.shape[2]}")

        zeros = lambda size: torch.zeros(D * self.num_layers, N, size, dtype=x.dtype)  # noqa: E731
        if hx is None:
            h0, c0 = zeros(H_out), (zeros(self.hidden_size) if is_lstm else None)
        else:
            h0, c0 = (hx if is_lstm else (hx, None))
            if unbatched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
            expected_h = (D * self.num_layers, N, H_out)
            if tuple(h0.shape) != expected_h:
                raise RuntimeError(f"Expected hidden size {expected_h}, got {tuple(h0.shape)}")
            if is_lstm and tuple(c0.shape) != (D * self.num_layers, N, self.hidden_size):
                raise RuntimeError(f"Expected hidden[1] size {(D * self.num_layers, N, self.hidden_size)}, "
                                   f"got {tuple(c0.shape)}")
        if c0 is None:
            c0 = torch.empty(0, dtype=x.dtype)

        masks = torch.empty(0, dtype=x.dtype)
        if self.training and self.dropout > 0 and self.num_layers > 1:
            keep = 1.0 - self.dropout
            shape = (self.num_layers - 1, T, N, D * H_out)
            masks = (torch.bernoulli(torch.full(shape, keep, dtype=x.dtype)) / keep
                     if keep > 0 else torch.zeros(shape, dtype=x.dtype))

        weights = list(self._flat_weights)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or h0.requires_grad or c0.requires_grad or any(w.requires_grad for w in weights))
        settings = {
            "backend": _backend(self._lstmfast_backend),
            "mode": self._lstmfast_mode(),
            "names": list(self._flat_weights_names),
            "num_layers": self.num_layers,
            "bidirectional": self.bidirectional,
            "proj_size": getattr(self, "proj_size", 0),
            "lengths": lengths,
            "keep_for_backward": needs_grad,
        }
        out, h_n, c_n = _RecurrentFunction.apply(settings, x, h0, c0, masks, *weights)

        if packed:
            # Back to the caller's PackedSequence layout: step t holds the first
            # batch_sizes[t] sequences in sorted order.
            order = input.sorted_indices if input.sorted_indices is not None else torch.arange(N)
            rows = [out[t, order[: int(b)]] for t, b in enumerate(input.batch_sizes)]
            output = PackedSequence(torch.cat(rows, 0), input.batch_sizes, input.sorted_indices,
                                    input.unsorted_indices)
        elif unbatched:
            output = out.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if is_lstm else c_n
        else:
            output = out.transpose(0, 1) if self.batch_first else out
        return output, ((h_n, c_n) if is_lstm else h_n)


class LSTM(_FastRNNMixin, nn.LSTM):
    """``torch.nn.LSTM`` computed by lstmfast's fused kernels."""


class GRU(_FastRNNMixin, nn.GRU):
    """``torch.nn.GRU`` computed by lstmfast's fused kernels."""


class RNN(_FastRNNMixin, nn.RNN):
    """``torch.nn.RNN`` computed by lstmfast's fused kernels."""


_SWAPS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}


def accelerate(model):
    """Make every ``nn.LSTM``/``nn.GRU``/``nn.RNN`` in ``model`` (itself included) an lstmfast one.

    The swap changes each module's class in place: parameters, buffers, hooks and
    the training flag stay exactly as they were. Subclasses of the torch modules
    are left alone, since they may override ``forward``. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        fast = _SWAPS.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model
