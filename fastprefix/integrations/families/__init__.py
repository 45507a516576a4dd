"""The registry of model families: which family a 🤗 transformers model belongs to, and its sizes.

:func:`family_of` asks each family in turn (T5, DeBERTa, then every model whose attention goes through
``AttentionInterface``); the family answers where the prefix sites are and how the prefix reaches them (the
:class:`~fastprefix.integrations.families.base.Family` interface). :func:`model_shape` reads the sizes a method's
module is built from. Everything here only reads the model; an unsupported model gets a ValueError naming what is
missing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import deberta, generic, t5
from .base import Family

FAMILIES = (t5.FAMILY, deberta.FAMILY, generic.FAMILY)  # the first that matches; the generic one matches any

__all__ = ["FAMILIES", "Family", "ModelShape", "family_of", "model_shape", "task_heads"]

# the task heads whose modules transformers initialises fresh (PEFT's task types keep them trainable: modules_to_save)
TASK_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")


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


def family_of(model):
    """The :class:`Family` of ``model``."""
    return next(family for family in FAMILIES if family.matches(model))


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
                      width, prefix_sites=family_of(model).prefix_sites(model))


def task_heads(model):
    """The names of a task model's head modules: its direct children outside the base model that hold parameters
    (BERT's ``classifier``, Llama's ``score``, ``qa_outputs``, DeBERTa's ``pooler`` and ``classifier``, DistilBERT's
    ``pre_classifier`` and ``classifier``, BART's ``classification_head``): what the head's output comes from and
    what a fresh task model initialises at random. ``()`` for any other model (a base model, a language model head,
    which is pretrained and often tied to the embeddings)."""
    base = getattr(model, "base_model", model)
    if not type(model).__name__.endswith(TASK_HEADS) or base is model:
        return ()
    return tuple(name for name, child in model.named_children()
                 if child is not base and next(child.parameters(), None) is not None)
