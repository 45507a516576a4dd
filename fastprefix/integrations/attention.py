"""The ``"fastprefix"`` attention and mask functions registered with 🤗 transformers.

transformers builds a mask only for implementations registered with ``AttentionMaskInterface``: an
attention function registered alone silently receives ``attention_mask=None`` and padded batches go
wrong. So both are registered under one name. The mask function hands the layers the 2D key padding
mask ``[B, Sk]`` (True = real key) after checking that the pattern transformers asks for is one the fused
attention expresses: causal or bidirectional, with or without a sliding window (recognised structurally,
see ``masks.mask_pattern``); chunked attention, custom overlays and static caches are rejected. The attention
function calls :func:`fastprefix.gated_prefix_attention`, where causality and windows are bottom-right
aligned as in decoding and the prefix is visible to every query. A sliding-window layer's window comes from
the ``sliding_window`` keyword argument the layer hands its attention function (as transformers' flash
attention reads it), its soft-capping from ``softcap`` (Gemma 2's ``attn_logit_softcapping``).

Each call's prefixes (and APT's gate inputs) come in the call's ``context.ForwardContext``, which the forward
pre-hooks put in the keyword arguments transformers hands down to the attention function (see ``context``).
An attention module without a prefix site (T5's cross-attention) is computed by the model's family
(``Family.plain_attention``), as the base model computes it. With ``output_attentions`` the maps are
:func:`fastprefix.reference.attention.attention_probs` of the call.
"""

from __future__ import annotations

import torch

from .. import ops
from ..modules import PTuningV2Prefix
from ..reference.attention import attention_probs, gate_of
from ..spec import AttentionSpec
from .context import KWARG, MIXED_DISABLED, NAME, ForwardContext
from .gates import layer_gate, packed_gate
from .masks import layer_window, mask_pattern
from .packing import PACKED, packed_mask, padding_free
from .state import CAUSAL, LAYER, STATE


@packed_mask  # packed sequences: transformers' overlay becomes the [B, T] sequence ids (see packing)
def fastprefix_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask=None, **kwargs):
    """Mask interface: return the key padding mask ``[B, kv_length]`` (bool, True = real key) or None.

    Causality and the window are not in the returned mask: the attention function applies them from the layer's
    ``is_causal`` and ``sliding_window``. This only checks that the pattern asked for is one of those
    (``masks.mask_pattern``) and that the queries are the last ``q_length`` of the keys, which a sliding-window
    cache that dropped its oldest keys (``DynamicSlidingWindowLayer``) keeps: its keys start at ``kv_offset``
    and the window is measured between slots of that same key tensor.
    """
    from transformers.masking_utils import prepare_padding_mask

    pattern = mask_pattern(mask_function)
    if pattern is None:
        raise NotImplementedError(
            "fastprefix's attention supports causal or bidirectional masks, with or without a sliding window, with "
            f"padding; this model asked for {getattr(mask_function, '__qualname__', mask_function)!r} (chunked "
            "attention or a custom overlay, e.g. bidirectional image tokens); use a prompt method "
            "(PromptTuningConfig, DePTConfig, ADePTConfig)")
    causal, window = pattern
    if (causal or window is not None) and int(q_offset) + q_length != int(kv_offset) + kv_length:
        raise NotImplementedError(
            f"fastprefix aligns causal and windowed masks bottom-right (queries are the last {q_length} of "
            f"{kv_length} keys); this cache gives queries at offset {int(q_offset)} of keys {int(kv_offset)} to "
            f"{int(kv_offset) + kv_length}. Use the default DynamicCache, not a static cache")
    mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if mask is None:
        return None
    return mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)


@padding_free  # packed sequences run as one packed row with their cu_seqlens (see packing)
def fastprefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention interface: ``[B, H, Sq, D]`` queries over ``[prefix ; keys]`` -> ``([B, Sq, H, D], weights)``.

    ``weights`` is None, or with ``output_attentions`` each query's probabilities over ``[prefix ; keys]``,
    ``[B, H, Sq, L + Sk]``. Everything is computed in the query's dtype (under ``torch.autocast`` the autocast
    dtype; the float32 parameters are cast, their gradients stay float32). Attention-probability dropout is
    not applied (the fused kernel has none; PEFT-style prefix tuning of a frozen model is normally run with it off).
    """
    state = getattr(module, STATE, None)
    if state is None:
        raise RuntimeError(f"{type(module).__name__} runs the 'fastprefix' attention but was not set up by "
                           "fastprefix.apply; apply the method to the whole model")
    ctx = kwargs.get(KWARG)
    if not isinstance(ctx, ForwardContext):
        raise RuntimeError(f"{type(module).__name__} got no fastprefix context: call the model, not its layers or "
                           f"attention modules (the base model's forward pre-hook passes it down as {KWARG!r}); or, "
                           f"if this is a backward: the forward ran inside fastprefix.disabled(model) and this "
                           f"recompute outside it: {MIXED_DISABLED}")
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        raise ValueError(f"the 'fastprefix' attention expects the 2D boolean key padding mask its mask function "
                         f"builds, got {attention_mask.dtype} {list(attention_mask.shape)}; do not pass 4D masks")
    i = getattr(module, LAYER, None)
    if i is None:  # an attention without a prefix (T5's cross-attention): as the base model computes it
        return state.family.plain_attention(module, query, key, value, attention_mask, scaling, dropout,
                                            kwargs.get("position_bias"), ctx.output_attentions)
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # attention is an autocast op (SDPA runs in the autocast dtype); rotary embeddings can hand over float32
        # queries and keys (Llama), and the fused ops want every input in one dtype
        dt = torch.get_autocast_dtype(device)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    dt = query.dtype
    rows = ctx.rows
    per_row = {} if rows is None else dict(prefix_index=rows.index, prefix_lengths=rows.lengths)
    prefix_k, prefix_v = (x.to(dt) for x in (PTuningV2Prefix if rows is None else rows).layer(ctx.prefixes, i))
    causal = getattr(module, CAUSAL, None)  # the family's word where it knows better than the module (T5)
    causal = bool(kwargs.get("is_causal", module.is_causal)) if causal is None else causal
    window = layer_window(kwargs.get("sliding_window"), causal)
    softcap = kwargs.get("softcap")  # Gemma 2's attn_logit_softcapping: caps the prefix logits too
    packing = kwargs.get(PACKED)  # a packed call: one row [1, B * T] and its sequences (see packing)
    cu_seqlens = None if packing is None else packing.cu_seqlens
    query_mask = None if attention_mask is None else attention_mask[:, -query.shape[2]:]
    gate = {}
    if state.gated:
        gate = (layer_gate(ctx, module, i, query_mask, causal, key) if packing is None
                else packed_gate(ctx, module, i, packing, causal, key))
    bias = kwargs.get("position_bias")  # T5's relative position bias [1, H, Sq, Sk]: the real keys' only
    if bias is not None and bias.dtype not in (dt, torch.float32):
        bias = bias.to(dt)
    out = ops.gated_prefix_attention(query, key, value, prefix_k, prefix_v, key_padding_mask=attention_mask,
                                     causal=causal, scale=scaling, attn_bias=bias, window=window, softcap=softcap,
                                     cu_seqlens=cu_seqlens, backend=ctx.backend, **gate, **per_row)
    weights = None
    if ctx.output_attentions:
        spec = AttentionSpec.build(query, key, key_padding_mask=attention_mask, causal=causal, scale=scaling,
                                   attn_bias=bias, window=window, softcap=softcap, cu_seqlens=cu_seqlens, **gate,
                                   **per_row)
        rows_prefix = prefix_k if rows is None else prefix_k.index_select(0, rows.index)
        weights = attention_probs(query, key, rows_prefix, spec, gate_of(spec))
    return out.transpose(1, 2).contiguous(), weights


def register():
    """Register the pair under ``"fastprefix"`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, fastprefix_attention)
    AttentionMaskInterface.register(NAME, fastprefix_mask)
