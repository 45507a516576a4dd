"""PEFT-style conveniences for a model with a method applied: parameter counts and running the base model.

- :func:`print_trainable_parameters` prints PEFT's line, counted as PEFT counts it;
- :func:`disabled` runs the base model without the method inside a ``with`` block and puts it back after.
"""

from __future__ import annotations

import contextlib

from torch import nn

from .integrations import transformers as integration


def trainable_parameters(model):
    """``(trainable, total)`` parameter counts of ``model`` (any ``nn.Module``), as PEFT's
    ``get_nb_trainable_parameters`` counts them: every parameter of ``named_parameters()`` once (tied weights
    once), the method's module included; DeepSpeed ZeRO-3 placeholders by their ``ds_numel``, bitsandbytes
    4-bit weights as the parameters they pack."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for _, param in model.named_parameters():
        n = param.numel()
        if n == 0 and hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3 keeps an empty placeholder on each rank
            n = param.ds_numel
        if type(param).__name__ == "Params4bit":  # two 4-bit values per byte of the packed storage
            if hasattr(param, "element_size"):
                width = param.element_size()
            elif hasattr(param, "quant_storage"):
                width = param.quant_storage.itemsize
            else:
                width = 1
            n = n * 2 * width
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model):
    """Print ``trainable params: N || all params: M || trainable%: P`` exactly as PEFT's
    ``PeftModel.print_trainable_parameters`` does (thousands separators, four decimals)."""
    trainable, total = trainable_parameters(model)
    if total == 0:
        raise ValueError(f"{type(model).__name__} has no parameters to count")
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


@contextlib.contextmanager
def disabled(model):
    """Run the base model without the applied method inside the block; the method is back on exit.

    Inside, every forward (and ``generate``) is the base model's, bit for bit: prompt methods add no prompt,
    prefix methods run the model's original attention implementation (and its mask) with no prefix. The
    method's module stays attached (its parameters, optimizer state and ``requires_grad`` are untouched; it
    gets no gradient from forwards inside the block). The method comes back when the block exits, also
    through an exception; blocks nest (only the outermost switches). Works under ``torch.no_grad`` and in
    training mode alike. Don't copy or pickle the model inside the block (the copy would stay disabled).

    Yields ``model``.
    """
    state = integration.state_of(model)
    inner = integration.unwrap(model)
    outermost = state.disabled == 0
    swapped = []  # (config, its "fastprefix" attention name) to put back on exit
    if outermost and state.attn_implementation is not None:  # prefix methods: the original attention, as remove()
        for cfg, original in [(inner.config, state.attn_implementation), *state.sub_implementations]:
            swapped.append((cfg, cfg._attn_implementation_internal))
            cfg._attn_implementation_internal = original
    state.disabled += 1
    try:
        yield model
    finally:
        state.disabled -= 1
        # a fastprefix.remove inside the block already restored the model for good
        if integration.state_of(model, required=False) is state:
            for cfg, applied in swapped:
                cfg._attn_implementation_internal = applied
