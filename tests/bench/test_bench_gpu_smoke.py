"""``fastprefix-bench --suite gpu --smoke``: every code path of the GPU suite on CPU, so it can't rot between
GPU sessions. Tiny shapes, the kernels in Triton's interpreter; the run must write no result file and every
row must either run or say why it was skipped (never an error).
"""

import pytest

from fastprefix.benchmarks import __main__ as cli
from fastprefix.benchmarks import contenders as C
from fastprefix.benchmarks import gpu, gpu_report

# the only reasons a smoke row may skip: what a CPU-only machine lacks
ALLOWED_SKIPS = ("flash_attn is not installed", "a padded batch needs flash_attn's varlen API",
                 "FlexAttention has no backward on CPU", "the split path does not cover this call")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-results")
    results_before = sorted(p.name for p in cli.DEFAULT_RESULTS.iterdir())
    captured = {}
    run = gpu.run

    def spy(args, out_dir):
        captured["result"] = run(args, out_dir)
        return captured["result"]

    mp = pytest.MonkeyPatch()
    mp.setattr(gpu, "run", spy)
    try:
        cli.main(["--suite", "gpu", "--smoke", "--out-dir", str(out)])
    finally:
        mp.undo()
    return captured["result"], out, results_before


def _check_row(r, section):
    assert "error" not in r, f"{section}: {r.get('contender') or r.get('name')}: {r['error']}"
    if "skipped" in r:
        assert any(why in r["skipped"] for why in ALLOWED_SKIPS), r["skipped"]
    else:
        s = r["summary"]
        assert s["n"] >= 1 and 0 < s["min"] <= s["median"] <= s["max"], s


def test_writes_no_files(smoke):
    result, out, results_before = smoke
    assert result["smoke"] is True
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in cli.DEFAULT_RESULTS.iterdir()) == results_before


def test_attention_rows(smoke):
    result, _, _ = smoke
    rows = result["attention"]
    plan = gpu.smoke_plan()
    assert {r["shape"] for r in rows} == {s.id for s in plan.attention}
    for s in plan.attention:
        mine = [r for r in rows if r["shape"] == s.id]
        names = {r["contender"] for r in mine}
        for path in ("fused", "split"):
            for gate in ("no gate", "pooled gate", "token gate (fused)"):
                assert f"fastprefix {path}, {gate}" in names
        assert {"SDPA on cat([prefix; K]) (as PEFT)", "flash_attn on cat([prefix; K])",
                "floor: SDPA over the S real keys"} <= names
        assert ("FlexAttention on cat([prefix; K]), block mask" in names) == s.flex
        for r in mine:
            _check_row(r, "attention")
        # the fused kernel always runs; every timed row but the floor has its ratio to the floor
        for r in mine:
            if r["contender"].startswith("fastprefix fused"):
                assert "summary" in r and r["tflops"] > 0 and "floor" in r["vs"], r
    flex = [r for r in rows if r["contender"].startswith("FlexAttention") and r["mode"] == "forward"]
    assert flex and all("summary" in r for r in flex)


def test_embedding_rows(smoke):
    result, _, _ = smoke
    rows = result["embedding"]
    assert len(rows) == 8  # ADePT, DePT x Triton, torch x forward, forward+backward
    for r in rows:
        _check_row(r, "embedding")
        assert "summary" in r
        if r["backend"] == "triton":
            assert "torch ops" in r["vs"]


def test_end_to_end_rows(smoke):
    result, _, _ = smoke
    rows = result["e2e"]
    for label, kind, S, batch in gpu.smoke_plan().e2e:
        group = f"{label} S{S} B{batch}"
        mine = [r for r in rows if r["group"] == group]
        setting = C.Setting(batch=batch, seq_len=S, prefix_len=gpu.smoke_plan().prefix_len)
        expected = [name for name, _ in C.build_all(None, None, setting)]  # names only: nothing is built
        assert [r["name"] for r in mine] == expected
        for r in mine:
            _check_row(r, "e2e")
            assert r["tokens_per_s"] > 0
            if r.get("impl") != "floor":
                assert "floor" in r["vs"], r["name"]


def test_many_adapters_rows(smoke):
    """One row per adapter count, each with both ways' speeds and peak memory (the outputs were checked equal)."""
    result, _, _ = smoke
    _, _, _, _, counts, _ = gpu.smoke_plan().adapters
    rows = result["adapters"]
    assert [r.get("A") for r in rows] == list(counts), rows
    for r in rows:
        assert r["train_one"][0] > 0 and r["infer_separate"][0] > 0 and r["peak_one"] > 0 and r["train_ratio"] > 0


def test_report_renders(smoke):
    result, _, _ = smoke
    text = gpu_report.markdown(result)
    for heading in ("## Attention", "## Embedding kernels", "## End to end", "## Many adapters"):
        assert heading in text
