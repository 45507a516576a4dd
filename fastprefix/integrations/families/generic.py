"""Every model whose attention goes through 🤗 transformers' ``AttentionInterface`` (BERT, RoBERTa, Llama, Qwen2,
Mistral, Gemma, GPT-2, OPT, ModernBERT, ...): the prefix sites are the self-attentions of the one layer list.

Everything here only reads the model. An unsupported model gets a ValueError naming what is missing.
"""

from __future__ import annotations

import inspect
import re

from torch import nn

from ..hooks import mark_layers, prefix_pre_hook
from ..state import hook
from .base import Family
from .t5 import TITLES as T5_TITLES

_LAYER_TYPES = ("full_attention", "sliding_attention")  # what the "fastprefix" attention expresses


def _unsupported_attention(model):
    """Why the "fastprefix" attention can't express this model's attention: a list of reasons, empty if it can.

    The fused attention computes causal or bidirectional softmax attention over ``[prefix ; keys]`` with a
    padding mask, a sliding window over the real keys (the prefix stays visible to every query) and logit
    soft-capping (Gemma 2): full and sliding-window layers are served. Other layer kinds (chunked, linear,
    compressed attention) and chunked attention are configuration facts, refused at ``apply`` instead of at
    every forward.
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    reasons = []
    kinds = sorted({t for t in (getattr(cfg, "layer_types", None) or ()) if t not in _LAYER_TYPES})
    if kinds:
        reasons.append(f"its config.layer_types has {', '.join(map(repr, kinds))} layers (only full and "
                       "sliding-window attention layers are supported)")
    chunk = getattr(cfg, "attention_chunk_size", None)
    if chunk is not None:
        reasons.append(f"it attends within chunks (config.attention_chunk_size={chunk})")
    if getattr(cfg, "use_bidirectional_attention", False) is True:
        # Gemma 3's bidirectional variant: transformers builds its mask from an or_masks overlay (bidirectional
        # within a window, or over image tokens), a pattern the fused attention does not express
        reasons.append("it attends bidirectionally through a mask overlay (config.use_bidirectional_attention=True)")
    return reasons


def _bypassed_base_model(model, layers_path):
    """The submodule call (``"self.model.decoder"``) by which ``model.forward`` skips its base model, or None.

    The prefix is computed by a forward pre-hook and travels down that call's keyword arguments; a head
    that calls a module *inside* the base model directly (OPT's ``self.model.decoder(...)``) never runs a
    hook on the base model, so :func:`prefix_entry` puts it on the module called.
    """
    prefix = getattr(model, "base_model_prefix", "")
    if model.base_model is model or not prefix or not layers_path.startswith(prefix + "."):
        return None
    inner = layers_path[len(prefix) + 1:].split(".")[0]
    if inner == layers_path.split(".")[-1]:  # the layer list sits directly in the base model
        return None
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return None
    call = f"self.{prefix}.{inner}"
    return call if re.search(re.escape(call) + r"\s*\(", source) else None


def prefix_entry(model, layers):
    """The module whose forward pre-hook computes the prefix for each call: ``model.base_model``, or the module
    inside it that ``model.forward`` calls directly (OPT's ``*ForCausalLM`` calls ``self.model.decoder``).

    ``layers``: :meth:`GenericFamily.prefix_layers`' answer. The module found holds the layer list, so every layer
    runs inside its call, and it is the one the model's own forward enters: a head that bypasses the base model
    still runs the hook, and a head that goes through the base model reaches the same module.
    """
    first = layers[0][0]
    path = next(p for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and any(x is first for x in m))
    call = _bypassed_base_model(model, path)
    if call is None:
        return model.base_model
    entry = model.get_submodule(call[len("self."):])
    if not any(m is first for m in entry.modules()):  # pragma: no cover - the call names an ancestor of the layers
        raise ValueError(f"{type(model).__name__}.forward calls {call}(...), which does not hold its layers")
    return entry


class GenericFamily(Family):
    """Models whose attention modules call transformers' attention function (``ALL_ATTENTION_FUNCTIONS``)."""

    name = "transformers"

    def matches(self, model):
        return True  # the family of last resort: prefix_layers refuses what it cannot serve

    def prefix_layers(self, model, shape):
        """``[(layer, self_attention)]`` for every transformer layer, for the prefix methods.

        The model must dispatch attention through transformers' ``AttentionInterface`` (the attention module
        calls ``ALL_ATTENTION_FUNCTIONS``) with full or sliding-window layers (see :func:`_unsupported_attention`),
        be encoder-only or decoder-only (T5, DeBERTa: their own families), and have one ``nn.ModuleList`` of
        ``num_hidden_layers`` layers each holding exactly one self-attention module (the module with transformers'
        ``is_causal`` attribute, the one that calls the attention function).
        """
        cfg = model.config
        name = type(model).__name__
        if getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(f"prefix methods (P-Tuning v2, APT) are not supported on the encoder-decoder {name} "
                             f"({getattr(cfg, 'model_type', '?')}): of the encoder-decoders they serve only "
                             f"{', '.join(T5_TITLES.values())}; use a prompt method (PromptTuningConfig, "
                             "DePTConfig, ADePTConfig)")
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError(f"prefix methods do not support {name} with cross-attention "
                             "(config.add_cross_attention)")
        if not getattr(model, "_supports_attention_backend", False):
            raise ValueError(f"{name}'s attention is not routed through transformers' AttentionInterface "
                             "(_supports_attention_backend is False), so fastprefix cannot add the prefix to it; "
                             "use a prompt method (PromptTuningConfig, DePTConfig, ADePTConfig)")
        why = _unsupported_attention(model)
        if why:
            raise ValueError(f"prefix methods (P-Tuning v2, APT) are not supported on {name}: {'; '.join(why)}; "
                             "fastprefix's attention (full causal or bidirectional attention over [prefix ; keys]) "
                             "cannot express that; use a prompt method (PromptTuningConfig, DePTConfig, ADePTConfig)")
        lists = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.ModuleList)
                 and len(m) == shape.num_layers and len({type(x) for x in m}) == 1]
        if not lists:
            raise ValueError(f"{name} has no nn.ModuleList of num_hidden_layers={shape.num_layers} identical layers")
        path, layers = lists[0]
        found = []
        for i, layer in enumerate(layers):
            attn = [m for m in layer.modules() if hasattr(m, "is_causal")
                    and not getattr(m, "is_cross_attention", False) and "Cross" not in type(m).__name__]
            if len(attn) != 1:
                raise ValueError(f"layer {i} of {name} ({type(layer).__name__}) has {len(attn)} self-attention "
                                 "modules that call transformers' attention function (modules with an `is_causal` "
                                 "attribute); fastprefix can add a prefix to exactly one per layer")
            found.append((layer, attn[0]))
        return found

    def install(self, state, model, layers):
        """The prefix pre-hook on :func:`prefix_entry`, and the numbered self-attentions (APT: layer hooks)."""
        hook(state, prefix_entry(model, layers), prefix_pre_hook)
        mark_layers(state, layers)


FAMILY = GenericFamily()
