"""The cost model of the attention paths: FLOPs and DRAM bytes per kernel, and the modelled time on an A100.

What it computes. For a model shape (:class:`Shape`: B, H, Hkv, S, L, D, causal, and a batch layout: ``dense``, a
``padded`` batch, a ``packed`` row) and each path (``floor``: FlashAttention-2 over the real keys alone, no
prefix; ``fused``; ``split``; ``concat``), the kernels the path runs, each as (FLOPs, bytes), and its time
``sum over kernels of max(FLOPs / 312 TFLOP/s, bytes / 2.0 TB/s)`` (A100 bf16 peak rates, no efficiency factor),
forward and backward. :func:`rows` gives docs/design.md's cost-model tables (a test checks the page against it);
:func:`pick` the path the model prefers for a shape class, which the dispatch rule takes where no measured table
covers the class (dispatch.py).

How the kernels are counted (per layer; 2 FLOPs per multiply-add; every operand of a kernel read once and every
result written once, L2 re-reads not counted; the log-sum-exp, delta and gate vectors are left out, each under 1%
of the bytes at the model shape):

- the attention over the keys: ``4 H D`` FLOPs per (query, visible key) pair forward, 2.5x that backward
  (FlashAttention-2's 5 GEMMs), 3.5x for the fused kernel (its dq and dk/dv kernels both recompute the scores);
  the prefix: ``4 H D L`` per query forward, 2.5x backward where the vendor op sees it as keys (concat), 3.5x where
  it is recomputed in a second kernel (fused, split). Causal pairs: half of a square block (``n^2 / 2``), as the
  older rows had it.
- bytes, with ``Q = B H Sq D e`` (a query-sized tensor, e = 2 bytes), ``K`` the keys' size and ``K_real`` the real
  keys': FlashAttention-2 forward ``2Q + 2K`` (q, k, v in, o out), backward ``5Q + 4K`` (dO and o for its delta,
  then q, k, v, dO, and dq, dk, dv out); the fused kernel forward ``2Q + 2K``, backward ``9Q + 6K`` (delta; dq:
  q, k, v, dO in, dq out; dk/dv: q, dO, k, v in, dk, dv out; prefix: q, dO in); split's merge ``3Q`` forward (q
  and o_k in, out out), backward ``10Q`` (``w dO``: 2Q, delta: 2Q, the dq kernel: q, dO in and dq read-modify-write:
  4Q, the prefix kernel: q, dO in: 2Q); concat's concatenation ``2K_real + 2K'`` forward (``K' = K_real`` plus one
  prefix per sequence) and its slicing back ``2K' + 2K`` backward.
- padded batches (``layout="padded"``): every query row is kept (the op's contract), row b has ``n_b`` real keys
  (the model's lengths run evenly over ``[S/2, S]``, 3/4 of S on average, right-padded). The fused kernel computes
  every key (padding is masked, not skipped). The varlen paths gather the real keys (``2 K_real`` read and written;
  split again in its backward, concat keeps them) and scatter their gradients back (``2 K_real`` read, ``2 K``
  written); a causal right-padded batch runs two
  varlen calls (varlen.py), which writes the output twice and sums it (``4Q`` forward), and in the backward runs
  the delta pass twice and sums dq, dk and dv (``6Q + 6 K_real``). The floor runs FlashAttention-2's varlen op
  over keys already unpadded.
- packed rows (``layout="packed"``): ``B`` sequences of S tokens in one row (the same work as the dense batch).
  The varlen paths read the row as it lies; the fused kernel re-pads it (gathers of q, k, v and of the output:
  ``4Q + 4K`` each way).

Caveats. Peak rates without efficiency factors (a review put the fused backward at about 2x FlashAttention-2's
time at the vendor's real efficiency, which the model does not see); launch overheads and L2 reuse are not
modelled. The measured table (``benchmarks/results/<gpu>-dispatch.json``) replaces these picks where it exists.
"""

from __future__ import annotations

from typing import NamedTuple

PEAK_FLOPS = 312e12  # A100 bf16 dense tensor-core peak, FLOP/s
PEAK_BYTES = 2.0e12  # A100 80 GB HBM2e, bytes/s
PATHS = ("floor", "fused", "split", "concat")
LAYOUTS = ("dense", "padded", "packed")


class Shape(NamedTuple):
    """A model shape: B rows (packed: B sequences of S tokens in one row), H query heads, Hkv key/value heads,
    S tokens per row, L prefix rows, head dim D, causal, layout (:data:`LAYOUTS`), e bytes per element."""

    B: int = 8
    H: int = 32
    Hkv: int = 8
    S: int = 2048
    L: int = 64
    D: int = 128
    causal: bool = False
    layout: str = "dense"
    e: int = 2


class Kernel(NamedTuple):
    name: str
    flops: float
    bytes: float

    @property
    def seconds(self) -> float:
        return max(self.flops / PEAK_FLOPS, self.bytes / PEAK_BYTES)


def lengths(s: Shape) -> list:
    """The real keys of each row: all S (dense, packed), or evenly over ``[S/2, S]`` (padded)."""
    if s.layout != "padded":
        return [s.S] * s.B
    return [s.S * (0.5 + (b + 0.5) / (2 * s.B)) for b in range(s.B)]


def _pairs(s: Shape, prefix: int = 0, every_key: bool = False) -> float:
    """(query, key) pairs the attention computes, summed over rows: each query over the L = ``prefix`` rows, and
    over its visible real keys (``every_key``: all S keys of the row, as the fused kernel computes padding)."""
    total = 0.0
    for n in lengths(s):
        n = s.S if every_key else n
        if s.causal:  # right padding: the first n queries causal over the run, the other S - n see all of it
            total += n * n / 2 + (s.S - n) * n
        else:
            total += s.S * n
        total += s.S * prefix
    return total


def kernels(path: str, s: Shape) -> tuple:
    """``(forward kernels, backward kernels)`` of ``path`` on ``s``: lists of :class:`Kernel`."""
    unit = 4 * s.H * s.D  # FLOPs per (query, key) pair, forward
    Q = s.B * s.H * s.S * s.D * s.e
    K = s.B * s.Hkv * s.S * s.D * s.e
    K_real = sum(lengths(s)) * s.Hkv * s.D * s.e
    K_cat = K_real + s.B * s.Hkv * s.L * s.D * s.e  # [P ; real keys] per sequence
    attn = unit * _pairs(s)
    prefix = unit * s.B * s.S * s.L
    varlen = s.layout != "dense"
    two_calls = s.layout == "padded" and s.causal
    if path == "floor":
        return [Kernel("FlashAttention-2", attn, 2 * Q + 2 * K_real)], \
               [Kernel("FlashAttention-2 bwd", 2.5 * attn, 5 * Q + 4 * K_real)]
    if path == "fused":
        f = unit * _pairs(s, s.L, every_key=True)
        fwd, bwd = [Kernel("fused", f, 2 * Q + 2 * K)], [Kernel("fused bwd", 3.5 * f, 9 * Q + 6 * K)]
        if s.layout == "packed":  # re-padded: q, k, v gathered, the output gathered back (and so the gradients)
            fwd.append(Kernel("re-pad", 0.0, 4 * Q + 4 * K))
            bwd.append(Kernel("re-pad bwd", 0.0, 4 * Q + 4 * K))
        return fwd, bwd
    if path == "split":
        fwd = [Kernel("FlashAttention-2" + " varlen" * varlen, attn, 2 * Q + 2 * K_real),
               Kernel("merge", prefix, 3 * Q)]
        bwd = [Kernel("w dO", 0.0, 2 * Q), Kernel("delta", 0.0, 2 * Q),
               Kernel("FlashAttention-2 bwd" + " varlen" * varlen, 2.5 * attn, 5 * Q + 4 * K_real),
               Kernel("merge dq", 1.75 * prefix, 4 * Q), Kernel("merge prefix", 1.75 * prefix, 2 * Q)]
        if s.layout == "padded":  # the backward gathers the real keys again (the forward keeps nothing)
            fwd.insert(0, Kernel("unpad K, V", 0.0, 4 * K_real))
            bwd.insert(0, Kernel("unpad K, V", 0.0, 4 * K_real))
            bwd.append(Kernel("scatter dK, dV", 0.0, 2 * K_real + 2 * K))
        if two_calls:
            fwd.append(Kernel("second call + sum", 0.0, 2 * K_real + 4 * Q))
            bwd.append(Kernel("second call + sums", 0.0, 6 * Q + 6 * K_real))
        return fwd, bwd
    if path == "concat":
        cat_attn = unit * _pairs(s, s.L)
        fwd = [Kernel("concatenate [P ; K]", 0.0, 2 * K_real + 2 * K_cat),
               Kernel("FlashAttention-2" + " varlen" * varlen, cat_attn, 2 * Q + 2 * K_cat)]
        bwd = [Kernel("FlashAttention-2 bwd" + " varlen" * varlen, 2.5 * cat_attn, 5 * Q + 4 * K_cat),
               Kernel("slice dK, dV, sum dP", 0.0, 2 * K_cat + 2 * K)]
        if two_calls:
            fwd.append(Kernel("second call + sum", 0.0, 2 * K_cat + 4 * Q))
            bwd.append(Kernel("second call + sums", 0.0, 6 * Q + 6 * K_cat))
        return fwd, bwd
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")


def seconds(path: str, s: Shape) -> tuple:
    """``(forward, backward)`` modelled seconds of ``path`` on ``s``."""
    fwd, bwd = kernels(path, s)
    return sum(k.seconds for k in fwd), sum(k.seconds for k in bwd)


def rows(s: Shape) -> list:
    """docs/design.md's rows for ``s``: ``(path, fwd GFLOP, fwd GB, bwd GFLOP, bwd GB, time / floor)`` per path,
    the time being forward + backward against the floor's (FLOPs in 1e9, bytes in 1e9)."""
    floor = sum(seconds("floor", s))
    out = []
    for path in PATHS:
        fwd, bwd = kernels(path, s)
        out.append((path, sum(k.flops for k in fwd) / 1e9, sum(k.bytes for k in fwd) / 1e9,
                    sum(k.flops for k in bwd) / 1e9, sum(k.bytes for k in bwd) / 1e9,
                    sum(seconds(path, s)) / floor))
    return out


def pick(s: Shape, candidates) -> str:
    """The candidate path (of ``"fused"``, ``"split"``, ``"concat"``) with the least modelled forward + backward
    time on ``s`` (ties: the order of :data:`PATHS`)."""
    ranked = [p for p in PATHS if p in candidates]
    if not ranked:
        raise ValueError(f"no candidate path among {PATHS}: {candidates}")
    return min(ranked, key=lambda p: sum(seconds(p, s)))
