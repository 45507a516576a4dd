"""Kernel-level rows, CUDA only: the gated-prefix attention kernel against SDPA.

Three ways to attend ``S`` queries over an ``L``-token prefix plus ``S`` keys, timed with
``triton.testing.do_bench`` (forward, and forward + backward; the median of the timed calls with
their interquartile range and min-max):

- ``fastprefix`` — :func:`fastprefix.gated_prefix_attention` on the Triton path (P-Tuning v2, and APT
  with the token gate fused into the kernel);
- ``SDPA on cat([prefix; K])`` — what a P-Tuning v2 implementation does: expand the shared prefix to
  the batch, concatenate it to K and V, call ``scaled_dot_product_attention``;
- ``SDPA over S+L keys (floor)`` — the same attention on K/V that already hold S+L rows (no concat).

Achieved TFLOP/s count the two matmuls (``4·B·H·S·(S+L)·D`` forward, 2.5x that with the backward);
bytes/s count one read of q, k, v, the prefix and one write of the output (forward). Peaks come from
a small table of known GPUs (or ``--peak-tflops`` / ``--peak-gbps``); unknown GPUs get no percentages.
Nothing here touches CUDA unless :func:`run` is called on a machine that has it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastprefix

# dense 16-bit tensor-core TFLOP/s and HBM GB/s, by device-name substring (first match wins)
KNOWN_PEAKS = (
    ("H200", 989.0, 4800.0), ("H100 PCIe", 756.0, 2000.0), ("H100", 989.0, 3350.0),
    ("A100-SXM4-80GB", 312.0, 2039.0), ("A100 80GB PCIe", 312.0, 1935.0), ("A100", 312.0, 1555.0),
    ("L40S", 362.0, 864.0), ("L4", 121.0, 300.0), ("A10", 125.0, 600.0), ("RTX 4090", 165.0, 1008.0),
    ("RTX 3090", 71.0, 936.0), ("V100", 125.0, 900.0), ("T4", 65.0, 320.0),
)

SHAPES = (  # B, H, Hkv, S, L, D
    (8, 16, 16, 512, 32, 64),
    (4, 32, 8, 2048, 64, 128),
    (1, 32, 8, 8192, 128, 128),
)


def device_peaks(device, tflops=None, gbps=None):
    name = torch.cuda.get_device_name(device)
    for key, t, g in KNOWN_PEAKS:
        if key in name:
            return tflops or t, gbps or g
    return tflops, gbps


def _inputs(B, H, Hkv, S, L, D, dtype, device, d_model=1024):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    return dict(q=r(B, H, S, D), k=r(B, Hkv, S, D), v=r(B, Hkv, S, D), prefix_k=r(Hkv, L, D), prefix_v=r(Hkv, L, D),
                gate=dict(gate_hidden=r(B, S, d_model), gate_weight=r(d_model, L) * 0.02,
                          gate_bias=torch.zeros(L, device=device, dtype=dtype),
                          layer_scale=torch.ones((), device=device, dtype=dtype)))


def _contenders(x, H, Hkv):
    q, k, v, pk, pv = x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"]
    B = q.shape[0]
    gqa = H != Hkv
    k_full = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2).detach()
    v_full = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2).detach()

    def concat_sdpa():
        kk = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
        vv = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
        return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa)

    rows = {
        "fastprefix P-Tuning v2": lambda: fastprefix.gated_prefix_attention(q, k, v, pk, pv, backend="triton"),
        "fastprefix APT (token gate fused)": lambda: fastprefix.gated_prefix_attention(
            q, k, v, pk, pv, backend="triton", **x["gate"]),
        "SDPA on cat([prefix; K])": concat_sdpa,
        "SDPA over S+L keys (floor)": lambda: F.scaled_dot_product_attention(q, k_full, v_full, enable_gqa=gqa),
    }
    return rows, [k_full, v_full]


def _bench(do_bench, fn, **kw):
    """``dict(median, q1, q3, min, max)`` in ms of ``do_bench``'s timed calls (the spread the table reports).

    ``quantiles`` (not ``return_mode="all"``) because every Triton release since 2.1 takes it.
    """
    med, q1, q3, lo, hi = do_bench(fn, quantiles=[0.5, 0.25, 0.75, 0.0, 1.0], **kw)
    return dict(median=med, q1=q1, q3=q3, min=lo, max=hi)


def run(device, dtype=torch.bfloat16, peak_tflops=None, peak_gbps=None, progress=None):
    """Rows ``{shape, impl, mode, ms, tflops, gbps, ...}`` for every shape in :data:`SHAPES`."""
    from triton.testing import do_bench

    t_peak, g_peak = device_peaks(device, peak_tflops, peak_gbps)
    elt = torch.finfo(dtype).bits // 8
    rows = []
    for B, H, Hkv, S, L, D in SHAPES:
        x = _inputs(B, H, Hkv, S, L, D, dtype, device)
        flops = 4 * B * H * S * (S + L) * D
        nbytes = elt * (2 * B * H * S * D + 2 * B * Hkv * S * D + 2 * Hkv * L * D)
        shape = f"B{B} H{H}/{Hkv} S{S} L{L} D{D}"
        fns, floor_kv = _contenders(x, H, Hkv)
        # every input trains (APT's gate too); the floor's K/V hold the prefix rows
        leaves = [x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], *x["gate"].values(), *floor_kv]
        for impl, fn in fns.items():
            for mode in ("forward", "forward+backward"):
                if mode == "forward":
                    with torch.no_grad():
                        summary = _bench(do_bench, fn)
                    f = flops
                else:
                    for t in leaves:
                        t.requires_grad_(True)
                    do = torch.randn_like(x["q"])
                    summary = _bench(do_bench, lambda: fn().backward(do), grad_to_none=leaves)
                    for t in leaves:
                        t.requires_grad_(False)
                    f = int(2.5 * flops)
                ms = summary["median"]
                row = dict(shape=shape, impl=f"{impl} ({mode})", mode=mode, ms=ms, ms_summary=summary,
                           tflops=f / ms / 1e9,
                           gbps=nbytes / ms / 1e6 if mode == "forward" else None)
                if t_peak:
                    row["flops_frac_pct"] = 100 * row["tflops"] / t_peak
                if g_peak and mode == "forward":
                    row["bw_frac_pct"] = 100 * row["gbps"] / g_peak
                rows.append(row)
                if progress is not None:
                    progress.update(1)
    return rows


def count(shapes=SHAPES):
    return len(shapes) * 4 * 2
