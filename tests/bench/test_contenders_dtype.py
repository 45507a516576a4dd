"""Every benchmark row builds and trains in float32 and in bfloat16 (the CUDA default).

A row that raises in one dtype aborts the whole table on a GPU (issue 17, item 9: "ADePT (original)" once did
``x @ A`` with x bf16 and A fp32). Tiny randomly initialised backbones on CPU, one encoder and one decoder
(P-Tuning v2's ``past_key_values`` path differs between them); each row takes one training and one
inference step through the benchmark's own :class:`Runner`.
"""

import math

import pytest
import torch

from fastprefix.benchmarks import backbones, measure, suite
from fastprefix.benchmarks import contenders as C
from helpers.models import tiny

CPU = torch.device("cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tiny_backbone(kind, dtype):
    """A frozen 2-layer base model (BERT without dropout; Llama: GQA, 4 query heads on 2 key/value heads, its
    config's default special tokens), in training mode; vocabulary > 2000 because the rows draw token ids from
    [1000, 2000)."""
    if kind == "bert":
        model = tiny("bert", dtype=dtype, dropout=0.0, vocab_size=2048)
    else:
        model = tiny("llama", head="base", dtype=dtype, vocab_size=2048, pad_token_id=None, eos_token_id=2)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_every_row_steps(kind, dtype):
    backbone = tiny_backbone(kind, dtype)
    shapes = backbones.describe(backbone)
    setting = C.Setting(batch=2, seq_len=8, prefix_len=3, adept_rank=4)
    batch = suite.make_batch(setting, shapes["vocab_size"])
    rows = C.build_all(backbone, shapes, setting)
    assert len(rows) >= 11, [name for name, _ in rows]
    failures = {}
    for name, make in rows:
        try:
            torch.manual_seed(0)
            runner = measure.Runner(C.move(make(), CPU), batch, CPU)
            loss = runner.train_step()
            assert math.isfinite(loss.item()), f"loss {loss.item()}"
            for p in runner.c.trainable():
                # the trainable state stays fp32 (master weights) whatever the backbone's dtype
                assert p.dtype == torch.float32, f"a trainable parameter is {p.dtype}"
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"parameter {list(p.shape)}: no grad"
            runner.c.train(False)
            with torch.inference_mode():
                hidden = runner.c.forward(runner.ids, runner.mask)
            assert hidden.shape == (setting.batch, setting.seq_len, shapes["hidden_size"]), list(hidden.shape)
            assert hidden.dtype == dtype, f"hidden states are {hidden.dtype}, the backbone is {dtype}"
            assert torch.isfinite(hidden).all(), "non-finite hidden states"
        except Exception as e:  # collect every row's failure, not just the first
            failures[name] = f"{type(e).__name__}: {e}"
    assert not failures, failures
