"""``fastprefix-bench compare A.json B.json``: every row of two runs side by side, B's speed over A's.

For each row the two files share (by name; the GPU suite's rows by section, group and name) and each
kind of step both timed (``train_times`` and ``infer_times`` in the CPU/CUDA table, ``times_ms`` in the
GPU suite), the ratio is B's throughput over A's, above 1 B is faster (the ratio of the two runs'
medians), with a 95% bootstrap interval and a verdict. The runs were not interleaved with each other,
so the bootstrap resamples each run's steps on its own (``paired=False``). When the two runs used
different tokens per step (batch x sequence), step-time ratios are scaled by B's tokens over A's so
the ratio stays one of throughputs.

Then the verdicts: every ratio cell of the two tables (each row against P-Tuning v2 (original), DePT
(original) and its floor, training and inference) and every target's status, those that changed from
A to B listed with both intervals. Two runs of the same code on the same machine should agree on all of
them; a change that flips one is a change a reader of the README would see. Verdicts follow
:func:`.stats.verdict`: a cell whose interval straddles an edge of the tie band reads "undecided".

Two runs on different backbones time different models: :func:`other_backbone` says so, and the command
refuses them unless told to go ahead (``--across-backbones``).
"""

from __future__ import annotations

from . import stats
from .report import ensure_stats

_SETTINGS = ("model", "batch", "seq_len", "prefix_len", "dtype", "clock", "threads")


def _tokens(result):
    s = result.get("settings") or {}
    if s.get("batch") and s.get("seq_len"):
        return s["batch"] * s["seq_len"]
    return None


def _rows(result):
    """``{key: row}`` of every list of named rows in a result: the table's ``rows`` under their names, other
    sections (the GPU suite's ``attention``, ``embedding``, ``e2e``) as ``"section: group: name"``."""
    out = {}
    for section, value in result.items():
        if not (isinstance(value, list) and value and all(isinstance(r, dict) and "name" in r for r in value)):
            continue
        for r in value:
            if r.get("error"):
                continue
            key = r["name"] if section == "rows" else ": ".join(str(x) for x in (section, r.get("group"), r["name"])
                                                                 if x)
            out[key] = r
    return out


def _series(row):
    """``{kind: samples}``: each ``<kind>_times`` list, and ``times`` / ``times_ms`` as kind "step"."""
    out = {}
    for k, v in row.items():
        if not (isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v)):
            continue
        if k.endswith("_times"):
            out[k[: -len("_times")]] = v
        elif k in ("times", "times_ms"):
            out["step"] = v
    return out


def compare_runs(a, b):
    """``[dict(name, kind, a_median, b_median, ratio, lo, hi, verdict, text)]`` for the rows both results hold.

    ``a``, ``b``: result dicts (the JSON files' contents); a row needs ``name`` and step-time lists
    (``<kind>_times``, or ``times`` / ``times_ms``) of the same key in both files.
    """
    ta, tb = _tokens(a), _tokens(b)
    scale = tb / ta if ta and tb else 1.0
    rows_a, rows_b = _rows(a), _rows(b)
    out = []
    for name, ra in rows_a.items():
        if name not in rows_b:
            continue
        sa, sb = _series(ra), _series(rows_b[name])
        for kind in sorted(sa, key=lambda k: (k != "train", k != "infer", k)):  # JSON files sort their keys
            if kind not in sb:
                continue
            ratio, lo, hi = stats.ratio_interval(sa[kind], sb[kind], paired=False)
            if name in {r["name"] for r in a.get("rows", [])}:  # the table's rows: tokens/s, not steps/s
                ratio, lo, hi = ratio * scale, lo * scale, hi * scale
            out.append(dict(name=name, kind=kind, a_median=stats.summarize(sa[kind])["median"],
                            b_median=stats.summarize(sb[kind])["median"], ratio=ratio, lo=lo, hi=hi,
                            **stats.reading(ratio, lo, hi)))
    return out


def _verdict_cells(result):
    """``{label: (verdict, text)}`` of every ratio cell of a table result and every target's status."""

    if not result.get("rows") or not all("train_times" in r and "impl" in r for r in result["rows"]):
        return {}
    ensure_stats(result)
    out = {}
    for r in result["rows"]:
        for kind, ratios in (r.get("ratios") or {}).items():
            for base, c in ratios.items():
                out[f"{r['name']}, {kind} x {c.get('of', base)}"] = (c["verdict"], c["text"])
    for t in result.get("targets") or []:
        out[f"target: {t['what']}"] = (t["status"], t["text"])
    return out


def verdict_changes(a, b):
    """``(same, changed)``: how many verdicts the two runs share, and ``[(label, (verdict, text) in A, in B)]``.

    Verdicts are the ratio cells' faster/slower/tie/undecided and the targets' met/not met/undecided
    (:func:`_verdict_cells`), for the labels both results hold.
    """
    va, vb = _verdict_cells(a), _verdict_cells(b)
    common = [k for k in va if k in vb]
    changed = [(k, va[k], vb[k]) for k in common if va[k][0] != vb[k][0]]
    return len(common) - len(changed), changed


def backbone(result):
    """The backbone a table run timed (``settings.model``), or None (GPU suite files, which time several)."""
    return (result.get("settings") or {}).get("model")


def other_backbone(a, b):
    """A sentence when the two runs timed different backbones (B / A would then compare models), else None."""
    ma, mb = backbone(a), backbone(b)
    if ma is None or mb is None or ma == mb:
        return None
    return f"A ran the {ma} backbone and B the {mb} backbone: B / A would compare the models, not the code"


def differences(a, b):
    """The settings that differ between the two runs, as ``"key: A -> B"`` strings."""
    sa, sb = a.get("settings") or {}, b.get("settings") or {}
    out = [f"{k}: {sa.get(k)} -> {sb.get(k)}" for k in _SETTINGS if sa.get(k) != sb.get(k)]
    da, db = (a.get("machine") or {}).get("device"), (b.get("machine") or {}).get("device")
    ga, gb = (a.get("machine") or {}).get("gpu"), (b.get("machine") or {}).get("gpu")
    if (da, ga) != (db, gb):
        out.append(f"device: {ga or da} -> {gb or db}")
    return out


def markdown(a, b, name_a="A", name_b="B"):
    """A Markdown report of :func:`compare_runs`, the differing settings first."""
    lines = [f"B = {name_b} against A = {name_a}: throughput ratio B / A (above 1: B is faster), 95% interval, "
             f"verdict ({stats.TIE_RULE}); median steps in the files' unit."]
    diff = differences(a, b)
    if diff:
        lines += ["", "Settings that differ: " + "; ".join(diff) + "."]
    rows = compare_runs(a, b)
    if not rows:
        lines += ["", "The two runs share no row with step times: nothing to compare."]
        return "\n".join(lines) + "\n"
    lines += ["", "| row | step | A median step | B median step | B / A | verdict |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | {r['a_median']:.4g} | {r['b_median']:.4g} | "
                     f"{r['text']} | {r['verdict']} |")
    same, changed = verdict_changes(a, b)
    if same or changed:
        lines += ["", f"Verdicts (the tables' ratio cells and the targets): {same} of {same + len(changed)} the same"
                  + ("." if not changed else "; changed:"), ""]
        lines += [f"- {label}: {va[0]} {va[1]} -> {vb[0]} {vb[1]}" for label, va, vb in changed]
        if not changed:
            lines.pop()
    only_a, only_b = sorted(set(_rows(a)) - set(_rows(b))), sorted(set(_rows(b)) - set(_rows(a)))
    if only_a or only_b:
        lines += ["", f"Only in A: {', '.join(only_a) or 'none'}. Only in B: {', '.join(only_b) or 'none'}."]
    return "\n".join(lines) + "\n"
