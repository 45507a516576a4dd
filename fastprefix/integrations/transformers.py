"""Swap a method into a 🤗 transformers model: :func:`apply`, :func:`remove`, :func:`use_backend`.

``apply(model, config)`` freezes the model, attaches the method's trainable module as ``model.fastprefix``
(so it is in ``parameters()``, ``state_dict()``, DDP, optimizers and ``.to()``) and routes the model
through fastprefix:

- prefix methods (P-Tuning v2, APT): the model's attention implementation becomes ``"fastprefix"``,
  registered with both ``AttentionInterface`` and ``AttentionMaskInterface`` (see ``attention``). A
  forward pre-hook on the base model computes every layer's prefix once per forward into a per-call
  context that travels down the call's keyword arguments (see ``context``, ``hooks``); for APT a pre-hook on
  each layer records the hidden states entering it into that context, from which the attention computes the
  gate (see ``gates``). Where the prefix sites are and how the prefix reaches them is the model's family's
  business (see ``families``: T5, DeBERTa, and every model whose attention goes through
  ``AttentionInterface``). Nothing of a forward stays on the model, so a checkpointed layer recomputes from its
  own forward's state.
  The prefix is never put in the KV cache: ``generate`` attends to it at every step. Switching the
  model's attention implementation away from ``"fastprefix"`` is refused (``fastprefix.remove`` first).
- prompt methods (PT, DePT, ADePT): a forward pre-hook on the model turns ``input_ids`` into
  ``inputs_embeds`` with the prompt in front and extends the per-token inputs (see ``inputs``); the tokens
  are embedded as the model's own input-embedding module embeds them (see ``embedding``). A decoder
  ``*ForSequenceClassification`` also gets a forward hook on its base model that pools the last real token.

``remove(model)`` undoes all of it: same outputs as before ``apply``, bit for bit.

Caveats: attention-probability dropout is not applied on the prefix path; sliding-window layers keep their
window over the real keys while the prefix stays visible to every query; packed sequences (padding-free batches)
reach the attention packed (see ``packing``); static caches and chunked attention are rejected with a clear error;
reentrant gradient checkpointing is rejected
for prefix methods (the default non-reentrant one works); APT's ``gate="pooled"`` on causal attention pools
each position over the real tokens up to it (decoding keeps the running sum and count on the KV cache).
"""

from __future__ import annotations

import contextlib
import inspect

from .. import ops
from ..config import ADePTConfig, APTConfig, DePTConfig, PromptTuningConfig, PTuningV2Config
from ..modules import AdaptiveDecomposedPrompt, AdaptivePrefix, DecomposedPrompt, PromptTuning, PTuningV2Prefix
from .context import NAME
from .embedding import InputEmbedding, input_embedding, outer_scale
from .families import family_of, model_shape, task_heads
from .hooks import guard_attention, install_prompt
from .inputs import Rules
from .positions import Shift
from .state import (ATTR, DEFAULT, FOLDED, INACTIVE, STATE, State, check_adapter_name, method_module, release, state_of,
                    unwrap)

__all__ = ["ATTR", "FOLDED", "apply", "build_module", "method_module", "remove", "state_of", "unwrap", "use_backend"]

_PREFIX = (PTuningV2Config,)
_MODULES = [(APTConfig, AdaptivePrefix), (PTuningV2Config, PTuningV2Prefix), (ADePTConfig, AdaptiveDecomposedPrompt),
            (DePTConfig, DecomposedPrompt), (PromptTuningConfig, PromptTuning)]


def build_module(config, shape):
    """The method's trainable module for a model of ``shape`` (a ``families.ModelShape``)."""
    for cfg_cls, mod_cls in _MODULES:
        if type(config) is cfg_cls:
            if isinstance(config, _PREFIX):
                sites = getattr(shape, "prefix_sites", None) or shape.num_layers  # T5: encoder + decoder blocks
                return mod_cls(config, sites, shape.num_kv_heads, shape.head_dim, shape.hidden_size)
            # the prompt lives in the input-embedding space (narrower than hidden_size on ELECTRA, ALBERT)
            return mod_cls(config, getattr(shape, "embedding_size", None) or shape.hidden_size)
    raise ValueError(f"config must be one of {[c.__name__ for c, _ in _MODULES]}, got {type(config).__name__}")


def _switch_attention(state, model):
    """Make every config of the model name the "fastprefix" attention; what they named is kept for remove()."""
    state.attn_implementation = model.config._attn_implementation
    for sub in model.modules():  # submodels may carry their own config
        cfg = getattr(sub, "config", None)
        # a config shared by several modules (T5: a stack's, held by its attention modules) is recorded once
        if (cfg is not None and hasattr(cfg, "_attn_implementation_internal") and cfg is not model.config
                and all(cfg is not seen for seen, _ in state.sub_implementations)):
            state.sub_implementations.append((cfg, cfg._attn_implementation_internal))
            cfg._attn_implementation_internal = NAME
    model.config._attn_implementation_internal = NAME


def _refuses_inputs_embeds(model):
    """Why ``model``'s forward can't take the prompted ``inputs_embeds`` (a phrase), or None if it can.

    Read from the head's forward: encoder-decoder heads that raise for ``inputs_embeds`` (BART's and T5's
    ``*ForSequenceClassification``) or build their decoder input from ``input_ids`` (``T5ForQuestionAnswering``)."""
    if "inputs_embeds" not in inspect.signature(model.forward).parameters:
        return "takes no inputs_embeds"
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return None
    if "input embeddings is currently not supported" in source:
        return "refuses inputs_embeds (its forward raises for them)"
    if getattr(model.config, "is_encoder_decoder", False) and "_shift_right(input_ids)" in source \
            and "decoder_input_ids is None and decoder_inputs_embeds is None" in source:
        return "builds its decoder input from input_ids, which it then does not get"
    return None


def _check_config(config):
    """A fastprefix config instance, or a ValueError that says what to pass instead."""
    if isinstance(config, (PromptTuningConfig, PTuningV2Config)):  # every method's config is one of them
        return
    kinds = ", ".join(c.__name__ for c, _ in _MODULES)
    if isinstance(config, type) and issubclass(config, (PromptTuningConfig, PTuningV2Config)):
        raise ValueError(f"config is the class {config.__name__}, not a config: instantiate it, e.g. "
                         f"fastprefix.{config.__name__}(num_virtual_tokens=16)")
    if isinstance(config, dict):
        raise ValueError("config is a dict: build the config from it with fastprefix.config_from_dict(d) (its "
                         f"'method' key names one of {sorted(m.method for m, _ in _MODULES)}), or pass one of {kinds}")
    if type(config).__module__.split(".")[0] == "peft":
        raise ValueError(f"config is a PEFT {type(config).__name__}: fastprefix.from_peft(model, folder) loads an "
                         f"adapter PEFT saved; to train with fastprefix pass one of its configs ({kinds}), e.g. "
                         "PTuningV2Config(num_virtual_tokens=...) for PEFT's PREFIX_TUNING or "
                         "PromptTuningConfig(num_virtual_tokens=...) for PROMPT_TUNING")
    raise ValueError(f"config must be a fastprefix config ({kinds}), got {type(config).__name__}")


def apply(model, config, *, backend=None, trainable=None, generator=None, adapter_name=DEFAULT):
    """Freeze ``model``, attach ``config``'s method as ``model.fastprefix`` and route the model through it.

    Args:
        model: a 🤗 transformers ``PreTrainedModel``. Prefix methods need an encoder-only or decoder-only
            model whose attention goes through ``AttentionInterface`` (BERT, RoBERTa, Llama, Qwen2, ...);
            prompt methods need an ``nn.Embedding`` input table (also T5).
        config: a ``PromptTuningConfig``, ``PTuningV2Config``, ``APTConfig``, ``DePTConfig`` or ``ADePTConfig``.
        backend: ``None`` (Triton for CUDA tensors), ``"torch"`` or ``"triton"``; see :func:`use_backend`.
        trainable: names of base-model submodules to keep trainable, saved with the adapter. Default (None): the
            task head of a ``*ForSequenceClassification``, ``*ForTokenClassification``, ``*ForQuestionAnswering`` or
            ``*ForMultipleChoice`` model (the modules outside its base model: ``classifier``, ``score``,
            ``qa_outputs``, ...; freshly initialised, so frozen it would train against a random head), as PEFT's
            task types keep them (``modules_to_save``); nothing for other models. ``()`` opts out; a string is one
            name.
        generator: ``torch.Generator`` for the vocabulary init of the prompt (``prompt_init="vocab"``).
        adapter_name: the adapter's name (``"default"``); more adapters join it with ``fastprefix.add_adapter``
            or ``fastprefix.load_adapter(..., adapter_name=...)``.

    Returns:
        ``model`` (modified in place). The module is created on the model's device, in float32.
    """
    _check_config(config)
    check_adapter_name(adapter_name)
    if state_of(model, required=False) is not None or hasattr(model, ATTR):
        raise ValueError(f"fastprefix is already applied to this {type(model).__name__}; "
                         "call fastprefix.remove(model) first")
    ops.check_backend(backend)  # validate the name early
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(f"{type(model).__name__} has parameters on the meta device ({meta[0]}, ... {len(meta)} in all: "
                         "built under init_empty_weights or device='meta'): fastprefix initialises its adapter from "
                         "the model (its device, the vocabulary for prompt_init='vocab'), and a later to_empty() would "
                         "leave the adapter uninitialised. Materialise the model first (to_empty(device=...) and load "
                         "its weights, or from_pretrained), then apply")
    shape = model_shape(model)
    family = family_of(model)
    is_prefix = isinstance(config, _PREFIX)
    layers = family.prefix_layers(model, shape) if is_prefix else None
    shift = (Shift(model, config.num_virtual_tokens)
             if is_prefix and config.prefix_positions == "shift" else None)  # refused here, before any change
    embedding = None if is_prefix else input_embedding(model)
    # prompt methods: a model that scales its embeddings only when it embeds ids itself (probed; refused if unknown)
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    outer = None if is_prefix else outer_scale(model, embedding, enc_dec)
    if not is_prefix:
        why = _refuses_inputs_embeds(model)
        if why:
            raise ValueError(f"prompt methods (PT, DePT, ADePT) give the model its input as inputs_embeds, and "
                             f"{type(model).__name__} {why}; use another head of the same model (e.g. "
                             "*ForConditionalGeneration, or the encoder with a head of your own) or a prefix method "
                             "(PTuningV2Config, APTConfig) where it serves this model")
    trainable = task_heads(model) if trainable is None else (trainable,) if isinstance(trainable, str) else \
        tuple(trainable)
    names = dict(model.named_modules())
    for name in trainable:
        if name not in names or name == "":
            raise ValueError(f"trainable names a submodule the model does not have: {name!r}")

    ref = next(model.parameters())
    module = build_module(config, shape).to(ref.device).train(model.training)
    if embedding is not None and config.prompt_init == "vocab":
        module.init_prompt_from_vocab(embedding.weight, generator=generator)

    state = State(config, module, shape, backend, enc_dec, family, adapter_name)
    state.shift = shift
    state.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    state.trainable = tuple(trainable)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in trainable:
        for p in names[name].parameters():
            p.requires_grad_(True)
    model.add_module(ATTR, module)
    model.__dict__[STATE] = state

    if is_prefix:
        family.register()
        _switch_attention(state, model)
        family.install(state, model, layers)
        guard_attention(state, model)
    else:
        state.embedding = embedding
        state.input_embedding = InputEmbedding(embedding, outer)
        state.inputs = Rules(model, embedding)
        install_prompt(state, model)
    return model


def remove(model):
    """Undo :func:`apply`: hooks, attention implementation, ``model.fastprefix`` (every named adapter),
    requires_grad. Returns ``model``."""
    state = state_of(model)
    model = unwrap(model)
    release(state)
    if state.attn_implementation is not None:
        model.config._attn_implementation_internal = state.attn_implementation
        for cfg, impl in state.sub_implementations:
            cfg._attn_implementation_internal = impl
    delattr(model, ATTR)
    if INACTIVE in model._modules:
        delattr(model, INACTIVE)
    model.__dict__.pop(STATE, None)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    return model


@contextlib.contextmanager
def use_backend(model, backend):
    """Run ``model``'s fastprefix ops on ``backend`` (``"torch"``, ``"triton"`` or None) inside the block."""
    state = state_of(model)
    ops.check_backend(backend)
    before, state.backend = state.backend, backend
    try:
        yield model
    finally:
        state.backend = before
