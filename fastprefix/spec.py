"""One normalised description of a gated-prefix attention call, and the masks every path builds from it.

:class:`AttentionSpec` is built once, by :func:`fastprefix.gated_prefix_attention` after it validated the
inputs, and handed whole to whichever path runs the call (the reference in :mod:`fastprefix.reference`, the
Triton kernels in ``fastprefix.kernels``): no path re-normalises a mask, a window, a bias or a gate.

Conventions (query t of ``Sq`` sits at absolute position ``t' = t + Sk - Sq``, bottom-right aligned as in
decoding; the L prefix rows are visible to every query):

- ``key_padding_mask`` ``[B, Sk]`` bool, True = real key;
- ``causal``: query t sees keys ``u <= t'``;
- ``window`` ``(left, right)``: query t sees real key u iff ``t' - left <= u <= t' + right``, normalised by
  :func:`effective_window` to the sides that hide some key (-1 for a side that hides none), None when no
  side hides anything beyond ``causal``;
- ``attn_bias`` a 4-dim view broadcastable to ``[B, H, Sq, Sk]``, added to the real keys' logits;
- ``gate`` a 3-dim view broadcastable to ``[B, Sq, L]``, or ``gate_inputs``: APT's token gate
  ``layer_scale * sigmoid(hidden @ weight + bias)``, which each path computes in its own precision;
- ``softcap`` (a float > 0) caps every logit, ``scale`` is resolved (``D ** -0.5`` by default);
- ``cu_seqlens`` int32 ``[n + 1]``: a packed row (``B == 1``, ``Sq == Sk == T``) holding n sequences back to back,
  FlashAttention's cumulative lengths (0 first, T last): query t sees the prefix and the real keys of its own
  sequence only (causally, and within the window, by the positions inside the row, which inside one sequence are
  its own positions shifted by its start). :func:`sequence_ids` and :func:`visible_keys` make that a
  block-diagonal visibility;
- ``prefix_index`` int ``[B]``: the prefix is a table ``[A, Hkv, L, D]`` of A adapters' prefixes and row b takes
  row ``prefix_index[b]``; ``prefix_lengths`` int ``[A]``: adapter a's prefix is its first ``prefix_lengths[a]``
  slots (:meth:`AttentionSpec.prefix_visible`), the later slots hidden like padded keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple, Optional, Tuple

import torch

# the softmax in base 2 (exp2 is the cheap one, on GPUs and CPUs): exp(x) = exp2(x * LOG2E), ln(y) = log2(y) * LN2
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)

PATH_ENV = "FASTPREFIX_ATTENTION"
# how the Triton backend runs a call: by the dispatch rule, the fused kernel, the split path (vendor attention
# over the real keys + a Triton prefix merge) or the concat path (vendor attention over [gated prefix ; keys])
PATHS = ("auto", "fused", "split", "concat")


def default_path() -> str:
    """The Triton backend's path when the call names none: ``FASTPREFIX_ATTENTION`` (read now, never written),
    ``"auto"`` when it is unset or empty."""
    value = os.environ.get(PATH_ENV, "").strip().lower() or "auto"
    if value not in PATHS:
        raise ValueError(f"{PATH_ENV} must be one of {PATHS} (or unset), got {os.environ[PATH_ENV]!r}")
    return value


class GateInputs(NamedTuple):
    """APT's token gate inputs: hidden ``[B, Sq, d]``, weight ``[d, L]``, bias ``[L]``, layer_scale (0-dim)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    layer_scale: torch.Tensor


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionSpec:
    """Everything of one call but q, k, v and the prefix (see the module docstring for each field)."""

    scale: float
    causal: bool = False
    key_padding_mask: Optional[torch.Tensor] = None
    window: Optional[Tuple[int, int]] = None
    attn_bias: Optional[torch.Tensor] = None
    gate: Optional[torch.Tensor] = None
    gate_inputs: Optional[GateInputs] = None
    softcap: Optional[float] = None
    cu_seqlens: Optional[torch.Tensor] = None
    prefix_index: Optional[torch.Tensor] = None
    prefix_lengths: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, q, k, *, gate=None, gate_hidden=None, gate_weight=None, gate_bias=None, layer_scale=None,
              key_padding_mask=None, causal=False, scale=None, attn_bias=None, window=None, softcap=None,
              cu_seqlens=None, prefix_index=None, prefix_lengths=None):
        """The spec of a call with ``q [B, H, Sq, D]`` and ``k [B, Hkv, Sk, D]`` (inputs already validated)."""
        Sq, D = q.shape[-2:]
        Sk = k.shape[-2]
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask != 0
        inputs = None if gate_hidden is None else GateInputs(gate_hidden, gate_weight, gate_bias, layer_scale)
        return cls(scale=float(D ** -0.5 if scale is None else scale), causal=bool(causal),
                   key_padding_mask=key_padding_mask, window=effective_window(window, bool(causal), Sq, Sk),
                   attn_bias=bias4(attn_bias), gate=None if gate is None else gate3(gate), gate_inputs=inputs,
                   softcap=None if softcap is None else float(softcap), cu_seqlens=cu_seqlens,
                   prefix_index=prefix_index, prefix_lengths=prefix_lengths)

    def prefix_visible(self, L: int) -> Optional[torch.Tensor]:
        """``[B, L]`` bool, True where row b's adapter has prefix slot j (``prefix_lengths``), or None when every
        slot is visible."""
        if self.prefix_lengths is None:
            return None
        lengths = self.prefix_lengths.index_select(0, self.prefix_index)
        return torch.arange(L, device=lengths.device) < lengths[:, None]

    def row_prefixes(self, prefix_k, prefix_v):
        """The prefixes each batch row attends over: with per-row adapters the table's rows ``prefix_index`` picks,
        ``[B, Hkv, L, D]`` (a copy), else the two as given."""
        if self.prefix_index is None:
            return prefix_k, prefix_v
        return prefix_k.index_select(0, self.prefix_index), prefix_v.index_select(0, self.prefix_index)

    @property
    def gate_rows(self) -> Optional[int]:
        """How many gate rows the queries have: None without a gate, 1 when one row serves every query (a pooled
        ``[B|1, 1, L]`` gate, or a single query), else the query count (APT's token gate)."""
        if self.gate is not None:
            return self.gate.shape[1]
        if self.gate_inputs is not None:
            return self.gate_inputs.hidden.shape[1]
        return None

    @property
    def has_features(self) -> bool:
        """A bias, a window that hides a key, or a softcap: what the plain P-Tuning v2 / APT call has none of."""
        return self.attn_bias is not None or self.window is not None or self.softcap is not None

    def replace(self, **changes) -> "AttentionSpec":
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------- normalisers


def gate3(gate):
    """A gate broadcastable to ``[B, Sq, L]`` (at most 3 dims) as a 3-dim view ``[B|1, Sq|1, L|1]``."""
    return gate.reshape((1,) * (3 - gate.dim()) + tuple(gate.shape))


def bias4(attn_bias):
    """A bias broadcastable to ``[B, H, Sq, Sk]`` (at most 4 dims) as a 4-dim view (None stays None)."""
    if attn_bias is None:
        return None
    return attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))


def effective_window(window, causal: bool, Sq: int, Sk: int) -> Optional[Tuple[int, int]]:
    """``window = (left, right)`` reduced to what it hides beyond ``causal``: ``(left, right)`` with -1 for
    a side that hides nothing, or None when no side hides a key.

    With ``t' = t + Sk - Sq`` in ``[Sk - Sq, Sk - 1]``: the left side hides a key iff some
    ``u < t' - left``, i.e. ``left < Sk - 1``; the right side iff some ``u > t' + right``, i.e.
    ``right < Sq - 1``, and never under ``causal`` (``u <= t'`` already)."""
    if window is None:
        return None
    left, right = (int(w) for w in window)
    if left < 0 or left >= Sk - 1:
        left = -1
    if right < 0 or right >= Sq - 1 or causal:
        right = -1
    return None if left == -1 and right == -1 else (left, right)


# ------------------------------------------------------------------------------------------------- masks


def sequence_ids(cu_seqlens, T: int):
    """Each token's sequence in a packed row: int64 ``[T]`` from the cumulative lengths ``cu_seqlens [n + 1]``
    (``searchsorted``: no shape that depends on the values, so it also traces on fake tensors)."""
    tokens = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)


def visible_keys(key_padding_mask, causal: bool, window, Sq: int, Sk: int, device, cu_seqlens=None):
    """``[B|1, 1, Sq, Sk]`` bool, True = query t sees real key u (padding, bottom-right causal and ``window``,
    an :func:`effective_window` pair, and with ``cu_seqlens`` (a packed row, ``Sq == Sk``) the key's sequence
    being the query's); None when every key is visible.

    Built from the diagonals of the ``[Sq, Sk]`` band (``tril(d)`` keeps ``u - t <= d``, ``triu(d)`` keeps
    ``u - t >= d``), views of the padding mask and :func:`sequence_ids`: no index tensors, so it also traces on
    fake CUDA tensors. In a packed row the band's positions are the row's; inside one sequence they differ from
    the sequence's own by its start on both sides, so the band is each sequence's own."""
    visible = None
    if cu_seqlens is not None:
        ids = sequence_ids(cu_seqlens, Sk)
        visible = (ids[:Sq, None] == ids[None, :]).view(1, 1, Sq, Sk)
    if key_padding_mask is not None:
        padding = key_padding_mask.unsqueeze(1).unsqueeze(1)  # [B, 1, 1, Sk]
        visible = padding if visible is None else visible & padding
    left, right = window if window is not None else (-1, -1)
    if causal or window is not None:
        band = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
        if causal:
            band = band.tril(Sk - Sq)  # u <= t'
        if right >= 0:
            band = band.tril(Sk - Sq + right)  # u <= t' + right
        if left >= 0:
            band = band.triu(Sk - Sq - left)  # u >= t' - left
        visible = band.view(1, 1, Sq, Sk) if visible is None else visible & band
    return visible


def additive_mask(Sq: int, Sk: int, dtype, device, key_padding_mask=None, causal: bool = False, window=None,
                  attn_bias=None, align: int = 1):
    """The additive mask ``[Bm, Hm, Sq, Sk]`` over the real keys, or None when nothing masks or biases them.

    ``attn_bias`` (4-dim, clamped below at the dtype's lowest finite value so that a -inf entry cannot
    turn a row into NaN) where a key is visible, the lowest finite value where it is hidden (padding,
    ``causal`` if asked to put it in the mask, ``window``). Not -inf: a query that sees no real key then
    gets a log-sum-exp near that value, so the real keys' share of the merged softmax underflows to
    exactly 0, forward and backward, and nothing is NaN. ``Bm``, ``Hm`` are 1 unless the bias or the
    padding mask has those dims. Rows live in a buffer of ``ceil(Sk / align) * align`` columns (the
    memory-efficient op's stride alignment); the result is that buffer sliced to Sk.
    """
    bias = bias4(attn_bias)
    visible = visible_keys(key_padding_mask, causal, window, Sq, Sk, device)
    if bias is None and visible is None:
        return None
    Bm = max(bias.shape[0] if bias is not None else 1, visible.shape[0] if visible is not None else 1)
    lowest = torch.finfo(dtype).min
    # out-of-place ops only (where, clamp, pad): they also trace on fake CUDA tensors without a GPU
    if bias is None:
        mask = torch.zeros(Bm, 1, Sq, Sk, dtype=dtype, device=device)
    else:
        mask = bias.to(dtype).expand(Bm, bias.shape[1], Sq, Sk).clamp(min=lowest)  # a new tensor
    if visible is not None:
        mask = torch.where(visible, mask, lowest)
    if Sk % align:
        mask = torch.nn.functional.pad(mask, (0, align - Sk % align)).narrow(-1, 0, Sk)
    return mask


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator dtype of a float input: float64 for float64 (gradcheck), float32 otherwise (half included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# PyTorch's fused CPU attention that also returns the log-sum-exp (private, but stable since torch 2.2)
HAS_CPU_OP = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def no_real_key_below(dtype: torch.dtype) -> float:
    """The real keys' log-sum-exp at or below which PyTorch's fused CPU attention has seen no real key in a row:
    half the lowest finite value of q's ``dtype``. :func:`additive_mask` hides a key with its dtype's lowest value
    (q's, or a wider bias's), so such a row's log-sum-exp is about that value; no row with a real key gets near it."""
    return torch.finfo(dtype).min / 2


def cpu_op_mask_dtype(q, attn_bias):
    """The mask dtype of PyTorch's fused CPU attention: the bias's promoted with q's (a float32 bias stays float32
    on fp16 / bf16 queries, no rounding). Not a float32 mask on float64 queries: torch 2.13's CPU op reads such a
    mask wrongly (errors of order 1 at Sk = 9), so it is widened to float64, which is exact."""
    return q.dtype if attn_bias is None else torch.promote_types(attn_bias.dtype, q.dtype)


def cpu_op_mask(q, Sk: int, key_padding_mask, causal: bool, window, attn_bias=None):
    """``(additive mask or None, is_causal)`` for PyTorch's fused CPU attention over the real keys. Its own causal
    mask is top-left aligned, the same as ours only when ``Sq == Sk``, and used only when nothing else needs a
    mask (see :func:`additive_mask` for why a hidden key gets the lowest finite value, not -inf)."""
    Sq = q.shape[-2]
    if key_padding_mask is None and attn_bias is None and window is None and (not causal or Sq == Sk):
        return None, causal
    return additive_mask(Sq, Sk, cpu_op_mask_dtype(q, attn_bias), q.device, key_padding_mask, causal, window,
                         attn_bias), False
