"""Run the contenders: the main table (sampled until its headline ratios converge) and the scaling curves.

Steps are interleaved: every round runs one step of each contender in turn (the order rotating), so a
slow spell of a shared machine lands on all rows alike, and step ``i`` of two rows form a pair for
:func:`.stats.ratio_interval`. The table first runs ``repeats`` rounds of every row; then, while a
headline ratio's 95% interval is wider than +/-3% (:data:`.stats.CONVERGED_WITHIN`) and the time
budget lasts, it runs more rounds of the rows in those ratios only. A row that stopped early keeps the
first rounds of the others as its pairs (ratios use the rounds both rows ran).
"""

from __future__ import annotations

import dataclasses
import gc
import time

import torch

from . import contenders as C
from . import measure, stats

BASELINES = ("P-Tuning v2 (original)", "DePT (original)")
# the rows of the scaling curves (the baselines, the fast rows that must beat them, both floors)
CURVE_ROWS = ("P-Tuning v2 (original)", "P-Tuning v2 (PEFT)", "APT token gate (fastprefix)",
              "DePT (original)", "ADePT (fastprefix)", "floor")
# (row, baseline) pairs the targets compare, training step; "floor" is the row's own floor
HEADLINE = (("APT token gate (fastprefix)", "P-Tuning v2 (PEFT)"),
            ("APT token gate (fastprefix)", "P-Tuning v2 (original)"),
            ("APT pooled gate (fastprefix)", "P-Tuning v2 (PEFT)"),
            ("APT pooled gate (fastprefix)", "P-Tuning v2 (original)"),
            ("ADePT (fastprefix)", "DePT (original)"),
            ("APT token gate (fastprefix)", "floor"),
            ("APT pooled gate (fastprefix)", "floor"),
            ("ADePT (fastprefix)", "floor"))
FLOOR_TARGET = 0.9  # "within 10% of the floor": at least 0.9x the floor's throughput
MAX_ROUNDS = 400  # a cap on the adaptive rounds, whatever the budget
# a bootstrap over fewer rounds than this can look tight by chance (3 rounds give 10 distinct resamples)
MIN_ROUNDS = 5


class NullProgress:
    """The progress-bar interface the suite uses, doing nothing (``--quiet``, CI, tests)."""

    total = 0

    def update(self, n=1):
        pass

    def set_postfix_str(self, s="", refresh=True):
        pass

    def refresh(self):
        pass


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


def _warm(runners, step, warmup, progress, label):
    for name, r in runners:
        progress.set_postfix_str(f"{name}: {label} warm-up", refresh=False)
        for _ in range(warmup):
            getattr(r, step)()
        progress.update(warmup)


def _round(runners, step, device, clock, rnd, times, progress, label):
    """One step of each runner, the order rotated by ``rnd``; appends to ``times[name]``."""
    k = rnd % len(runners)
    for name, r in runners[k:] + runners[:k]:
        progress.set_postfix_str(f"{name}: {label} step {len(times[name]) + 1}", refresh=False)
        _, t = measure.median_seconds(getattr(r, step), device, 0, 1, clock)
        times[name].append(t[0])
        progress.update(1)


def _interleaved(runners, step, device, warmup, repeats, progress, clock="wall", label="train"):
    """``{name: [repeats step durations]}``, the rows' steps interleaved round by round."""
    _warm(runners, step, warmup, progress, label)
    times = {name: [] for name, _ in runners}
    for rnd in range(repeats):
        _round(runners, step, device, clock, rnd, times, progress, label)
    return times


def floor_of(rows_by_name, family):
    """The name of the floor row for ``family`` ("prefix" or "prompt"), or None.

    Result files written before the per-family floors had one floor (family "floor") for every row.
    """
    floors = [r for r in rows_by_name.values() if r["impl"] == "floor"]
    own = [r["name"] for r in floors if r["family"] == family]
    legacy = [r["name"] for r in floors if r["family"] == "floor"]
    return (own or legacy or [None])[0]


def _resolve(pair, families, floors):
    row, base = pair
    if base == "floor":
        base = floors.get(families.get(row))
    return row, base


def _paired(a, b):
    n = min(len(a), len(b))
    return a[:n], b[:n]


def compare(base_times, row_times):
    """The row's speedup over the baseline on the rounds both ran: ratio, lo, hi, verdict, text, n, converged."""
    base, row = _paired(base_times, row_times)
    out = stats.speedup(base, row)
    out["n"] = len(row)
    out["converged"] = len(row) >= MIN_ROUNDS and stats.converged(out["ratio"], out["lo"], out["hi"])
    return out


def sample_until_converged(runners, times, device, clock, budget_s, progress, started, pairs,
                           max_rounds=MAX_ROUNDS):
    """More interleaved training rounds of the rows in unconverged ``pairs`` until all converge or time is up.

    ``times``: ``{name: [durations]}`` so far (extended in place); ``pairs``: ``(row, base)`` names;
    ``started``: ``time.perf_counter()`` when the first timed round began (the budget counts from it).
    Returns the number of extra rounds run.
    """
    by_name = dict(runners)
    rounds = 0
    first = len(next(iter(times.values()), []))
    round_s = (time.perf_counter() - started) / max(first, 1) if first else 0.0
    planned = 0
    while first + rounds < max_rounds:
        open_pairs = [p for p in pairs if not compare(times[p[1]], times[p[0]])["converged"]]
        if not open_pairs:
            break
        active = [n for n in by_name if any(n in p for p in open_pairs)]
        elapsed = time.perf_counter() - started
        # a round of the active rows costs about their share of a full round
        cost = round_s * len(active) / len(by_name)
        if elapsed + cost > budget_s:
            break
        if not planned:  # tell the progress bar the most this phase can take
            planned = int(min(max_rounds - first, (budget_s - elapsed) / max(cost, 1e-9))) * len(active)
            progress.total += planned
            progress.refresh()
        t0 = time.perf_counter()
        _round([(n, by_name[n]) for n in active], "train_step", device, clock, first + rounds, times, progress,
               "train (until converged)")
        planned -= len(active)
        round_s = (time.perf_counter() - t0) * len(by_name) / len(active)
        rounds += 1
    if planned > 0:  # the phase ended early: take the unused estimate back out of the bar's total
        progress.total -= planned
        progress.refresh()
    return rounds


def add_stats(rows, tokens):
    """Each row's step-time summaries, tokens/s with its interquartile range, and its ratios with intervals.

    ``rows``: dicts with ``name``, ``family``, ``impl``, ``train_times`` and ``infer_times`` (seconds);
    ``tokens``: real tokens per step (B*S). Ratios are throughput ratios (> 1: the row is faster) to the
    :data:`BASELINES` and to the row's own floor, on the interleaved rounds both rows ran.
    """
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        if r["impl"] != "floor":
            r["floor"] = floor_of(by_name, r["family"])
        else:
            r["floor"] = None
        r["ratios"] = {}
        for kind in ("train", "infer"):
            t = r.get(f"{kind}_times")
            if not t:
                continue
            s = r[kind] = stats.summarize(t)
            r[f"{kind}_s"] = s["median"]
            r[f"{kind}_tok_s"] = tokens / s["median"]
            r[f"{kind}_tok_s_iqr"] = [tokens / s["q3"], tokens / s["q1"]]
            ratios = r["ratios"][kind] = {}
            for base in BASELINES:
                if base in by_name and by_name[base].get(f"{kind}_times"):
                    ratios[base] = compare(by_name[base][f"{kind}_times"], t)
            if r["floor"] and by_name[r["floor"]].get(f"{kind}_times"):
                ratios["floor"] = dict(compare(by_name[r["floor"]][f"{kind}_times"], t), of=r["floor"])
    return rows


def targets(rows):
    """The issue's CPU targets (training step), each a dict with the ratio, its interval and a status.

    ``status``: "met" when the whole interval is at or above the threshold, "not met" when it is all
    below, "undecided" when it holds the threshold (for ">= 1" targets that is a tie).
    """
    by = {r["name"]: r for r in rows}
    families = {r["name"]: r["family"] for r in rows}
    floors = {fam: floor_of(by, fam) for fam in ("prefix", "prompt")}
    out = []
    pairs = [(p, True) for p in HEADLINE]
    pairs += [((r["name"], "floor"), False) for r in rows
              if r["impl"] == "fastprefix" and (r["name"], "floor") not in HEADLINE]
    for (row, base), headline in pairs:
        row, base = _resolve((row, base), families, floors)
        if row not in by or base not in by:
            continue
        threshold = FLOOR_TARGET if by[base]["impl"] == "floor" else 1.0
        c = compare(by[base]["train_times"], by[row]["train_times"])
        status = "met" if c["lo"] >= threshold else "not met" if c["hi"] < threshold else "undecided"
        what = (f"{row} train step within 10% of its floor ({base})" if threshold != 1.0
                else f"{row} train step >= {base}")
        out.append(dict(what=what, row=row, base=base, threshold=threshold, headline=headline, status=status, **c))
    return out


def headline_pairs(rows):
    """The :data:`HEADLINE` pairs present in ``rows``, floors resolved to row names."""
    by = {r["name"]: r for r in rows}
    families = {r["name"]: r["family"] for r in rows}
    floors = {fam: floor_of(by, fam) for fam in ("prefix", "prompt")}
    out = []
    for p in HEADLINE:
        row, base = _resolve(p, families, floors)
        if row in by and base in by:
            out.append((row, base))
    return out


def run_table(backbone, shapes, setting, device, warmup, repeats, progress, only=None, memory=True, clock="wall",
              budget_s=0.0):
    """One row per contender: step-time samples and summaries, throughput, peak memory, ratios with intervals.

    ``repeats`` rounds of every row always run; ``budget_s`` (seconds of wall time from the first timed
    round) allows more training rounds until the :data:`HEADLINE` ratios converge. Returns
    ``(rows, sampling)`` where ``sampling`` says how many rounds ran and which headline ratios converged.
    """
    runners = _runners(backbone, shapes, setting, device, only)
    rows = [dict(name=n, family=r.c.family, impl=r.c.impl, trainable_params=r.trainable_count()) for n, r in runners]
    pairs = headline_pairs(rows)
    _warm(runners, "train_step", warmup, progress, "train")
    train = {n: [] for n, _ in runners}
    started = time.perf_counter()
    for rnd in range(repeats):
        _round(runners, "train_step", device, clock, rnd, train, progress, "train")
    extra = sample_until_converged(runners, train, device, clock, budget_s, progress, started, pairs)
    train_seconds = time.perf_counter() - started
    infer = _interleaved(runners, "infer_step", device, warmup, repeats, progress, clock, label="inference")
    for row, (name, r) in zip(rows, runners):
        row["train_times"], row["infer_times"] = train[name], infer[name]
        if memory:
            progress.set_postfix_str(f"{name}: peak memory", refresh=False)
            row["train_peak_bytes"] = measure.peak_bytes(r.train_step, device)
            progress.update(1)
    del runners
    gc.collect()
    add_stats(rows, setting.batch * setting.seq_len)
    open_pairs = [dict(row=a, base=b, **compare(train[b], train[a])) for a, b in pairs]
    sampling = dict(repeats=repeats, extra_rounds=extra, budget_s=budget_s,
                    seconds=round(train_seconds, 1),
                    not_converged=[f"{p['row']} vs {p['base']}: {p['text']}" for p in open_pairs
                                   if not p["converged"]])
    return rows, sampling


def run_curve(backbone, shapes, base, axis, values, device, warmup, repeats, progress, tokens_per_step=None,
              clock="wall"):
    """Training throughput of :data:`CURVE_ROWS` as ``axis`` ("seq_len" or "prefix_len") takes ``values``.

    Over sequence length the batch shrinks to keep about ``tokens_per_step`` tokens per step. At each
    value the rows' steps are interleaved as in the table; each point keeps its step times, their
    summary and tokens/s with its interquartile range (``train_tok_s_iqr``), which the chart draws as a band.
    """
    curve = {"axis": axis, "values": list(values), "rows": {}}
    for v in values:
        fields = {axis: v}
        if axis == "seq_len":
            fields.update(batch=max(1, (tokens_per_step or base.batch * base.seq_len) // v), dept_max_length=v)
        setting = dataclasses.replace(base, **fields)
        runners = _runners(backbone, shapes, setting, device, CURVE_ROWS, exact=True)
        times = _interleaved(runners, "train_step", device, warmup, repeats, progress, clock,
                             label=f"{axis} {v}")
        tokens = setting.batch * setting.seq_len
        for name, r in runners:
            t = times[name]
            s = stats.summarize(t)
            if r.c.impl == "floor" and r.c.family == "prompt":
                name = "floor: backbone on S+L tokens"  # its row name carries this value's L
            curve["rows"].setdefault(name, []).append(dict(
                value=v, batch=setting.batch, train_times=t, train=s, train_s=s["median"],
                train_tok_s=tokens / s["median"], train_tok_s_iqr=[tokens / s["q3"], tokens / s["q1"]]))
        del runners
        gc.collect()
    return curve

