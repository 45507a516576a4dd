"""The benchmark's outputs: the machine facts, a Markdown table, a JSON file and a PNG chart."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform

import torch

from .suite import BASELINES


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device):
    info = dict(
        platform=platform.platform(), python=platform.python_version(), cpu=_cpu_model(),
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=str(device),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        versions={p: _version(p) for p in ("torch", "triton", "transformers", "peft", "fastprefix")},
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _x(v):
    return "" if v is None else f"{v:.2f}"


def markdown(result):
    m, s = result["machine"], result["settings"]
    dev = m.get("gpu") or f"{m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads)"
    lines = [
        f"Backbone **{s['model']}** ({s['backbone_params'] / 1e6:.1f} M params, frozen), batch {s['batch']}, "
        f"sequence {s['seq_len']}, prefix/prompt length {s['prefix_len']}, {s['dtype']}, on {dev}; "
        f"torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, "
        f"peft {m['versions']['peft']}, triton {m['versions']['triton']}. "
        f"Median of {s['repeats']} interleaved steps after {s['warmup']} warm-up steps "
        f"({'wall clock' if s.get('clock', 'wall') == 'wall' else 'process CPU time'}); tokens/s counts the "
        f"B·S real tokens. ×: throughput ratio to that row of the same run (>1 is faster). "
        f"Peak: {s['memory_method']}.",
        "",
        "| contender | trainable params | train tok/s | × PTv2 orig | × DePT orig | × floor | "
        "infer tok/s | × PTv2 orig | × DePT orig | × floor | train peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        peak = r.get("train_peak_bytes")
        lines.append(
            f"| {r['name']} | {r['trainable_params']:,} | {r['train_tok_s']:,.0f} | "
            f"{_x(r.get('train_vs_' + BASELINES[0]))} | {_x(r.get('train_vs_' + BASELINES[1]))} | "
            f"{_x(r.get('train_vs_floor'))} | {r['infer_tok_s']:,.0f} | "
            f"{_x(r.get('infer_vs_' + BASELINES[0]))} | {_x(r.get('infer_vs_' + BASELINES[1]))} | "
            f"{_x(r.get('infer_vs_floor'))} | {'' if peak is None else f'{peak / 2**20:,.1f}'} |")
    if result.get("targets"):
        lines += ["", "Targets (training step):", ""]
        lines += [f"- {'met' if ok else 'NOT met'}: {what} ({detail})" for what, ok, detail in result["targets"]]
    for curve in result.get("curves", []):
        lines += ["", _curve_table(curve)]
    if result.get("kernels"):
        lines += ["", _kernel_table(result["kernels"])]
    lines += ["", f"Measured {m['date']}; load average at start {m['load_average']}."]
    return "\n".join(lines) + "\n"


def _curve_table(curve):
    axis = {"seq_len": "sequence length S", "prefix_len": "prefix/prompt length"}[curve["axis"]]
    head = f"Training tokens/s over {axis}" + (" (batch shrinks to keep the tokens per step)"
                                                 if curve["axis"] == "seq_len" else "") + ":"
    vals = curve["values"]
    out = [head, "", "| contender | " + " | ".join(str(v) for v in vals) + " |",
           "|---|" + "---:|" * len(vals)]
    for name, points in curve["rows"].items():
        out.append(f"| {name} | " + " | ".join(f"{p['train_tok_s']:,.0f}" for p in points) + " |")
    return "\n".join(out)


def _kernel_table(kernels):
    out = ["Kernel level (CUDA, triton.testing.do_bench; bytes/s for the forward only):", "",
           "| shape | impl | ms | TFLOP/s | % peak FLOP/s | GB/s | % peak bandwidth |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for k in kernels:
        gbps = "" if k["gbps"] is None else f"{k['gbps']:.0f}"
        out.append(f"| {k['shape']} | {k['impl']} | {k['ms']:.3f} | {k['tflops']:.1f} | "
                   f"{_x(k.get('flops_frac_pct'))} | {gbps} | {_x(k.get('bw_frac_pct'))} |")
    return "\n".join(out)


def write_json(result, path):
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True, default=str)
        f.write("\n")


def chart(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = result.get("curves", [])
    fig, axes = plt.subplots(1, 1 + len(curves), figsize=(6 + 4.5 * len(curves), 4.8), dpi=72)
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    rows = result["rows"]
    colors = {"original": "tab:gray", "peft": "tab:blue", "fastprefix": "tab:orange", "floor": "black"}
    ax = axes[0]
    names = [r["name"] for r in rows][::-1]
    vals = [r["train_tok_s"] for r in rows][::-1]
    ax.barh(names, vals, color=[colors.get(r["impl"], "tab:green") for r in rows][::-1])
    ax.set_xlabel("training tokens/s (higher is better)")
    ax.tick_params(axis="y", labelsize=8)
    s = result["settings"]
    ax.set_title(f"{s['model']}, B={s['batch']}, S={s['seq_len']}, L=m={s['prefix_len']}", fontsize=9)
    markers = {"original": "s", "peft": "^", "fastprefix": "o", "floor": "."}
    for ax, curve in zip(axes[1:], curves):
        for i, (name, points) in enumerate(curve["rows"].items()):
            impl = next((r["impl"] for r in rows if r["name"] == name), "floor" if "floor" in name else "")
            ax.plot([p["value"] for p in points], [p["train_tok_s"] for p in points], marker=markers.get(impl, "o"),
                    label=name, color="black" if impl == "floor" else f"C{i}",
                    linestyle="--" if impl == "floor" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel({"seq_len": "sequence length S", "prefix_len": "prefix / prompt length"}[curve["axis"]])
        ax.set_ylabel("training tokens/s")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
