"""What a 🤗 transformers mask asks for, recognised structurally: the patterns fastprefix's attention expresses.

transformers describes a layer's mask by a mask function (``masking_utils``): causal or bidirectional, maybe
narrowed by a sliding-window overlay, maybe split into packed sequences. fastprefix's attention takes the same
patterns as arguments (``causal``, ``window``, a key padding mask, packed sequence ids), so the ``"fastprefix"``
mask function reads them off the mask function's closures, matched by their code objects and never by name: an
unknown structure is refused, not guessed. The model config's sliding window (for the prompt methods' warning) is
read here too.
"""

from __future__ import annotations

import torch


def _closure(fn):
    """``{free variable: value}`` of closure ``fn``."""
    cells = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


def _made_by(fn, factory, *args):
    """``fn`` is a closure made by ``factory`` (it has the code object of ``factory(*args)``), not a look-alike."""
    return getattr(fn, "__code__", None) is factory(*args).__code__ and fn.__closure__ is not None


def _positive_int(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def mask_pattern(mask_function):
    """``(causal, window)`` of a transformers mask function that fastprefix's attention expresses, else None.

    Recognised by structure, never by name: transformers builds a sliding-window mask function as
    ``and_masks(sliding_window_overlay(W), causal_mask_function)`` (visible iff ``q - W < kv <= q``) or
    ``and_masks(sliding_window_bidirectional_overlay(W), bidirectional_mask_function)`` (``|q - kv| <= W``);
    the closures are matched by their code objects and W is read from the overlay's closure. ``window`` is
    ``(left, right)`` as :func:`fastprefix.gated_prefix_attention` takes it, or None. Anything else (chunked
    attention, other overlays) gives None.
    """
    from transformers import masking_utils as mu

    if mask_function is None or mask_function is mu.bidirectional_mask_function:
        return False, None
    if mask_function is mu.causal_mask_function:
        return True, None
    if not _made_by(mask_function, mu.and_masks, mu.causal_mask_function):
        return None
    parts = _closure(mask_function)["mask_functions"]
    if len(parts) != 2:
        return None
    overlay, base = parts
    if base is mu.causal_mask_function and _made_by(overlay, mu.sliding_window_overlay, 1):
        w = _closure(overlay)["sliding_window"]
        return (True, (w - 1, 0)) if _positive_int(w) else None
    if base is mu.bidirectional_mask_function and _made_by(overlay, mu.sliding_window_bidirectional_overlay, 1):
        w = _closure(overlay)["sliding_window"]
        return (False, (w, w)) if _positive_int(w) else None
    return None


def layer_window(sliding_window, causal):
    """The ``window=(left, right)`` of a layer whose attention got ``sliding_window=W`` (None: no window).

    transformers' convention, what its flash-attention path hands FlashAttention (``(W - 1, W - 1)``): a causal
    layer sees its own key and the ``W - 1`` before it (Mistral, Qwen2, Phi-3, Gemma 2/3: visible iff
    ``q - kv < W``, as their masks say), a bidirectional one ``|q - kv| <= W - 1`` (ModernBERT passes its half
    window + 1, its mask ``|q - kv| <= half window``).
    """
    if sliding_window is None:
        return None
    if not _positive_int(sliding_window):
        raise ValueError(f"the attention got sliding_window={sliding_window!r}; expected None or an int >= 1")
    return (sliding_window - 1, 0) if causal else (sliding_window - 1, sliding_window - 1)


def is_segment_ids(mask):
    """The packed signal the ``"fastprefix"`` mask function hands the layers: integer ``[B, T]`` sequence ids."""
    return (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.dtype != torch.bool
            and not mask.is_floating_point() and not mask.is_complex())


def packed_overlay(mask_function):
    """transformers' packed-sequence mask -> ``(ids [B, T], base)``; anything else -> None.

    Two structures: ``and_masks(packed_sequence_mask_function(ids), remap_positions_for_packed_sequence(base,
    position_ids))`` (recent transformers: the base sees each sequence's own positions) and ``and_masks(base,
    packed_sequence_mask_function(ids))`` (transformers 5.17: the base sees the row's positions, which within one
    sequence differ by the same amounts, so causality and windows are the same). Recognised by structure (the
    closures' code objects, as :func:`mask_pattern`): an unknown structure is not taken for packing, and the mask
    function refuses it as any other unsupported mask.
    """
    from transformers import masking_utils as mu

    if not _made_by(mask_function, mu.and_masks, mu.causal_mask_function):
        return None
    parts = tuple(_closure(mask_function).get("mask_functions", ()))
    if len(parts) != 2:
        return None
    dummy = torch.zeros(1, 1, dtype=torch.long)
    packed = mu.packed_sequence_mask_function
    remap = getattr(mu, "remap_positions_for_packed_sequence", None)
    if _made_by(parts[0], packed, dummy) and remap is not None \
            and _made_by(parts[1], remap, mu.causal_mask_function, dummy):
        ids, base = _closure(parts[0]).get("packed_sequence_mask"), _closure(parts[1]).get("mask_function")
    elif _made_by(parts[1], packed, dummy):
        ids, base = _closure(parts[1]).get("packed_sequence_mask"), parts[0]
    else:
        return None
    if not is_segment_ids(ids) or not callable(base):
        return None
    return ids, base


def sliding_window(config):
    """The sliding window W of a model with sliding-window layers (Mistral, Qwen2, Gemma 2/3, ...), else None."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    kinds = set(getattr(cfg, "layer_types", None) or ())
    if not isinstance(window, int) or isinstance(window, bool) or getattr(cfg, "use_sliding_window", True) is False:
        return None
    return window if not kinds or kinds - {"full_attention"} else None
