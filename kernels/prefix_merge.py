"""The split path of the gated-prefix attention: the real keys through the vendor's fused attention,
the gated prefix merged in by Triton, forward and an exact backward.

Math (one query head, query row t; prefix rows j < L, real keys u < Sk; as in gated_prefix_attention.py):

    s[t, j] = scale * (q_t . Pk_j),  z[t, j] = g[t, j] s[t, j]        prefix logits (a zero gate: logit 0)
    o_k, lse_k = the real keys' own softmax output and log-sum-exp        (vendor op, kernels/vendor_attention.py)
    lse  = log(sum_j exp z[t, j] + exp lse_k)                             the merged log-sum-exp
    p    = exp(z - lse),  w = exp(lse_k - lse)                           prefix probabilities, real keys' mass
    out  = sum_j p g Pv_j + w o_k

Forward (``_merge_fwd_kernel``, one program per (batch * head, query tile)): the L prefix scores in
tiles of ``BLOCK_L = max(16, next_pow2(L))`` (at most 64, or 32 in some configs at D = 128; longer
prefixes loop) with an online softmax in log2 units, the gate applied to logit and value, then the merge
with ``o_k`` and ``lse_k``;
writes ``out`` (any strides: the launcher allocates ``[B, Sq, H, D]`` memory, the layout transformers
reshapes next) and the merged log-sum-exp (base 2). Neither ``[Pk ; K]`` nor a ``[.., Sq, L]`` score
tensor ever exists in global memory; a shared prefix ``[Hkv, L, D]`` is read through a batch stride of 0.

Backward, exact. With ``e = dO . Pv_j`` and ``delta = dO . out`` (one torch reduction):

- real keys: the vendor's backward called with ``w * dO`` and the merged ``out`` (and the real keys'
  own ``lse_k``). It computes ``delta' = (w dO) . out = w delta`` and ``p_u = exp(logit_u - lse_k)``,
  so ``p_u (w dO . v_u - delta') = w p_u (dO . v_u - delta)``: the merged softmax's gradient, since the
  merged probability of key u is ``w p_u``. Its dq, dk, dv are therefore exact (dk, dv complete);
- prefix, two deterministic kernels (every output has one owner, no atomics):
  ``_merge_bwd_dq_kernel``, one program per (batch * kv head, query tile), for each head of the group:
  ``dz = p (g e - delta)``, ``dq += scale (dz g) @ Pk`` (added in place to the vendor's dq) and
  ``dg = dz s + p e`` summed over the group's heads into a partial ``[B, Hkv, Sq, L]``;
  ``_merge_bwd_prefix_kernel``, one program per (batch * kv head, query split), recomputes s, e, p
  (2 small GEMMs: cheaper than holding dq's and the prefix's accumulators in one program, which
  spills) for ``dPk = scale (dz g)^T q``, ``dPv = (p g)^T dO`` into partials ``[splits, B, Hkv, L, D]``.
  torch sums the partials in a fixed order (over splits, over the batch for a shared prefix, over kv
  heads for the gate).

The gate enters as a tensor broadcastable to ``[B, Sq, L]`` (APT's token or pooled gate, computed once
per call by one GEMM + sigmoid in torch, see kernels/attention_path.py), never recomputed per tile.

Attention features (issue #12). ``attn_bias`` and ``window`` act on the real keys only (the prefix gets no
bias and is always visible), so they live entirely in the vendor op: one additive mask (bias, lowest
finite value where padding, the window or causality hides a key) on CPU, the memory-efficient op's bias
on CUDA (kernels/vendor_attention.py). The merge kernels are unchanged. The bias gradient is the vendor
backward's own ``dS`` (same ``w * dO`` argument as above, so exact; on CPU recomputed in torch), summed
over the bias's broadcast dims, and only when the bias requires grad. ``softcap`` never reaches this path.

Caveats. A query that sees no real key (a padded row) gets ``w = 0`` exactly: the CPU op reports a
log-sum-exp near the dtype's lowest value for it, and the kernel treats a NaN or +inf ``lse_k`` (what
FlashAttention reports for an empty row) as "no mass". Prefix rows are always visible, so the merged
row is never empty and never NaN. fp32 ``tl.dot`` runs as IEEE fp32 (``input_precision="ieee"``), fp16 /
bf16 accumulate in fp32, fp64 in fp64 (gradcheck under the interpreter). D <= 128.

The model (B=8, H=32, Hkv=8, S=Sq=Sk=2048, L=64, D=128, bf16, P-Tuning v2, no gate). GFLOP counts 2 per
multiply-add; GB is DRAM traffic with every operand of a kernel read once and every result written once
(L2 re-reads not counted); each kernel takes max(FLOP / 312 TFLOP/s, bytes / 2.0 TB/s) (A100 bf16 peak,
no efficiency factor); "time / floor" is forward + backward against plain FlashAttention-2 over the S
real keys alone. Causal: bottom-right, so the prefix is seen by every query (S x L FLOPs stay whole).

    ==============================  =========  ======  =========  ======  ============
    path                            fwd GFLOP  fwd GB  bwd GFLOP  bwd GB  time / floor
    ==============================  =========  ======  =========  ======  ============
    non-causal
    floor: FA2 over S keys          550        0.34    1374       0.81    1.00
    SDPA (FA2) over cat([P; K])     567        0.48    1417       0.95    1.05
    fused (gated_prefix_attention)  567        0.34    1984       1.42    1.32
    split (FA2 + prefix merge)      567        0.74    1435       2.17    1.14
    causal
    floor: FA2 over S keys          275        0.34    687        0.81    1.00
    SDPA (FA2) over cat([P; K])     292        0.48    730        0.95    1.10
    fused (gated_prefix_attention)  292        0.34    1022       1.42    1.36
    split (FA2 + prefix merge)      292        0.74    747        2.17    1.27
    ==============================  =========  ======  =========  ======  ============

How the rows are made. S x S: ``4 B H S^2 D`` forward, ``10 B H S^2 D`` backward for FA2 (5 GEMMs), ``14 B H
S^2 D`` for the fused kernel's backward (7 GEMMs: its dq and dk/dv kernels each recompute the scores);
prefix: ``4 B H S L D`` forward (17 GFLOP), backward ``10`` (SDPA), ``14`` (fused, split: both recompute
the prefix scores in a second kernel). SDPA over the concatenation writes ``[P; K]``, ``[P; V]`` expanded
over the batch and slices dK, dV back (+0.14 GB each way) and needs FA2's bottom-right causal over S + L
keys (the prefix then stays visible). Split's extra bytes are memory-bound passes over ``[B, H, S, D]``
tensors: the merge reads q and o_k and writes out (+0.40 GB forward); the backward writes ``w * dO``,
computes delta and the vendor's own delta, and the prefix kernels re-read q and dO and read-modify-write
dq (+1.36 GB). The model favours the fused kernel: at the vendor's real efficiency the issue's review
puts its backward at ~2x FA2's time (so ~1.6x the floor overall), while split runs at FA2's efficiency.
With APT's token gate the fused kernel recomputes the gate GEMM per (query tile, head, prefix tile):
``2 B S d L H`` = 275 GFLOP forward (d = H D = 4096), +50% non-causal; split computes it once (8.6
GFLOP) and SDPA over a concatenation cannot express a per-query gate at all (it needs the explicit
``[B, H, S, L]`` scores). Where split loses bytes (w * dO, the two delta passes, the dq round trip) is
where a later version would fuse. ``make gpu`` measures all four rows; its numbers set the dispatch rule
in kernels/attention_path.py.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import vendor_attention as vendor
from ._launch import acc_torch_dtype as _acc_dtype
from ._launch import arch_of as _arch_of
from ._launch import gate_strides as _gate_strides
from ._launch import prefix_strides as _prefix_strides
from ._launch import prefix_tile, reduce_prefix_partials
from ._launch import rows_per_split as _rows_per_split
from ._launch import split_float as _split
from ._launch import unit_rows as _rows
from ._runtime import interpreting, new_buffer

__all__ = ["split_attention", "merge_forward", "fitness_configs", "pick_config"]

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)
LN2 = math.log(2.0)
# Explicit on every launch (later Tritons flip the default): FMA contraction on, as in the fused kernel
FP_FUSION = True


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _times(x, hi, lo, ACC: tl.constexpr):
    """x * c for a host constant c = hi + lo split into fp32 parts: scalar kernel arguments are fp32,
    so fp64 accumulation (gradcheck) adds the low part to keep c exact."""
    if ACC == tl.float64:
        return x * hi + x * lo
    return x * hi


@triton.jit
def _merge_fwd_kernel(
    Q, PK, PV, GATE, OK, LSEK, OUT, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_gb, stride_gm, stride_gl,
    stride_okb, stride_okh, stride_okm,
    stride_lkb, stride_lkh, stride_lkm,
    stride_ob, stride_oh, stride_om,
    H, GROUP, Sq, L, D, qk_hi, qk_lo, l2e_hi, l2e_lo,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr,
    EVEN_D: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """out and the merged log-sum-exp (base 2) for one (batch * head, query tile)."""
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
    pk_base = PK + b * stride_pkb + hk * stride_pkh
    pv_base = PV + b * stride_pvb + hk * stride_pvh
    for j0 in range(0, L, BLOCK_L):
        j_ok = (j0 + offs_l) < L
        jd_ok = j_ok[:, None] & d_ok[None, :]
        j64 = tl.full([], 0, tl.int64) + j0  # (loop counters are plain ints under the interpreter)
        pk = tl.load(pk_base + j64 * stride_pkn + (offs_l[:, None] * stride_pkn + offs_d[None, :]), mask=jd_ok,
                     other=0.0).to(DOT)
        z = _times(tl.dot(q, tl.trans(pk), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)  # log2 units
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
        acc = tl.dot(p.to(DOT), pv, acc=acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    # Merge with the real keys. A NaN or +inf lse_k (an empty row, as FlashAttention reports it) is no mass.
    lse_k = tl.load(LSEK + b * stride_lkb + h * stride_lkh + (m64 + offs_mm) * stride_lkm, mask=m_ok,
                    other=float("-inf")).to(ACC)
    has_keys = (lse_k == lse_k) & (lse_k < float("inf"))
    # clamped first: the CPU op's empty-row value (about the dtype's lowest) must not overflow when scaled
    lse_k = tl.where(has_keys, _times(tl.maximum(lse_k, -1e30), l2e_hi, l2e_lo, ACC), float("-inf"))
    m_tot = tl.maximum(m_i, lse_k)
    a_prefix = tl.exp2(m_i - m_tot)
    w = tl.exp2(lse_k - m_tot)
    denom = l_i * a_prefix + w
    o_k = tl.load(OK + b * stride_okb + h * stride_okh + m64 * stride_okm
                  + (offs_mm[:, None] * stride_okm + offs_d[None, :]), mask=md_ok & has_keys[:, None],
                  other=0.0).to(ACC)
    out = (acc * a_prefix[:, None] + w[:, None] * o_k) / denom[:, None]
    tl.store(OUT + b * stride_ob + h * stride_oh + m64 * stride_om + (offs_mm[:, None] * stride_om + offs_d[None, :]),
             out.to(OUT.dtype.element_ty), mask=md_ok)
    tl.store(LSE + pid_bh.to(tl.int64) * Sq + m64 + offs_mm, m_tot + tl.log2(denom), mask=m_ok)


@triton.jit
def _merge_bwd_dq_kernel(
    Q, PK, PV, GATE, DO, LSE, DELTA, DQ, DG,
    stride_qb, stride_qh, stride_qm,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_gb, stride_gm, stride_gl,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    H, GROUP, Sq, L, D, qk_hi, qk_lo, sc_hi, sc_lo,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr,
    EVEN_D: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """For one (batch * kv head, query tile): dq's prefix share, added in place to the vendor's dq, for
    each head of the GQA group, and the gate gradient summed over the group's heads, written to the
    partial ``dg [B, Hkv, Sq, L]`` (contiguous)."""
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
    pk_base = PK + b * stride_pkb + hk.to(tl.int64) * stride_pkh
    pv_base = PV + b * stride_pvb + hk.to(tl.int64) * stride_pvh
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
        for j0 in range(0, L, BLOCK_L):
            j_ok = (j0 + offs_l) < L
            jd_ok = j_ok[:, None] & d_ok[None, :]
            ml_ok = m_ok[:, None] & j_ok[None, :]
            j64 = tl.full([], 0, tl.int64) + j0  # (loop counters are plain ints under the interpreter)
            pk = tl.load(pk_base + j64 * stride_pkn + (offs_l[:, None] * stride_pkn + offs_d[None, :]), mask=jd_ok,
                         other=0.0).to(DOT)
            pv = tl.load(pv_base + j64 * stride_pvn + (offs_l[:, None] * stride_pvn + offs_d[None, :]), mask=jd_ok,
                         other=0.0).to(DOT)
            qpk = tl.dot(q, tl.trans(pk), input_precision=PREC, out_dtype=ACC)
            z = _times(qpk, qk_hi, qk_lo, ACC)  # log2 units
            e = tl.dot(do, tl.trans(pv), input_precision=PREC, out_dtype=ACC)  # dO . Pv_j
            if HAS_GATE:
                g = tl.load(GATE + b * stride_gb + m64 * stride_gm + j64 * stride_gl
                            + (offs_mm[:, None] * stride_gm + offs_l[None, :] * stride_gl), mask=ml_ok,
                            other=0.0).to(ACC)
                p = tl.where(ml_ok, tl.exp2(z * g - lse[:, None]), 0.0)
                dz = p * (g * e - delta[:, None])
                dg = dz * _times(qpk, sc_hi, sc_lo, ACC) + p * e  # dz * s + p * e
                # summed over the group's heads in this program's own rows: a plain read-modify-write
                dg_ptrs = DG + pid_bk.to(tl.int64) * Sq * L + m64 * L + j64 + (offs_mm[:, None] * L + offs_l[None, :])
                dg += tl.load(dg_ptrs, mask=ml_ok & (hh > 0), other=0.0)
                tl.store(dg_ptrs, dg.to(DG.dtype.element_ty), mask=ml_ok)
                ds = dz * g  # d loss / d s, s = scale q . Pk
            else:
                ds = tl.where(ml_ok, tl.exp2(z - lse[:, None]), 0.0) * (e - delta[:, None])
            dq = tl.dot(ds.to(DOT), pk, acc=dq, input_precision=PREC)
        dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + m64 * stride_dqm + (offs_mm[:, None] * stride_dqm
                                                                           + offs_d[None, :])
        dq = tl.load(dq_ptrs, mask=md_ok, other=0.0).to(ACC) + _times(dq, sc_hi, sc_lo, ACC)
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=md_ok)


@triton.jit
def _merge_bwd_prefix_kernel(
    Q, PK, PV, GATE, DO, LSE, DELTA, DPK, DPV,
    stride_qb, stride_qh, stride_qm,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_gb, stride_gm, stride_gl,
    stride_dob, stride_doh, stride_dom,
    H, GROUP, Sq, L, D, rows_per_split, qk_hi, qk_lo, sc_hi, sc_lo,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr,
    EVEN_D: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """dPk, dPv for one (batch * kv head, query split), over its query rows and the group's heads:
    partials ``[splits, B, Hkv, L, D]`` (contiguous), one per split and batch row."""
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
    pk_base = PK + b * stride_pkb + hk.to(tl.int64) * stride_pkh
    pv_base = PV + b * stride_pvb + hk.to(tl.int64) * stride_pvh
    for j0 in range(0, L, BLOCK_L):
        j_ok = (j0 + offs_l) < L
        jd_ok = j_ok[:, None] & d_ok[None, :]
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
                z_t = _times(tl.dot(pk, tl.trans(q), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)
                e_t = tl.dot(pv, tl.trans(do), input_precision=PREC, out_dtype=ACC)  # dO . Pv_j
                if HAS_GATE:
                    p_t = tl.where(lm_ok, tl.exp2(z_t * g_t - lse[None, :]), 0.0)
                    ds_t = p_t * (g_t * e_t - delta[None, :]) * g_t
                    p_t = p_t * g_t
                else:
                    p_t = tl.where(lm_ok, tl.exp2(z_t - lse[None, :]), 0.0)
                    ds_t = p_t * (e_t - delta[None, :])
                dpv = tl.dot(p_t.to(DOT), do, acc=dpv, input_precision=PREC)
                dpk = tl.dot(ds_t.to(DOT), q, acc=dpk, input_precision=PREC)
        dpk = _times(dpk, sc_hi, sc_lo, ACC)
        offs = part + j64 * D + (offs_l[:, None] * D + offs_d[None, :])
        tl.store(DPK + offs, dpk.to(DPK.dtype.element_ty), mask=jd_ok)
        tl.store(DPV + offs, dpv.to(DPV.dtype.element_ty), mask=jd_ok)


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------

# (BLOCK_M, widest BLOCK_L, num_warps, num_stages) per GPU family, kernel and head-dim bucket. BLOCK_L
# follows L (block_l) up to that width. kernels/fitness.py compiles each for sm_80/86/90 (fp16, bf16)
# at its widest BLOCK_L and checks registers, spills and shared memory. The backward holds the prefix
# tile, its two gradient accumulators and a query tile of q, dO and out at once: narrower tiles there.
_GPU_CONFIGS = {
    80: {"fwd": {64: (128, 64, 8, 2), 128: (64, 32, 8, 2)},  # also sm_86/89 (their 64K registers spill more)
         "bwd_dq": {64: (32, 64, 8, 2), 128: (32, 32, 8, 2)},
         "bwd_prefix": {64: (32, 64, 8, 2), 128: (32, 32, 8, 2)}},
    90: {"fwd": {64: (128, 64, 8, 2), 128: (64, 64, 8, 2)},
         "bwd_dq": {64: (32, 64, 8, 2), 128: (32, 32, 8, 2)},
         "bwd_prefix": {64: (32, 64, 8, 2), 128: (32, 32, 8, 2)}},
}
# The interpreter runs programs one after another: few, large tiles are fastest, and 64 query rows
# still split the longer test shapes into several tiles (and the backward into two query splits).
_INTERPRETER_CONFIG = (64, 64, 4, 1)


def pick_config(kind: str, block_d: int, arch: Optional[int]) -> tuple:
    """(BLOCK_M, widest BLOCK_L, num_warps, num_stages) for kernel ``kind`` (``"fwd"``, ``"bwd_dq"``,
    ``"bwd_prefix"``) on ``arch`` (None: the interpreter)."""
    if arch is None:
        return _INTERPRETER_CONFIG
    return _GPU_CONFIGS[90 if arch >= 90 else 80][kind][64 if block_d <= 64 else 128]


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _flags(q, D):
    """Constexprs shared by the three kernels."""
    if q.dtype == torch.float64:
        acc, dot = tl.float64, tl.float64
    elif q.dtype == torch.float16:
        acc, dot = tl.float32, tl.float16
    elif q.dtype == torch.bfloat16:  # the interpreter has no bf16 arithmetic
        acc, dot = tl.float32, (tl.float32 if interpreting() else tl.bfloat16)
    else:
        acc, dot = tl.float32, tl.float32
    block_d = max(16, triton.next_power_of_2(D))
    prec = "ieee" if dot in (tl.float32, tl.float64) else "tf32"  # fp32 tl.dot is TF32 on GPU otherwise
    return dict(BLOCK_D=block_d, EVEN_D=D == block_d, ACC=acc, DOT=dot, PREC=prec)


def _grid(programs: int, tiles: int) -> tuple:
    """(programs, tiles): batch x heads on axis 0 (up to 2^31 - 1), query tiles or splits on axis 1, which
    CUDA caps at 65,535."""
    if tiles > 65_535:
        raise ValueError(f"the split path launches {tiles} query tiles on grid axis 1, more than CUDA's 65,535")
    return programs, tiles


def _forward(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal: bool, scale: float, op: str,
             attn_bias=None, window=None):
    """(out ``[B, H, Sq, D]`` in ``[B, Sq, H, D]`` memory, merged lse ``[B, H, Sq]`` base 2, lse_k, rng...).
    ``attn_bias`` and ``window`` (an effective pair or None) reach the vendor op only: the prefix has none."""
    q, k, v, prefix_k, prefix_v = map(_rows, (q, k, v, prefix_k, prefix_v))
    o_k, lse_k, rng = vendor.forward(op, q, k, v, key_padding_mask, causal, scale, attn_bias=attn_bias, window=window)
    out, lse = merge_forward(q, prefix_k, prefix_v, gate, o_k, lse_k, scale)
    return out, lse, lse_k, rng[0], rng[1]


def merge_forward(q, prefix_k, prefix_v, gate, o_k, lse_k, scale: float):
    """The forward kernel alone (the naive twin is ``fastprefix.reference.prefix_merge``).

    Args:
        q ``[B, H, Sq, D]``; prefix_k, prefix_v ``[Hkv, L, D]`` or ``[B, Hkv, L, D]``; gate None or a 3-dim
        tensor broadcastable to ``[B, Sq, L]``; o_k ``[B, H, Sq, D]`` and lse_k ``[B, H, Sq]`` (natural log;
        NaN, +inf or -inf: no real key) of the real keys; scale.

    Returns:
        out ``[B, H, Sq, D]`` in ``[B, Sq, H, D]`` memory and the merged log-sum-exp ``[B, H, Sq]`` (base 2).
    """
    B, H, Sq, D = q.shape
    Hkv = prefix_k.shape[-3]
    L = prefix_k.shape[-2]
    q, prefix_k, prefix_v, o_k = map(_rows, (q, prefix_k, prefix_v, o_k))
    out = new_buffer((B, Sq, H, D), q.dtype, q.device).transpose(1, 2)
    lse = new_buffer((B, H, Sq), _acc_dtype(q), q.device)
    flags = _flags(q, D)
    block_m, widest_l, num_warps, num_stages = pick_config("fwd", flags["BLOCK_D"], _arch_of(q))
    _merge_fwd_kernel[_grid(B * H, triton.cdiv(Sq, block_m))](
        q, prefix_k, prefix_v, gate, o_k, lse_k, out, lse,
        *q.stride()[:3], *_prefix_strides(prefix_k), *_prefix_strides(prefix_v), *_gate_strides(gate, B, Sq, L),
        *o_k.stride()[:3], *lse_k.stride(), *out.stride()[:3],
        H, H // Hkv, Sq, L, D, *_split(scale * LOG2E), *_split(LOG2E),
        BLOCK_M=block_m, BLOCK_L=prefix_tile(L, widest_l), HAS_GATE=gate is not None, **flags,
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=FP_FUSION,
    )
    return out, lse


def _backward(do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, lse_k, seed, offset,
              causal: bool, scale: float, op: str, attn_bias=None, window=None, bias_grad: bool = False):
    """dq, dk, dv, dprefix_k, dprefix_v, the gate gradient ``[B, Sq, L]`` in the accumulator dtype (an empty
    tensor without a gate) and the bias gradient (4-dim, the bias's dtype; an empty tensor unless
    ``bias_grad``)."""
    B, H, Sq, D = q.shape
    Hkv = k.shape[1]
    L = prefix_k.shape[-2]
    acc = _acc_dtype(q)
    q, k, v, prefix_k, prefix_v, do = map(_rows, (q, k, v, prefix_k, prefix_v, do))
    # the real keys' mass w = exp(lse_k - lse) (0 for an empty row, however the op reports it)
    lse_k_nat = lse_k.narrow(-1, 0, Sq).to(acc)  # the efficient op pads its lse to 32-row multiples
    lse_k_nat = torch.where(torch.isnan(lse_k_nat) | (lse_k_nat == math.inf), -math.inf, lse_k_nat)
    w = torch.exp(lse_k_nat - lse * LN2)
    w_do = do.to(acc) * w.unsqueeze(-1)
    exact_delta = None
    if bias_grad and op == vendor.CPU:  # the bias gradient is computed in torch: give it the exact delta
        exact_delta = (w, _prefix_delta(q, prefix_k, prefix_v, gate, do, lse, scale, acc))
    dq, dk, dv, dbias = vendor.backward_all(op, w_do.to(q.dtype), q, k, v, out, lse_k, (seed, offset),
                                            key_padding_mask, causal, scale, attn_bias=attn_bias, window=window,
                                            bias_grad=bias_grad, grad_out_acc=w_do, prefix_delta=exact_delta)
    if dbias is None:
        dbias = q.new_empty((0,))
    dq = _rows(dq)
    delta = (do.to(acc) * out.to(acc)).sum(-1).contiguous()  # [B, H, Sq]: dO . out
    flags = _flags(q, D)
    arch = _arch_of(q)
    common = (H, H // Hkv, Sq, L, D)
    g_strides = _gate_strides(gate, B, Sq, L)

    block_m, widest_l, num_warps, num_stages = pick_config("bwd_dq", flags["BLOCK_D"], arch)
    dg = new_buffer((B, Hkv, Sq, L), acc, q.device) if gate is not None else None
    _merge_bwd_dq_kernel[_grid(B * Hkv, triton.cdiv(Sq, block_m))](
        q, prefix_k, prefix_v, gate, do, lse, delta, dq, dg,
        *q.stride()[:3], *_prefix_strides(prefix_k), *_prefix_strides(prefix_v), *g_strides, *do.stride()[:3],
        *dq.stride()[:3], *common, *_split(scale * LOG2E), *_split(scale),
        BLOCK_M=block_m, BLOCK_L=prefix_tile(L, widest_l), HAS_GATE=gate is not None, **flags,
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=FP_FUSION,
    )

    block_m, widest_l, num_warps, num_stages = pick_config("bwd_prefix", flags["BLOCK_D"], arch)
    rows_per_split = _rows_per_split(Sq, block_m, B * Hkv, q)
    splits = triton.cdiv(Sq, rows_per_split)
    dpk = new_buffer((splits, B, Hkv, L, D), acc, q.device)
    dpv = new_buffer((splits, B, Hkv, L, D), acc, q.device)
    _merge_bwd_prefix_kernel[(B * Hkv, splits)](
        q, prefix_k, prefix_v, gate, do, lse, delta, dpk, dpv,
        *q.stride()[:3], *_prefix_strides(prefix_k), *_prefix_strides(prefix_v), *g_strides, *do.stride()[:3],
        *common, rows_per_split, *_split(scale * LOG2E), *_split(scale),
        BLOCK_M=block_m, BLOCK_L=prefix_tile(L, widest_l), HAS_GATE=gate is not None, **flags,
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=FP_FUSION,
    )
    return (dq, dk, dv, *reduce_prefix_partials(dpk, dpv, dg, prefix_k, prefix_v, q, acc), dbias)


def _prefix_delta(q, prefix_k, prefix_v, gate, do, lse, scale: float, acc):
    """The prefix's share of ``delta = rowsum(dO * out)``, ``sum_j p_j g_j (dO . Pv_j)`` ``[B, H, Sq]`` in
    ``acc``, from the merged log-sum-exp (base 2): in torch, for the CPU bias gradient only, so that its
    delta does not go through the output rounded to q's dtype (one ``[B, H, Sq, L]`` tensor)."""
    B, H, Sq, _ = q.shape
    Hkv, L = prefix_k.shape[-3], prefix_k.shape[-2]
    eq = "bkgsd,{p}ld->bkgsl".format(p="bk" if prefix_k.dim() == 4 else "k")
    z = torch.einsum(eq, q.to(acc).unflatten(1, (Hkv, H // Hkv)), prefix_k.to(acc)).flatten(1, 2) * scale
    e = torch.einsum(eq, do.to(acc).unflatten(1, (Hkv, H // Hkv)), prefix_v.to(acc)).flatten(1, 2)
    g = gate.to(acc).unsqueeze(1) if gate is not None else 1.0  # [B|1, 1, Sq|1, L|1]
    p = torch.exp(z * g - lse.to(acc).unsqueeze(-1) * LN2)
    return (p * g * e).sum(-1)


# --------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile) and the autograd.Function that chains them
# --------------------------------------------------------------------------------------------

Tensor = torch.Tensor


@torch.library.custom_op("fastprefix::split_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, gate: Optional[Tensor],
            key_padding_mask: Optional[Tensor], causal: bool, scale: float, op: str,
            attn_bias: Optional[Tensor] = None, window_left: int = -1,
            window_right: int = -1) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, op, attn_bias,
                    _window(window_left, window_right))


@_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, op, attn_bias=None, window_left=-1,
      window_right=-1):
    B, H, Sq, D = q.shape
    acc = _acc_dtype(q)
    out = q.new_empty((B, Sq, H, D)).transpose(1, 2)
    return (out, q.new_empty((B, H, Sq), dtype=acc), vendor.lse_like(op, q), *vendor.rng_like(op, q))


@torch.library.custom_op("fastprefix::split_attention_bwd", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, gate: Optional[Tensor],
            key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor, lse_k: Tensor, seed: Tensor, offset: Tensor,
            causal: bool, scale: float, op: str, attn_bias: Optional[Tensor] = None, window_left: int = -1,
            window_right: int = -1,
            bias_grad: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, lse_k, seed, offset, causal,
                     scale, op, attn_bias, _window(window_left, window_right), bias_grad)


@_bwd_op.register_fake
def _(do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, lse_k, seed, offset, causal, scale, op,
      attn_bias=None, window_left=-1, window_right=-1, bias_grad=False):
    B, _, Sq, _ = q.shape
    dg = q.new_empty((B, Sq, prefix_k.shape[-2]) if gate is not None else (0,), dtype=_acc_dtype(q))
    dbias = attn_bias.new_empty(attn_bias.shape) if bias_grad else q.new_empty((0,))
    return (*vendor.grads_like(op, q, k, v), torch.empty_like(prefix_k), torch.empty_like(prefix_v), dg, dbias)


def _window(left: int, right: int):
    """The custom ops' two ints back to an effective window pair, None for (-1, -1)."""
    return None if left == -1 and right == -1 else (left, right)


class SplitAttentionFunction(torch.autograd.Function):
    """Forward and backward of the split path (vendor op + Triton prefix merge)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, op, attn_bias=None,
                window=None):
        left, right = window if window is not None else (-1, -1)
        out, lse, lse_k, seed, offset = torch.ops.fastprefix.split_attention_fwd(
            q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, op, attn_bias, left, right)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, attn_bias, out, lse, lse_k, seed,
                              offset)
        ctx.causal, ctx.scale, ctx.op, ctx.window = causal, scale, op, (left, right)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, prefix_k, prefix_v, gate, key_padding_mask, attn_bias, out, lse, lse_k, seed, offset = \
            ctx.saved_tensors
        bias_grad = attn_bias is not None and ctx.needs_input_grad[10]
        dq, dk, dv, dpk, dpv, dg, dbias = torch.ops.fastprefix.split_attention_bwd(
            do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, lse_k, seed, offset, ctx.causal,
            ctx.scale, ctx.op, attn_bias, *ctx.window, bias_grad)
        dgate = dg.sum_to_size(gate.shape).to(gate.dtype) if gate is not None else None
        return dq, dk, dv, dpk, dpv, dgate, None, None, None, None, dbias if bias_grad else None, None


def split_attention(q, k, v, prefix_k, prefix_v, *, gate=None, key_padding_mask=None, causal=False, scale=None,
                    attn_bias=None, window=None, op=None):
    """Gated-prefix attention on the split path; same contract as the reference.

    Args:
        q: ``[B, H, Sq, D]``; k, v: ``[B, Hkv, Sk, D]``; prefix_k, prefix_v: ``[Hkv, L, D]`` (shared) or
            ``[B, Hkv, L, D]``; gate: None or broadcastable to ``[B, Sq, L]`` (at most 3 dims);
            key_padding_mask: ``[B, Sk]`` bool, True = real key; causal: bottom-right; scale: default
            ``D ** -0.5``.
        attn_bias: None or broadcastable to ``[B, H, Sq, Sk]`` (at most 4 dims; q's dtype or float32), added
            to the real keys' logits (the vendor op's additive mask); gets its gradient when it requires grad.
        window: None or ``(left, right)`` (-1 = unbounded) hiding real keys outside
            ``[t' - left, t' + right]``, ``t' = t + Sk - Sq``; the prefix stays visible.
        op: the vendor op (kernels/vendor_attention.py); default: :func:`vendor_attention.choose_op`.

    There is no ``softcap``: no vendor op caps the logits (kernels/attention_path.py sends such calls to
    the fused kernel).

    Returns:
        ``[B, H, Sq, D]`` in q's dtype, stored as ``[B, Sq, H, D]`` (``out.transpose(1, 2)`` is contiguous).

    Raises:
        ValueError: when no vendor op supports the call (the dispatcher then takes the fused kernel) or
        D > 128. Inputs are otherwise expected to be validated by ``fastprefix.ops``.
    """
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    if D > 128:
        raise ValueError(f"the split path supports head dim <= 128, got {D}")
    window = vendor.effective_window(window, bool(causal), Sq, Sk)
    if op is None:
        cap = _arch_of(q)
        bias_dtype = None if attn_bias is None else attn_bias.dtype
        op = vendor.choose_op(q.device.type, cap, q.dtype, D, key_padding_mask is not None, bool(causal), Sq, Sk,
                              bias_dtype=bias_dtype, has_window=window is not None)
        if op is None:
            raise ValueError(f"no vendor attention op for {q.device.type} (capability {cap}), {q.dtype}, D={D}, "
                             f"padding mask {key_padding_mask is not None}, attn_bias {bias_dtype}, "
                             f"window {window}: use the fused kernel")
    if gate is not None:
        gate = gate.reshape((1,) * (3 - gate.dim()) + tuple(gate.shape))  # [B|1, Sq|1, L|1], a view
    # [B|1, H|1, Sq|1, Sk|1], a view: autograd takes its gradient back to the caller's shape
    attn_bias = vendor.bias4(attn_bias)
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask != 0
    scale = D ** -0.5 if scale is None else scale
    del B, H
    return SplitAttentionFunction.apply(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, bool(causal),
                                        float(scale), op, attn_bias, window)


# --------------------------------------------------------------------------------------------
# Ahead-of-time fitness (see kernels/fitness.py)
# --------------------------------------------------------------------------------------------


def fitness_configs():
    """Every launch config the launchers can pick on sm_80, sm_86 and sm_90 for fp16 and bf16 at D in
    {64, 128}, with a gate and the widest prefix tile of the config."""
    from .fitness import signature_of

    floats = ("qk_hi", "qk_lo", "l2e_hi", "l2e_lo", "sc_hi", "sc_lo")
    for arch in (80, 86, 90):  # sm_86 stands for sm_86/89 (sm_80's tiles, 99 KB of shared memory)
        for torch_dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            dot = tl.float16 if torch_dtype == torch.float16 else tl.bfloat16
            ptr = "*" + name
            for D in (64, 128):
                tag = f"sm{arch} {name} D{D}"
                for kind, kernel in (("fwd", _merge_fwd_kernel), ("bwd_dq", _merge_bwd_dq_kernel),
                                     ("bwd_prefix", _merge_bwd_prefix_kernel)):
                    bm, bl, nw, ns = pick_config(kind, D, arch)
                    cx = dict(BLOCK_M=bm, BLOCK_L=bl, BLOCK_D=D, HAS_GATE=True, EVEN_D=True,
                              ACC=tl.float32, DOT=dot, PREC="tf32")
                    ptrs = {n: ptr for n in ("Q", "PK", "PV", "GATE", "OK", "OUT", "DO", "DQ")}
                    ptrs.update(GATE="*fp32", LSEK="*fp32", LSE="*fp32", DELTA="*fp32", DPK="*fp32", DPV="*fp32", DG="*fp32")
                    names = set(kernel.arg_names)
                    ones = {"stride_gl", "stride_lkm"} & names
                    div16 = {n for n in names if n.startswith("stride_") and n[-1] in "bhmn" and n not in ones
                             and not n.startswith(("stride_g", "stride_lk"))} | {"D"}
                    ptrs = {n: t for n, t in ptrs.items() if n in names}
                    sig, cx, attrs = signature_of(kernel, ptrs, cx, floats, ones, div16)
                    yield f"merge.{kind} gate {tag}", kernel, sig, cx, nw, ns, arch, attrs
