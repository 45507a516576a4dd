"""The vendor's variable-length attention: padded batches and packed rows through FlashAttention-2's varlen ops,
for the split and concat paths, and the same calls emulated on CPU.

What it computes. For queries and keys in token-major memory (``[total, heads, D]``, FlashAttention's varlen
layout) cut into sequences by cumulative lengths, each sequence's attention over its own keys, with the output
``[total_q, H, D]`` and the natural log-sum-exp ``[H, total_q]`` (fp32; +inf for a query that sees no key), and
the backward of that attention (called by the split path with ``w * dO`` and the merged output, as in the dense
split: the gradients are then exact). A :class:`Plan` says how a call's queries and keys become sequences:

- **packed rows** (``cu_seqlens``, one row ``[1, T]``): the row's own sequences; queries and keys are the row's
  tokens as they lie, never re-padded; causal and the window are each sequence's own (bottom-right, and a
  sequence's queries are its keys). :func:`packed_plan`.
- **padded batches** (a key padding mask ``[B, Sk]``): the real keys are gathered once, row by row
  (``plan.keys``), and every query row is kept (the op's contract: a padding mask hides keys only; padded
  queries still attend). Row b's Sq queries are one sequence over its ``n_b`` real keys. Non-causal: exact for any
  padding pattern. Causal: query t (position ``t + Sk - Sq``) sees the real keys at positions ``<= t + Sk - Sq``;
  with the real keys a contiguous run ``[a, a + n)`` that is ``clip(t + m - a + 1, 0, n)`` keys (``m = Sk - Sq``):
  the first ``q_c = clip(n - m + a, 0, Sq)`` queries see a causal (bottom-right) window over the run, the others
  see all of it. When every row is all causal (left padding, or decoding with a cache) one causal call serves
  the batch; when every row is all non-causal, one non-causal call. Otherwise (right padding) two calls over the
  same tensors, each with ``2B`` sequences: call A has row b's first ``q_c`` queries over its keys (causal) and
  its other queries over no key; call B the reverse (non-causal). A query over no key gets output 0 and
  log-sum-exp +inf from FlashAttention, so ``o = o_A + o_B`` and ``lse = min(lse_A, lse_B)`` are exact, and the
  backward is the sum of the two calls' (each with the merged output and that lse: a query of the other group
  touches no key of the call). Real keys that are not one run (holes) under ``causal``: no plan (None).
  :func:`padded_plan`.
- **the concat path** (``prefix_len > 0``): each sequence's keys are ``[prefix ; its real keys]``, so its
  cumulative key lengths grow by L per sequence, and ``plan.order`` places the prefix rows and the real keys'
  rows into that key tensor. FlashAttention's causal mask is bottom-right per sequence, so the prefix stays
  visible to every query of a causal part whose first query sees a real key or the one just before the run
  (``a <= m + 1``); a padded causal row whose run starts later has no plan. :func:`padded_plan`,
  :func:`packed_plan`.

Plans are memoised on the padding mask or the ``cu_seqlens`` tensor (``fastprefix.sequences.memoized``: its
identity and version counter, a weak reference): transformers hands every layer the same mask tensor, so a
forward computes its plan (one host sync: the lengths, the run starts and the longest sequence) at its first
layer and every later layer reuses it, also in a checkpointed recompute.

Based on PyTorch's private ``aten._flash_attention_forward`` / ``_flash_attention_backward`` (its vendored
FlashAttention-2 ``mha_varlen_fwd`` / ``mha_varlen_bwd``) as read in their torch 2.13 sources and meta kernels:
q ``[total_q, H, D]``, k, v ``[total_k, Hkv, D]`` (GQA without expanding K/V; last dim contiguous),
``cum_seq_q`` / ``cum_seq_k`` int32 ``[n + 1]``, ``max_q`` / ``max_k`` ints, ``is_causal`` bottom-right per
sequence, ``window_size_left`` / ``_right`` bottom-right per sequence; the output is ``[total_q, H, D]`` and the
log-sum-exp fp32 ``[H, total_q]`` (the meta kernel's shape); a sequence with no key, and a query whose causal
window holds none, get output 0 and log-sum-exp +inf; a sequence with no query leaves its keys' dk, dv 0. The
CPU emulation (:data:`vendor.CPU_VARLEN`, Triton's interpreter and the tests) runs PyTorch's fused CPU op per
sequence and returns the same layouts and the same empty-row values.

Caveats. FlashAttention-2 only (compute capability 8.x / 9.x, fp16 / bf16, D % 8 == 0, D <= 128; not on ROCm):
no bias, and a window only for packed rows (a padded row's real keys move when unpadded). No dropout: the
backward is given call A's rng state for both calls, which it reads only under dropout. A batch whose every key
is padding has no plan (the other paths serve it).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ...sequences import memoized
from ...spec import HAS_CPU_OP, acc_dtype, cpu_op_mask, effective_window, visible_keys
from . import vendor

_aten = torch.ops.aten
_HAS_FLASH_VARLEN = hasattr(_aten, "_flash_attention_forward") and hasattr(_aten, "_flash_attention_backward")


class Plan(NamedTuple):
    """How one call's queries and keys become varlen sequences (see the module docstring).

    keys: int64 ``[total_k]``, the flat index ``b * Sk + u`` of each real key (padded batches), or None (a
        packed row's keys are its tokens as they lie). cu_q: int32 ``[m + 1]``, the sequences' query offsets.
    cu_k: int32 ``[m + 1]``, their key offsets in call A; cu_k2: call B's (non-causal), or None (one call).
    max_q, max_k: the longest query and key sequence. causal: call A's ``is_causal``.
    order: concat only, int64 ``[total_k]``: row r of the key tensor is row ``order[r]`` of ``[the blocks' prefix
        rows ; the real keys' rows]``; blocks: concat only, the key blocks each led by the prefix (one per batch
        row or packed sequence).
    """

    keys: Optional[torch.Tensor]
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    cu_k2: Optional[torch.Tensor]
    max_q: int
    max_k: int
    causal: bool
    order: Optional[torch.Tensor] = None
    blocks: int = 0

    def calls(self):
        """``[(cu_k, is_causal)]``: call A, and call B where the plan has one."""
        return [(self.cu_k, self.causal)] + ([] if self.cu_k2 is None else [(self.cu_k2, False)])


def choose_op(device_type: str, capability: Optional[int], dtype: torch.dtype, D: int) -> Optional[str]:
    """The varlen op for this call: ``vendor.FLASH_VARLEN`` (CUDA 8.x / 9.x, fp16 / bf16, ``D % 8 == 0``,
    ``D <= 128``, not ROCm), ``vendor.CPU_VARLEN`` on CPU (the emulation), or None."""
    if device_type == "cpu":
        return vendor.CPU_VARLEN if HAS_CPU_OP else None
    if device_type != "cuda" or capability is None or not 80 <= capability < 100 or torch.version.hip is not None:
        return None
    if dtype not in (torch.float16, torch.bfloat16) or D % 8 != 0 or D > 128 or not _HAS_FLASH_VARLEN:
        return None
    return vendor.FLASH_VARLEN


def tokens(x):
    """``[B, h, S, D]`` -> token-major ``[B * S, h, D]`` (a view of ``[B, S, h, D]`` memory, else a copy)."""
    B, h, S, D = x.shape
    return x.transpose(1, 2).reshape(B * S, h, D)


# ------------------------------------------------------------------------------------------------------ plans


def _int32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _order(block_keys, L, device):
    """Concat: row r of the key tensor -> its row of ``[blocks' prefix rows ; real keys' rows]``, int64."""
    blocks = len(block_keys)
    cum, kcum = [0], [0]
    for n in block_keys:
        cum.append(cum[-1] + L + n)
        kcum.append(kcum[-1] + n)
    rows = torch.arange(cum[-1], device=device)
    cu = torch.tensor(cum, device=device)
    blk = torch.searchsorted(cu[1:], rows, right=True)
    pos = rows - cu[blk]
    key_rows = blocks * L + torch.tensor(kcum, device=device)[blk] + pos - L
    return torch.where(pos < L, blk * L + pos, key_rows)


def padded_plan(key_padding_mask, causal: bool, Sq: int, prefix_len: int = 0) -> Optional[Plan]:
    """The :class:`Plan` of a padded batch (``key_padding_mask [B, Sk]`` bool, True = real key; ``Sq`` queries per
    row; ``prefix_len`` L > 0 for the concat path), or None where none is exact (see the module docstring).
    Memoised on the mask tensor."""
    return memoized(key_padding_mask, ("varlen", bool(causal), int(Sq), int(prefix_len)),
                    lambda: _padded_plan(key_padding_mask, bool(causal), int(Sq), int(prefix_len)))


def _padded_plan(mask, causal, Sq, L):
    B, Sk = mask.shape
    m = Sk - Sq
    device = mask.device
    n = mask.sum(1)
    first = mask.to(torch.int32).argmax(1)  # the first real key (0 for an all-padding row)
    cols = torch.arange(Sk, device=device)
    run = (cols >= first[:, None]) & (cols < (first + n)[:, None])
    counts, starts, runs = torch.stack([n, first.to(n.dtype), (run == mask).all(1).to(n.dtype)]).tolist()
    if sum(counts) == 0:
        return None  # no real key anywhere: nothing for the varlen op (the other paths serve it)
    block = [c + L for c in counts]
    cum = [0]
    for c in block:
        cum.append(cum[-1] + c)
    keys = mask.reshape(-1).nonzero().squeeze(1)
    order = _order(counts, L, device) if L else None
    rows = [b * Sq for b in range(B + 1)]
    if not causal:
        return Plan(keys, _int32(rows, device), _int32(cum, device), None, Sq, max(block), False, order, B * (L > 0))
    q_c = []
    for c, a, ok in zip(counts, starts, runs):
        if c == 0:
            q_c.append(0)  # an all-padding row: every query sees the prefix alone
            continue
        if not ok or (L and a > m + 1):
            return None
        q_c.append(min(Sq, max(0, c - m + a)))
    blocks = B if L else 0
    if all(c == Sq for c in q_c) or all(c == 0 for c in q_c):
        return Plan(keys, _int32(rows, device), _int32(cum, device), None, Sq, max(block), q_c[0] == Sq, order, blocks)
    cu_q, cu_a, cu_b = [], [], []
    for b in range(B):
        cu_q += [b * Sq, b * Sq + q_c[b]]
        cu_a += [cum[b], cum[b + 1]]  # call A: row b's causal part over its keys, its other queries over none
        cu_b += [cum[b], cum[b]]      # call B: row b's causal part over no key, its other queries over its keys
    cu_q.append(B * Sq)
    cu_a.append(cum[B])
    cu_b.append(cum[B])
    max_q = max(max(q_c), max(Sq - c for c in q_c))
    return Plan(keys, _int32(cu_q, device), _int32(cu_a, device), _int32(cu_b, device), max_q, max(block), True,
                order, blocks)


def packed_plan(cu_seqlens, causal: bool, prefix_len: int = 0) -> Plan:
    """The :class:`Plan` of a packed row cut by ``cu_seqlens`` (int32 ``[n + 1]``; ``prefix_len`` L > 0 for the
    concat path). Memoised on the ``cu_seqlens`` tensor."""
    return memoized(cu_seqlens, ("varlen", bool(causal), int(prefix_len)),
                    lambda: _packed_plan(cu_seqlens, bool(causal), int(prefix_len)))


def _packed_plan(cu, causal, L):
    lengths = cu.diff().tolist()
    longest = max(lengths)
    if not L:
        return Plan(None, cu, cu, None, longest, longest, causal)
    n = len(lengths)
    cu_k = (cu + L * torch.arange(n + 1, device=cu.device, dtype=cu.dtype)).to(torch.int32)
    return Plan(None, cu, cu_k, None, longest, longest + L, causal, _order(lengths, L, cu.device), n)


def plan_args(plan: Optional[Plan]) -> tuple:
    """A plan as the custom ops' arguments: ``(keys, cu_q, cu_k, cu_k2, max_q, max_k, causal)``."""
    if plan is None:
        return None, None, None, None, 0, 0, False
    return plan.keys, plan.cu_q, plan.cu_k, plan.cu_k2, plan.max_q, plan.max_k, plan.causal


def plan_of_args(keys, cu_q, cu_k, cu_k2, max_q, max_k, causal) -> Optional[Plan]:
    """:func:`plan_args` back to the plan (its concat fields are not needed by the vendor calls)."""
    return None if cu_q is None else Plan(keys, cu_q, cu_k, cu_k2, max_q, max_k, causal)


# ------------------------------------------------------------------------------------------- forward, backward


def _window_kwargs(window):
    """FlashAttention's window arguments (-1: unbounded), none without a window."""
    if window is None:
        return {}
    return dict(window_size_left=int(window[0]), window_size_right=int(window[1]))


def forward(op: str, q, k, v, plan: Plan, scale: float, window=None):
    """The varlen attention of ``plan``.

    Args:
        op: ``vendor.FLASH_VARLEN`` or ``vendor.CPU_VARLEN``. q ``[total_q, H, D]``, k, v ``[total_k, Hkv, D]``
        (token-major, last dim contiguous); scale; window None or a ``(left, right)`` pair, bottom-right per
        sequence (packed rows only).

    Returns:
        o ``[total_q, H, D]`` in q's dtype, lse ``[H, total_q]`` natural log (fp32 from FlashAttention, the
        accumulator dtype from the emulation; +inf for a query that sees no key), and ``rng`` (two tensors the
        CUDA backward takes back; empty on CPU).
    """
    if op == vendor.FLASH_VARLEN:
        kw = dict(scale=scale, **_window_kwargs(window))
        o, lse, seed, offset, _ = _aten._flash_attention_forward(
            q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, 0.0, plan.causal, False, **kw)
        if plan.cu_k2 is not None:  # the other query group: exactly 0 and +inf where the first call had its rows
            o2, lse2, _, _, _ = _aten._flash_attention_forward(
                q, k, v, plan.cu_q, plan.cu_k2, plan.max_q, plan.max_k, 0.0, False, False, **kw)
            o, lse = o + o2, torch.minimum(lse, lse2)
        return o, lse, (seed, offset)
    if op == vendor.CPU_VARLEN:
        o, lse = _emulated_forward(q, k, v, plan, scale, window)
        return o, lse, (q.new_empty((0,)), q.new_empty((0,)))
    raise ValueError(f"unknown varlen attention op {op!r}; expected one of {vendor.VARLEN_OPS}")


def backward(op: str, grad_out, q, k, v, out, lse, rng, plan: Plan, scale: float, window=None):
    """The backward of :func:`forward`: ``(dq [total_q, H, D], dk, dv [total_k, Hkv, D])`` given ``grad_out`` and
    ``out`` ``[total_q, H, D]`` (the split path passes ``w * dO`` and the merged output) and ``lse [H, total_q]``
    (for a two-call plan the merged one: a query of one group touches no key in the other call)."""
    if op == vendor.FLASH_VARLEN:
        seed, offset = rng
        kw = dict(scale=scale, **_window_kwargs(window))
        dq, dk, dv = _aten._flash_attention_backward(
            grad_out, q, k, v, out, lse, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, 0.0, plan.causal, seed,
            offset, **kw)
        if plan.cu_k2 is not None:
            dq2, dk2, dv2 = _aten._flash_attention_backward(
                grad_out, q, k, v, out, lse, plan.cu_q, plan.cu_k2, plan.max_q, plan.max_k, 0.0, False, seed,
                offset, **kw)
            dq, dk, dv = dq + dq2, dk + dk2, dv + dv2
        return dq, dk, dv
    if op == vendor.CPU_VARLEN:
        return _emulated_backward(grad_out, q, k, v, out, lse, plan, scale, window)
    raise ValueError(f"unknown varlen attention op {op!r}; expected one of {vendor.VARLEN_OPS}")


def _sequences(plan: Plan):
    """``(query slice, key slice, is_causal)`` of every non-empty sequence of every call (host lists)."""
    cu_q = plan.cu_q.tolist()
    for cu_k, causal in plan.calls():
        cu_k = cu_k.tolist()
        for s in range(len(cu_q) - 1):
            if cu_q[s + 1] > cu_q[s] and cu_k[s + 1] > cu_k[s]:
                yield slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1]), causal


def _heads_first(x):
    """``[n, h, D]`` token rows -> ``[1, h, n, D]`` (a view)."""
    return x.transpose(0, 1).unsqueeze(0)


def _cpu_call(qs, ks, causal, window):
    """(additive mask or None, is_causal, rows that see some key ``[nq]`` or None) for one emulated sequence."""
    nq, nk = qs.shape[2], ks.shape[2]
    win = effective_window(window, causal, nq, nk)
    mask, is_causal = cpu_op_mask(qs, nk, None, causal, win)
    visible = visible_keys(None, causal, win, nq, nk, qs.device)
    sees = None if visible is None else visible[0, 0].any(-1)
    return mask, is_causal, sees


def _emulated_forward(q, k, v, plan, scale, window):
    """FlashAttention's varlen forward, one sequence at a time through PyTorch's fused CPU op."""
    acc = acc_dtype(q.dtype)
    o = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=acc, device=q.device)
    for rq, rk, causal in _sequences(plan):
        qs, ks, vs = _heads_first(q[rq]), _heads_first(k[rk]), _heads_first(v[rk])
        mask, is_causal, sees = _cpu_call(qs, ks, causal, window)
        os, ls = _aten._scaled_dot_product_flash_attention_for_cpu(qs, ks, vs, 0.0, is_causal, attn_mask=mask,
                                                                   scale=scale)
        os, ls = os[0].transpose(0, 1), ls[0].to(acc)  # [nq, H, D], [H, nq]
        if sees is not None:  # a query over no key: output 0, log-sum-exp +inf, as FlashAttention reports it
            os = os.masked_fill(~sees[:, None, None], 0.0)
            ls = ls.masked_fill(~sees, float("inf"))
        o[rq] += os
        lse[:, rq] = torch.minimum(lse[:, rq], ls)
    return o, lse


def _emulated_backward(grad_out, q, k, v, out, lse, plan, scale, window):
    """FlashAttention's varlen backward, one sequence at a time through PyTorch's fused CPU backward."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rq, rk, causal in _sequences(plan):
        qs, ks, vs = _heads_first(q[rq]), _heads_first(k[rk]), _heads_first(v[rk])
        mask, is_causal, _ = _cpu_call(qs, ks, causal, window)
        # the log-sum-exp in the CPU op's own layout: [1, H, nq] in [1, nq, H] memory
        ls = lse[:, rq].to(acc_dtype(q.dtype)).t().contiguous().t().unsqueeze(0)
        gq, gk, gv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads_first(grad_out[rq]), qs, ks, vs, _heads_first(out[rq]), ls, 0.0, is_causal, attn_mask=mask,
            scale=scale)
        dq[rq] += gq[0].transpose(0, 1)
        dk[rk] += gk[0].transpose(0, 1)
        dv[rk] += gv[0].transpose(0, 1)
    return dq, dk, dv
