"""The concat path of the gated-prefix attention: the vendor's fused attention over ``[gated prefix ; keys]``, for
calls whose gate folds into the prefix, forward and backward.

What it computes: the fused kernel's attention (fused.py) for calls without a gate (P-Tuning v2) or with one gate
row for every query (APT's pooled gate ``[B|1, 1, L]``; any gate when ``Sq == 1``). Such a gate folds into the
prefix, ``g_j * scale * (q . Pk_j) = scale * q . (g_j Pk_j)`` and value ``g_j Pv_j``, so the call is plain
attention over the keys ``[g Pk ; K]`` and values ``[g Pv ; V]``:

- **dense** (no padding): ``K' = cat([g Pk (over the batch), K])`` ``[B, Hkv, L + Sk, D]``, then FlashAttention-2
  (``aten._scaled_dot_product_flash_attention``; GQA without expanding K/V). Its causal mask is bottom-right: query
  t of Sq sees the keys ``<= t + (L + Sk) - Sq``, i.e. every prefix row (``j < L <= t + L + Sk - Sq``) and real key
  u iff ``u <= t + Sk - Sq``, the op's contract. On CPU (Triton's interpreter) PyTorch's fused CPU op takes the
  same keys with one additive mask (the padding mask grown by L always-visible prefix columns, the bottom-right
  band over ``L + Sk`` keys): it serves padded batches there too.
- **varlen** (padded batches on CUDA, packed rows; varlen.py): each sequence's keys are ``[g Pk ; its real
  keys]``, so its cumulative key lengths grow by L per sequence, ``K'`` built in token-major
  ``[total_k + blocks * L, Hkv, D]`` memory by one gather (``plan.order``) from the blocks' prefix rows and the
  real keys' rows; the queries are q's own ``[B * Sq, H, D]`` memory (every query row kept). Which padded causal
  batches are exact is in varlen.py (each row's real keys one run, starting no later than the position after
  query 0's).

Backward: the vendor's backward gives dq and ``dK'``, ``dV'``; autograd takes them back through the gather and the
concatenation (deterministic: every row of ``K'`` has one source), the prefix rows summed over the batch or the
packed sequences (a shared prefix) by a reduction, and through the fold to the prefix and the gate
(``dg_j = sum (dPk'_j . Pk_j + dPv'_j . Pv_j)``).

Based on the cost model of docs/design.md ("SDPA over cat([P; K])": 1.05x the floor against split's 1.14x where
the gate folds) and FlashAttention-2's bottom-right causal alignment (``torch.nn.attention.bias.causal_lower_right``
runs the same op with ``is_causal=True``).

Caveats. No ``attn_bias``, no ``window`` (FlashAttention's window over ``[P ; K]`` would hide prefix rows), no
``softcap``, no gate per query: dispatch.py sends those elsewhere (a per-query gate that asks for "concat" falls
back as "split" does). The folded prefix ``g Pk`` is rounded to q's dtype once per call (the reference's folded
formulation does the same). fp16 / bf16 on CUDA (FlashAttention-2: compute capability 8.x / 9.x,
``D % 8 == 0``, ``D <= 128``); any float dtype on CPU. No dropout.

Layers: torch.library ops ``fastprefix::vendor_attention_fwd`` / ``_bwd`` (with fake kernels; the vendor call, dense
or varlen) -> ``VendorAttentionFunction`` -> :func:`concat_attention` (the fold, the concatenation, autograd).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...spec import AttentionSpec, acc_dtype
from ..common.launch import arch_of
from . import varlen, vendor
from .fused import gate_tensor

__all__ = ["concat_attention", "concat_plan", "folds", "VendorAttentionFunction"]

Tensor = torch.Tensor


# ---------------------------------------- torch.library ops (opaque to torch.compile) and the autograd.Function


@torch.library.custom_op("fastprefix::vendor_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool, scale: float, op: str,
            cu_q: Optional[Tensor] = None, cu_k: Optional[Tensor] = None, cu_k2: Optional[Tensor] = None,
            max_q: int = 0, max_k: int = 0, plan_causal: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    plan = varlen.plan_of_args(None, cu_q, cu_k, cu_k2, max_q, max_k, plan_causal)
    if plan is not None:
        out, lse, rng = varlen.forward(op, q, k, v, plan, scale)
    else:
        out, lse, rng = vendor.forward(op, q, k, v, key_padding_mask, causal, scale)
    return out, lse, rng[0], rng[1]


@_fwd_op.register_fake
def _(q, k, v, key_padding_mask, causal, scale, op, cu_q=None, cu_k=None, cu_k2=None, max_q=0, max_k=0,
      plan_causal=False):
    if cu_q is None:
        return (torch.empty_like(q), vendor.lse_like(op, q), *vendor.rng_like(op, q))
    lse_dtype = torch.float32 if op == vendor.FLASH_VARLEN else acc_dtype(q.dtype)
    return (torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype), *vendor.rng_like(op, q))


@torch.library.custom_op("fastprefix::vendor_attention_bwd", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, seed: Tensor, offset: Tensor,
            key_padding_mask: Optional[Tensor], causal: bool, scale: float, op: str, cu_q: Optional[Tensor] = None,
            cu_k: Optional[Tensor] = None, cu_k2: Optional[Tensor] = None, max_q: int = 0, max_k: int = 0,
            plan_causal: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    plan = varlen.plan_of_args(None, cu_q, cu_k, cu_k2, max_q, max_k, plan_causal)
    if plan is not None:
        return varlen.backward(op, do, q, k, v, out, lse, (seed, offset), plan, scale)
    return vendor.backward(op, do, q, k, v, out, lse, (seed, offset), key_padding_mask, causal, scale)


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, seed, offset, key_padding_mask, causal, scale, op, cu_q=None, cu_k=None, cu_k2=None,
      max_q=0, max_k=0, plan_causal=False):
    if cu_q is None:
        return vendor.grads_like(op, q, k, v)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class VendorAttentionFunction(torch.autograd.Function):
    """The vendor's attention (no prefix of its own) through the custom ops: dense ``[B, H, Sq, D]`` inputs with an
    optional padding mask, or token-major varlen inputs with a plan's tensors and ints."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, scale, op, cu_q, cu_k, cu_k2, max_q, max_k, plan_causal):
        out, lse, seed, offset = torch.ops.fastprefix.vendor_attention_fwd(
            q, k, v, key_padding_mask, causal, scale, op, cu_q, cu_k, cu_k2, max_q, max_k, plan_causal)
        ctx.save_for_backward(q, k, v, out, lse, seed, offset, key_padding_mask, cu_q, cu_k, cu_k2)
        ctx.args = (causal, scale, op)
        ctx.plan = (max_q, max_k, plan_causal)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, seed, offset, key_padding_mask, cu_q, cu_k, cu_k2 = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastprefix.vendor_attention_bwd(
            do, q, k, v, out, lse, seed, offset, key_padding_mask, *ctx.args, cu_q, cu_k, cu_k2, *ctx.plan)
        return (dq, dk, dv) + (None,) * 10


# ------------------------------------------------------------------------------------------------- public


def folds(spec: AttentionSpec, Sq: int) -> bool:
    """Whether the call's gate folds into the prefix: no gate, or one gate row for every query."""
    rows = spec.gate_rows
    return rows is None or rows == 1 or Sq == 1


def concat_plan(q, k, spec: AttentionSpec, L: int) -> Optional[varlen.Plan]:
    """The varlen plan of a call on the concat path (each sequence's keys led by the L prefix rows): a packed
    row's, or a padded batch's (None where no plan is exact; see varlen.py)."""
    if spec.cu_seqlens is not None:
        return varlen.packed_plan(spec.cu_seqlens, spec.causal, L)
    mask = spec.key_padding_mask
    if mask is None:  # every key real: one block per batch row (not memoised; dispatch sends these dense)
        mask = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    return varlen.padded_plan(mask, spec.causal, q.shape[2], L)


def _folded(prefix_k, prefix_v, gate, dtype):
    """The prefix with its gate folded in: ``g_j Pk_j``, ``g_j Pv_j`` in ``dtype`` (``[B|1, Hkv, L, D]``), or the
    prefix itself without a gate."""
    if gate is None:
        return prefix_k, prefix_v
    g = gate.transpose(1, 2).unsqueeze(1)  # [B|1, 1, L, 1]: one scale per prefix row, every head
    return tuple((p.to(g.dtype) * g).to(dtype) for p in (prefix_k, prefix_v))


def _block_rows(p, blocks: int):
    """The prefix ``[Hkv, L, D]`` or ``[B|1, Hkv, L, D]`` as ``blocks`` token-major blocks ``[blocks * L, Hkv, D]``
    (a shared prefix repeated: its gradient is the sum over the blocks)."""
    rows = p.transpose(-2, -3)  # [(B|1,) L, Hkv, D]
    if rows.dim() == 3:
        rows = rows.unsqueeze(0)
    return rows.expand(blocks, *rows.shape[1:]).reshape(blocks * rows.shape[1], *rows.shape[2:])


def concat_option(q, k, spec: AttentionSpec, arch, prefix_k):
    """``(op, plan)`` the concat path runs this call with (``plan`` None for a dense vendor op), or None where it does
    not serve it (the dispatch rule asks this; :func:`concat_attention` too, when no op is given)."""
    Sq, Sk, D = q.shape[2], k.shape[2], q.shape[-1]
    if prefix_k is None or D > 128 or spec.has_features or not folds(spec, Sq) or spec.prefix_index is not None:
        return None  # (a table of adapters' prefixes: the fused and split paths read each row's in place)
    L = prefix_k.shape[-2]
    if spec.cu_seqlens is None and (spec.key_padding_mask is None or q.device.type == "cpu"):
        op = vendor.choose_op(q.device.type, arch, q.dtype, D, False, spec.causal, Sq, Sk + L)
        return (op, None) if op in (vendor.CPU, vendor.FLASH) else None
    op = varlen.choose_op(q.device.type, arch, q.dtype, D)
    plan = None if op is None else concat_plan(q, k, spec, L)
    return None if plan is None else (op, plan)


def concat_attention(q, k, v, prefix_k, prefix_v, spec: AttentionSpec, op=None, plan=None):
    """Gated-prefix attention on the concat path; the reference's contract for the calls it serves.

    q ``[B, H, Sq, D]``; k, v ``[B, Hkv, Sk, D]``; prefix_k, prefix_v ``[Hkv, L, D]`` (shared) or
    ``[B, Hkv, L, D]``; ``spec`` the call's :class:`fastprefix.spec.AttentionSpec` (no gate, or one that
    :func:`folds`; padding mask, causal, scale, a packed row's ``cu_seqlens``; no bias, window or softcap); ``op``
    a dense vendor op (``"cpu"``, ``"flash"``) or a varlen one (``"cpu-varlen"``, ``"flash-varlen"``), default:
    the dense one for a call without padding (the CPU op also with padding), the varlen one otherwise; ``plan``
    the varlen op's :func:`concat_plan` (default the call's). Returns ``[B, H, Sq, D]`` in q's dtype (in q's
    memory layout for the dense ops; ``[B, Sq, H, D]`` memory for the varlen ones).

    Raises:
        ValueError: for what this path does not serve (dispatch.py routes such calls elsewhere).
    """
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    L = prefix_k.shape[-2]
    if spec.has_features:
        raise ValueError("the concat path has no softcap, attn_bias or window: use the split path or the fused kernel")
    if not folds(spec, Sq):
        raise ValueError("the concat path folds the gate into the prefix, so it needs one gate row for every query "
                         f"(got {spec.gate_rows} rows for {Sq} queries): use the split path")
    if op is None:
        cap = arch_of(q)
        option = concat_option(q, k, spec, cap, prefix_k)
        if option is None:
            raise ValueError(f"no vendor attention op for the concat path on {q.device.type} (capability {cap}), "
                             f"{q.dtype}, D={D}, or no exact varlen plan for this padded causal batch: use the split "
                             "path or the fused kernel")
        op, plan = option[0], plan if plan is not None else option[1]
    if op not in (vendor.CPU, vendor.FLASH) + vendor.VARLEN_OPS:
        raise ValueError(f"the concat path runs {(vendor.CPU, vendor.FLASH) + vendor.VARLEN_OPS}, got {op!r}")
    gate = gate_tensor(q, spec)
    pk, pv = _folded(prefix_k, prefix_v, gate, q.dtype)
    if op in vendor.VARLEN_OPS:
        plan = plan if plan is not None else concat_plan(q, k, spec, L)
        if plan is None:
            raise ValueError("no exact varlen plan for this padded causal batch on the concat path (a row's real keys "
                             "are not one run, or start after query 0's position + 1): use the split path")
        keys, values = (_varlen_keys(p, x, plan) for p, x in ((pk, k), (pv, v)))
        out = VendorAttentionFunction.apply(varlen.tokens(q), keys, values, None, spec.causal, spec.scale, op,
                                            *varlen.plan_args(plan)[1:])
        return out.view(B, Sq, H, D).transpose(1, 2)
    if spec.cu_seqlens is not None:
        raise ValueError(f"a packed row (cu_seqlens) takes a varlen op ({vendor.VARLEN_OPS}), not {op!r}")
    if op == vendor.FLASH and spec.key_padding_mask is not None:
        raise ValueError("FlashAttention takes no padding mask: a padded batch takes the varlen op")
    mask = spec.key_padding_mask
    if mask is not None:  # the prefix columns are always visible
        mask = torch.cat([mask.new_ones(B, L), mask], dim=1)
    keys = torch.cat([pk.expand(B, Hkv, L, D), k], dim=2)
    values = torch.cat([pv.expand(B, Hkv, L, D), v], dim=2)
    return VendorAttentionFunction.apply(q, keys, values, mask, spec.causal, spec.scale, op,
                                         *varlen.plan_args(None)[1:])


def _varlen_keys(p, x, plan: varlen.Plan):
    """The token-major keys (or values) of a varlen concat call: each block ``[its prefix rows ; its real keys]``."""
    real = varlen.tokens(x)
    if plan.keys is not None:
        real = real.index_select(0, plan.keys)
    return torch.cat([_block_rows(p, plan.blocks), real]).index_select(0, plan.order)
