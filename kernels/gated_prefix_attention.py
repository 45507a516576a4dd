"""Gated-prefix flash attention (P-Tuning v2 and APT) in Triton, forward and backward.

Math (one query head, query row t; prefix rows j < L, real keys u < Sk):

    s[t, j]     = scale * (q_t . Pk_j)                  raw prefix score
    logit[t, j] = cap(g[t, j] * s[t, j])                the gate scales the prefix key ...
    logit[t, u] = cap(scale * (q_t . k_u)) + bias[t, u]  (-inf if masked)
    p           = softmax over all L + Sk logits of row t
    out_t       = sum_j p[t, j] g[t, j] Pv_j + sum_u p[t, u] v_u   ... and the prefix value

g is 1 without a gate (P-Tuning v2) or a tensor broadcastable to [B, Sq, L] (APT). APT's gate
inputs (hidden, W, b, lambda) are turned into that tensor once per call, g = lambda * sigmoid(
hidden @ W + b), by torch: the GEMM in the inputs' dtype, sigmoid and scale in fp32 (fp64 for fp64
inputs); autograd saves g and owns its chain rule. A zero gate gives logit 0
(the prefix row keeps mass exp(0) and adds no value); that is the method's math.

Optional features (issue #12; each a constexpr flag, off by default, so the P-Tuning v2 / APT
kernels compile exactly as without them):

- HAS_SOFTCAP: cap(x) = c * tanh(x / c) (Gemma 2), on every logit, prefix ones after the gate;
  the identity otherwise. In log2 units it is the same tanh with c * log2(e) (a runtime argument,
  so every cap shares one compiled kernel). tanh is libdevice's when compiled; the interpreter
  has none, so there it is built from exp and log (_tanh: Kahan's expm1, a few ulps).
- HAS_BIAS: bias broadcastable to [B, H, Sq, Sk] (T5's position bias, DeBERTa's c2p/p2c),
  added to the real keys' logits after the cap, read through four strides (0 on the
  broadcast dims: a [1, H, Sq, Sk] or [B, 1, 1, Sk] bias is never expanded in memory), in
  q's dtype or fp32, converted to the accumulator dtype. The prefix columns get no bias.
- HAS_WINDOW: query t (position t' = t + Sk - Sq) sees real key u iff t' - left <= u <= t' + right,
  both bounds runtime arguments (an unbounded side arrives as Sq + Sk); causal folds into
  right = 0. A window that hides nothing beyond causal is dropped on the host, so the causal
  path keeps its own code. The prefix is visible to every query. Tiles wholly outside every
  window of a tile are skipped: the forward and dq kernels visit only the key tiles from
  t'_min - left to t'_max + right, the dk/dv kernel only the query tiles that see its keys
  (masked on the window's two edges, mask-free in between).

Forward (FlashAttention-2 style): one program per (query tile, batch * head), both folded into
grid axis 0 (the tile index fastest, so neighbours share a head's K/V in L2; CUDA caps axes 1
and 2 at 65,535, axis 0 at 2^31 - 1). It streams the prefix in its own tiles of BLOCK_L =
max(16, next_pow2(L)) rows (capped per config), then the key tiles (BLOCK_N), with an online
softmax in log2 units, and saves the row log-sum-exp (base 2). Neither [Pk ; K] nor the
Sq x (L + Sk) score matrix is ever built; a shared prefix [Hkv, L, D] is read through a batch
stride of 0. The output is written through strides: [B, H, Sq, D] memory by default, or
[B, Sq, H, D] (out_layout="bshd", what transformers reshapes to next, saving it a copy).

Backward. With e[t, j] = dO_t . Pv_j and delta_t = dO_t . out_t = sum_i p[t, i] dP[t, i]:

    dP[t, j]  = dO_t . (g Pv_j) = g e                   dP[t, u] = dO_t . v_u
    dz[t, j]  = p (g e - delta)                         dz[t, u] = p (dP[t, u] - delta)
    dq_t     += scale * sum_j dz g Pk_j + scale * sum_u dz k_u
    dPk_j    += scale * sum_t dz g q_t                  dk_u += scale * sum_t dz q_t
    dPv_j    += sum_t p g dO_t                          dv_u += sum_t p dO_t
    dg[t, j]  = dz * s + p * e                          (logit = g s and value = g Pv_j)
              = p (s (g e - delta) + e)

With a softcap, dz above is d loss / d logit; the chain through the cap multiplies it by
cap'(x) = 1 - tanh^2(x / c) before it reaches q, k, Pk and the gate's dz * s term (p and the
value terms are unchanged). The bias joins after the cap, so its gradient is dz[t, u] itself
(the "dS" of the real keys): when the bias requires grad the dq kernel (BIAS_GRAD) writes it to a
zero-initialised [B, H, Sq, Sk] buffer in the accumulator dtype (tiles the masks or the window
skip stay zero), and torch sums it to the bias's shape (sum_to_size) and dtype; a bias without
grad costs no gradient work.

The gate gradient is summed over the query heads (the gate is shared by heads) and then
reduced to the broadcast shape the caller passed (e.g. [B, 1, L] for the pooled gate).

Four backward kernels, each owning what it writes, so the backward is deterministic (no
atomics; bitwise reproducible run to run): delta per (64 query rows, batch * head), one read of
dO and out (inside the dq kernel its out tile spilled registers at D=128 on sm_80); dq per
(query tile, batch * head); dk, dv per (key tile, batch * kv
head) looping over the heads of its GQA group, with the query tiles split into the causal
diagonal (masked), the interior (no mask arithmetic, no padding-mask loads: padded keys' rows are
zeroed once at the end) and the ragged tail; dPk, dPv and dg per (prefix tile, batch * kv head,
query split). Workspace: delta [B, H, Sq], prefix-gradient partials [splits, B, Hkv, L, D] x 2
and gate-gradient partials [B, Hkv, Sq, L], fp32, reduced by torch in a fixed order.

Modelled cost at B=8, H=32, Hkv=8, S=2048, L=64, D=128, d=4096, bf16 (per layer; before = the
previous revision, sm_80 configs; traffic to HBM or L2 as issued, FLOPs as executed):

    item 1, APT gate, forward: was a fused h @ W per (query tile, head, prefix tile):
        before 275 GFLOP and 10.7 GB (8.6 GB of hidden-state tiles + 2.1 GB of W tiles, 4,096
        programs x 2 prefix tiles); after one [B*S, d] x [d, L] GEMM + sigmoid: 8.6 GFLOP and
        0.29 GB (hidden 134 MB once, the fp32 [B, S, L] gate 4.2 MB written, read by 32 heads: 134 MB).
    item 1/5, APT gate chain, backward: before an fp32 recompute of the gate and fp32 GEMMs
        (two fp32 copies of [B, S, d], 268 MB each): 25.8 GFLOP fp32 (no tensor cores) and
        2.0 GB; after autograd on the saved gate: 17.2 GFLOP bf16 (dW, d hidden) and 0.28 GB.
    item 3, dk/dv: Q and dO re-read once per key tile: BLOCK_N 32 -> 64 halves it, 17.2 -> 8.6 GB
        (non-causal; causal about half of each; sm_80 and sm_86; on sm_90 at D=128 every 64-key
        tile spilled, so it keeps 32); FLOPs unchanged (1.1 TFLOP non-causal); the mask
        arithmetic and the lse/delta load masks now run on the diagonal and tail tiles only
        (<= 3 of 64 query tiles per key tile).
    item 5, delta: four eager torch ops (two fp32 casts, a product, a sum) moved 1.88 GB through
        4 launches and two 268 MB fp32 temporaries; the delta kernel reads dO and out once,
        0.27 GB, and writes 2.1 MB. The "bshd" output saves transformers' 268 MB transpose copy.

Interfaces: ``gated_prefix_attention`` (same keyword signature as the reference, plus
``out_layout``) -> ``GatedPrefixAttentionFunction`` (autograd) -> the torch.library ops
``fastprefix::gated_prefix_attention_fwd`` / ``_bwd`` (with fake kernels, so torch.compile keeps
them as single graph nodes) -> the launchers -> the kernels. Launch configs are picked at call
time from the device's compute capability and the dtype: sm_80, sm_86/89 and sm_90 tables, for
16-bit and for fp32 inputs (the CPU interpreter gets one small config); kernels/fitness.py
compiles every one of them for its target and checks for register spills and shared memory.
Every launch sets enable_fp_fusion explicitly (FP_FUSION). Set FASTPREFIX_POISON_OUTPUTS=1 to
allocate outputs filled with NaN (the tests do), so an element a kernel fails to write cannot
pass unnoticed.

Supported: any B, Sq >= 1, Sk >= 1, L >= 1 (prefix always visible), GQA (H % Hkv == 0),
key padding masks [B, Sk] (True = real key), causal masks aligned bottom-right (query t sits
at position Sk - Sq + t, so Sq < Sk is decoding with a KV cache), an additive attention bias,
sliding / local windows (FlashAttention's window_size convention), logit soft-capping, head
dim D <= 128 (masked to a power of two), fp16 / bf16 / fp32 inputs with fp32 accumulation, fp64 (accumulated in
fp64; meant for gradcheck under the interpreter; on a GPU fp64 inputs run the reference path).
Not supported: L = 0 (use plain attention), D > 128, dropout, top-left causal alignment,
varlen packing. The feature paths run the default configs' tiles; kernels/fitness.py checks the
feature-free kernels (the ones P-Tuning v2 and APT launch).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .. import reference
from ._launch import acc_torch_dtype as _acc_torch_dtype
from ._launch import arch_of as _arch_of
from ._launch import gate_strides as _gate_strides
from ._launch import prefix_strides as _prefix_strides
from ._launch import prefix_tile as _prefix_tile
from ._launch import reduce_prefix_partials
from ._launch import rows_per_split as _rows_per_split
from ._launch import split_float as _split
from ._launch import unit_rows as _rows
from ._runtime import interpreting, new_buffer

__all__ = ["gated_prefix_attention", "fitness_configs", "pick_config", "LaunchConfig"]

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)


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


_COMMON_HEURISTICS = {
    "ACC": lambda a: _acc_dtype(a["Q"]),
    "DOT": lambda a: _dot_dtype(a["Q"]),
    "PREC": lambda a: _precision(_dot_dtype(a["Q"])),
    "HAS_PAD": lambda a: a["KPM"] is not None,
    "EVEN_D": lambda a: a["D"] == a["BLOCK_D"],
    # compiled kernels take libdevice's tanh; the interpreter has none (see _tanh)
    "LIBDEVICE": lambda a: not interpreting(),
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
    t = _tanh(_scaled(s, icap_hi, icap_lo, ACC), LIBDEVICE)
    return _scaled(t, cap_hi, cap_lo, ACC), t


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


@triton.heuristics({**_COMMON_HEURISTICS, "HAS_GATE": lambda a: a["GATE"] is not None,
                    "HAS_BIAS": lambda a: a["BIAS"] is not None})
@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, GATE, KPM, BIAS, OUT, LSE,
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
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
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
    # stride 0 when shared by the batch.
    pk_base = PK + b.to(tl.int64) * stride_pkb + hk.to(tl.int64) * stride_pkh
    pv_base = PV + b.to(tl.int64) * stride_pvb + hk.to(tl.int64) * stride_pvh
    for j0 in range(0, L, BLOCK_L):
        offs_j = j0 + offs_l
        j_ok = offs_j < L
        pk = tl.load(pk_base + offs_j[:, None].to(tl.int64) * stride_pkn + offs_d[None, :],
                     mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
        s = _scaled(tl.dot(q, tl.trans(pk), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)
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
        acc = tl.dot(p.to(DOT), pv, acc=acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    # Real key tiles. After the prefix every row max is finite, so masked tiles are harmless.
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
        s = _scaled(tl.dot(q, tl.trans(kt), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)
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


@triton.heuristics({"ACC": lambda a: _acc_dtype(a["DO"]), "EVEN_D": lambda a: a["D"] == a["BLOCK_D"]})
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


@triton.heuristics({**_COMMON_HEURISTICS, "HAS_GATE": lambda a: a["GATE"] is not None,
                    "HAS_BIAS": lambda a: a["BIAS"] is not None, "BIAS_GRAD": lambda a: a["DS"] is not None})
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, GATE, KPM, BIAS, DO, LSE, DELTA, DQ, DS,
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
    LIBDEVICE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
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

    pk_base = PK + b.to(tl.int64) * stride_pkb + hk.to(tl.int64) * stride_pkh
    pv_base = PV + b.to(tl.int64) * stride_pvb + hk.to(tl.int64) * stride_pvh
    for j0 in range(0, L, BLOCK_L):
        offs_j = j0 + offs_l
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
        if HAS_SOFTCAP:
            s, tanh = _capped(s, cap_hi, cap_lo, icap_hi, icap_lo, ACC, LIBDEVICE)
        p = tl.where(m_ok[:, None] & j_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dz = p * (e - delta[:, None])
        if HAS_SOFTCAP:
            dz = dz * (1.0 - tanh * tanh)  # d cap(x) / dx
        if HAS_GATE:
            dz = dz * g  # d logit / d q carries the gate
        dq = tl.dot(dz.to(DOT), pk, acc=dq, input_precision=PREC)

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
        s = _scaled(tl.dot(q, tl.trans(kt), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)
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
        dq = tl.dot(dz.to(DOT), kt, acc=dq, input_precision=PREC)

    dq = _scaled(dq, sc_hi, sc_lo, ACC)
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
    s_t = _scaled(tl.dot(kt, tl.trans(q), input_precision=PREC, out_dtype=ACC), qk_hi, qk_lo, ACC)  # [BN, BM]
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
    dv = tl.dot(p_t.to(DOT), do, acc=dv, input_precision=PREC)
    dp_t = tl.dot(vt, tl.trans(do), input_precision=PREC, out_dtype=ACC)
    dz_t = p_t * (dp_t - delta[None, :])
    if HAS_SOFTCAP:
        dz_t = dz_t * (1.0 - tanh_t * tanh_t)
    dk = tl.dot(dz_t.to(DOT), q, acc=dk, input_precision=PREC)
    return dk, dv


@triton.heuristics({**_COMMON_HEURISTICS, "HAS_BIAS": lambda a: a["BIAS"] is not None})
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
    dk = tl.where(key_ok[:, None], _scaled(dk, sc_hi, sc_lo, ACC), 0.0)
    dv = tl.where(key_ok[:, None], dv, 0.0)
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
    H, GROUP, Sq, L, D, rows_per_split, qk_hi, qk_lo, sc_hi, sc_lo, cap_hi, cap_lo, icap_hi, icap_lo, num_l_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr, EVEN_D: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """dPk, dPv and dg for one (prefix tile, batch * kv head, query split). Partials, contiguous:
    dPk, dPv [splits, B, Hkv, L, D] (one per query split and batch row), dg [B, Hkv, Sq, L].
    Grid: axis 0 folds (prefix tile, batch * kv head), axis 1 the query splits (<= 16)."""
    pid_j, pid_bk = _tile_of(tl.program_id(0), num_l_tiles)
    pid_s = tl.program_id(1)
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
            logit_t = _scaled(qpk, qk_hi, qk_lo, ACC)  # log2 units
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
                dg_t += dz_t * _scaled(qpk, sc_hi, sc_lo, ACC) + p_t * e_t  # dz * s + p * e
                dpv = tl.dot((p_t * g_t).to(DOT), do, acc=dpv, input_precision=PREC)
                dpk = tl.dot((dz_t * g_t).to(DOT), q, acc=dpk, input_precision=PREC)
            else:
                dz_t = p_t * (e_t - delta[None, :])
                if HAS_SOFTCAP:
                    dz_t = dz_t * (1.0 - tanh_t * tanh_t)
                dpv = tl.dot(p_t.to(DOT), do, acc=dpv, input_precision=PREC)
                dpk = tl.dot(dz_t.to(DOT), q, acc=dpk, input_precision=PREC)
        if HAS_GATE:
            dg_ptrs = DG + pid_bk.to(tl.int64) * Sq * L + offs_m[None, :].to(tl.int64) * L + offs_j[:, None]
            tl.store(dg_ptrs, dg_t.to(DG.dtype.element_ty), mask=valid)

    dpk = _scaled(dpk, sc_hi, sc_lo, ACC)
    part_id = pid_s.to(tl.int64) * (tl.num_programs(0) // num_l_tiles) + pid_bk
    part = part_id * L * D + offs_j[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(DPK + part, dpk.to(DPK.dtype.element_ty), mask=jd_ok)
    tl.store(DPV + part, dpv.to(DPV.dtype.element_ty), mask=jd_ok)


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    """Tiles and launch options of one kernel. block_l caps the prefix tile (the forward and dq
    kernels use BLOCK_L = min(block_l, max(16, next_pow2(L))); the prefix-gradient kernel's prefix
    tile is block_n, capped the same way); the dk/dv kernel has no prefix tile (block_l = 0)."""
    block_m: int
    block_n: int
    block_l: int
    num_warps: int
    num_stages: int


_C = LaunchConfig
# Per GPU target, operand width, kernel and head-dim bucket. Targets: sm_80 (A100, 163 KB of shared
# memory per block), sm_86 (also sm_89: 99 KB) and sm_90 (227 KB). Every entry is compiled ahead of
# time for its target (fp16, bf16; fp32 for the fp32 table) by kernels/fitness.py, which checks it
# for register spills and shared memory. "fwd" is the forward without a gate, "fwd_gate" with one
# (the gate tile costs registers in the prefix loop only: it caps block_l, not the key tile; at
# D=128 a 32-wide gated prefix tile spilled 8 B next to 64-wide key tiles, a 16-wide one does not).
# dk/dv: the key tile (block_n = 64) sets how often Q and dO are re-read; the query tile only sets
# registers, and with three query-range loops a 32-row tile spilled (32 B at D=64, 4 B at D=128).
_CONFIGS_16BIT = {
    80: {
        "fwd": {64: _C(128, 64, 64, 8, 3), 128: _C(128, 64, 64, 8, 2)},
        "fwd_gate": {64: _C(128, 64, 64, 8, 3), 128: _C(128, 64, 16, 8, 2)},
        "bwd_dq": {64: _C(128, 64, 64, 8, 2), 128: _C(128, 32, 16, 8, 2)},
        "bwd_dkdv": {64: _C(16, 64, 0, 4, 2), 128: _C(16, 64, 0, 8, 2)},
        "bwd_prefix": {64: _C(32, 32, 32, 8, 2), 128: _C(32, 32, 32, 8, 2)},
    },
    86: {  # ptxas allocates differently for sm_86: at D=64, dq and dk/dv needed smaller tiles than on sm_80
        "fwd": {64: _C(128, 64, 64, 8, 3), 128: _C(128, 64, 64, 8, 2)},
        # 2 stages: with the fp32 gate tile a third stage needs 114,688 B, over sm_86/89's 99 KB
        "fwd_gate": {64: _C(128, 64, 64, 8, 2), 128: _C(128, 64, 16, 8, 2)},
        "bwd_dq": {64: _C(128, 32, 32, 8, 2), 128: _C(128, 32, 16, 8, 2)},
        "bwd_dkdv": {64: _C(16, 64, 0, 8, 2), 128: _C(16, 64, 0, 8, 2)},
        "bwd_prefix": {64: _C(32, 32, 32, 8, 2), 128: _C(32, 32, 32, 8, 2)},
    },
    90: {
        "fwd": {64: _C(128, 64, 64, 8, 3), 128: _C(128, 64, 64, 8, 3)},
        "fwd_gate": {64: _C(128, 64, 64, 8, 3), 128: _C(128, 64, 16, 8, 3)},
        "bwd_dq": {64: _C(128, 64, 64, 8, 2), 128: _C(128, 32, 16, 8, 2)},
        # at D=128 every 64-key tile spilled on sm_90 (40-600 B, also (64, 64) with 2 stages)
        "bwd_dkdv": {64: _C(32, 64, 0, 8, 2), 128: _C(16, 32, 0, 4, 2)},
        "bwd_prefix": {64: _C(32, 64, 64, 8, 2), 128: _C(32, 32, 32, 8, 2)},
    },
}
# fp32 inputs: IEEE dots run on the FMA units with fp32 operands (twice the bytes of a 16-bit tile
# in shared memory and registers), hence their own, narrower tiles (the 16-bit tables at fp32 spilled
# ~36 KB and needed 164 KB of shared memory at D=128). The gated forward holds the gate tile beside the
# FMA operands: 32x32 tiles spilled 450 B at D=128, 16x16 ones do not. 16 warps cap a thread at 64
# registers (65,536 per SM): more warps do not help.
_FP32_DKDV = {  # ptxas spilled 4-80 B on the other targets' dk/dv tiles, at 110-255 registers
    80: {64: _C(32, 32, 0, 4, 1), 128: _C(32, 32, 0, 8, 1)},
    86: {64: _C(16, 32, 0, 4, 1), 128: _C(16, 32, 0, 8, 1)},
    90: {64: _C(32, 32, 0, 8, 1), 128: _C(32, 32, 0, 8, 1)},
}
_CONFIGS_FP32 = {
    target: {
        "fwd": {64: _C(64, 32, 32, 8, 2), 128: _C(32, 32, 32, 8, 1)},
        "fwd_gate": {64: _C(32, 32, 16, 4, 2), 128: _C(16, 16, 16, 4, 1)},
        "bwd_dq": {64: _C(32, 32, 32, 8, 1), 128: _C(32, 32, 32, 8, 1)},
        "bwd_dkdv": _FP32_DKDV[target],
        "bwd_prefix": {64: _C(32, 32, 32, 8, 1), 128: _C(16, 16, 16, 8, 1)},
    }
    for target in (80, 86, 90)
}
KINDS = ("fwd", "fwd_gate", "bwd_dq", "bwd_dkdv", "bwd_prefix")
TARGETS = (80, 86, 90)
# The interpreter runs programs one after another: few, moderately sized tiles are fastest, and
# BLOCK_N = 32, BLOCK_L <= 16 still split the test shapes into several prefix and key tiles.
_INTERPRETER_CONFIG = LaunchConfig(64, 32, 16, 4, 1)
_DELTA_BLOCK_M = 64  # rows per program of the delta kernel (fixed: 64 x 128 fp32 products, 4 warps)
# Explicit on every launch (Triton 3.10 flips the default to off): FMA contraction on, the numerics
# every fitness figure and error bound of this file was measured with.
FP_FUSION = True


def _head_dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128


def target_of(arch: int) -> int:
    """The table a compute capability uses: sm_90+ -> 90, sm_80 / sm_87 (163 KB) -> 80, anything
    else (sm_86, sm_89 and older parts) -> 86, the table that fits 99 KB of shared memory."""
    if arch >= 90:
        return 90
    return 80 if arch in (80, 87) else 86


# With attn_bias / window / softcap on, the kernels hold the bias tile and the cap's tanh terms too: at the
# default tables' 3 stages the sm_90 16-bit D=128 forward needs more shared memory than the GPU has. Two
# stages keep every feature variant within the limits (fitness --features checks); untuned for speed.
_FEATURE_MAX_STAGES = 2


def pick_config(kind: str, block_d: int, arch: Optional[int], dtype: torch.dtype = torch.float16,
                features: bool = False) -> LaunchConfig:
    """Launch config of kernel `kind` (one of KINDS) for head-dim tile `block_d` on compute
    capability `arch` (None: the interpreter) and input `dtype` (fp16/bf16, or fp32); ``features``: any
    of attn_bias / window / softcap is on (fewer pipeline stages, see ``_FEATURE_MAX_STAGES``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if arch is None:
        return _INTERPRETER_CONFIG
    table = _CONFIGS_16BIT if dtype in (torch.float16, torch.bfloat16) else _CONFIGS_FP32
    cfg = table[target_of(arch)][kind][_head_dim_bucket(block_d)]
    if features and cfg.num_stages > _FEATURE_MAX_STAGES:
        cfg = cfg._replace(num_stages=_FEATURE_MAX_STAGES)
    return cfg


def _folded_grid(tiles: int, rows: int, *rest: int) -> tuple:
    """(tiles * rows, *rest): grid axis 0 folds the tile index and batch * heads (decoded by
    _tile_of); axes 1 and 2 (CUDA caps them at 65,535) only get the small `rest`."""
    programs = tiles * rows
    if programs >= 2 ** 31:
        raise ValueError(f"{tiles} tiles x {rows} batch*heads = {programs} programs exceed the 2^31 - 1 grid limit")
    return (programs, *rest)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _new_output(q: torch.Tensor, out_bshd: bool) -> torch.Tensor:
    """[B, H, Sq, D] output; with out_bshd its memory is [B, Sq, H, D] (the layout transformers
    wants next), so the caller's out.transpose(1, 2) is contiguous without a copy."""
    B, H, Sq, D = q.shape
    if out_bshd:
        return new_buffer((B, Sq, H, D), q.dtype, q.device).transpose(1, 2)
    return new_buffer((B, H, Sq, D), q.dtype, q.device)


def _bias4(attn_bias: torch.Tensor) -> torch.Tensor:
    """attn_bias (at most 4 dims, broadcastable to [B, H, Sq, Sk]) as a 4-dim view with leading 1s."""
    return attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))


def _bias_args(attn_bias, B, H, Sq, Sk) -> tuple:
    """(BIAS, its (batch, head, query, key) strides): stride 0 on the broadcast dims, no copy; (None, 0s)."""
    if attn_bias is None:
        return None, (0, 0, 0, 0)
    full = _bias4(attn_bias).expand(B, H, Sq, Sk)
    return full, tuple(full.stride())


class _Band(NamedTuple):
    """Which keys a query sees, as the kernels take it: IS_CAUSAL (the causal fast path, no window), or
    HAS_WINDOW with key u visible from position t' iff t' - left <= u <= t' + right."""
    is_causal: bool
    has_window: bool
    left: int
    right: int


def _band(window_left: int, window_right: int, causal: bool, Sq: int, Sk: int) -> _Band:
    """A window that hides nothing beyond ``causal`` is dropped, so the kernels keep their causal (or
    mask-free) code; otherwise causal folds into right = 0 and an unbounded side (-1) becomes Sq + Sk,
    a distance no query-key pair reaches."""
    if causal:
        if window_left == -1:
            return _Band(True, False, 0, 0)
        window_right = 0
    elif window_left == -1 and window_right == -1:
        return _Band(False, False, 0, 0)
    never = Sq + Sk
    return _Band(False, True, window_left if window_left >= 0 else never, window_right if window_right >= 0 else never)


def _softcap_args(softcap: Optional[float]) -> tuple:
    """(HAS_SOFTCAP, (cap_hi, cap_lo, icap_hi, icap_lo)): the cap in the kernels' log2 units and its inverse,
    each split for fp64 (see _scaled)."""
    if softcap is None:
        return False, (0.0, 0.0, 0.0, 0.0)
    return True, (*_split(softcap * LOG2E), *_split(1.0 / (softcap * LOG2E)))


def _forward(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal: bool, scale: float, out_bshd: bool,
             attn_bias=None, window_left: int = -1, window_right: int = -1, softcap: Optional[float] = None):
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    L = prefix_k.shape[-2]
    q, k, v, prefix_k, prefix_v = map(_rows, (q, k, v, prefix_k, prefix_v))
    bias, bias_strides = _bias_args(attn_bias, B, H, Sq, Sk)
    band = _band(window_left, window_right, causal, Sq, Sk)
    has_softcap, cap = _softcap_args(softcap)
    out = _new_output(q, out_bshd)
    lse = new_buffer((B, H, Sq), _acc_torch_dtype(q), q.device)
    kpm_stride = 0
    if key_padding_mask is not None:
        key_padding_mask = _rows(key_padding_mask)
        kpm_stride = key_padding_mask.stride(0)

    block_d = _block_d(D)
    features = bias is not None or band.has_window or has_softcap
    cfg = pick_config("fwd_gate" if gate is not None else "fwd", block_d, _arch_of(q), q.dtype, features)
    num_m_tiles = triton.cdiv(Sq, cfg.block_m)
    _fwd_kernel[_folded_grid(num_m_tiles, B * H)](
        q, k, v, prefix_k, prefix_v, gate, key_padding_mask, bias, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
        *_gate_strides(gate, B, Sq, L), kpm_stride, *bias_strides, *out.stride()[:3],
        H, H // Hkv, Sq, Sk, L, D, Sk - Sq, band.left, band.right, *_split(scale * LOG2E), *cap, num_m_tiles,
        IS_CAUSAL=band.is_causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_L=_prefix_tile(L, cfg.block_l),
        BLOCK_D=block_d, HAS_WINDOW=band.has_window, HAS_SOFTCAP=has_softcap,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
    )
    return out, lse


def _backward(do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, causal: bool,
              scale: float, attn_bias=None, bias_grad: bool = False, window_left: int = -1, window_right: int = -1,
              softcap: Optional[float] = None):
    """Returns dq, dk, dv, dprefix_k, dprefix_v, the gate gradient [B, Sq, L] and, with bias_grad, the
    bias gradient before its broadcast sum, [B, H, Sq, Sk], both in the accumulator dtype (empty tensors
    without a gate / bias_grad)."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    L = prefix_k.shape[-2]
    acc = _acc_torch_dtype(q)
    bias, bias_strides = _bias_args(attn_bias, B, H, Sq, Sk)
    band = _band(window_left, window_right, causal, Sq, Sk)
    has_softcap, cap = _softcap_args(softcap)
    # dS of the real keys; zeros where the kernel skips a tile (keys hidden by the mask or the window)
    ds = torch.zeros((B, H, Sq, Sk), dtype=acc, device=q.device) if bias_grad and bias is not None else None
    do, q, k, v, prefix_k, prefix_v, out = map(_rows, (do, q, k, v, prefix_k, prefix_v, out))
    delta = new_buffer((B, H, Sq), acc, q.device)  # dO . out
    tiles = triton.cdiv(Sq, _DELTA_BLOCK_M)
    _bwd_delta_kernel[_folded_grid(tiles, B * H)](
        do, out, delta, *do.stride()[:3], *out.stride()[:3], H, Sq, D, tiles,
        BLOCK_M=_DELTA_BLOCK_M, BLOCK_D=_block_d(D), num_warps=4, num_stages=1, enable_fp_fusion=FP_FUSION,
    )
    kpm_stride = 0
    if key_padding_mask is not None:
        key_padding_mask = _rows(key_padding_mask)
        kpm_stride = key_padding_mask.stride(0)
    g_strides = _gate_strides(gate, B, Sq, L)
    block_d = _block_d(D)
    arch = _arch_of(q)
    common = (H, H // Hkv)
    scales = (*_split(scale * LOG2E), *_split(scale))

    features = bias is not None or band.has_window or has_softcap
    dq = new_buffer((B, H, Sq, D), q.dtype, q.device)
    cfg = pick_config("bwd_dq", block_d, arch, q.dtype, features)
    tiles = triton.cdiv(Sq, cfg.block_m)
    _bwd_dq_kernel[_folded_grid(tiles, B * H)](
        q, k, v, prefix_k, prefix_v, gate, key_padding_mask, bias, do, lse, delta, dq, ds,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *_prefix_strides(prefix_k), *_prefix_strides(prefix_v), *g_strides, kpm_stride, *bias_strides,
        *do.stride()[:3], *dq.stride()[:3],
        *common, Sq, Sk, L, D, Sk - Sq, band.left, band.right, *scales, *cap, tiles,
        IS_CAUSAL=band.is_causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_L=_prefix_tile(L, cfg.block_l),
        BLOCK_D=block_d, HAS_WINDOW=band.has_window, HAS_SOFTCAP=has_softcap,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
    )

    dk = new_buffer((B, Hkv, Sk, D), k.dtype, k.device)
    dv = new_buffer((B, Hkv, Sk, D), v.dtype, v.device)
    cfg = pick_config("bwd_dkdv", block_d, arch, q.dtype, features)
    tiles = triton.cdiv(Sk, cfg.block_n)
    _bwd_dkdv_kernel[_folded_grid(tiles, B * Hkv)](
        q, k, v, key_padding_mask, bias, do, lse, delta, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], kpm_stride, *bias_strides,
        *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        *common, Sq, Sk, D, Sk - Sq, band.left, band.right, *scales, *cap, tiles,
        IS_CAUSAL=band.is_causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        HAS_WINDOW=band.has_window, HAS_SOFTCAP=has_softcap, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
    )

    # Partials: prefix grads per batch row, gate grads per kv head; reduced below by torch.
    cfg = pick_config("bwd_prefix", block_d, arch, q.dtype, features)
    block_l = _prefix_tile(L, cfg.block_n)
    tiles = triton.cdiv(L, block_l)
    rows_per_split = _rows_per_split(Sq, cfg.block_m, tiles * B * Hkv, q)
    splits = triton.cdiv(Sq, rows_per_split)
    dpk = new_buffer((splits, B, Hkv, L, D), acc, q.device)
    dpv = new_buffer((splits, B, Hkv, L, D), acc, q.device)
    dg = new_buffer((B, Hkv, Sq, L), acc, q.device) if gate is not None else None
    _bwd_prefix_kernel[_folded_grid(tiles, B * Hkv, splits)](
        q, prefix_k, prefix_v, gate, do, lse, delta, dpk, dpv, dg,
        *q.stride()[:3], *_prefix_strides(prefix_k), *_prefix_strides(prefix_v), *g_strides,
        *do.stride()[:3],
        *common, Sq, L, D, rows_per_split, *scales, *cap, tiles,
        BLOCK_M=cfg.block_m, BLOCK_N=block_l, BLOCK_D=block_d, HAS_SOFTCAP=has_softcap, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
    )
    dbias = ds if ds is not None else q.new_empty((0,), dtype=acc)
    return (dq, dk, dv, *reduce_prefix_partials(dpk, dpv, dg, prefix_k, prefix_v, q, acc), dbias)


# --------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile) and the autograd.Function that chains them
# --------------------------------------------------------------------------------------------

Tensor = torch.Tensor


@torch.library.custom_op("fastprefix::gated_prefix_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, gate: Optional[Tensor],
            key_padding_mask: Optional[Tensor], causal: bool, scale: float,
            out_bshd: bool = False, attn_bias: Optional[Tensor] = None, window_left: int = -1,
            window_right: int = -1, softcap: Optional[float] = None) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, out_bshd, attn_bias,
                    window_left, window_right, softcap)


@_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, out_bshd=False, attn_bias=None,
      window_left=-1, window_right=-1, softcap=None):
    B, H, Sq, D = q.shape
    out = q.new_empty((B, Sq, H, D)).transpose(1, 2) if out_bshd else q.new_empty((B, H, Sq, D))
    return out, q.new_empty((B, H, Sq), dtype=_acc_torch_dtype(q))


@torch.library.custom_op("fastprefix::gated_prefix_attention_bwd", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
            gate: Optional[Tensor], key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor, causal: bool,
            scale: float, attn_bias: Optional[Tensor] = None, bias_grad: bool = False, window_left: int = -1,
            window_right: int = -1, softcap: Optional[float] = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, causal, scale, attn_bias,
                     bias_grad, window_left, window_right, softcap)


@_bwd_op.register_fake
def _(do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, causal, scale, attn_bias=None,
      bias_grad=False, window_left=-1, window_right=-1, softcap=None):
    B, H, Sq, _ = q.shape
    acc = _acc_torch_dtype(q)
    dg = q.new_empty((B, Sq, prefix_k.shape[-2]) if gate is not None else (0,), dtype=acc)
    with_bias = bias_grad and attn_bias is not None
    dbias = q.new_empty((B, H, Sq, k.shape[2]) if with_bias else (0,), dtype=acc)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), prefix_k.new_empty(prefix_k.shape),
            prefix_v.new_empty(prefix_v.shape), dg, dbias)


class GatedPrefixAttentionFunction(torch.autograd.Function):
    """Forward and backward of the gated-prefix attention through the Triton kernels. The gate is
    a tensor here; the APT gate's own chain (sigmoid, GEMM) is autograd's, see the wrapper. The window
    travels as two ints (-1 = unbounded), the softcap as None or a float."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, out_bshd, attn_bias,
                window_left, window_right, softcap):
        out, lse = torch.ops.fastprefix.gated_prefix_attention_fwd(
            q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, out_bshd, attn_bias, window_left,
            window_right, softcap)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, attn_bias, out, lse)
        ctx.causal, ctx.scale, ctx.window, ctx.softcap = causal, scale, (window_left, window_right), softcap
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, prefix_k, prefix_v, gate, key_padding_mask, attn_bias, out, lse = ctx.saved_tensors
        bias_grad = attn_bias is not None and ctx.needs_input_grad[10]  # no dS work for a frozen bias
        dq, dk, dv, dpk, dpv, dg_full, ds = torch.ops.fastprefix.gated_prefix_attention_bwd(
            do, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, out, lse, ctx.causal, ctx.scale, attn_bias,
            bias_grad, *ctx.window, ctx.softcap)
        dgate = None
        if gate is not None and ctx.needs_input_grad[5]:
            dgate = dg_full.sum_to_size(gate.shape).to(gate.dtype)  # e.g. [B, 1, L] for a pooled gate
        dbias = None
        if bias_grad:  # [B, H, Sq, Sk] summed over the bias's broadcast dims, in its dtype
            dbias = ds.sum_to_size(_bias4(attn_bias).shape).reshape(attn_bias.shape).to(attn_bias.dtype)
        return dq, dk, dv, dpk, dpv, dgate, None, None, None, None, dbias, None, None, None


OUT_LAYOUTS = ("bhsd", "bshd")


def gate_tensor(q, gate=None, gate_hidden=None, gate_weight=None, gate_bias=None, layer_scale=None):
    """The gate both Triton paths launch with: None, or a tensor broadcastable to [B, Sq, L] in the
    accumulator dtype of q (fp32 for fp16/bf16/fp32, fp64 for fp64), so every kernel compiles one
    gate-pointer type (the one `make fitness` checks). Either `gate` as given (cast through autograd),
    or APT's layer_scale * sigmoid(gate_hidden @ gate_weight + gate_bias) from gate_hidden
    [B, Sq or 1, d], gate_weight [d, L], gate_bias [L], layer_scale (0-dim): one GEMM + sigmoid
    per call ([B, Sq, L], or [B, 1, L] from a pooled hidden state), saved by autograd.

    The GEMM (and its backward) runs in the inputs' dtype with fp32 accumulation; the sigmoid and
    scale run in the accumulator dtype, so dL/dgate (fp32 from the kernel) reaches layer_scale, a
    sum over B * Sq * L terms, without a 16-bit rounding: with an fp16 gate its error was up to 17x
    the reference's.
    """
    acc = _acc_torch_dtype(q)
    if gate is not None and gate_hidden is not None:
        raise ValueError("pass either gate or the fused gate inputs (gate_hidden, ...), not both")
    if gate_hidden is None:
        return None if gate is None else gate.to(acc)
    if gate_weight is None:
        raise ValueError("gate_hidden needs gate_weight")
    if gate_bias is None:
        gate_bias = gate_weight.new_zeros(gate_weight.shape[-1])
    logits = torch.addmm(gate_bias, gate_hidden.flatten(0, -2), gate_weight).view(*gate_hidden.shape[:-1], -1)
    gate = torch.sigmoid(logits.to(acc))
    return gate if layer_scale is None else layer_scale.to(acc) * gate


def gated_prefix_attention(q, k, v, prefix_k, prefix_v, *, gate=None, gate_hidden=None, gate_weight=None,
                           gate_bias=None, layer_scale=None, key_padding_mask=None, causal=False, scale=None,
                           attn_bias=None, window=None, softcap=None, out_layout="bhsd"):
    """Gated-prefix attention on the Triton kernels; same contract as the reference.

    q [B, H, Sq, D]; k, v [B, Hkv, Sk, D]; prefix_k, prefix_v [Hkv, L, D] (shared) or
    [B, Hkv, L, D]; gate broadcastable to [B, Sq, L], or the APT inputs gate_hidden
    [B, Sq or 1, d], gate_weight [d, L], gate_bias [L], layer_scale (0-dim), from which the gate
    layer_scale * sigmoid(gate_hidden @ gate_weight + gate_bias) is computed once per call (GEMM in
    the inputs' dtype, the rest in fp32 / fp64); key_padding_mask [B, Sk] bool, True = real
    key; attn_bias broadcastable to [B, H, Sq, Sk] (q's dtype or fp32), added to the real keys' logits
    after the cap; window (left, right), -1 = unbounded (query t at position t' = t + Sk - Sq sees real
    key u iff t' - left <= u <= t' + right; the prefix always); softcap: every logit x becomes
    softcap * tanh(x / softcap). Returns [B, H, Sq, D] in q's dtype; with out_layout="bshd" that tensor
    is a view of [B, Sq, H, D] memory (so out.transpose(1, 2) is contiguous). Inputs are expected to be
    validated by fastprefix.ops; only the kernel's own limits are checked here. fp64 inputs on a GPU run
    the reference path (fp64 is for gradcheck; the kernels' fp64 tiles are tuned for the interpreter only).
    """
    D = q.shape[-1]
    if D > 128:
        raise ValueError(f"triton gated_prefix_attention supports head dim <= 128, got {D}")
    if out_layout not in OUT_LAYOUTS:
        raise ValueError(f"out_layout must be one of {OUT_LAYOUTS}, got {out_layout!r}")
    gate = gate_tensor(q, gate, gate_hidden, gate_weight, gate_bias, layer_scale)
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask != 0
    if scale is None:
        scale = D ** -0.5
    window_left, window_right = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    softcap = None if softcap is None else float(softcap)
    if q.device.type == "cuda" and q.dtype == torch.float64:
        out = reference.gated_prefix_attention(q, k, v, prefix_k, prefix_v, gate=gate,
                                               key_padding_mask=key_padding_mask, causal=bool(causal), scale=scale,
                                               attn_bias=attn_bias, window=window, softcap=softcap)
        return out.transpose(1, 2).contiguous().transpose(1, 2) if out_layout == "bshd" else out
    return GatedPrefixAttentionFunction.apply(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, bool(causal),
                                              float(scale), out_layout == "bshd", attn_bias, window_left,
                                              window_right, softcap)


# --------------------------------------------------------------------------------------------
# Ahead-of-time fitness (see kernels/fitness.py)
# --------------------------------------------------------------------------------------------

FITNESS_DTYPES = ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32"))
# fitness-table name of each kind's kernel (all optional features on)
FITNESS_KERNELS = {"fwd": "fwd gate=none", "fwd_gate": "fwd gate=tensor", "bwd_dq": "bwd_dq gate",
                   "bwd_dkdv": "bwd_dkdv", "bwd_prefix": "bwd_prefix gate"}


def fitness_configs(features: bool = False):
    """Every launch config the launchers can pick on sm_80, sm_86 and sm_90 for fp16, bf16 and fp32
    at D in {64, 128}, with the P-Tuning v2 / APT features on (causal, padding, a gate where one exists)
    and the widest prefix tile the config allows; the issue #12 features (attn_bias, window, softcap)
    off, as the common path launches them. ``features=True`` (``fitness --features``): the same configs
    with every issue #12 feature on instead (a bias with its gradient, a window, the cap; named
    "...+features"), which share the default tiles."""
    from .fitness import signature_of

    floats = ("qk_hi", "qk_lo", "sc_hi", "sc_lo", "cap_hi", "cap_lo", "icap_hi", "icap_lo")
    off = dict(HAS_WINDOW=features, HAS_SOFTCAP=features, LIBDEVICE=True)  # + the BIAS / DS pointers below

    def spec(fn, ptrs, cx):
        # as launched on contiguous tensors: unit last-dim stride of the gate, 16-divisible row
        # strides and head dim (D in {64, 128}); lengths and the other strides stay generic.
        names = set(fn.arg_names)
        cx = {n: value for n, value in cx.items() if n in names}  # each kernel takes its own flags
        ones = {"stride_gl"} & names
        div16 = {n for n in names if re.fullmatch(r"stride_(q|k|v|pk|pv|do|dq|dk|dv|o)[bhmn]", n)} | {"D"}
        return signature_of(fn, ptrs, cx, floats, ones, div16)

    for arch in TARGETS:
        for torch_dtype, name in FITNESS_DTYPES:
            dot = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[name]
            ptr, f32 = "*" + name, "*fp32"
            flags = dict(off, ACC=tl.float32, DOT=dot, PREC=_precision(dot), EVEN_D=True)
            bias = dict(BIAS=ptr, DS=f32) if features else {}  # pointers; None (constexpr) without features
            for D in (64, 128):
                tag = f"sm{arch} {name} D{D}"
                for kind in KINDS:
                    cfg = pick_config(kind, D, arch, torch_dtype, features)
                    cx = dict(flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=D)
                    if kind in ("fwd", "fwd_gate"):
                        fn = _fwd_kernel.fn
                        cx.update(IS_CAUSAL=True, HAS_PAD=True, HAS_GATE=kind == "fwd_gate", BLOCK_L=cfg.block_l,
                                  HAS_BIAS=features)
                        if kind == "fwd":
                            cx["GATE"] = None
                        ptrs = {n: ptr for n in ("Q", "K", "V", "PK", "PV", "GATE", "OUT")}
                        ptrs.update(KPM="*i1", LSE=f32)
                    elif kind == "bwd_dq":
                        fn = _bwd_dq_kernel.fn
                        cx.update(IS_CAUSAL=True, HAS_PAD=True, HAS_GATE=True, BLOCK_L=cfg.block_l,
                                  HAS_BIAS=features, BIAS_GRAD=features)
                        ptrs = {n: ptr for n in ("Q", "K", "V", "PK", "PV", "GATE", "DO", "DQ")}
                        ptrs.update(KPM="*i1", LSE=f32, DELTA=f32)
                    elif kind == "bwd_dkdv":
                        fn = _bwd_dkdv_kernel.fn
                        cx.update(IS_CAUSAL=True, HAS_PAD=True, HAS_BIAS=features)
                        ptrs = {n: ptr for n in ("Q", "K", "V", "DO", "DK", "DV")}
                        ptrs.update(KPM="*i1", LSE=f32, DELTA=f32)
                    else:
                        fn = _bwd_prefix_kernel.fn
                        cx.update(HAS_GATE=True)
                        ptrs = {n: ptr for n in ("Q", "PK", "PV", "GATE", "DO")}
                        ptrs.update(LSE=f32, DELTA=f32, DPK=f32, DPV=f32, DG=f32)
                    if kind != "fwd":
                        ptrs["GATE"] = f32  # gate_tensor hands every kernel the gate in the accumulator dtype
                    if features:  # the host folds causal into the window
                        ptrs.update(bias)
                        cx["IS_CAUSAL"] = False
                    else:
                        cx.update(BIAS=None, DS=None)
                    sig, cx, attrs = spec(fn, ptrs, cx)
                    yield (f"attn.{FITNESS_KERNELS[kind]}{'+features' if features else ''} {tag}", fn, sig, cx,
                           cfg.num_warps, cfg.num_stages, arch, attrs)
                if features:
                    continue  # the delta kernel has no features
                fn = _bwd_delta_kernel.fn
                cx = dict(BLOCK_M=_DELTA_BLOCK_M, BLOCK_D=D, EVEN_D=True, ACC=tl.float32)
                sig, cx, attrs = spec(fn, dict(DO=ptr, OUT=ptr, DELTA=f32), cx)
                yield f"attn.bwd_delta {tag}", fn, sig, cx, 4, 1, arch, attrs
