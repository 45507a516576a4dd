"""Run the contenders: the main table and the scaling curves.

Calls are interleaved: every repeat runs one step of each contender in turn (the order rotating), so a
slow spell of a shared machine lands on all rows alike and the ratios stay honest.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics

import torch

from . import contenders as C
from . import measure

BASELINES = ("P-Tuning v2 (original)", "DePT (original)")
# the rows of the scaling curves (the baselines, the fast rows that must beat them, the floor)
CURVE_ROWS = ("P-Tuning v2 (original)", "P-Tuning v2 (PEFT)", "APT token gate (fastprefix)",
              "DePT (original)", "ADePT (fastprefix)", "floor")


def make_batch(setting, vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, min(vocab_size, 30000), (setting.batch, setting.seq_len), generator=g)
    return ids, torch.ones_like(ids), torch.randint(0, 2, (setting.batch,), generator=g)


def _runners(backbone, shapes, setting, device, only, exact=False):
    batch = make_batch(setting, shapes["vocab_size"])
    runners = []
    for name, make in C.build_all(backbone, shapes, setting, only, exact):
        torch.manual_seed(0)
        runners.append((name, measure.Runner(C.move(make(), device), batch, device)))
    return runners


def _interleaved(runners, step, device, warmup, repeats, progress, clock="wall"):
    fns = [getattr(r, step) for _, r in runners]
    for fn in fns:
        for _ in range(warmup):
            fn()
        progress.update(warmup)
    times = [[] for _ in fns]
    for rep in range(repeats):
        order = list(range(len(fns)))
        order = order[rep % len(order):] + order[:rep % len(order)]
        for i in order:
            _, t = measure.median_seconds(fns[i], device, 0, 1, clock)
            times[i].append(t[0])
            progress.update(1)
    return times


def run_table(backbone, shapes, setting, device, warmup, repeats, progress, only=None, memory=True, clock="wall"):
    """One row per contender: median train / inference step time, throughput, peak memory, ratios."""
    runners = _runners(backbone, shapes, setting, device, only)
    train = _interleaved(runners, "train_step", device, warmup, repeats, progress, clock)
    infer = _interleaved(runners, "infer_step", device, warmup, repeats, progress, clock)
    tokens = setting.batch * setting.seq_len
    rows = []
    for (name, r), t_train, t_infer in zip(runners, train, infer):
        row = dict(name=name, family=r.c.family, impl=r.c.impl, trainable_params=r.trainable_count(),
                   train_s=statistics.median(t_train), infer_s=statistics.median(t_infer),
                   train_times=t_train, infer_times=t_infer)
        row["train_tok_s"], row["infer_tok_s"] = tokens / row["train_s"], tokens / row["infer_s"]
        if memory:
            row["train_peak_bytes"] = measure.peak_bytes(r.train_step, device)
        progress.update(1)
        rows.append(row)
    del runners
    gc.collect()
    add_ratios(rows)
    return rows


def add_ratios(rows):
    """Throughput ratios to the baselines of the same run and to the floor (>1: faster)."""
    by_name = {r["name"]: r for r in rows}
    floor = next((r for r in rows if r["impl"] == "floor"), None)
    for r in rows:
        for base in BASELINES:
            if base in by_name:
                for kind in ("train", "infer"):
                    r[f"{kind}_vs_{base}"] = r[f"{kind}_tok_s"] / by_name[base][f"{kind}_tok_s"]
        if floor is not None:
            for kind in ("train", "infer"):
                r[f"{kind}_vs_floor"] = r[f"{kind}_tok_s"] / floor[f"{kind}_tok_s"]


def run_curve(backbone, shapes, base, axis, values, device, warmup, repeats, progress, tokens_per_step=None,
              clock="wall"):
    """Training throughput of :data:`CURVE_ROWS` as ``axis`` ("seq_len" or "prefix_len") takes ``values``.

    Over sequence length the batch shrinks to keep about ``tokens_per_step`` tokens per step.
    """
    curve = {"axis": axis, "values": list(values), "rows": {}}
    for v in values:
        fields = {axis: v}
        if axis == "seq_len":
            fields.update(batch=max(1, (tokens_per_step or base.batch * base.seq_len) // v), dept_max_length=v)
        setting = dataclasses.replace(base, **fields)
        runners = _runners(backbone, shapes, setting, device, CURVE_ROWS, exact=True)
        times = _interleaved(runners, "train_step", device, warmup, repeats, progress, clock)
        for (name, r), t in zip(runners, times):
            name = "floor: backbone on S+L tokens" if r.c.impl == "floor" else name
            s = statistics.median(t)
            curve["rows"].setdefault(name, []).append(dict(value=v, batch=setting.batch, train_s=s,
                                                           train_tok_s=setting.batch * setting.seq_len / s))
        del runners
        gc.collect()
    return curve


def targets(rows):
    """The issue's CPU targets, each ``(description, met, detail)``."""
    by = {r["name"]: r for r in rows}
    out = []

    def ratio(a, b):
        return by[a]["train_tok_s"] / by[b]["train_tok_s"]

    for apt in ("APT token gate (fastprefix)", "APT pooled gate (fastprefix)"):
        for base in ("P-Tuning v2 (PEFT)", "P-Tuning v2 (original)"):
            if apt in by and base in by:
                x = ratio(apt, base)
                out.append((f"{apt} train step >= {base}", x >= 1.0, f"x{x:.2f}"))
    if "ADePT (fastprefix)" in by and "DePT (original)" in by:
        x = ratio("ADePT (fastprefix)", "DePT (original)")
        out.append(("ADePT (fastprefix) train step >= DePT (original)", x >= 1.0, f"x{x:.2f}"))
    floor = next((r for r in rows if r["impl"] == "floor"), None)
    if floor is not None:
        for r in rows:
            if r["impl"] == "fastprefix":
                x = r["train_tok_s"] / floor["train_tok_s"]
                out.append((f"{r['name']} train step within 10% of the floor", x >= 0.9, f"x{x:.2f} of floor"))
    return out
