"""The split path of the gated-prefix attention: the real keys through the vendor's fused attention (vendor.py),
the gated prefix merged in by Triton, forward and an exact backward.

What it computes: the fused kernel's attention (fused.py), by parts. For one query head, query row t, prefix
rows j < L and the real keys' own softmax output ``o_k`` and log-sum-exp ``lse_k`` (the vendor op's):

    s[t, j] = scale * (q_t . Pk_j),   z[t, j] = g[t, j] s[t, j]      prefix logits (a zero gate: logit 0)
    lse  = log(sum_j exp z[t, j] + exp lse_k)                         the merged log-sum-exp
    p    = exp(z - lse),   w = exp(lse_k - lse)                       prefix probabilities, real keys' mass
    out  = sum_j p g Pv_j + w o_k

Backward, with e = dO . Pv_j and delta = dO . out: the real keys' dq, dk, dv (and dbias) are the vendor's
backward called with ``w * dO`` and the merged ``out``: its ``delta' = w delta`` and probabilities
``exp(logit_u - lse_k)`` make ``p_u (w dO . v_u - delta') = w p_u (dO . v_u - delta)``, the merged softmax's own
gradient, so they are exact. The prefix's share: ``dz = p (g e - delta)``, ``dq += scale (dz g) @ Pk``,
``dg = dz s + p e``, ``dPk = scale (dz g)^T q``, ``dPv = (p g)^T dO``.

Based on the log-sum-exp merge of partial softmaxes (FlashAttention's split-KV / flash-decoding combine, here
between the prefix and the real keys). ``_merge_fwd_kernel``, one program per (batch * head, query tile), runs
the prefix in tiles of ``BLOCK_L = max(16, next_pow2(L))`` (capped per config; longer prefixes loop) through an
online softmax in log2 units, the gate on logit and value, then merges ``o_k`` and ``lse_k``; it writes ``out``
(``[B, Sq, H, D]`` memory, what transformers reshapes next) and the merged log-sum-exp (base 2). Two backward
kernels, every output with one owner (deterministic, no atomics): ``_merge_bwd_dq_kernel`` per (batch * kv head,
query tile) adds the prefix's dq in place to the vendor's and sums dg over the group's heads into a partial
``[B, Hkv, Sq, L]``; ``_merge_bwd_prefix_kernel`` per (batch * kv head, query split) recomputes s, e, p (cheaper
than holding dq's and the prefix's accumulators in one program, which spills) for dPk, dPv partials
``[splits, B, Hkv, L, D]``; torch sums the partials in a fixed order. Neither ``[Pk ; K]`` nor a ``[.., Sq, L]``
score tensor exists in global memory; a shared prefix ``[Hkv, L, D]`` is read through a batch stride of 0, and
per-row adapters' table ``[A, Hkv, L, D]`` at row ``prefix_index[b]`` up to that adapter's length (INDEXED; the
table's gradient sums its rows' partials, ``launch.reduce_prefix_partials``).

``attn_bias`` and ``window`` act on the real keys only, so they live in the vendor op (one additive mask on
CPU, the memory-efficient op's bias on CUDA): the merge kernels are the same. The bias gradient is the vendor
backward's own dS (on CPU recomputed in torch), only when the bias requires grad.

Padded batches and packed rows (``cu_seqlens``) take the vendor's variable-length attention (varlen.py:
FlashAttention-2's varlen ops on CUDA, their emulation on CPU): the real keys in token-major ``[total_k, Hkv, D]``
memory (a padded batch's gathered once per call by the forward's plan, a packed row's as they lie), every query
row kept in token-major ``[B * Sq, H, D]`` memory, which is the ``[B, Sq, H, D]`` memory of q itself (a view, no
copy). The varlen output ``[B * Sq, H, D]`` is ``o_k`` seen as ``[B, H, Sq, D]`` and its log-sum-exp
``[H, B * Sq]`` is ``lse_k`` seen as ``[B, H, Sq]`` through strides, so the merge kernels run unchanged: each
token's batch row is its query row's, and the gate (``[B|1, Sq|1, L]``) and a per-example prefix are read by it.
The backward calls the varlen backward with ``w * dO`` and the merged output (token-major views of both) and
scatters the real keys' dk, dv back to their padded places (zeros elsewhere).

Caveats. No ``softcap`` (no vendor op caps the logits: dispatch.py sends such calls to the fused kernel). A query
that sees no real key gets ``w = 0`` exactly: the CPU op reports a log-sum-exp near the dtype's lowest value for
it, and the kernel treats a NaN or +inf ``lse_k`` (FlashAttention's empty row) as no mass; the prefix keeps every
row finite. D <= 128; fp32 dots run as IEEE fp32, fp16 / bf16 accumulate in fp32, fp64 in fp64 (gradcheck under
the interpreter, where bf16 operands are upcast to fp32); no dropout. On a GPU only fp16 / bf16 take this path.

Layers: kernels -> launchers (``merge_forward``, ``_forward``, ``_backward``) -> torch.library ops
``fastprefix::split_attention_fwd`` / ``_bwd`` (with fake kernels) -> ``SplitAttentionFunction`` ->
:func:`split_attention`. Launch tables: configs.py.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ...spec import LN2, LOG2E, AttentionSpec, acc_dtype, no_real_key_below
from ..common.jit import prefix_of, scaled, shift_of
from ..common.launch import (arch_of, block_d, gate_strides, numerics, options, prefix_strides,
                             prefix_tile, reduce_prefix_partials, rows_per_split, split_float, table_args,
                             unit_rows)
from ..common.runtime import new_buffer
from . import configs, varlen, vendor
from .fused import gate_tensor, spec_from_args, window_args

__all__ = ["split_attention", "split_plan", "merge_forward", "SplitAttentionFunction", "fitness_configs"]


# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _merge_fwd_kernel(
    Q, PK, PV, PIDX, PLEN, GATE, OK, LSEK, OUT, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_gb, stride_gm, stride_gl,
    stride_okb, stride_okh, stride_okm,
    stride_lkb, stride_lkh, stride_lkm,
    stride_ob, stride_oh, stride_om,
    H, GROUP, Sq, L, D, qk_hi, qk_lo, l2e_hi, l2e_lo, no_key_below,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr,
    EVEN_D: tl.constexpr, INDEXED: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """out and the merged log-sum-exp (base 2) for one (batch * head, query tile). A row that sees nothing (INDEXED:
    an empty prefix and no real key) gets out 0 and log-sum-exp +inf (no mass anywhere in the backward)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    m64 = pid_m.to(tl.int64) * BLOCK_M
    offs_mm = tl.arange(0, BLOCK_M)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = (m64 + offs_mm) < Sq
    d_ok = (offs_d < D) | EVEN_D  # all true when D is a power of two: no head-dim mask
    md_ok = m_ok[:, None] & d_ok[None, :]
    # Offsets within a tile stay int32 (fewer registers); every base offset added to them is int64.
    q = tl.load(Q + b * stride_qb + h * stride_qh + m64 * stride_qm + (offs_mm[:, None] * stride_qm + offs_d[None, :]),
                mask=md_ok, other=0.0).to(DOT)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    a, n_pre = prefix_of(PIDX, PLEN, b, L, INDEXED)  # per-row adapters: the row's table row and length
    pk_base = PK + a * stride_pkb + hk * stride_pkh
    pv_base = PV + a * stride_pvb + hk * stride_pvh
    for j0 in range(0, n_pre, BLOCK_L):
        j_ok = (j0 + offs_l) < n_pre
        jd_ok = j_ok[:, None] & d_ok[None, :]
        j64 = tl.full([], 0, tl.int64) + j0  # (loop counters are plain ints under the interpreter)
        pk = tl.load(pk_base + j64 * stride_pkn + (offs_l[:, None] * stride_pkn + offs_d[None, :]), mask=jd_ok,
                     other=0.0).to(DOT)
        z = scaled(tl.dot(q, tl.trans(pk), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)  # log2 units
        if HAS_GATE:
            g = tl.load(GATE + b * stride_gb + m64 * stride_gm + j64 * stride_gl
                        + (offs_mm[:, None] * stride_gm + offs_l[None, :] * stride_gl),
                        mask=m_ok[:, None] & j_ok[None, :], other=0.0).to(ACC)
            z = z * g
        z = tl.where(j_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))  # finite: at least one prefix column is real
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_GATE:
            p = p * g  # the gate also scales the prefix value
        pv = tl.load(pv_base + j64 * stride_pvn + (offs_l[:, None] * stride_pvn + offs_d[None, :]), mask=jd_ok,
                     other=0.0).to(DOT)
        acc = tl.dot(p.to(DOT), pv, acc=acc * alpha[:, None], input_precision=PREC, out_dtype=ACC)
        m_i = m_new

    # Merge with the real keys. A NaN or +inf lse_k (an empty row, as FlashAttention reports it) is no mass, and so
    # is one at or below no_key_below (the CPU op's empty row, its mask's lowest value plus a log: a prefix's mass
    # would make its weight 0 anyway, but an adapter's empty prefix leaves nothing to outweigh it).
    lse_k = tl.load(LSEK + b * stride_lkb + h * stride_lkh + (m64 + offs_mm) * stride_lkm, mask=m_ok,
                    other=float("-inf")).to(ACC)
    has_keys = (lse_k == lse_k) & (lse_k < float("inf")) & (lse_k > no_key_below)
    # clamped first: the CPU op's empty-row value (about the dtype's lowest) must not overflow when scaled
    lse_k = tl.where(has_keys, scaled(tl.maximum(lse_k, -1e30), l2e_hi, l2e_lo, ACC), float("-inf"))
    m_tot = shift_of(tl.maximum(m_i, lse_k), INDEXED)  # -inf only with an empty prefix and no real key
    a_prefix = tl.exp2(m_i - m_tot)
    w = tl.exp2(lse_k - m_tot)
    denom = l_i * a_prefix + w
    if INDEXED:  # nothing seen: acc, o_k and denom are 0
        seen = denom > 0
        denom = tl.where(seen, denom, 1.0)
        m_tot = tl.where(seen, m_tot, float("inf"))
    o_k = tl.load(OK + b * stride_okb + h * stride_okh + m64 * stride_okm
                  + (offs_mm[:, None] * stride_okm + offs_d[None, :]), mask=md_ok & has_keys[:, None],
                  other=0.0).to(ACC)
    out = (acc * a_prefix[:, None] + w[:, None] * o_k) / denom[:, None]
    tl.store(OUT + b * stride_ob + h * stride_oh + m64 * stride_om + (offs_mm[:, None] * stride_om + offs_d[None, :]),
             out.to(OUT.dtype.element_ty), mask=md_ok)
    tl.store(LSE + pid_bh.to(tl.int64) * Sq + m64 + offs_mm, m_tot + tl.log2(denom), mask=m_ok)


@triton.jit
def _merge_bwd_dq_kernel(
    Q, PK, PV, PIDX, PLEN, GATE, DO, LSE, DELTA, DQ, DG,
    stride_qb, stride_qh, stride_qm,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_gb, stride_gm, stride_gl,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    H, GROUP, Sq, L, D, qk_hi, qk_lo, sc_hi, sc_lo,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr,
    EVEN_D: tl.constexpr, INDEXED: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """For one (batch * kv head, query tile): dq's prefix share, added in place to the vendor's dq, for
    each head of the GQA group, and the gate gradient summed over the group's heads, written to the
    partial ``dg [B, Hkv, Sq, L]`` (contiguous; with per-row adapters (INDEXED) only the row's own slots are
    written, the launcher zero-fills the rest)."""
    pid_bk = tl.program_id(0)
    pid_m = tl.program_id(1)
    Hkv = H // GROUP
    b = (pid_bk // Hkv).to(tl.int64)
    hk = pid_bk % Hkv
    m64 = pid_m.to(tl.int64) * BLOCK_M
    offs_mm = tl.arange(0, BLOCK_M)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = (m64 + offs_mm) < Sq
    d_ok = (offs_d < D) | EVEN_D  # all true when D is a power of two: no head-dim mask
    md_ok = m_ok[:, None] & d_ok[None, :]
    # Offsets within a tile stay int32 (fewer registers); every base offset added to them is int64.
    a, n_pre = prefix_of(PIDX, PLEN, b, L, INDEXED)
    pk_base = PK + a * stride_pkb + hk.to(tl.int64) * stride_pkh
    pv_base = PV + a * stride_pvb + hk.to(tl.int64) * stride_pvh
    for hh in range(0, GROUP):
        h = (hk * GROUP + hh).to(tl.int64)
        q = tl.load(Q + b * stride_qb + h * stride_qh + m64 * stride_qm
                    + (offs_mm[:, None] * stride_qm + offs_d[None, :]), mask=md_ok, other=0.0).to(DOT)
        do = tl.load(DO + b * stride_dob + h * stride_doh + m64 * stride_dom
                     + (offs_mm[:, None] * stride_dom + offs_d[None, :]), mask=md_ok, other=0.0).to(DOT)
        row = (b * H + h) * Sq + m64 + offs_mm
        lse = tl.load(LSE + row, mask=m_ok, other=0.0).to(ACC)
        delta = tl.load(DELTA + row, mask=m_ok, other=0.0).to(ACC)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
        for j0 in range(0, n_pre, BLOCK_L):
            j_ok = (j0 + offs_l) < n_pre
            jd_ok = j_ok[:, None] & d_ok[None, :]
            ml_ok = m_ok[:, None] & j_ok[None, :]
            j64 = tl.full([], 0, tl.int64) + j0  # (loop counters are plain ints under the interpreter)
            pk = tl.load(pk_base + j64 * stride_pkn + (offs_l[:, None] * stride_pkn + offs_d[None, :]), mask=jd_ok,
                         other=0.0).to(DOT)
            pv = tl.load(pv_base + j64 * stride_pvn + (offs_l[:, None] * stride_pvn + offs_d[None, :]), mask=jd_ok,
                         other=0.0).to(DOT)
            qpk = tl.dot(q, tl.trans(pk), input_precision=PREC, out_dtype=ACC)
            z = scaled(qpk, qk_hi, qk_lo, ACC)  # log2 units
            e = tl.dot(do, tl.trans(pv), input_precision=PREC, out_dtype=ACC)  # dO . Pv_j
            if HAS_GATE:
                g = tl.load(GATE + b * stride_gb + m64 * stride_gm + j64 * stride_gl
                            + (offs_mm[:, None] * stride_gm + offs_l[None, :] * stride_gl), mask=ml_ok,
                            other=0.0).to(ACC)
                p = tl.where(ml_ok, tl.exp2(z * g - lse[:, None]), 0.0)
                dz = p * (g * e - delta[:, None])
                dg = dz * scaled(qpk, sc_hi, sc_lo, ACC) + p * e  # dz * s + p * e
                # summed over the group's heads in this program's own rows: a plain read-modify-write
                dg_ptrs = DG + pid_bk.to(tl.int64) * Sq * L + m64 * L + j64 + (offs_mm[:, None] * L + offs_l[None, :])
                dg += tl.load(dg_ptrs, mask=ml_ok & (hh > 0), other=0.0)
                tl.store(dg_ptrs, dg.to(DG.dtype.element_ty), mask=ml_ok)
                ds = dz * g  # d loss / d s, s = scale q . Pk
            else:
                ds = tl.where(ml_ok, tl.exp2(z - lse[:, None]), 0.0) * (e - delta[:, None])
            dq = tl.dot(ds.to(DOT), pk, acc=dq, input_precision=PREC, out_dtype=ACC)
        dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + m64 * stride_dqm + (offs_mm[:, None] * stride_dqm
                                                                           + offs_d[None, :])
        dq = tl.load(dq_ptrs, mask=md_ok, other=0.0).to(ACC) + scaled(dq, sc_hi, sc_lo, ACC)
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=md_ok)


@triton.jit
def _merge_bwd_prefix_kernel(
    Q, PK, PV, PIDX, PLEN, GATE, DO, LSE, DELTA, DPK, DPV,
    stride_qb, stride_qh, stride_qm,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_gb, stride_gm, stride_gl,
    stride_dob, stride_doh, stride_dom,
    H, GROUP, Sq, L, D, rows_per_split, qk_hi, qk_lo, sc_hi, sc_lo,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr,
    EVEN_D: tl.constexpr, INDEXED: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """dPk, dPv for one (batch * kv head, query split), over its query rows and the group's heads:
    partials ``[splits, B, Hkv, L, D]`` (contiguous), one per split and batch row (with per-row adapters, zeros
    past the row's adapter's length)."""
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    Hkv = H // GROUP
    b = (pid_bk // Hkv).to(tl.int64)
    hk = pid_bk % Hkv
    offs_mm = tl.arange(0, BLOCK_M)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < D) | EVEN_D
    m_lo = pid_s * rows_per_split
    m_hi = tl.minimum(Sq, m_lo + rows_per_split)
    part = (pid_s.to(tl.int64) * tl.num_programs(0) + pid_bk) * L * D
    a, n_pre = prefix_of(PIDX, PLEN, b, L, INDEXED)
    pk_base = PK + a * stride_pkb + hk.to(tl.int64) * stride_pkh
    pv_base = PV + a * stride_pvb + hk.to(tl.int64) * stride_pvh
    for j0 in range(0, L, BLOCK_L):
        j_ok = (j0 + offs_l) < n_pre  # the row's own slots; every slot of the partial is written
        jd_ok = j_ok[:, None] & d_ok[None, :]
        out_ok = ((j0 + offs_l) < L)[:, None] & d_ok[None, :]
        j64 = tl.full([], 0, tl.int64) + j0  # (loop counters are plain ints under the interpreter)
        pk = tl.load(pk_base + j64 * stride_pkn + (offs_l[:, None] * stride_pkn + offs_d[None, :]), mask=jd_ok,
                     other=0.0).to(DOT)
        pv = tl.load(pv_base + j64 * stride_pvn + (offs_l[:, None] * stride_pvn + offs_d[None, :]), mask=jd_ok,
                     other=0.0).to(DOT)
        dpk = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
        dpv = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            m_ok = (m0 + offs_mm) < m_hi
            md_ok = m_ok[:, None] & d_ok[None, :]
            lm_ok = j_ok[:, None] & m_ok[None, :]
            m64 = tl.full([], 0, tl.int64) + m0
            if HAS_GATE:  # transposed tiles [BLOCK_L, BLOCK_M]: the prefix gradients come out without a transpose
                g_t = tl.load(GATE + b * stride_gb + m64 * stride_gm + j64 * stride_gl
                              + (offs_mm[None, :] * stride_gm + offs_l[:, None] * stride_gl), mask=lm_ok,
                              other=0.0).to(ACC)
            for hh in range(0, GROUP):
                h = (hk * GROUP + hh).to(tl.int64)
                q = tl.load(Q + b * stride_qb + h * stride_qh + m64 * stride_qm
                            + (offs_mm[:, None] * stride_qm + offs_d[None, :]), mask=md_ok, other=0.0).to(DOT)
                do = tl.load(DO + b * stride_dob + h * stride_doh + m64 * stride_dom
                             + (offs_mm[:, None] * stride_dom + offs_d[None, :]), mask=md_ok, other=0.0).to(DOT)
                row = (b * H + h) * Sq + m64 + offs_mm
                lse = tl.load(LSE + row, mask=m_ok, other=0.0).to(ACC)
                delta = tl.load(DELTA + row, mask=m_ok, other=0.0).to(ACC)
                z_t = scaled(tl.dot(pk, tl.trans(q), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)
                e_t = tl.dot(pv, tl.trans(do), input_precision=PREC, out_dtype=ACC)  # dO . Pv_j
                if HAS_GATE:
                    p_t = tl.where(lm_ok, tl.exp2(z_t * g_t - lse[None, :]), 0.0)
                    ds_t = p_t * (g_t * e_t - delta[None, :]) * g_t
                    p_t = p_t * g_t
                else:
                    p_t = tl.where(lm_ok, tl.exp2(z_t - lse[None, :]), 0.0)
                    ds_t = p_t * (e_t - delta[None, :])
                dpv = tl.dot(p_t.to(DOT), do, acc=dpv, input_precision=PREC, out_dtype=ACC)
                dpk = tl.dot(ds_t.to(DOT), q, acc=dpk, input_precision=PREC, out_dtype=ACC)
        dpk = scaled(dpk, sc_hi, sc_lo, ACC)
        offs = part + j64 * D + (offs_l[:, None] * D + offs_d[None, :])
        tl.store(DPK + offs, dpk.to(DPK.dtype.element_ty), mask=out_ok)
        tl.store(DPV + offs, dpv.to(DPV.dtype.element_ty), mask=out_ok)



# ----------------------------------------------------------------------------------------------- launchers


def _flags(q, D: int) -> dict:
    """Constexprs shared by the three kernels."""
    bd = block_d(D)
    return dict(BLOCK_D=bd, EVEN_D=D == bd, **numerics(q.dtype))


def _grid(programs: int, tiles: int) -> tuple:
    """(programs, tiles): batch x heads on axis 0 (up to 2^31 - 1), query tiles or splits on axis 1, which
    CUDA caps at 65,535."""
    if tiles > 65_535:
        raise ValueError(f"the split path launches {tiles} query tiles on grid axis 1, more than CUDA's 65,535")
    return programs, tiles


def _no_key_below(dtype) -> float:
    """The kernel's ``no_key_below``: ``fastprefix.spec.no_real_key_below``, at most -1e30 (it travels as an fp32
    argument; no real row gets near it)."""
    return max(no_real_key_below(dtype), -1e30)


def merge_forward(q, prefix_k, prefix_v, gate, o_k, lse_k, scale: float, prefix_index=None, prefix_lengths=None):
    """The forward merge kernel alone (its naive twin: ``fastprefix.reference.split.merge_forward``).

    Args:
        q ``[B, H, Sq, D]``; prefix_k, prefix_v ``[Hkv, L, D]`` or ``[B, Hkv, L, D]`` (or a table ``[A, Hkv, L, D]``
        read through ``prefix_index`` ``[B]``, adapter a's first ``prefix_lengths[a]`` slots: see
        :class:`fastprefix.spec.AttentionSpec`); gate None or a tensor broadcastable to ``[B, Sq, L]``; o_k
        ``[B, H, Sq, D]`` and lse_k ``[B, H, Sq]`` (natural log; NaN, +inf or -inf: no real key) of the real keys;
        scale.

    Returns:
        out ``[B, H, Sq, D]`` in ``[B, Sq, H, D]`` memory and the merged log-sum-exp ``[B, H, Sq]`` (base 2).
    """
    B, H, Sq, D = q.shape
    Hkv = prefix_k.shape[-3]
    L = prefix_k.shape[-2]
    q, prefix_k, prefix_v, o_k = map(unit_rows, (q, prefix_k, prefix_v, o_k))
    out = new_buffer((B, Sq, H, D), q.dtype, q.device).transpose(1, 2)
    lse = new_buffer((B, H, Sq), acc_dtype(q.dtype), q.device)
    flags = _flags(q, D)
    pidx, plen, indexed = table_args(prefix_k, prefix_index, prefix_lengths)
    cfg = configs.pick_merge_config("fwd", flags["BLOCK_D"], arch_of(q))
    _merge_fwd_kernel[_grid(B * H, triton.cdiv(Sq, cfg.block_m))](
        q, prefix_k, prefix_v, pidx, plen, gate, o_k, lse_k, out, lse,
        *q.stride()[:3], *prefix_strides(prefix_k), *prefix_strides(prefix_v), *gate_strides(gate, B, Sq, L),
        *o_k.stride()[:3], *lse_k.stride(), *out.stride()[:3],
        H, H // Hkv, Sq, L, D, *split_float(scale * LOG2E), *split_float(LOG2E), _no_key_below(q.dtype),
        BLOCK_M=cfg.block_m, BLOCK_L=prefix_tile(L, cfg.block_l), HAS_GATE=gate is not None, INDEXED=indexed,
        **flags, **options(cfg),
    )
    return out, lse


def _varlen_inputs(q, k, v, plan: varlen.Plan):
    """Token-major q ``[B * Sq, H, D]`` (a view of ``[B, Sq, H, D]`` memory) and the real keys and values
    ``[total_k, Hkv, D]`` (a padded batch's gathered by ``plan.keys``)."""
    q_t, k_t, v_t = varlen.tokens(q), varlen.tokens(k), varlen.tokens(v)
    if plan.keys is not None:
        k_t, v_t = k_t.index_select(0, plan.keys), v_t.index_select(0, plan.keys)
    return q_t, k_t, v_t


def _keys_back(x, plan: varlen.Plan, B: int, Sk: int):
    """The real keys' gradient ``[total_k, Hkv, D]`` -> ``[B, Hkv, Sk, D]`` in ``[B, Sk, Hkv, D]`` memory (zeros on
    padded keys)."""
    if plan.keys is not None:
        x = x.new_zeros((B * Sk,) + tuple(x.shape[1:])).index_copy_(0, plan.keys, x)
    return x.view(B, Sk, *x.shape[1:]).transpose(1, 2)


def _forward(q, k, v, prefix_k, prefix_v, spec: AttentionSpec, op: str, plan: Optional[varlen.Plan] = None):
    """(out ``[B, H, Sq, D]`` in ``[B, Sq, H, D]`` memory, merged lse ``[B, H, Sq]`` base 2, lse_k, rng...).
    ``spec.gate``: None or the gate in the accumulator dtype; its bias and window reach the vendor op only (the
    prefix has none). A varlen ``op`` runs ``plan``; its ``lse_k`` is ``[H, B * Sq]``."""
    q, k, v, prefix_k, prefix_v = map(unit_rows, (q, k, v, prefix_k, prefix_v))
    if op in vendor.VARLEN_OPS:
        B, H, Sq, D = q.shape
        o_t, lse_t, rng = varlen.forward(op, *_varlen_inputs(q, k, v, plan), plan, spec.scale, spec.window)
        o_k = o_t.view(B, Sq, H, D).transpose(1, 2)  # [B, H, Sq, D] through strides
        lse_k = lse_t.view(H, B, Sq).transpose(0, 1)  # [B, H, Sq] through strides
        out, lse = merge_forward(q, prefix_k, prefix_v, spec.gate, o_k, lse_k, spec.scale, spec.prefix_index,
                                 spec.prefix_lengths)
        return out, lse, lse_t, rng[0], rng[1]
    o_k, lse_k, rng = vendor.forward(op, q, k, v, spec.key_padding_mask, spec.causal, spec.scale,
                                     attn_bias=spec.attn_bias, window=spec.window)
    out, lse = merge_forward(q, prefix_k, prefix_v, spec.gate, o_k, lse_k, spec.scale, spec.prefix_index,
                             spec.prefix_lengths)
    return out, lse, lse_k, rng[0], rng[1]


def _backward(do, q, k, v, prefix_k, prefix_v, out, lse, lse_k, seed, offset, spec: AttentionSpec, op: str,
              bias_grad: bool = False, plan: Optional[varlen.Plan] = None):
    """dq, dk, dv, dprefix_k, dprefix_v, the gate gradient ``[B, Sq, L]`` in the accumulator dtype (an empty
    tensor without a gate) and the bias gradient (4-dim, the bias's dtype; an empty tensor unless
    ``bias_grad``)."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    L = prefix_k.shape[-2]
    gate = spec.gate
    acc = acc_dtype(q.dtype)
    q, k, v, prefix_k, prefix_v, do = map(unit_rows, (q, k, v, prefix_k, prefix_v, do))
    # the real keys' mass w = exp(lse_k - lse) (0 for an empty row, however the op reports it)
    if op in vendor.VARLEN_OPS:
        lse_k_nat = lse_k.view(H, B, Sq).transpose(0, 1).to(acc)
    else:
        lse_k_nat = lse_k.narrow(-1, 0, Sq).to(acc)  # the efficient op pads its lse to 32-row multiples
    lse_k_nat = torch.where(torch.isnan(lse_k_nat) | (lse_k_nat == math.inf), -math.inf, lse_k_nat)
    w = torch.exp(lse_k_nat - lse * LN2)
    w_do = do.to(acc) * w.unsqueeze(-1)
    if op in vendor.VARLEN_OPS:
        q_t, k_t, v_t = _varlen_inputs(q, k, v, plan)
        dq, dk, dv = varlen.backward(op, varlen.tokens(w_do.to(q.dtype)), q_t, k_t, v_t, varlen.tokens(out), lse_k,
                                     (seed, offset), plan, spec.scale, spec.window)
        dq = dq.view(B, Sq, H, D).transpose(1, 2)
        dk, dv = _keys_back(dk, plan, B, Sk), _keys_back(dv, plan, B, Sk)
        dbias = q.new_empty((0,))
    else:
        exact_delta = None
        if bias_grad and op == vendor.CPU:  # the bias gradient is computed in torch: give it the exact delta
            exact_delta = (w, _prefix_delta(q, prefix_k, prefix_v, gate, do, lse, spec, acc))
        dq, dk, dv, dbias = vendor.backward_all(op, w_do.to(q.dtype), q, k, v, out, lse_k, (seed, offset),
                                                spec.key_padding_mask, spec.causal, spec.scale,
                                                attn_bias=spec.attn_bias, window=spec.window, bias_grad=bias_grad,
                                                grad_out_acc=w_do, prefix_delta=exact_delta)
        if dbias is None:
            dbias = q.new_empty((0,))
    dq = unit_rows(dq)
    delta = (do.to(acc) * out.to(acc)).sum(-1).contiguous()  # [B, H, Sq]: dO . out
    flags = _flags(q, D)
    arch = arch_of(q)
    common = (H, H // Hkv, Sq, L, D)
    g_strides = gate_strides(gate, B, Sq, L)
    scales = (*split_float(spec.scale * LOG2E), *split_float(spec.scale))
    pidx, plen, indexed = table_args(prefix_k, spec.prefix_index, spec.prefix_lengths)

    cfg = configs.pick_merge_config("bwd_dq", flags["BLOCK_D"], arch)
    dg = None
    if gate is not None:  # per-row adapters: the kernel writes each row's own slots only
        dg = (torch.zeros if indexed else new_buffer)((B, Hkv, Sq, L), dtype=acc, device=q.device)
    _merge_bwd_dq_kernel[_grid(B * Hkv, triton.cdiv(Sq, cfg.block_m))](
        q, prefix_k, prefix_v, pidx, plen, gate, do, lse, delta, dq, dg,
        *q.stride()[:3], *prefix_strides(prefix_k), *prefix_strides(prefix_v), *g_strides, *do.stride()[:3],
        *dq.stride()[:3], *common, *scales,
        BLOCK_M=cfg.block_m, BLOCK_L=prefix_tile(L, cfg.block_l), HAS_GATE=gate is not None, INDEXED=indexed,
        **flags, **options(cfg),
    )

    cfg = configs.pick_merge_config("bwd_prefix", flags["BLOCK_D"], arch)
    rows = rows_per_split(Sq, cfg.block_m, B * Hkv, q)
    splits = triton.cdiv(Sq, rows)
    dpk = new_buffer((splits, B, Hkv, L, D), acc, q.device)
    dpv = new_buffer((splits, B, Hkv, L, D), acc, q.device)
    _merge_bwd_prefix_kernel[(B * Hkv, splits)](
        q, prefix_k, prefix_v, pidx, plen, gate, do, lse, delta, dpk, dpv,
        *q.stride()[:3], *prefix_strides(prefix_k), *prefix_strides(prefix_v), *g_strides, *do.stride()[:3],
        *common, rows, *scales,
        BLOCK_M=cfg.block_m, BLOCK_L=prefix_tile(L, cfg.block_l), HAS_GATE=gate is not None, INDEXED=indexed,
        **flags, **options(cfg),
    )
    return (dq, dk, dv, *reduce_prefix_partials(dpk, dpv, dg, prefix_k, prefix_v, q, acc, pidx), dbias)


def _prefix_delta(q, prefix_k, prefix_v, gate, do, lse, spec: AttentionSpec, acc):
    """The prefix's share of ``delta = rowsum(dO * out)``, ``sum_j p_j g_j (dO . Pv_j)`` ``[B, H, Sq]`` in
    ``acc``, from the merged log-sum-exp (base 2): in torch, for the CPU bias gradient only, so that its
    delta does not go through the output rounded to q's dtype (one ``[B, H, Sq, L]`` tensor; per-row adapters'
    prefixes gathered, their hidden slots zeroed)."""
    scale = spec.scale
    prefix_k, prefix_v = spec.row_prefixes(prefix_k, prefix_v)
    visible = spec.prefix_visible(prefix_k.shape[-2])
    if visible is not None:  # hidden slots weigh 0
        gate = visible[:, None, :].to(acc) if gate is None else gate * visible[:, None, :]
    B, H, Sq, _ = q.shape
    Hkv, L = prefix_k.shape[-3], prefix_k.shape[-2]
    eq = "bkgsd,{p}ld->bkgsl".format(p="bk" if prefix_k.dim() == 4 else "k")
    z = torch.einsum(eq, q.to(acc).unflatten(1, (Hkv, H // Hkv)), prefix_k.to(acc)).flatten(1, 2) * scale
    e = torch.einsum(eq, do.to(acc).unflatten(1, (Hkv, H // Hkv)), prefix_v.to(acc)).flatten(1, 2)
    g = gate.to(acc).unsqueeze(1) if gate is not None else 1.0  # [B|1, 1, Sq|1, L|1]
    p = torch.exp(z * g - lse.to(acc).unsqueeze(-1) * LN2)
    return (p * g * e).sum(-1)


# ---------------------------------------- torch.library ops (opaque to torch.compile) and the autograd.Function

Tensor = torch.Tensor


@torch.library.custom_op("fastprefix::split_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, gate: Optional[Tensor],
            key_padding_mask: Optional[Tensor], causal: bool, scale: float, op: str,
            attn_bias: Optional[Tensor] = None, window_left: int = -1, window_right: int = -1,
            keys: Optional[Tensor] = None, cu_q: Optional[Tensor] = None, cu_k: Optional[Tensor] = None,
            cu_k2: Optional[Tensor] = None, max_q: int = 0, max_k: int = 0, plan_causal: bool = False,
            prefix_index: Optional[Tensor] = None,
            prefix_lengths: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = spec_from_args(scale, causal, key_padding_mask, window_left, window_right, attn_bias, None, gate,
                          prefix_index, prefix_lengths)
    plan = varlen.plan_of_args(keys, cu_q, cu_k, cu_k2, max_q, max_k, plan_causal)
    return _forward(q, k, v, prefix_k, prefix_v, spec, op, plan)


@_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, op, attn_bias=None, window_left=-1,
      window_right=-1, keys=None, cu_q=None, cu_k=None, cu_k2=None, max_q=0, max_k=0, plan_causal=False,
      prefix_index=None, prefix_lengths=None):
    B, H, Sq, D = q.shape
    acc = acc_dtype(q.dtype)
    out = q.new_empty((B, Sq, H, D)).transpose(1, 2)
    return (out, q.new_empty((B, H, Sq), dtype=acc), vendor.lse_like(op, q), *vendor.rng_like(op, q))


@torch.library.custom_op("fastprefix::split_attention_bwd", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, gate: Optional[Tensor],
            key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor, lse_k: Tensor, seed: Tensor, offset: Tensor,
            causal: bool, scale: float, op: str, attn_bias: Optional[Tensor] = None, window_left: int = -1,
            window_right: int = -1, bias_grad: bool = False, keys: Optional[Tensor] = None,
            cu_q: Optional[Tensor] = None, cu_k: Optional[Tensor] = None, cu_k2: Optional[Tensor] = None,
            max_q: int = 0, max_k: int = 0, plan_causal: bool = False, prefix_index: Optional[Tensor] = None,
            prefix_lengths: Optional[Tensor] = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = spec_from_args(scale, causal, key_padding_mask, window_left, window_right, attn_bias, None, gate,
                          prefix_index, prefix_lengths)
    plan = varlen.plan_of_args(keys, cu_q, cu_k, cu_k2, max_q, max_k, plan_causal)
    return _backward(do, q, k, v, prefix_k, prefix_v, out, lse, lse_k, seed, offset, spec, op, bias_grad, plan)


@_bwd_op.register_fake
def _(do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, lse_k, seed, offset, causal, scale, op,
      attn_bias=None, window_left=-1, window_right=-1, bias_grad=False, keys=None, cu_q=None, cu_k=None, cu_k2=None,
      max_q=0, max_k=0, plan_causal=False, prefix_index=None, prefix_lengths=None):
    B, _, Sq, _ = q.shape
    dg = q.new_empty((B, Sq, prefix_k.shape[-2]) if gate is not None else (0,), dtype=acc_dtype(q.dtype))
    dbias = attn_bias.new_empty(attn_bias.shape) if bias_grad else q.new_empty((0,))
    return (*vendor.grads_like(op, q, k, v), torch.empty_like(prefix_k), torch.empty_like(prefix_v), dg, dbias)


class SplitAttentionFunction(torch.autograd.Function):
    """Forward and backward of the split path (vendor op + Triton prefix merge) through the custom ops, on the
    spec's fields as primitives (the window as two ints, -1 for a side that hides nothing)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, op, attn_bias, window_left,
                window_right, keys=None, cu_q=None, cu_k=None, cu_k2=None, max_q=0, max_k=0, plan_causal=False,
                prefix_index=None, prefix_lengths=None):
        out, lse, lse_k, seed, offset = torch.ops.fastprefix.split_attention_fwd(
            q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, op, attn_bias, window_left,
            window_right, keys, cu_q, cu_k, cu_k2, max_q, max_k, plan_causal, prefix_index, prefix_lengths)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, attn_bias, out, lse, lse_k, seed,
                              offset, keys, cu_q, cu_k, cu_k2, prefix_index, prefix_lengths)
        ctx.causal, ctx.scale, ctx.op, ctx.window = causal, scale, op, (window_left, window_right)
        ctx.plan = (max_q, max_k, plan_causal)
        return out

    @staticmethod
    def backward(ctx, do):
        (q, k, v, prefix_k, prefix_v, gate, key_padding_mask, attn_bias, out, lse, lse_k, seed, offset, keys, cu_q,
         cu_k, cu_k2, prefix_index, prefix_lengths) = ctx.saved_tensors
        bias_grad = attn_bias is not None and ctx.needs_input_grad[10]
        dq, dk, dv, dpk, dpv, dg, dbias = torch.ops.fastprefix.split_attention_bwd(
            do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, lse_k, seed, offset, ctx.causal,
            ctx.scale, ctx.op, attn_bias, *ctx.window, bias_grad, keys, cu_q, cu_k, cu_k2, *ctx.plan, prefix_index,
            prefix_lengths)
        dgate = dg.sum_to_size(gate.shape).to(gate.dtype) if gate is not None else None
        return (dq, dk, dv, dpk, dpv, dgate, None, None, None, None, dbias if bias_grad else None, None, None) \
            + (None,) * 9


# ------------------------------------------------------------------------------------------------- public


def split_attention(q, k, v, prefix_k, prefix_v, spec: AttentionSpec, op=None, plan=None):
    """Gated-prefix attention on the split path; the reference's contract.

    q ``[B, H, Sq, D]``; k, v ``[B, Hkv, Sk, D]``; prefix_k, prefix_v ``[Hkv, L, D]`` (shared) or
    ``[B, Hkv, L, D]``; ``spec`` the call's :class:`fastprefix.spec.AttentionSpec` (gate or APT gate inputs,
    padding mask, causal, window, bias, scale, a packed row's ``cu_seqlens``; no softcap); ``op`` the vendor op
    (vendor.py), default :func:`vendor.choose_op`'s, else (padding alone, or a packed row)
    :func:`varlen.choose_op`'s; ``plan`` a varlen op's :class:`varlen.Plan`, default the call's (memoised on its
    mask or ``cu_seqlens``). Returns ``[B, H, Sq, D]`` in q's dtype, stored as ``[B, Sq, H, D]``
    (``out.transpose(1, 2)`` is contiguous).

    Raises:
        ValueError: when no vendor op supports the call (dispatch.py then takes another path), a softcap, or
        D > 128. Inputs are otherwise expected to be validated by ``fastprefix.ops``.
    """
    D = q.shape[-1]
    if D > 128:
        raise ValueError(f"the split path supports head dim <= 128, got {D}")
    if spec.softcap is not None:
        raise ValueError("the split path has no softcap (no vendor op caps the logits): use the fused kernel")
    if op is None:
        cap = arch_of(q)
        option = split_option(q, k, spec, cap)
        if option is None:
            raise ValueError(f"no vendor attention op for {q.device.type} (capability {cap}), {q.dtype}, D={D}, "
                             f"padding mask {spec.key_padding_mask is not None}, attn_bias {spec.attn_bias is not None}, "
                             f"window {spec.window} (a padded causal batch needs each row's real keys in one run): use "
                             "the fused kernel")
        op, plan = option[0], plan if plan is not None else option[1]
    if op in vendor.VARLEN_OPS:
        plan = plan if plan is not None else split_plan(q, k, spec)
        if plan is None or spec.attn_bias is not None or (spec.window is not None and spec.cu_seqlens is None):
            raise ValueError("the varlen split path serves padded batches without a bias or window (non-causal, or "
                             "causal with each row's real keys in one run) and packed rows: use the fused kernel")
    elif spec.cu_seqlens is not None:
        raise ValueError(f"a packed row (cu_seqlens) takes a varlen op ({vendor.VARLEN_OPS}), not {op!r}")
    gate = gate_tensor(q, spec)
    return SplitAttentionFunction.apply(q, k, v, prefix_k, prefix_v, gate, spec.key_padding_mask, spec.causal,
                                        spec.scale, op, spec.attn_bias, *window_args(spec),
                                        *varlen.plan_args(plan if op in vendor.VARLEN_OPS else None),
                                        spec.prefix_index, spec.prefix_lengths)


def split_option(q, k, spec: AttentionSpec, arch):
    """``(op, plan)`` the split path runs this call with (``plan`` None for a dense vendor op), or None where no vendor
    op serves it (the dispatch rule asks this; :func:`split_attention` too, when no op is given)."""
    Sq, Sk, D = q.shape[2], k.shape[2], q.shape[-1]
    if D > 128:
        return None
    if spec.cu_seqlens is None:
        op = vendor.choose_op(q.device.type, arch, q.dtype, D, spec.key_padding_mask is not None, spec.causal, Sq, Sk,
                              bias_dtype=None if spec.attn_bias is None else spec.attn_bias.dtype,
                              has_window=spec.window is not None)
        if op is not None:
            return op, None
        if spec.key_padding_mask is None or spec.attn_bias is not None or spec.window is not None:
            return None
    op = varlen.choose_op(q.device.type, arch, q.dtype, D)
    plan = None if op is None else split_plan(q, k, spec)
    return None if plan is None else (op, plan)


def split_plan(q, k, spec: AttentionSpec) -> Optional[varlen.Plan]:
    """The varlen :class:`varlen.Plan` of a call on the split path: a packed row's, a padded batch's (None where no
    plan is exact), or, for a batch without padding, one over every key (one call, not memoised)."""
    if spec.cu_seqlens is not None:
        return varlen.packed_plan(spec.cu_seqlens, spec.causal)
    if spec.key_padding_mask is not None:
        return varlen.padded_plan(spec.key_padding_mask, spec.causal, q.shape[2])
    every = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    return varlen.padded_plan(every, spec.causal, q.shape[2])


def fitness_configs(adapters: bool = False):
    """This module's launch configs for kernels/fitness.py (``configs.merge_fitness_configs`` on these kernels)."""
    kernels = dict(fwd=_merge_fwd_kernel, bwd_dq=_merge_bwd_dq_kernel, bwd_prefix=_merge_bwd_prefix_kernel)
    return configs.merge_fitness_configs(kernels, adapters)
