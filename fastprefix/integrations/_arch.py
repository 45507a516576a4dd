"""Find what fastprefix needs inside a 🤗 transformers model: sizes, the layer list, each layer's self-attention.

Everything here only reads the model. An unsupported model gets a ValueError naming what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


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
    """The model's token embedding table (an ``nn.Embedding``)."""
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
    return ModelShape(str(getattr(cfg, "model_type", type(model).__name__)), hidden, layers, heads, kv, head_dim, vocab)


def prefix_layers(model, shape):
    """``[(layer, self_attention)]`` for every transformer layer, for the prefix methods.

    The model must dispatch attention through transformers' ``AttentionInterface`` (the attention module
    calls ``ALL_ATTENTION_FUNCTIONS``), be encoder-only or decoder-only, and have one ``nn.ModuleList`` of
    ``num_hidden_layers`` layers each holding exactly one self-attention module (one with ``is_causal``
    and ``layer_idx`` attributes).
    """
    _pretrained(model)
    cfg = model.config
    name = type(model).__name__
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"prefix methods (P-Tuning v2, APT) are not supported on encoder-decoder models like {name}; "
                         "use a prompt method (PromptTuningConfig, DePTConfig, ADePTConfig)")
    if getattr(cfg, "add_cross_attention", False):
        raise ValueError(f"prefix methods do not support {name} with cross-attention (config.add_cross_attention)")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{name} does not dispatch attention through transformers' AttentionInterface "
                         "(_supports_attention_backend is False), so fastprefix cannot route its attention")
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == shape.num_layers
             and len({type(x) for x in m}) == 1]
    if not lists:
        raise ValueError(f"{name} has no nn.ModuleList of num_hidden_layers={shape.num_layers} identical layers")
    layers = lists[0]
    found = []
    for i, layer in enumerate(layers):
        attn = [m for m in layer.modules() if hasattr(m, "is_causal") and hasattr(m, "layer_idx")
                and not getattr(m, "is_cross_attention", False) and "Cross" not in type(m).__name__]
        if len(attn) != 1:
            raise ValueError(f"layer {i} of {name} ({type(layer).__name__}) has {len(attn)} self-attention modules "
                             "with `is_causal` and `layer_idx` attributes; fastprefix needs exactly one")
        found.append((layer, attn[0]))
    return found
