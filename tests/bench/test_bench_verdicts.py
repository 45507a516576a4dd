"""Verdicts that can't be misread: "tie" only for an interval wholly inside the 0.97-1.03 band, "undecided" for one
that straddles an edge of it (or has none), everywhere a verdict is stated: :func:`stats.verdict`, the sampling's
notion of a settled verdict, the targets, ``compare``, the report's table and claims, the README's block (re-read
from the committed JSON), and a ``--quick`` run's cells ("undecided (too short)"). The table, JSON and PNG say which
fastprefix path ran; the PNG has a title and legends.
"""

import copy
import math
import time
from pathlib import Path

import matplotlib.axes
import matplotlib.figure
import pytest
import torch

from fastprefix.benchmarks import compare, measure, report, stats, suite

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
COMMITTED = ROOT / "benchmarks" / "results" / "minilm.json"
INF = float("inf")


@pytest.mark.parametrize("lo, hi, word", [
    (0.79, 1.04, "undecided"),   # the "1.00 (0.79-1.04) tie": it straddles both edges
    (0.98, 1.02, "tie"),         # wholly inside the band
    (1.04, 1.10, "faster"),      # wholly above it
    (0.90, 0.96, "slower"),      # wholly below it
    (0.97, 1.03, "tie"),         # the band's own ends count as inside
    (1.0, 1.0, "tie"),           # no spread at 1.00 (identical steps)
    (1.01, 1.05, "undecided"),   # reaches past 1.03
    (0.96, 0.99, "undecided"),   # reaches below 0.97
    (1.03, 1.08, "undecided"),   # starts on the edge: not wholly beyond it
    (0.0, INF, "undecided"),     # no interval (one step, fewer than 6 rounds): the "19.87 tie"
], ids=["straddles-both", "inside", "above", "below", "band-ends", "exact-1", "straddles-top", "straddles-bottom",
        "on-the-edge", "no-interval"])
def test_verdict_table(lo, hi, word):
    assert stats.verdict(lo, hi) == word


def test_no_interval_reads_no_interval():
    ratio, lo, hi = stats.ratio_interval([19.87], [1.0])
    assert stats.format_ratio(ratio, lo, hi) == "19.87 (no interval)"
    assert stats.speedup([19.87], [1.0])["verdict"] == "undecided"


def test_a_straddling_interval_is_never_settled():
    # centred on the band's edge 0.97: the old margin was exactly 1 (settled, so never sampled again); undecided now
    assert stats.decision_margin(0.94, 1.00, stats.tie_band()) == 0.0
    assert stats.decision_margin(0.98, 1.02, stats.tie_band()) == pytest.approx(0.5)  # a tie, near an edge
    assert stats.decision_margin(1.04, 1.06, stats.tie_band()) == pytest.approx(1.0)  # faster, an edge 0.01 away


class _Runner:
    def train_step(self):
        pass


def test_sampling_keeps_sampling_an_undecided_ratio(monkeypatch):
    # a converged interval centred on 0.97: before, its margin of 1 counted as settled and no round ran
    def fixed(*args, **kwargs):
        return dict(ratio=0.97, lo=0.955, hi=0.985, n=10, converged=True, verdict="undecided")

    monkeypatch.setattr(suite, "compare", fixed)
    monkeypatch.setitem(measure.CLOCKS, "fake", lambda: 0.0)
    times, rounds = {"a": [1.0] * 10, "b": [1.0] * 10}, {"a": list(range(10)), "b": list(range(10))}
    runners = [("a", _Runner()), ("b", _Runner())]
    extra = suite.sample_until_converged(runners, times, rounds, torch.device("cpu"), "fake", 60.0,
                                        suite.NullProgress(), time.perf_counter(), [("a", "b", stats.tie_band(), False)],
                                        max_rounds=3)
    assert extra == 3


def test_target_statuses_follow_the_same_reading():
    edge = stats.target_edge(1.0)
    assert stats.meets(edge - 0.02, edge + 0.02, 1.0) == "undecided"  # straddles the target's edge
    assert stats.meets(edge, 1.05, 1.0) == "met" and stats.meets(0.90, edge - 0.001, 1.0) == "not met"
    assert stats.meets(0.0, INF, 1.0) == "undecided"


def _cell(lo, hi, ratio=None, n=10):
    ratio = (lo + hi) / 2 if ratio is None else ratio
    return dict(ratio=ratio, lo=lo, hi=hi, n=n, converged=False, verdict="tie", text="stale")


def _result(quick=False):
    """A two-row table whose ratio cells carry the issue's intervals and a stale "tie" written by the old rule."""
    rows = [dict(name="P-Tuning v2 (original)", family="prefix", impl="original", trainable_params=1,
                 train_tok_s=100.0, infer_tok_s=200.0, ratios={}),
            dict(name="APT token gate (fastprefix)", family="prefix", impl="fastprefix", trainable_params=2,
                 train_tok_s=100.0, infer_tok_s=200.0, floor=None,
                 ratios=dict(train={"P-Tuning v2 (original)": _cell(0.79, 1.04, 1.00)},
                             infer={"P-Tuning v2 (original)": _cell(0.98, 1.02)}))]
    target = dict(what="APT token gate (fastprefix) train step >= P-Tuning v2 (original)",
                  row="APT token gate (fastprefix)", base="P-Tuning v2 (original)", threshold=1.0, headline=True,
                  status="met", **_cell(0.79, 1.04, 1.00))
    settings = dict(model="minilm", backbone_params=1e6, batch=8, seq_len=128, prefix_len=32, dtype="float32",
                    warmup=2, repeats=7, clock="metronome", threads=1, quick=quick,
                    fastprefix_path="reference (PyTorch)")
    machine = dict(cpu="Some CPU", cpu_count=2, torch_threads=1, device="cpu",
                   versions=dict(torch="t", transformers="tf", peft="p", triton="tr"))
    return dict(rows=rows, targets=[target], settings=settings, machine=machine)


def test_the_table_and_claims_read_by_the_new_rule():
    result = report.reread(_result())
    table = report.main_table(result)
    assert "1.00 (0.79-1.04) undecided |" in table and "1.00 (0.98-1.02) tie |" in table
    assert " tie | " not in table.replace("1.00 (0.98-1.02) tie | ", "")
    [target] = result["targets"]
    assert (target["verdict"], target["status"]) == ("undecided", "undecided")
    claim = report.verdicts(result)
    assert "undecided, × 1.00 (0.79-1.04) straddles an edge of the 0.97-1.03 tie band" in claim
    assert " ties " not in claim
    assert report.verdict_counts(result) == dict(faster=0, slower=0, tie=1, undecided=1)


def test_a_quick_run_says_its_cells_were_too_short():
    result = report.reread(_result(quick=True))
    table = report.main_table(result)
    assert "1.00 (0.79-1.04) undecided (too short) |" in table and "1.00 (0.98-1.02) tie |" in table
    assert "undecided (too short)" in report.settings_sentence(result)
    # without --quick, a cell with no interval (under 6 rounds) is too short as well
    c = dict(_cell(0.0, INF, 2.0, n=3), verdict="undecided")
    assert report.verdict_label(c, {}) == "undecided (too short)"


def test_the_path_is_stated_in_the_table_json_and_png(monkeypatch, tmp_path):
    result = report.reread(_result())
    assert "fastprefix path: **reference (PyTorch)**" in report.settings_sentence(result)
    old = copy.deepcopy(result)
    del old["settings"]["fastprefix_path"]  # files from before the field: read off the device
    assert report.fastprefix_path(old) == "reference (PyTorch)"
    old["machine"].update(device="cuda:0", gpu="NVIDIA H100")
    assert report.fastprefix_path(old) == "Triton"
    title = report.chart_title(result)
    for part in ("minilm", "Some CPU", "float32", "reference (PyTorch)"):
        assert part in title
    legends, titles = [], []
    real_legend, real_suptitle = matplotlib.axes.Axes.legend, matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.axes.Axes, "legend", lambda self, *a, **k: legends.append(
        real_legend(self, *a, **k)))
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **k: titles.append(t) or
                        real_suptitle(self, t, **k))
    curve = dict(axis="prefix_len", values=[4, 8], rows={"P-Tuning v2 (original)": [
        dict(value=4, train_tok_s=10.0), dict(value=8, train_tok_s=9.0)]})
    assert report.chart(dict(result, curves=[curve]), tmp_path / "c.png") == title
    assert titles == [title] and len(legends) == 2  # the bars' legend and the curve's
    assert [t.get_text() for t in legends[0].get_texts()] == ["the method's original code", "fastprefix"]


def test_the_committed_results_read_by_the_new_rule():
    raw = report.read_json(COMMITTED)
    result = report.ensure_stats(report.read_json(COMMITTED))
    assert raw["rows"] == result["rows"]  # the committed JSON's verdicts are the current rule's
    block = report.readme_block(result)
    for name, kind, base, c in report.ratio_cells(result):
        lo, hi = c["lo"], c["hi"]
        word = "tie" if 0.97 <= lo and hi <= 1.03 else "faster" if lo > 1.03 else "slower" if hi < 0.97 else \
            "undecided"
        assert c["verdict"] == word, (name, kind, base, c["text"])
        if base in ("P-Tuning v2 (original)", "DePT (original)", "floor") and kind in ("train", "infer"):
            assert f"{c['text']} {word} |" in block, (name, kind, base)
    assert report.readme_block_of(README.read_text()) == block


def test_compare_reads_the_new_rule():
    t = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02]
    a = dict(settings=dict(model="m", batch=8, seq_len=16), rows=[dict(name="same", train_times=t)])
    [row] = compare.compare_runs(a, copy.deepcopy(a))
    assert row["lo"] < 0.97 and row["hi"] > 1.03 and row["verdict"] == "undecided"
    assert "undecided" in stats.TIE_RULE and "straddles" in compare.markdown(a, a)
    assert math.isclose(row["ratio"], 1.0)
