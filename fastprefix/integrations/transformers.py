"""Swap a method into a 🤗 transformers model: :func:`apply`, :func:`remove`, :func:`use_backend`.

``apply(model, config)`` freezes the model, attaches the method's trainable module as ``model.fastprefix``
(so it is in ``parameters()``, ``state_dict()``, DDP, optimizers and ``.to()``) and routes the model
through fastprefix:

- prefix methods (P-Tuning v2, APT): the model's attention implementation becomes ``"fastprefix"``,
  registered with both ``AttentionInterface`` and ``AttentionMaskInterface`` (see ``_attention``). A
  forward pre-hook on the base model computes every layer's prefix once per forward into a per-call
  context that travels down the call's keyword arguments; for APT a pre-hook on each layer records the
  hidden states entering it into that context, from which the attention computes the gate. Nothing of
  a forward stays on the model, so a checkpointed layer recomputes from its own forward's state.
  The prefix is never put in the KV cache: ``generate`` attends to it at every step. Switching the
  model's attention implementation away from ``"fastprefix"`` is refused (``fastprefix.remove`` first).
- prompt methods (PT, DePT, ADePT): a forward pre-hook on the model turns ``input_ids`` into
  ``inputs_embeds`` with the prompt in front and extends the per-token inputs (see ``_inputs``); the tokens
  are embedded as the model's own input-embedding module embeds them (see ``_embedding``). A decoder
  ``*ForSequenceClassification`` also gets a forward hook on its base model that pools the last real token.

``remove(model)`` undoes all of it: same outputs as before ``apply``, bit for bit.

Caveats: attention-probability dropout is not applied on the prefix path; sliding-window layers keep their
window over the real keys while the prefix stays visible to every query; static caches, chunked attention
and packed sequences are rejected with a clear error; reentrant gradient checkpointing is rejected
for prefix methods (the default non-reentrant one works); APT's ``gate="pooled"`` on causal attention pools
each position over the real tokens up to it (decoding keeps the running sum and count on the KV cache).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from .. import ops
from ..config import ADePTConfig, APTConfig, DePTConfig, PromptTuningConfig, PTuningV2Config, _Config
from ..modules import AdaptiveDecomposedPrompt, AdaptivePrefix, DecomposedPrompt, PromptTuning, PTuningV2Prefix
from . import _arch, _attention, _deberta, _embedding, _inputs, _positions, _seq2seq

ATTR = "fastprefix"  # the submodule holding the trainable state
_STATE = "_fastprefix_state"  # plain attribute: the State, on the model and on every hooked module
_LAYER = "_fastprefix_layer"  # plain attribute: the layer index, on hooked layers and attention modules
FOLDED = "folded_embedding"  # ADePT merge(): buffer name on the method module


class State:
    """What a fastprefix-applied model needs at run time (never saved; rebuilt by apply)."""

    def __init__(self, config, module, shape, backend, encoder_decoder):
        self.config = config
        self.module = module
        self.shape = shape
        self.backend = backend
        self.encoder_decoder = encoder_decoder
        self.gated = isinstance(module, AdaptivePrefix)
        self.record_gates = True
        self.gate_stats = {}  # APT: layer -> mean token gate per prefix token [L] of the last forward (detached)
        self.layers = []  # prefix methods: the transformer layers
        self.embedding = None  # prompt methods: the model's input nn.Embedding
        self.input_embedding = None  # prompt methods: how X is computed from it (_embedding.InputEmbedding)
        self.inputs = None  # prompt methods: how the model numbers and pools the prompted input (_inputs.Rules)
        # restored by remove()
        self.requires_grad = {}
        self.trainable = ()  # base submodules kept trainable (saved with the adapter)
        self.attn_implementation = None
        self.sub_implementations = []  # (sub-config, its attention implementation) pairs
        self.hooked = []  # (module, hook function) pairs
        self.disabled = 0  # depth of `fastprefix.disabled` blocks: while > 0 the hooks leave every call alone

    @property
    def num_virtual_tokens(self):
        return self.config.num_virtual_tokens

    def __setstate__(self, d):
        # a model pickled whole (torch.save) and loaded in a fresh process: its config still names the
        # "fastprefix" attention, which transformers only finds registered
        self.__dict__.update(d)
        self.__dict__.setdefault("disabled", 0)
        if self.attn_implementation is not None:
            _attention.register()

    @property
    def folded(self):
        """ADePT after ``merge``: the embedding table with the FFN offsets folded in (a non-persistent buffer of
        the method module, so ``.to()`` moves it and adapters never hold it), else None."""
        return getattr(self.module, FOLDED, None)

    # prompt methods
    def _method_embedding(self, input_ids, **kw):
        """The method module on ``input_ids [B, S]`` with X from the model's own embedding module."""
        rows, table, scale = self.input_embedding.lookup(input_ids)
        if isinstance(self.module, PromptTuning):
            return self.module(rows, table, embed_scale=scale)
        return self.module(rows, table, embed_scale=scale, backend=self.backend, **kw)

    def embed(self, input_ids, mask=None):
        """``[B, m+S, d]``: the prompt and the method's token embeddings. ``mask``: the ``[B, S]`` padding mask.

        X is what the model's input-embedding module gives (its scale included: Gemma's ``sqrt(d)``); the
        prompt is not scaled. DePT's offset row j belongs to the j-th real token, so a left-padded batch is
        embedded with its rows rolled to start at column 0 (the offset op takes rows by column) and rolled
        back: padding-exact.
        """
        if self.folded is not None:
            return ops.prompt_tuning_embedding(input_ids, self.folded, self.module.prompt.to(self.folded.dtype))
        lead = None if mask is None or not isinstance(self.module, DecomposedPrompt) else (mask.cumsum(-1) == 0).sum(-1)
        if lead is None or not bool(lead.any()):
            return self._method_embedding(input_ids)
        S, m = input_ids.shape[1], self.num_virtual_tokens
        cols = torch.arange(S, device=input_ids.device)
        out = self._method_embedding(input_ids.gather(1, (cols + lead[:, None]) % S))
        back = ((cols - lead[:, None]) % S)[..., None].expand(-1, -1, out.shape[-1])
        return torch.cat([out[:, :m], out[:, m:].gather(1, back)], dim=1)

    def embed_continuation(self, input_ids, mask):
        """Embeddings of tokens that continue a prompted input (decoding steps): the method's offset, no prompt.

        ``mask``: the unprompted padding mask ``[B, past + n]`` covering them; DePT takes each row's offset
        from its count of earlier real tokens. Returns None when the model's own embedding is already right
        (PT). No dropout: decoding is inference.
        """
        mod = self.module
        if self.folded is not None:
            return torch.nn.functional.embedding(input_ids, self.folded)
        if isinstance(mod, AdaptiveDecomposedPrompt):
            rows, table, scale = self.input_embedding.lookup(input_ids)
            p = mod._cast(table)
            return ops.adept_embedding(rows, table, None, p["down_weight"], p["down_bias"], p["up_weight"],
                                       p["up_bias"], embed_scale=scale, backend=self.backend)
        if isinstance(mod, DecomposedPrompt):
            n, s = input_ids.shape[1], self.config.max_length
            starts = mask[:, :mask.shape[1] - n].sum(-1)
            if int(starts.max()) + n > s:
                raise ValueError(f"DePT: decoding reached token {int(starts.max()) + n} of the input, but "
                                 f"DePTConfig.max_length={s} gives offset rows for {s} tokens only (the input "
                                 f"and the generated tokens must fit: raise max_length or generate fewer tokens)")
            out = None
            for start in starts.unique().tolist():  # rows at the same position share one op call
                rows_b = (starts == start).nonzero().flatten()
                rows, table, scale = self.input_embedding.lookup(input_ids[rows_b])
                p = mod._cast(table)
                part = ops.dept_embedding(rows, table, None, p["lora_a"][start:], p["lora_b"],
                                          scaling=self.config.scaling, embed_scale=scale, backend=self.backend)
                out = part.new_empty(*input_ids.shape, part.shape[-1]) if out is None else out
                out[rows_b] = part
            return out
        return None


# hooks: module-level functions that find their state on the module, so deepcopy/pickling stay consistent
def _reentrant(layer):
    fn = getattr(layer, "_gradient_checkpointing_func", None)
    return bool(getattr(layer, "gradient_checkpointing", False) and getattr(fn, "keywords", {}).get("use_reentrant"))


def _check_attention_implementation(state):
    """The attention modules must still dispatch to "fastprefix" (e.g. not after ``set_attn_implementation``)."""
    for module, _ in state.hooked:
        impl = getattr(getattr(module, "config", None), "_attn_implementation", _attention.NAME)
        if getattr(module, _LAYER, None) is not None and impl != _attention.NAME:
            raise ValueError(
                f"{type(module).__name__} now runs the {impl!r} attention, which would silently drop the "
                f"{state.config.method} prefix: its attention implementation was changed after fastprefix.apply. "
                f"Call fastprefix.remove(model) first to use another attention, or set it back to {_attention.NAME!r}")


def _prefix_pre_hook(module, args, kwargs):
    """Compute every layer's prefix for this call and hand it down in the call's keyword arguments."""
    state = getattr(module, _STATE)
    if state.disabled:  # fastprefix.disabled: the base model runs as it is
        return None
    _check_attention_implementation(state)
    if module.training and any(_reentrant(layer) for layer in state.layers):
        # the reentrant recompute backpropagates into the shared prefix once per layer and frees its graph
        raise ValueError("prefix methods need non-reentrant gradient checkpointing (the transformers default); "
                         "enable it with gradient_checkpointing_kwargs={'use_reentrant': False}")
    output_attentions = kwargs.get("output_attentions")
    if output_attentions is None:
        output_attentions = getattr(module.config, "output_attentions", False)
    ctx = _attention.ForwardContext(state, state.module(), output_attentions)
    state.gate_stats = ctx.gate_stats  # what gate_report reads: the last forward's
    shift = getattr(state, "shift", None)
    if shift is not None:  # prefix_positions="shift": real tokens numbered after the prefix (see _positions)
        return (), {**shift(module, args, kwargs), _attention.KWARG: ctx}
    return args, {**kwargs, _attention.KWARG: ctx}


def _layer_pre_hook(module, args, kwargs):
    """APT: record the hidden states entering the layer (and the KV cache it was given) in the call's context."""
    if getattr(module, _STATE).disabled:
        return None
    ctx = kwargs.get(_attention.KWARG)
    if not isinstance(ctx, _attention.ForwardContext):
        raise RuntimeError(f"APT: {type(module).__name__} was called without the fastprefix context; call the model, "
                           "not its layers")
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError(f"APT: {type(module).__name__} was called without hidden_states")
    i = getattr(module, _LAYER)
    ctx.hidden[i] = hidden
    # a checkpointed layer runs without its cache (transformers drops it), so the gate keeps no running state
    if ctx.state.config.gate == "pooled" and not (module.training and getattr(module, "gradient_checkpointing", False)):
        ctx.caches[i] = _attention.layer_cache(module, args, kwargs)


def _prompt_pre_hook(module, args, kwargs):
    state = getattr(module, _STATE)
    if state.disabled:  # fastprefix.disabled: no prompt, and no pooled slot left for the pool hook to use
        state.inputs.pending_pool.clear()
        return None
    return (), _inputs.model_inputs(state, _inputs.bind(module, args, kwargs))


def _encoder_pre_hook(module, args, kwargs):
    state = getattr(module, _STATE)
    if state.disabled:
        return None
    return (), _inputs.encoder_inputs(state, _inputs.bind(module, args, kwargs))


def _hook(state, module, fn, layer=None):
    setattr(module, _STATE, state)
    if layer is not None:
        setattr(module, _LAYER, layer)
    module.register_forward_pre_hook(fn, with_kwargs=True)
    state.hooked.append((module, fn))


class _AttentionGuard:
    """``set_attn_implementation`` of a model with a prefix method applied: switching away from the
    ``"fastprefix"`` attention would silently drop the prefix, so it is a ValueError naming ``fastprefix.remove``.
    Stored on the instance (pickles and deep-copies with it); ``remove`` takes it away."""

    def __init__(self, model):
        self.model = model

    def __call__(self, attn_implementation, *args, **kwargs):
        def names(value):
            return [n for v in value.values() for n in names(v)] if isinstance(value, dict) else [value]

        others = [n for n in names(attn_implementation) if n != _attention.NAME]
        if others:
            raise ValueError(
                f"set_attn_implementation({attn_implementation!r}) on a {type(self.model).__name__} with fastprefix "
                f"applied would drop its prefix: the prefix methods need the {_attention.NAME!r} attention. Call "
                "fastprefix.remove(model) first, then set the attention implementation")
        return type(self.model).set_attn_implementation(self.model, attn_implementation, *args, **kwargs)


_PREFIX = (PTuningV2Config,)
_MODULES = [(APTConfig, AdaptivePrefix), (PTuningV2Config, PTuningV2Prefix), (ADePTConfig, AdaptiveDecomposedPrompt),
            (DePTConfig, DecomposedPrompt), (PromptTuningConfig, PromptTuning)]


def build_module(config, shape):
    """The method's trainable module for a model of ``shape`` (an ``_arch.ModelShape``)."""
    for cfg_cls, mod_cls in _MODULES:
        if type(config) is cfg_cls:
            if isinstance(config, _PREFIX):
                sites = getattr(shape, "prefix_sites", None) or shape.num_layers  # T5: encoder + decoder blocks
                return mod_cls(config, sites, shape.num_kv_heads, shape.head_dim, shape.hidden_size)
            # the prompt lives in the input-embedding space (narrower than hidden_size on ELECTRA, ALBERT)
            return mod_cls(config, getattr(shape, "embedding_size", None) or shape.hidden_size)
    raise ValueError(f"config must be one of {[c.__name__ for c, _ in _MODULES]}, got {type(config).__name__}")


def unwrap(model):
    """The model inside DistributedDataParallel / ``torch.compile`` wrappers (``.module`` / ``._orig_mod``)."""
    while isinstance(model, nn.Module) and _STATE not in model.__dict__:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def state_of(model, *, required=True):
    """The fastprefix State of ``model`` (None if not applied and not ``required``); wrappers are looked through."""
    model = unwrap(model)
    state = model.__dict__.get(_STATE) if isinstance(model, nn.Module) else None
    if state is None and required:
        raise ValueError(f"fastprefix is not applied to this {type(model).__name__}; call fastprefix.apply first")
    return state


def apply(model, config, *, backend=None, trainable=(), generator=None):
    """Freeze ``model``, attach ``config``'s method as ``model.fastprefix`` and route the model through it.

    Args:
        model: a 🤗 transformers ``PreTrainedModel``. Prefix methods need an encoder-only or decoder-only
            model whose attention goes through ``AttentionInterface`` (BERT, RoBERTa, Llama, Qwen2, ...);
            prompt methods need an ``nn.Embedding`` input table (also T5).
        config: a ``PromptTuningConfig``, ``PTuningV2Config``, ``APTConfig``, ``DePTConfig`` or ``ADePTConfig``.
        backend: ``None`` (Triton for CUDA tensors), ``"torch"`` or ``"triton"``; see :func:`use_backend`.
        trainable: names of base-model submodules to keep trainable (e.g. ``("classifier",)`` for a fresh
            classification head); saved with the adapter.
        generator: ``torch.Generator`` for the vocabulary init of the prompt (``prompt_init="vocab"``).

    Returns:
        ``model`` (modified in place). The module is created on the model's device, in float32.
    """
    if not isinstance(config, _Config):
        raise ValueError(f"config must be a fastprefix config, got {type(config).__name__}")
    if state_of(model, required=False) is not None or hasattr(model, ATTR):
        raise ValueError(f"fastprefix is already applied to this {type(model).__name__}; "
                         "call fastprefix.remove(model) first")
    ops._choose(backend, torch.device("cpu"))  # validate the name early
    shape = _arch.model_shape(model)
    is_prefix = isinstance(config, _PREFIX)
    layers = _arch.prefix_layers(model, shape) if is_prefix else None
    shift = (_positions.Shift(model, config.num_virtual_tokens)
             if is_prefix and config.prefix_positions == "shift" else None)  # refused here, before any change
    embedding = None if is_prefix else _arch.input_embedding(model)
    # prompt methods: a model that scales its embeddings only when it embeds ids itself (probed; refused if unknown)
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    outer = None if is_prefix else _embedding.outer_scale(model, embedding, enc_dec)
    if not is_prefix and "inputs_embeds" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"{type(model).__name__}.forward takes no inputs_embeds; prompt methods need it")
    names = dict(model.named_modules())
    for name in trainable:
        if name not in names or name == "":
            raise ValueError(f"trainable names a submodule the model does not have: {name!r}")

    ref = next(model.parameters())
    module = build_module(config, shape).to(ref.device).train(model.training)
    if embedding is not None and config.prompt_init == "vocab":
        module.init_prompt_from_vocab(embedding.weight, generator=generator)

    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    state = State(config, module, shape, backend, enc_dec)
    state.shift = shift
    state.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    state.trainable = tuple(trainable)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in trainable:
        for p in names[name].parameters():
            p.requires_grad_(True)
    model.add_module(ATTR, module)
    model.__dict__[_STATE] = state

    if is_prefix:
        _attention.register()
        state.attn_implementation = model.config._attn_implementation
        for sub in model.modules():  # submodels may carry their own config
            cfg = getattr(sub, "config", None)
            # a config shared by several modules (T5: a stack's, held by its attention modules) is recorded once
            if (cfg is not None and hasattr(cfg, "_attn_implementation_internal") and cfg is not model.config
                    and all(cfg is not seen for seen, _ in state.sub_implementations)):
                state.sub_implementations.append((cfg, cfg._attn_implementation_internal))
                cfg._attn_implementation_internal = _attention.NAME
        model.config._attn_implementation_internal = _attention.NAME
        if _seq2seq.family(model) is not None:  # T5: a hook on each stack (generate runs the encoder alone)
            _seq2seq.install(state, model)
        else:
            _hook(state, _arch.prefix_entry(model, layers), _prefix_pre_hook)  # base model, or what forward calls
        for sub in model.modules():  # the model and any PreTrainedModel inside (e.g. model.model)
            if callable(getattr(type(sub), "set_attn_implementation", None)):
                sub.__dict__["set_attn_implementation"] = _AttentionGuard(sub)
                state.hooked.append((sub, None))
        state.layers = [layer for layer, _ in layers]
        deberta = _deberta.is_deberta(model)  # no kwargs reach its layers: its own hooks and attention forward
        for i, (layer, attn) in enumerate(layers):
            setattr(attn, _STATE, state)
            setattr(attn, _LAYER, i)
            state.hooked.append((attn, None))
            if state.gated and not deberta:
                _hook(state, layer, _layer_pre_hook, layer=i)
        if deberta:
            _deberta.install(state, model.base_model, layers)
    else:
        state.embedding = embedding
        state.input_embedding = _embedding.InputEmbedding(embedding, outer)
        state.inputs = _inputs.Rules(model, embedding)
        _hook(state, model, _prompt_pre_hook)
        if enc_dec:
            _hook(state, model.get_encoder(), _encoder_pre_hook)
        if state.inputs.pool_last:  # decoder classifier: pool the last real token of the prompted sequence
            base = model.base_model
            setattr(base, _STATE, state)
            base.register_forward_hook(_inputs.pool_hook, with_kwargs=True)
            state.hooked.append((base, _inputs.pool_hook))
    return model


def remove(model):
    """Undo :func:`apply`: hooks, attention implementation, ``model.fastprefix``, requires_grad. Returns ``model``."""
    state = state_of(model)
    model = unwrap(model)
    for module, fn in state.hooked:
        if fn is not None:
            for hooks, with_kwargs in ((module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
                                       (module._forward_hooks, module._forward_hooks_with_kwargs)):
                for key in [k for k, h in hooks.items() if h is fn]:
                    del hooks[key]
                    with_kwargs.pop(key, None)
                    module._forward_hooks_always_called.pop(key, None)
        for attr in (_STATE, _LAYER):
            module.__dict__.pop(attr, None)
        if isinstance(module.__dict__.get("set_attn_implementation"), _AttentionGuard):
            del module.__dict__["set_attn_implementation"]
        _deberta.restore(module)  # a DeBERTa attention's instance forward
    if state.attn_implementation is not None:
        model.config._attn_implementation_internal = state.attn_implementation
        for cfg, impl in state.sub_implementations:
            cfg._attn_implementation_internal = impl
    delattr(model, ATTR)
    model.__dict__.pop(_STATE, None)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    return model


def method_module(model):
    """``model.fastprefix``: the applied method's trainable module."""
    state_of(model)
    return getattr(unwrap(model), ATTR)


@contextlib.contextmanager
def use_backend(model, backend):
    """Run ``model``'s fastprefix ops on ``backend`` (``"torch"``, ``"triton"`` or None) inside the block."""
    state = state_of(model)
    ops._choose(backend, torch.device("cpu"))
    before, state.backend = state.backend, backend
    try:
        yield model
    finally:
        state.backend = before
