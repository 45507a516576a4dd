"""fastprefix-bench adapters: one batch over A adapters in one call against A calls, on a tiny decoder."""

import pytest

from fastprefix.benchmarks import __main__ as cli


@pytest.mark.parametrize("method,label", [("ptv2", "P-Tuning v2"), ("adept", "ADePT")])
def test_a_small_run_writes_its_table(method, label, tmp_path, capsys):
    out = tmp_path / "adapters.md"
    cli.main(["adapters", "--model", "llama-tiny", "--batch", "4", "--seq-len", "8", "--prefix-len", "3",
              "--adapters", "1", "2", "4", "--rounds", "1", "--device", "cpu", "--method", method, "--out", str(out)])
    text = out.read_text()
    assert f"{label} adapters of length 3" in text
    assert text in capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2", "4"]
    assert all(len(r.split("|")) == 11 for r in rows)


@pytest.mark.parametrize("argv,match", [
    (["--adapters", "0"], "--adapters must each be between 1 and the batch"),
    (["--adapters", "32"], "--adapters must each be between 1 and the batch"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--model", "nope"], "nope"),
    (["--method", "lora"], "invalid choice: 'lora'"),
])
def test_mistakes_are_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["adapters", "--batch", "16", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
