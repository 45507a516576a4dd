"""Swap a method into a 🤗 transformers model: :func:`apply`, :func:`remove`, :func:`use_backend`.

``apply(model, config)`` freezes the model, attaches the method's trainable module as ``model.fastprefix``
(so it is in ``parameters()``, ``state_dict()``, DDP, optimizers and ``.to()``) and routes the model
through fastprefix:

- prefix methods (P-Tuning v2, APT): the model's attention implementation becomes ``"fastprefix"``,
  registered with both ``AttentionInterface`` and ``AttentionMaskInterface`` (see ``_attention``). A
  forward pre-hook on the base model computes every layer's prefix once per forward; for APT a pre-hook
  on each layer records the hidden states entering it, from which the attention computes the gate.
  The prefix is never put in the KV cache: ``generate`` attends to it at every step.
- prompt methods (PT, DePT, ADePT): a forward pre-hook on the model turns ``input_ids`` into
  ``inputs_embeds`` with the prompt in front and extends the per-token inputs (see ``_inputs``).

``remove(model)`` undoes all of it: same outputs as before ``apply``, bit for bit.

Caveats: attention-probability dropout is not applied on the prefix path; sliding-window layers, static
caches and packed sequences are rejected with a clear error; reentrant gradient checkpointing is rejected
for prefix methods (the default non-reentrant one works); APT's ``gate="pooled"`` pools over the tokens of
the current call, so with a KV cache each decoding step pools over its new tokens only.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from .. import ops
from ..config import ADePTConfig, APTConfig, DePTConfig, PromptTuningConfig, PTuningV2Config, _Config
from ..modules import AdaptiveDecomposedPrompt, AdaptivePrefix, DecomposedPrompt, PromptTuning, PTuningV2Prefix
from . import _arch, _attention, _inputs

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
        self.prefixes = None  # [2N, Hkv, L, D] of the current forward
        self.hidden = {}  # APT: layer -> hidden states entering it, for the gate
        self.record_gates = True
        self.gate_stats = {}  # APT: layer -> mean token gate per prefix token [L] of the last forward
        self.layers = []  # prefix methods: the transformer layers
        self.embedding = None  # prompt methods: the model's input nn.Embedding
        # restored by remove()
        self.requires_grad = {}
        self.trainable = ()  # base submodules kept trainable (saved with the adapter)
        self.attn_implementation = None
        self.sub_implementations = []  # (sub-config, its attention implementation) pairs
        self.hooked = []  # (module, hook function) pairs

    @property
    def num_virtual_tokens(self):
        return self.config.num_virtual_tokens

    @property
    def folded(self):
        """ADePT after ``merge``: the embedding table with the FFN offsets folded in (a non-persistent buffer of
        the method module, so ``.to()`` moves it and adapters never hold it), else None."""
        return getattr(self.module, FOLDED, None)

    # prefix methods
    def layer_prefix(self, i, dtype):
        if self.prefixes is None:
            raise RuntimeError("fastprefix: the prefix was not computed for this forward (the base model's "
                               "forward pre-hook did not run)")
        k, v = PTuningV2Prefix.layer(self.prefixes, i)
        return k.to(dtype), v.to(dtype)

    @torch.no_grad()
    def record(self, i, hidden, query_mask):
        """APT probe: the mean token gate alpha (before lambda) per prefix token over the real query tokens."""
        m = self.module
        dt = hidden.dtype
        alpha = ops.apt_gate(hidden.detach(), m.gate_weight[i].detach().to(dt), m.gate_bias[i].detach().to(dt),
                             torch.ones((), dtype=dt, device=hidden.device), mode=self.config.gate,
                             key_padding_mask=query_mask)
        if self.config.gate == "token" and query_mask is not None:
            w = query_mask.to(alpha.dtype).unsqueeze(-1)
            mean = (alpha * w).sum(dim=(0, 1)) / w.sum().clamp_min(1)
        else:
            mean = alpha.mean(dim=(0, 1))
        self.gate_stats[i] = mean.float()

    # prompt methods
    def embed(self, input_ids, mask=None):
        """``[B, m+S, d]``: the prompt and the method's token embeddings. ``mask``: the ``[B, S]`` padding mask.

        DePT's offset row j belongs to the j-th real token, so a left-padded batch is embedded with its rows
        rolled to start at column 0 (the offset op takes rows by column) and rolled back: padding-exact.
        """
        weight = self.embedding.weight
        if self.folded is not None:
            return ops.prompt_tuning_embedding(input_ids, self.folded, self.module.prompt.to(self.folded.dtype))
        if isinstance(self.module, PromptTuning):
            return self.module(input_ids, weight)
        lead = None if mask is None or not isinstance(self.module, DecomposedPrompt) else (mask.cumsum(-1) == 0).sum(-1)
        if lead is None or not bool(lead.any()):
            return self.module(input_ids, weight, backend=self.backend)
        S, m = input_ids.shape[1], self.num_virtual_tokens
        cols = torch.arange(S, device=input_ids.device)
        out = self.module(input_ids.gather(1, (cols + lead[:, None]) % S), weight, backend=self.backend)
        back = ((cols - lead[:, None]) % S)[..., None].expand(-1, -1, out.shape[-1])
        return torch.cat([out[:, :m], out[:, m:].gather(1, back)], dim=1)

    def embed_continuation(self, input_ids, mask):
        """Embeddings of tokens that continue a prompted input (decoding steps): the method's offset, no prompt.

        ``mask``: the unprompted padding mask ``[B, past + n]`` covering them; DePT takes each row's offset
        from its count of earlier real tokens. Returns None when the plain embedding is already right (PT).
        No dropout: decoding is inference.
        """
        mod, weight = self.module, self.embedding.weight
        if self.folded is not None:
            return torch.nn.functional.embedding(input_ids, self.folded)
        if isinstance(mod, AdaptiveDecomposedPrompt):
            p = mod._cast(weight)
            return ops.adept_embedding(input_ids, weight, None, p["down_weight"], p["down_bias"], p["up_weight"],
                                       p["up_bias"], backend=self.backend)
        if isinstance(mod, DecomposedPrompt):
            p = mod._cast(weight)
            n = input_ids.shape[1]
            starts = mask[:, :mask.shape[1] - n].sum(-1)
            out = None
            for start in starts.unique().tolist():  # rows at the same position share one op call
                rows = (starts == start).nonzero().flatten()
                part = ops.dept_embedding(input_ids[rows], weight, None, p["lora_a"][start:], p["lora_b"],
                                          scaling=self.config.scaling, backend=self.backend)
                out = part.new_empty(*input_ids.shape, part.shape[-1]) if out is None else out
                out[rows] = part
            return out
        return None


# hooks: module-level functions that find their state on the module, so deepcopy/pickling stay consistent
def _reentrant(layer):
    fn = getattr(layer, "_gradient_checkpointing_func", None)
    return bool(getattr(layer, "gradient_checkpointing", False) and getattr(fn, "keywords", {}).get("use_reentrant"))


def _prefix_pre_hook(module, args, kwargs):
    state = getattr(module, _STATE)
    if module.training and any(_reentrant(layer) for layer in state.layers):
        # the reentrant recompute backpropagates into the shared prefix once per layer and frees its graph
        raise ValueError("prefix methods need non-reentrant gradient checkpointing (the transformers default); "
                         "enable it with gradient_checkpointing_kwargs={'use_reentrant': False}")
    state.hidden.clear()
    state.prefixes = state.module()


def _layer_pre_hook(module, args, kwargs):
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError(f"APT: {type(module).__name__} was called without hidden_states")
    getattr(module, _STATE).hidden[getattr(module, _LAYER)] = hidden


def _prompt_pre_hook(module, args, kwargs):
    state = getattr(module, _STATE)
    return (), _inputs.model_inputs(state, _inputs.bind(module, args, kwargs))


def _encoder_pre_hook(module, args, kwargs):
    state = getattr(module, _STATE)
    return (), _inputs.encoder_inputs(state, _inputs.bind(module, args, kwargs))


def _hook(state, module, fn, layer=None):
    setattr(module, _STATE, state)
    if layer is not None:
        setattr(module, _LAYER, layer)
    module.register_forward_pre_hook(fn, with_kwargs=True)
    state.hooked.append((module, fn))


_PREFIX = (PTuningV2Config,)
_MODULES = [(APTConfig, AdaptivePrefix), (PTuningV2Config, PTuningV2Prefix), (ADePTConfig, AdaptiveDecomposedPrompt),
            (DePTConfig, DecomposedPrompt), (PromptTuningConfig, PromptTuning)]


def build_module(config, shape):
    """The method's trainable module for a model of ``shape`` (an ``_arch.ModelShape``)."""
    for cfg_cls, mod_cls in _MODULES:
        if type(config) is cfg_cls:
            if isinstance(config, _PREFIX):
                return mod_cls(config, shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.hidden_size)
            return mod_cls(config, shape.hidden_size)
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
    embedding = None if is_prefix else _arch.input_embedding(model)
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
            if cfg is not None and hasattr(cfg, "_attn_implementation_internal") and cfg is not model.config:
                state.sub_implementations.append((cfg, cfg._attn_implementation_internal))
                cfg._attn_implementation_internal = _attention.NAME
        model.config._attn_implementation_internal = _attention.NAME
        _hook(state, model.base_model, _prefix_pre_hook)
        state.layers = [layer for layer, _ in layers]
        for i, (layer, attn) in enumerate(layers):
            setattr(attn, _STATE, state)
            setattr(attn, _LAYER, i)
            state.hooked.append((attn, None))
            if state.gated:
                _hook(state, layer, _layer_pre_hook, layer=i)
    else:
        state.embedding = embedding
        _hook(state, model, _prompt_pre_hook)
        if enc_dec:
            _hook(state, model.get_encoder(), _encoder_pre_hook)
    return model


def remove(model):
    """Undo :func:`apply`: hooks, attention implementation, ``model.fastprefix``, requires_grad. Returns ``model``."""
    state = state_of(model)
    model = unwrap(model)
    for module, fn in state.hooked:
        if fn is not None:
            hooks = module._forward_pre_hooks
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
        for attr in (_STATE, _LAYER):
            module.__dict__.pop(attr, None)
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
