"""``python -m lstmfast.bench --onnx FILE``: every LSTM, GRU and RNN node of an ONNX
model, run by lstmfast (``lstmfast.from_onnx``) and by ONNX Runtime (the node alone,
with its own attributes and weights), checked against each other and timed in
interleaved rounds. Each float node also frozen (``lstmfast.freeze``: its weights
packed once, as the session packs them), and int8 for the LSTM nodes the kernels run
(ONNX Runtime's ``DynamicQuantizeLSTM`` against ``lstmfast.quantize``).

Shapes: the node's input shape where the file gives it whole, else ``--onnx-shape T,N``
(default 100,8)."""

import json
import tempfile

import numpy as np

import lstmfast
from lstmfast.bench import common
from lstmfast.onnx_nodes import recurrent_nodes

DEFAULT_T, DEFAULT_N = 100, 8


def _single_node_model(node, initializers):
    """The node alone: input X, its weights as initializers, output Y (no lengths, no
    initial states: zeros, as ONNX's defaults)."""
    from onnx import TensorProto, helper

    inputs = list(node.input) + [""] * (12 - len(node.input))
    lstm = node.op_type in ("LSTM", "DynamicQuantizeLSTM")
    kept = ["X"] + inputs[1:4] + ["", "", "", inputs[7] if lstm else ""]
    if node.op_type == "DynamicQuantizeLSTM":  # W, R scales and zero points
        kept += inputs[8:12]
    while not kept[-1]:  # trailing optional inputs left out
        kept.pop()
    weights = {name for name in kept[1:] if name}
    alone = helper.make_node(node.op_type, kept, ["Y"], name=node.name, domain=node.domain)
    alone.attribute.extend(node.attribute)
    graph = helper.make_graph(
        [alone], "node", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [t for t in initializers if t.name in weights])
    opsets = [helper.make_opsetid("", 14)]
    if node.domain == "com.microsoft":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _static_shape(graph, name):
    """(T, N) of the node input ``name`` when the graph declares it whole, else None."""
    for value in list(graph.input) + list(graph.value_info):
        if value.name == name:
            dims = value.type.tensor_type.shape.dim
            if len(dims) == 3 and all(d.HasField("dim_value") for d in dims):
                return [d.dim_value for d in dims]
    return None


def run(path, threads, shape=None, rounds=5, min_time=0.5, json_path=None):
    """Times every recurrent node of the model at ``path``; prints the table, writes
    ``json_path`` when given; returns 0 (the exit status)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    graph = model.graph
    layers = lstmfast.from_onnx(model)
    recurrent = recurrent_nodes(graph)  # the nodes from_onnx took, in its order
    config = common.configuration(None, None)
    print("lstmfast benchmark: the recurrent nodes of an ONNX model, against ONNX Runtime")
    for k, v in config.items():
        print(f"  {k:31s} {v}")
    print(f"  {'model':31s} {path}")
    print(f"  {'onnxruntime':31s} {ort.__version__}")
    results = []
    with tempfile.TemporaryDirectory(prefix="lstmfast-onnx-") as workdir:  # int8 models
        for (index, node), (label, layer) in zip(recurrent, layers.items()):
            layout = layer.batch_first
            declared = _static_shape(graph, node.input[0])
            if shape is not None or declared is None:
                T, N = shape or (DEFAULT_T, DEFAULT_N)
            else:
                T, N = (declared[1], declared[0]) if layout else (declared[0], declared[1])
            rng = np.random.default_rng(index)
            I = layer.input_size
            x = rng.standard_normal((N, T, I) if layout else (T, N, I)).astype(np.float32)
            alone = _single_node_model(node, graph.initializer)
            # A DynamicQuantizeLSTM node is int8 on both sides, as the file has it.
            variants = [(layer.precision, layer, alone.SerializeToString())]
            if layer.precision == "float32":
                variants.append(("frozen", lstmfast.freeze(layer), variants[0][2]))
            # ONNX's options the kernels lack run in the reference (docs/onnx.md):
            # the table says so, and there is no int8 layer of them.
            on_reference = not layer._kernels_compute()
            if (node.op_type == "LSTM" and not layer.peephole and not on_reference
                    and layer.precision == "float32"):
                int8_path, _ = common.onnx_int8_model(alone, workdir, f"node{index}")
                variants.append(("int8", lstmfast.quantize(layer, "int8"), int8_path))
            for t in threads:
                for precision, ours, theirs_model in variants:
                    session = common.ort_session(ort, theirs_model, t)
                    Y_ours = lstmfast.run_onnx_node(ours, x)[0]

                    def run_ours(ours=ours):
                        return ours(x)

                    def run_theirs(session=session):
                        return session.run(None, {"X": x})

                    Y_theirs = run_theirs()[0]
                    scale = max(1.0, float(np.abs(Y_theirs).max()))
                    difference = float(np.abs(Y_ours - Y_theirs).max()) / scale
                    bound = 1e-4 if precision in ("float32", "frozen") else 5e-2
                    if not difference <= bound:
                        raise AssertionError(f"{label}: lstmfast {precision} differs from ONNX "
                                             f"Runtime by {difference:.3g} (bound {bound})")
                    runners = {"lstmfast": run_ours, "onnxruntime": run_theirs}
                    seconds = common.time_interleaved(runners, t, rounds, min_time, None, None)
                    results.append({"node": label, "op": node.op_type, "precision": precision,
                                    "path": "reference" if on_reference else "kernels",
                                    "T": T, "N": N, "I": I, "H": layer.hidden_size,
                                    "D": 2 if layer.bidirectional else 1, "threads": t,
                                    "seconds": seconds, "max_rel_diff": difference,
                                    "ratio": seconds["onnxruntime"] / seconds["lstmfast"]})
    op_width = max([4] + [len(r["op"]) for r in results])
    print(f"{'node':20s} {'op':{op_width}s} {'prec':8s} {'T':>4s} {'N':>3s} {'I':>5s} {'H':>5s} {'D':>2s} "
          f"{'thr':>3s} {'path':9s} {'onnxruntime':>12s} {'lstmfast':>10s} {'vs ORT':>7s}")
    for r in results:
        print(f"{r['node'][:20]:20s} {r['op']:{op_width}s} {r['precision']:8s} {r['T']:4d} {r['N']:3d} "
              f"{r['I']:5d} {r['H']:5d} {r['D']:2d} {r['threads']:3d} {r['path']:9s} "
              f"{common.fmt_time(r['seconds']['onnxruntime']):>12s} "
              f"{common.fmt_time(r['seconds']['lstmfast']):>10s} {r['ratio']:6.2f}x")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"config": config, "model": str(path), "results": results}, f, indent=1)
        print(f"wrote {json_path}")
    return 0
