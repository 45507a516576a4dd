"""The ``"fastprefix"`` attention and mask functions registered with 🤗 transformers.

transformers builds a mask only for implementations registered with ``AttentionMaskInterface``: an
attention function registered alone silently receives ``attention_mask=None`` and padded batches go
wrong. So both are registered under one name. The mask function hands the layers the 2D key padding
mask ``[B, Sk]`` (True = real key) and rejects patterns the fused attention can't express (sliding
windows, packed sequences, static caches); the attention function reads the layer's prefix (and APT
gate inputs) from the state :func:`fastprefix.apply` attached to the attention module and calls
:func:`fastprefix.gated_prefix_attention`, where causality is bottom-right aligned as in decoding and
the prefix is visible to every query.
"""

from __future__ import annotations

import torch

from .. import ops

NAME = "fastprefix"


def fastprefix_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask=None, **kwargs):
    """Mask interface: return the key padding mask ``[B, kv_length]`` (bool, True = real key) or None."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, prepare_padding_mask

    if mask_function not in (None, causal_mask_function, bidirectional_mask_function):
        raise NotImplementedError(
            "fastprefix's attention supports plain causal or bidirectional masks with padding; this model asked for "
            f"{getattr(mask_function, '__name__', mask_function)!r} (sliding window, chunked, packed sequences or a "
            "custom overlay). Pass an attention_mask instead of packed position_ids, or disable sliding windows.")
    if mask_function is causal_mask_function and int(q_offset) + q_length != int(kv_offset) + kv_length:
        raise NotImplementedError(
            f"fastprefix aligns causal masks bottom-right (queries are the last {q_length} of {kv_length} keys); this "
            f"cache gives queries at offset {int(q_offset)} of {int(kv_offset) + kv_length} slots. Use the default "
            "DynamicCache, not a static or sliding cache.")
    mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if mask is None:
        return None
    return mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)


def fastprefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention interface: ``[B, H, Sq, D]`` queries over ``[prefix ; keys]`` -> ``([B, Sq, H, D], None)``.

    Attention-probability dropout is not applied (the fused kernel has none; PEFT-style prefix tuning
    of a frozen model is normally run with it off).
    """
    state = getattr(module, "_fastprefix_state", None)
    if state is None:
        raise RuntimeError(f"{type(module).__name__} runs the 'fastprefix' attention but was not set up by "
                           "fastprefix.apply; apply the method to the whole model")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("fastprefix's attention does not support sliding-window layers")
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        raise ValueError(f"the 'fastprefix' attention expects the 2D boolean key padding mask its mask function "
                         f"builds, got {attention_mask.dtype} {list(attention_mask.shape)}; do not pass 4D masks")
    i = module._fastprefix_layer
    prefix_k, prefix_v = state.layer_prefix(i, query.dtype)
    causal = bool(kwargs.get("is_causal", module.is_causal))
    gate = {}
    if state.gated:
        # kept in training: transformers runs module hooks outside the gradient checkpoint, so the backward
        # recompute of this layer finds its input here, not from a fresh pre-hook (checkpointing needs training mode)
        hidden = state.hidden.get(i) if module.training else state.hidden.pop(i, None)
        if hidden is None:
            raise RuntimeError(f"APT: no hidden states were recorded for layer {i}; the layer's forward pre-hook "
                               "did not run (call the model, not its attention modules)")
        query_mask = None if attention_mask is None else attention_mask[:, -query.shape[2]:]
        gate = state.module.gate_kwargs(i, hidden, query_mask)
        if state.record_gates:
            state.record(i, hidden, query_mask)
    out = ops.gated_prefix_attention(query, key, value, prefix_k, prefix_v, key_padding_mask=attention_mask,
                                     causal=causal, scale=scaling, backend=state.backend, **gate)
    return out.transpose(1, 2).contiguous(), None


def register():
    """Register the pair under ``"fastprefix"`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, fastprefix_attention)
    AttentionMaskInterface.register(NAME, fastprefix_mask)
