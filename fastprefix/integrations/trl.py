"""TRL's ``SFTTrainer`` for a model with a fastprefix method applied (``pip install trl``).

Prefix methods (P-Tuning v2, APT) train with TRL's own ``SFTTrainer`` as they are. Prompt methods (PT, DePT,
ADePT) put m prompt slots in front of each sequence, so the model's logits are ``[B, m+S, V]``. TRL's default
loss is right as it is (its fused LM head scores the labels the model was given, and fastprefix puts -100 on the
prompt slots), but its paths through the full logits (label smoothing, ``compute_loss_func``, logits returned
for ``compute_metrics``) pair them with TRL's ``[B, S]`` labels and fail on the shapes or misalign.
:class:`SFTTrainer` hands those paths the logits of the S input tokens; nothing else changes.
"""

from __future__ import annotations

try:
    import trl
except ImportError as e:  # an optional dependency: say which
    raise ImportError("fastprefix.integrations.trl needs TRL: pip install trl") from e

from ..config import PTuningV2Config
from .packing import prompt_packing, token_slots
from .state import state_of, unwrap


def _prompt_length(model):
    """m for a model with a prompt method applied, else 0 (prefix methods, other models)."""
    state = state_of(model, required=False)
    if state is None or isinstance(state.config, PTuningV2Config):
        return 0
    return state.num_virtual_tokens


def _input_token_logits(m, slots=None):
    """A forward hook that keeps the input tokens' slots of the output's ``logits``: ``[B, m+S, V] -> [B, S, V]``,
    or, for a padding-free batch (a prompt before every packed sequence), the columns ``slots [B, T]``."""
    def hook(module, args, output):
        logits = getattr(output, "logits", None)  # TRL's fused LM head returns none
        if logits is None or logits.dim() != 3:
            return output
        if slots is None:
            output.logits = logits[:, m:]
        else:
            index = slots.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1])
            output.logits = logits.gather(1, index)
        return output
    return hook


class SFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` that also trains fastprefix's prompt methods (PT, DePT, ADePT) on every TRL loss path;
    any other model (a prefix method, a PEFT model, a plain one) trains exactly as with TRL's.

    With a prompt method the loss is over the prompted sequence (the prompt slots carry -100, so completion-only
    loss keeps only the completion tokens), and whatever TRL computes from the full logits (label smoothing,
    ``compute_loss_func``, the logits handed to ``compute_metrics``) gets the S input tokens' logits, aligned with
    TRL's labels. Padding-free batches (``padding_free=True``, packing with the ``"bfd"`` strategies) get the
    prompt in front of every packed sequence (see ``fastprefix.integrations.packing``).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        m = _prompt_length(model)
        if not m:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        packing = prompt_packing(inputs)  # None unless a padding-free batch
        slots = None if packing is None else token_slots(packing, m)
        handle = unwrap(model).register_forward_hook(_input_token_logits(m, slots))
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            handle.remove()
