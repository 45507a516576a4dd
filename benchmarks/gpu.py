"""``fastprefix-bench --suite gpu``: the whole GPU picture in one run (``make gpu-bench``).

Three sections, each row timed with CUDA events, steps interleaved across the rows of a group (round
``i`` runs step ``i`` of every row, the order rotating), so the ratios come from paired steps
(:mod:`.stats`: median, IQR, min-max per row, the exact 95% interval of each ratio's median):

1. **Attention**, forward and forward+backward, on Llama-3-8B-like heads (H=32, Hkv=8, D=128, causal,
   S in {512, 2048, 8192} with 16k tokens per call, L in {16, 64}; at S=2048, L=64 also a right-padded batch and
   the batch packed into one row, ``cu_seqlens``) and BERT-large-like heads (H=16, D=64, S in {128, 512}, a padded
   batch, L in {16, 64}). Rows: fastprefix fused, split and concat (forced with ``path=``) for no gate, a pooled
   gate ``[B, 1, L]`` (one row for the packed row) and the fused token gate (not on the concat path: a gate per
   query does not fold into the prefix); SDPA over
   ``cat([prefix.expand(B), K])`` with the mask transformers builds for it (K/V heads repeated, as
   transformers does when it passes a mask); the ``flash_attn`` package over the same concatenation when it
   is importable (unpadded shapes); FlexAttention over it with a block mask, ``torch.compile``-d once, at
   S=2048 and L=64 only (what a PyTorch user would write today; no gate: a gate scales the prefix values,
   which ``score_mod`` can't); and the floor: SDPA over the S real keys alone. TFLOP/s count the useful
   matmul FLOPs (4·B·H·D·(S·L + S²), the S² term halved when causal; forward+backward = 3.5x the forward);
   the floor's problem has no L term. Peak memory: ``torch.cuda.max_memory_allocated`` during one call,
   minus the allocation before it.
2. **Embedding kernels** (d=4096, r=64, 16k tokens, vocabulary 32000, m=32): ``adept_embedding`` and
   ``dept_embedding`` on the Triton path against the same math in torch ops (``backend="torch"``).
3. **End to end**: a bf16 training step (forward, backward, AdamW) of every benchmark row
   (:mod:`.contenders`: the floors, PEFT prefix tuning, P-Tuning v2 / DePT / ADePT as the original code
   does them, every fastprefix method) on randomly initialised models built from configs: a ~1.1B
   Llama-like decoder (TinyLlama's shape) at S in {1024, 2048} and a BERT-large-like encoder at S in
   {128, 512}, 8k tokens per step. Tokens/s, ratios, peak memory.
4. **Many adapters** (:mod:`.adapters`): on the BERT-large-like encoder in bf16, B rows over A P-Tuning v2 adapters
   in one call with ``adapter_names=`` (the kernels read each row's prefix from the adapters' table in place)
   against A calls, one per adapter, for A in {1, 4, 16}: training-step and inference tokens/s, the training
   step's peak memory. It runs last, if the time budget has room.

Every row that fails records its error and the suite goes on; the result files
(``benchmarks/results/<gpu-name>.{md,json,png}``, rendered by :mod:`.gpu_report`) are rewritten after every
group, and once more in a ``finally`` (also on SIGTERM), so one failure, the time budget running out or a
``timeout`` never loses what was measured. With them goes the **dispatch table**
``benchmarks/results/<gpu-name>-dispatch.json`` (``fastprefix.kernels.attention.table.measured``): for each shape
class of the attention rows (dtype, causal, dense / padded / packed, gate, head-dim bucket, GQA) the fastest
fastprefix path, forward + backward, and every timed path's time over it. Committed, it is what the ``"auto"``
rule reads on a GPU of that compute capability (``fastprefix.kernels.attention.dispatch``).

``--smoke``: the same code paths on CPU with tiny shapes, the kernels in Triton's interpreter, the
inductor compile left out; it checks that the suite runs, prints the report and writes no file (CI runs
it so the suite cannot rot between GPU sessions; its timings mean nothing).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import fastprefix
from fastprefix.kernels.attention import table as dispatch_table
from fastprefix.spec import AttentionSpec

from . import adapters, backbones, measure, stats, suite
from . import contenders as C
from .gpu_report import gpu_tag, versions, versions_line, write

BUDGET_S = 210.0  # seconds: no new group starts after this (make gpu = gpu-test + gpu-bench must fit 10 minutes)


# ------------------------------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    family: str  # "llama" or "bert"
    B: int
    H: int
    Hkv: int
    S: int
    L: int
    D: int
    d_model: int  # width of the hidden states the token gate reads
    causal: bool
    padded: bool
    flex: bool = False  # add the FlexAttention row
    packed: bool = False  # the B sequences of S tokens packed into one row [1, B * S] (cu_seqlens)

    @property
    def id(self):
        return (f"{self.family} B{self.B} H{self.H}/{self.Hkv} S{self.S} L{self.L} D{self.D}"
                + (" causal" if self.causal else "") + (" padded" if self.padded else "")
                + (" packed" if self.packed else ""))


@dataclasses.dataclass(frozen=True)
class Plan:
    attention: tuple
    embedding: dict
    e2e: tuple  # (label, config factory name, seq_len, batch)
    warmup: int
    repeats: int
    e2e_warmup: int
    e2e_repeats: int
    prefix_len: int
    adept_rank: int
    dtype: torch.dtype
    compile_flex: bool
    adapters: tuple = ()  # (label, config factory name, batch, seq_len, adapter counts, rounds)


TOKENS = 16384  # tokens per attention call / embedding call


def full_plan():
    shapes = []
    for S in (512, 2048, 8192):
        for L in (16, 64):
            shapes.append(AttentionShape("llama", TOKENS // S, 32, 8, S, L, 128, 4096, True, False,
                                         flex=(S == 2048 and L == 64)))
    # the layouts the varlen paths serve: a right-padded batch and the batch packed into one row
    shapes.append(AttentionShape("llama", TOKENS // 2048, 32, 8, 2048, 64, 128, 4096, True, True))
    shapes.append(AttentionShape("llama", TOKENS // 2048, 32, 8, 2048, 64, 128, 4096, True, False, packed=True))
    for S in (128, 512):
        for L in (16, 64):
            shapes.append(AttentionShape("bert", TOKENS // S, 16, 16, S, L, 64, 1024, False, True))
    return Plan(attention=tuple(shapes), embedding=dict(B=8, S=2048, d=4096, r=64, V=32000, m=32),
                e2e=(("llama-1.1b", "llama", 1024, 8), ("llama-1.1b", "llama", 2048, 4),
                     ("bert-large", "bert", 128, 64), ("bert-large", "bert", 512, 16)),
                warmup=3, repeats=10, e2e_warmup=2, e2e_repeats=7, prefix_len=32, adept_rank=19,
                dtype=torch.bfloat16, compile_flex=True, adapters=("bert-large", "bert", 32, 128, (1, 4, 16), 3))


def smoke_plan():
    shapes = (AttentionShape("llama", 1, 2, 1, 8, 3, 16, 8, True, False, flex=True),
              AttentionShape("bert", 2, 1, 1, 8, 3, 16, 8, False, True),
              AttentionShape("llama", 2, 2, 1, 8, 3, 16, 8, True, True),
              AttentionShape("llama", 2, 2, 1, 8, 3, 16, 8, True, False, packed=True))
    return Plan(attention=shapes, embedding=dict(B=2, S=8, d=32, r=4, V=64, m=3),
                e2e=(("llama-tiny", "llama-tiny", 16, 2), ("bert-tiny", "bert-tiny", 16, 2)),
                warmup=0, repeats=1, e2e_warmup=0, e2e_repeats=1, prefix_len=4, adept_rank=4,
                dtype=torch.float32, compile_flex=False, adapters=("bert-tiny", "bert-tiny", 4, 8, (1, 2), 1))


def model_config(kind):
    """A transformers config for the end-to-end models (random weights: nothing to download)."""
    import transformers as tf

    if kind == "llama":  # TinyLlama-1.1B's shape: 22 layers, d=2048, 32 heads on 4 key/value heads
        return tf.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
    if kind == "bert":  # BERT-large; 576 positions so that S=512 plus a 32-token prompt fits
        return tf.BertConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             vocab_size=30522, max_position_embeddings=576, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
    if kind == "llama-tiny":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=2048, max_position_embeddings=64)
    if kind == "bert-tiny":
        return tf.BertConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=2048, max_position_embeddings=64, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
    raise KeyError(kind)


# ------------------------------------------------------------------------------------------- timing


class Clock:
    """One call's duration in milliseconds: CUDA events on CUDA, ``perf_counter`` on CPU (smoke only)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def ms(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def peak_mib(fn, device):
    """Peak extra MiB allocated during one call of ``fn`` (CUDA), None on CPU."""
    if device.type != "cuda":  # no allocator statistics to read (smoke runs)
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _error(e):
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ").replace("|", "/")  # one Markdown table cell
    return text[:300]


def interleaved(rows, clock, warmup, repeats, deadline):
    """Time ``rows`` (dicts with ``step``: a no-argument callable) in rotating interleaved rounds.

    Fills each row's ``times_ms``; a row whose step raises gets ``error`` and leaves the rounds. Rows still
    running when ``deadline`` (``time.monotonic()``) passes keep the rounds they have.
    """
    live = []
    for r in rows:
        try:
            for _ in range(warmup):
                r["step"]()
            live.append(r)
        except Exception as e:  # a row that can't run says why in the table
            r["error"] = _error(e)
        _release(r)
    for r in live:
        r["times_ms"] = []
    for rnd in range(repeats):
        if rnd and time.monotonic() > deadline:
            break
        order = live[rnd % len(live):] + live[:rnd % len(live)] if live else []
        for r in order:
            if "error" in r:
                continue
            try:
                r["times_ms"].append(clock.ms(r["step"]))
            except Exception as e:
                r["error"] = _error(e)
            _release(r)


def _release(row):
    """Drop the gradients a step left on its leaves (outside the timed region)."""
    for t in row.get("leaves", ()):
        t.grad = None


def summarize_rows(rows, base_of):
    """Add ``summary`` (median, IQR, min-max) and ``vs`` ratios to every timed row.

    ``base_of(row)``: ``{label: baseline row}``; ``vs[label]`` is the row's speedup over that baseline from the
    paired rounds (> 1: the row is faster), with its 95% interval and verdict.
    """
    for r in rows:
        times = r.get("times_ms") or []
        if times and "error" not in r:
            r["summary"] = stats.summarize(times)
    for r in rows:
        if "summary" not in r:
            continue
        r["vs"] = {}
        for label, base in base_of(r).items():
            if base is None or "summary" not in base or base is r:
                continue
            n = min(len(base["times_ms"]), len(r["times_ms"]))
            r["vs"][label] = stats.speedup(base["times_ms"][:n], r["times_ms"][:n])


def clean(rows):
    """Rows as JSON-ready dicts (callables and tensors dropped)."""
    return [{k: v for k, v in r.items() if k not in ("step", "leaves", "peak_fn")} for r in rows]


# ------------------------------------------------------------------------------------------- attention


def attention_flops(s: AttentionShape, floor=False):
    """Useful matmul FLOPs of one forward: 4·B·H·D·(S·L + S²), the S² term halved when causal."""
    keys = s.S * (s.S + 1) / 2 if s.causal else s.S * s.S
    return 4 * s.B * s.H * s.D * ((0 if floor else s.S * s.L) + keys)


def _attention_inputs(s: AttentionShape, dtype, device):
    """``(tensors, keep, cu_seqlens)``: a packed shape's q, k, v and token gate inputs are one row ``[1, B * S]``
    cut by ``cu_seqlens`` into B sequences of S (its pooled gate one ``[1, 1, L]`` row); a padded shape's rows keep
    a random length in ``[S/2, S]`` (row 0 full), right-padded."""
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    rows, S = (1, s.B * s.S) if s.packed else (s.B, s.S)
    x = dict(q=r(rows, s.H, S, s.D), k=r(rows, s.Hkv, S, s.D), v=r(rows, s.Hkv, S, s.D),
             prefix_k=r(s.Hkv, s.L, s.D), prefix_v=r(s.Hkv, s.L, s.D),
             pooled=torch.rand(rows, 1, s.L, generator=g, device=device).to(dtype),
             gate_hidden=r(rows, S, s.d_model), gate_weight=r(s.d_model, s.L, std=s.d_model ** -0.5),
             gate_bias=r(s.L), layer_scale=torch.ones((), device=device, dtype=dtype))
    keep = cu_seqlens = None
    if s.padded:  # every row keeps a random length in [S/2, S]; row 0 is full
        lengths = torch.randint(s.S // 2, s.S + 1, (s.B,), generator=g, device=device)
        lengths[0] = s.S
        keep = torch.arange(s.S, device=device)[None, :] < lengths[:, None]
    if s.packed:
        cu_seqlens = torch.arange(0, s.B * s.S + 1, s.S, device=device, dtype=torch.int32)
    return x, keep, cu_seqlens


def _row_class(q, k, keep, causal, cu_seqlens, gate_kwargs):
    """The dispatch table's class key of a fastprefix row (``fastprefix.kernels.attention.table``): the same for
    every path of one gate."""
    spec = AttentionSpec.build(q, k, key_padding_mask=keep, causal=causal, cu_seqlens=cu_seqlens,
                               gate=gate_kwargs.get("gate"), gate_hidden=gate_kwargs.get("gate_hidden"))
    return dispatch_table.shape_class(q, k, spec).key


def _repeat_kv(t, n):
    return t if n == 1 else t.repeat_interleave(n, dim=1)


def attention_rows(s: AttentionShape, dtype, device, flex_fn):
    """The rows of one shape: ``{contender, mode, step, leaves, flops}``; skipped rows carry ``skipped``."""

    x, keep, cu = _attention_inputs(s, dtype, device)
    q, k, v, pk, pv = x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"]
    B, group = s.B, s.H // s.Hkv
    base = [q, k, v, pk, pv]
    gates = {
        "no gate": ({}, []),
        "pooled gate": (dict(gate=x["pooled"]), [x["pooled"]]),
        "token gate (fused)": ({n: x[n] for n in ("gate_hidden", "gate_weight", "gate_bias", "layer_scale")},
                               [x[n] for n in ("gate_hidden", "gate_weight", "gate_bias", "layer_scale")]),
    }
    # the mask transformers builds for [prefix ; K]: the prefix always visible, bottom-right causal, padding, and
    # for a packed row each token's own sequence
    rows_i = torch.arange(s.S * (B if s.packed else 1), device=device)[:, None]
    cols = torch.arange(s.L + rows_i.shape[0], device=device)[None, :]
    visible = (cols < s.L) | (cols - s.L <= rows_i) if s.causal else torch.ones_like(cols, dtype=torch.bool)
    if s.packed:
        visible = visible & ((cols < s.L) | ((cols - s.L) // s.S == rows_i // s.S))
    cat_mask = None if visible.all() else visible
    floor_mask = None
    if s.padded:
        full_keep = torch.cat([keep.new_ones(B, s.L), keep], dim=1)
        cat_mask = full_keep[:, None, None, :] & (visible if cat_mask is not None else True)
        floor_mask = keep[:, None, None, :]
        if s.causal:
            floor_mask = floor_mask & (cols[:, s.L:] - s.L <= rows_i)
    dense = None
    if s.packed:  # the floor's B sequences as a dense batch (the same work as the packed row)
        dense = [t.view(t.shape[1], B, s.S, s.D).transpose(0, 1).contiguous().requires_grad_(t.requires_grad)
                 for t in (q, k, v)]

    def cat_kv():
        rows = q.shape[0]
        return (torch.cat([pk.unsqueeze(0).expand(rows, -1, -1, -1), k], dim=2),
                torch.cat([pv.unsqueeze(0).expand(rows, -1, -1, -1), v], dim=2))

    def sdpa_cat():
        kk, vv = cat_kv()
        # transformers repeats K/V heads itself whenever it passes a mask (SDPA's GQA needs no mask)
        return F.scaled_dot_product_attention(q, _repeat_kv(kk, group), _repeat_kv(vv, group), attn_mask=cat_mask)

    def floor():
        if dense is not None:
            return F.scaled_dot_product_attention(*dense, is_causal=s.causal, enable_gqa=group > 1)
        if floor_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=s.causal, enable_gqa=group > 1)
        return F.scaled_dot_product_attention(q, _repeat_kv(k, group), _repeat_kv(v, group), attn_mask=floor_mask)

    contenders = []
    classes = {gname: _row_class(q, k, keep, s.causal, cu, kw) for gname, (kw, _) in gates.items()}
    for path in ("fused", "split", "concat"):
        for gname, (kw, extra) in gates.items():
            if path == "concat" and gname.startswith("token"):
                continue  # a gate per query does not fold into the prefix: the concat path falls back for it
            name = f"fastprefix {path}, {gname}"
            skipped = None
            # the path the Triton backend takes for this call with path=path: asked of the dispatch rule itself
            if path != "fused" and fastprefix.ops.attention_path(
                    q, k, key_padding_mask=keep, causal=s.causal, path=path, prefix_k=pk, gate=kw.get("gate"),
                    gate_hidden=kw.get("gate_hidden"), cu_seqlens=cu) != path:
                skipped = f"the {path} path does not cover this call (it falls back to another path)"

            def fn(kw=kw, path=path):
                return fastprefix.gated_prefix_attention(q, k, v, pk, pv, key_padding_mask=keep, causal=s.causal,
                                                         cu_seqlens=cu, backend="triton", path=path, **kw)
            contenders.append((name, fn, base + extra, skipped, False, dict(path=path, **{"class": classes[gname]})))
    contenders.append(("SDPA on cat([prefix; K]) (as PEFT)", sdpa_cat, base, None, False, {}))
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    if flash_attn_func is None or s.padded or s.packed:
        why = ("flash_attn is not installed" if flash_attn_func is None
               else f"a {'padded batch' if s.padded else 'packed row'} needs flash_attn's varlen API")
        contenders.append(("flash_attn on cat([prefix; K])", None, base, why, False, {}))
    else:
        def fa():  # flash_attn: [B, S, H, D], GQA native, causal bottom-right aligned
            kk, vv = cat_kv()
            return flash_attn_func(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                   causal=s.causal).transpose(1, 2)
        contenders.append(("flash_attn on cat([prefix; K])", fa, base, None, False, {}))
    if s.flex:
        contenders.append(("FlexAttention on cat([prefix; K]), block mask", _flex_row(s, x, keep, flex_fn, device),
                           base, None, False, {}))
    contenders.append(("floor: SDPA over the S real keys", floor, dense or [q, k, v], None, True, {}))

    rows = []
    flops = attention_flops(s)
    floor_flops = attention_flops(s, floor=True)
    do = torch.randn_like(q)
    for name, fn, leaves, skipped, is_floor, extra in contenders:
        for mode in ("forward", "forward+backward"):
            row = dict(shape=s.id, family=s.family, contender=name, mode=mode, floor=is_floor,
                       flops=(floor_flops if is_floor else flops) * (1 if mode == "forward" else 3.5), **extra)
            why = skipped
            if name.startswith("FlexAttention") and mode != "forward" and device.type == "cpu":
                why = "FlexAttention has no backward on CPU (smoke run)"
            if why:
                row["skipped"] = why
            else:
                row["step"], row["leaves"] = _attention_step(fn, leaves, mode, do)
            rows.append(row)
    return rows


def _attention_step(fn, leaves, mode, do):
    if mode == "forward":
        def step():
            with torch.no_grad():
                fn()
        return step, []

    def step():
        for t in leaves:
            t.requires_grad_(True)
        out = fn()
        out.backward(do.view(out.shape))
    return step, leaves


def _flex_row(s, x, keep, flex_fn, device):
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v, pk, pv = x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"]
    L = s.L
    full_keep = None if keep is None else torch.cat([keep.new_ones(s.B, L), keep], dim=1)

    def mask_mod(b, h, q_idx, kv_idx):
        visible = (kv_idx < L) | (kv_idx - L <= q_idx) if s.causal else kv_idx >= 0
        return visible if full_keep is None else visible & full_keep[b, kv_idx]

    block_mask = create_block_mask(mask_mod, s.B, None, s.S, L + s.S, device=str(device))

    def run():
        if not torch.is_grad_enabled():  # forward rows: FlexAttention on CPU refuses inputs that require grad
            return _no_grad_flex(flex_fn, q, k, v, pk, pv, s, block_mask)
        kk = torch.cat([pk.unsqueeze(0).expand(s.B, -1, -1, -1), k], dim=2)
        vv = torch.cat([pv.unsqueeze(0).expand(s.B, -1, -1, -1), v], dim=2)
        return flex_fn(q, kk, vv, block_mask=block_mask, enable_gqa=s.H != s.Hkv)
    return run


def _no_grad_flex(flex_fn, q, k, v, pk, pv, s, block_mask):
    q, k, v, pk, pv = (t.detach() for t in (q, k, v, pk, pv))
    kk = torch.cat([pk.unsqueeze(0).expand(s.B, -1, -1, -1), k], dim=2)
    vv = torch.cat([pv.unsqueeze(0).expand(s.B, -1, -1, -1), v], dim=2)
    return flex_fn(q, kk, vv, block_mask=block_mask, enable_gqa=s.H != s.Hkv)


def run_attention(plan, device, clock, deadline, out, on_group):
    """Every shape's rows, appended to ``out`` group by group (``on_group()`` after each)."""
    flex_fn = None
    if any(s.flex for s in plan.attention):
        from torch.nn.attention.flex_attention import flex_attention

        flex_fn = torch.compile(flex_attention, dynamic=False) if plan.compile_flex else flex_attention
    for s in plan.attention:
        if time.monotonic() > deadline:
            out.append(dict(shape=s.id, family=s.family, contender="(every row)", mode="",
                            skipped="time budget spent"))
            continue
        try:
            rows = attention_rows(s, plan.dtype, device, flex_fn)
        except Exception as e:
            out.append(dict(shape=s.id, family=s.family, contender="(inputs)", mode="", error=_error(e)))
            continue
        timed = [r for r in rows if "step" in r]
        interleaved(timed, clock, plan.warmup, plan.repeats, deadline)
        floors = {r["mode"]: r for r in rows if r["floor"]}
        summarize_rows(rows, lambda r: {"floor": floors.get(r["mode"])})
        for r in timed:
            if "summary" in r:
                r["tflops"] = r["flops"] / (r["summary"]["median"] * 1e-3) / 1e12
                try:
                    r["peak_mib"] = peak_mib(r["step"], device)
                except Exception as e:
                    r["peak_error"] = _error(e)
                _release(r)
        out.extend(clean(rows))
        del rows, timed, floors
        _free(device)
        on_group()


# ------------------------------------------------------------------------------------------- embedding


def run_embedding(plan, device, clock, deadline):

    e = plan.embedding
    B, S, d, r, V, m = e["B"], e["S"], e["d"], e["r"], e["V"], e["m"]
    g = torch.Generator(device=device).manual_seed(0)
    dt = plan.dtype

    def rn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dt)

    ids = torch.randint(0, V, (B, S), generator=g, device=device)
    table = rn(V, d)
    prompt = rn(m, d)
    adept = dict(down_weight=rn(d, r, std=d ** -0.5), down_bias=rn(r), up_weight=rn(r, d, std=r ** -0.5), up_bias=rn(d))
    lora_a, lora_b = rn(S, r), rn(r, d, std=0.1)
    do = rn(B, m + S, d)
    shape = f"B{B} S{S} d{d} r{r} m{m} V{V}"
    rows = []
    for method in ("ADePT", "DePT"):
        for backend in ("triton", "torch"):
            if method == "ADePT":
                leaves = [prompt, *adept.values()]

                def fn(backend=backend):
                    return fastprefix.adept_embedding(ids, table, prompt, *adept.values(), backend=backend)
            else:
                leaves = [prompt, lora_a, lora_b]

                def fn(backend=backend):
                    return fastprefix.dept_embedding(ids, table, prompt, lora_a, lora_b, scaling=1.0, backend=backend)
            name = f"{method} embedding, " + ("fastprefix Triton" if backend == "triton" else "torch ops")
            for mode in ("forward", "forward+backward"):
                step, lv = _attention_step(fn, leaves, mode, do)
                rows.append(dict(shape=shape, contender=name, method=method, backend=backend, mode=mode,
                                 step=step, leaves=lv))
    interleaved(rows, clock, plan.warmup, plan.repeats, deadline)

    def bases(row):
        twin = next(x for x in rows if x["method"] == row["method"] and x["mode"] == row["mode"]
                    and x["backend"] == "torch")
        return {"torch ops": twin}
    summarize_rows(rows, bases)
    for row in rows:
        if "summary" in row:
            try:
                row["peak_mib"] = peak_mib(row["step"], device)
            except Exception as ex:
                row["peak_error"] = _error(ex)
            _release(row)
    out = clean(rows)
    del rows
    _free(device)
    return out


# ------------------------------------------------------------------------------------------- end to end


def _build_backbone(kind, dtype, device):
    from transformers import AutoModel

    config = model_config(kind)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 1B model initialises in seconds there
        model = AutoModel.from_config(config, attn_implementation="sdpa", dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run_e2e(plan, device, clock, deadline, out, on_group):
    """Every model setting's rows, appended to ``out`` group by group (``on_group()`` after each)."""
    built = {}  # one backbone at a time, reused by the settings that share it
    for label, kind, S, batch in plan.e2e:
        group = f"{label} S{S} B{batch}"
        if time.monotonic() > deadline:
            out.append(dict(group=group, name="(every row)", skipped="time budget spent"))
            continue
        try:
            if kind not in built:
                built.clear()
                _free(device)
                built[kind] = _build_backbone(kind, plan.dtype, device)
            out.extend(_e2e_group(plan, built[kind], label, group, S, batch, device, clock, deadline))
        except Exception as e:
            out.append(dict(group=group, name="(model)", error=_error(e)))
        _free(device)  # the group's model copies died with _e2e_group's frame
        on_group()
    built.clear()
    _free(device)


def _e2e_group(plan, backbone, label, group, S, batch, device, clock, deadline):
    """One model setting: every benchmark row built, trained in interleaved rounds, summarised (JSON-ready)."""

    shapes = backbones.describe(backbone)
    setting = C.Setting(batch=batch, seq_len=S, prefix_len=plan.prefix_len, adept_rank=plan.adept_rank)
    data = suite.make_batch(setting, shapes["vocab_size"])
    rows = []
    for name, make in C.build_all(backbone, shapes, setting):
        row = dict(group=group, model=label, params=shapes["params"], seq_len=S, batch=batch, name=name)
        try:
            torch.manual_seed(0)
            runner = measure.Runner(C.move(make(), device), data, device)
            row.update(family=runner.c.family, impl=runner.c.impl, trainable_params=runner.trainable_count(),
                       step=runner.train_step)
        except Exception as e:  # a row that can't be built says why in the table
            row["error"] = _error(e)
        rows.append(row)
    timed = [r for r in rows if "step" in r]
    interleaved(timed, clock, plan.e2e_warmup, plan.e2e_repeats, deadline)
    by_name = {r["name"]: r for r in rows}
    floors = [r for r in rows if r.get("impl") == "floor"]

    def bases(r):  # the row's own family's floor, and the two original baselines
        own = next((f for f in floors if f.get("family") == r.get("family")), floors[0] if floors else None)
        return {"floor": own, "P-Tuning v2 (original)": by_name.get("P-Tuning v2 (original)"),
                "DePT (original)": by_name.get("DePT (original)")}
    summarize_rows(rows, bases)
    for r in timed:
        if "summary" in r:
            r["tokens_per_s"] = batch * S / (r["summary"]["median"] * 1e-3)
            own = bases(r)["floor"]
            r["floor_name"] = own["name"] if own else None
            try:
                r["peak_mib"] = peak_mib(r["step"], device)
            except Exception as e:
                r["peak_error"] = _error(e)
    return clean(rows)


def run_adapters(plan, device, deadline):
    """The many-adapters rows (:func:`adapters.measure_adapters` on a backbone built from a config), or one row
    saying they were skipped."""
    label, kind, batch, seq_len, counts, rounds = plan.adapters
    if time.monotonic() > deadline:
        return [dict(A=None, skipped="time budget spent")]
    # a 16-bit model's GEMMs round a row differently in batches of other sizes: the check there is coarse (the
    # float64 test suites check the rows exactly)
    atol = 1e-4 if plan.dtype == torch.float32 else 0.25
    rows = adapters.measure_adapters(label, batch, seq_len, plan.prefix_len, counts, rounds, device,
                                     load=lambda: _build_backbone(kind, plan.dtype, device), atol=atol)
    _free(device)
    return [dict(r, model=label, batch=batch, seq_len=seq_len, prefix_len=plan.prefix_len, rounds=rounds)
            for r in rows]


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- entry point


def run(args, out_dir):
    """Run the suite (``args.smoke``: tiny, CPU, interpreter, no files). Returns the result dict."""
    smoke = bool(getattr(args, "smoke", False))
    if smoke:
        # the kernels run in Triton's interpreter on CPU; set before any kernel module is imported
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
        plan = smoke_plan()
    else:
        if not torch.cuda.is_available():
            raise SystemExit("--suite gpu needs a CUDA device; on CPU run it with --smoke (tiny shapes, no timings)")
        if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on"):
            raise SystemExit("TRITON_INTERPRET is on: the GPU suite times compiled kernels; set TRITON_INTERPRET=0")
        device = torch.device("cuda")
        plan = full_plan()
    started = time.monotonic()
    deadline = started + (float("inf") if smoke else BUDGET_S)  # the smoke run must reach every code path
    if not smoke:  # `timeout` (make gpu-bench) sends SIGTERM: leave through the finally below, which writes the files
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = versions(device)
    print(f"fastprefix-bench --suite gpu{' --smoke' if smoke else ''}: {versions_line(info)}", flush=True)
    clock = Clock(device)
    result = dict(versions=info, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), smoke=smoke,
                  settings=dict(dtype=str(plan.dtype).replace("torch.", ""), warmup=plan.warmup, repeats=plan.repeats,
                                e2e_warmup=plan.e2e_warmup, e2e_repeats=plan.e2e_repeats,
                                prefix_len=plan.prefix_len, adept_rank=plan.adept_rank,
                                clock="CUDA events" if clock.cuda else "perf_counter (CPU)",
                                attention_shapes=[dataclasses.asdict(s) for s in plan.attention],
                                embedding=plan.embedding, e2e=[list(x) for x in plan.e2e],
                                budget_s=None if smoke else BUDGET_S, flex_compiled=plan.compile_flex),
                  attention=[], embedding=[], e2e=[], adapters=[], wall_seconds=None)
    out = None if smoke else out_dir
    tag = getattr(args, "tag", None) or gpu_tag(info.get("gpu", "cpu"))

    def save(png=False):
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        if time.monotonic() > deadline:
            result["stopped"] = "time budget spent; later groups were skipped"
        # the fastest exact path per shape class, what the "auto" rule reads on this GPU once committed
        result["dispatch"] = dispatch_table.measured(result["attention"], info.get("gpu", "cpu"),
                                                     info.get("capability", ""), result["date"], info)
        if out is not None and result["dispatch"]["classes"]:
            dispatch_table.write(result["dispatch"], out, tag)
        return write(result, out, tag, png=png)

    text = None
    try:
        sections = (
            ("attention", lambda: run_attention(plan, device, clock, deadline, result["attention"], save)),
            ("embedding", lambda: result["embedding"].extend(run_embedding(plan, device, clock, deadline))),
            ("e2e", lambda: run_e2e(plan, device, clock, deadline, result["e2e"], save)),
            ("adapters", lambda: result["adapters"].extend(run_adapters(plan, device, deadline))))
        for section, fn in sections:
            print(f"[{time.monotonic() - started:6.1f} s] {section} ...", flush=True)
            try:
                fn()
            except Exception as e:  # a whole section failing still leaves the others
                result[section].append(dict(contender=f"({section})", name=f"({section})", group="", shape="", mode="",
                                        error=_error(e), traceback=traceback.format_exc()[-2000:]))
            save()
    finally:
        text = save(png=True)
    print(text)
    if out is not None:
        print(f"wrote {out / tag}.{{md,json,png}} and {out / tag}{dispatch_table.SUFFIX} in "
              f"{result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":  # ``python -m fastprefix.benchmarks.gpu``: print the versions line and exit
    print(versions_line(versions()))
    sys.exit(0)
