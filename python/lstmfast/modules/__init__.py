"""The layers and cells: ``LSTM``, ``GRU``, ``RNN``, ``LSTMCell``, ``GRUCell``, ``RNNCell``,
the variants ``CTRNN`` and ``LayerNormLSTM``, ``quantize`` and ``freeze``.

These classes mirror ``torch.nn``'s: same constructor arguments, parameter names and
shapes, call signature, output shapes and ``state_dict`` keys. They check arguments,
hold the parameters as NumPy arrays and delegate all math to a backend module:
``backend="numpy"`` uses :mod:`lstmfast.reference` (the readable specification) and
``backend="fused"`` uses the C++ kernels through ``lstmfast._fused``. Both expose

    forward(mode, x, hx, params, *, num_layers, bidirectional, proj_size=0,
            lengths=None, dropout_masks=None, training=False)
        -> (output, h_n, c_n or None, cache or None)
    backward(cache, d_output, d_h_n=None, d_c_n=None, grads=None)
        -> (dx, dh0, dc0 or None, grads)        # adds into grads

always in the time-major batched layout ``x (T, N, I)``; this package converts from and
to the caller's layout (batch_first, unbatched) and fills in defaults (zero h0/c0).

Decisions worth knowing (beyond what torch documents):

* dtypes are strict: ``x``, ``hx`` and the upstream gradients must already have the
  layer's dtype (float32 or float64), otherwise TypeError. Nothing is cast silently.
  Parameters given to ``load_state_dict`` or assigned as attributes ARE cast to the
  layer's dtype (an explicit load, like torch's ``copy_``).
* Parameter attributes (``lstm.weight_ih_l0``) are the live arrays the layer computes
  with: editing one in place changes the layer. Assigning ``lstm.weight_ih_l0 = w``
  copies ``w`` into the existing array after checking its shape. ``state_dict()``
  returns copies, in torch's order.
* ``load_state_dict`` raises KeyError for missing or unexpected names, ValueError for a
  wrong shape, TypeError for values that are not real numbers; every problem is listed
  in one message and on failure no parameter is changed.
* Randomness: ``seed`` feeds ``np.random.SeedSequence(seed).spawn(3)``; the first child
  initialises the parameters (through ``reference.init_params``, for both backends, so
  one seed gives the same weights whatever the backend), the second is the dropout
  stream, the third a CTRNN's noise. Dropout masks are made in this package
  (masks.py), not in the backend: per call, one float64 uniform array of shape
  (T, N, D*H_out) for each gap between layers, in layer order, keeping an element
  where ``u >= p`` and scaling it by ``1/(1-p)`` (``p == 1`` gives all zeros). Masks
  are therefore identical for both backends and both dtypes.
* Like torch, dropout > 0 with num_layers == 1 emits a UserWarning, and a new layer
  is in training mode. In training mode each call keeps what backward needs (one
  pending forward per layer and thread; a new forward replaces it). ``backward``
  consumes it: a second backward, a backward after an eval-mode forward or before any
  forward raises RuntimeError. Parameter gradients are ADDED into ``layer.grad``;
  ``zero_grad()`` clears them in place.
* Threads: one layer may be called from several threads at once, in eval and in
  training mode. The pending forward is per thread (``threading.local``): a thread's
  ``backward`` pairs with that thread's last training forward, never another's.
  Forwards run concurrently (the kernels release the GIL); backwards of one layer
  run one at a time under a lock, since they add into the same ``layer.grad``, so
  the gradients of concurrent steps are summed (in whatever order the threads reach
  the lock). Changing parameters while calls run is the caller's race.
* Do not modify inputs, returned arrays or parameters (in place, by assignment or by
  ``load_state_dict``) between a forward and its backward: the backend keeps
  references to them (torch would raise; we cannot detect it).
* A zero-length sequence raises ValueError (torch raises too). An empty batch (batch
  size 0) returns empty outputs as torch does, without calling the backend; its
  backward returns empty input gradients and adds nothing to ``layer.grad``.
* Sizes are checked at construction: with ``backend="fused"`` every dimension the
  32-bit BLAS sees (input_size, G*hidden_size, D*hidden_size) must fit in it, else
  ValueError; parameters plus gradients that would need more than the machine's
  physical memory raise MemoryError before anything is allocated. The compiled
  module checks each call's sizes the same way, in overflow-checked 64-bit
  arithmetic, and a workspace that cannot be allocated raises MemoryError.
* ``lengths`` (one int per batch element, each in 1..L, any order) gives the
  semantics of a PackedSequence: outputs past a sequence's end are 0 (and their
  upstream gradients are ignored), h_n/c_n hold each sequence's state at its own end.
  Unbatched input takes a one-element ``lengths``.
* Cells are called as ``cell(x, hx=None)`` (torch's argument name) and run the backend
  with T = 1 and one layer; ``cell.backward(grad_h1)`` for GRU/RNN cells and
  ``lstm_cell.backward(grad_h1, grad_c1=None)`` give the gradients of that one step.
* ``repr`` is torch's, plus ``nonlinearity``, ``dtype`` and ``backend`` when they are
  not the defaults.

Its modules, by job (each imports only modules listed after it):
  * ``layers``: LSTM (and its peephole option), GRU, RNN;
  * ``variants``: CTRNN, LayerNormLSTM;
  * ``cells``: LSTMCell, GRUCell, RNNCell;
  * ``reduced``: quantize and freeze;
  * ``base``: ``_Module`` (parameters, state_dict, pickling, train/eval, the pending
    forward of each thread, the backend's calls) and ``_RNNBase`` (the layers'
    constructor, forward and backward as steps);
  * ``masks``: dropout between layers, recurrent dropout and zoneout masks;
  * ``precision``: how a reduced layer holds its weights and hands them to a backend;
  * ``inputs``: layout, hx and lengths checks, upstream gradients: what turns a call's
    arguments into the backend's arrays, and its results back;
  * ``options``: the constructors' argument checks (shared with lstmfast.torch), the
    sizes check, the choice of backend.
"""

from .cells import GRUCell, LSTMCell, RNNCell
from .layers import GRU, LSTM, RNN
from .reduced import freeze, quantize
from .variants import CTRNN, LayerNormLSTM

__all__ = ["LSTM", "GRU", "RNN", "CTRNN", "LayerNormLSTM", "LSTMCell", "GRUCell", "RNNCell",
           "quantize", "freeze"]

# The public names say they are lstmfast.modules's, as they did when it was one file.
# pickle records a class (and a function) by __module__ and __qualname__: a layer
# pickled now loads whichever submodule defines its class, now or after a later move,
# and layers pickled before the split load as they did. The price: inspect.getsource
# of a class looks in this file and does not find it (its methods' source is found,
# from their code objects).
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
