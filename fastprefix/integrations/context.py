"""What one call of a fastprefix model carries down to its layers: the :class:`ForwardContext`, and how it travels.

The ground floor of the integration: everything here is about a single call, nothing about a model's setup.

A call's context travels one of two ways:

- in the call's keyword arguments, as ``fastprefix_context`` (:data:`KWARG`): transformers hands ``**kwargs``
  down to every layer and to the attention function (Llama, Qwen2, GPT-2, BERT, RoBERTa, T5, ...). A
  gradient-checkpointed layer is recomputed from the same keyword arguments, so it reads the prefix and the gate
  inputs of *its* forward, however many forwards ran before the backward;
- on this thread's call stack (a ``ContextVar``: :func:`enter`, :func:`leave`, :func:`current`), for what gets no
  keyword arguments: DeBERTa's layers (its base model swallows ``**kwargs``) and the base model of a decoder
  classifier, which pools the slot that the prompt methods' pre-hook found (see ``inputs.pool_hook``).

Nothing of a call is left on the model. The one exception is the probe's output: :meth:`ForwardContext.record_gate`
also writes APT's gate statistics into the State's record (``State.gate_stats``), which ``gate_report`` reads after
the fact and no forward reads back.
"""

from __future__ import annotations

import contextvars
import functools
import inspect

NAME = "fastprefix"  # the attention (and mask) implementation registered with transformers
KWARG = "fastprefix_context"  # the keyword argument that carries a ForwardContext down the call
_CACHE_ARGS = ("past_key_values", "layer_past", "past_key_value")  # the names a layer's KV cache goes by
_CALLS = contextvars.ContextVar("fastprefix_calls", default=())  # this thread's running calls (ForwardContexts)


# why a checkpointed recompute can't cross a `fastprefix.disabled` block (the attention's and the hooks' errors say it)
MIXED_DISABLED = ("under gradient checkpointing, a backward recomputes each layer in the state fastprefix is in at "
                  "that time: run the backward inside `with fastprefix.disabled(model):` exactly when its forward "
                  "ran inside it")


class ForwardContext:
    """What one forward of a fastprefix model hands its layers (lives as long as that call and its graph).

    state: the model's State (its setup: config, method module, family; never written per call, but for the
        probe's record, see :meth:`record_gate`).
    prefixes: prefix methods, ``[2N, Hkv, L, D]``: every layer's prefix keys/values after dropout, computed once.
    backend, output_attentions: as they were when the call started (a recompute in the backward pass runs
        outside ``use_backend`` blocks).
    hidden: APT, layer -> ``[B, S, d]`` hidden states entering the layer (the gate's input).
    caches: APT's causal pooled gate, layer -> the KV cache the layer was called with.
    gate_stats: APT's probe, layer -> mean token gate ``[L]`` of this call.
    key_padding_mask: the call's 2D padding mask ``[B, S]`` where a family reads it off the call (DeBERTa).
    pooled: prompt methods on a decoder classifier: the slot ``[B]`` its head pools (None: none to pool).
    packing: the packing memo of the call (``packing.of_call``): its signals and their Packing.
    rows: per-row adapters (``rows.RowAdapters``; then ``prefixes`` is their stacked table), or None; prompt
        methods: the call's ``rows.RowPrompts`` (every row's adapter, and where its slots go).
    """

    def __init__(self, state, prefixes=None, output_attentions=False):
        self.state = state
        self.backend = state.backend
        self.prefixes = prefixes
        self.output_attentions = bool(output_attentions)
        self.hidden = {}
        self.caches = {}
        self.gate_stats = {}
        self.key_padding_mask = None
        self.pooled = None
        self.packing = None
        self.rows = None  # per-row adapters (rows.RowAdapters), for a call with adapter_names; RowPrompts

    def record_gate(self, i, stats):
        """APT's probe: site ``i``'s mean gate ``[L]`` in this call, and in the State's record of each site's latest
        (what ``gate_report`` reads)."""
        self.gate_stats[i] = stats
        self.state.gate_stats[i] = stats


# ------------------------------------------------------------------------------------------ the call stack
def enter(ctx):
    """Make ``ctx`` this thread's current call (until :func:`leave`)."""
    _CALLS.set(_CALLS.get() + (ctx,))


def leave(ctx):
    """Take ``ctx`` off this thread's calls if it is the current one (a no-op otherwise)."""
    calls = _CALLS.get()
    if calls and calls[-1] is ctx:
        _CALLS.set(calls[:-1])


def current(state):
    """This thread's current call if it is a call of the model whose State is ``state``, else None."""
    calls = _CALLS.get()
    return calls[-1] if calls and calls[-1].state is state else None


# ------------------------------------------------------------------------------------- call arguments
@functools.lru_cache(maxsize=None)
def _signature(cls):
    return inspect.signature(cls.forward)


@functools.lru_cache(maxsize=256)
def _positional_names(forward):
    """The names a forward function's positional arguments bind to (``self`` left out of a plain function), read once
    per function: ``inspect.signature`` costs tens of microseconds, and a model calls several hooked modules per
    step."""
    params = list(inspect.signature(forward).parameters.values())
    if not inspect.ismethod(forward) and params and params[0].name == "self":
        params = params[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def bind(module, args, kwargs):
    """All of a forward call's arguments as keywords (positional ones named from the signature)."""
    if not args:
        return dict(kwargs)
    forward = module.forward
    forward = getattr(forward, "__func__", forward)
    try:
        names = _positional_names(forward)
    except TypeError:  # an unhashable callable: read its signature each time
        names = _positional_names.__wrapped__(forward)
    if len(args) > len(names):
        raise ValueError(f"{type(module).__name__}.forward got {len(args)} positional arguments; pass them by name")
    out = dict(zip(names, args))
    clash = set(out) & set(kwargs)
    if clash:
        raise ValueError(f"{type(module).__name__}.forward got multiple values for {sorted(clash)}")
    out.update(kwargs)
    return out


def cache_length(past, who="fastprefix prompt methods need"):
    """Tokens already in ``past_key_values`` (0 without one); ``who`` starts the error for a legacy tuple."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    raise ValueError(f"{who} past_key_values as a transformers Cache (legacy tuples are not supported)")


def layer_cache(layer, args, kwargs):
    """The KV cache a transformer layer was called with (``past_key_values``, by keyword or position), or None."""
    for name in _CACHE_ARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    try:
        bound = _signature(type(layer)).bind_partial(layer, *args, **kwargs).arguments
    except TypeError:
        return None
    return next((bound[n] for n in _CACHE_ARGS if bound.get(n) is not None), None)
