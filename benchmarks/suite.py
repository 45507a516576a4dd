"""Run the contenders: the main table (sampled until its target ratios converge) and the scaling curves.

Steps are interleaved: every round runs one step of each of its rows in turn (the order rotating), so
a slow spell of a shared machine lands on all of them alike, and two rows' steps of the same round
form a pair for :func:`.stats.ratio_interval`. Every step keeps the id of its round. The table first
runs ``repeats`` rounds of every row. Then, while the time budget lasts and a ratio of the table or of
its targets (:func:`table_pairs`) is open (its 95% interval wider than +/-3%,
:data:`.stats.CONVERGED_WITHIN`, or its verdict not settled: undecided, its interval straddling an edge of
the tie band or, for a training floor, the target's threshold, or an end of it near one of those:
:func:`.stats.decision_margin`), it runs two-row rounds: the two rows of one
open ratio, back to back, the order alternating; unsettled verdicts first, then unconverged intervals,
targets ahead of other ratios, the fewest rounds first (:func:`sample_until_converged`). Inference does
the same on half the budget. Back-to-back steps share more of the machine's drift than steps a
whole round apart, and a round spent on a ratio that is already decided would not change what the
table says.
"""

from __future__ import annotations

import dataclasses
import gc
import time

import torch

from . import contenders as C
from . import measure, stats
from .metronome import Metronome

BASELINES = ("P-Tuning v2 (original)", "DePT (original)")
# the rows of the scaling curves (the baselines, the fast rows that must beat them, both floors); --only
# narrows them as it narrows the table (curve_rows)
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
# the inference rounds may take this share of the training budget on top of it (their ratios get verdicts too)
INFER_BUDGET_SHARE = 0.5
# a verdict counts as settled when no threshold lies inside its interval and both ends lie at least a
# half-width from every threshold (an undecided verdict, straddling one, never is)
SETTLED = 1.0
# fewer rounds than this have no 95% interval for their median (stats.median_interval)
MIN_ROUNDS = 6


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


def _runners(backbone, shapes, setting, device, only, exact=False, clock="wall"):
    """``[(name, measure.Runner)]`` of the rows; a :class:`.Metronome` ``clock`` gets hooked into each model."""
    batch = make_batch(setting, shapes["vocab_size"])
    runners = []
    for name, make in C.build_all(backbone, shapes, setting, only, exact):
        torch.manual_seed(0)
        runner = measure.Runner(C.move(make(), device), batch, device)
        if isinstance(clock, Metronome):
            clock.attach(runner.c.model)
        runners.append((name, runner))
    return runners


def _step_seconds(fn, device, clock):
    """One timed call of ``fn``: by the :class:`.Metronome` when ``clock`` is one, else by :data:`.measure.CLOCKS`."""
    if isinstance(clock, Metronome):
        return clock.time(fn)
    return measure.median_seconds(fn, device, 0, 1, clock)[0]


def _warm(runners, step, warmup, progress, label):
    for name, r in runners:
        progress.set_postfix_str(f"{name}: {label} warm-up", refresh=False)
        for _ in range(warmup):
            getattr(r, step)()
        progress.update(warmup)


def _round(runners, step, device, clock, rnd, times, progress, label, rounds=None):
    """One step of each runner, the order rotated by ``rnd``; appends to ``times`` (and ``rnd`` to ``rounds``)."""
    k = rnd % len(runners)
    for name, r in runners[k:] + runners[:k]:
        progress.set_postfix_str(f"{name}: {label} step {len(times[name]) + 1}", refresh=False)
        times[name].append(_step_seconds(getattr(r, step), device, clock))
        if rounds is not None:
            rounds[name].append(rnd)
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


def _paired(a, b, a_rounds=None, b_rounds=None):
    """The steps of ``a`` and ``b`` that ran in the same rounds, in round order.

    Without round ids (result files written before the two-row rounds) step ``i`` of each is round ``i``.
    """
    if a_rounds is None or b_rounds is None:
        n = min(len(a), len(b))
        return list(a[:n]), list(b[:n])
    if len(a_rounds) != len(a) or len(b_rounds) != len(b):
        raise ValueError(f"every step needs its round id: {len(a)} and {len(b)} steps, "
                         f"{len(a_rounds)} and {len(b_rounds)} round ids")
    at, bt = dict(zip(a_rounds, a)), dict(zip(b_rounds, b))
    common = sorted(set(at) & set(bt))
    return [at[i] for i in common], [bt[i] for i in common]


def compare(base_times, row_times, base_rounds=None, row_rounds=None):
    """The row's speedup over the baseline on the rounds both ran: ratio, lo, hi, verdict, text, n, converged."""
    base, row = _paired(base_times, row_times, base_rounds, row_rounds)
    out = stats.speedup(base, row)
    out["n"] = len(row)
    out["converged"] = len(row) >= MIN_ROUNDS and stats.converged(out["ratio"], out["lo"], out["hi"])
    return out


def _compare_rows(base, row, kind="train"):
    """:func:`compare` of two result rows' ``kind`` steps, paired by round id when the rows carry them."""
    return compare(base[f"{kind}_times"], row[f"{kind}_times"], base.get(f"{kind}_rounds"), row.get(f"{kind}_rounds"))


def thresholds_of(base_name, rows_by_name, kind="train"):
    """The ratios a verdict about ``base_name`` turns on: the tie band's ends (:func:`.stats.tie_band`), and
    for a training floor the :data:`FLOOR_TARGET` less the band (where :func:`.stats.meets` turns)."""
    base = rows_by_name.get(base_name) or {}
    if base.get("impl") == "floor" and kind == "train":
        return (*stats.tie_band(), stats.target_edge(FLOOR_TARGET))
    return stats.tie_band()


def sample_until_converged(runners, times, rounds, device, clock, budget_s, progress, started, pairs,
                           max_rounds=MAX_ROUNDS, step="train_step"):
    """Two-row rounds of ``step`` for open ``pairs`` until none is open or the time is up.

    ``times``/``rounds``: ``{name: [durations]}`` and ``{name: [round ids]}`` so far (extended in place);
    ``pairs``: ``(row, base, thresholds, target)``; ``started``: ``time.perf_counter()`` when the first timed
    round began (the budget counts from it). A pair is open while its interval is wider than +/-3%
    (unconverged) or its verdict is not settled (:func:`.stats.decision_margin` against its thresholds
    below :data:`SETTLED`: the interval straddles an edge of the tie band or a target's threshold, i.e.
    the verdict is undecided, or an end of it sits near one, so that another run could land on the other
    side). Each round runs the two rows of one open pair, back
    to back: unsettled before settled, then unconverged before converged, then targets first, then the
    one with the fewest paired rounds. Unsettled first because a verdict that repeats is what a reader
    takes away; round-robin over them (fewest rounds first), not "the least settled first", because a
    ratio whose true value sits right at a threshold stays unsettled however long it is sampled and would
    take the whole budget (it took 40 of 104 rounds in a trial run while a headline ratio got none).
    Returns the number of rounds run.
    """
    by_name = dict(runners)
    next_id = 1 + max((i for ids in rounds.values() for i in ids), default=-1)
    cache = {}

    def state(pair):
        row, base = pair[:2]
        key = (row, base, len(times[row]), len(times[base]))
        if key not in cache:
            cache[key] = compare(times[base], times[row], rounds[base], rounds[row])
        return cache[key]

    def step_s(name):
        return sorted(times[name])[len(times[name]) // 2]

    def settled(pair):
        return stats.decision_margin(state(pair)["lo"], state(pair)["hi"], pair[2]) >= SETTLED

    n, planned = 0, None
    while n < max_rounds:
        open_pairs = [p for p in pairs if not (state(p)["converged"] and settled(p))]
        if not open_pairs:
            break
        row, base, _, _ = min(open_pairs, key=lambda p: (settled(p), state(p)["converged"], not p[3], state(p)["n"]))
        cost = step_s(row) + step_s(base)
        elapsed = time.perf_counter() - started
        if elapsed + cost > budget_s:
            break
        if planned is None:  # tell the progress bar the most this phase can take
            planned = 2 * int(min(max_rounds, (budget_s - elapsed) / max(cost, 1e-9)))
            progress.total += planned
            progress.refresh()
        order = [(row, by_name[row]), (base, by_name[base])]
        # rotation by the round id alternates which of the two goes first
        _round(order, step, device, clock, next_id, times, progress, f"{step.split('_')[0]} (until converged)", rounds)
        next_id += 1
        planned -= 2
        n += 1
    if planned and planned > 0:  # the phase ended early: take the unused estimate back out of the bar's total
        progress.total -= planned
        progress.refresh()
    return n


def _shared_rounds(rows, kind):
    """The round ids every row with ``kind`` steps ran (None when a row lacks round ids: older files)."""
    ids = [r.get(f"{kind}_rounds") for r in rows if r.get(f"{kind}_times")]
    if not ids or any(i is None for i in ids):
        return None
    return set(ids[0]).intersection(*ids[1:])


def _in_shared_rounds(row, kind, shared):
    """The row's ``kind`` step times from the ``shared`` rounds (all of them when ``shared`` is None)."""
    t = row[f"{kind}_times"]
    if shared is None:
        return t
    return [x for x, i in zip(t, row[f"{kind}_rounds"]) if i in shared] or t


def add_stats(rows, tokens):
    """Each row's step-time summaries, tokens/s with its interquartile range, and its ratios with intervals.

    ``rows``: dicts with ``name``, ``family``, ``impl``, ``train_times`` and ``infer_times`` (seconds),
    optionally ``train_rounds``/``infer_rounds``; ``tokens``: real tokens per step (B*S). The summaries
    and tokens/s use the rounds every row ran (the full rounds), so that rows compare at the same
    moments of a machine whose speed drifts; the two-row rounds feed the ratios only. Ratios are
    throughput ratios (> 1: the row is faster) to the :data:`BASELINES` and to the row's own floor, on
    the interleaved rounds both rows ran.
    """
    by_name = {r["name"]: r for r in rows}
    shared = {kind: _shared_rounds(rows, kind) for kind in ("train", "infer")}
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
            s = r[kind] = stats.summarize(_in_shared_rounds(r, kind, shared[kind]))
            r[f"{kind}_s"] = s["median"]
            r[f"{kind}_tok_s"] = tokens / s["median"]
            r[f"{kind}_tok_s_iqr"] = [tokens / s["q3"], tokens / s["q1"]]
            ratios = r["ratios"][kind] = {}
            for base in BASELINES:
                if base in by_name and by_name[base].get(f"{kind}_times"):
                    ratios[base] = _compare_rows(by_name[base], r, kind)
            if r["floor"] and by_name[r["floor"]].get(f"{kind}_times"):
                ratios["floor"] = dict(_compare_rows(by_name[r["floor"]], r, kind), of=r["floor"])
    return rows


def target_pairs(rows):
    """``(row, base, threshold, headline)`` of every target present in ``rows``, floors resolved to row names.

    The :data:`HEADLINE` pairs first, then every other fastprefix row against its floor; ``threshold`` is
    :data:`FLOOR_TARGET` against a floor, else 1.00.
    """
    by = {r["name"]: r for r in rows}
    families = {r["name"]: r["family"] for r in rows}
    floors = {fam: floor_of(by, fam) for fam in ("prefix", "prompt")}
    pairs = [(p, True) for p in HEADLINE]
    pairs += [((r["name"], "floor"), False) for r in rows
              if r["impl"] == "fastprefix" and (r["name"], "floor") not in HEADLINE]
    out = []
    for pair, headline in pairs:
        row, base = _resolve(pair, families, floors)
        if row in by and base in by:
            out.append((row, base, FLOOR_TARGET if by[base]["impl"] == "floor" else 1.0, headline))
    return out


def targets(rows):
    """The issue's CPU targets (training step), each a dict with the ratio, its interval and a status.

    ``status`` (:func:`.stats.meets`): "met" when the whole interval is at or above the threshold less the
    3% tie band, "not met" when it is all below that, else "undecided".
    """
    by = {r["name"]: r for r in rows}
    out = []
    for row, base, threshold, headline in target_pairs(rows):
        c = _compare_rows(by[base], by[row])
        status = stats.meets(c["lo"], c["hi"], threshold)
        what = (f"{row} train step within 10% of its floor ({base})" if threshold != 1.0
                else f"{row} train step >= {base}")
        out.append(dict(what=what, row=row, base=base, threshold=threshold, headline=headline, status=status, **c))
    return out


def table_pairs(rows, kind="train"):
    """``(row, base, thresholds, target)`` of every ratio the table states for ``kind`` steps, targets first.

    The target pairs (:func:`target_pairs`, training only; ``target`` True), then each row against the
    :data:`BASELINES` and its floor; ``thresholds``: :func:`thresholds_of`.
    """
    by = {r["name"]: r for r in rows}
    targets_ = [(row, base) for row, base, _, _ in target_pairs(rows)] if kind == "train" else []
    pairs = list(targets_)
    for r in rows:
        floor = None if r["impl"] == "floor" else floor_of(by, r["family"])
        pairs += [(r["name"], base) for base in (*BASELINES, floor) if base in by and base != r["name"]]
    return [(row, base, thresholds_of(base, by, kind), (row, base) in targets_) for row, base in dict.fromkeys(pairs)]


def run_table(backbone, shapes, setting, device, warmup, repeats, progress, only=None, memory=True, clock="wall",
              budget_s=0.0):
    """One row per contender: step-time samples and summaries, throughput, peak memory, ratios with intervals.

    ``repeats`` rounds of every row always run, training then inference. ``budget_s`` (seconds of wall
    time from the first timed training round) allows two-row training rounds (see the module
    docstring) until every ratio of the table and its targets (:func:`table_pairs`) has converged;
    inference gets :data:`INFER_BUDGET_SHARE` of it on top, for its own ratios. Returns ``(rows,
    sampling)`` where ``sampling`` says how many rounds ran and which target ratios did not converge.
    Each row keeps its steps' round ids (``train_rounds``, ``infer_rounds``) beside their durations.
    """
    runners = _runners(backbone, shapes, setting, device, only, clock=clock)
    rows = [dict(name=n, family=r.c.family, impl=r.c.impl, trainable_params=r.trainable_count()) for n, r in runners]
    by_name = {r["name"]: r for r in rows}
    times, extra, seconds = {}, {}, {}
    for kind, budget in (("train", budget_s), ("infer", budget_s * INFER_BUDGET_SHARE)):
        step, label = f"{kind}_step", "train" if kind == "train" else "inference"
        _warm(runners, step, warmup, progress, label)
        t, ids = {n: [] for n, _ in runners}, {n: [] for n, _ in runners}
        started = time.perf_counter()
        for rnd in range(repeats):
            _round(runners, step, device, clock, rnd, t, progress, label, ids)
        extra[kind] = sample_until_converged(runners, t, ids, device, clock, budget, progress, started,
                                             table_pairs(rows, kind), step=step)
        seconds[kind] = round(time.perf_counter() - started, 1)
        times[kind] = (t, ids)
    for row, (name, r) in zip(rows, runners):
        for kind, (t, ids) in times.items():
            row[f"{kind}_times"], row[f"{kind}_rounds"] = t[name], ids[name]
        if memory:
            progress.set_postfix_str(f"{name}: peak memory", refresh=False)
            row["train_peak_bytes"] = measure.peak_bytes(r.train_step, device)
            progress.update(1)
    del runners
    gc.collect()
    add_stats(rows, setting.batch * setting.seq_len)
    open_pairs = [dict(row=a, base=b, **_compare_rows(by_name[b], by_name[a])) for a, b, _, _ in target_pairs(rows)]
    sampling = dict(repeats=repeats, extra_rounds=extra["train"], budget_s=budget_s, seconds=seconds["train"],
                    infer_extra_rounds=extra["infer"], infer_budget_s=budget_s * INFER_BUDGET_SHARE,
                    infer_seconds=seconds["infer"],
                    not_converged=[f"{p['row']} vs {p['base']}: {p['text']}" for p in open_pairs
                                   if not p["converged"]])
    return rows, sampling


def _curve_point(value, batch, tokens, times):
    """One point of a curve: its step times, their summary, and tokens/s with its interquartile range."""
    s = stats.summarize(times)
    return dict(value=value, batch=batch, tokens=tokens, train_times=list(times), train=s, train_s=s["median"],
                train_tok_s=tokens / s["median"], train_tok_s_iqr=[tokens / s["q3"], tokens / s["q1"]])


def rescale(rows, curves, factor, tokens):
    """Every step time of the table ``rows`` and the ``curves`` times ``factor``, and all that derives from them.

    A :class:`.Metronome` run's times are in units of its calibration tick until the run's median tick is
    known (:meth:`.Metronome.rescale_factor`). Ratios do not change; medians, spreads and tokens/s do.
    ``tokens``: the table's real tokens per step.
    """
    for r in rows:
        for kind in ("train", "infer"):
            if r.get(f"{kind}_times"):
                r[f"{kind}_times"] = [t * factor for t in r[f"{kind}_times"]]
    add_stats(rows, tokens)
    for curve in curves:
        for points in curve["rows"].values():
            points[:] = [_curve_point(p["value"], p["batch"], p["tokens"], [t * factor for t in p["train_times"]])
                         for p in points]


def curve_rows(table_names):
    """The :data:`CURVE_ROWS` among ``table_names`` (the rows ``--only`` kept), as :func:`run_curve` takes them.

    The prompt floor is named by its :func:`.contenders.curve_label` (its L changes along a curve).
    """
    labels = [C.curve_label(n) for n in table_names]
    return tuple(n for n in labels if n in CURVE_ROWS or (n.startswith("floor") and "floor" in CURVE_ROWS))


def run_curve(backbone, shapes, base, axis, values, device, warmup, repeats, progress, tokens_per_step=None,
              clock="wall", rows=CURVE_ROWS):
    """Training throughput of ``rows`` (:data:`CURVE_ROWS`, or :func:`curve_rows`) as ``axis`` ("seq_len" or
    "prefix_len") takes ``values``.

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
        runners = _runners(backbone, shapes, setting, device, rows, exact=True, clock=clock)
        times = _interleaved(runners, "train_step", device, warmup, repeats, progress, clock,
                             label=f"{axis} {v}")
        tokens = setting.batch * setting.seq_len
        for name, _ in runners:
            # the prompt floor's row name carries this value's L: one name for the curve (its curve_label)
            point = _curve_point(v, setting.batch, tokens, times[name])
            curve["rows"].setdefault(C.curve_label(name), []).append(point)
        del runners
        gc.collect()
    return curve

