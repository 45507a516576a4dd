"""Serving a prompt-method model on an inference engine: :func:`prompt_embeds`.

An engine that takes prompt embeddings (vLLM's ``prompt_embeds``, or a 🤗 model's own ``inputs_embeds``) can
serve PT, DePT and ADePT with the plain base model: the whole method lives in the input embeddings, so
fastprefix computes them (``[prompt ; the method's token embeddings]``, exactly what the applied model feeds
its own forward) and the engine runs the unmodified model on them.

Prefix methods (P-Tuning v2, APT) put keys and values into every layer's attention; no engine input carries
that today, so they are served through the applied model's ``generate``.
"""

from __future__ import annotations

import torch

from .config import PTuningV2Config
from .integrations.named import known
from .integrations.state import state_of


def prompt_embeds(model, input_ids, attention_mask=None, *, adapter_name=None):
    """The input embeddings of each sequence, prompt included, for an engine's prompt-embeddings input.

    Args:
        model: a model with a prompt method applied (``PromptTuningConfig``, ``DePTConfig``, ``ADePTConfig``;
            ADePT folded by :func:`fastprefix.merge` or not).
        input_ids: ``[B, S]`` integer token ids, on the model's device.
        attention_mask: optional ``[B, S]`` 0/1 padding mask (left or right padding); None: every token is real.
        adapter_name: which of the model's adapters (None: the active one), so an engine can serve each. The
            active adapter is not switched (calls for several adapters may run side by side).

    Returns:
        A list of B tensors, row b ``[m + S_b, d]`` with ``S_b`` the real tokens of row b (padding dropped):
        the m prompt rows, then the method's embedding of each real token, in the model's dtype, without
        gradient. They are what the applied model gives its forward as ``inputs_embeds`` for that sequence:
        fed to the *base* model's ``inputs_embeds`` (numbering positions ``0 .. m + S_b - 1``, as an engine
        does) they give the applied model's outputs. A model that scales its token embeddings (Gemma's
        ``sqrt(d)``) scales them in its embedding module, so the tokens come scaled and the prompt does not, as
        in the applied model (🤗 transformers' and vLLM's Gemma take ``inputs_embeds`` so). Computed in
        inference mode (ADePT's dropout off) whatever the model's mode; for an encoder-decoder (T5) they are
        the encoder's input.

    Raises:
        ValueError: for a prefix method (P-Tuning v2, APT: per-layer prefixes, no engine input carries them;
            serve through ``generate``), a model without fastprefix, or bad ``input_ids`` / ``attention_mask``.
    """
    state = state_of(model)
    name = state.active if adapter_name is None else adapter_name
    known(state, name)
    config, module = state.adapters[name]
    return _prompt_embeds(state, config, module, input_ids, attention_mask)


def _prompt_embeds(state, config, module, input_ids, attention_mask):
    if isinstance(config, PTuningV2Config):
        raise ValueError(
            f"prompt_embeds: {config.method!r} is a prefix method: it adds keys and values to every layer's "
            "attention, which no inference engine's prompt-embeddings input can carry today. Serve it through the "
            "applied model's generate() (the prefix is applied at every decoding step)")
    ids, mask = _checked(state, input_ids, attention_mask)
    m = module.num_virtual_tokens
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()  # serving is inference: no ADePT dropout
    try:
        # autocast off: the rows come in the table's (the model's) dtype, as the engine's embedding would give them
        with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
            embeds = state.embed(ids, mask, module)
    finally:
        for sub, training in modes.items():
            sub.training = training
    if mask is None:
        return [row for row in embeds]
    real = mask.bool()
    return [torch.cat([embeds[b, :m], embeds[b, m:][real[b]]]) for b in range(embeds.shape[0])]


def _checked(state, input_ids, attention_mask):
    """``input_ids [B, S]`` on the embedding's device, and the mask as long 0/1 (None kept), or ValueError."""
    device = state.embedding.weight.device
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
            or input_ids.is_complex() or input_ids.dtype == torch.bool:
        got = f"{list(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else \
            type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor of shape [B, S], got {got}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have B >= 1 and S >= 1, got shape {list(input_ids.shape)}")
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model's embedding is on {device}")
    if attention_mask is None:
        return input_ids.long(), None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have input_ids' shape {list(input_ids.shape)}, got {got}")
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but the model's embedding is on {device}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    mask = attention_mask.long()
    count = mask.sum(-1)
    if bool((count == 0).any()):
        raise ValueError(f"attention_mask rows {(count == 0).nonzero().flatten().tolist()} have no real token")
    # one run of real tokens per row (left or right padding): more than one 0->1 step means padding in between
    starts = (mask[:, 1:] > mask[:, :-1]).sum(-1) + mask[:, 0]
    if bool((starts > 1).any()):
        raise ValueError(f"attention_mask rows {(starts > 1).nonzero().flatten().tolist()} have padding between real "
                         "tokens; only left- or right-padded rows are supported")
    return input_ids.long(), mask
