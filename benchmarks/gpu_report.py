"""The GPU suite's outputs (:mod:`.gpu`): the versions line, a Markdown report, the JSON file and a PNG chart."""

from __future__ import annotations

import importlib.metadata
import io
import json
import platform
import re
import sys

import torch

from . import adapters, stats


def versions(device=None):
    """Python, torch, triton, transformers, peft, CUDA, and the GPU's name and capability."""
    def v(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = dict(python=platform.python_version(), torch=torch.__version__, triton=v("triton"),
                transformers=v("transformers"), peft=v("peft"), flash_attn=v("flash-attn") or v("flash_attn"),
                fastprefix=v("fastprefix"), cuda=torch.version.cuda, platform=platform.platform())
    if torch.cuda.is_available():
        dev = device if device is not None and device.type == "cuda" else torch.device("cuda")
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["capability"] = "%d.%d" % torch.cuda.get_device_capability(dev)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    return info


def versions_line(info):
    keys = ("python", "torch", "triton", "transformers", "peft", "flash_attn", "cuda", "gpu", "capability")
    return ", ".join(f"{k} {info.get(k)}" for k in keys)


def _t(r):
    s = r.get("summary")
    if not s:
        return ""
    return f"{s['median']:.3f} ({s['q1']:.3f}-{s['q3']:.3f}; {s['min']:.3f}-{s['max']:.3f})"


def _status(r):
    if "error" in r:
        return f"error: {r['error']}"
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    return ""


def _vs(r, key):
    x = (r.get("vs") or {}).get(key)
    return f"{x['text']} {x['verdict']}" if x else ""


def _mib(r):
    return "" if r.get("peak_mib") is None else f"{r['peak_mib']:,.0f}"


def markdown(result):
    s, v = result["settings"], result["versions"]
    lines = [f"# fastprefix on {v.get('gpu') or 'CPU (smoke run: timings mean nothing)'}", "",
             f"Versions: {versions_line(v)}.", "",
             f"Settings: {s['dtype']}; attention and embedding rows {s['warmup']} warm-up calls, then "
             f"{s['repeats']} interleaved rounds (order rotating); end to end {s['e2e_warmup']} warm-up and "
             f"{s['e2e_repeats']} rounds. Times: {s['clock']}, milliseconds, median (IQR; min-max). Ratios: "
             "speedup over the named row, the median of the paired rounds' ratios, > 1 is faster, with its exact 95% "
             "interval (order statistics) "
             f"and a verdict ({stats.TIE_RULE}). Peak: extra memory allocated during one call.", ""]
    att = result.get("attention") or []
    if att:
        lines += ["## Attention", "", "| shape | contender | mode | ms | TFLOP/s | x floor | peak MiB | note |",
                  "|---|---|---|---:|---:|---|---:|---|"]
        for r in att:
            tf = f"{r['tflops']:.1f}" if r.get("tflops") is not None else ""
            lines.append(f"| {r['shape']} | {r['contender']} | {r['mode']} | {_t(r)} | {tf} | {_vs(r, 'floor')} | "
                         f"{_mib(r)} | {_status(r)} |")
        lines.append("")
    table = (result.get("dispatch") or {}).get("classes") or {}
    if table:
        lines += ["## Dispatch table (forward+backward; what the auto rule reads on this GPU once committed)", "",
                  "| shape class | fastest path | time over the fastest, per path | shapes |", "|---|---|---|---|"]
        for key, entry in sorted(table.items()):
            rel = ", ".join(f"{p} {r:.2f}" for p, r in sorted(entry["relative"].items(), key=lambda t: t[1]))
            lines.append(f"| {key} | {entry['path']} | {rel} | {'; '.join(entry['shapes'])} |")
        lines.append("")
    emb = result.get("embedding") or []
    if emb:
        lines += ["## Embedding kernels", "", "| shape | contender | mode | ms | x torch ops | peak MiB | note |",
                  "|---|---|---|---:|---|---:|---|"]
        for r in emb:
            lines.append(f"| {r.get('shape', '')} | {r['contender']} | {r['mode']} | {_t(r)} | {_vs(r, 'torch ops')} | "
                         f"{_mib(r)} | {_status(r)} |")
        lines.append("")
    e2e = result.get("e2e") or []
    if e2e:
        lines += ["## End to end (training step: forward, backward, AdamW)", "",
                  "| model, S, batch | row | train tok/s | ms | x own floor | x PTv2 orig | x DePT orig | "
                  "peak MiB | note |", "|---|---|---:|---:|---|---|---|---:|---|"]
        for r in e2e:
            tok = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else ""
            lines.append(f"| {r['group']} | {r['name']} | {tok} | {_t(r)} | {_vs(r, 'floor')} | "
                         f"{_vs(r, 'P-Tuning v2 (original)')} | {_vs(r, 'DePT (original)')} | {_mib(r)} | "
                         f"{_status(r)} |")
        lines.append("")
    many = result.get("adapters") or []
    timed = [r for r in many if r.get("A") is not None]
    if many:
        lines += ["## Many adapters (one call with adapter_names against one call per adapter)", ""]
        if timed:
            r = timed[0]
            lines += [adapters.setting(r["model"], r["batch"], r["seq_len"], r["prefix_len"], r["rounds"],
                                       result["versions"].get("gpu") or "CPU"), "", *adapters.table(timed)]
        lines += [f"Not run: {r.get('skipped') or r.get('error')}" for r in many if r.get("A") is None] + [""]
    lines += [f"Run: {result.get('date')}, {result.get('wall_seconds')} s wall clock"
              + (f"; stopped early: {result['stopped']}" if result.get("stopped") else "") + "."]
    return "\n".join(lines) + "\n"


def chart(result, target):
    """Two panels: attention forward+backward speed over the floor per shape; end-to-end speed over the floor.

    Returns False (drawing nothing) where matplotlib is not installed: the GPU machine's own Python may lack it,
    and the run's numbers are in the Markdown and JSON files either way."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), dpi=72)
    att = [r for r in result.get("attention") or [] if r.get("mode") == "forward+backward" and r.get("vs")]
    shapes = list(dict.fromkeys(r["shape"] for r in att))
    for name in dict.fromkeys(r["contender"] for r in att):
        pts = [(shapes.index(r["shape"]), r["vs"]["floor"]["ratio"]) for r in att
               if r["contender"] == name and "floor" in r["vs"]]
        if pts:
            axes[0].plot(*zip(*pts), marker="o", label=name)
    axes[0].axhline(1.0, color="black", linestyle="--", linewidth=1)
    axes[0].set_xticks(range(len(shapes)), shapes, rotation=60, ha="right", fontsize=7)
    axes[0].set_ylabel("speed over the floor (SDPA on S keys), fwd+bwd")
    axes[0].legend(fontsize=6)
    e2e = [r for r in result.get("e2e") or [] if (r.get("vs") or {}).get("floor")]
    groups = list(dict.fromkeys(r["group"] for r in e2e))
    names = list(dict.fromkeys(r["name"] for r in e2e))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        pts = [(groups.index(r["group"]) + i * width, r["vs"]["floor"]["ratio"]) for r in e2e if r["name"] == name]
        if pts:
            axes[1].bar(*zip(*pts), width=width, label=name)
    axes[1].axhline(1.0, color="black", linestyle="--", linewidth=1)
    axes[1].set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=7)
    axes[1].set_ylabel("training speed over the family's floor")
    axes[1].legend(fontsize=6)
    fig.suptitle(f"fastprefix on {result['versions'].get('gpu') or 'CPU (smoke)'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(target, format="png")
    plt.close(fig)
    return True


def gpu_tag(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "gpu"


def write(result, out, tag, png=False):
    """Write ``<tag>.md`` and ``.json`` (and ``.png``) to ``out``; with ``out=None`` only render them."""
    text = markdown(result)
    blob = json.dumps(result, indent=1, sort_keys=True, default=str) + "\n"
    if out is None:
        if png:
            chart(result, io.BytesIO())
        return text
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.md").write_text(text)
    (out / f"{tag}.json").write_text(blob)
    if png and not chart(result, out / f"{tag}.png"):
        print(f"note: matplotlib is not installed, so no {tag}.png (pip install matplotlib to draw it); "
              f"{tag}.md and {tag}.json hold every number", file=sys.stderr)
    return text
