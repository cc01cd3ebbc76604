"""lstmfast inside torch models: ``LSTM``, ``GRU``, ``RNN``, the cells, ``accelerate``.

The classes are subclasses of ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` and
``LSTMCell`` / ``GRUCell`` / ``RNNCell``: same constructor, parameters,
``state_dict`` keys and forward signature. On CPU float32/float64 tensors the
forward pass and its backward run through lstmfast's fused kernels inside one
``torch.autograd.Function``; contiguous tensors are shared with the kernels, not
copied.

Everything the kernels cannot do exactly as torch does runs on torch's own
implementation of the same module, so the result is torch's by construction:
  * CUDA, other dtypes, weights of another dtype than the input (with a warning
    the first time);
  * tracing (``torch.jit.trace``, ONNX export; ONNX's options export as the
    standard nodes that hold them: ``onnx_export``), ``torch.export``, scripting (the
    scripted module is the torch class, see ``__prepare_scriptable__``),
    ``torch.func`` transforms, and autocast;
  * input torch would reject: torch's forward raises its own error;
  * double backward (``create_graph=True``): the backward then differentiates
    torch's own graph of the same computation, built from the saved inputs.
Under ``torch.compile`` the fused call runs eagerly behind a graph break: for a
layer the same one torch's own RNN costs (dynamo runs nn.LSTM/GRU/RNN eagerly),
for a cell one per call; the rest of the model compiles.

``accelerate(model)`` swaps the class of every torch RNN module inside ``model`` in
place; ``restore(model)`` swaps them back. The modules keep their parameter objects,
so optimizers built before the swap keep working. ``from_onnx(path)`` gives the
recurrent nodes of an ONNX model as these layers.

This is the only package of lstmfast that imports torch. Its modules, by job
(each imports only those listed after it):
  * ``onnx_layers``: from_onnx;
  * ``swap``: accelerate, restore, quantize_dynamic, freeze;
  * ``variants``: PeepholeLSTM, LayerNormLSTM, CTRNN (and torchaudio's RNN-T LSTM);
  * ``quantized``: QuantizedLSTM, QuantizedGRU (torch's dynamic int8 layers);
  * ``cells``: LSTMCell, GRUCell, RNNCell;
  * ``layers``: LSTM, GRU, RNN, the forward all layers share, bfloat16 autocast;
  * ``onnx_export``: ONNX's standard nodes, in either of torch's ONNX exporters, for
    the options torch's layers lack;
  * ``autograd``: the autograd Functions and their calls of the backends;
  * ``loops``: loops of torch ops computing the same, for double backward and for
    what only torch can run;
  * ``_backend``: the backends, and the tests deciding when torch's own
    implementation runs.
"""

from .cells import GRUCell, LSTMCell, RNNCell
from .layers import GRU, LSTM, RNN
from .onnx_layers import from_onnx
from .quantized import QuantizedGRU, QuantizedLSTM
from .swap import accelerate, freeze, quantize_dynamic, restore
from .variants import CTRNN, LayerNormLSTM, PeepholeLSTM

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "PeepholeLSTM", "CTRNN",
           "LayerNormLSTM",
           "QuantizedLSTM", "QuantizedGRU", "accelerate", "restore", "quantize_dynamic",
           "freeze", "from_onnx"]

# The public names say they are lstmfast.torch's, as they did when it was one file.
# pickle and torch.save record a class by its __module__: a model saved with
# lstmfast.torch.LSTM in it loads whatever submodule the class is defined in, now
# or after a later move, and one saved before the split loads now. The price:
# inspect.getsource of a class looks in this file and does not find it (the
# methods' own source is found, from their code objects).
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
