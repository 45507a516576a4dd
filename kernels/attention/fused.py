"""Gated-prefix attention (P-Tuning v2 and APT) as one fused Triton kernel, forward and backward.

What it computes. For one query head, query row t, prefix rows j < L (always visible) and real keys u < Sk:

    logit[t, j] = cap(g[t, j] * scale * (q_t . Pk_j))
    logit[t, u] = cap(scale * (q_t . k_u)) + bias[t, u]     (-inf where padding, causality or the window hide u)
    out_t       = sum_j p[t, j] g[t, j] Pv_j + sum_u p[t, u] v_u,   p = softmax over the L + Sk logits of row t

g is 1 (P-Tuning v2) or a gate broadcastable to [B, Sq, L] (APT; its gate inputs become that tensor once per
call, :func:`gate_tensor`); a zero gate gives logit 0 (the prefix row keeps mass exp(0) and adds no value).
cap(x) = c * tanh(x / c) with a softcap c, the identity otherwise. Backward, with s = scale q . Pk,
e[t, j] = dO_t . Pv_j and delta_t = dO_t . out_t:

    dz[t, j] = p (g e - delta)       dz[t, u] = p (dO_t . v_u - delta)      (d loss / d logit)
    dq_t  = scale (sum_j dz g Pk_j + sum_u dz k_u)      dk_u = scale sum_t dz q_t     dv_u = sum_t p dO_t
    dPk_j = scale sum_t dz g q_t     dPv_j = sum_t p g dO_t     dg = dz s + p e     dbias[t, u] = dz[t, u]

Under the cap every dz but the bias's (the bias joins after the cap) is first multiplied by cap'(x) = 1 -
tanh^2(x / c). The gate gradient is summed over the heads (one gate for all of them), the bias's over its
broadcast dims.

Based on FlashAttention-2 (Dao, 2023), forward and backward. The forward streams the prefix in its own tiles
(BLOCK_L = max(16, next_pow2(L)), capped per config; a shared prefix [Hkv, L, D] is read through a batch stride
of 0, per-row adapters' table [A, Hkv, L, D] at row prefix_index[b], up to that adapter's length: the constexpr
INDEXED, ``common.jit.prefix_of``), then the key tiles (BLOCK_N), through an online softmax in log2 units, and
saves the row log-sum-exp (base 2); neither [Pk ; K] nor the Sq x (L + Sk) scores ever exist in memory. The
backward recomputes the probabilities from it in four kernels, each owning what it writes (deterministic: no
atomics, bitwise reproducible; per-row adapters' table gradient sums its rows by ``index_add_``, deterministic
on CUDA under ``torch.use_deterministic_algorithms``): delta = dO . out; dq per query tile; dk, dv per key tile,
summed over the heads of its GQA group, its query tiles split into the causal diagonal or the window's edges
(masked), the interior (mask-free; padded keys' rows are zeroed once at the end) and the ragged tail; dPk, dPv,
dg per (prefix tile, query split) into fp32 partials that torch sums in a fixed order. The bias gradient is the
real keys' dz, written by the dq kernel (only when the bias requires grad) to a zero-filled [B, H, Sq, Sk] buffer.
Programs of (tile, batch * head) are folded into grid axis 0 (tile fastest: neighbours share a head's K/V in L2;
no 65,535 cap on B * H).

Caveats. Head dim D <= 128 (masked to a power of two); L >= 1; H % Hkv == 0; causal and the window are
bottom-right aligned (query t sits at position t + Sk - Sq); no dropout. A packed row (``spec.cu_seqlens``) is
served re-padded: its sequences gathered into a right-padded batch with a key padding mask
(``fastprefix.sequences.unpacked_call``, memoised per ``cu_seqlens`` tensor), the kernels run on it, and the
output is gathered back (``packed_output``); gradients flow through the gathers. fp16 / bf16 / fp32
inputs accumulate in fp32 (fp32 dots in IEEE precision, never TF32), fp64 in fp64 (for gradcheck under the
interpreter: on a GPU fp64 goes to the reference path). The bias joins after the cap, in q's dtype or fp32; the
window and the softcap are runtime arguments (one compiled kernel each way); a window that hides no key comes
here as none (``spec.window``), so the causal or mask-free code runs. Under TRITON_INTERPRET=1 bf16 operands are
upcast to fp32 and tanh is built from exp and log (no libdevice there). The feature variants (bias, window, cap)
run the default tiles with at most 2 pipeline stages, untuned: ``fitness --features`` reports register spills
for several of them (the tables are checked spill-free for the kernels P-Tuning v2 and APT launch).

Layers: kernels -> launchers (``_forward``, ``_backward``) -> torch.library ops
``fastprefix::gated_prefix_attention_fwd`` / ``_bwd`` (with fake kernels: single opaque nodes for
torch.compile) -> ``GatedPrefixAttentionFunction`` -> :func:`gated_prefix_attention`. Launch tables: configs.py.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ...sequences import packed_output, unpacked_call
from ...spec import LOG2E, AttentionSpec, acc_dtype
from ..common.jit import prefix_of, scaled, shift_of
from ..common.launch import (arch_of, block_d, folded_grid, gate_strides, numerics, options,
                             prefix_strides, prefix_tile, reduce_prefix_partials, rows_per_split, split_float,
                             table_args, unit_rows)
from ..common.runtime import interpreting, new_buffer
from . import configs

__all__ = ["gated_prefix_attention", "gate_tensor", "GatedPrefixAttentionFunction", "fitness_configs"]

# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tanh(x, LIBDEVICE: tl.constexpr):
    """tanh(x) to a few ulps. Compiled: libdevice. The interpreter has no tanh (and tl.math none):
    tanh|x| = -m / (2 + m) with m = expm1(-2|x|), and expm1 by Kahan's trick (u - 1) * a / log(u), u = exp(a),
    which is accurate to a few ulps for every a when exp and log are correctly rounded (numpy's are; the
    GPU's approximate log is not, hence libdevice there). 1 - exp(-2|x|) alone would lose all relative
    accuracy for small x."""
    if LIBDEVICE:
        return libdevice.tanh(x)
    a = -2.0 * tl.abs(x)
    u = tl.exp(a)
    um1 = u - 1.0
    exact = (u == 1.0) | (um1 == -1.0)  # expm1(a) is a itself, or -1
    m = tl.where(exact, tl.where(u == 1.0, a, -1.0), um1 * a / tl.log(tl.where(exact, 2.0, u)))
    t = -m / (2.0 + m)
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped(s, cap_hi, cap_lo, icap_hi, icap_lo, ACC: tl.constexpr, LIBDEVICE: tl.constexpr):
    """Soft-capping of logits in log2 units: (cap * tanh(s / cap), tanh(s / cap)) with cap = softcap * log2(e)
    = cap_hi + cap_lo and 1 / cap = icap_hi + icap_lo (the same tanh as in natural units); d capped / d s =
    1 - tanh^2."""
    t = _tanh(scaled(s, icap_hi, icap_lo, ACC), LIBDEVICE)
    return scaled(t, cap_hi, cap_lo, ACC), t


@triton.jit
def _log2_units(x, ACC: tl.constexpr):
    """x * log2(e), the constant exact in fp64 too (a bias joins the kernels' log2-unit logits)."""
    return x * tl.full([], 1.4426950408889634, ACC)


@triton.jit
def _in_window(offs_u, pos, win_left, win_right):
    """Real key u visible from absolute query position pos (broadcast shapes): pos - left <= u <= pos + right
    (an unbounded side arrives as Sq + Sk, which never binds)."""
    return (offs_u >= pos - win_left) & (offs_u <= pos + win_right)


@triton.jit
def _tile_of(pid, num_tiles):
    """Grid folding: program pid of the 1D grid -> (tile along the sequence, batch * head). The tile
    index varies fastest, so neighbouring programs share one head's K/V (or Q/dO) in L2, as with
    the 2D grid it replaces; one axis holds up to 2^31 - 1 programs, so B * H has no 65,535 cap."""
    return pid % num_tiles, pid // num_tiles


@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, PIDX, PLEN, GATE, KPM, BIAS, OUT, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_gb, stride_gm, stride_gl,
    stride_kpmb,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ob, stride_oh, stride_om,
    H, GROUP, Sq, Sk, L, D, causal_offset, win_left, win_right, qk_hi, qk_lo, cap_hi, cap_lo, icap_hi, icap_lo,
    num_m_tiles,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr, HAS_PAD: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr,
    INDEXED: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """out and the row log-sum-exp (base 2) for one (query tile, batch * head): the prefix tiles, then the
    key tiles, through one online softmax. A row that sees no key at all (INDEXED: an empty prefix, every
    real key hidden) gets out 0 and log-sum-exp +inf, so the backward's exp2(s - lse) is 0 for it."""
    pid_m, pid_bh = _tile_of(tl.program_id(0), num_m_tiles)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_l = tl.arange(0, BLOCK_L)
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

    # Prefix tiles of BLOCK_L rows (a short prefix fills one small tile): always visible, batch
    # stride 0 when shared by the batch; with per-row adapters the row's own table row, up to its length.
    a, n_pre = prefix_of(PIDX, PLEN, b, L, INDEXED)
    pk_base = PK + a * stride_pkb + hk.to(tl.int64) * stride_pkh
    pv_base = PV + a * stride_pvb + hk.to(tl.int64) * stride_pvh
    for j0 in range(0, n_pre, BLOCK_L):
        offs_j = j0 + offs_l
        j_ok = offs_j < n_pre
        pk = tl.load(pk_base + offs_j[:, None].to(tl.int64) * stride_pkn + offs_d[None, :],
                     mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
        s = scaled(tl.dot(q, tl.trans(pk), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)
        if HAS_GATE:
            g = tl.load(GATE + b.to(tl.int64) * stride_gb + offs_m[:, None].to(tl.int64) * stride_gm
                        + offs_j[None, :] * stride_gl, mask=m_ok[:, None] & j_ok[None, :], other=0.0).to(ACC)
            s = s * g
        if HAS_SOFTCAP:
            s, _ = _capped(s, cap_hi, cap_lo, icap_hi, icap_lo, ACC, LIBDEVICE)
        s = tl.where(j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_GATE:
            p = p * g  # the gate also scales the prefix value
        pv = tl.load(pv_base + offs_j[:, None].to(tl.int64) * stride_pvn + offs_d[None, :],
                     mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
        acc = tl.dot(p.to(DOT), pv, acc=acc * alpha[:, None], input_precision=PREC, out_dtype=ACC)
        m_i = m_new

    # Real key tiles. After a non-empty prefix every row max is finite, so masked tiles are harmless; an empty
    # one (INDEXED) takes the -inf-safe shift.
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    lo = 0
    hi = Sk
    if IS_CAUSAL:
        hi = tl.minimum(Sk, tl.maximum(0, causal_offset + (pid_m + 1) * BLOCK_M))
    if HAS_WINDOW:  # the key tiles inside some query's window (causal is folded into win_right = 0)
        lo = (tl.maximum(0, causal_offset + pid_m * BLOCK_M - win_left) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(Sk, tl.maximum(0, causal_offset + (pid_m + 1) * BLOCK_M + win_right))
    for u0 in range(lo, hi, BLOCK_N):
        offs_u = u0 + offs_n
        u_ok = offs_u < Sk
        kt = tl.load(k_base + offs_u[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                     mask=u_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
        s = scaled(tl.dot(q, tl.trans(kt), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)
        if HAS_SOFTCAP:
            s, _ = _capped(s, cap_hi, cap_lo, icap_hi, icap_lo, ACC, LIBDEVICE)
        if HAS_BIAS:  # broadcast dims have stride 0
            bias = tl.load(BIAS + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
                           + offs_m[:, None].to(tl.int64) * stride_bm + offs_u[None, :].to(tl.int64) * stride_bn,
                           mask=m_ok[:, None] & u_ok[None, :], other=0.0).to(ACC)
            s = s + _log2_units(bias, ACC)
        valid = u_ok[None, :]
        if HAS_PAD:
            real = tl.load(KPM + b.to(tl.int64) * stride_kpmb + offs_u, mask=u_ok, other=0)
            valid = valid & (real != 0)[None, :]
        if IS_CAUSAL:
            valid = valid & (offs_u[None, :] <= causal_offset + offs_m[:, None])
        if HAS_WINDOW:
            valid = valid & _in_window(offs_u[None, :], causal_offset + offs_m[:, None], win_left, win_right)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = shift_of(m_new, INDEXED)
        alpha = tl.exp2(m_i - shift)
        p = tl.exp2(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + offs_u[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                     mask=u_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
        acc = tl.dot(p.to(DOT), vt, acc=acc * alpha[:, None], input_precision=PREC, out_dtype=ACC)
        m_i = m_new

    if INDEXED:  # a row that saw nothing: acc and l_i are 0, m_i is -inf
        seen = l_i > 0
        l_i = tl.where(seen, l_i, 1.0)
        m_i = tl.where(seen, m_i, float("inf"))
    lse = m_i + tl.log2(l_i)
    out = acc / l_i[:, None]
    o_ptrs = (OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :])
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_delta_kernel(
    DO, OUT, DELTA,
    stride_dob, stride_doh, stride_dom,
    stride_ob, stride_oh, stride_om,
    H, Sq, D, num_m_tiles,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ACC: tl.constexpr,
):
    """delta = dO . out per query row, [B * H, Sq] in the accumulator dtype: the first backward
    kernel, one read of dO and out (the dq kernel keeps its registers for the main loop)."""
    pid_m, pid_bh = _tile_of(tl.program_id(0), num_m_tiles)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Sq
    md_ok = m_ok[:, None] & ((offs_d < D) | EVEN_D)[None, :]
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :], mask=md_ok, other=0.0)
    o = tl.load(OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], mask=md_ok, other=0.0)
    tl.store(DELTA + pid_bh.to(tl.int64) * Sq + offs_m, tl.sum(do.to(ACC) * o.to(ACC), 1), mask=m_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, PIDX, PLEN, GATE, KPM, BIAS, DO, LSE, DELTA, DQ, DS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_gb, stride_gm, stride_gl,
    stride_kpmb,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    H, GROUP, Sq, Sk, L, D, causal_offset, win_left, win_right, qk_hi, qk_lo, sc_hi, sc_lo, cap_hi, cap_lo,
    icap_hi, icap_lo, num_m_tiles,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr, HAS_PAD: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    LIBDEVICE: tl.constexpr, INDEXED: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """dq for one (query tile, batch * head): prefix tiles, then key tiles. With BIAS_GRAD it also writes
    the real keys' dS = d loss / d logit (the bias gradient before its broadcast sum) to DS [B, H, Sq, Sk],
    for the key tiles it visits (the rest of DS stays zero: those keys are hidden)."""
    pid_m, pid_bh = _tile_of(tl.program_id(0), num_m_tiles)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_l = tl.arange(0, BLOCK_L)
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

    a, n_pre = prefix_of(PIDX, PLEN, b, L, INDEXED)
    pk_base = PK + a * stride_pkb + hk.to(tl.int64) * stride_pkh
    pv_base = PV + a * stride_pvb + hk.to(tl.int64) * stride_pvh
    for j0 in range(0, n_pre, BLOCK_L):
        offs_j = j0 + offs_l
        j_ok = offs_j < n_pre
        jd_ok = j_ok[:, None] & d_ok[None, :]
        pk = tl.load(pk_base + offs_j[:, None].to(tl.int64) * stride_pkn + offs_d[None, :], mask=jd_ok,
                     other=0.0).to(DOT)
        pv = tl.load(pv_base + offs_j[:, None].to(tl.int64) * stride_pvn + offs_d[None, :], mask=jd_ok,
                     other=0.0).to(DOT)
        s = scaled(tl.dot(q, tl.trans(pk), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)
        e = tl.dot(do, tl.trans(pv), input_precision=PREC, out_dtype=ACC)
        if HAS_GATE:
            g = tl.load(GATE + b.to(tl.int64) * stride_gb + offs_m[:, None].to(tl.int64) * stride_gm
                        + offs_j[None, :] * stride_gl, mask=m_ok[:, None] & j_ok[None, :], other=0.0).to(ACC)
            s = s * g
            e = e * g
        if HAS_SOFTCAP:
            s, tanh = _capped(s, cap_hi, cap_lo, icap_hi, icap_lo, ACC, LIBDEVICE)
        p = tl.where(m_ok[:, None] & j_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dz = p * (e - delta[:, None])
        if HAS_SOFTCAP:
            dz = dz * (1.0 - tanh * tanh)  # d cap(x) / dx
        if HAS_GATE:
            dz = dz * g  # d logit / d q carries the gate
        dq = tl.dot(dz.to(DOT), pk, acc=dq, input_precision=PREC, out_dtype=ACC)

    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    lo = 0
    hi = Sk
    if IS_CAUSAL:
        hi = tl.minimum(Sk, tl.maximum(0, causal_offset + (pid_m + 1) * BLOCK_M))
    if HAS_WINDOW:  # the same key tiles as the forward
        lo = (tl.maximum(0, causal_offset + pid_m * BLOCK_M - win_left) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(Sk, tl.maximum(0, causal_offset + (pid_m + 1) * BLOCK_M + win_right))
    for u0 in range(lo, hi, BLOCK_N):
        offs_u = u0 + offs_n
        u_ok = offs_u < Sk
        ud_ok = u_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_base + offs_u[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=ud_ok,
                     other=0.0).to(DOT)
        vt = tl.load(v_base + offs_u[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=ud_ok,
                     other=0.0).to(DOT)
        s = scaled(tl.dot(q, tl.trans(kt), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)
        if HAS_SOFTCAP:
            s, tanh = _capped(s, cap_hi, cap_lo, icap_hi, icap_lo, ACC, LIBDEVICE)
        if HAS_BIAS:
            bias = tl.load(BIAS + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
                           + offs_m[:, None].to(tl.int64) * stride_bm + offs_u[None, :].to(tl.int64) * stride_bn,
                           mask=m_ok[:, None] & u_ok[None, :], other=0.0).to(ACC)
            s = s + _log2_units(bias, ACC)
        valid = m_ok[:, None] & u_ok[None, :]
        if HAS_PAD:
            real = tl.load(KPM + b.to(tl.int64) * stride_kpmb + offs_u, mask=u_ok, other=0)
            valid = valid & (real != 0)[None, :]
        if IS_CAUSAL:
            valid = valid & (offs_u[None, :] <= causal_offset + offs_m[:, None])
        if HAS_WINDOW:
            valid = valid & _in_window(offs_u[None, :], causal_offset + offs_m[:, None], win_left, win_right)
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC, out_dtype=ACC)
        dz = p * (dp - delta[:, None])
        if BIAS_GRAD:  # the bias joins after the cap: its gradient is dz itself
            tl.store(DS + pid_bh.to(tl.int64) * Sq * Sk + offs_m[:, None].to(tl.int64) * Sk + offs_u[None, :],
                     dz.to(DS.dtype.element_ty), mask=m_ok[:, None] & u_ok[None, :])
        if HAS_SOFTCAP:
            dz = dz * (1.0 - tanh * tanh)
        dq = tl.dot(dz.to(DOT), kt, acc=dq, input_precision=PREC, out_dtype=ACC)

    dq = scaled(dq, sc_hi, sc_lo, ACC)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md_ok)


@triton.jit
def _dkdv_tile(dk, dv, kt, vt, q_base, do_base, lse_base, delta_base, bias_base, m0, offs_mm, offs_u, offs_d, d_ok,
               u_ok, Sq, stride_qm, stride_dom, stride_bm, stride_bn, causal_offset, win_left, win_right, qk_hi, qk_lo,
               cap_hi, cap_lo, icap_hi, icap_lo,
               CAUSAL_MASK: tl.constexpr, WINDOW_MASK: tl.constexpr, ROW_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr, EVEN_D: tl.constexpr, ACC: tl.constexpr,
               DOT: tl.constexpr, PREC: tl.constexpr):
    """One query tile's contribution to dk, dv of a key tile. Off the diagonal (or the window's edges)
    and inside Sq (CAUSAL_MASK = WINDOW_MASK = ROW_MASK = False) it has no mask arithmetic; padded keys
    need none either, since their dk, dv rows are zeroed once at the end (row u only depends on p[u, :])."""
    offs_m = m0 + offs_mm
    q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
    do_ptrs = do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :]
    m_ok = offs_m < Sq
    if ROW_MASK:  # the ragged last tile: rows past Sq load lse = +inf, hence p = 0
        q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
        do = tl.load(do_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf")).to(ACC)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0).to(ACC)
    else:
        if EVEN_D:
            q = tl.load(q_ptrs).to(DOT)
            do = tl.load(do_ptrs).to(DOT)
        else:
            q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0).to(DOT)
            do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0).to(DOT)
        lse = tl.load(lse_base + offs_m).to(ACC)
        delta = tl.load(delta_base + offs_m).to(ACC)
    s_t = scaled(tl.dot(kt, tl.trans(q), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)  # [BN, BM]
    if HAS_SOFTCAP:
        s_t, tanh_t = _capped(s_t, cap_hi, cap_lo, icap_hi, icap_lo, ACC, LIBDEVICE)
    if HAS_BIAS:  # keys past Sk are never read (their rows are zeroed at the end)
        bias_mask = u_ok[:, None]
        if ROW_MASK:
            bias_mask = bias_mask & m_ok[None, :]
        bias_t = tl.load(bias_base + offs_u[:, None].to(tl.int64) * stride_bn
                         + offs_m[None, :].to(tl.int64) * stride_bm, mask=bias_mask, other=0.0).to(ACC)
        s_t = s_t + _log2_units(bias_t, ACC)
    p_t = tl.exp2(s_t - lse[None, :])
    if CAUSAL_MASK:
        p_t = tl.where(offs_u[:, None] <= causal_offset + offs_m[None, :], p_t, 0.0)
    if WINDOW_MASK:
        p_t = tl.where(_in_window(offs_u[:, None], causal_offset + offs_m[None, :], win_left, win_right), p_t, 0.0)
    dv = tl.dot(p_t.to(DOT), do, acc=dv, input_precision=PREC, out_dtype=ACC)
    dp_t = tl.dot(vt, tl.trans(do), input_precision=PREC, out_dtype=ACC)
    dz_t = p_t * (dp_t - delta[None, :])
    if HAS_SOFTCAP:
        dz_t = dz_t * (1.0 - tanh_t * tanh_t)
    dk = tl.dot(dz_t.to(DOT), q, acc=dk, input_precision=PREC, out_dtype=ACC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, KPM, BIAS, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_kpmb,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, GROUP, Sq, Sk, D, causal_offset, win_left, win_right, qk_hi, qk_lo, sc_hi, sc_lo, cap_hi, cap_lo,
    icap_hi, icap_lo, num_n_tiles,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr, EVEN_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """dk, dv for one (key tile, batch * kv head), summed over the heads of its GQA group. Query
    tiles fall in ranges: the causal diagonal (masked), the interior (no masks at all) and the
    ragged tail past the last full tile (row-masked); with a window, the tiles on its two edges
    (masked) around the interior, and no tile wholly outside it."""
    pid_n, pid_bk = _tile_of(tl.program_id(0), num_n_tiles)
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
    if HAS_PAD:  # one load per key tile, applied to the finished rows below
        real = tl.load(KPM + b.to(tl.int64) * stride_kpmb + offs_u, mask=u_ok, other=0)
        key_ok = key_ok & (real != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)

    full_end = (Sq // BLOCK_M) * BLOCK_M  # query tiles below this hold no row past Sq
    lo = 0
    mid = 0
    if IS_CAUSAL:
        # queries before this key tile cannot see it; from `mid` on every query sees the whole tile
        lo = (tl.maximum(0, pid_n * BLOCK_N - causal_offset) // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(tl.maximum(0, pid_n * BLOCK_N + BLOCK_N - 1 - causal_offset), BLOCK_M) * BLOCK_M,
                         full_end)
    tail = full_end < Sq
    if HAS_WINDOW:
        # query t (position t' = t + causal_offset) sees key u iff u - right <= t' <= u + left: rows from
        # `first` to `last` (exclusive) see some key of this tile; the full tiles in [mid, mid_end) see all of it
        n0 = pid_n * BLOCK_N
        first = n0 - win_right - causal_offset
        last = n0 + BLOCK_N + win_left - causal_offset
        lo = (tl.maximum(0, first) // BLOCK_M) * BLOCK_M
        end = tl.minimum(full_end, tl.cdiv(tl.maximum(0, last), BLOCK_M) * BLOCK_M)
        mid = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(0, n0 + BLOCK_N - 1 - win_right - causal_offset), BLOCK_M)
                                    * BLOCK_M, lo), end)
        mid_end = tl.maximum(tl.minimum((tl.maximum(0, n0 + 1 + win_left - causal_offset) // BLOCK_M) * BLOCK_M,
                                        end), mid)
        tail = tail & (full_end < last) & (first < Sq)
    for hh in range(0, GROUP):
        h = hk * GROUP + hh
        bh = (b * H + h).to(tl.int64)
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + bh * Sq
        delta_base = DELTA + bh * Sq
        bias_base = BIAS
        if HAS_BIAS:
            bias_base = BIAS + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
        if HAS_WINDOW:  # masked on the window's two edges, mask-free in between
            for m0 in range(lo, mid, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, kt, vt, q_base, do_base, lse_base, delta_base, bias_base, m0, offs_mm,
                                    offs_u, offs_d, d_ok, u_ok, Sq, stride_qm, stride_dom, stride_bm, stride_bn,
                                    causal_offset, win_left, win_right, qk_hi, qk_lo, cap_hi, cap_lo, icap_hi, icap_lo,
                                    False, True, False, HAS_BIAS, HAS_SOFTCAP, LIBDEVICE, EVEN_D, ACC, DOT, PREC)
            for m0 in range(mid, mid_end, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, kt, vt, q_base, do_base, lse_base, delta_base, bias_base, m0, offs_mm,
                                    offs_u, offs_d, d_ok, u_ok, Sq, stride_qm, stride_dom, stride_bm, stride_bn,
                                    causal_offset, win_left, win_right, qk_hi, qk_lo, cap_hi, cap_lo, icap_hi, icap_lo,
                                    False, False, False, HAS_BIAS, HAS_SOFTCAP, LIBDEVICE, EVEN_D, ACC, DOT, PREC)
            for m0 in range(mid_end, end, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, kt, vt, q_base, do_base, lse_base, delta_base, bias_base, m0, offs_mm,
                                    offs_u, offs_d, d_ok, u_ok, Sq, stride_qm, stride_dom, stride_bm, stride_bn,
                                    causal_offset, win_left, win_right, qk_hi, qk_lo, cap_hi, cap_lo, icap_hi, icap_lo,
                                    False, True, False, HAS_BIAS, HAS_SOFTCAP, LIBDEVICE, EVEN_D, ACC, DOT, PREC)
        else:
            if IS_CAUSAL:
                for m0 in range(lo, mid, BLOCK_M):
                    dk, dv = _dkdv_tile(dk, dv, kt, vt, q_base, do_base, lse_base, delta_base, bias_base, m0,
                                        offs_mm, offs_u, offs_d, d_ok, u_ok, Sq, stride_qm, stride_dom, stride_bm,
                                        stride_bn, causal_offset, win_left, win_right, qk_hi, qk_lo, cap_hi, cap_lo,
                                        icap_hi, icap_lo, True, False, False, HAS_BIAS, HAS_SOFTCAP, LIBDEVICE,
                                        EVEN_D, ACC, DOT, PREC)
            for m0 in range(mid, full_end, BLOCK_M):  # empty when mid >= full_end
                dk, dv = _dkdv_tile(dk, dv, kt, vt, q_base, do_base, lse_base, delta_base, bias_base, m0, offs_mm,
                                    offs_u, offs_d, d_ok, u_ok, Sq, stride_qm, stride_dom, stride_bm, stride_bn,
                                    causal_offset, win_left, win_right, qk_hi, qk_lo, cap_hi, cap_lo, icap_hi, icap_lo,
                                    False, False, False, HAS_BIAS, HAS_SOFTCAP, LIBDEVICE, EVEN_D, ACC, DOT, PREC)
        if tail:
            dk, dv = _dkdv_tile(dk, dv, kt, vt, q_base, do_base, lse_base, delta_base, bias_base, full_end, offs_mm,
                                offs_u, offs_d, d_ok, u_ok, Sq, stride_qm, stride_dom, stride_bm, stride_bn,
                                causal_offset, win_left, win_right, qk_hi, qk_lo, cap_hi, cap_lo, icap_hi, icap_lo,
                                IS_CAUSAL, HAS_WINDOW, True, HAS_BIAS, HAS_SOFTCAP, LIBDEVICE, EVEN_D, ACC, DOT, PREC)

    # Padded and out-of-range keys get exact zeros (their unmasked rows may hold inf or NaN).
    dk = tl.where(key_ok[:, None], scaled(dk, sc_hi, sc_lo, ACC), 0.0)
    dv = tl.where(key_ok[:, None], dv, 0.0)
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
             + offs_u[:, None].to(tl.int64) * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=ud_ok)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
             + offs_u[:, None].to(tl.int64) * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=ud_ok)


@triton.jit
def _bwd_prefix_kernel(
    Q, PK, PV, PIDX, PLEN, GATE, DO, LSE, DELTA, DPK, DPV, DG,
    stride_qb, stride_qh, stride_qm,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_gb, stride_gm, stride_gl,
    stride_dob, stride_doh, stride_dom,
    H, GROUP, Sq, L, D, rows_per_split, qk_hi, qk_lo, sc_hi, sc_lo, cap_hi, cap_lo, icap_hi, icap_lo, num_l_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr, EVEN_D: tl.constexpr,
    INDEXED: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """dPk, dPv and dg for one (prefix tile, batch * kv head, query split). Partials, contiguous:
    dPk, dPv [splits, B, Hkv, L, D] (one per query split and batch row), dg [B, Hkv, Sq, L]; with per-row
    adapters (INDEXED) the row reads its table row, and its slots past its adapter's length get zeros.
    Grid: axis 0 folds (prefix tile, batch * kv head), axis 1 the query splits (<= 16)."""
    pid_j, pid_bk = _tile_of(tl.program_id(0), num_l_tiles)
    pid_s = tl.program_id(1)
    Hkv = H // GROUP
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_mm = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    a, n_pre = prefix_of(PIDX, PLEN, b, L, INDEXED)
    j_ok = offs_j < n_pre  # the row's own slots; the partials cover all L (zeros past n_pre)
    d_ok = (offs_d < D) | EVEN_D  # all true when D is a power of two: no head-dim mask
    jd_ok = j_ok[:, None] & d_ok[None, :]
    j_out = offs_j < L

    pk = tl.load(PK + a * stride_pkb + hk.to(tl.int64) * stride_pkh
                 + offs_j[:, None].to(tl.int64) * stride_pkn + offs_d[None, :], mask=jd_ok, other=0.0).to(DOT)
    pv = tl.load(PV + a * stride_pvb + hk.to(tl.int64) * stride_pvh
                 + offs_j[:, None].to(tl.int64) * stride_pvn + offs_d[None, :], mask=jd_ok, other=0.0).to(DOT)
    dpk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dpv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)

    # Long sequences are split over a grid axis so short prefixes still fill the GPU.
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
            logit_t = scaled(qpk, qk_hi, qk_lo, ACC)  # log2 units
            e_t = tl.dot(pv, tl.trans(do), input_precision=PREC, out_dtype=ACC)  # dO . Pv
            if HAS_GATE:
                logit_t = logit_t * g_t
            if HAS_SOFTCAP:
                logit_t, tanh_t = _capped(logit_t, cap_hi, cap_lo, icap_hi, icap_lo, ACC, LIBDEVICE)
            p_t = tl.where(valid, tl.exp2(logit_t - lse[None, :]), 0.0)
            if HAS_GATE:
                dz_t = p_t * (g_t * e_t - delta[None, :])
                if HAS_SOFTCAP:
                    dz_t = dz_t * (1.0 - tanh_t * tanh_t)  # d loss / d (g s), through the cap
                dg_t += dz_t * scaled(qpk, sc_hi, sc_lo, ACC) + p_t * e_t  # dz * s + p * e
                dpv = tl.dot((p_t * g_t).to(DOT), do, acc=dpv, input_precision=PREC, out_dtype=ACC)
                dpk = tl.dot((dz_t * g_t).to(DOT), q, acc=dpk, input_precision=PREC, out_dtype=ACC)
            else:
                dz_t = p_t * (e_t - delta[None, :])
                if HAS_SOFTCAP:
                    dz_t = dz_t * (1.0 - tanh_t * tanh_t)
                dpv = tl.dot(p_t.to(DOT), do, acc=dpv, input_precision=PREC, out_dtype=ACC)
                dpk = tl.dot(dz_t.to(DOT), q, acc=dpk, input_precision=PREC, out_dtype=ACC)
        if HAS_GATE:
            dg_ptrs = DG + pid_bk.to(tl.int64) * Sq * L + offs_m[None, :].to(tl.int64) * L + offs_j[:, None]
            tl.store(dg_ptrs, dg_t.to(DG.dtype.element_ty), mask=j_out[:, None] & m_ok[None, :])

    dpk = scaled(dpk, sc_hi, sc_lo, ACC)
    part_id = pid_s.to(tl.int64) * (tl.num_programs(0) // num_l_tiles) + pid_bk
    part = part_id * L * D + offs_j[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(DPK + part, dpk.to(DPK.dtype.element_ty), mask=j_out[:, None] & d_ok[None, :])
    tl.store(DPV + part, dpv.to(DPV.dtype.element_ty), mask=j_out[:, None] & d_ok[None, :])



# ----------------------------------------------------------------------------------------------- launchers


def _new_output(q: torch.Tensor, out_bshd: bool) -> torch.Tensor:
    """[B, H, Sq, D] output; with out_bshd its memory is [B, Sq, H, D] (the layout transformers
    wants next), so the caller's out.transpose(1, 2) is contiguous without a copy."""
    B, H, Sq, D = q.shape
    if out_bshd:
        return new_buffer((B, Sq, H, D), q.dtype, q.device).transpose(1, 2)
    return new_buffer((B, H, Sq, D), q.dtype, q.device)


def _bias_args(spec: AttentionSpec, B, H, Sq, Sk) -> tuple:
    """(BIAS, its (batch, head, query, key) strides): stride 0 on the broadcast dims, no copy; (None, 0s)."""
    if spec.attn_bias is None:
        return None, (0, 0, 0, 0)
    full = spec.attn_bias.expand(B, H, Sq, Sk)
    return full, tuple(full.stride())


class _Band(NamedTuple):
    """Which keys a query sees, as the kernels take it: IS_CAUSAL (the causal fast path, no window), or
    HAS_WINDOW with key u visible from position t' iff t' - left <= u <= t' + right."""
    is_causal: bool
    has_window: bool
    left: int
    right: int


def _band(spec: AttentionSpec, Sq: int, Sk: int) -> _Band:
    """``spec.window`` (already effective: None keeps the causal or mask-free code) as kernel arguments: causal
    folds into right = 0, and an unbounded side (-1) becomes Sq + Sk, a distance no query-key pair reaches."""
    if spec.window is None:
        return _Band(spec.causal, False, 0, 0)
    left, right = spec.window
    if spec.causal:
        right = 0
    never = Sq + Sk
    return _Band(False, True, left if left >= 0 else never, right if right >= 0 else never)


def _softcap_args(softcap: Optional[float]) -> tuple:
    """(HAS_SOFTCAP, (cap_hi, cap_lo, icap_hi, icap_lo)): the cap in the kernels' log2 units and its inverse,
    each split for fp64 (see jit.scaled)."""
    if softcap is None:
        return False, (0.0, 0.0, 0.0, 0.0)
    return True, (*split_float(softcap * LOG2E), *split_float(1.0 / (softcap * LOG2E)))


def _flags(q: torch.Tensor, D: int) -> dict:
    """The constexprs every kernel but the delta kernel takes from the inputs (each adds its own)."""
    # compiled kernels take libdevice's tanh; the interpreter has none (see _tanh)
    return dict(**numerics(q.dtype), EVEN_D=D == block_d(D), LIBDEVICE=not interpreting())


def _forward(q, k, v, prefix_k, prefix_v, spec: AttentionSpec, out_bshd: bool):
    """out [B, H, Sq, D] (in [B, Sq, H, D] memory with ``out_bshd``) and the row log-sum-exp [B, H, Sq] (base 2,
    accumulator dtype). ``spec.gate``: None or the gate in the accumulator dtype (:func:`gate_tensor`)."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    L = prefix_k.shape[-2]
    gate, kpm = spec.gate, spec.key_padding_mask
    q, k, v, prefix_k, prefix_v = map(unit_rows, (q, k, v, prefix_k, prefix_v))
    bias, bias_strides = _bias_args(spec, B, H, Sq, Sk)
    band = _band(spec, Sq, Sk)
    has_softcap, cap = _softcap_args(spec.softcap)
    out = _new_output(q, out_bshd)
    lse = new_buffer((B, H, Sq), acc_dtype(q.dtype), q.device)
    kpm_stride = 0
    if kpm is not None:
        kpm = unit_rows(kpm)
        kpm_stride = kpm.stride(0)

    pidx, plen, indexed = table_args(prefix_k, spec.prefix_index, spec.prefix_lengths)
    bd = block_d(D)
    features = bias is not None or band.has_window or has_softcap
    cfg = configs.pick_config("fwd_gate" if gate is not None else "fwd", bd, arch_of(q), q.dtype, features)
    num_m_tiles = triton.cdiv(Sq, cfg.block_m)
    _fwd_kernel[folded_grid(num_m_tiles, B * H)](
        q, k, v, prefix_k, prefix_v, pidx, plen, gate, kpm, bias, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *prefix_strides(prefix_k), *prefix_strides(prefix_v),
        *gate_strides(gate, B, Sq, L), kpm_stride, *bias_strides, *out.stride()[:3],
        H, H // Hkv, Sq, Sk, L, D, Sk - Sq, band.left, band.right, *split_float(spec.scale * LOG2E), *cap,
        num_m_tiles,
        IS_CAUSAL=band.is_causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_L=prefix_tile(L, cfg.block_l),
        BLOCK_D=bd, HAS_GATE=gate is not None, HAS_PAD=kpm is not None, HAS_BIAS=bias is not None,
        HAS_WINDOW=band.has_window, HAS_SOFTCAP=has_softcap, INDEXED=indexed, **_flags(q, D), **options(cfg),
    )
    return out, lse


def _backward(do, q, k, v, prefix_k, prefix_v, out, lse, spec: AttentionSpec, bias_grad: bool = False):
    """Returns dq, dk, dv, dprefix_k, dprefix_v, the gate gradient [B, Sq, L] and, with bias_grad, the
    bias gradient before its broadcast sum, [B, H, Sq, Sk], both in the accumulator dtype (empty tensors
    without a gate / bias_grad)."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    L = prefix_k.shape[-2]
    gate, kpm = spec.gate, spec.key_padding_mask
    acc = acc_dtype(q.dtype)
    bias, bias_strides = _bias_args(spec, B, H, Sq, Sk)
    band = _band(spec, Sq, Sk)
    has_softcap, cap = _softcap_args(spec.softcap)
    # dS of the real keys; zeros where the kernel skips a tile (keys hidden by the mask or the window)
    ds = torch.zeros((B, H, Sq, Sk), dtype=acc, device=q.device) if bias_grad and bias is not None else None
    do, q, k, v, prefix_k, prefix_v, out = map(unit_rows, (do, q, k, v, prefix_k, prefix_v, out))
    flags = _flags(q, D)
    bd = block_d(D)
    delta = new_buffer((B, H, Sq), acc, q.device)  # dO . out
    cfg = configs.DELTA_CONFIG
    tiles = triton.cdiv(Sq, cfg.block_m)
    _bwd_delta_kernel[folded_grid(tiles, B * H)](
        do, out, delta, *do.stride()[:3], *out.stride()[:3], H, Sq, D, tiles,
        BLOCK_M=cfg.block_m, BLOCK_D=bd, EVEN_D=flags["EVEN_D"], ACC=flags["ACC"], **options(cfg),
    )
    kpm_stride = 0
    if kpm is not None:
        kpm = unit_rows(kpm)
        kpm_stride = kpm.stride(0)
    g_strides = gate_strides(gate, B, Sq, L)
    pidx, plen, indexed = table_args(prefix_k, spec.prefix_index, spec.prefix_lengths)
    arch = arch_of(q)
    common = (H, H // Hkv)
    scales = (*split_float(spec.scale * LOG2E), *split_float(spec.scale))
    has = dict(HAS_PAD=kpm is not None, HAS_BIAS=bias is not None, HAS_WINDOW=band.has_window,
               HAS_SOFTCAP=has_softcap)

    features = bias is not None or band.has_window or has_softcap
    dq = new_buffer((B, H, Sq, D), q.dtype, q.device)
    cfg = configs.pick_config("bwd_dq", bd, arch, q.dtype, features)
    tiles = triton.cdiv(Sq, cfg.block_m)
    _bwd_dq_kernel[folded_grid(tiles, B * H)](
        q, k, v, prefix_k, prefix_v, pidx, plen, gate, kpm, bias, do, lse, delta, dq, ds,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *prefix_strides(prefix_k), *prefix_strides(prefix_v), *g_strides, kpm_stride, *bias_strides,
        *do.stride()[:3], *dq.stride()[:3],
        *common, Sq, Sk, L, D, Sk - Sq, band.left, band.right, *scales, *cap, tiles,
        IS_CAUSAL=band.is_causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_L=prefix_tile(L, cfg.block_l),
        BLOCK_D=bd, HAS_GATE=gate is not None, BIAS_GRAD=ds is not None, INDEXED=indexed, **has, **flags,
        **options(cfg),
    )

    dk = new_buffer((B, Hkv, Sk, D), k.dtype, k.device)
    dv = new_buffer((B, Hkv, Sk, D), v.dtype, v.device)
    cfg = configs.pick_config("bwd_dkdv", bd, arch, q.dtype, features)
    tiles = triton.cdiv(Sk, cfg.block_n)
    _bwd_dkdv_kernel[folded_grid(tiles, B * Hkv)](
        q, k, v, kpm, bias, do, lse, delta, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], kpm_stride, *bias_strides,
        *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        *common, Sq, Sk, D, Sk - Sq, band.left, band.right, *scales, *cap, tiles,
        IS_CAUSAL=band.is_causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, **has, **flags,
        **options(cfg),
    )

    # Partials: prefix grads per batch row, gate grads per kv head; reduced below by torch.
    cfg = configs.pick_config("bwd_prefix", bd, arch, q.dtype, features)
    block_l = prefix_tile(L, cfg.block_n)
    tiles = triton.cdiv(L, block_l)
    rows = rows_per_split(Sq, cfg.block_m, tiles * B * Hkv, q)
    splits = triton.cdiv(Sq, rows)
    dpk = new_buffer((splits, B, Hkv, L, D), acc, q.device)
    dpv = new_buffer((splits, B, Hkv, L, D), acc, q.device)
    dg = new_buffer((B, Hkv, Sq, L), acc, q.device) if gate is not None else None
    _bwd_prefix_kernel[folded_grid(tiles, B * Hkv, splits)](
        q, prefix_k, prefix_v, pidx, plen, gate, do, lse, delta, dpk, dpv, dg,
        *q.stride()[:3], *prefix_strides(prefix_k), *prefix_strides(prefix_v), *g_strides,
        *do.stride()[:3],
        *common, Sq, L, D, rows, *scales, *cap, tiles,
        BLOCK_M=cfg.block_m, BLOCK_N=block_l, BLOCK_D=bd, HAS_GATE=gate is not None, HAS_SOFTCAP=has_softcap,
        INDEXED=indexed, **flags, **options(cfg),
    )
    dbias = ds if ds is not None else q.new_empty((0,), dtype=acc)
    return (dq, dk, dv, *reduce_prefix_partials(dpk, dpv, dg, prefix_k, prefix_v, q, acc, pidx), dbias)


# ---------------------------------------- torch.library ops (opaque to torch.compile) and the autograd.Function

Tensor = torch.Tensor


def spec_from_args(scale: float, causal: bool, key_padding_mask, window_left: int, window_right: int, attn_bias,
                   softcap: Optional[float], gate, prefix_index=None, prefix_lengths=None) -> AttentionSpec:
    """The custom ops' primitive arguments back to the spec the launchers read (as they were unpacked from one:
    nothing is re-normalised). The window travels as two ints, (-1, -1) for none."""
    window = None if window_left == -1 and window_right == -1 else (window_left, window_right)
    return AttentionSpec(scale=scale, causal=causal, key_padding_mask=key_padding_mask, window=window,
                         attn_bias=attn_bias, gate=gate, softcap=softcap, prefix_index=prefix_index,
                         prefix_lengths=prefix_lengths)


def window_args(spec: AttentionSpec) -> tuple:
    """``spec.window`` as the custom ops' two ints: (-1, -1) for none (an effective window is never that)."""
    return spec.window if spec.window is not None else (-1, -1)


@torch.library.custom_op("fastprefix::gated_prefix_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, gate: Optional[Tensor],
            key_padding_mask: Optional[Tensor], causal: bool, scale: float,
            out_bshd: bool = False, attn_bias: Optional[Tensor] = None, window_left: int = -1,
            window_right: int = -1, softcap: Optional[float] = None, prefix_index: Optional[Tensor] = None,
            prefix_lengths: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    spec = spec_from_args(scale, causal, key_padding_mask, window_left, window_right, attn_bias, softcap, gate,
                          prefix_index, prefix_lengths)
    return _forward(q, k, v, prefix_k, prefix_v, spec, out_bshd)


@_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, out_bshd=False, attn_bias=None,
      window_left=-1, window_right=-1, softcap=None, prefix_index=None, prefix_lengths=None):
    B, H, Sq, D = q.shape
    out = q.new_empty((B, Sq, H, D)).transpose(1, 2) if out_bshd else q.new_empty((B, H, Sq, D))
    return out, q.new_empty((B, H, Sq), dtype=acc_dtype(q.dtype))


@torch.library.custom_op("fastprefix::gated_prefix_attention_bwd", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
            gate: Optional[Tensor], key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor, causal: bool,
            scale: float, attn_bias: Optional[Tensor] = None, bias_grad: bool = False, window_left: int = -1,
            window_right: int = -1, softcap: Optional[float] = None, prefix_index: Optional[Tensor] = None,
            prefix_lengths: Optional[Tensor] = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = spec_from_args(scale, causal, key_padding_mask, window_left, window_right, attn_bias, softcap, gate,
                          prefix_index, prefix_lengths)
    return _backward(do, q, k, v, prefix_k, prefix_v, out, lse, spec, bias_grad)


@_bwd_op.register_fake
def _(do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, causal, scale, attn_bias=None,
      bias_grad=False, window_left=-1, window_right=-1, softcap=None, prefix_index=None, prefix_lengths=None):
    B, H, Sq, _ = q.shape
    acc = acc_dtype(q.dtype)
    dg = q.new_empty((B, Sq, prefix_k.shape[-2]) if gate is not None else (0,), dtype=acc)
    with_bias = bias_grad and attn_bias is not None
    dbias = q.new_empty((B, H, Sq, k.shape[2]) if with_bias else (0,), dtype=acc)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), prefix_k.new_empty(prefix_k.shape),
            prefix_v.new_empty(prefix_v.shape), dg, dbias)


class GatedPrefixAttentionFunction(torch.autograd.Function):
    """Forward and backward of the fused kernels through the custom ops, on the spec's fields as primitives. The
    gate is a tensor here (its APT chain, sigmoid and GEMM, is autograd's: :func:`gate_tensor`); the bias is the
    spec's 4-dim view (autograd takes its gradient back to the caller's shape)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, out_bshd, attn_bias,
                window_left, window_right, softcap, prefix_index=None, prefix_lengths=None):
        out, lse = torch.ops.fastprefix.gated_prefix_attention_fwd(
            q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, out_bshd, attn_bias, window_left,
            window_right, softcap, prefix_index, prefix_lengths)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, attn_bias, out, lse, prefix_index,
                              prefix_lengths)
        ctx.causal, ctx.scale, ctx.window, ctx.softcap = causal, scale, (window_left, window_right), softcap
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, prefix_k, prefix_v, gate, key_padding_mask, attn_bias, out, lse, index, lengths = ctx.saved_tensors
        bias_grad = attn_bias is not None and ctx.needs_input_grad[10]  # no dS work for a frozen bias
        dq, dk, dv, dpk, dpv, dg_full, ds = torch.ops.fastprefix.gated_prefix_attention_bwd(
            do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, ctx.causal, ctx.scale, attn_bias,
            bias_grad, *ctx.window, ctx.softcap, index, lengths)
        dgate = None
        if gate is not None and ctx.needs_input_grad[5]:
            dgate = dg_full.sum_to_size(gate.shape).to(gate.dtype)  # e.g. [B, 1, L] for a pooled gate
        dbias = None
        if bias_grad:  # [B, H, Sq, Sk] summed over the bias's broadcast dims, in its dtype
            dbias = ds.sum_to_size(attn_bias.shape).to(attn_bias.dtype)
        return dq, dk, dv, dpk, dpv, dgate, None, None, None, None, dbias, None, None, None, None, None


# ------------------------------------------------------------------------------------------------- public

OUT_LAYOUTS = ("bhsd", "bshd")


def gate_tensor(q, spec: AttentionSpec):
    """The gate both Triton paths launch with: None, or a tensor broadcastable to [B, Sq, L] in the
    accumulator dtype of q (fp32 for fp16/bf16/fp32, fp64 for fp64), so every kernel compiles one
    gate-pointer type (the one `make fitness` checks). Either ``spec.gate`` (cast through autograd), or
    from ``spec.gate_inputs`` APT's layer_scale * sigmoid(hidden @ weight + bias), hidden [B, Sq or 1, d],
    weight [d, L], bias [L], layer_scale (0-dim): one GEMM + sigmoid per call ([B, Sq, L], or [B, 1, L]
    from a pooled hidden state), saved by autograd, shared by every head and tile.

    The GEMM (and its backward) runs in the inputs' dtype with fp32 accumulation; the sigmoid and
    scale run in the accumulator dtype, so dL/dgate (fp32 from the kernel) reaches layer_scale, a
    sum over B * Sq * L terms, without a 16-bit rounding: with an fp16 gate its error was up to 17x
    the reference's.
    """
    acc = acc_dtype(q.dtype)
    if spec.gate is not None and spec.gate_inputs is not None:
        raise ValueError("pass either gate or the fused gate inputs (gate_hidden, ...), not both")
    if spec.gate_inputs is None:
        return None if spec.gate is None else spec.gate.to(acc)
    hidden, weight, bias, layer_scale = spec.gate_inputs
    if weight is None:
        raise ValueError("gate_hidden needs gate_weight")
    if bias is None:
        bias = weight.new_zeros(weight.shape[-1])
    logits = torch.addmm(bias, hidden.flatten(0, -2), weight).view(*hidden.shape[:-1], -1)
    gate = torch.sigmoid(logits.to(acc))
    return gate if layer_scale is None else layer_scale.to(acc) * gate


def gated_prefix_attention(q, k, v, prefix_k, prefix_v, spec: AttentionSpec, out_layout="bhsd"):
    """Gated-prefix attention on the fused kernels; the reference's contract.

    q [B, H, Sq, D]; k, v [B, Hkv, Sk, D]; prefix_k, prefix_v [Hkv, L, D] (shared) or [B, Hkv, L, D]; ``spec``
    the call's :class:`fastprefix.spec.AttentionSpec` (gate or APT gate inputs, padding mask, causal, window,
    bias, softcap, scale, a packed row's ``cu_seqlens``: served re-padded). Returns [B, H, Sq, D] in q's dtype;
    with out_layout="bshd" that tensor is a view of [B, Sq, H, D] memory (so out.transpose(1, 2) is contiguous;
    a packed row's output is always in that memory). Inputs are expected to be validated by fastprefix.ops (which
    also sends fp64 on a GPU to the reference); only the kernel's own limits are checked.
    """
    D = q.shape[-1]
    if D > 128:
        raise ValueError(f"triton gated_prefix_attention supports head dim <= 128, got {D}")
    if out_layout not in OUT_LAYOUTS:
        raise ValueError(f"out_layout must be one of {OUT_LAYOUTS}, got {out_layout!r}")
    if spec.cu_seqlens is not None:
        *args, inner, packing = unpacked_call(q, k, v, prefix_k, prefix_v, spec)
        return packed_output(_launch(*args, inner, "bshd"), packing)
    return _launch(q, k, v, prefix_k, prefix_v, spec, out_layout)


def _launch(q, k, v, prefix_k, prefix_v, spec: AttentionSpec, out_layout: str):
    """:func:`gated_prefix_attention` of a call that is not packed."""
    gate = gate_tensor(q, spec)
    return GatedPrefixAttentionFunction.apply(q, k, v, prefix_k, prefix_v, gate, spec.key_padding_mask, spec.causal,
                                              spec.scale, out_layout == "bshd", spec.attn_bias, *window_args(spec),
                                              spec.softcap, spec.prefix_index, spec.prefix_lengths)


def fitness_configs(features: bool = False, adapters: bool = False):
    """This module's launch configs for kernels/fitness.py (``configs.fused_fitness_configs`` on these kernels)."""
    kernels = dict(fwd=_fwd_kernel, bwd_delta=_bwd_delta_kernel, bwd_dq=_bwd_dq_kernel, bwd_dkdv=_bwd_dkdv_kernel,
                   bwd_prefix=_bwd_prefix_kernel)
    return configs.fused_fitness_configs(kernels, features, adapters)
