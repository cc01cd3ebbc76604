"""Which implementation computes a call: an lstmfast backend, or torch's own.

``_backend`` gives lstmfast's fused kernels or its NumPy reference. Whatever the
kernels cannot compute exactly as torch does goes to torch's own implementation;
the tests that the forwards and backwards share to decide it are here (a malformed
call is each forward's own test): a context only torch serves
(``_in_torch_only_context``), a device or dtype the kernels lack
(``_unsupported_reason``, warned of once by ``_warn_once``), a backward that needs a
graph (``_backward_through_torch_ops``), and for ``torch.jit.script`` torch's class
on the same parameters (``_as_class``). Also what every caller of a backend shares:
tensors as arrays, and the cache of a module's weights packed for the kernels
(``_packed_for``).
"""

import copy
import threading
import warnings
import weakref

import torch


_SUPPORTED_DTYPES = (torch.float32, torch.float64)
_warned = set()  # (class name, reason): warned of once per process


_backends = {}


def _backend(name):
    backend = _backends.get(name)
    if backend is not None:
        return backend
    if name == "numpy":
        from .. import reference as backend
    else:
        from .. import _fused as backend

        if not getattr(backend, "available", False):
            raise NotImplementedError("lstmfast's fused kernels are not built")
    _backends[name] = backend
    return backend


def _fused_backend_or_none():
    try:
        return _backend("fused")
    except (ImportError, NotImplementedError):
        return None


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=5)


def _as_numpy(t):
    """A NumPy view of a CPU tensor (no copy); the kernels copy non-contiguous input themselves.
    (detach only where needed: it makes a tensor, which a cell stepped in a loop pays per step.)"""
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _weight_arrays(module, weights, names):
    """NumPy views of ``weights`` (tensors or None, named ``names``; no copy), made once
    instead of at every call (a view costs about 1 us each) and remade when a weight's
    memory, shape or strides are not those of its view (another parameter,
    ``param.data = ...``); an optimizer's in-place update keeps the views valid. A view
    holds its tensor, so no other tensor can take its memory while it is kept.
    A frozen module's (``freeze``) weight_ih and weight_hh come packed instead."""
    if module._lstmfast_frozen:
        return _frozen_weight_arrays(module, weights, names)
    # A loop, not a generator: this runs at every call of a layer or cell (a stream's
    # frames), where a generator's setup costs more than the lookups.
    key = []
    for w in weights:
        key.append(None if w is None else (w.data_ptr(), w.shape, w.stride()))
    key = tuple(key)
    entry = _weight_views.get(module)  # one read of a dict: no lock needed
    if entry is not None and entry[0] == key:
        return entry[1]
    return _cached_for(_weight_views, module, key,
                       lambda: [None if w is None else _as_numpy(w) for w in weights])


def _frozen_weight_arrays(module, weights, names):
    """_weight_arrays of a frozen module: weight_ih and weight_hh packed for the kernels
    (``_fused.pack_gates``) where the module's kernels read packed weights
    (``module._lstmfast_packs()``), the others as views. Packed again when a weight
    changes where torch counts it (its version: ``load_state_dict``, ``copy_``, an
    optimizer's step); a write through ``.data`` is not counted, and goes unseen.
    The entry holds the weights it was made from, as the views of _weight_arrays do:
    a packed weight is a copy, and without them a weight freed (``param.data = ...``,
    a parametrization's weight computed anew at every call) could leave its memory to
    a new tensor at version 0, which the key would take for the old one."""
    # Memory and version only (a loop, as above): a frozen module's weights keep their
    # shapes, and this is paid at every frame of a stream (1.7 us with shapes and
    # strides for an LSTM's four weights, 0.7 us without).
    key = []
    for w in weights:
        key.append(None if w is None else (w.data_ptr(), w._version))
    key = tuple(key)
    entry = _weight_views.get(module)
    if entry is not None and entry[0] == key:
        return entry[1][0]

    def make():
        arrays = [None if w is None else _as_numpy(w) for w in weights]
        if module._lstmfast_packs():
            pack_gates = _backend("fused").pack_gates
            for i, name in enumerate(names):
                if arrays[i] is not None and name.startswith(("weight_ih", "weight_hh")):
                    arrays[i] = pack_gates(module._lstmfast_mode, arrays[i],
                                           name.startswith("weight_hh"))
        return arrays, tuple(weights)

    return _cached_for(_weight_views, module, key, make)[0]


def _in_torch_only_context(autocast=True):
    """True where only torch's own implementation can give torch's result: while
    tracing (the kernels are invisible to the tracer), under a ``torch.func``
    transform (they see no wrapped tensors), under a dispatch mode that must see every
    op (FakeTensorMode, which has no data to give the kernels; FlopCounterMode, which
    would count nothing), and under autocast (torch's dtype rules; the layers serve
    bfloat16 autocast themselves and pass autocast=False). Exporting is checked
    before (``torch.compiler.is_exporting``)."""
    # torch._C._is_tracing is torch.jit.is_tracing outside a script, at half the cost
    # (this runs at every frame of a stream)
    return (torch._C._is_tracing() or (autocast and torch.is_autocast_enabled("cpu"))
            or torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack() > 0)


# What the kernels read as plain memory: a subclass of Tensor (a __torch_function__
# wrapper, a FakeTensor) goes through torch's ops, which keep its type and behaviour.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _unsupported_reason(data, tensors):
    """Why the kernels cannot take this call, or None: a reason for a warning, or ""
    when torch's path needs no warning (it raises, as for an input of another dtype
    than the weights; a warning would only hide torch's error; or a tensor subclass
    that torch's ops serve as its author meant)."""
    if not data.is_cpu:
        return f"device {data.device.type}"
    if type(data) not in _PLAIN_TENSORS:
        return ""
    dtype = data.dtype
    for t in tensors:
        if t is not None and (t.dtype != dtype or not t.is_cpu or type(t) not in _PLAIN_TENSORS):
            return ""
    if dtype not in _SUPPORTED_DTYPES:
        return f"dtype {dtype}"
    return None


def _backward_through_torch_ops(grad_outputs):
    """Whether a backward must differentiate torch's own ops instead of running the
    fused BPTT: with ``create_graph=True`` (the fused backward gives numbers, not a
    graph, and double backward needs one), and when the gradients are batched by a
    vmap, as ``gradcheck(check_batched_grad=True)`` batches them (the kernels see no
    batched tensors): ``torch.func``'s vmap, or the one gradcheck uses."""
    if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
        return True
    return any(isinstance(g, torch.Tensor) and _batched_by_legacy_vmap(g) for g in grad_outputs)


_UNBATCHED_KEY_SETS = set()  # key sets (raw) found without Batched: most calls see one


def _batched_by_legacy_vmap(t):
    """Whether t is a batched tensor of torch's first vmap (torch._vmap_internals, which
    gradcheck uses): its dispatch key Batched is not in the DispatchKey enum torch
    exposes, so it is read from the key set's names, once per key set (reading them
    cost 1.5 us, at every step of a cell's backward)."""
    keys = torch._C._dispatch_keys(t)
    raw = keys.raw_repr()
    if raw in _UNBATCHED_KEY_SETS:
        return False
    names = str(keys)
    batched = "Batched" in names[names.find("(") + 1:names.rfind(")")].split(", ")
    if not batched and len(_UNBATCHED_KEY_SETS) < 64:
        _UNBATCHED_KEY_SETS.add(raw)
    return batched


def _as_class(module, cls):
    """A shallow twin of ``module`` of class ``cls``: the same parameter objects, its own
    registries (so registering on one does not change the other)."""
    twin = copy.copy(module)
    for registry in ("_parameters", "_buffers", "_modules"):
        setattr(twin, registry, dict(getattr(module, registry)))
    twin.__class__ = cls
    return twin


# module -> (what its packed weights were made from, the packed weights), and the same
# for the NumPy views of its float weights (_weight_arrays): kept out of the module
# itself, whose copies, pickles and state_dicts must not carry them. Two stores, so
# that a layer run both ways (bfloat16 autocast and float32) keeps both.
_packed_weights = weakref.WeakKeyDictionary()
_weight_views = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _cached_for(store, module, source_key, make):
    """``make()`` once per ``source_key`` of ``module`` in ``store``, cached until the
    key changes (its items compared by identity, tuples by value)."""
    with _cache_lock:
        entry = store.get(module)
        if entry is not None and len(entry[0]) == len(source_key) and all(
                a is b or (isinstance(a, tuple) and a == b) for a, b in zip(entry[0], source_key)):
            return entry[1]
    value = make()
    with _cache_lock:
        store[module] = (source_key, value)
    return value


def _packed_for(module, source_key, make):
    """``make()`` once per ``source_key`` of ``module`` (the packed weights of its
    current parameters), cached until the key changes."""
    return _cached_for(_packed_weights, module, source_key, make)
