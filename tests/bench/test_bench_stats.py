"""The benchmark's statistics, verdicts, ``compare`` command and the README's generated claims.

Known samples in, exact numbers out: identical rows tie at 1.00, clearly separated rows are faster or
slower, the paired bootstrap sees through noise the rows share. Then the CLI around them: ``compare``
on two small result files, ``--help`` and the README quoting the same run times, the README's block
matching the committed ``benchmarks/results/minilm.json``, and one tiny end-to-end run.
"""

import contextlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fastprefix.benchmarks import __main__ as cli
from fastprefix.benchmarks import compare, measure, report, stats, suite
from helpers.models import tiny

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
COMMITTED = ROOT / "benchmarks" / "results" / "minilm.json"


def _flat(text):
    return " ".join(text.split())


# ---------------------------------------------------------------- stats


def test_summarize_known_samples():
    assert stats.summarize([5, 1, 4, 2, 3]) == dict(median=3.0, q1=2.0, q3=4.0, min=1.0, max=5.0, n=5)
    # numpy's linear interpolation between order statistics: 4 samples put q1 a quarter of the way up
    assert stats.summarize([1, 2, 3, 4]) == dict(median=2.5, q1=1.75, q3=3.25, min=1.0, max=4.0, n=4)
    assert stats.summarize([0.25]) == dict(median=0.25, q1=0.25, q3=0.25, min=0.25, max=0.25, n=1)


@pytest.mark.parametrize("bad, message", [([], "non-empty"), ([1.0, -2.0], "above 0"), ([1.0, float("nan")], "finite"),
                                          ([0.0], "above 0")], ids=["empty", "negative", "nan", "zero"])
def test_summarize_rejects_bad_samples(bad, message):
    with pytest.raises(ValueError, match=message):
        stats.summarize(bad)


def test_identical_samples_tie_at_one():
    t = [1.0, 1.3, 0.9, 1.1, 1.05, 0.95, 1.2]
    ratio, lo, hi = stats.ratio_interval(t, t)
    assert (ratio, lo, hi) == (1.0, 1.0, 1.0)
    assert stats.verdict(lo, hi) == "tie"
    assert stats.format_ratio(ratio, lo, hi) == "1.00 (1.00-1.00)"


@pytest.mark.parametrize("factor, word", [(0.5, "faster"), (2.0, "slower")], ids=["half-time", "double-time"])
def test_separated_samples_get_a_verdict(factor, word):
    rng = np.random.default_rng(0)
    base = 1.0 + 0.05 * rng.standard_normal(15)
    row = factor * (1.0 + 0.05 * rng.standard_normal(15))
    s = stats.speedup(base, row)
    expected = float(np.median(base / row))  # paired: the median of the per-round ratios
    assert s["ratio"] == pytest.approx(expected, rel=1e-12)
    assert s["lo"] <= s["ratio"] <= s["hi"]
    assert s["verdict"] == word
    assert s["text"] == stats.format_ratio(s["ratio"], s["lo"], s["hi"])


def test_paired_bootstrap_sees_through_shared_noise():
    # every round's machine speed f_i hits both rows alike: the row is exactly 1.25x faster in every round
    f = np.array([1.0, 3.0, 0.7, 2.2, 1.4, 5.0, 0.9, 1.8, 2.5])
    base, row = 1.0 * f, 0.8 * f
    paired = stats.ratio_interval(base, row)
    unpaired = stats.ratio_interval(base, row, paired=False)
    assert paired == pytest.approx((1.25, 1.25, 1.25), rel=1e-12)
    assert stats.verdict(*paired[1:]) == "faster"
    assert unpaired[0] == pytest.approx(1.25, rel=1e-12)
    assert unpaired[1] < 1.0 < unpaired[2]  # the same steps, resampled apart, can't tell the rows apart


def test_ratio_interval_is_seeded_and_checks_its_input():
    rng = np.random.default_rng(1)
    a, b = 1 + rng.random(9), 1 + rng.random(9)
    assert stats.ratio_interval(a, b, seed=3) == stats.ratio_interval(a, b, seed=3)
    with pytest.raises(ValueError, match="got 9 and 4 steps"):
        stats.ratio_interval(a, b[:4])
    with pytest.raises(ValueError, match="level must lie in"):
        stats.ratio_interval(a, b, level=1.5)
    assert stats.ratio_interval(a, b[:4], paired=False)[0] == pytest.approx(np.median(a) / np.median(b[:4]))


def test_paired_ratio_is_the_median_of_per_round_ratios():
    base = np.array([1.0, 2.0, 4.0, 1.5, 3.0, 2.5, 0.8])
    speedups = np.array([1.1, 0.9, 1.3, 1.0, 1.2, 1.15, 1.05])  # per round; their median is 1.1
    ratio, lo, hi = stats.ratio_interval(base, base / speedups)
    assert ratio == pytest.approx(1.1, rel=1e-12)
    # 7 rounds: the exact 95% interval of a median is the smallest to the largest (P = 1 - 2/2**7)
    assert (lo, hi) == pytest.approx((0.9, 1.3), rel=1e-12)
    assert stats.ratio_interval(base, base / speedups, paired=False)[0] == pytest.approx(
        np.median(base) / np.median(base / speedups))
    # 5 rounds can't give a 95% interval (even min-max covers only 1 - 2/2**5 = 94%): undecided
    assert stats.ratio_interval(base[:5], (base / speedups)[:5])[1:] == (0.0, float("inf"))


@pytest.mark.parametrize("n, k", [(6, 1), (7, 1), (8, 1), (9, 2), (10, 2), (20, 6), (40, 14), (100, 40)],
                         ids=lambda v: str(v))
def test_median_interval_takes_the_sign_test_order_statistics(n, k):
    # k: the largest k with P(Binomial(n, 1/2) <= k - 1) <= 2.5% (binomial tables)
    x = np.arange(1.0, n + 1)[::-1]
    assert stats.median_interval(x) == (float(k), float(n + 1 - k))
    cover = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n
    assert cover >= 0.95 and 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n < 0.95


def test_median_interval_covers_as_it_claims():
    rng = np.random.default_rng(1)
    for n in (7, 12):
        draws = (stats.median_interval(np.exp(0.1 * rng.standard_normal(n))) for _ in range(400))  # median 1
        hits = sum(lo <= 1 <= hi for lo, hi in draws)
        assert hits / 400 >= 0.93  # at least 95% in theory (97.7% and 96.1% here); 400 draws wobble ~1%


@pytest.mark.parametrize("lo, hi, thresholds, margin", [
    (0.90, 1.10, (1.0,), 0.0),          # centred on 1: it straddles the threshold, undecided, never settled
    (1.01, 1.11, (1.0,), 0.2),          # an end 0.01 from 1, half-width 0.05: could flip
    (0.99, 1.09, (1.0,), 0.0),          # an end 0.01 across 1: straddles it
    (0.80, 0.90, (1.0,), 2.0),          # clearly below 1
    (0.92, 0.96, (1.0, 0.9), 1.0),      # a floor ratio: 0.02 from 0.9 decides it, not 1.00's 0.04
    (0.88, 0.98, (1.0, 0.9), 0.0),      # a floor ratio straddling 0.9
    (1.0, 1.0, (1.0,), float("inf")),   # exact
    (0.0, float("inf"), (1.0,), 0.0),   # one step: no interval
], ids=["centred-on-1", "edge-near-1", "edge-across-1", "clear", "floor-target", "floor-straddles", "zero-width",
        "unbounded"])
def test_decision_margin(lo, hi, thresholds, margin):
    assert stats.decision_margin(lo, hi, thresholds) == pytest.approx(margin, rel=1e-9)


def test_one_step_gives_no_interval():
    ratio, lo, hi = stats.ratio_interval([2.0], [1.0])
    assert (ratio, lo, hi) == (2.0, 0.0, float("inf"))
    assert stats.verdict(lo, hi) == "undecided"


@pytest.mark.parametrize("lo, hi, within, word", [
    (0.99, 1.07, 0.03, "undecided"), (1.0, 1.0, 0.03, "tie"), (1.031, 1.05, 0.03, "quicker"),
    (0.90, 0.969, 0.03, "costlier"), (1.01, 1.05, 0.03, "undecided"), (0.90, 0.99, 0.03, "undecided"),
    (0.98, 1.02, 0.03, "tie"), (1.01, 1.05, 0.0, "quicker"), (0.90, 0.99, 0.0, "costlier"),
    (0.99, 1.07, 0.0, "undecided"),
], ids=["holds-1-past-the-band", "exactly-1", "above-band", "below-band", "above-1-past-the-band",
        "below-1-past-the-band", "inside-the-band", "no-band-above", "no-band-below", "no-band-holds-1"])
def test_verdict_words(lo, hi, within, word):
    assert stats.verdict(lo, hi, within=within, faster_word="quicker", slower_word="costlier") == word


@pytest.mark.parametrize("lo, hi, threshold, status", [
    (0.98, 1.10, 1.0, "met"), (0.97, 0.99, 1.0, "met"), (0.95, 0.99, 1.0, "undecided"), (0.90, 0.96, 1.0, "not met"),
    (0.88, 0.95, 0.9, "met"), (0.85, 0.89, 0.9, "undecided"), (0.80, 0.87, 0.9, "not met"),
], ids=["above", "in-band", "straddles-band-edge", "below-band", "floor-met", "floor-straddles", "floor-below"])
def test_target_status_reads_the_tie_band(lo, hi, threshold, status):
    # met: not resolvably below the threshold, i.e. the whole interval at or above threshold * 0.97
    assert stats.meets(lo, hi, threshold) == status


def test_verdict_rejects_a_reversed_interval():
    with pytest.raises(ValueError, match="lo=1.2 and hi=1.1"):
        stats.verdict(1.2, 1.1)


def test_format_and_convergence():
    assert stats.format_ratio(1.0349, 0.9851, 1.0712) == "1.03 (0.99-1.07)"
    assert stats.format_ratio(0.93, 0.79, 0.998) == "0.93 (0.79-0.998)"  # "slower" must not read 0.79-1.00
    assert stats.format_ratio(1.0, 1.0, 1.004) == "1.00 (1.00-1.004)"
    # ends that round onto an edge of the tie band show which side of it they are on
    assert stats.format_ratio(0.95, 0.93, 0.968) == "0.95 (0.93-0.968)"
    assert stats.format_ratio(1.05, 1.0297, 1.08) == "1.05 (1.0297-1.08)"
    assert stats.format_ratio(1.05, 1.03, 1.08) == "1.05 (1.03-1.08)"
    assert stats.converged(1.0, 0.98, 1.02)
    assert not stats.converged(1.0, 0.96, 1.02)


# ---------------------------------------------------------------- suite statistics


def _row(name, family, impl, train, infer=None):
    return dict(name=name, family=family, impl=impl, trainable_params=0, train_times=list(train),
                infer_times=list(infer or train))


def test_rows_get_their_own_family_floor_and_paired_ratios():
    f = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.15]
    rows = [_row("P-Tuning v2 (original)", "prefix", "original", [2 * x for x in f]),
            _row("APT token gate (fastprefix)", "prefix", "fastprefix", [1.6 * x for x in f]),
            _row("DePT (original)", "prompt", "original", [3 * x for x in f]),
            # ADePT: DePT's time up to +/-2% round to round, so its ratio's interval holds 1
            _row("ADePT (fastprefix)", "prompt", "fastprefix",
                 [3 * x * g for x, g in zip(f, [1.02, 0.98, 1.01, 0.99, 1, 1.01, 0.99])]),
            _row("floor: backbone on S tokens", "prefix", "floor", [1.6 * x for x in f]),
            _row("floor: backbone on S+32 tokens", "prompt", "floor", [2.4 * x for x in f])]
    suite.add_stats(rows, tokens=100)
    by = {r["name"]: r for r in rows}
    apt, adept = by["APT token gate (fastprefix)"], by["ADePT (fastprefix)"]
    assert apt["floor"] == "floor: backbone on S tokens" and adept["floor"] == "floor: backbone on S+32 tokens"
    assert apt["ratios"]["train"]["P-Tuning v2 (original)"]["ratio"] == pytest.approx(1.25, rel=1e-12)
    assert apt["ratios"]["train"]["P-Tuning v2 (original)"]["verdict"] == "faster"
    assert apt["ratios"]["train"]["floor"]["verdict"] == "tie"
    assert adept["ratios"]["train"]["DePT (original)"]["verdict"] == "tie"
    assert adept["ratios"]["train"]["DePT (original)"]["lo"] < 1 < adept["ratios"]["train"]["DePT (original)"]["hi"]
    assert adept["ratios"]["train"]["floor"]["hi"] < 0.9
    assert apt["train_tok_s"] == pytest.approx(100 / (1.6 * 1.05), rel=1e-12)
    status = {t["what"]: t["status"] for t in suite.targets(rows)}
    # within 2% of DePT: not resolvably slower, so ">= 1.00" is met by the tie band's reading
    assert status["ADePT (fastprefix) train step >= DePT (original)"] == "met"
    assert status["ADePT (fastprefix) train step within 10% of its floor (floor: backbone on S+32 tokens)"] == "not met"
    assert status["APT token gate (fastprefix) train step >= P-Tuning v2 (original)"] == "met"


class _FakeRunner:
    """A row whose training step advances a fake clock by ``cost * factor[round]`` (the machine's speed)."""

    def __init__(self, clock, cost):
        self.clock, self.cost = clock, cost

    def train_step(self):
        self.clock.now += self.cost * self.clock.speed()


class _FakeClock:
    def __init__(self, speeds):
        self.now, self.calls, self.speeds = 0.0, 0, speeds

    def __call__(self):
        return self.now

    def speed(self):
        self.calls += 1
        return self.speeds[self.calls % len(self.speeds)]


def _full_rounds(runners, n):
    times, rounds = {name: [] for name, _ in runners}, {name: [] for name, _ in runners}
    for rnd in range(n):
        suite._round(runners, "train_step", torch.device("cpu"), "fake", rnd, times, suite.NullProgress(), "t",
                     rounds)
    return times, rounds


def test_sampling_stops_at_convergence_and_only_samples_open_pairs(monkeypatch):
    clock = _FakeClock([1.0])
    monkeypatch.setitem(measure.CLOCKS, "fake", clock)
    runners = [(n, _FakeRunner(clock, c)) for n, c in [("a", 1.0), ("b", 2.0), ("c", 1.0), ("d", 1.0)]]
    times, rounds = _full_rounds(runners, 2)
    started = __import__("time").perf_counter()
    extra = suite.sample_until_converged(runners, times, rounds, torch.device("cpu"), "fake", 60.0,
                                         suite.NullProgress(), started, [("a", "b", (1.0,), True)], max_rounds=50)
    # exact steps converge as soon as there are MIN_ROUNDS of them; rows in no open pair are not sampled
    assert extra == suite.MIN_ROUNDS - 2
    assert [len(times[n]) for n in "abcd"] == [suite.MIN_ROUNDS, suite.MIN_ROUNDS, 2, 2]
    # the extra rounds ran a and b back to back, each round with its own id, the order alternating
    assert rounds["a"] == rounds["b"] == list(range(suite.MIN_ROUNDS)) and rounds["c"] == [0, 1]


def test_sampling_goes_to_the_least_settled_ratio(monkeypatch):
    clock = _FakeClock([1.0, 1.05, 0.97, 1.02, 0.99, 1.03, 0.96])  # the machine's speed, step by step
    monkeypatch.setitem(measure.CLOCKS, "fake", clock)
    runners = [(n, _FakeRunner(clock, c)) for n, c in [("a", 1.0), ("b", 1.04), ("c", 1.0), ("d", 2.0)]]
    times, rounds = _full_rounds(runners, 6)
    pairs = [("c", "d", (1.0,), False), ("a", "b", (1.0,), False)]
    margins = {p[:2]: stats.decision_margin(*[suite.compare(times[p[1]], times[p[0]], rounds[p[1]], rounds[p[0]])[k]
                                              for k in ("lo", "hi")]) for p in pairs}
    assert margins[("a", "b")] < margins[("c", "d")]  # c is clearly 2x d; a vs b is a 4% question
    started = __import__("time").perf_counter()
    extra = suite.sample_until_converged(runners, times, rounds, torch.device("cpu"), "fake", 60.0,
                                         suite.NullProgress(), started, pairs, max_rounds=3)
    assert extra == 3 and [len(times[n]) for n in "abcd"] == [9, 9, 6, 6]
    # an unsettled verdict comes first, ahead of a target whose verdict is settled; a settled and converged
    # ratio is not sampled at all; among the unsettled, the one with the fewest rounds
    times, rounds = _full_rounds(runners, 6)
    times["e"], rounds["e"] = list(times["a"]), list(rounds["a"])  # e = a: exactly 1.00 (settled, converged)
    runners.append(("e", _FakeRunner(clock, 1.0)))
    pairs = [("c", "d", (1.0,), True), ("a", "b", (1.0,), False), ("e", "a", (1.0,), False), ("b", "c", (1.0,), False)]
    state = {p[:2]: suite.compare(times[p[1]], times[p[0]], rounds[p[1]], rounds[p[0]]) for p in pairs}
    assert stats.decision_margin(state["c", "d"]["lo"], state["c", "d"]["hi"]) >= suite.SETTLED
    assert stats.decision_margin(state["a", "b"]["lo"], state["a", "b"]["hi"]) < suite.SETTLED
    suite.sample_until_converged(runners, times, rounds, torch.device("cpu"), "fake", 60.0, suite.NullProgress(),
                                 started, pairs, max_rounds=1)
    assert [len(times[n]) for n in "abcde"] == [7, 7, 6, 6, 6]
    suite.sample_until_converged(runners, times, rounds, torch.device("cpu"), "fake", 60.0, suite.NullProgress(),
                                 started, pairs[1:], max_rounds=3)
    # a-b (7 rounds) and b-c (6 rounds) are unsettled: b-c, then a-b (7 each: the first listed), then b-c
    assert [len(times[n]) for n in "abcde"] == [8, 10, 8, 6, 6]


def test_sampling_keeps_going_on_a_converged_ratio_whose_verdict_could_flip(monkeypatch):
    clock = _FakeClock([1.0, 1.01, 0.99, 1.005, 0.995, 1.0, 1.01])
    monkeypatch.setitem(measure.CLOCKS, "fake", clock)
    # b costs 3% more than a: an interval within +/-3% (converged) whose ends sit at the band's edge 0.97
    runners = [(n, _FakeRunner(clock, c)) for n, c in [("a", 1.0), ("b", 1.03)]]
    times, rounds = _full_rounds(runners, 6)
    c = suite.compare(times["a"], times["b"], rounds["a"], rounds["b"])
    assert c["converged"] and stats.decision_margin(c["lo"], c["hi"], stats.tie_band()) < suite.SETTLED
    started = __import__("time").perf_counter()
    extra = suite.sample_until_converged(runners, times, rounds, torch.device("cpu"), "fake", 60.0,
                                         suite.NullProgress(), started, [("b", "a", stats.tie_band(), False)],
                                         max_rounds=4)
    assert extra == 4


def test_table_pairs_cover_every_ratio_cell_once():
    rows = [_row("P-Tuning v2 (original)", "prefix", "original", [1.0]),
            _row("P-Tuning v2 (PEFT)", "prefix", "peft", [1.0]),
            _row("APT token gate (fastprefix)", "prefix", "fastprefix", [1.0]),
            _row("DePT (original)", "prompt", "original", [1.0]),
            _row("floor: backbone on S tokens", "prefix", "floor", [1.0])]
    train = suite.table_pairs(rows)
    apt, ptv2, peft, dept, floor = (r["name"] for r in (rows[2], rows[0], rows[1], rows[3], rows[4]))
    band = stats.tie_band()  # (0.97, 1.03): where a verdict turns
    assert train[:3] == [(apt, peft, band, True), (apt, ptv2, band, True),
                         (apt, floor, (*band, suite.FLOOR_TARGET * 0.97), True)]
    assert len(train) == len(set(p[:2] for p in train))  # a target that is also a cell is sampled as one pair
    assert (dept, ptv2, band, False) in train and (floor, dept, band, False) in train
    assert all(p[:2] != (ptv2, ptv2) for p in train)
    infer = suite.table_pairs(rows, "infer")
    # inference: no targets, and no 0.9 threshold against a floor
    assert all(not p[3] for p in infer) and (apt, floor, band, False) in infer
    assert all(p[:2] != (apt, peft) for p in infer)


def test_rescaling_moves_the_unit_and_keeps_the_ratios():
    f = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.15]
    rows = [_row("P-Tuning v2 (original)", "prefix", "original", [2 * x for x in f]),
            _row("APT token gate (fastprefix)", "prefix", "fastprefix", [1.6 * x for x in f])]
    suite.add_stats(rows, tokens=100)
    curves = [dict(axis="prefix_len", values=[4], rows={"a": [suite._curve_point(4, 2, 100, [0.5, 0.6, 0.7])]})]
    before = {k: rows[1]["ratios"]["train"]["P-Tuning v2 (original)"][k] for k in ("ratio", "lo", "hi")}
    tok_s = rows[1]["train_tok_s"]
    suite.rescale(rows, curves, 2.0, tokens=100)
    assert rows[1]["train_times"] == [3.2 * x for x in f] and rows[1]["train_tok_s"] == pytest.approx(tok_s / 2)
    after = rows[1]["ratios"]["train"]["P-Tuning v2 (original)"]
    assert {k: after[k] for k in before} == pytest.approx(before, rel=1e-12) and after["verdict"] == "faster"
    point = curves[0]["rows"]["a"][0]
    assert point["train_times"] == [1.0, 1.2, 1.4] and point["train_tok_s"] == pytest.approx(100 / 1.2)
    assert point["train_tok_s_iqr"] == pytest.approx([100 / 1.3, 100 / 1.1])


def test_rows_pair_on_the_rounds_both_ran():
    base, row = suite._paired([1.0, 2.0, 3.0, 4.0], [10.0, 30.0, 50.0], [0, 1, 2, 7], [0, 2, 9])
    assert (base, row) == ([1.0, 3.0], [10.0, 30.0])
    assert suite._paired([1.0, 2.0, 3.0], [4.0, 5.0]) == ([1.0, 2.0], [4.0, 5.0])  # old files: by position
    with pytest.raises(ValueError, match="round id"):
        suite._paired([1.0, 2.0], [1.0], [0], [0])


def test_sampling_without_budget_runs_no_extra_round(monkeypatch):
    clock = _FakeClock([1.0, 3.0, 0.5])
    monkeypatch.setitem(measure.CLOCKS, "fake", clock)
    runners = [(n, _FakeRunner(clock, c)) for n, c in [("a", 1.0), ("b", 2.0)]]
    times, rounds = _full_rounds(runners, 1)
    started = __import__("time").perf_counter()
    assert suite.sample_until_converged(runners, times, rounds, torch.device("cpu"), "fake", 0.0,
                                        suite.NullProgress(), started, [("a", "b", (1.0,), True)]) == 0


def test_cpu_peak_memory_counts_the_step_and_keeps_the_console_clean(capfd):
    def step():
        a = torch.ones(256, 256, dtype=torch.float64)  # 512 KiB live at once with b
        b = a * 2
        return float((a + b).sum())

    peak = measure.peak_bytes(step, torch.device("cpu"))
    assert 2 * 256 * 256 * 8 <= peak <= 4 * 256 * 256 * 8
    out, err = capfd.readouterr()
    assert "profiler_start" not in err and "profiler_stop" not in err  # torch's C++ log lines are silenced


# ---------------------------------------------------------------- compare, --help, README


def _result(batch, rows):
    return dict(settings=dict(model="m", batch=batch, seq_len=16, prefix_len=4, dtype="float32", clock="cpu",
                              threads=1),
                machine=dict(device="cpu"), rows=[dict(name=n, train_times=t, infer_times=t) for n, t in rows])


def test_compare_two_result_files(tmp_path):
    t = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02]
    a = _result(8, [("same", t), ("sped up", t), ("slowed", t), ("only in A", t)])
    b = _result(8, [("same", t), ("sped up", [x / 2 for x in t]), ("slowed", [x * 1.5 for x in t])])
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["compare", str(pa), str(pb), "--out", str(tmp_path / "c.md")])
    text = out.getvalue()
    assert text == (tmp_path / "c.md").read_text()
    lines = {line.split(" | ")[0].lstrip("| ") + "/" + line.split(" | ")[1]: line for line in text.splitlines()
             if line.startswith("| ") and "row |" not in line}
    # the runs are resampled apart (not interleaved with each other): intervals around the exact ratios; the same
    # steps resampled apart give 0.91-1.10, which straddles both edges of the tie band: undecided, not a tie
    assert re.search(r"\| 1\.00 \(0\.\d\d-1\.\d\d\) \| undecided \|$", lines["same/train"])
    assert re.search(r"\| 2\.00 \(1\.\d\d-2\.\d\d\) \| faster \|$", lines["sped up/infer"])
    assert re.search(r"\| 0\.67 \(0\.\d\d-0\.\d\d\) \| slower \|$", lines["slowed/train"])
    assert "Only in A: only in A." in text


def _table(ptv2_factor):
    f = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.15]
    rows = [_row("P-Tuning v2 (original)", "prefix", "original", [ptv2_factor * x for x in f]),
            _row("APT token gate (fastprefix)", "prefix", "fastprefix", [1.6 * x for x in f]),
            _row("floor: backbone on S tokens", "prefix", "floor", [1.6 * x for x in f])]
    return dict(settings=dict(model="m", batch=8, seq_len=16, prefix_len=4, dtype="float32", clock="cpu", threads=1),
                machine=dict(device="cpu"), rows=rows)


def test_compare_lists_the_verdicts_that_changed():
    a, b = _table(2.0), _table(1.5)  # in B, P-Tuning v2 (original) got faster than APT
    same, changed = compare.verdict_changes(_table(2.0), _table(2.0))
    assert changed == [] and same > 0
    same, changed = compare.verdict_changes(a, b)
    labels = {label: (va[0], vb[0]) for label, va, vb in changed}
    assert labels == {
        "APT token gate (fastprefix), train x P-Tuning v2 (original)": ("faster", "slower"),
        "APT token gate (fastprefix), infer x P-Tuning v2 (original)": ("faster", "slower"),
        "floor: backbone on S tokens, train x P-Tuning v2 (original)": ("faster", "slower"),
        "floor: backbone on S tokens, infer x P-Tuning v2 (original)": ("faster", "slower"),
        "P-Tuning v2 (original), train x floor: backbone on S tokens": ("slower", "faster"),
        "P-Tuning v2 (original), infer x floor: backbone on S tokens": ("slower", "faster"),
        "target: APT token gate (fastprefix) train step >= P-Tuning v2 (original)": ("met", "not met")}
    text = compare.markdown(a, b)
    assert f"{same} of {same + 7} the same; changed:" in text
    assert "- target: APT token gate (fastprefix) train step >= P-Tuning v2 (original): met 1.25 (1.25-1.25) -> " \
           "not met 0.94 (0.94-0.94)" in text


def test_compare_scales_step_times_to_throughput():
    t = [1.0, 1.0, 1.0]
    rows = compare.compare_runs(_result(8, [("r", t)]), _result(16, [("r", [2 * x for x in t])]))
    # B does twice the tokens in twice the time: the same throughput
    assert {r["kind"]: (r["ratio"], r["verdict"]) for r in rows} == {"train": (1.0, "tie"), "infer": (1.0, "tie")}
    assert compare.differences(_result(8, []), _result(16, [])) == ["batch: 8 -> 16"]


def test_compare_reads_the_gpu_suite_sections():
    t = [2.0, 2.0, 2.0]
    a = dict(attention=[dict(name="fused", group="llama S=2048", times_ms=t),
                        dict(name="broken", group="llama S=2048", error="OOM", times_ms=[])])
    b = dict(attention=[dict(name="fused", group="llama S=2048", times_ms=[1.0, 1.0, 1.0])])
    [row] = compare.compare_runs(a, b)
    assert (row["name"], row["kind"], row["ratio"], row["verdict"]) == ("attention: llama S=2048: fused", "step",
                                                                        2.0, "faster")


def test_help_and_readme_state_the_same_run_times():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    sentence = cli.run_times_sentence()
    assert sentence in _flat(out.getvalue())
    assert sentence in _flat(README.read_text().replace("`", ""))  # the README sets the commands as code
    for label, took in cli.RUN_TIMES.items():
        assert re.fullmatch(r"about \d+ (seconds|minutes?)", took), (label, took)


def test_quick_sets_defaults_that_explicit_flags_override():
    quick = cli.parse_args(["--quick", "--batch", "2"])
    assert (quick.batch, quick.seq_len, quick.budget, quick.repeats) == (2, 64, cli.QUICK["budget"], 6)
    plain = cli.parse_args([])
    assert (plain.batch, plain.budget, plain.threads, plain.clock) == (8, None, None, None)  # resolved per device
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        cli.parse_args(["--budget", "-1"])
    assert "--budget must be 0 or more seconds, got -1.0" in err.getvalue()


def test_readme_claims_match_the_committed_results():
    block = report.readme_block_of(README.read_text())
    assert block == report.readme_block(report.read_json(COMMITTED)), (
        "the README's benchmark block differs from benchmarks/results/minilm.json: run `fastprefix-bench readme`")


def test_readme_block_replacement_round_trips():
    text = f"intro\n{report.README_BEGIN}\nold\n{report.README_END}\noutro\n"
    new = report.replace_readme_block(text, "new\nlines")
    assert new == f"intro\n{report.README_BEGIN}\nnew\nlines\n{report.README_END}\noutro\n"
    assert report.readme_block_of(new) == "new\nlines"
    with pytest.raises(ValueError, match="no generated benchmark block"):
        report.replace_readme_block("no markers here", "x")


def test_readme_command_rewrites_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{report.README_BEGIN}\nstale claims\n{report.README_END}\n\n## next\n")
    with contextlib.redirect_stdout(io.StringIO()):
        cli.main(["readme", str(COMMITTED), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith(f"# title\n\n{report.README_BEGIN}\n") and text.endswith(f"{report.README_END}\n\n## next\n")
    assert report.readme_block_of(text) == report.readme_block(report.read_json(COMMITTED))


# ---------------------------------------------------------------- one tiny run, end to end


def test_tiny_run_end_to_end(tmp_path):
    model_dir = tmp_path / "tiny-bert"
    # vocabulary > 2000: the rows draw token ids from [1000, 2000)
    tiny("bert", dtype=torch.float32, vocab_size=2048).save_pretrained(model_dir)
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(["--model", str(model_dir), "--out-dir", str(tmp_path), "--tag", "t", "--batch", "2",
                      "--seq-len", "8", "--prefix-len", "4", "--repeats", "3", "--warmup", "1", "--budget", "0",
                      "--only", "APT token", "DePT (original)", "floor", "--seq-lens", "8",
                      "--prefix-lens", "2", "--curve-repeats", "3", "--no-memory", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    result = report.read_json(tmp_path / "t.json")
    names = [r["name"] for r in result["rows"]]
    assert names == ["APT token gate (fastprefix)", "DePT (original)", "ADePT (original)",
                     "floor: backbone on S tokens", "floor: backbone on S+4 tokens"]
    apt = result["rows"][0]
    assert apt["floor"] == "floor: backbone on S tokens" and len(apt["train_times"]) == 3
    assert apt["train_rounds"] == apt["infer_rounds"] == [0, 1, 2]
    assert set(apt["train"]) == {"median", "q1", "q3", "min", "max", "n"}
    assert result["settings"]["clock"] == "metronome" and result["settings"]["threads"] == 1
    # the tiny BERT's 2 blocks x 3 sub-layers tick after each forward and, in training, in the backward too
    metronome = result["settings"]["metronome"]
    assert 6 < metronome["ticks_per_step"] < 12 and 0 < metronome["tick_share"] < 1
    assert result["machine"]["cpu_count"] >= 1 and len(result["machine"]["load_average_end"]) == 3
    assert result["machine"]["other_cpus"] >= 0 and result["machine"]["other_cpus_before"] >= 0
    assert result["sampling"]["extra_rounds"] == result["sampling"]["infer_extra_rounds"] == 0
    assert result["settings"]["fastprefix_path"] == "reference (PyTorch)"
    # the curves keep the rows --only kept among theirs
    for curve in result["curves"]:
        assert set(curve["rows"]) == {"APT token gate (fastprefix)", "DePT (original)", "floor: backbone on S tokens",
                                      "floor: backbone on S+L tokens"}
    for curve in result["curves"]:
        for points in curve["rows"].values():
            assert all(len(p["train_times"]) == 3 and p["train_tok_s_iqr"][0] <= p["train_tok_s"]
                       <= p["train_tok_s_iqr"][1] for p in points)
    md = (tmp_path / "t.md").read_text()
    assert apt["ratios"]["train"]["floor"]["text"] in md
    assert (tmp_path / "t.png").stat().st_size > 0


# ---------------------------------------------------------------- how busy the machine was


def test_other_cpus_subtracts_this_process():
    # 3 s of machine-wide busy time over 2 s of wall clock, 1 s of it this process's own: 1 other CPU
    assert report.other_cpus((10.0, 5.0, 100.0), (13.0, 6.0, 102.0)) == 1.0
    assert report.other_cpus((10.0, 5.0, 100.0), (10.5, 6.0, 102.0)) == 0.0  # counter granularity: never negative
    assert report.other_cpus(None, (1.0, 1.0, 1.0)) is None


@pytest.mark.parametrize("measured, warns", [((0.1, 0.2), False), ((0.1, 1.4), True), ((1.5, 0.0), True)],
                         ids=["quiet", "busy-during", "busy-before"])
def test_busy_prefers_the_cpu_counters_to_the_load_average(measured, warns):
    # a load average of 1.4 on 2 CPUs with one CPU idle is what a VM's kernel threads can show: not busy
    m = dict(cpu_count=2, torch_threads=1, load_average=[1.4, 1.2, 1.1], load_average_end=[2.4, 1.5, 1.2],
             other_cpus_before=measured[0], other_cpus=measured[1])
    assert bool(report.busy(m)) is warns


def test_busy_falls_back_to_the_load_average_for_older_files():
    m = dict(cpu_count=2, torch_threads=1, load_average=[1.4, 1.2, 1.1], load_average_end=[1.0, 1.0, 1.0])
    assert "load average 1.40/1.20/1.10" in report.busy(m)
