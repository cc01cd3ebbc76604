"""ONNX export of the layers that torch's own classes do not compute but ONNX's
standard nodes do: ONNX's ``activations`` (with their alpha and beta), ``clip``,
``input_forget`` and ``reverse``, ``GRU(linear_before_reset=False)`` and
``PeepholeLSTM``. With either of torch's exporters each such layer becomes one
``LSTM`` / ``GRU`` / ``RNN`` node per layer with those attributes, as
``lstmfast.onnx_nodes.to_onnx`` writes a NumPy layer, so that the exported model runs
sequences of any length.

Both exporters trace Python: the loop of torch ops that these layers run elsewhere
(loops.py) would be recorded unrolled at the example's length (the TorchScript-based
exporter's graph then silently drops the steps of a longer input). Instead:
``dynamo=True`` records the nodes as ``torch.onnx.ops.symbolic_multi_out``;
``dynamo=False`` records an autograd Function whose forward is the loop (the tracer
runs it for shapes) and whose ``symbolic`` writes the nodes. The weights go to ONNX's
gate order through the same description (``_node_inputs``) in both.
"""

import torch
from torch.nn.utils.rnn import PackedSequence

from ..onnx_nodes import _ORDER, NODE_OF_MODE as _NODE, node_attributes
from .loops import _torch_loop_stack


def exported_as_nodes(module, input, hx, given):
    """The layer's result as ONNX nodes while torch exports to ONNX, or None: outside
    an ONNX export, where torch's class writes the standard nodes itself (a layer
    with none of these options), and where no standard node computes the layer (a
    projection, zoneout, dropout in training, a PackedSequence, the other cells):
    those calls go on as before."""
    if not torch.onnx.is_in_onnx_export():
        return None
    mode = module._lstmfast_mode
    if mode not in _NODE or module._lstmfast_quantized:
        return None
    peephole = "weight_ci_l0" in module._parameters  # PeepholeLSTM's
    if (not (module._lstmfast_beyond_torch or peephole)
            or given is not None or any(module.zoneout) or module.proj_size
            or (module.training and (module.recurrent_dropout
                                     or (module.dropout and module.num_layers > 1)))
            or isinstance(input, PackedSequence) or not isinstance(input, torch.Tensor)
            or input.dim() not in (2, 3)):
        return None
    weights, names, _ = module._lstmfast_weights()
    is_lstm = mode == "LSTM"
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1)
    if module.batch_first and batched:
        x = x.transpose(0, 1)
    D = 2 if module.bidirectional else 1
    LD, H = D * module.num_layers, module.hidden_size
    if hx is None:
        h0 = x.new_zeros(LD, x.shape[1], H)
        c0 = x.new_zeros(LD, x.shape[1], H) if is_lstm else None
    else:
        h0, c0 = hx if is_lstm else (hx, None)
        if not batched:
            h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if is_lstm else None)
    spec = {"mode": mode, "names": tuple(names), "num_layers": module.num_layers,
            "bidirectional": module.bidirectional, "bias": module.bias, "hidden_size": H,
            "peephole": peephole, "options": module._onnx_options(),
            "attributes": node_attributes(mode, H, module.bidirectional, module._onnx_options())}
    if torch.jit.is_tracing():  # the TorchScript-based exporter
        results = _RecurrentNodes.apply(spec, x, h0, c0 if is_lstm else x.new_empty(0), *weights)
    else:
        results = _symbolic_nodes(spec, x, h0, c0, weights)
    out, h_n = results[0], results[1]
    if not batched:
        out, h_n = out.squeeze(1), h_n.squeeze(1)
    elif module.batch_first:
        out = out.transpose(0, 1)
    if not is_lstm:
        return out, h_n
    c_n = results[2] if batched else results[2].squeeze(1)
    return out, (h_n, c_n)


def _node_inputs(ops, spec, w, k):
    """W, R, B (None without biases) and P (None without peepholes) of layer k as
    ONNX's node takes them, (D, ...) each, built by ``ops`` (rows, cat, stack: torch's
    tensors or the TorchScript graph's values) from the weights ``w`` by name."""
    op, H = _NODE[spec["mode"]], spec["hidden_size"]
    inverse = sorted(range(len(_ORDER[op])), key=lambda j: _ORDER[op][j])  # ONNX's block j: our inverse[j]

    def onnx_blocks(value):  # (G*H, ...) in our gate order -> ONNX's
        return ops.cat([ops.rows(value, j * H, (j + 1) * H) for j in inverse])

    suffixes = [f"_l{k}" + ("_reverse" if d else "") for d in range(2 if spec["bidirectional"] else 1)]
    W = ops.stack([onnx_blocks(w["weight_ih" + s]) for s in suffixes])
    R = ops.stack([onnx_blocks(w["weight_hh" + s]) for s in suffixes])
    B = P = None
    if spec["bias"]:
        B = ops.stack([ops.cat([onnx_blocks(w["bias_ih" + s]), onnx_blocks(w["bias_hh" + s])])
                       for s in suffixes])
    if spec["peephole"]:  # ONNX's P: i, o, f
        P = ops.stack([ops.cat([w[f"weight_c{gate}" + s] for gate in "iof"]) for s in suffixes])
    return W, R, B, P


class _TorchOps:
    rows = staticmethod(lambda value, start, end: value[start:end])
    cat = staticmethod(torch.cat)
    stack = staticmethod(torch.stack)


def _symbolic_nodes(spec, x, h0, c0, weights):
    """The layer as ONNX's nodes for torch's dynamo-based exporter; x (T, N, I)."""
    op, H, D = _NODE[spec["mode"]], spec["hidden_size"], 2 if spec["bidirectional"] else 1
    w = dict(zip(spec["names"], weights))
    attributes = spec["attributes"]
    T, N = x.shape[0], x.shape[1]
    outputs = 3 if op == "LSTM" else 2
    layer_in, h_outs, c_outs = x, [], []
    for k in range(spec["num_layers"]):
        W, R, B, P = _node_inputs(_TorchOps, spec, w, k)
        inputs = [layer_in, W, R, B, None, h0[k * D:(k + 1) * D]]
        if op == "LSTM":
            inputs += [c0[k * D:(k + 1) * D], P]
        results = torch.onnx.ops.symbolic_multi_out(
            f"::{op}", inputs, attributes, dtypes=[x.dtype] * outputs,
            shapes=[(T, D, N, H)] + [(D, N, H)] * (outputs - 1))
        # Y (T, D, N, H) -> (T, N, D, H) -> (T, N, D*H)
        layer_in = results[0].permute(0, 2, 1, 3).reshape(T, N, D * H)
        h_outs.append(results[1])
        if op == "LSTM":
            c_outs.append(results[2])
    return (layer_in, torch.cat(h_outs)) + ((torch.cat(c_outs),) if op == "LSTM" else ())


class _GraphOps:
    """_node_inputs' ops on the TorchScript exporter's graph values."""

    def __init__(self, g):
        self.g = g

    def const(self, values):
        return self.g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    def rows(self, value, start, end):
        return self.g.op("Slice", value, self.const([start]), self.const([end]), self.const([0]))

    def cat(self, values):
        return values[0] if len(values) == 1 else self.g.op("Concat", *values, axis_i=0)

    def stack(self, values):
        return self.cat([self.g.op("Unsqueeze", v, self.const([0])) for v in values])


# The TorchScript exporter's attribute kinds, by the Python type of the value.
_KIND = {int: "i", float: "f", str: "s"}


class _RecurrentNodes(torch.autograd.Function):
    """The layer of ``spec`` on x (T, N, I), h0, c0 ((L*D, N, H); c0 empty but for an
    LSTM) and the weights in the order of spec["names"], for the TorchScript-based
    exporter: forward the loop of torch ops, symbolic ONNX's nodes. Returns output
    (T, N, D*H), h_n (and c_n)."""

    @staticmethod
    def forward(ctx, spec, x, h0, c0, *weights):
        settings = {"mode": spec["mode"], "names": list(spec["names"]),
                    "num_layers": spec["num_layers"], "bidirectional": spec["bidirectional"],
                    "bias": spec["bias"], "proj_size": 0, "lengths": None,
                    "cell_options": spec["options"]}
        out, h_n, c_n = _torch_loop_stack(settings, x, h0, c0 if c0.numel() else None,
                                          x.new_empty(0), *weights)
        return (out, h_n, c_n) if spec["mode"] == "LSTM" else (out, h_n)

    @staticmethod
    def symbolic(g, spec, x, h0, c0, *weights):
        op, D = _NODE[spec["mode"]], 2 if spec["bidirectional"] else 1
        ops = _GraphOps(g)
        w = dict(zip(spec["names"], weights))
        absent = g.op("prim::Constant")  # an input left out, as torch's own RNN symbolics do
        absent.setType(torch._C.OptionalType.ofTensor())
        attributes = {}
        for name, value in spec["attributes"].items():
            sample = value[0] if isinstance(value, list) else value
            attributes[f"{name}_{_KIND[type(sample)]}"] = value
        layer_in, h_outs, c_outs = x, [], []
        for k in range(spec["num_layers"]):
            W, R, B, P = _node_inputs(ops, spec, w, k)
            inputs = [layer_in, W, R, absent if B is None else B, absent,
                      ops.rows(h0, k * D, (k + 1) * D)]
            if op == "LSTM":
                inputs.append(ops.rows(c0, k * D, (k + 1) * D))
                if P is not None:
                    inputs.append(P)
            results = g.op(op, *inputs, outputs=3 if op == "LSTM" else 2, **attributes)
            # Y (T, D, N, H) -> (T, N, D, H) -> (T, N, D*H)
            layer_in = g.op("Reshape", g.op("Transpose", results[0], perm_i=[0, 2, 1, 3]),
                            ops.const([0, 0, -1]))
            h_outs.append(results[1])
            if op == "LSTM":
                c_outs.append(results[2])
        outputs = [layer_in, ops.cat(h_outs)]
        if op == "LSTM":
            outputs.append(ops.cat(c_outs))
        return tuple(outputs)
