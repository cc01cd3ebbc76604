"""What the tests share: the one comparison, the backends, and the problems and cases
more than one file runs. Imported by name (``from helpers import assert_close``):
tests/ is on sys.path (pyproject.toml, ``[tool.pytest.ini_options] pythonpath``).

* ``assert_close``: the project's tolerance rule, 1e-5 (float32) / 1e-10 (float64)
  relative to the largest magnitude of the expected value, for NumPy arrays and
  torch tensors alike;
* ``BACKENDS``: the NumPy layers' backends built in this install;
* ``make_problem`` / ``run_forward`` / ``run_backward``: one configuration of the
  reference with random inputs and loss weights (the reference's tests);
* ``Case`` / ``VARIANTS``: one forward/backward of the fused kernels and of the
  reference on the same inputs (the kernels' tests);
* ``torchaudio_custom_lstm``: torchaudio's own layer-normalized LSTM, when it imports;
* ``recurrent_model`` / ``random_weights``: an ONNX model of one LSTM, GRU or RNN node;
* ``run_all``: callables run in threads of their own, all released at once.
"""

import importlib
import threading

import numpy as np

from lstmfast import reference

# ------------------------------------------------------------------------------------------
# Comparison

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def _dtype_name(dtype):
    """'float32' for np.float32, np.dtype('float32'), 'float32' and torch.float32 alike."""
    if type(dtype).__module__ == "torch":  # a torch.dtype
        return str(dtype).removeprefix("torch.")
    return np.dtype(dtype).name


def tolerance(dtype):
    """The project's tolerance for ``dtype`` (NumPy's or torch's): 1e-5 for float32,
    1e-10 for float64."""
    return TOLERANCE[_dtype_name(dtype)]


def _as_array(value):
    """``value`` as a NumPy array, and the name of its dtype. A torch tensor is detached
    and brought to the CPU; a floating-point one is widened to float64 (exactly, and
    NumPy has no bfloat16), its own dtype being the one reported."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        dtype = _dtype_name(value.dtype)
        value = value.detach()
        if value.is_floating_point():
            value = value.double()
        return value.numpy(force=True), dtype
    value = np.asarray(value)
    return value, value.dtype.name


def assert_close(actual, expected, *, tol=None, atol=None, name="value", check_dtype=True):
    """Assert that ``actual`` matches ``expected`` (NumPy arrays, anything np.asarray
    takes, or torch tensors) entry by entry:

        max |actual - expected| <= tol * max(1, max |expected|)

    the tolerance relative to the largest magnitude of the expected value (a gradient's
    small entries are compared at the scale of its large ones, and values below 1 at
    1). ``tol`` defaults to ``tolerance(expected.dtype)``: 1e-5 for float32, 1e-10 for
    float64. With ``atol`` instead, the bound is ``atol`` itself, whatever the scale
    (for identities that hold to the last bits at any magnitude).

    Shapes must be equal, and dtypes too unless ``check_dtype=False`` (a result in
    float32 compared with a float64 reference, on purpose). Every entry of both must be
    finite. The failure message names the value and shows the largest difference, where
    it is, both entries there and the bound.
    """
    a, a_dtype = _as_array(actual)
    e, e_dtype = _as_array(expected)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    if check_dtype:
        assert a_dtype == e_dtype, f"{name}: dtype {a_dtype} != expected {e_dtype}"
    if atol is not None:
        assert tol is None, "assert_close takes tol (relative) or atol (absolute), not both"
        bound, rule = atol, "atol"
    else:
        if tol is None:
            tol = tolerance(e_dtype)
        scale = max(1.0, float(np.max(np.abs(e)))) if e.size else 1.0
        bound, rule = tol * scale, f"{tol:g} * max(1, max|expected| = {scale:.3e})"
    if e.size == 0:
        return
    a, e = a.astype(np.float64), e.astype(np.float64)
    for what, values in (("expected", e), ("actual", a)):
        if not np.isfinite(values).all():
            where = _index(np.argmin(np.isfinite(values)), values.shape)
            raise AssertionError(f"{name}: non-finite {what} value at index {where} "
                                 f"(actual {float(a[where])!r}, expected {float(e[where])!r})")
    diff = np.abs(a - e)
    worst = _index(np.argmax(diff), diff.shape)
    assert diff[worst] <= bound, (
        f"{name}: max |actual - expected| = {diff[worst]:.3e} at index {worst} "
        f"(actual {float(a[worst])!r}, expected {float(e[worst])!r}) exceeds {bound:.3e} = {rule}")


def _index(flat, shape):
    return tuple(int(i) for i in np.unravel_index(int(flat), shape))


def assert_tree_close(actual, expected, *, name="value", **options):
    """assert_close over matching nested tuples/lists/dicts of arrays (None matches None);
    ``options`` are assert_close's."""
    if expected is None:
        assert actual is None, f"{name}: expected None, got {type(actual).__name__}"
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{name}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_tree_close(actual[key], expected[key], name=f"{name}[{key!r}]", **options)
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), (
            f"{name}: expected a sequence of {len(expected)}, got {actual!r:.80}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_tree_close(a, e, name=f"{name}[{i}]", **options)
    else:
        assert_close(actual, expected, name=name, **options)


# ------------------------------------------------------------------------------------------
# Backends


def fused_available():
    """Whether the fused kernels are built (lstmfast._fused imports and says so)."""
    try:
        module = importlib.import_module("lstmfast._fused")
    except ImportError:
        return False
    return bool(getattr(module, "available", False))


BACKENDS = ["numpy"] + (["fused"] if fused_available() else [])


# ------------------------------------------------------------------------------------------
# The reference's problems: one configuration, random inputs and loss weights


def make_problem(mode, *, T=3, N=2, I=3, H=4, num_layers=1, bidirectional=False, bias=True,
                 proj_size=0, lengths=None, dropout=0.0, dtype=np.float64, seed=0,
                 peephole=False, alpha=0.3, leak="outside", noise_std=0.2,
                 recurrent_dropout=0.0, zoneout=None, options=None):
    """Random inputs, parameters, dropout masks and loss weights for one configuration.
    options: more keyword arguments of the forward (ONNX's activations, clip,
    input_forget, reverse).
    A CTRNN mode also gets alpha, leak and noise of noise_std (none for the others).
    recurrent_dropout > 0 draws recurrent dropout masks; zoneout (p_h, p_c) draws zoneout
    masks, or with eval=True in it, ("eval", p_h, p_c), gives the probabilities (eval)."""
    rng = np.random.default_rng(seed)
    D = 2 if bidirectional else 1
    H_out = proj_size if proj_size > 0 else H
    if mode == "LN_LSTM":
        bias = False  # its layer norms' biases take the place of the linear ones
    params = reference.init_params(mode, I, H, num_layers, bias, bidirectional, proj_size,
                                   dtype, rng, peephole=peephole)
    for name in params:  # layer norms away from their identity start
        if name.startswith("ln_"):
            params[name] = (params[name] + 0.3 * rng.standard_normal(params[name].shape)).astype(dtype)
    x = rng.standard_normal((T, N, I)).astype(dtype)
    h0 = (0.5 * rng.standard_normal((num_layers * D, N, H_out))).astype(dtype)
    c0 = (0.5 * rng.standard_normal((num_layers * D, N, H))).astype(dtype)
    masks = None
    if dropout > 0:
        masks = [((rng.random((T, N, D * H_out)) >= dropout) / (1 - dropout)).astype(dtype)
                 for _ in range(num_layers - 1)]
    R1 = rng.standard_normal((T, N, D * H_out)).astype(dtype)
    R2 = rng.standard_normal((num_layers * D, N, H_out)).astype(dtype)
    R3 = rng.standard_normal((num_layers * D, N, H)).astype(dtype)
    regularizers = {}
    if recurrent_dropout:
        keep = rng.random((num_layers * D, N, H_out)) >= recurrent_dropout
        regularizers["recurrent_dropout_masks"] = (keep / (1 - recurrent_dropout)).astype(dtype)
    if zoneout is not None:
        if zoneout[0] == "eval":
            regularizers["zoneout_masks"] = zoneout[1:]
        else:
            widths = (H_out, H)
            regularizers["zoneout_masks"] = tuple(
                None if p is None else (rng.random((num_layers * D, T, N, width)) < p).astype(dtype)
                for p, width in zip(zoneout, widths))
    ctrnn = mode.startswith("CTRNN")
    noise = None
    if ctrnn and noise_std:
        noise = (noise_std * rng.standard_normal((num_layers * D, T, N, H))).astype(dtype)
    return {
        "ctrnn": {"alpha": alpha, "leak": leak, "noise": noise} if ctrnn else {},
        "options": dict(options or {}),
        "regularizers": regularizers,
        "mode": mode, "x": x, "h0": h0, "c0": c0 if mode in reference.CELL_STATE_MODES else None,
        "params": params, "masks": masks, "R1": R1, "R2": R2, "R3": R3,
        "lengths": None if lengths is None else np.array(lengths, dtype=np.int64),
        "num_layers": num_layers, "bidirectional": bidirectional, "proj_size": proj_size,
        "bias": bias,
    }


def run_forward(p, training=False):
    hx = (p["h0"], p["c0"]) if p["mode"] in reference.CELL_STATE_MODES else p["h0"]
    return reference.forward(
        p["mode"], p["x"], hx, p["params"], num_layers=p["num_layers"],
        bidirectional=p["bidirectional"], proj_size=p["proj_size"], lengths=p["lengths"],
        dropout_masks=p["masks"], training=training, **p["ctrnn"], **p["regularizers"],
        **p["options"])


def run_backward(p, grads=None):
    _, _, _, cache = run_forward(p, training=True)
    d_c_n = p["R3"] if p["mode"] in reference.CELL_STATE_MODES else None
    return reference.backward(cache, p["R1"], p["R2"], d_c_n, grads=grads)


# ------------------------------------------------------------------------------------------
# The kernels' cases: one forward/backward of the fused kernels and of the reference


class Case:
    """Inputs of one forward/backward: parameters, x, hx, masks and output gradients."""

    def __init__(self, mode, dtype, T=5, N=3, I=4, H=6, L=1, bidirectional=False, bias=True,
                 P=0, lengths=None, dropout=False, seed=0, scale=1.0, cell_options=None):
        rng = np.random.default_rng(seed)
        self.mode, self.dtype = mode, np.dtype(dtype)
        self.cell_state = mode in reference.CELL_STATE_MODES
        D = 2 if bidirectional else 1
        H_out = P if P else H
        bias = bias and mode != "LN_LSTM"  # its layer norms' biases take the place of these
        self.params = reference.init_params(mode, I, H, L, bias, bidirectional, P, dtype, rng)
        for name, value in self.params.items():  # layer norms away from their identity start
            if name.startswith("ln_"):
                self.params[name] = (value + 0.3 * rng.standard_normal(value.shape)).astype(dtype)
        self.x = (scale * rng.standard_normal((T, N, I))).astype(dtype)
        h0 = rng.standard_normal((L * D, N, H_out)).astype(dtype)
        self.hx = (h0, rng.standard_normal((L * D, N, H)).astype(dtype)) if self.cell_state else h0
        self.kwargs = dict(num_layers=L, bidirectional=bidirectional, proj_size=P,
                           lengths=None if lengths is None else np.asarray(lengths, np.int64),
                           dropout_masks=None, **(cell_options or {}))
        if (cell_options or {}).get("noise") == "draw":
            self.kwargs["noise"] = (0.2 * rng.standard_normal((L * D, T, N, H))).astype(dtype)
        if dropout and L > 1:
            self.kwargs["dropout_masks"] = [
                ((rng.random((T, N, D * H_out)) > 0.25) / 0.75).astype(dtype)
                for _ in range(L - 1)]
        self.d_output = rng.standard_normal((T, N, D * H_out)).astype(dtype)
        self.d_h_n = rng.standard_normal((L * D, N, H_out)).astype(dtype)
        self.d_c_n = rng.standard_normal((L * D, N, H)).astype(dtype) if self.cell_state else None

    def forward(self, backend, training=True):
        return backend.forward(self.mode, self.x, self.hx, self.params, training=training,
                               **self.kwargs)

    def run(self, backend, with_state_grads=True, consume=False):
        out = self.forward(backend)
        d_h_n = self.d_h_n if with_state_grads else None
        d_c_n = self.d_c_n if with_state_grads else None
        back = backend.backward(out[3], self.d_output, d_h_n, d_c_n, consume=consume)
        return out[:3], back

    def check(self, with_state_grads=True, consume=False):
        """The fused kernels against the reference: outputs, final states, dx, dh0, dc0
        and every parameter gradient, to the default tolerance of the dtype."""
        from lstmfast import _fused

        (y, h_n, c_n), (dx, dh0, dc0, grads) = self.run(_fused, with_state_grads, consume)
        (ry, rh_n, rc_n), (rdx, rdh0, rdc0, rgrads) = self.run(reference, with_state_grads)
        assert_close(y, ry, name="output")
        assert_close(h_n, rh_n, name="h_n")
        assert_close(dx, rdx, name="dx")
        assert_close(dh0, rdh0, name="dh0")
        if self.cell_state:
            assert_close(c_n, rc_n, name="c_n")
            assert_close(dc0, rdc0, name="dc0")
        else:
            assert c_n is None and dc0 is None
        assert sorted(grads) == sorted(rgrads)
        for name in rgrads:
            assert_close(grads[name], rgrads[name], name=f"grads[{name!r}]")


# The variants' own parameters and options: (mode, dtype, cell options); the
# layer-normalized LSTM in float64 (see kernels/test_fused.py, variant_configs).
VARIANTS = {
    "CTRNN_RELU": (np.float32, {"alpha": 0.3, "leak": "outside", "noise": "draw"}),
    "CTRNN_TANH": (np.float32, {"alpha": 0.5, "leak": "inside"}),
    "LN_LSTM": (np.float64, {"layer_norm_eps": 1e-3}),
}


# ------------------------------------------------------------------------------------------
# Optional oracles


def torchaudio_custom_lstm():
    """torchaudio's own module class, or None (with why) when torchaudio does not import
    or does not match this torch."""
    try:
        from torchaudio.models.rnnt import _CustomLSTM
    except Exception as exc:  # noqa: BLE001  (an ABI mismatch raises OSError/RuntimeError)
        return None, f"torchaudio is not usable here ({type(exc).__name__}: {exc})"
    return _CustomLSTM, None


def keras_on_torch():
    """Keras 3 on its torch backend, or a skip saying why it cannot be had here."""
    import os

    import pytest

    pytest.importorskip("torch")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except Exception as exc:  # noqa: BLE001  (not installed, or no usable backend)
        pytest.skip(f"keras is not usable here ({type(exc).__name__}: {exc})")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras runs on {keras.backend.backend()} in this process, not torch")
    return keras


# ------------------------------------------------------------------------------------------
# ONNX models of one recurrent node (needs onnx, imported when called)

ONNX_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def random_weights(op, I, H, D, rng, peepholes=False, bias=True):
    """ONNX's W, R (and B, P) of a node, uniform in [-0.5, 0.5)."""
    G = ONNX_GATES[op]
    arrays = {"W": rng.uniform(-0.5, 0.5, (D, G * H, I)), "R": rng.uniform(-0.5, 0.5, (D, G * H, H))}
    if bias:
        arrays["B"] = rng.uniform(-0.5, 0.5, (D, 2 * G * H))
    if peepholes:
        arrays["P"] = rng.uniform(-0.5, 0.5, (D, 3 * H))
    return arrays


def recurrent_model(op, I, H, *, direction="forward", layout=0, rng=None, peepholes=False,
                    bias=True, name="rnn", arrays=None, **attributes):
    """One ONNX node of type op (weights random, or ``arrays``, as initializers) with
    inputs X, sequence_lens, initial_h (and initial_c), outputs Y, Y_h (and Y_c)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    D = 2 if direction == "bidirectional" else 1
    if arrays is None:
        arrays = random_weights(op, I, H, D, rng, peepholes, bias)
    peepholes, bias = "P" in arrays, "B" in arrays
    inputs = ["X", "W", "R", "B" if bias else "", "sequence_lens", "initial_h"]
    outputs = ["Y", "Y_h"]
    if op == "LSTM":
        inputs += ["initial_c", "P" if peepholes else ""]
        outputs.append("Y_c")
    node = helper.make_node(op, inputs, outputs, name=name, hidden_size=H, direction=direction,
                            layout=layout, **attributes)
    F = TensorProto.FLOAT
    batch, time = ("N", "T") if layout else ("T", "N")
    state = ["N", D, H] if layout else [D, "N", H]
    y = ["N", "T", D, H] if layout else ["T", D, "N", H]
    graph_inputs = [helper.make_tensor_value_info("X", F, [batch, time, I]),
                    helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["N"]),
                    helper.make_tensor_value_info("initial_h", F, state)]
    graph_outputs = [helper.make_tensor_value_info("Y", F, y),
                     helper.make_tensor_value_info("Y_h", F, state)]
    if op == "LSTM":
        graph_inputs.append(helper.make_tensor_value_info("initial_c", F, state))
        graph_outputs.append(helper.make_tensor_value_info("Y_c", F, state))
    graph = helper.make_graph(
        [node], "recurrent", graph_inputs, graph_outputs,
        [numpy_helper.from_array(a.astype(np.float32), k) for k, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ------------------------------------------------------------------------------------------
# Threads


def run_all(calls):
    """Runs every zero-argument callable in its own thread, all released at once; returns
    their results, or raises the first exception one of them raised."""
    barrier = threading.Barrier(len(calls))
    results, errors = [None] * len(calls), []

    def work(i):
        try:
            barrier.wait()
            results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
