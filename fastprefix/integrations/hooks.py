"""The forward hooks that start each call of a fastprefix model, and the helpers that put them on a model.

Prefix methods (P-Tuning v2, APT): :func:`prefix_pre_hook`, on the module whose call holds the layers (the base
model, or what the model's forward calls: see ``families``), computes every layer's prefix once per call into a
fresh ``context.ForwardContext`` that travels down the call's keyword arguments; for APT,
:func:`apt_layer_pre_hook` on each layer records the hidden states entering it (and its KV cache) in that context,
from which the attention computes the gate (``gates``). A checkpointed layer recomputes from its own forward's
context. Switching the model's attention implementation away from ``"fastprefix"`` is refused
(:class:`AttentionGuard`).

Prompt methods (PT, DePT, ADePT): :func:`prompt_pre_hook` on the model rewrites the call's inputs (``inputs``)
for the prompts of its rows (``rows.RowPrompts``: the active adapter's, or each row's from ``adapter_names``); for a
decoder classifier (the slot its head pools) and an encoder-decoder (the rows its encoder takes) it makes the call's
context the thread's current call until :func:`prompt_exit_hook`. :func:`encoder_pre_hook` prompts an encoder called
on its own (``generate`` on T5). Inside ``fastprefix.disabled`` every hook leaves the call alone.
"""

from __future__ import annotations

import torch

from .context import KWARG, MIXED_DISABLED, NAME, ForwardContext, bind, current, enter, layer_cache, leave
from .inputs import encoder_inputs, model_inputs, pool_hook
from .rows import ADAPTER_NAMES, RowGenerate, RowPrompts, generation_names, repeated, row_adapters, row_prompts
from .state import LAYER, STATE, hook, mark, override


# hooks: module-level functions that find their state on the module, so deepcopy/pickling stay consistent
def _reentrant(layer):
    fn = getattr(layer, "_gradient_checkpointing_func", None)
    return bool(getattr(layer, "gradient_checkpointing", False) and getattr(fn, "keywords", {}).get("use_reentrant"))


def check_attention_implementation(state):
    """The attention modules must still dispatch to "fastprefix" (e.g. not after ``set_attn_implementation``)."""
    for module, _ in state.hooked:
        impl = getattr(getattr(module, "config", None), "_attn_implementation", NAME)
        if getattr(module, LAYER, None) is not None and impl != NAME:
            raise ValueError(
                f"{type(module).__name__} now runs the {impl!r} attention, which would silently drop the "
                f"{state.config.method} prefix: its attention implementation was changed after fastprefix.apply. "
                f"Call fastprefix.remove(model) first to use another attention, or set it back to {NAME!r}")


def prefix_pre_hook(module, args, kwargs):
    """Compute every layer's prefix for this call and hand it down in the call's keyword arguments."""
    state = getattr(module, STATE)
    if state.disabled:  # fastprefix.disabled: the base model runs as it is
        return None
    check_attention_implementation(state)
    if module.training and any(_reentrant(layer) for layer in state.layers):
        # the reentrant recompute backpropagates into the shared prefix once per layer and frees its graph
        raise ValueError("prefix methods need non-reentrant gradient checkpointing (the transformers default); "
                         "enable it with gradient_checkpointing_kwargs={'use_reentrant': False}")
    output_attentions = kwargs.get("output_attentions")
    if output_attentions is None:
        output_attentions = getattr(module.config, "output_attentions", False)
    names, generated = kwargs.get(ADAPTER_NAMES), None
    if names is not None:
        kwargs = {k: v for k, v in kwargs.items() if k != ADAPTER_NAMES}
    else:
        generated = generation_names(state)  # a call inside generate(..., adapter_names=...)
    if names is None and generated is None:
        ctx = ForwardContext(state, state.module(), output_attentions)
    else:  # per-row adapters: every named adapter's prefixes, stacked, and each row's index into them
        batch = _batch_size(module, args, kwargs)
        rows = row_adapters(state, names if generated is None else repeated(generated, batch), batch,
                            next(state.module.parameters()).device)
        ctx = ForwardContext(state, rows.prefixes(state.module), output_attentions)
        ctx.rows = rows
    if state.shift is not None:  # prefix_positions="shift": real tokens numbered after the prefix (see positions)
        return (), {**state.shift(module, args, kwargs), KWARG: ctx}
    return args, {**kwargs, KWARG: ctx}


def _batch_size(module, args, kwargs):
    """The batch size of a call of the module the prefix hook is on (its ids, embeddings or hidden states)."""
    call = bind(module, args, kwargs)
    for name in ("input_ids", "inputs_embeds", "hidden_states"):
        x = call.get(name)
        if isinstance(x, torch.Tensor):
            return x.shape[0]
    raise ValueError(f"adapter_names: {type(module).__name__} was called without input_ids, inputs_embeds or "
                     "hidden_states to count the batch rows of")


def _prompt_batch(call):
    """The batch size of a call of a prompt-method model (its ids or embeddings, or the encoder output it decodes
    from), or None when it shows none."""
    for name in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        x = call.get(name)
        if isinstance(x, torch.Tensor):
            return x.shape[0]
    encoder_outputs = call.get("encoder_outputs")
    if encoder_outputs is not None and isinstance(encoder_outputs[0], torch.Tensor):
        return encoder_outputs[0].shape[0]
    return None


def _row_prompts(state, call):
    """The :class:`rows.RowPrompts` of a prompt-method call (``call``: its bound arguments, from which
    ``adapter_names`` is taken): each row's adapter from ``adapter_names``, or from the innermost
    ``generate(..., adapter_names=...)`` (repeated as generate repeats the rows), else the active one for every
    row."""
    names = call.pop(ADAPTER_NAMES, None)
    generated = generation_names(state) if names is None else None
    if names is None and generated is None:
        return RowPrompts.active(state)
    batch = _prompt_batch(call)
    if batch is None:
        raise ValueError(f"adapter_names: {state.inputs.model_name} was called without input_ids, inputs_embeds or "
                         "encoder_outputs to count the batch rows of")
    return row_prompts(state, names if generated is None else repeated(generated, batch), batch,
                       state.embedding.weight.device)


def apt_layer_pre_hook(module, args, kwargs):
    """APT: record the hidden states entering the layer (and the KV cache it was given) in the call's context."""
    if getattr(module, STATE).disabled:
        return None
    ctx = kwargs.get(KWARG)
    if not isinstance(ctx, ForwardContext):
        raise RuntimeError(f"APT: {type(module).__name__} was called without the fastprefix context; call the model, "
                           "not its layers")
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError(f"APT: {type(module).__name__} was called without hidden_states")
    i = getattr(module, LAYER)
    ctx.hidden[i] = hidden
    # a checkpointed layer runs without its cache (transformers drops it), so the gate keeps no running state
    if ctx.state.config.gate == "pooled" and not (module.training and getattr(module, "gradient_checkpointing", False)):
        ctx.caches[i] = layer_cache(module, args, kwargs)


def prompt_pre_hook(module, args, kwargs):
    """Rewrite the call's inputs for its rows' prompts; a decoder classifier's or an encoder-decoder's call becomes
    the thread's current one (its pooled slot, its rows for the encoder it runs).

    A call whose rows all run on ``"__base__"`` reaches the base model unchanged."""
    state = getattr(module, STATE)
    if state.disabled:  # fastprefix.disabled: no prompt, and no pooled slot for the pool hook to use
        return None
    call = bind(module, args, kwargs)
    rows = _row_prompts(state, call)
    ctx = ForwardContext(state)
    ctx.rows = rows
    kwargs = call if rows.width == 0 else model_inputs(state, call, ctx, rows)
    if state.inputs.pool_last or state.encoder_decoder:
        enter(ctx)  # until prompt_exit_hook: inputs.pool_hook and encoder_pre_hook find the call there
    return (), kwargs


def prompt_exit_hook(module, args, kwargs, output):
    """Take the call :func:`prompt_pre_hook` entered off the thread's calls (also when the forward raised)."""
    ctx = current(getattr(module, STATE))
    if ctx is not None:
        leave(ctx)


def encoder_pre_hook(module, args, kwargs):
    """Prompt the input of an encoder called on its own (``generate`` runs T5's encoder first), for its rows; inside
    a call of the model, for that call's rows (input ids reach it only when they all run on ``"__base__"``)."""
    state = getattr(module, STATE)
    if state.disabled:
        return None
    call = bind(module, args, kwargs)
    outer = current(state)
    rows = outer.rows if outer is not None and outer.rows is not None else _row_prompts(state, call)
    return (), call if rows.width == 0 else encoder_inputs(state, call, rows)


class AttentionGuard:
    """``set_attn_implementation`` of a model with a prefix method applied: switching away from the
    ``"fastprefix"`` attention would silently drop the prefix, so it is a ValueError naming ``fastprefix.remove``.
    Stored on the instance (pickles and deep-copies with it); ``remove`` takes it away."""

    def __init__(self, model):
        self.model = model

    def __call__(self, attn_implementation, *args, **kwargs):
        def names(value):
            return [n for v in value.values() for n in names(v)] if isinstance(value, dict) else [value]

        others = [n for n in names(attn_implementation) if n != NAME]
        if others:
            raise ValueError(
                f"set_attn_implementation({attn_implementation!r}) on a {type(self.model).__name__} with fastprefix "
                f"applied would drop its prefix: the prefix methods need the {NAME!r} attention. Call "
                "fastprefix.remove(model) first, then set the attention implementation")
        return type(self.model).set_attn_implementation(self.model, attn_implementation, *args, **kwargs)


# ------------------------------------------------------------------------------------------------ installing
def site_pre_hook(module, args, kwargs):
    """On each prefix site's attention module: a call that carries a fastprefix context while ``fastprefix.disabled``
    is on is the checkpointed recompute of a forward run with fastprefix on, which the base model's attention
    (switched back by ``disabled``) would silently compute without the prefix: refuse it."""
    if getattr(module, STATE).disabled and isinstance(kwargs.get(KWARG), ForwardContext):
        raise RuntimeError(f"{type(module).__name__} is recomputing a forward that ran with fastprefix on, inside "
                           f"fastprefix.disabled(model), where the prefix would be dropped: {MIXED_DISABLED}")


def mark_layers(state, layers, *, causal=None):
    """Number the prefix sites: each attention module gets the State and its site index (and ``causal[i]``, the
    family's word on site i's causality, where given) and :func:`site_pre_hook`; for APT each layer gets
    :func:`apt_layer_pre_hook`."""
    state.layers = [layer for layer, _ in layers]
    for i, (layer, attn) in enumerate(layers):
        mark(state, attn, i, None if causal is None else causal[i])
        hook(state, attn, site_pre_hook)
        if state.gated:
            hook(state, layer, apt_layer_pre_hook, layer=i)


def guard_attention(state, model):
    """Put an :class:`AttentionGuard` on the model and on every ``PreTrainedModel`` inside it, and the
    ``adapter_names``-aware ``generate`` (``rows.RowGenerate``) on the model."""
    for sub in model.modules():
        if callable(getattr(type(sub), "set_attn_implementation", None)):
            override(state, sub, "set_attn_implementation", AttentionGuard(sub))
    if callable(getattr(type(model), "generate", None)):
        override(state, model, "generate", RowGenerate(model, state))


def install_prompt(state, model):
    """The prompt methods' hooks: the inputs of each call (and of an encoder called alone), a decoder
    classifier's pooling of the last real token, and the ``adapter_names``-aware ``generate``
    (``rows.RowGenerate``)."""
    hook(state, model, prompt_pre_hook)
    if callable(getattr(type(model), "generate", None)):
        override(state, model, "generate", RowGenerate(model, state))
    if state.encoder_decoder:
        hook(state, model.get_encoder(), encoder_pre_hook)
    if state.inputs.pool_last:  # decoder classifier: pool the last real token of the prompted sequence
        hook(state, model.base_model, pool_hook, after=True)
    if state.inputs.pool_last or state.encoder_decoder:  # the call is the thread's current one until it ends
        hook(state, model, prompt_exit_hook, after=True, always=True)
