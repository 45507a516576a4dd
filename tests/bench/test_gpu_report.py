"""The GPU suite's report on a machine whose Python has no matplotlib: Markdown and JSON, a note, no failure."""

import sys

from fastprefix.benchmarks import gpu_report


def test_write_without_matplotlib_keeps_the_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    settings = dict(dtype="bfloat16", warmup=1, repeats=2, e2e_warmup=1, e2e_repeats=2, clock="cuda events")
    result = {"versions": {"gpu": "test"}, "settings": settings, "attention": [], "e2e": [], "embedding": [],
              "date": "today", "wall_seconds": 1.0}
    gpu_report.write(result, tmp_path, "gpu", png=True)
    assert (tmp_path / "gpu.md").is_file() and (tmp_path / "gpu.json").is_file()
    assert not (tmp_path / "gpu.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err
