"""Reference prompt embeddings (PT, DePT, ADePT) in plain PyTorch.

The numerical contract of ``fastprefix.kernels.embedding.fused`` and the CPU path:

    ADePT: X' = X + ReLU((X @ A + a) * dropout_mask) @ B + b,   X = embed_scale * E[ids]
    DePT:  X' = X + scaling * (A[:S] @ B)
    (embed_scale: a model whose embedding module scales the looked-up rows, e.g. Gemma's sqrt(d); default none)
    both:  out = [prompt ; X']   (the prompt rows are the same for every batch row)

Inputs are assumed validated (``fastprefix.ops`` does that once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prepend_prompt(prompt, x):
    """``[prompt ; x]`` per batch row. prompt ``[m, d]`` or None; x ``[B, S, d]`` -> ``[B, m+S, d]``."""
    if prompt is None or prompt.shape[0] == 0:
        return x
    return torch.cat([prompt.unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)


def _lookup(input_ids, weight, embed_scale):
    """``X = embed_scale * E[ids]`` as the model's embedding module computes it (the scale after the gather)."""
    x = F.embedding(input_ids, weight)
    return x if embed_scale is None else x * embed_scale


def adept_embedding(input_ids, weight, prompt, down_weight, down_bias, up_weight, up_bias, *, dropout_mask=None,
                    embed_scale=None):
    """ADePT: embedding lookup, token-shared FFN offset, prompt concatenation.

    Args:
        input_ids: ``[B, S]`` int64; weight: ``[V, d]`` embedding table; prompt: ``[m, d]`` or None.
        down_weight: ``[d, r]``; down_bias: ``[r]``; up_weight: ``[r, d]``; up_bias: ``[d]``.
        dropout_mask: ``[B, S, r]`` already scaled by ``1/(1-p)``, applied before the ReLU.
        embed_scale: None, a number or a 0-dim tensor multiplying the looked-up rows (not the prompt).

    Returns:
        ``[B, m+S, d]``.
    """
    x = _lookup(input_ids, weight, embed_scale)
    flat = x.view(-1, x.shape[-1])
    t = torch.addmm(down_bias, flat, down_weight)  # biases fused into the GEMMs: no extra pass
    if dropout_mask is not None:
        t = t * dropout_mask.reshape(t.shape)
    offset = torch.addmm(up_bias, F.relu(t), up_weight)
    return prepend_prompt(prompt, (offset + flat).view(x.shape))


def dept_embedding(input_ids, weight, prompt, lora_a, lora_b, *, scaling=1.0, embed_scale=None):
    """DePT: embedding lookup plus the position-based low-rank offset, prompt concatenation.

    Args:
        input_ids: ``[B, S]`` int64; weight: ``[V, d]``; prompt: ``[m, d]`` or None.
        lora_a: ``[s, r]`` (row t belongs to position t, ``S <= s``); lora_b: ``[r, d]``.
        scaling: the offset's scale (reference: ``8 / sqrt(r)``).
        embed_scale: None, a number or a 0-dim tensor multiplying the looked-up rows (not the prompt).

    Returns:
        ``[B, m+S, d]``.
    """
    S = input_ids.shape[1]
    # the [S, d] offset is shared by the batch: scaled once, broadcast in the add
    x = _lookup(input_ids, weight, embed_scale)
    return prepend_prompt(prompt, torch.add(x, lora_a[:S] @ lora_b, alpha=scaling))


def prompt_tuning_embedding(input_ids, weight, prompt, *, embed_scale=None):
    """Plain prompt tuning: ``[prompt ; embed_scale * E[ids]]`` -> ``[B, m+S, d]``."""
    return prepend_prompt(prompt, _lookup(input_ids, weight, embed_scale))
