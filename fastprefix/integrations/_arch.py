"""Find what fastprefix needs inside a 🤗 transformers model: sizes, the layer list, each layer's self-attention.

Everything here only reads the model. An unsupported model gets a ValueError naming what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import _deberta, _seq2seq


@dataclass
class ModelShape:
    """The sizes a method's module is built from, and the fingerprint an adapter is checked against."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    embedding_size: int | None = None  # width of the input embedding (ELECTRA, ALBERT: below hidden_size)
    # prefix methods: attention sites with a prefix where that is not num_layers (T5: encoder + decoder blocks)
    prefix_sites: int | None = None

    def to_dict(self):
        return dict(self.__dict__)


def _pretrained(model):
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ValueError("fastprefix.apply needs 🤗 transformers installed") from e
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"fastprefix.apply needs a 🤗 transformers PreTrainedModel, got {type(model).__name__}")


def _first(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def input_embedding(model):
    """The model's input-embedding module (an ``nn.Embedding``, possibly with its own forward: Gemma's scaled one).

    The prompt methods take X from this module as the model does (see ``_embedding``); the prompt has its width.
    """
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no nn.Embedding input table (get_input_embeddings() "
                         f"returned {type(emb).__name__}); prompt methods need one")
    return emb


def model_shape(model):
    """Read the sizes from the model's config; missing ones are a ValueError naming the config field."""
    _pretrained(model)
    cfg = model.config
    hidden = _first(cfg, "hidden_size", "d_model", "n_embd")
    layers = _first(cfg, "num_hidden_layers", "num_layers", "n_layer")
    heads = _first(cfg, "num_attention_heads", "num_heads", "n_head")
    missing = [n for n, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads)) if v is None]
    if missing:
        raise ValueError(f"{type(model).__name__}'s config has no {', '.join(missing)}; "
                         "fastprefix cannot size its modules")
    kv = _first(cfg, "num_key_value_heads") or heads
    head_dim = _first(cfg, "head_dim", "d_kv") or hidden // heads
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = emb.weight.shape[0] if isinstance(emb, nn.Embedding) else (_first(cfg, "vocab_size") or 0)
    width = emb.weight.shape[1] if isinstance(emb, nn.Embedding) else None
    return ModelShape(str(getattr(cfg, "model_type", type(model).__name__)), hidden, layers, heads, kv, head_dim, vocab,
                      width, prefix_sites=_seq2seq.prefix_sites(model))


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
    return reasons


def _bypassed_base_model(model, layers_path):
    """The submodule call (``"self.model.decoder"``) by which ``model.forward`` skips its base model, or None.

    The prefix is computed by a forward pre-hook and travels down that call's keyword arguments; a head
    that calls a module *inside* the base model directly (OPT's ``self.model.decoder(...)``) never runs a
    hook on the base model, so :func:`prefix_entry` puts it on the module called.
    """
    import inspect
    import re

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


def prefix_layers(model, shape):
    """``[(layer, self_attention)]`` for every transformer layer, for the prefix methods.

    The model must dispatch attention through transformers' ``AttentionInterface`` (the attention module
    calls ``ALL_ATTENTION_FUNCTIONS``) with full or sliding-window layers (see :func:`_unsupported_attention`),
    be encoder-only or decoder-only (T5: see ``_seq2seq``), and have one ``nn.ModuleList`` of
    ``num_hidden_layers`` layers each holding exactly one self-attention module (the module with transformers'
    ``is_causal`` attribute, the one that calls the attention function).
    """
    _pretrained(model)
    cfg = model.config
    name = type(model).__name__
    if _seq2seq.family(model) is not None:  # T5, mT5, UMT5: every self-attention, encoder and decoder
        return _seq2seq.prefix_layers(model)
    if _deberta.is_deberta(model):  # DeBERTa v1/v2/v3: its own disentangled attention, not AttentionInterface
        return _deberta.prefix_layers(model, shape)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"prefix methods (P-Tuning v2, APT) are not supported on the encoder-decoder {name} "
                         f"({getattr(cfg, 'model_type', '?')}): of the encoder-decoders they serve only "
                         f"{', '.join(_seq2seq.FAMILIES.values())}; use a prompt method (PromptTuningConfig, "
                         "DePTConfig, ADePTConfig)")
    if getattr(cfg, "add_cross_attention", False):
        raise ValueError(f"prefix methods do not support {name} with cross-attention (config.add_cross_attention)")
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
            raise ValueError(f"layer {i} of {name} ({type(layer).__name__}) has {len(attn)} self-attention modules "
                             "that call transformers' attention function (modules with an `is_causal` attribute); "
                             "fastprefix can add a prefix to exactly one per layer")
        found.append((layer, attn[0]))
    return found


def prefix_entry(model, layers):
    """The module whose forward pre-hook computes the prefix for each call: ``model.base_model``, or the module
    inside it that ``model.forward`` calls directly (OPT's ``*ForCausalLM`` calls ``self.model.decoder``).

    ``layers``: :func:`prefix_layers`' answer. The module found holds the layer list, so every layer runs inside
    its call, and it is the one the model's own forward enters: a head that bypasses the base model still runs
    the hook, and a head that goes through the base model reaches the same module.
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
