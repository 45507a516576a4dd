"""The README as a new user reads it: every ```python block runs as written (in a fresh interpreter, from an empty
folder), and its claims hold: the counts of `print_trainable_parameters` against PEFT's, and the benchmark numbers
its opening quotes against the committed run."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TEXT = README.read_text()
# blocks inside a list item are indented with it: dedented, they run as written
BLOCKS = [textwrap.dedent(code) for code in re.findall(r"```python\n(.*?)```", TEXT, re.S)]
# one intra-op thread: tiny models gain nothing from more, and on a shared machine threads waiting for each other
# cost several times the CPU time (the MiniLM example took 46 s of CPU with two threads, 5 s with one)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_readme_has_examples():
    assert len(BLOCKS) >= 6
    assert "```py\n" not in TEXT, "a ```py block is not run by this test: make it a complete ```python block"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, tmp_path):
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=ENV)
    assert done.returncode == 0, done.stderr[-4000:]


def _flat(text):
    return " ".join(text.split())


def test_trainable_parameter_counts_against_peft():
    """PEFT's task types keep the head trainable as a ModulesToSaveWrapper holding the original head and a
    trainable copy, so PEFT's "all params" counts the head twice; fastprefix counts every parameter once. The
    trainable counts are the same. The README states this with these numbers."""
    import peft
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import fastprefix

    def bert():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=64, num_labels=2))

    base = sum(p.numel() for p in bert().parameters())
    head = sum(p.numel() for p in bert().classifier.parameters())
    pairs = {  # fastprefix's method and PEFT's, on the same model, with the task head left at each one's default
        "prefix": (fastprefix.PTuningV2Config(num_virtual_tokens=8),
                   peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=8)),
        "prompt": (fastprefix.PromptTuningConfig(num_virtual_tokens=8),
                   peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=8)),
    }
    counts = {}
    for name, (ours, theirs) in pairs.items():
        model = fastprefix.apply(bert(), ours)
        trainable, total = fastprefix.trainable_parameters(model)
        peft_trainable, peft_total = peft.get_peft_model(bert(), theirs).get_nb_trainable_parameters()
        method = sum(p.numel() for p in model.fastprefix.parameters())
        assert trainable == peft_trainable == method + head, name  # the method's module and the head, both
        assert total == base + method, name  # every parameter once
        assert peft_total == total + head, name  # PEFT: the head's original and its trainable copy
        counts[name] = (trainable, peft_total, total, head)
    # the README's example is the prefix pair
    trainable, peft_total, total, head = counts["prefix"]
    claim = (f"{trainable:,} trainable for both, all params {peft_total:,} in PEFT and {total:,} here, the {head} of "
             "the classifier less")
    assert claim in _flat(TEXT), f"the README's print_trainable_parameters paragraph should say: {claim}"
    assert "PEFT counts a task head twice in all params" in _flat(TEXT)


def test_opening_quotes_the_committed_run():
    """The opening's CPU ratios are the committed run's training-step cells (benchmarks/results/minilm.json):
    after `make bench-publish` of a new run, update the opening's numbers."""
    result = json.loads((ROOT / "benchmarks" / "results" / "minilm.json").read_text())
    cells = {(r["name"], base): c["text"] for r in result["rows"] for base, c in r["ratios"]["train"].items()}
    opening = _flat(TEXT.split("\n## ", 1)[0])
    quoted = [  # (row, against): in the order the opening quotes them
        ("P-Tuning v2 (fastprefix)", "P-Tuning v2 (original)"),
        ("P-Tuning v2 (PEFT)", "P-Tuning v2 (original)"),
        ("DePT (fastprefix)", "DePT (original)"),
        ("ADePT (fastprefix)", "DePT (original)"),
        ("ADePT (original)", "DePT (original)"),
        ("APT pooled gate (fastprefix)", "P-Tuning v2 (original)"),
        ("APT token gate (fastprefix)", "P-Tuning v2 (original)"),
    ]
    at = 0
    for row, base in quoted:
        text = cells[(row, base)]
        found = opening.find(text, at)
        assert found >= 0, f"the opening should quote {row} against {base} as {text}"
        at = found + len(text)
    # the CPU runs are minilm*.md (the main one, the adapters one); a GPU run is <gpu>.md
    assert not any(not p.name.startswith("minilm") and p.suffix == ".md"
                   for p in (ROOT / "benchmarks" / "results").iterdir()), (
        "a GPU run is committed: the opening still says none has been published")
