"""Gated-prefix flash attention (P-Tuning v2 and APT) in Triton, forward and backward.

Math (one query head, query row t; prefix rows j < L, real keys u < Sk):

    s[t, j]     = scale * (q_t . Pk_j)                  raw prefix score
    logit[t, j] = g[t, j] * s[t, j]                     the gate scales the prefix key ...
    logit[t, u] = scale * (q_t . k_u)  (-inf if masked)
    p           = softmax over all L + Sk logits of row t
    out_t       = sum_j p[t, j] g[t, j] Pv_j + sum_u p[t, u] v_u   ... and the prefix value

g is 1 without a gate (P-Tuning v2), a tensor broadcastable to [B, Sq, L] (APT, precomputed),
or APT's fused form g = layer_scale * sigmoid(gate_hidden @ gate_weight + gate_bias), which the
forward kernel evaluates per query tile and never writes to global memory. A zero gate gives
logit 0 (the prefix row keeps mass exp(0) and adds no value); that is the method's math.

Forward (FlashAttention-2 style): one program per (query tile, batch * head). It streams first
the prefix tiles, then the key tiles, with an online softmax in log2 units, and saves the
row log-sum-exp (base 2). Neither [Pk ; K] nor the Sq x (L + Sk) score matrix is ever built;
a shared prefix [Hkv, L, D] is read through a batch stride of 0, never expanded.

Backward. With e[t, j] = dO_t . Pv_j and delta_t = dO_t . out_t = sum_i p[t, i] dP[t, i]:

    dP[t, j]  = dO_t . (g Pv_j) = g e                   dP[t, u] = dO_t . v_u
    dz[t, j]  = p (g e - delta)                         dz[t, u] = p (dP[t, u] - delta)
    dq_t     += scale * sum_j dz g Pk_j + scale * sum_u dz k_u
    dPk_j    += scale * sum_t dz g q_t                  dk_u += scale * sum_t dz q_t
    dPv_j    += sum_t p g dO_t                          dv_u += sum_t p dO_t
    dg[t, j]  = dz * s + p * e                          (logit = g s and value = g Pv_j)
              = p (s (g e - delta) + e)

The gate gradient is summed over the query heads (the gate is shared by heads) and then
reduced to the broadcast shape the caller passed (e.g. [B, 1, L] for the pooled gate). For
the fused gate, with a = hidden @ W + b, sig = sigmoid(a), g = lambda * sig:
d lambda = sum dg sig, da = dg lambda sig (1 - sig), dW = hidden^T da, db = sum da,
d hidden = da W^T; that chain runs in PyTorch on the [B, Sq, L] gate gradient.

Three backward kernels, each owning what it writes, so the backward is deterministic (no
atomics; bitwise reproducible run to run): dq per (query tile, batch * head); dk, dv per (key
tile, batch * kv head) looping over the heads of its GQA group; dPk, dPv and dg per (prefix
tile, batch * kv head), looping over query tiles and the group's heads. delta is one torch
reduction. Workspace: prefix-gradient partials [B, Hkv, L, D] x 2 and gate-gradient partials
[B, Hkv, Sq, L], fp32, reduced by torch (sum over the batch for a shared prefix, over kv heads
for the gate).

Interfaces: ``gated_prefix_attention`` (same keyword signature as the reference) ->
``GatedPrefixAttentionFunction`` (autograd) -> the torch.library ops
``fastprefix::gated_prefix_attention_fwd`` / ``_bwd`` (with fake kernels, so torch.compile
keeps them as single graph nodes) -> the launchers -> the kernels. Launch configs are picked at
call time from the device's compute capability (the CPU interpreter gets one small config);
kernels/fitness.py compiles every one of them for sm_80 and sm_90 and checks for register
spills and shared memory. Set FASTPREFIX_POISON_OUTPUTS=1 to allocate outputs filled with NaN
(the tests do), so an element a kernel fails to write cannot pass unnoticed.

Supported: any B, Sq >= 1, Sk >= 1, L >= 1 (prefix always visible), GQA (H % Hkv == 0),
key padding masks [B, Sk] (True = real key), causal masks aligned bottom-right (query t sits
at position Sk - Sq + t, so Sq < Sk is decoding with a KV cache), head dim D <= 128 (masked
to a power of two), fp16 / bf16 / fp32 inputs with fp32 accumulation, fp64 (accumulated in
fp64; meant for gradcheck under the interpreter). Not supported: L = 0 (use plain attention),
D > 128, dropout, attention bias, top-left causal alignment, varlen packing.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import triton
import triton.language as tl

from ._runtime import interpreting, new_buffer

__all__ = ["gated_prefix_attention", "fitness_configs", "pick_config"]

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)

GATE_NONE, GATE_TENSOR, GATE_FUSED = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Compile-time choices derived from the arguments (flash-linear-attention style heuristics)
# --------------------------------------------------------------------------------------------


def _acc_dtype(t: torch.Tensor):
    """Accumulate in fp64 only for fp64 inputs (gradcheck); fp32 otherwise."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _dot_dtype(t: torch.Tensor):
    """Operand dtype of tl.dot. The interpreter has no bf16 arithmetic: use fp32 there."""
    if t.dtype == torch.float64:
        return tl.float64
    if t.dtype == torch.float16:
        return tl.float16
    if t.dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    return tl.float32


def _precision(dot_dtype) -> str:
    # fp32 tl.dot defaults to TF32 on GPU; fp32/fp64 inputs ask for IEEE products.
    return "ieee" if dot_dtype in (tl.float32, tl.float64) else "tf32"


def _gate_mode(args) -> int:
    if args["GH"] is not None:
        return GATE_FUSED
    return GATE_TENSOR if args["GATE"] is not None else GATE_NONE


def _gate_dot_dtype(args):
    """Operand dtype of the fused gate matmul: the inputs' own when hidden and weight agree,
    else the accumulator dtype (e.g. fp16 hidden states with an fp32 gate weight)."""
    gh, gw = args["GH"], args["GW"]
    if gh is not None and gh.dtype == gw.dtype:
        return _dot_dtype(gh)
    return _acc_dtype(args["Q"])


_COMMON_HEURISTICS = {
    "ACC": lambda a: _acc_dtype(a["Q"]),
    "DOT": lambda a: _dot_dtype(a["Q"]),
    "PREC": lambda a: _precision(_dot_dtype(a["Q"])),
    "HAS_PAD": lambda a: a["KPM"] is not None,
    "EVEN_D": lambda a: a["D"] == a["BLOCK_D"],
}


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _scaled(x, hi, lo, ACC: tl.constexpr):
    """x * c for a host constant c = hi + lo split into fp32 parts: scalar kernel arguments are
    fp32, so fp64 accumulation (gradcheck) adds the low part to keep c exact."""
    if ACC == tl.float64:
        return x * hi + x * lo  # promoted to fp64
    return x * hi


@triton.jit
def _fused_gate_tile(GH, GW, GB, LS, b, offs_m, m_ok, offs_j, j_ok, d_model, stride_ghb, stride_ghm,
                     stride_gwk, stride_gwl, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, ACC: tl.constexpr, GDOT: tl.constexpr, GPREC: tl.constexpr):
    """APT gate for one [BLOCK_M, BLOCK_N] tile: layer_scale * sigmoid(hidden @ W + bias)."""
    a = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    gh_base = GH + b.to(tl.int64) * stride_ghb
    for k0 in range(0, d_model, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < d_model
        hid = tl.load(gh_base + offs_m[:, None].to(tl.int64) * stride_ghm + offs_k[None, :],
                      mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(GDOT)
        w = tl.load(GW + offs_k[:, None].to(tl.int64) * stride_gwk + offs_j[None, :] * stride_gwl,
                    mask=k_ok[:, None] & j_ok[None, :], other=0.0).to(GDOT)
        a = tl.dot(hid, w, acc=a, input_precision=GPREC)
    a += tl.load(GB + offs_j, mask=j_ok, other=0.0).to(ACC)[None, :]
    lam = tl.load(LS).to(ACC)
    return lam / (1.0 + tl.exp(-a))


@triton.heuristics({
    **_COMMON_HEURISTICS,
    "GATE_MODE": _gate_mode,
    "GDOT": lambda a: _gate_dot_dtype(a),
    "GPREC": lambda a: _precision(_gate_dot_dtype(a)),
})
@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, GATE, GH, GW, GB, LS, KPM, OUT, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_gb, stride_gm, stride_gl,
    stride_ghb, stride_ghm, stride_gwk, stride_gwl,
    stride_kpmb,
    stride_ob, stride_oh, stride_om,
    H, GROUP, Sq, Sk, L, D, d_model, causal_offset, qk_hi, qk_lo,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, GATE_MODE: tl.constexpr, HAS_PAD: tl.constexpr, EVEN_D: tl.constexpr, ACC: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr, GDOT: tl.constexpr, GPREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Sq
    d_ok = (offs_d < D) | EVEN_D  # all true when D is a power of two: no head-dim mask

    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :])
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)

    # Prefix tiles: always visible, batch stride 0 when shared by the batch.
    pk_base = PK + b.to(tl.int64) * stride_pkb + hk.to(tl.int64) * stride_pkh
    pv_base = PV + b.to(tl.int64) * stride_pvb + hk.to(tl.int64) * stride_pvh
    for j0 in range(0, L, BLOCK_N):
        offs_j = j0 + offs_n
        j_ok = offs_j < L
        pk = tl.load(pk_base + offs_j[:, None].to(tl.int64) * stride_pkn + offs_d[None, :],
                     mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
        s = _scaled(tl.dot(q, tl.trans(pk), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)
        if GATE_MODE == 1:
            g = tl.load(GATE + b.to(tl.int64) * stride_gb + offs_m[:, None].to(tl.int64) * stride_gm
                        + offs_j[None, :] * stride_gl, mask=m_ok[:, None] & j_ok[None, :], other=0.0).to(ACC)
            s = s * g
        if GATE_MODE == 2:
            g = _fused_gate_tile(GH, GW, GB, LS, b, offs_m, m_ok, offs_j, j_ok, d_model, stride_ghb,
                                 stride_ghm, stride_gwk, stride_gwl, BLOCK_M, BLOCK_N, BLOCK_K, ACC, GDOT,
                                 GPREC)
            s = s * g
        s = tl.where(j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if GATE_MODE != 0:
            p = p * g  # the gate also scales the prefix value
        pv = tl.load(pv_base + offs_j[:, None].to(tl.int64) * stride_pvn + offs_d[None, :],
                     mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
        acc = tl.dot(p.to(DOT), pv, acc=acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    # Real key tiles. After the prefix every row max is finite, so masked tiles are harmless.
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    hi = Sk
    if IS_CAUSAL:
        hi = tl.minimum(Sk, tl.maximum(0, causal_offset + (pid_m + 1) * BLOCK_M))
    for u0 in range(0, hi, BLOCK_N):
        offs_u = u0 + offs_n
        u_ok = offs_u < Sk
        kt = tl.load(k_base + offs_u[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                     mask=u_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
        s = _scaled(tl.dot(q, tl.trans(kt), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)
        valid = u_ok[None, :]
        if HAS_PAD:
            real = tl.load(KPM + b.to(tl.int64) * stride_kpmb + offs_u, mask=u_ok, other=0)
            valid = valid & (real != 0)[None, :]
        if IS_CAUSAL:
            valid = valid & (offs_u[None, :] <= causal_offset + offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + offs_u[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                     mask=u_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
        acc = tl.dot(p.to(DOT), vt, acc=acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = (OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :])
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * Sq + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.heuristics({**_COMMON_HEURISTICS, "HAS_GATE": lambda a: a["GATE"] is not None})
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, GATE, KPM, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_gb, stride_gm, stride_gl,
    stride_kpmb,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    H, GROUP, Sq, Sk, L, D, causal_offset, qk_hi, qk_lo, sc_hi, sc_lo,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_PAD: tl.constexpr, EVEN_D: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """dq for one (query tile, batch * head): prefix tiles, then key tiles."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Sq
    d_ok = (offs_d < D) | EVEN_D  # all true when D is a power of two: no head-dim mask
    md_ok = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :], mask=md_ok, other=0.0).to(DOT)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :], mask=md_ok, other=0.0).to(DOT)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=float("inf")).to(ACC)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=0.0).to(ACC)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)

    pk_base = PK + b.to(tl.int64) * stride_pkb + hk.to(tl.int64) * stride_pkh
    pv_base = PV + b.to(tl.int64) * stride_pvb + hk.to(tl.int64) * stride_pvh
    for j0 in range(0, L, BLOCK_N):
        offs_j = j0 + offs_n
        j_ok = offs_j < L
        jd_ok = j_ok[:, None] & d_ok[None, :]
        pk = tl.load(pk_base + offs_j[:, None].to(tl.int64) * stride_pkn + offs_d[None, :], mask=jd_ok,
                     other=0.0).to(DOT)
        pv = tl.load(pv_base + offs_j[:, None].to(tl.int64) * stride_pvn + offs_d[None, :], mask=jd_ok,
                     other=0.0).to(DOT)
        s = _scaled(tl.dot(q, tl.trans(pk), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)
        e = tl.dot(do, tl.trans(pv), input_precision=PREC, out_dtype=ACC)
        if HAS_GATE:
            g = tl.load(GATE + b.to(tl.int64) * stride_gb + offs_m[:, None].to(tl.int64) * stride_gm
                        + offs_j[None, :] * stride_gl, mask=m_ok[:, None] & j_ok[None, :], other=0.0).to(ACC)
            s = s * g
            e = e * g
        p = tl.where(m_ok[:, None] & j_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dz = p * (e - delta[:, None])
        if HAS_GATE:
            dz = dz * g  # d logit / d q carries the gate
        dq = tl.dot(dz.to(DOT), pk, acc=dq, input_precision=PREC)

    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    hi = Sk
    if IS_CAUSAL:
        hi = tl.minimum(Sk, tl.maximum(0, causal_offset + (pid_m + 1) * BLOCK_M))
    for u0 in range(0, hi, BLOCK_N):
        offs_u = u0 + offs_n
        u_ok = offs_u < Sk
        ud_ok = u_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_base + offs_u[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=ud_ok,
                     other=0.0).to(DOT)
        vt = tl.load(v_base + offs_u[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=ud_ok,
                     other=0.0).to(DOT)
        s = _scaled(tl.dot(q, tl.trans(kt), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)
        valid = m_ok[:, None] & u_ok[None, :]
        if HAS_PAD:
            real = tl.load(KPM + b.to(tl.int64) * stride_kpmb + offs_u, mask=u_ok, other=0)
            valid = valid & (real != 0)[None, :]
        if IS_CAUSAL:
            valid = valid & (offs_u[None, :] <= causal_offset + offs_m[:, None])
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC, out_dtype=ACC)
        dz = p * (dp - delta[:, None])
        dq = tl.dot(dz.to(DOT), kt, acc=dq, input_precision=PREC)

    dq = _scaled(dq, sc_hi, sc_lo, ACC)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md_ok)


@triton.heuristics(_COMMON_HEURISTICS)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, KPM, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_kpmb,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, GROUP, Sq, Sk, D, causal_offset, qk_hi, qk_lo, sc_hi, sc_lo,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr, EVEN_D: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """dk, dv for one (key tile, batch * kv head), summed over the heads of its GQA group."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    Hkv = H // GROUP
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    offs_u = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_mm = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    u_ok = offs_u < Sk
    d_ok = (offs_d < D) | EVEN_D  # all true when D is a power of two: no head-dim mask
    ud_ok = u_ok[:, None] & d_ok[None, :]

    kt = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                 + offs_u[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=ud_ok, other=0.0).to(DOT)
    vt = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
                 + offs_u[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=ud_ok, other=0.0).to(DOT)
    key_ok = u_ok
    if HAS_PAD:
        real = tl.load(KPM + b.to(tl.int64) * stride_kpmb + offs_u, mask=u_ok, other=0)
        key_ok = key_ok & (real != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)

    lo = 0
    if IS_CAUSAL:  # queries before this key tile cannot see it
        lo = (tl.maximum(0, pid_n * BLOCK_N - causal_offset) // BLOCK_M) * BLOCK_M
    for hh in range(0, GROUP):
        h = hk * GROUP + hh
        bh = b * H + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        for m0 in range(lo, Sq, BLOCK_M):
            offs_m = m0 + offs_mm
            m_ok = offs_m < Sq
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :], mask=md_ok,
                        other=0.0).to(DOT)
            do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :], mask=md_ok,
                         other=0.0).to(DOT)
            lse = tl.load(LSE + bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=float("inf")).to(ACC)
            delta = tl.load(DELTA + bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=0.0).to(ACC)
            s_t = _scaled(tl.dot(kt, tl.trans(q), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)  # [BN, BM]
            valid = key_ok[:, None] & m_ok[None, :]
            if IS_CAUSAL:
                valid = valid & (offs_u[:, None] <= causal_offset + offs_m[None, :])
            p_t = tl.where(valid, tl.exp2(s_t - lse[None, :]), 0.0)
            dv = tl.dot(p_t.to(DOT), do, acc=dv, input_precision=PREC)
            dp_t = tl.dot(vt, tl.trans(do), input_precision=PREC, out_dtype=ACC)
            dz_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(dz_t.to(DOT), q, acc=dk, input_precision=PREC)

    dk = _scaled(dk, sc_hi, sc_lo, ACC)
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
             + offs_u[:, None].to(tl.int64) * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=ud_ok)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
             + offs_u[:, None].to(tl.int64) * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=ud_ok)


@triton.heuristics({**{k: v for k, v in _COMMON_HEURISTICS.items() if k != "HAS_PAD"},
                    "HAS_GATE": lambda a: a["GATE"] is not None})
@triton.jit
def _bwd_prefix_kernel(
    Q, PK, PV, GATE, DO, LSE, DELTA, DPK, DPV, DG,
    stride_qb, stride_qh, stride_qm,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_gb, stride_gm, stride_gl,
    stride_dob, stride_doh, stride_dom,
    H, GROUP, Sq, L, D, rows_per_split, qk_hi, qk_lo, sc_hi, sc_lo,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATE: tl.constexpr, EVEN_D: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """dPk, dPv and dg for one (prefix tile, batch * kv head, query split). Partials, contiguous:
    dPk, dPv [splits, B, Hkv, L, D] (one per query split and batch row), dg [B, Hkv, Sq, L]."""
    pid_j = tl.program_id(0)
    pid_bk = tl.program_id(1)
    pid_s = tl.program_id(2)
    Hkv = H // GROUP
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_mm = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    j_ok = offs_j < L
    d_ok = (offs_d < D) | EVEN_D  # all true when D is a power of two: no head-dim mask
    jd_ok = j_ok[:, None] & d_ok[None, :]

    pk = tl.load(PK + b.to(tl.int64) * stride_pkb + hk.to(tl.int64) * stride_pkh
                 + offs_j[:, None].to(tl.int64) * stride_pkn + offs_d[None, :], mask=jd_ok, other=0.0).to(DOT)
    pv = tl.load(PV + b.to(tl.int64) * stride_pvb + hk.to(tl.int64) * stride_pvh
                 + offs_j[:, None].to(tl.int64) * stride_pvn + offs_d[None, :], mask=jd_ok, other=0.0).to(DOT)
    dpk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dpv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)

    # Long sequences are split over a third grid axis so short prefixes still fill the GPU.
    for m0 in range(pid_s * rows_per_split, tl.minimum(Sq, (pid_s + 1) * rows_per_split), BLOCK_M):
        offs_m = m0 + offs_mm
        m_ok = offs_m < Sq
        md_ok = m_ok[:, None] & d_ok[None, :]
        valid = j_ok[:, None] & m_ok[None, :]
        if HAS_GATE:
            g_t = tl.load(GATE + b.to(tl.int64) * stride_gb + offs_m[None, :].to(tl.int64) * stride_gm
                          + offs_j[:, None] * stride_gl, mask=valid, other=0.0).to(ACC)  # [BN, BM]
            dg_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
        for hh in range(0, GROUP):
            h = hk * GROUP + hh
            bh = b * H + h
            q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                        + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :], mask=md_ok,
                        other=0.0).to(DOT)
            do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                         + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :], mask=md_ok,
                         other=0.0).to(DOT)
            lse = tl.load(LSE + bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=float("inf")).to(ACC)
            delta = tl.load(DELTA + bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=0.0).to(ACC)
            qpk = tl.dot(pk, tl.trans(q), input_precision=PREC, out_dtype=ACC)  # [BN, BM]
            logit_t = _scaled(qpk, qk_hi, qk_lo, ACC)  # log2 units
            e_t = tl.dot(pv, tl.trans(do), input_precision=PREC, out_dtype=ACC)  # dO . Pv
            if HAS_GATE:
                p_t = tl.where(valid, tl.exp2(logit_t * g_t - lse[None, :]), 0.0)
                dz_t = p_t * (g_t * e_t - delta[None, :])
                dg_t += dz_t * _scaled(qpk, sc_hi, sc_lo, ACC) + p_t * e_t  # dz * s + p * e
                dpv = tl.dot((p_t * g_t).to(DOT), do, acc=dpv, input_precision=PREC)
                dpk = tl.dot((dz_t * g_t).to(DOT), q, acc=dpk, input_precision=PREC)
            else:
                p_t = tl.where(valid, tl.exp2(logit_t - lse[None, :]), 0.0)
                dz_t = p_t * (e_t - delta[None, :])
                dpv = tl.dot(p_t.to(DOT), do, acc=dpv, input_precision=PREC)
                dpk = tl.dot(dz_t.to(DOT), q, acc=dpk, input_precision=PREC)
        if HAS_GATE:
            dg_ptrs = DG + pid_bk.to(tl.int64) * Sq * L + offs_m[None, :].to(tl.int64) * L + offs_j[:, None]
            tl.store(dg_ptrs, dg_t.to(DG.dtype.element_ty), mask=valid)

    dpk = _scaled(dpk, sc_hi, sc_lo, ACC)
    part_id = pid_s.to(tl.int64) * tl.num_programs(1) + pid_bk
    part = part_id * L * D + offs_j[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(DPK + part, dpk.to(DPK.dtype.element_ty), mask=jd_ok)
    tl.store(DPV + part, dpv.to(DPV.dtype.element_ty), mask=jd_ok)


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per GPU family, kernel and head-dim bucket. Every
# entry is compiled ahead of time for sm_80 / sm_90 (fp16 and bf16) by kernels/fitness.py and
# checked for register spills and shared memory; all sm_80 entries also fit the 99 KB of sm_86/89.
# A dense gate tile costs registers (at D=128, BLOCK_N=64 spills with it), the fused gate more.
_GPU_CONFIGS = {
    80: {
        "fwd": {64: (128, 64, 8, 3), 128: (128, 64, 8, 2)},
        "fwd_gate": {64: (128, 64, 8, 3), 128: (128, 32, 8, 2)},
        "fwd_fused": {64: (128, 64, 8, 3), 128: (128, 32, 8, 2)},
        "bwd_dq": {64: (128, 64, 8, 2), 128: (128, 32, 8, 2)},
        "bwd_dkdv": {64: (32, 64, 4, 2), 128: (32, 32, 8, 2)},
        "bwd_prefix": {64: (32, 32, 8, 2), 128: (32, 32, 8, 2)},
    },
    90: {
        "fwd": {64: (128, 64, 8, 3), 128: (128, 64, 8, 2)},
        "fwd_gate": {64: (128, 64, 8, 3), 128: (128, 32, 8, 2)},
        "fwd_fused": {64: (128, 64, 8, 3), 128: (128, 32, 8, 2)},
        "bwd_dq": {64: (128, 64, 8, 2), 128: (128, 32, 8, 2)},
        "bwd_dkdv": {64: (64, 64, 8, 2), 128: (64, 64, 8, 2)},
        "bwd_prefix": {64: (32, 64, 8, 2), 128: (32, 32, 8, 2)},
    },
}
# The interpreter runs programs one after another: few, moderately sized tiles are fastest,
# and BLOCK_N = 32 still splits the test shapes into several prefix and key tiles.
_INTERPRETER_CONFIG = (64, 32, 4, 1)
_GATE_BLOCK_K = 32  # hidden-size chunk of the fused APT gate matmul


def _head_dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128


def pick_config(kind: str, block_d: int, arch: Optional[int]) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for kernel `kind` on `arch` (None: interpreter)."""
    if arch is None:
        return _INTERPRETER_CONFIG
    return _GPU_CONFIGS[90 if arch >= 90 else 80][kind][_head_dim_bucket(block_d)]


def _arch_of(t: torch.Tensor) -> Optional[int]:
    """Compute capability as 80/90/..., queried at call time; None for the CPU interpreter."""
    if t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _rows_per_split(Sq: int, block_m: int, programs: int, like: torch.Tensor) -> int:
    """Query rows per program of the prefix-gradient kernel (a multiple of block_m). On GPU the
    query range is split until there are about two programs per SM (at most 16 splits); the
    interpreter splits in two whenever it can, so the tests cover the split path."""
    tiles = triton.cdiv(Sq, block_m)
    if like.device.type == "cuda":
        sms = torch.cuda.get_device_properties(like.device).multi_processor_count
        splits = min(16, max(1, triton.cdiv(2 * sms, programs)))
    else:
        splits = 2
    return triton.cdiv(tiles, min(splits, tiles)) * block_m


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Kernels address the last dim with unit stride; everything else goes through strides."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _split(c: float) -> tuple:
    """c as fp32 high and low parts (see _scaled)."""
    hi = float(torch.tensor(c, dtype=torch.float32))
    return hi, c - hi


def _acc_torch_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _prefix_strides(p: torch.Tensor):
    """(batch, head, row) strides; batch stride 0 for a prefix shared by the batch."""
    if p.dim() == 3:
        return 0, p.stride(0), p.stride(1)
    return p.stride(0), p.stride(1), p.stride(2)


def _gate_strides(gate: Optional[torch.Tensor], B: int, Sq: int, L: int):
    if gate is None:
        return 0, 0, 0
    g = gate.expand(B, Sq, L)  # a view: broadcast dims get stride 0
    return g.stride()


def _forward(q, k, v, prefix_k, prefix_v, gate, gate_hidden, gate_weight, gate_bias, layer_scale,
             key_padding_mask, causal: bool, scale: float):
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    L = prefix_k.shape[-2]
    q, k, v, prefix_k, prefix_v = map(_rows, (q, k, v, prefix_k, prefix_v))
    out = new_buffer((B, H, Sq, D), q.dtype, q.device)
    lse = new_buffer((B, H, Sq), _acc_torch_dtype(q), q.device)

    gh_strides, gw_strides, d_model = (0, 0), (0, 0), 1
    if gate_hidden is not None:
        d_model = gate_hidden.shape[-1]
        gate_hidden = _rows(gate_hidden)
        gh_strides = gate_hidden.expand(B, Sq, d_model).stride()[:2]
        gw_strides = gate_weight.stride()
        gate_bias = gate_bias.contiguous()
    kpm_stride = 0
    if key_padding_mask is not None:
        key_padding_mask = _rows(key_padding_mask)
        kpm_stride = key_padding_mask.stride(0)

    block_d = _block_d(D)
    kind = "fwd_fused" if gate_hidden is not None else "fwd_gate" if gate is not None else "fwd"
    block_m, block_n, num_warps, num_stages = pick_config(kind, block_d, _arch_of(q))
    grid = (triton.cdiv(Sq, block_m), B * H)
    _fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, gate, gate_hidden, gate_weight, gate_bias, layer_scale,
        key_padding_mask, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
        *_gate_strides(gate, B, Sq, L), *gh_strides, *gw_strides, kpm_stride,
        *out.stride()[:3],
        H, H // Hkv, Sq, Sk, L, D, d_model, Sk - Sq, *_split(scale * LOG2E),
        IS_CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=_GATE_BLOCK_K,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def _backward(do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, causal: bool,
              scale: float):
    """Returns dq, dk, dv, dprefix_k, dprefix_v and the gate gradient [B, Sq, L] in the
    accumulator dtype (an empty tensor without a gate)."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    L = prefix_k.shape[-2]
    acc = _acc_torch_dtype(q)
    do, q, k, v, prefix_k, prefix_v, out = map(_rows, (do, q, k, v, prefix_k, prefix_v, out))
    delta = (do.to(acc) * out.to(acc)).sum(-1).contiguous()  # [B, H, Sq]: dO_t . out_t
    kpm_stride = 0
    if key_padding_mask is not None:
        key_padding_mask = _rows(key_padding_mask)
        kpm_stride = key_padding_mask.stride(0)
    g_strides = _gate_strides(gate, B, Sq, L)
    block_d = _block_d(D)
    arch = _arch_of(q)
    common = (H, H // Hkv)
    scales = (*_split(scale * LOG2E), *_split(scale))

    dq = new_buffer((B, H, Sq, D), q.dtype, q.device)
    bm, bn, nw, ns = pick_config("bwd_dq", block_d, arch)
    _bwd_dq_kernel[(triton.cdiv(Sq, bm), B * H)](
        q, k, v, prefix_k, prefix_v, gate, key_padding_mask, do, lse, delta, dq,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *_prefix_strides(prefix_k), *_prefix_strides(prefix_v), *g_strides, kpm_stride,
        *do.stride()[:3], *dq.stride()[:3],
        *common, Sq, Sk, L, D, Sk - Sq, *scales,
        IS_CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=nw, num_stages=ns,
    )

    dk = new_buffer((B, Hkv, Sk, D), k.dtype, k.device)
    dv = new_buffer((B, Hkv, Sk, D), v.dtype, v.device)
    bm, bn, nw, ns = pick_config("bwd_dkdv", block_d, arch)
    _bwd_dkdv_kernel[(triton.cdiv(Sk, bn), B * Hkv)](
        q, k, v, key_padding_mask, do, lse, delta, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], kpm_stride,
        *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        *common, Sq, Sk, D, Sk - Sq, *scales,
        IS_CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=nw, num_stages=ns,
    )

    # Partials: prefix grads per batch row, gate grads per kv head; reduced below by torch.
    bm, bn, nw, ns = pick_config("bwd_prefix", block_d, arch)
    rows_per_split = _rows_per_split(Sq, bm, triton.cdiv(L, bn) * B * Hkv, q)
    splits = triton.cdiv(Sq, rows_per_split)
    dpk = new_buffer((splits, B, Hkv, L, D), acc, q.device)
    dpv = new_buffer((splits, B, Hkv, L, D), acc, q.device)
    dg = new_buffer((B, Hkv, Sq, L), acc, q.device) if gate is not None else None
    _bwd_prefix_kernel[(triton.cdiv(L, bn), B * Hkv, splits)](
        q, prefix_k, prefix_v, gate, do, lse, delta, dpk, dpv, dg,
        *q.stride()[:3], *_prefix_strides(prefix_k), *_prefix_strides(prefix_v), *g_strides,
        *do.stride()[:3],
        *common, Sq, L, D, rows_per_split, *scales,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=nw, num_stages=ns,
    )
    dpk, dpv = dpk.sum(0), dpv.sum(0)  # over query splits (fixed order: deterministic)
    if prefix_k.dim() == 3:  # shared by the batch
        dpk, dpv = dpk.sum(0), dpv.sum(0)
    dg = dg.sum(1) if dg is not None else q.new_empty((0,), dtype=acc)
    return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype), dg


# --------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile) and the autograd.Function that chains them
# --------------------------------------------------------------------------------------------

Tensor = torch.Tensor


@torch.library.custom_op("fastprefix::gated_prefix_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, gate: Optional[Tensor],
            gate_hidden: Optional[Tensor], gate_weight: Optional[Tensor], gate_bias: Optional[Tensor],
            layer_scale: Optional[Tensor], key_padding_mask: Optional[Tensor], causal: bool,
            scale: float) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, prefix_k, prefix_v, gate, gate_hidden, gate_weight, gate_bias, layer_scale,
                    key_padding_mask, causal, scale)


@_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, gate, gate_hidden, gate_weight, gate_bias, layer_scale, key_padding_mask,
      causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_acc_torch_dtype(q))


@torch.library.custom_op("fastprefix::gated_prefix_attention_bwd", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
            gate: Optional[Tensor], key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor, causal: bool,
            scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, causal, scale)


@_bwd_op.register_fake
def _(do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, causal, scale):
    B, _, Sq, _ = q.shape
    acc = _acc_torch_dtype(q)
    dg = q.new_empty((B, Sq, prefix_k.shape[-2]) if gate is not None else (0,), dtype=acc)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(prefix_k),
            torch.empty_like(prefix_v), dg)


def _fused_gate_parts(gate_hidden, gate_weight, gate_bias, layer_scale, acc):
    """sigmoid(hidden @ W + b) and the gate, recomputed in `acc` for the backward chain rule."""
    sig = torch.sigmoid(gate_hidden.to(acc) @ gate_weight.to(acc) + gate_bias.to(acc))
    return sig, layer_scale.to(acc) * sig


class GatedPrefixAttentionFunction(torch.autograd.Function):
    """Forward and backward of the gated-prefix attention through the Triton kernels."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, gate, gate_hidden, gate_weight, gate_bias, layer_scale,
                key_padding_mask, causal, scale):
        out, lse = torch.ops.fastprefix.gated_prefix_attention_fwd(
            q, k, v, prefix_k, prefix_v, gate, gate_hidden, gate_weight, gate_bias, layer_scale,
            key_padding_mask, causal, scale)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate, gate_hidden, gate_weight, gate_bias,
                              layer_scale, key_padding_mask, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, do):
        (q, k, v, prefix_k, prefix_v, gate, gate_hidden, gate_weight, gate_bias, layer_scale,
         key_padding_mask, out, lse) = ctx.saved_tensors
        acc = _acc_torch_dtype(q)
        sig = None
        if gate_hidden is not None:
            sig, gate_eff = _fused_gate_parts(gate_hidden, gate_weight, gate_bias, layer_scale, acc)
        else:
            gate_eff = gate
        dq, dk, dv, dpk, dpv, dg_full = torch.ops.fastprefix.gated_prefix_attention_bwd(
            do, q, k, v, prefix_k, prefix_v, gate_eff, key_padding_mask, out, lse, ctx.causal, ctx.scale)

        dgate = d_hidden = d_weight = d_bias = d_scale = None
        if gate is not None:
            dgate = dg_full.sum_to_size(gate.shape).to(gate.dtype)
        if gate_hidden is not None:
            dg = dg_full.sum_to_size(sig.shape)  # e.g. [B, 1, L] for a pooled hidden state
            d_scale = (dg * sig).sum().reshape(layer_scale.shape).to(layer_scale.dtype)
            da = dg * layer_scale.to(acc) * sig * (1.0 - sig)
            d_hidden = (da @ gate_weight.to(acc).t()).to(gate_hidden.dtype)
            d_weight = (gate_hidden.to(acc).reshape(-1, gate_hidden.shape[-1]).t()
                        @ da.reshape(-1, da.shape[-1])).to(gate_weight.dtype)
            d_bias = da.reshape(-1, da.shape[-1]).sum(0).reshape(gate_bias.shape).to(gate_bias.dtype)
        return dq, dk, dv, dpk, dpv, dgate, d_hidden, d_weight, d_bias, d_scale, None, None, None


def gated_prefix_attention(q, k, v, prefix_k, prefix_v, *, gate=None, gate_hidden=None, gate_weight=None,
                           gate_bias=None, layer_scale=None, key_padding_mask=None, causal=False, scale=None):
    """Gated-prefix attention on the Triton kernels; same contract as the reference.

    q [B, H, Sq, D]; k, v [B, Hkv, Sk, D]; prefix_k, prefix_v [Hkv, L, D] (shared) or
    [B, Hkv, L, D]; gate broadcastable to [B, Sq, L], or the fused APT inputs gate_hidden
    [B, Sq or 1, d], gate_weight [d, L], gate_bias [L], layer_scale (0-dim); key_padding_mask
    [B, Sk] bool, True = real key. Returns [B, H, Sq, D] in q's dtype. Inputs are expected to be
    validated by fastprefix.ops; only the kernel's own limits are checked here.
    """
    D = q.shape[-1]
    if D > 128:
        raise ValueError(f"triton gated_prefix_attention supports head dim <= 128, got {D}")
    if gate is not None and gate_hidden is not None:
        raise ValueError("pass either gate or the fused gate inputs (gate_hidden, ...), not both")
    if gate_hidden is not None:
        if gate_weight is None:
            raise ValueError("gate_hidden needs gate_weight")
        if gate_bias is None:
            gate_bias = gate_weight.new_zeros(gate_weight.shape[-1])
        if layer_scale is None:
            layer_scale = gate_weight.new_ones(())
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask != 0
    if scale is None:
        scale = D ** -0.5
    return GatedPrefixAttentionFunction.apply(q, k, v, prefix_k, prefix_v, gate, gate_hidden, gate_weight,
                                              gate_bias, layer_scale, key_padding_mask, bool(causal),
                                              float(scale))


# --------------------------------------------------------------------------------------------
# Ahead-of-time fitness (see kernels/fitness.py)
# --------------------------------------------------------------------------------------------


def fitness_configs():
    """Every launch config the launchers can pick on sm_80 / sm_90 for fp16 and bf16 at D in
    {64, 128}, with all optional features on (causal, padding, and each forward gate mode)."""
    from .fitness import signature_of

    floats = ("qk_hi", "qk_lo", "sc_hi", "sc_lo")

    def spec(fn, ptrs, cx):
        # as launched on contiguous tensors: unit last-dim strides of gate / gate weight, 16-divisible
        # row strides and head dim (D in {64, 128}); lengths and the other strides stay generic.
        names = set(fn.arg_names)
        ones = {"stride_gl", "stride_gwl"} & names
        div16 = {n for n in names if re.fullmatch(r"stride_(q|k|v|pk|pv|do|dq|dk|dv|o)[bhmn]", n)} | {"D"}
        return signature_of(fn, ptrs, cx, floats, ones, div16)

    for arch in (80, 90):
        for torch_dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            dot = tl.float16 if torch_dtype == torch.float16 else tl.bfloat16
            ptr, f32 = "*" + name, "*fp32"
            flags = dict(ACC=tl.float32, DOT=dot, PREC="tf32", EVEN_D=True)
            for D in (64, 128):
                tag = f"sm{arch} {name} D{D}"
                for mode, mode_name in ((GATE_NONE, "none"), (GATE_TENSOR, "tensor"), (GATE_FUSED, "fused")):
                    kind = {GATE_NONE: "fwd", GATE_TENSOR: "fwd_gate", GATE_FUSED: "fwd_fused"}[mode]
                    bm, bn, nw, ns = pick_config(kind, D, arch)
                    cx = dict(flags, IS_CAUSAL=True, HAS_PAD=True, GATE_MODE=mode, GDOT=dot, GPREC="tf32",
                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D, BLOCK_K=_GATE_BLOCK_K)
                    if mode != GATE_TENSOR:
                        cx["GATE"] = None
                    if mode != GATE_FUSED:
                        cx.update(GH=None, GW=None, GB=None, LS=None)
                    ptrs = {n: ptr for n in ("Q", "K", "V", "PK", "PV", "GATE", "GH", "GW", "GB", "LS", "OUT")}
                    ptrs.update(KPM="*i1", LSE=f32)
                    fn = _fwd_kernel.fn
                    sig, cx, attrs = spec(fn, ptrs, cx)
                    yield f"attn.fwd gate={mode_name} {tag}", fn, sig, cx, nw, ns, arch, attrs

                bm, bn, nw, ns = pick_config("bwd_dq", D, arch)
                cx = dict(flags, IS_CAUSAL=True, HAS_PAD=True, HAS_GATE=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D)
                ptrs = {n: ptr for n in ("Q", "K", "V", "PK", "PV", "GATE", "DO", "DQ")}
                ptrs.update(KPM="*i1", LSE=f32, DELTA=f32)
                fn = _bwd_dq_kernel.fn
                sig, cx, attrs = spec(fn, ptrs, cx)
                yield f"attn.bwd_dq gate {tag}", fn, sig, cx, nw, ns, arch, attrs

                bm, bn, nw, ns = pick_config("bwd_dkdv", D, arch)
                cx = dict(flags, IS_CAUSAL=True, HAS_PAD=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D)
                ptrs = {n: ptr for n in ("Q", "K", "V", "DO", "DK", "DV")}
                ptrs.update(KPM="*i1", LSE=f32, DELTA=f32)
                fn = _bwd_dkdv_kernel.fn
                sig, cx, attrs = spec(fn, ptrs, cx)
                yield f"attn.bwd_dkdv {tag}", fn, sig, cx, nw, ns, arch, attrs

                bm, bn, nw, ns = pick_config("bwd_prefix", D, arch)
                cx = dict(flags, HAS_GATE=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D)
                ptrs = {n: ptr for n in ("Q", "PK", "PV", "GATE", "DO")}
                ptrs.update(LSE=f32, DELTA=f32, DPK=f32, DPV=f32, DG=f32)
                fn = _bwd_prefix_kernel.fn
                sig, cx, attrs = spec(fn, ptrs, cx)
                yield f"attn.bwd_prefix gate {tag}", fn, sig, cx, nw, ns, arch, attrs
