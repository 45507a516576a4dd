"""Fused prompt embedding for DePT and ADePT: gather + offset + prompt concatenation, one launch each way.

What it computes (``fastprefix.reference.embedding`` is the naive twin, with the same signatures)::

    ADePT: X = E[ids];  T = (X @ A + a) * dropout_mask;  X' = X + ReLU(T) @ B + b
    DePT:  X' = E[ids] + scaling * (A[:S] @ B)
    out[b] = [prompt ; X'[b]]                      -> [B, m+S, d]

and the gradients of every floating input: with G = dout, dT = (G @ B^T) * [T > 0] * mask, ADePT's
dB = ReLU(T)^T G, dA = X^T dT, db = sum G, da = sum dT, dE[id] += G + dT @ A^T; DePT's dA = s G_sum @ B^T,
dB = s A^T G_sum (G_sum: G summed over the batch), dE[id] += G; the prompt's: G[:, :m] summed over the batch.

Based on two-pass fused GEMM tiles, FlashAttention-style (the intermediate never leaves registers). ADePT's
forward: one program per tile of BLOCK_T tokens (the B*S tokens flattened); pass 1 loops over d in BLOCK_D chunks
(d need not be a power of two) gathering X and accumulating T = X @ A in registers, with bias, dropout mask and
ReLU; pass 2 re-reads the X chunk (hot in L2) and writes X + ReLU(T) @ B + b straight into rows m..m+S-1 of the
output. DePT's forward: one program per (position tile, d chunk) computes the offset tile once and adds it to the
gathered rows of every batch row. Extra programs copy the prompt into rows 0..m-1, so the whole output is written
by one launch, each element once. The backward recomputes T (nothing but the inputs is saved): ADePT's token
kernel writes ReLU(T) and dT ([N, r], input dtype), per-tile sums of dT and, when the table needs it,
dX = G + dT @ A^T (fp32); its parameter kernel (d chunks x token-tile splits) and DePT's (position tile x d chunk x
batch split) write fp32 partials torch sums in a fixed order. The table gradient is a deterministic segment
reduction (no atomics, no index_add_): the ids sorted stably by torch, level 1 sums each run of one id inside a
chunk of sorted tokens in token order, level 2 adds the partials of runs that cross chunks in chunk order; every
row is written once (absent ids and ``padding_idx`` get exact zeros), with no host sync. Every reduction runs in
a fixed order: the backward is bitwise reproducible.

Caveats.
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
      they are not in the fitness table. r <= 64 is what the fitness table covers.

Layers: kernels -> launchers -> torch.library ops ``fastprefix::adept_embedding``, ``fastprefix::dept_embedding``
and their ``_backward`` ops (with fake kernels: opaque nodes for torch.compile) -> ``ADePTEmbeddingFunction`` /
``DePTEmbeddingFunction`` -> :func:`adept_embedding`, :func:`dept_embedding`. Launch tables: configs.py.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ... import _validate as check
from ...spec import acc_dtype
from ..common.launch import arch_of, block_d, numerics, options, unit_rows
from ..common.runtime import new_buffer, poison_outputs
from . import configs
from .configs import pick_config

__all__ = ["adept_embedding", "dept_embedding", "ADePTEmbeddingFunction", "DePTEmbeddingFunction", "fitness_configs"]

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr, PREC: tl.constexpr):
    return tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PREC, out_dtype=acc.dtype)


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


@triton.jit
def _adept_fwd_kernel(
    ids_ptr, weight_ptr, prompt_ptr, down_w_ptr, down_b_ptr, up_w_ptr, up_b_ptr, mask_ptr, out_ptr,
    N, S, m, d, r, stride_w, stride_p,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
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
            t = _dot(x, a, t, DOT, PREC)
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
            y = _dot(h, bw, x.to(ACC), DOT, PREC)
            y += tl.load(up_b_ptr + cols, mask=d_ok, other=0.0).to(ACC)[None, :]
            tl.store(out_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        _copy_prompt_tile(pid - n_token_tiles, prompt_ptr, out_ptr, m, S, d, stride_p, BLOCK_T, BLOCK_D)


@triton.jit
def _adept_bwd_token_kernel(
    ids_ptr, weight_ptr, down_w_ptr, down_b_ptr, up_w_ptr, mask_ptr, grad_ptr,
    h_ptr, dt_ptr, dbias_part_ptr, dx_ptr,
    N, S, m, d, r, stride_w, stride_gb, stride_gs,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
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
        t = _dot(x, a, t, DOT, PREC)
        g = tl.load(g_rows + cols[None, :], mask=ok, other=0.0)
        bw_t = tl.load(up_w_ptr + rk[None, :] * d + cols[:, None], mask=dr_ok, other=0.0)
        dh = _dot(g, bw_t, dh, DOT, PREC)
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
            dx = _dot(dt, a_t, g.to(ACC), DOT, PREC)
            tl.store(dx_ptr + tok[:, None] * d + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _adept_bwd_param_kernel(
    ids_ptr, weight_ptr, grad_ptr, h_ptr, dt_ptr, d_down_w_part_ptr, d_up_w_part_ptr, d_up_b_part_ptr,
    N, S, m, d, r, stride_w, stride_gb, stride_gs, SPLIT,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
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
        d_up_w = _dot(tl.trans(h), g, d_up_w, DOT, PREC)
        d_down_w = _dot(tl.trans(x), dt, d_down_w, DOT, PREC)
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
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
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
        offset = _dot(la, lb, tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC), DOT, PREC) * scaling
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
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
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
    d_la = _dot(g_sum, lb_t, tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC), DOT, PREC)
    d_lb = _dot(tl.trans(la), g_sum, tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC), DOT, PREC)
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


def _tiles(cfg) -> dict:
    """BLOCK_T and BLOCK_D of a launch config (``configs``: block_m and block_n)."""
    return dict(BLOCK_T=cfg.block_m, BLOCK_D=cfg.block_n)


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
    cfg = pick_config("segment_sum", out_dtype, arch_of(src), d)
    chunk = chunk or cfg.block_m
    n_chunks = triton.cdiv(N, chunk)
    acc = acc_dtype(out_dtype)
    head = new_buffer((n_chunks, d), acc, src.device)
    tail = new_buffer((n_chunks, d), acc, src.device)
    grid = (n_chunks, triton.cdiv(d, cfg.block_n))
    consts = dict(ACC=numerics(out_dtype)["ACC"], BLOCK_D=cfg.block_n, **options(cfg))
    _segment_sum_chunk_kernel[grid](
        sorted_ids, order, src, grad_table, head, tail, N, S, m, d, stride_sb, stride_ss, grad_table.stride(0),
        chunk, padding_idx, **consts,
    )
    _segment_sum_carry_kernel[grid](sorted_ids, run_end, grad_table, head, tail, N, d, grad_table.stride(0), chunk,
                                    **consts)
    return grad_table


def _adept_forward(input_ids, weight, prompt, down_weight, down_bias, up_weight, up_bias, dropout_mask):
    B, S = input_ids.shape
    d, r = down_weight.shape
    m = _prompt_len(prompt)
    N = B * S
    weight = unit_rows(weight)
    prompt_arg = weight if m == 0 else unit_rows(prompt)  # dummy pointer when there is no prompt
    out = new_buffer((B, m + S, d), weight.dtype, weight.device)
    cfg = pick_config("adept_fwd", weight.dtype, arch_of(weight), d)
    grid = (triton.cdiv(N, cfg.block_m) + B * triton.cdiv(m, cfg.block_m),)
    _adept_fwd_kernel[grid](
        input_ids.contiguous(), weight, prompt_arg, down_weight.contiguous(), down_bias.contiguous(),
        up_weight.contiguous(), up_bias.contiguous(), None if dropout_mask is None else dropout_mask.contiguous(),
        out, N, S, m, d, r, weight.stride(0), prompt_arg.stride(0),
        BLOCK_R=block_d(r), HAS_DROPOUT=dropout_mask is not None, **numerics(weight.dtype), **_tiles(cfg),
        **options(cfg),
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
    acc = acc_dtype(dtype)
    grad = unit_rows(grad_out)
    g_table = g_prompt = g_dw = g_db = g_uw = g_ub = None
    if need_prompt:
        g_prompt = grad[:, :m].sum(0, dtype=acc).to(dtype)
    if not (need_table or need_dw or need_db or need_uw):
        if need_ub:  # b alone needs no recomputation of the FFN
            g_ub = grad[:, m:].sum((0, 1), dtype=acc).to(dtype)
        return g_table, g_prompt, g_dw, g_db, g_uw, g_ub

    ids = input_ids.contiguous()
    weight = unit_rows(weight)
    down_weight, down_bias, up_weight = down_weight.contiguous(), down_bias.contiguous(), up_weight.contiguous()
    mask = None if dropout_mask is None else dropout_mask.contiguous()
    arch = arch_of(weight)
    flags = dict(BLOCK_R=block_d(r), **numerics(dtype))

    cfg = pick_config("adept_bwd_token", dtype, arch, d)
    n_tiles = triton.cdiv(N, cfg.block_m)
    h = new_buffer((N, r), dtype, device)
    dt = new_buffer((N, r), dtype, device)
    db_part = new_buffer((n_tiles, r), acc, device)
    dx = new_buffer((N, d), acc, device) if need_table else None
    _adept_bwd_token_kernel[(n_tiles,)](
        ids, weight, down_weight, down_bias, up_weight, mask, grad, h, dt, db_part, dt if dx is None else dx,
        N, S, m, d, r, weight.stride(0), grad.stride(0), grad.stride(1),
        HAS_DROPOUT=mask is not None, NEED_DX=need_table, **flags, **_tiles(cfg), **options(cfg),
    )
    if need_db:
        g_db = db_part.sum(0).to(dtype)
    if need_table:
        g_table = _segment_sum_rows(ids, dx, N, 0, 0, d, weight.shape[0], dtype, padding_idx)

    if need_dw or need_uw or need_ub:
        cfg = pick_config("adept_bwd_param", dtype, arch, d)
        n_tiles = triton.cdiv(N, cfg.block_m)
        n_chunks = triton.cdiv(d, cfg.block_n)
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
            **flags, **_tiles(cfg), **options(cfg),
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
    weight = unit_rows(weight)
    lora_a = unit_rows(lora_a)
    prompt_arg = weight if m == 0 else unit_rows(prompt)
    out = new_buffer((B, m + S, d), weight.dtype, weight.device)
    cfg = pick_config("dept_fwd", weight.dtype, arch_of(weight), d)
    n_main = triton.cdiv(S, cfg.block_m) * triton.cdiv(d, cfg.block_n)
    grid = (n_main + B * triton.cdiv(m, cfg.block_m),)
    _dept_fwd_kernel[grid](
        input_ids.contiguous(), weight, prompt_arg, lora_a, lora_b.contiguous(), out,
        B, S, m, d, r, weight.stride(0), prompt_arg.stride(0), lora_a.stride(0), float(scaling),
        BLOCK_R=block_d(r), **numerics(weight.dtype), **_tiles(cfg), **options(cfg),
    )
    return out


def _dept_backward(grad_out, input_ids, weight, m, lora_a, lora_b, scaling, needs, padding_idx=-1):
    """Gradients (table, prompt, lora_a, lora_b) for the flags in ``needs``."""
    need_table, need_prompt, need_la, need_lb = needs
    B, S = input_ids.shape
    r, d = lora_b.shape
    dtype, device = weight.dtype, weight.device
    acc = acc_dtype(dtype)
    grad = unit_rows(grad_out)
    g_table = g_prompt = g_la = g_lb = None
    if need_prompt:
        g_prompt = grad[:, :m].sum(0, dtype=acc).to(dtype)
    if need_table:  # X' = E[ids] + offset: the table's gradient is G scattered back by id
        g_table = _segment_sum_rows(input_ids.contiguous(), grad, S, m, grad.stride(0), grad.stride(1),
                                    weight.shape[0], dtype, padding_idx)
    if need_la or need_lb:
        lora_a = unit_rows(lora_a)
        arch = arch_of(weight)
        cfg = pick_config("dept_bwd", dtype, arch, d)
        n_tiles = triton.cdiv(S, cfg.block_m)
        n_chunks = triton.cdiv(d, cfg.block_n)
        rows = _dept_rows_per_split(B, n_tiles * n_chunks, device, arch)
        splits = triton.cdiv(B, rows)
        la_part = new_buffer((splits, n_chunks, S, r), acc, device)
        lb_part = new_buffer((splits, n_tiles, r, d), acc, device)
        _dept_bwd_kernel[(n_tiles * n_chunks, splits)](
            grad, lora_a, lora_b.contiguous(), la_part, lb_part,
            B, S, m, d, r, grad.stride(0), grad.stride(1), lora_a.stride(0), float(scaling), n_chunks, rows,
            BLOCK_R=block_d(r), **numerics(dtype), **_tiles(cfg), **options(cfg),
        )
        if need_la:  # positions past S got no offset, hence no gradient
            g_la = torch.zeros(lora_a.shape, dtype=dtype, device=device)
            g_la[:S] = la_part.sum((0, 1)).to(dtype)
        g_lb = lb_part.sum((0, 1)).to(dtype) if need_lb else None
    return g_table, g_prompt, g_la, g_lb


# -------------------------------------------- torch.library ops (opaque to torch.compile) and the autograd.Function
# Forward and backward are custom ops, so torch.compile treats them as opaque calls, the host-side id check
# included, instead of tracing into the launchers.

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


class ADePTEmbeddingFunction(torch.autograd.Function):
    """Forward and backward of the ADePT embedding through the custom ops. Saves its inputs only: T is
    recomputed in the backward, no activation is kept."""

    @staticmethod
    def forward(input_ids, weight, prompt, down_weight, down_bias, up_weight, up_bias, dropout_mask, padding_idx):
        return torch.ops.fastprefix.adept_embedding(input_ids, weight, prompt, down_weight, down_bias, up_weight,
                                                    up_bias, dropout_mask, padding_idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input_ids, weight, prompt, down_weight, down_bias, up_weight, up_bias, dropout_mask, padding_idx = inputs
        ctx.save_for_backward(input_ids, weight, down_weight, down_bias, up_weight, dropout_mask)
        ctx.m, ctx.padding_idx = _prompt_len(prompt), padding_idx

    @staticmethod
    def backward(ctx, grad_out):
        input_ids, weight, down_weight, down_bias, up_weight, dropout_mask = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[1:7]]
        grads = torch.ops.fastprefix.adept_embedding_backward(grad_out, input_ids, weight, ctx.m, down_weight,
                                                              down_bias, up_weight, dropout_mask, needs,
                                                              ctx.padding_idx)
        return (None, *(g if n else None for g, n in zip(grads, needs)), None, None)


class DePTEmbeddingFunction(torch.autograd.Function):
    """Forward and backward of the DePT embedding through the custom ops (saves its inputs only)."""

    @staticmethod
    def forward(input_ids, weight, prompt, lora_a, lora_b, scaling, padding_idx):
        return torch.ops.fastprefix.dept_embedding(input_ids, weight, prompt, lora_a, lora_b, scaling, padding_idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input_ids, weight, prompt, lora_a, lora_b, scaling, padding_idx = inputs
        ctx.save_for_backward(input_ids, weight, lora_a, lora_b)
        ctx.m, ctx.scaling, ctx.padding_idx = _prompt_len(prompt), scaling, padding_idx

    @staticmethod
    def backward(ctx, grad_out):
        input_ids, weight, lora_a, lora_b = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[1:5]]
        grads = torch.ops.fastprefix.dept_embedding_backward(grad_out, input_ids, weight, ctx.m, lora_a, lora_b,
                                                             ctx.scaling, needs, ctx.padding_idx)
        return (None, *(g if n else None for g, n in zip(grads, needs)), None, None)


# The forward ops are differentiable on their own too (for callers of torch.ops.fastprefix.*_embedding and
# torch.library.opcheck), by the very formula of the Functions above: the same setup_context and backward.
_adept_op.register_autograd(ADePTEmbeddingFunction.backward, setup_context=ADePTEmbeddingFunction.setup_context)
_dept_op.register_autograd(DePTEmbeddingFunction.backward, setup_context=DePTEmbeddingFunction.setup_context)


# ------------------------------------------------------------------------------------------------- public


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
    return ADePTEmbeddingFunction.apply(input_ids, weight, prompt, down_weight, down_bias, up_weight, up_bias,
                                        dropout_mask, pad)


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
    return DePTEmbeddingFunction.apply(input_ids, weight, prompt, lora_a, lora_b, float(scaling), pad)


def fitness_configs():
    """This module's launch configs for kernels/fitness.py (``configs.fitness_configs`` on these kernels)."""
    kernels = dict(adept_fwd=_adept_fwd_kernel, adept_bwd_token=_adept_bwd_token_kernel,
                   adept_bwd_param=_adept_bwd_param_kernel, dept_fwd=_dept_fwd_kernel, dept_bwd=_dept_bwd_kernel,
                   segment_sum_chunk=_segment_sum_chunk_kernel, segment_sum_carry=_segment_sum_carry_kernel)
    return configs.fitness_configs(kernels)
