"""Fused prompt embedding for DePT and ADePT: gather + offset + prompt concatenation, one launch.

Math (see ``fastprefix.reference.embedding``, the naive twin with the same signatures)::

    ADePT: X = E[ids];  T = (X @ A + a) * dropout_mask;  X' = X + ReLU(T) @ B + b
    DePT:  X' = E[ids] + scaling * (A[:S] @ B)
    out[b] = [prompt ; X'[b]]                      -> [B, m+S, d]

Forward algorithm
    ADePT: one program per tile of BLOCK_T tokens (the B*S tokens flattened). Pass 1 loops over d in
    BLOCK_D chunks (d need not be a power of two) gathering X rows and accumulating T = X @ A in
    registers (fp32; fp64 for fp64 inputs); bias, dropout mask and ReLU are applied in registers. Pass 2
    loops over d again, re-reads the X chunk (it is hot in L2) and writes X + ReLU(T) @ B + b straight
    into rows m..m+S-1 of the output. T never touches global memory.
    DePT: one program per (position tile, d chunk): the offset tile scaling * A[pos] @ B[:, chunk] is
    computed once and added to the gathered rows of every batch row (the offset does not depend on b).
    In both kernels extra programs (after the token programs) copy the prompt into rows 0..m-1 of
    every batch row, so the whole [B, m+S, d] output is written by a single launch, each element once.

Backward algorithm
    ADePT, kernel 1 (per token tile): recompute T (X @ A) and dH = G @ B^T in the same loop over d, then
    dT = dH * [T > 0] * mask. Writes H = ReLU(T) and dT ([N, r] each, N = B*S, in the input dtype),
    per-tile partial sums of dT (-> grad of a) and, only when the table needs a gradient,
    dX = G + dT @ A^T ([N, d], fp32).
    ADePT, kernel 2 (grid: d chunks x SPLIT token groups): dB = H^T @ G, dA = X^T @ dT and db = sum G,
    each program looping over its share of the token tiles; the SPLIT partials are summed by torch.
    DePT: one program per (position tile, d chunk, batch split) sums its share of G over the batch in
    registers, then writes partials of dA = s * G_sum @ B^T (this d chunk's share) and of
    dB = s * A^T @ G_sum; torch adds the partials in a fixed order. (Before: one program per position
    tile looping over all of d and B, 4 programs for the whole GPU at S = 128.)
    Prompt gradient: G[:, :m] summed over the batch by torch (fp32 accumulation).
    Table gradient: deterministic segment reduction instead of atomics or index_add_ (whose CUDA
    version is not deterministic). The ids are sorted stably by torch; level 1 gives each fixed chunk
    of sorted tokens (64 on GPU) and d chunk one program that adds each run of one id in token order
    in fp32, writing runs that end inside the chunk; level 2 adds the chunk partials of runs that
    cross chunks, in chunk order. Every table row is written once, rounded once to the table's dtype;
    absent ids and ``padding_idx`` (its tokens are skipped, as in torch.nn.Embedding) get exact zeros.
    No host sync: the grids depend on N and d only.
    All reductions run in a fixed order: the backward is deterministic (bitwise reproducible).

Memory
    Inference and training forward store nothing but the output: T is recomputed in the backward.
    The training forward saves only its inputs (ADePT: ids, table, A, a, B, mask; DePT: ids, table,
    A, B - tensors autograd holds anyway), no activation: zero extra bytes.
    ADePT backward transients: H and dT (2 * N * r elements in the input dtype), cdiv(N, BLOCK_T) * r +
    SPLIT * (2 r d + d) fp32 partials (SPLIT ~ 2 * SMs / cdiv(d, BLOCK_D)), and, only when the table
    needs a gradient, dX (N * d fp32) plus the dense [V, d] table gradient in the table's dtype.
    DePT backward transients: splits * (cdiv(S, BLOCK_T) * r * d + cdiv(d, BLOCK_D) * S * r) fp32
    partials (+ the table gradient). Table gradient: 2 * cdiv(N, chunk) * d fp32 chunk partials.

Launch configs
    Fixed per kernel (no autotune: it cannot run on CPU), see ``_GPU_TILES_*``; ``fitness_configs()``
    lists every config the launchers can pick on sm_80, sm_86 and sm_90 for fp16 / bf16 / fp32 so that
    ``python -m fastprefix.kernels.fitness`` proves them spill-free ahead of time. Both ops are
    registered with torch.library (``fastprefix::adept_embedding``, ``fastprefix::dept_embedding`` and
    their ``_backward`` ops), so torch.compile sees opaque calls with fake-tensor shape functions.

Caveats
    * Accumulation is fp32 for fp16/bf16/fp32 inputs (fp64 for fp64, so gradcheck works under the
      interpreter). fp32 dots use input_precision="ieee" (no TF32). 16-bit inputs feed the tensor cores
      in their own dtype: ReLU(T) and dT are rounded to it before the second GEMM, as PyTorch does.
    * Under TRITON_INTERPRET=1 bf16 arithmetic does not work, so bf16 operands are upcast to fp32 in
      the kernels there (on GPU they stay bf16).
    * Ids are range-checked before any gather. On CPU a ValueError names the range; on CUDA the check
      runs on the device (torch._assert_async): no host sync per call (CUDA graphs work), and a bad id
      stops the stream with a device-side assertion before any kernel reads outside the table.
    * DePT's ``scaling`` is an fp32 kernel argument (also for fp64 inputs).
    * fp64 inputs on a GPU use the fp32 tiles (fp64 is meant for gradcheck under the interpreter);
      they are not in the fitness table.
    * Every launch sets enable_fp_fusion explicitly (FP_FUSION).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .. import _validate as check
from ._runtime import interpreting, new_buffer, poison_outputs

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)


@triton.jit
def _copy_prompt_tile(q, prompt_ptr, out_ptr, m, S, d, stride_p, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program q of B * cdiv(m, BLOCK_T): copy prompt rows of one tile into batch row q // tiles."""
    n_tiles = tl.cdiv(m, BLOCK_T)
    b = (q // n_tiles).to(tl.int64)
    rows = (q % n_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < m
    rows = rows.to(tl.int64)
    src = prompt_ptr + rows[:, None] * stride_p
    dst = out_ptr + (b * (m + S) + rows)[:, None] * d
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < d)[None, :]
        tl.store(dst + cols[None, :], tl.load(src + cols[None, :], mask=ok), mask=ok)


@triton.heuristics({"HAS_DROPOUT": lambda args: args["mask_ptr"] is not None})
@triton.jit
def _adept_fwd_kernel(
    ids_ptr, weight_ptr, prompt_ptr, down_w_ptr, down_b_ptr, up_w_ptr, up_b_ptr, mask_ptr, out_ptr,
    N, S, m, d, r, stride_w, stride_p,
    ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    n_token_tiles = tl.cdiv(N, BLOCK_T)
    if pid < n_token_tiles:
        tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        tok_ok = tok < N
        tok = tok.to(tl.int64)
        ids = tl.load(ids_ptr + tok, mask=tok_ok, other=0).to(tl.int64)
        x_rows = weight_ptr + ids[:, None] * stride_w
        rk = tl.arange(0, BLOCK_R)
        r_ok = rk < r

        # Pass 1: T = X @ A, accumulated over d chunks, kept in registers.
        t = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            d_ok = cols < d
            x = tl.load(x_rows + cols[None, :], mask=tok_ok[:, None] & d_ok[None, :], other=0.0)
            a = tl.load(down_w_ptr + cols[:, None] * r + rk[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
            t = _dot(x, a, t, DOT_DTYPE, PRECISION)
        t += tl.load(down_b_ptr + rk, mask=r_ok, other=0.0).to(ACC)[None, :]
        if HAS_DROPOUT:
            keep = tl.load(mask_ptr + tok[:, None] * r + rk[None, :], mask=tok_ok[:, None] & r_ok[None, :], other=0.0)
            t = t * keep.to(ACC)
        h = tl.maximum(t, 0.0)

        # Pass 2: X + ReLU(T) @ B + b, written at output row b*(m+S) + m + s = n + (n // S + 1) * m.
        out_rows = out_ptr + (tok + (tok // S + 1) * m)[:, None] * d
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            d_ok = cols < d
            ok = tok_ok[:, None] & d_ok[None, :]
            x = tl.load(x_rows + cols[None, :], mask=ok, other=0.0)
            bw = tl.load(up_w_ptr + rk[:, None] * d + cols[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            y = _dot(h, bw, x.to(ACC), DOT_DTYPE, PRECISION)
            y += tl.load(up_b_ptr + cols, mask=d_ok, other=0.0).to(ACC)[None, :]
            tl.store(out_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        _copy_prompt_tile(pid - n_token_tiles, prompt_ptr, out_ptr, m, S, d, stride_p, BLOCK_T, BLOCK_D)


@triton.heuristics({"HAS_DROPOUT": lambda args: args["mask_ptr"] is not None})
@triton.jit
def _adept_bwd_token_kernel(
    ids_ptr, weight_ptr, down_w_ptr, down_b_ptr, up_w_ptr, mask_ptr, grad_ptr,
    h_ptr, dt_ptr, dbias_part_ptr, dx_ptr,
    N, S, m, d, r, stride_w, stride_gb, stride_gs,
    ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr,
):
    pid = tl.program_id(0)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < N
    tok = tok.to(tl.int64)
    ids = tl.load(ids_ptr + tok, mask=tok_ok, other=0).to(tl.int64)
    x_rows = weight_ptr + ids[:, None] * stride_w
    g_rows = grad_ptr + ((tok // S) * stride_gb + (m + tok % S) * stride_gs)[:, None]
    rk = tl.arange(0, BLOCK_R)
    r_ok = rk < r

    # One pass over d recomputes T = X @ A and forms dH = G @ B^T.
    t = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC)
    dh = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        d_ok = cols < d
        ok = tok_ok[:, None] & d_ok[None, :]
        dr_ok = d_ok[:, None] & r_ok[None, :]
        x = tl.load(x_rows + cols[None, :], mask=ok, other=0.0)
        a = tl.load(down_w_ptr + cols[:, None] * r + rk[None, :], mask=dr_ok, other=0.0)
        t = _dot(x, a, t, DOT_DTYPE, PRECISION)
        g = tl.load(g_rows + cols[None, :], mask=ok, other=0.0)
        bw_t = tl.load(up_w_ptr + rk[None, :] * d + cols[:, None], mask=dr_ok, other=0.0)
        dh = _dot(g, bw_t, dh, DOT_DTYPE, PRECISION)
    t += tl.load(down_b_ptr + rk, mask=r_ok, other=0.0).to(ACC)[None, :]
    tr_ok = tok_ok[:, None] & r_ok[None, :]
    if HAS_DROPOUT:
        keep = tl.load(mask_ptr + tok[:, None] * r + rk[None, :], mask=tr_ok, other=0.0).to(ACC)
        t = t * keep
        dt = tl.where(t > 0, dh * keep, 0.0)
    else:
        dt = tl.where(t > 0, dh, 0.0)
    h = tl.maximum(t, 0.0)
    # Rows past N hold G = 0, hence dT = 0: the partial sum needs no extra mask.
    tl.store(dbias_part_ptr + pid.to(tl.int64) * r + rk, tl.sum(dt, axis=0), mask=r_ok)
    dt = dt.to(dt_ptr.dtype.element_ty)
    tl.store(h_ptr + tok[:, None] * r + rk[None, :], h.to(h_ptr.dtype.element_ty), mask=tr_ok)
    tl.store(dt_ptr + tok[:, None] * r + rk[None, :], dt, mask=tr_ok)

    if NEED_DX:
        # dX = G + dT @ A^T (the residual path plus the FFN path), fp32 for the table's segment sum.
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            d_ok = cols < d
            ok = tok_ok[:, None] & d_ok[None, :]
            g = tl.load(g_rows + cols[None, :], mask=ok, other=0.0)
            a_t = tl.load(down_w_ptr + cols[None, :] * r + rk[:, None], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            dx = _dot(dt, a_t, g.to(ACC), DOT_DTYPE, PRECISION)
            tl.store(dx_ptr + tok[:, None] * d + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _adept_bwd_param_kernel(
    ids_ptr, weight_ptr, grad_ptr, h_ptr, dt_ptr, d_down_w_part_ptr, d_up_w_part_ptr, d_up_b_part_ptr,
    N, S, m, d, r, stride_w, stride_gb, stride_gs, SPLIT,
    ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (d chunk, split s) reduces token tiles s, s+SPLIT, ... into one partial of dA, dB, db."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = cols < d
    rk = tl.arange(0, BLOCK_R)
    r_ok = rk < r
    d_up_w = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
    d_down_w = tl.zeros((BLOCK_D, BLOCK_R), dtype=ACC)
    d_up_b = tl.zeros((BLOCK_D,), dtype=ACC)
    for tile in range(pid_s, tl.cdiv(N, BLOCK_T), SPLIT):
        tok = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        tok_ok = tok < N
        tok = tok.to(tl.int64)
        ok = tok_ok[:, None] & d_ok[None, :]
        tr_ok = tok_ok[:, None] & r_ok[None, :]
        ids = tl.load(ids_ptr + tok, mask=tok_ok, other=0).to(tl.int64)
        x = tl.load(weight_ptr + ids[:, None] * stride_w + cols[None, :], mask=ok, other=0.0)
        g_rows = (tok // S) * stride_gb + (m + tok % S) * stride_gs
        g = tl.load(grad_ptr + g_rows[:, None] + cols[None, :], mask=ok, other=0.0)
        h = tl.load(h_ptr + tok[:, None] * r + rk[None, :], mask=tr_ok, other=0.0)
        dt = tl.load(dt_ptr + tok[:, None] * r + rk[None, :], mask=tr_ok, other=0.0)
        d_up_w = _dot(tl.trans(h), g, d_up_w, DOT_DTYPE, PRECISION)
        d_down_w = _dot(tl.trans(x), dt, d_down_w, DOT_DTYPE, PRECISION)
        d_up_b += tl.sum(g.to(ACC), axis=0)
    part = pid_s.to(tl.int64)
    tl.store(d_up_w_part_ptr + part * r * d + rk[:, None] * d + cols[None, :], d_up_w,
             mask=r_ok[:, None] & d_ok[None, :])
    tl.store(d_down_w_part_ptr + part * d * r + cols[:, None] * r + rk[None, :], d_down_w,
             mask=d_ok[:, None] & r_ok[None, :])
    tl.store(d_up_b_part_ptr + part * d + cols, d_up_b, mask=d_ok)


@triton.jit
def _dept_fwd_kernel(
    ids_ptr, weight_ptr, prompt_ptr, lora_a_ptr, lora_b_ptr, out_ptr,
    n_batch, S, m, d, r, stride_w, stride_p, stride_la, scaling,
    ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    n_chunks = tl.cdiv(d, BLOCK_D)
    n_main = tl.cdiv(S, BLOCK_T) * n_chunks
    if pid < n_main:
        pos = (pid // n_chunks) * BLOCK_T + tl.arange(0, BLOCK_T)
        pos_ok = pos < S
        pos = pos.to(tl.int64)
        cols = (pid % n_chunks) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = cols < d
        rk = tl.arange(0, BLOCK_R)
        r_ok = rk < r
        la = tl.load(lora_a_ptr + pos[:, None] * stride_la + rk[None, :], mask=pos_ok[:, None] & r_ok[None, :],
                     other=0.0)
        lb = tl.load(lora_b_ptr + rk[:, None] * d + cols[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        # The offset tile is shared by every batch row: compute once, add B times.
        offset = _dot(la, lb, tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC), DOT_DTYPE, PRECISION) * scaling
        ok = pos_ok[:, None] & d_ok[None, :]
        id_idx = pos  # int64 running offsets, advanced once per batch row
        out_rows = m + pos
        for _ in range(0, n_batch):
            ids = tl.load(ids_ptr + id_idx, mask=pos_ok, other=0).to(tl.int64)
            x = tl.load(weight_ptr + ids[:, None] * stride_w + cols[None, :], mask=ok, other=0.0)
            tl.store(out_ptr + out_rows[:, None] * d + cols[None, :], (x.to(ACC) + offset).to(out_ptr.dtype.element_ty),
                     mask=ok)
            id_idx += S
            out_rows += m + S
    else:
        _copy_prompt_tile(pid - n_main, prompt_ptr, out_ptr, m, S, d, stride_p, BLOCK_T, BLOCK_D)


@triton.jit
def _dept_bwd_kernel(
    grad_ptr, lora_a_ptr, lora_b_ptr, d_lora_a_part_ptr, d_lora_b_part_ptr,
    n_batch, S, m, d, r, stride_gb, stride_gs, stride_la, scaling, n_chunks, rows_per_split,
    ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program per (position tile, d chunk) (folded into grid axis 0) and batch split (axis 1):
    G summed over the split's batch rows, then its partials of dA [S, r] (this d chunk's share of the
    sum over d) and of dB [r, chunk]. Partials: dA [splits, n_chunks, S, r], dB [splits, tiles, r, d];
    torch adds them in a fixed order (deterministic)."""
    pid_t = tl.program_id(0) // n_chunks
    pid_c = tl.program_id(0) % n_chunks
    pid_s = tl.program_id(1)
    n_tiles = tl.cdiv(S, BLOCK_T)
    pos = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    pos_ok = pos < S
    pos = pos.to(tl.int64)
    cols = pid_c * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = cols < d
    rk = tl.arange(0, BLOCK_R)
    r_ok = rk < r
    tr_ok = pos_ok[:, None] & r_ok[None, :]
    ok = pos_ok[:, None] & d_ok[None, :]
    g_sum = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
    b0 = pid_s * rows_per_split
    g_rows = (m + pos) * stride_gs + b0.to(tl.int64) * stride_gb  # int64, advanced one batch row at a time
    for _ in range(b0, tl.minimum(n_batch, b0 + rows_per_split)):
        g_sum += tl.load(grad_ptr + g_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(ACC)
        g_rows += stride_gb
    la = tl.load(lora_a_ptr + pos[:, None] * stride_la + rk[None, :], mask=tr_ok, other=0.0)
    lb_t = tl.load(lora_b_ptr + rk[None, :] * d + cols[:, None], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
    d_la = _dot(g_sum, lb_t, tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC), DOT_DTYPE, PRECISION)
    d_lb = _dot(tl.trans(la), g_sum, tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC), DOT_DTYPE, PRECISION)
    la_part = (pid_s.to(tl.int64) * n_chunks + pid_c) * S * r
    tl.store(d_lora_a_part_ptr + la_part + pos[:, None] * r + rk[None, :], d_la * scaling, mask=tr_ok)
    lb_part = (pid_s.to(tl.int64) * n_tiles + pid_t) * r * d
    tl.store(d_lora_b_part_ptr + lb_part + rk[:, None] * d + cols[None, :], d_lb * scaling,
             mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _segment_sum_chunk_kernel(
    sorted_ptr, order_ptr, src_ptr, out_ptr, head_ptr, tail_ptr,
    N, S, m, d, stride_sb, stride_ss, stride_o, chunk, padding_idx,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Level 1 of the table gradient. Program (c, column chunk) walks sorted tokens
    [c * chunk, (c+1) * chunk) in token order and sums the source rows of each run of one id. A run
    inside the chunk is final: written to out[id]. The part of a run that began in an earlier chunk
    goes to head[c]; the part of a run that began here and goes on goes to tail[c] (level 2 adds
    them). Tokens holding padding_idx (-1: none) add nothing, so its row gets zeros."""
    c = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = cols < d
    start = c.to(tl.int64) * chunk
    end = tl.minimum(N, start + chunk)
    cur = tl.load(sorted_ptr + start)
    # 1 when the chunk's first run began in it (sorted ids: equal neighbours are one run)
    started = ((start == 0) | (tl.load(sorted_ptr + tl.maximum(start - 1, 0)) != cur)).to(tl.int32)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for i in range(start, end):
        uid = tl.load(sorted_ptr + i)
        if uid != cur:  # the run of `cur` ends inside this chunk
            if started != 0:
                tl.store(out_ptr + cur * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
            else:
                tl.store(head_ptr + c.to(tl.int64) * d + cols, acc, mask=d_ok)
            acc = tl.zeros((BLOCK_D,), dtype=ACC)
            cur = uid
            started = started * 0 + 1
        if uid != padding_idx:
            n = tl.load(order_ptr + i).to(tl.int64)
            row = (n // S) * stride_sb + (m + n % S) * stride_ss
            acc += tl.load(src_ptr + row + cols, mask=d_ok, other=0.0).to(ACC)
    goes_on = (end < N) & (tl.load(sorted_ptr + tl.minimum(end, N - 1)) == cur)
    if started != 0:
        if goes_on:
            tl.store(tail_ptr + c.to(tl.int64) * d + cols, acc, mask=d_ok)
        else:
            tl.store(out_ptr + cur * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
    else:
        tl.store(head_ptr + c.to(tl.int64) * d + cols, acc, mask=d_ok)


@triton.jit
def _segment_sum_carry_kernel(
    sorted_ptr, run_end_ptr, out_ptr, head_ptr, tail_ptr,
    N, d, stride_o, chunk,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Level 2: program (c, column chunk) finishes the run that began in chunk c and goes on past
    it (if any): tail[c] + head[c+1] + ... + head[k], k the chunk holding the run's last token,
    added in chunk order (deterministic), written once to out[id]. At most N / chunk steps."""
    c = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = cols < d
    start = c.to(tl.int64) * chunk
    end = tl.minimum(N, start + chunk)
    last = tl.load(sorted_ptr + end - 1)
    began_here = (start == 0) | (tl.load(sorted_ptr + tl.maximum(start - 1, 0)) != last)
    goes_on = (end < N) & (tl.load(sorted_ptr + tl.minimum(end, N - 1)) == last)
    if began_here & goes_on:
        last_chunk = (tl.load(run_end_ptr + end - 1) - 1) // chunk  # run_end: one past the run's last token
        acc = tl.load(tail_ptr + c.to(tl.int64) * d + cols, mask=d_ok, other=0.0).to(ACC)
        head_row = head_ptr + (c + 1).to(tl.int64) * d  # int64, advanced one chunk at a time
        for _ in range(c + 1, last_chunk + 1):
            acc += tl.load(head_row + cols, mask=d_ok, other=0.0).to(ACC)
            head_row += d
        tl.store(out_ptr + last.to(tl.int64) * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


# ------------------------------------------------------------------------------------------- launchers

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}

# (BLOCK_T, BLOCK_D, num_warps, num_stages) per kernel, for 16-bit inputs (tensor-core dots) and for
# fp32 (IEEE dots run on FMA units and hold more registers, hence narrower tiles). The largest tile
# needs 24 KiB of shared memory, so one table serves sm_80, sm_86/89 and sm_90; fitness_configs()
# below compiles every entry for all three: no spills for r <= 64. The ADePT kernels take 64 tokens
# per tile: A and B are re-read once per tile (at d=4096, r=64, 16k tokens: 512 MB of L2 reads with
# 32-token tiles, 256 MB with 64). For the table gradient BLOCK_T is the chunk of sorted tokens one
# program sums serially (see _segment_sum_rows).
_GPU_TILES_16BIT = {
    "adept_fwd": (64, 64, 4, 2),
    "adept_bwd_token": (64, 32, 8, 2),
    "adept_bwd_param": (64, 64, 8, 2),
    "dept_fwd": (32, 64, 4, 2),
    "dept_bwd": (32, 64, 4, 1),
    "segment_sum": (64, 256, 4, 1),
}
_GPU_TILES_FP32 = {
    "adept_fwd": (64, 32, 8, 2),
    "adept_bwd_token": (32, 32, 8, 2),
    "adept_bwd_param": (32, 16, 8, 1),
    "dept_fwd": (32, 32, 4, 2),
    "dept_bwd": (32, 32, 8, 1),
    "segment_sum": (64, 256, 4, 1),
}
# Explicit on every launch (Triton 3.10 flips the default to off): FMA contraction on, the numerics
# the error figures of this file were measured with.
FP_FUSION = True


def _arch(device):
    """(major, minor) of the CUDA device, or None under the interpreter. Queried at call time only."""
    if device.type != "cuda" or interpreting():
        return None
    return torch.cuda.get_device_capability(device)


def _config(kernel, dtype, arch, d):
    """Tile sizes and launch options of ``kernel`` for inputs of ``dtype`` and width ``d`` on ``arch``."""
    if arch is None:
        # Interpreter: each program runs as numpy ops, so few large tiles are fastest.
        block_t, block_d, warps, stages = 32, 256, 4, 1
        if kernel == "segment_sum":
            block_t = 4  # short chunks: the tests' repeated ids span several (the level-2 path)
    else:
        tiles = _GPU_TILES_16BIT if dtype in (torch.float16, torch.bfloat16) else _GPU_TILES_FP32
        block_t, block_d, warps, stages = tiles[kernel]
    block_d = min(block_d, max(16, triton.next_power_of_2(d)))
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps, num_stages=stages, enable_fp_fusion=FP_FUSION)


def _block_r(r):
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _numerics(dtype):
    """Constexprs: accumulator dtype, operand dtype fed to tl.dot, dot precision."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    dot = _TL_DTYPES[dtype]
    if dtype == torch.bfloat16 and interpreting():
        dot = tl.float32  # the interpreter cannot do bf16 arithmetic
    precision = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"  # tf32 is ignored for 16-bit
    return dict(ACC=acc, DOT_DTYPE=dot, PRECISION=precision)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_ids(input_ids, weight):
    """Out-of-range ids would make the gather read outside the table: refuse them before any launch.

    On CPU (the interpreter) a ValueError names the range found. On CUDA the check runs on the device
    (torch._assert_async, queued before the kernels on the same stream): no host sync per call, so the
    ops can be captured in CUDA graphs; a bad id stops the stream with a device-side assertion carrying
    the same message, before any gather runs.
    """
    V = weight.shape[0]
    if input_ids.device.type != "cuda":
        check.token_ids("input_ids", input_ids, V, weight)
        return
    check.token_ids("input_ids", input_ids, V, weight, check_range=False)
    torch._assert_async(((input_ids >= 0) & (input_ids < V)).all(),
                        f"input_ids holds ids outside [0, {V}): the embedding table has {V} rows")


def _padding_row(padding_idx, vocab_size):
    """padding_idx as a row in [0, V) (negative counts from the end, as in torch), or -1 for none."""
    if padding_idx is None:
        return -1
    if not isinstance(padding_idx, int) or not -vocab_size <= padding_idx < vocab_size:
        raise ValueError(f"padding_idx must be None or an int in [-{vocab_size}, {vocab_size}), got {padding_idx!r}")
    return padding_idx % vocab_size


def _prompt_len(prompt):
    return 0 if prompt is None else prompt.shape[0]


def _segment_sum_rows(input_ids, src, S, m, stride_sb, stride_ss, vocab_size, out_dtype, padding_idx=-1,
                      chunk=None):
    """Dense [V, d] table gradient: row v = sum of the source rows of tokens with id v (token order);
    rows of absent ids and of padding_idx (>= 0; -1: none) are zeros.

    No host sync: the grid depends on N and d only. The ids are sorted stably; level 1 gives each
    chunk of `chunk` sorted tokens one program that sums its runs serially (runs inside the chunk are
    final), level 2 adds the chunk partials of runs that cross chunk borders, in chunk order. The
    serial work per program is at most `chunk` rows, plus N / chunk partials for a run as long as the
    batch (a padding id repeated 5,000 times: 79 steps at chunk 64 instead of 5,000). Deterministic.
    """
    d = src.shape[-1]
    flat = input_ids.reshape(-1).to(torch.int64)  # int64 row offsets in the kernels (V * d may pass 2^31)
    N = flat.numel()
    sorted_ids, order = torch.sort(flat, stable=True)
    run_end = torch.searchsorted(sorted_ids, sorted_ids, right=True)  # one past the last token of each run
    grad_table = torch.zeros((vocab_size, d), dtype=out_dtype, device=src.device)
    if poison_outputs():
        grad_table.index_fill_(0, flat, float("nan"))  # every row of a present id must be written
    cfg = _config("segment_sum", out_dtype, _arch(src.device), d)
    chunk = chunk or cfg.pop("BLOCK_T")
    cfg.pop("BLOCK_T", None)
    n_chunks = triton.cdiv(N, chunk)
    acc = _acc_dtype(out_dtype)
    head = new_buffer((n_chunks, d), acc, src.device)
    tail = new_buffer((n_chunks, d), acc, src.device)
    grid = (n_chunks, triton.cdiv(d, cfg["BLOCK_D"]))
    numerics = dict(ACC=_numerics(out_dtype)["ACC"], **cfg)
    _segment_sum_chunk_kernel[grid](
        sorted_ids, order, src, grad_table, head, tail, N, S, m, d, stride_sb, stride_ss, grad_table.stride(0),
        chunk, padding_idx, **numerics,
    )
    _segment_sum_carry_kernel[grid](sorted_ids, run_end, grad_table, head, tail, N, d, grad_table.stride(0), chunk,
                                    **numerics)
    return grad_table


def _adept_forward(input_ids, weight, prompt, down_weight, down_bias, up_weight, up_bias, dropout_mask):
    B, S = input_ids.shape
    d, r = down_weight.shape
    m = _prompt_len(prompt)
    N = B * S
    weight = _last_dim_contiguous(weight)
    prompt_arg = weight if m == 0 else _last_dim_contiguous(prompt)  # dummy pointer when there is no prompt
    out = new_buffer((B, m + S, d), weight.dtype, weight.device)
    cfg = _config("adept_fwd", weight.dtype, _arch(weight.device), d)
    grid = (triton.cdiv(N, cfg["BLOCK_T"]) + B * triton.cdiv(m, cfg["BLOCK_T"]),)
    _adept_fwd_kernel[grid](
        input_ids.contiguous(), weight, prompt_arg, down_weight.contiguous(), down_bias.contiguous(),
        up_weight.contiguous(), up_bias.contiguous(), None if dropout_mask is None else dropout_mask.contiguous(),
        out, N, S, m, d, r, weight.stride(0), prompt_arg.stride(0),
        BLOCK_R=_block_r(r), **_numerics(weight.dtype), **cfg,
    )
    return out


def _adept_backward(grad_out, input_ids, weight, m, down_weight, down_bias, up_weight, dropout_mask, needs,
                    padding_idx=-1):
    """Gradients (table, prompt, A, a, B, b) for the flags in ``needs`` (None where not needed)."""
    need_table, need_prompt, need_dw, need_db, need_uw, need_ub = needs
    B, S = input_ids.shape
    d, r = down_weight.shape
    N = B * S
    dtype, device = weight.dtype, weight.device
    acc = _acc_dtype(dtype)
    grad = _last_dim_contiguous(grad_out)
    g_table = g_prompt = g_dw = g_db = g_uw = g_ub = None
    if need_prompt:
        g_prompt = grad[:, :m].sum(0, dtype=acc).to(dtype)
    if not (need_table or need_dw or need_db or need_uw):
        if need_ub:  # b alone needs no recomputation of the FFN
            g_ub = grad[:, m:].sum((0, 1), dtype=acc).to(dtype)
        return g_table, g_prompt, g_dw, g_db, g_uw, g_ub

    ids = input_ids.contiguous()
    weight = _last_dim_contiguous(weight)
    down_weight, down_bias, up_weight = down_weight.contiguous(), down_bias.contiguous(), up_weight.contiguous()
    mask = None if dropout_mask is None else dropout_mask.contiguous()
    arch = _arch(device)
    numerics = _numerics(dtype)
    block_r = _block_r(r)

    cfg = _config("adept_bwd_token", dtype, arch, d)
    n_tiles = triton.cdiv(N, cfg["BLOCK_T"])
    h = new_buffer((N, r), dtype, device)
    dt = new_buffer((N, r), dtype, device)
    db_part = new_buffer((n_tiles, r), acc, device)
    dx = new_buffer((N, d), acc, device) if need_table else None
    _adept_bwd_token_kernel[(n_tiles,)](
        ids, weight, down_weight, down_bias, up_weight, mask, grad, h, dt, db_part, dt if dx is None else dx,
        N, S, m, d, r, weight.stride(0), grad.stride(0), grad.stride(1),
        BLOCK_R=block_r, NEED_DX=need_table, **numerics, **cfg,
    )
    if need_db:
        g_db = db_part.sum(0).to(dtype)
    if need_table:
        g_table = _segment_sum_rows(ids, dx, N, 0, 0, d, weight.shape[0], dtype, padding_idx)

    if need_dw or need_uw or need_ub:
        cfg = _config("adept_bwd_param", dtype, arch, d)
        n_tiles = triton.cdiv(N, cfg["BLOCK_T"])
        n_chunks = triton.cdiv(d, cfg["BLOCK_D"])
        if arch is None:
            split = min(n_tiles, 2)
        else:  # about two programs per SM; split s reduces token tiles s, s + split, ...
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            split = max(1, min(n_tiles, triton.cdiv(2 * sms, n_chunks)))
        dw_part = new_buffer((split, d, r), acc, device)
        uw_part = new_buffer((split, r, d), acc, device)
        ub_part = new_buffer((split, d), acc, device)
        _adept_bwd_param_kernel[(n_chunks, split)](
            ids, weight, grad, h, dt, dw_part, uw_part, ub_part,
            N, S, m, d, r, weight.stride(0), grad.stride(0), grad.stride(1), split,
            BLOCK_R=block_r, **numerics, **cfg,
        )
        g_dw = dw_part.sum(0).to(dtype) if need_dw else None
        g_uw = uw_part.sum(0).to(dtype) if need_uw else None
        g_ub = ub_part.sum(0).to(dtype) if need_ub else None
    return g_table, g_prompt, g_dw, g_db, g_uw, g_ub


def _dept_rows_per_split(B, programs, device, arch):
    """Batch rows per program of the DePT backward. (position tile, d chunk) programs already give
    S / BLOCK_T * d / BLOCK_D of them; the batch is split further only until there are about two per
    SM (at most 64 splits). The interpreter splits in two whenever it can, so tests cover it."""
    if arch is None:
        splits = min(B, 2)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(B, 64, triton.cdiv(2 * sms, programs)))
    return triton.cdiv(B, splits)


def _dept_forward(input_ids, weight, prompt, lora_a, lora_b, scaling):
    B, S = input_ids.shape
    r, d = lora_b.shape
    m = _prompt_len(prompt)
    weight = _last_dim_contiguous(weight)
    lora_a = _last_dim_contiguous(lora_a)
    prompt_arg = weight if m == 0 else _last_dim_contiguous(prompt)
    out = new_buffer((B, m + S, d), weight.dtype, weight.device)
    cfg = _config("dept_fwd", weight.dtype, _arch(weight.device), d)
    n_main = triton.cdiv(S, cfg["BLOCK_T"]) * triton.cdiv(d, cfg["BLOCK_D"])
    grid = (n_main + B * triton.cdiv(m, cfg["BLOCK_T"]),)
    _dept_fwd_kernel[grid](
        input_ids.contiguous(), weight, prompt_arg, lora_a, lora_b.contiguous(), out,
        B, S, m, d, r, weight.stride(0), prompt_arg.stride(0), lora_a.stride(0), float(scaling),
        BLOCK_R=_block_r(r), **_numerics(weight.dtype), **cfg,
    )
    return out


def _dept_backward(grad_out, input_ids, weight, m, lora_a, lora_b, scaling, needs, padding_idx=-1):
    """Gradients (table, prompt, lora_a, lora_b) for the flags in ``needs``."""
    need_table, need_prompt, need_la, need_lb = needs
    B, S = input_ids.shape
    r, d = lora_b.shape
    dtype, device = weight.dtype, weight.device
    acc = _acc_dtype(dtype)
    grad = _last_dim_contiguous(grad_out)
    g_table = g_prompt = g_la = g_lb = None
    if need_prompt:
        g_prompt = grad[:, :m].sum(0, dtype=acc).to(dtype)
    if need_table:  # X' = E[ids] + offset: the table's gradient is G scattered back by id
        g_table = _segment_sum_rows(input_ids.contiguous(), grad, S, m, grad.stride(0), grad.stride(1),
                                    weight.shape[0], dtype, padding_idx)
    if need_la or need_lb:
        lora_a = _last_dim_contiguous(lora_a)
        arch = _arch(device)
        cfg = _config("dept_bwd", dtype, arch, d)
        n_tiles = triton.cdiv(S, cfg["BLOCK_T"])
        n_chunks = triton.cdiv(d, cfg["BLOCK_D"])
        rows = _dept_rows_per_split(B, n_tiles * n_chunks, device, arch)
        splits = triton.cdiv(B, rows)
        la_part = new_buffer((splits, n_chunks, S, r), acc, device)
        lb_part = new_buffer((splits, n_tiles, r, d), acc, device)
        _dept_bwd_kernel[(n_tiles * n_chunks, splits)](
            grad, lora_a, lora_b.contiguous(), la_part, lb_part,
            B, S, m, d, r, grad.stride(0), grad.stride(1), lora_a.stride(0), float(scaling), n_chunks, rows,
            BLOCK_R=_block_r(r), **_numerics(dtype), **cfg,
        )
        if need_la:  # positions past S got no offset, hence no gradient
            g_la = torch.zeros(lora_a.shape, dtype=dtype, device=device)
            g_la[:S] = la_part.sum((0, 1)).to(dtype)
        g_lb = lb_part.sum((0, 1)).to(dtype) if need_lb else None
    return g_table, g_prompt, g_la, g_lb


# ------------------------------------------------------------------------ torch.library ops + autograd
# Registered as custom ops (forward and backward) so torch.compile treats them as opaque calls, the host
# side id check included, instead of tracing into the launchers.

@torch.library.custom_op("fastprefix::adept_embedding", mutates_args=())
def _adept_op(input_ids: torch.Tensor, weight: torch.Tensor, prompt: Optional[torch.Tensor], down_weight: torch.Tensor,
              down_bias: torch.Tensor, up_weight: torch.Tensor, up_bias: torch.Tensor,
              dropout_mask: Optional[torch.Tensor], padding_idx: int = -1) -> torch.Tensor:
    _check_ids(input_ids, weight)
    return _adept_forward(input_ids, weight, prompt, down_weight, down_bias, up_weight, up_bias, dropout_mask)


@_adept_op.register_fake
def _(input_ids, weight, prompt, down_weight, down_bias, up_weight, up_bias, dropout_mask, padding_idx=-1):
    B, S = input_ids.shape
    return weight.new_empty((B, _prompt_len(prompt) + S, weight.shape[1]))


@torch.library.custom_op("fastprefix::adept_embedding_backward", mutates_args=())
def _adept_backward_op(grad_out: torch.Tensor, input_ids: torch.Tensor, weight: torch.Tensor, m: int,
                       down_weight: torch.Tensor, down_bias: torch.Tensor, up_weight: torch.Tensor,
                       dropout_mask: Optional[torch.Tensor], needs: List[bool],
                       padding_idx: int = -1) -> List[torch.Tensor]:
    grads = _adept_backward(grad_out, input_ids, weight, m, down_weight, down_bias, up_weight, dropout_mask, needs,
                            padding_idx)
    return [weight.new_empty(0) if g is None else g for g in grads]  # empty: not requested


@_adept_backward_op.register_fake
def _(grad_out, input_ids, weight, m, down_weight, down_bias, up_weight, dropout_mask, needs, padding_idx=-1):
    d, r = down_weight.shape
    shapes = [weight.shape, (m, d), (d, r), (r,), (r, d), (d,)]
    return [weight.new_empty(s) if n else weight.new_empty(0) for s, n in zip(shapes, needs)]


def _adept_setup_context(ctx, inputs, output):
    input_ids, weight, prompt, down_weight, down_bias, up_weight, up_bias, dropout_mask, *rest = inputs
    # Inputs only: T is recomputed in the backward, no activation is kept.
    ctx.save_for_backward(input_ids, weight, down_weight, down_bias, up_weight, dropout_mask)
    ctx.m, ctx.padding_idx = _prompt_len(prompt), (rest[0] if rest else -1)


def _adept_grad(ctx, grad_out):
    input_ids, weight, down_weight, down_bias, up_weight, dropout_mask = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[1:7]]
    grads = _adept_backward_op(grad_out, input_ids, weight, ctx.m, down_weight, down_bias, up_weight, dropout_mask,
                               needs, ctx.padding_idx)
    return (None, *(g if n else None for g, n in zip(grads, needs)), None, None)


_adept_op.register_autograd(_adept_grad, setup_context=_adept_setup_context)


@torch.library.custom_op("fastprefix::dept_embedding", mutates_args=())
def _dept_op(input_ids: torch.Tensor, weight: torch.Tensor, prompt: Optional[torch.Tensor], lora_a: torch.Tensor,
             lora_b: torch.Tensor, scaling: float, padding_idx: int = -1) -> torch.Tensor:
    _check_ids(input_ids, weight)
    S, s = input_ids.shape[1], lora_a.shape[0]
    if S > s:
        raise ValueError(f"input_ids has S={S} tokens but lora_a has offset rows for only s={s} positions")
    return _dept_forward(input_ids, weight, prompt, lora_a, lora_b, scaling)


@_dept_op.register_fake
def _(input_ids, weight, prompt, lora_a, lora_b, scaling, padding_idx=-1):
    B, S = input_ids.shape
    return weight.new_empty((B, _prompt_len(prompt) + S, weight.shape[1]))


@torch.library.custom_op("fastprefix::dept_embedding_backward", mutates_args=())
def _dept_backward_op(grad_out: torch.Tensor, input_ids: torch.Tensor, weight: torch.Tensor, m: int,
                      lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                      needs: List[bool], padding_idx: int = -1) -> List[torch.Tensor]:
    grads = _dept_backward(grad_out, input_ids, weight, m, lora_a, lora_b, scaling, needs, padding_idx)
    return [weight.new_empty(0) if g is None else g for g in grads]  # empty: not requested


@_dept_backward_op.register_fake
def _(grad_out, input_ids, weight, m, lora_a, lora_b, scaling, needs, padding_idx=-1):
    shapes = [weight.shape, (m, weight.shape[1]), lora_a.shape, lora_b.shape]
    return [weight.new_empty(s) if n else weight.new_empty(0) for s, n in zip(shapes, needs)]


def _dept_setup_context(ctx, inputs, output):
    input_ids, weight, prompt, lora_a, lora_b, scaling, *rest = inputs
    ctx.save_for_backward(input_ids, weight, lora_a, lora_b)
    ctx.m, ctx.scaling, ctx.padding_idx = _prompt_len(prompt), scaling, (rest[0] if rest else -1)


def _dept_grad(ctx, grad_out):
    input_ids, weight, lora_a, lora_b = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[1:5]]
    grads = _dept_backward_op(grad_out, input_ids, weight, ctx.m, lora_a, lora_b, ctx.scaling, needs,
                              ctx.padding_idx)
    return (None, *(g if n else None for g, n in zip(grads, needs)), None, None)


_dept_op.register_autograd(_dept_grad, setup_context=_dept_setup_context)


def adept_embedding(input_ids, weight, prompt, down_weight, down_bias, up_weight, up_bias, *, dropout_mask=None,
                    padding_idx=None):
    """ADePT input embedding ``[prompt ; X + ReLU((X @ A + a) * dropout_mask) @ B + b]``, ``X = weight[input_ids]``.

    Args:
        input_ids: ``[B, S]`` int64 in ``[0, V)``; weight: ``[V, d]``; prompt: ``[m, d]`` or None.
        down_weight: ``[d, r]``; down_bias: ``[r]``; up_weight: ``[r, d]``; up_bias: ``[d]``.
        dropout_mask: ``[B, S, r]`` already scaled by ``1/(1-p)``, or None.
        padding_idx: the table row of the padding id, as in ``torch.nn.Embedding``: its tokens add
            nothing to the table gradient (that row's gradient is zero). None: no padding row.

    Returns:
        ``[B, m+S, d]`` in the inputs' dtype. Differentiable in every floating input but the mask.

    Raises:
        ValueError: an id outside ``[0, V)`` (on CPU; on CUDA a device-side assertion, no host sync),
            or a padding_idx outside ``[-V, V)``.
    """
    pad = _padding_row(padding_idx, weight.shape[0])
    return _adept_op(input_ids, weight, prompt, down_weight, down_bias, up_weight, up_bias, dropout_mask, pad)


def dept_embedding(input_ids, weight, prompt, lora_a, lora_b, *, scaling=1.0, padding_idx=None):
    """DePT input embedding ``[prompt ; weight[input_ids] + scaling * (lora_a[:S] @ lora_b)]``.

    Args:
        input_ids: ``[B, S]`` int64 in ``[0, V)``; weight: ``[V, d]``; prompt: ``[m, d]`` or None.
        lora_a: ``[s, r]`` with ``S <= s``; lora_b: ``[r, d]``; scaling: Python number.
        padding_idx: the padding row, as in ``torch.nn.Embedding`` (zero table gradient), or None.

    Returns:
        ``[B, m+S, d]`` in the inputs' dtype.

    Raises:
        ValueError: an id outside ``[0, V)`` (on CPU; on CUDA a device-side assertion, no host sync),
            ``S > s``, or a padding_idx outside ``[-V, V)``.
    """
    pad = _padding_row(padding_idx, weight.shape[0])
    return _dept_op(input_ids, weight, prompt, lora_a, lora_b, float(scaling), pad)


# --------------------------------------------------------------------------------------------- fitness


# Integer arguments that are multiples of 16 whenever d is (the width and the row strides).
_MULTIPLES_OF_16 = ("d", "stride_w", "stride_p", "stride_gb", "stride_gs", "stride_sb", "stride_ss", "stride_o")


def fitness_configs():
    """Every launch config the launchers can pick on sm_80, sm_86 and sm_90 for fp16, bf16 and fp32 inputs.

    d only enters through BLOCK_D = min(tile, next_power_of_2(d)), which is the same tile for every
    d >= 64 (d = 384, 768 and 4096 share one compiled config); BLOCK_R = max(16, next_power_of_2(r))
    covers r up to 64 with 16, 32 and 64. Optional features are on (dropout mask, table gradient),
    plus the inference forward without a mask. Like Triton's launcher for these d, the width and the row
    strides (all multiples of d) carry the divisibility-by-16 hint; the same configs were also checked
    without any hint (a width that is not a multiple of 16): no spills either.
    """
    from .fitness import signature_of

    for arch in (80, 86, 90):
        for dtype, dname in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            ptr = "*" + dname
            numerics = dict(ACC=tl.float32, DOT_DTYPE=_TL_DTYPES[dtype],
                            PRECISION="ieee" if dtype == torch.float32 else "tf32")
            tag = f"sm{arch} {dname} d384/768/4096"

            def config(kernel, fn, ptrs, block_r, floats=(), **flags):
                cfg = _config(kernel, dtype, (arch // 10, arch % 10), 4096)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                if kernel == "segment_sum":
                    cfg.pop("BLOCK_T")
                cx = dict(numerics, **cfg, **flags)
                if block_r is not None:
                    cx["BLOCK_R"] = block_r
                cx = {k: v for k, v in cx.items() if k in fn.arg_names}
                sig, cx, attrs = signature_of(fn, ptrs, cx, floats, multiples_of_16=_MULTIPLES_OF_16)
                return fn, sig, cx, warps, stages, arch, attrs

            for block_r in (16, 32, 64):
                for dropout in (False, True):
                    fn = _adept_fwd_kernel.fn
                    ptrs = {n: ptr for n in fn.arg_names if n.endswith("_ptr")}
                    ptrs["ids_ptr"] = "*i64"
                    flags = dict(HAS_DROPOUT=dropout) if dropout else dict(HAS_DROPOUT=False, mask_ptr=None)
                    yield (f"emb.adept_fwd{' dropout' if dropout else ''} r{block_r} {tag}",
                           *config("adept_fwd", fn, ptrs, block_r, **flags))

                fn = _adept_bwd_token_kernel.fn
                ptrs = {n: ptr for n in fn.arg_names if n.endswith("_ptr")}
                ptrs.update(ids_ptr="*i64", dbias_part_ptr="*fp32", dx_ptr="*fp32")
                yield (f"emb.adept_bwd_token dropout dx r{block_r} {tag}",
                       *config("adept_bwd_token", fn, ptrs, block_r, HAS_DROPOUT=True, NEED_DX=True))

                fn = _adept_bwd_param_kernel
                ptrs = {n: ptr for n in fn.arg_names if n.endswith("_ptr")}
                ptrs.update(ids_ptr="*i64", d_down_w_part_ptr="*fp32", d_up_w_part_ptr="*fp32",
                            d_up_b_part_ptr="*fp32")
                yield f"emb.adept_bwd_param r{block_r} {tag}", *config("adept_bwd_param", fn, ptrs, block_r)

                fn = _dept_fwd_kernel
                ptrs = {n: ptr for n in fn.arg_names if n.endswith("_ptr")}
                ptrs["ids_ptr"] = "*i64"
                yield f"emb.dept_fwd r{block_r} {tag}", *config("dept_fwd", fn, ptrs, block_r, floats=("scaling",))

                fn = _dept_bwd_kernel
                ptrs = {n: ptr for n in fn.arg_names if n.endswith("_ptr")}
                ptrs.update(d_lora_a_part_ptr="*fp32", d_lora_b_part_ptr="*fp32")
                yield f"emb.dept_bwd r{block_r} {tag}", *config("dept_bwd", fn, ptrs, block_r, floats=("scaling",))

            fn = _segment_sum_chunk_kernel
            for src, src_name in (("*fp32", "adept"), (ptr, "dept")):
                ptrs = dict(sorted_ptr="*i64", order_ptr="*i64", src_ptr=src, out_ptr=ptr, head_ptr="*fp32",
                            tail_ptr="*fp32")
                yield f"emb.table_grad {src_name} {tag}", *config("segment_sum", fn, ptrs, None)
            fn = _segment_sum_carry_kernel
            ptrs = dict(sorted_ptr="*i64", run_end_ptr="*i64", out_ptr=ptr, head_ptr="*fp32", tail_ptr="*fp32")
            yield f"emb.table_grad carry {tag}", *config("segment_sum", fn, ptrs, None)
