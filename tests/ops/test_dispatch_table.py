"""The automatic path rule: shape classes, the measured dispatch table a GPU run writes and the rule reads for the
running GPU's compute capability, the cost model it falls back to (and docs/design.md's tables of it), and which
source the rule says it used (``fastprefix.ops.attention_route``).

CUDA calls are routed on fake CUDA tensors (FakeTensorMode) with the compute capability patched; a padded batch's
varlen plan (built on the host from the mask's values) is built from the real mask first.
"""

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastprefix
from fastprefix.kernels.attention import concat, costs, dispatch, split, table, varlen, vendor
from fastprefix.spec import AttentionSpec
from helpers.numerics import fake_cuda_plan

DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"


@pytest.fixture
def no_table(monkeypatch, tmp_path):
    """An empty table folder: the rule falls back to the cost model."""
    monkeypatch.setattr(table, "TABLE_DIR", tmp_path)
    table.clear_cache()
    yield tmp_path
    table.clear_cache()


@pytest.fixture
def on_a100(monkeypatch):
    monkeypatch.setattr(dispatch, "arch_of", lambda t: 80 if t.device.type == "cuda" else None)
    monkeypatch.setattr(dispatch, "all_real", lambda mask: False)  # the fake masks hold padding


def fake_call(dtype=torch.float16, B=2, H=4, Hkv=2, Sq=8, Sk=8, L=4, D=64, gate=None):
    q = torch.empty(B, H, Sq, D, dtype=dtype, device="cuda")
    k = torch.empty(B, Hkv, Sk, D, dtype=dtype, device="cuda")
    pk = torch.empty(Hkv, L, D, dtype=dtype, device="cuda")
    g = None
    if gate == "row":
        g = torch.empty(B, 1, L, dtype=dtype, device="cuda")
    elif gate == "token":
        g = torch.empty(B, Sq, L, dtype=dtype, device="cuda")
    return q, k, pk, g


def route(q, k, path="auto", prefix_k=None, **kwargs):
    return dispatch.route(q, k, AttentionSpec.build(q, k, **kwargs), path, prefix_k=prefix_k)


# ------------------------------------------------------------------------------------------- the cost model


@pytest.mark.parametrize("gate, with_prefix, expected", [
    (None, True, "concat"), ("row", True, "concat"), ("token", True, "split"), (None, False, "split"),
], ids=["none", "row", "token", "prefix-unknown"])
def test_dense_calls_take_the_model_pick_and_say_so(gate, with_prefix, expected, no_table, on_a100):
    with FakeTensorMode():
        q, k, pk, g = fake_call(gate=gate)
        chosen = route(q, k, prefix_k=pk if with_prefix else None, gate=g, causal=True)
        assert (chosen.path, chosen.source) == (expected, "model")
        assert chosen.op == vendor.FLASH


@pytest.mark.parametrize("features, expected", [
    (dict(dtype=torch.float32), ("fused", "rule")),
    (dict(softcap=30.0), ("fused", "rule")),
    (dict(attn_bias=True), ("fused", "rule")),   # only the memory-efficient op serves it: unmeasured, forced only
], ids=["fp32", "softcap", "bias"])
def test_hard_rules_keep_the_fused_kernel(features, expected, no_table, on_a100):
    with FakeTensorMode():
        q, k, pk, _ = fake_call(dtype=features.pop("dtype", torch.float16))
        if features.pop("attn_bias", False):
            features["attn_bias"] = torch.empty(1, 4, 8, 8, dtype=q.dtype, device="cuda")
        chosen = route(q, k, prefix_k=pk, causal=True, **features)
        assert (chosen.path, chosen.source) == expected


def host_plans(monkeypatch, mask, Sq, L):
    """Route fake CUDA calls with the plans of the real ``mask`` (their tensors as fake CUDA tensors)."""
    plans = {0: varlen.padded_plan(mask, True, Sq), L: varlen.padded_plan(mask, True, Sq, L)}
    monkeypatch.setattr(split, "split_plan", lambda q, k, spec: fake_cuda_plan(plans[0]))
    monkeypatch.setattr(concat, "concat_plan", lambda q, k, spec, L_: fake_cuda_plan(plans[L_]))


@pytest.mark.parametrize("kind, Hkv, gate, expected", [
    ("right", 2, None, ("concat", vendor.FLASH_VARLEN)),    # GQA: concat 1.38x < fused 1.49x < split 1.64x
    ("right", 4, None, ("fused", None)),                    # MHA: fused 1.49x < concat 1.61x < split 1.91x
    ("right", 2, "token", ("fused", None)),                 # no concat: fused 1.49x < split 1.64x
    ("left", 2, "token", ("fused", None)),
    ("holes", 2, None, ("fused", None)),                    # no exact plan for either varlen path
], ids=["right-gqa", "right-mha", "right-token", "left-token", "holes"])
def test_padded_causal_calls_by_the_model(kind, Hkv, gate, expected, monkeypatch, no_table, on_a100):
    mask = torch.ones(2, 8, dtype=torch.bool)
    if kind == "right":
        mask[0, 5:] = False
    elif kind == "left":
        mask[0, :5] = False
    else:
        mask[0, 2] = False
    host_plans(monkeypatch, mask, 8, 4)
    with FakeTensorMode():
        q, k, pk, g = fake_call(Hkv=Hkv, gate=gate)
        chosen = route(q, k, prefix_k=pk, gate=g, causal=True,
                       key_padding_mask=torch.empty(2, 8, dtype=torch.bool, device="cuda"))
        assert (chosen.path, chosen.op) == expected
        assert chosen.source == ("model" if kind != "holes" else "rule")
        forced = route(q, k, "split", prefix_k=pk, gate=g, causal=True,
                       key_padding_mask=torch.empty(2, 8, dtype=torch.bool, device="cuda"))
        assert (forced.path, forced.source) == (("fused" if kind == "holes" else "split"), "forced")


def test_padded_non_causal_and_packed_calls_by_the_model(monkeypatch, no_table, on_a100):
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 3:] = False
    plans = {0: varlen.padded_plan(mask, False, 8), 4: varlen.padded_plan(mask, False, 8, 4)}
    monkeypatch.setattr(split, "split_plan", lambda q, k, spec: plans[0])  # host plans: not launched here
    monkeypatch.setattr(concat, "concat_plan", lambda q, k, spec, L: plans[L])
    with FakeTensorMode():
        q, k, pk, g = fake_call(gate="token")
        padded = dict(key_padding_mask=torch.empty(2, 8, dtype=torch.bool, device="cuda"))
        assert route(q, k, prefix_k=pk, **padded).path == "concat"
        assert route(q, k, prefix_k=pk, gate=g, **padded)[:2] == ("split", vendor.FLASH_VARLEN)
        q1, k1, pk1, g1 = fake_call(B=1, gate="token")
        packed = dict(cu_seqlens=torch.empty(3, dtype=torch.int32, device="cuda"), causal=True)
        assert route(q1, k1, prefix_k=pk1, **packed).path == "concat"
        assert route(q1, k1, prefix_k=pk1, gate=g1, **packed)[:2] == ("split", vendor.FLASH_VARLEN)


def test_model_picks_follow_the_cost_model():
    for key, shape_kw in (("bf16/full/dense/gate-none/D128/gqa", {}),
                          ("bf16/causal/padded/gate-token/D64/mha", dict(causal=True, layout="padded", Hkv=32, D=64))):
        cls = table.ShapeClass.of_key(key)
        assert cls.key == key and table.model_shape(cls) == costs.Shape(**shape_kw)
    shape = costs.Shape(causal=True, layout="padded")
    times = {p: sum(costs.seconds(p, shape)) for p in costs.PATHS}
    assert costs.pick(shape, ("fused", "split", "concat")) == min(("fused", "split", "concat"), key=times.get)
    assert costs.pick(shape, ("split",)) == "split"


def test_design_doc_tables_are_the_cost_model():
    """Every table under a ``<!-- costs.Shape(...) -->`` marker in docs/design.md equals ``costs.rows`` rounded."""
    text = DESIGN.read_text()
    found = re.findall(r"<!-- costs\.Shape\((.*?)\) -->\n\|[^\n]*\n\|[^\n]*\n((?:\|[^\n]*\n)+)", text)
    assert len(found) >= 7
    for args, body in found:
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in ast.parse(f"f({args})").body[0].value.keywords}
        lines = [[c.strip() for c in line.strip("|").split("|")] for line in body.strip().splitlines()]
        for (path, ff, fb, bf, bb, ratio), cells in zip(costs.rows(costs.Shape(**kwargs)), lines):
            assert cells[0].startswith(("floor", "fused", "split", "concat")) and path in cells[0], (kwargs, cells)
            assert cells[1:] == [f"{ff:.0f}", f"{fb:.2f}", f"{bf:.0f}", f"{bb:.2f}", f"{ratio:.2f}"], (kwargs, cells)


# ------------------------------------------------------------------------------------------- the table


def write_table(directory, arch, classes, name="gpu", date="2026-12-06 10:00 UTC"):
    blob = dict(gpu=name, capability=f"{arch // 10}.{arch % 10}", arch=arch, date=date, versions={},
                mode=table.MODE, classes=classes)
    (directory / f"{name}{table.SUFFIX}").write_text(json.dumps(blob))
    table.clear_cache()


KEY = "fp16/causal/dense/gate-none/D64/gqa"  # the class of fake_call(causal=True) without a gate


def test_the_measured_table_decides_where_it_covers_the_class(no_table, on_a100):
    write_table(no_table, 80, {KEY: dict(path="fused", relative=dict(fused=1.0, concat=1.04, split=1.2),
                                         shapes=["s"])})
    with FakeTensorMode():
        q, k, pk, g = fake_call()
        assert route(q, k, prefix_k=pk, causal=True)[::3] == ("fused", "table")
        # the table's best among the call's candidates: without the prefix, concat is none of them
        assert route(q, k, causal=True)[::3] == ("fused", "table")
        # a class the table does not hold: the model
        q2, k2, pk2, g2 = fake_call(gate="token")
        assert route(q2, k2, prefix_k=pk2, gate=g2, causal=True)[::3] == ("split", "model")
        # requested paths are not the table's business
        assert route(q, k, "concat", prefix_k=pk, causal=True)[::3] == ("concat", "forced")


def test_only_the_running_architectures_table_counts(no_table, monkeypatch):
    write_table(no_table, 90, {KEY: dict(path="fused", relative=dict(fused=1.0, split=1.5), shapes=["s"])})
    monkeypatch.setattr(dispatch, "arch_of", lambda t: 80)
    with FakeTensorMode():
        q, k, pk, _ = fake_call()
        assert route(q, k, prefix_k=pk, causal=True)[::3] == ("concat", "model")
    monkeypatch.setattr(dispatch, "arch_of", lambda t: 90)
    with FakeTensorMode():
        q, k, pk, _ = fake_call()
        assert route(q, k, prefix_k=pk, causal=True)[::3] == ("fused", "table")


def test_the_newest_table_of_an_architecture_wins(no_table):
    old = {KEY: dict(path="split", relative=dict(split=1.0), shapes=["s"])}
    new = {KEY: dict(path="fused", relative=dict(fused=1.0), shapes=["s"])}
    write_table(no_table, 80, old, name="a100-40gb", date="2026-12-01 10:00 UTC")
    write_table(no_table, 80, new, name="a100-80gb", date="2026-12-05 10:00 UTC")
    (no_table / f"broken{table.SUFFIX}").write_text("{not json")
    table.clear_cache()
    assert table.ranking(80, table.ShapeClass.of_key(KEY)) == {"fused": 1.0}
    assert table.ranking(86, table.ShapeClass.of_key(KEY)) is None and table.ranking(None, None) is None


def test_measured_builds_the_table_from_benchmark_rows(tmp_path):
    def row(shape, path, ms, cls=KEY, mode=table.MODE, **extra):
        return dict(shape=shape, path=path, mode=mode, summary=dict(median=ms), **{"class": cls}, **extra)

    rows = [row("a", "fused", 2.0), row("a", "split", 1.0), row("a", "concat", 1.5),
            row("b", "fused", 1.0), row("b", "split", 2.0),                      # concat not timed at shape b
            row("b", "concat", 0.1, mode="forward"),                           # forward rows do not count
            row("a", "fused", 0.1, cls="other/x"), dict(shape="a", path="split", mode=table.MODE, skipped="why",
                                                       **{"class": "other/x"}),
            dict(shape="a", contender="floor", mode=table.MODE, summary=dict(median=0.5))]
    t = table.measured(rows, "NVIDIA H100 80GB HBM3", "9.0", "today", {"torch": "2.11"})
    assert t["arch"] == 90 and t["mode"] == "forward+backward"
    entry = t["classes"][KEY]
    assert entry["relative"] == {"fused": pytest.approx(2 ** 0.5, rel=1e-3), "split": pytest.approx(2 ** 0.5,
                                                                                                    rel=1e-3)}
    assert entry["path"] == "fused" and entry["shapes"] == ["a", "b"]  # ties: the order of costs.PATHS
    assert t["classes"]["other/x"]["path"] == "fused"
    path = table.write(t, tmp_path, "nvidia-h100")
    assert path.name == "nvidia-h100-dispatch.json" and json.loads(path.read_text()) == t


def test_shape_class_of_calls():
    q, k = torch.empty(2, 4, 8, 64, dtype=torch.bfloat16), torch.empty(2, 4, 8, 64, dtype=torch.bfloat16)
    cls = table.shape_class(q, k, AttentionSpec.build(q, k, gate=torch.empty(2, 8, 3, dtype=torch.bfloat16)))
    assert cls.key == "bf16/full/dense/gate-token/D64/mha"
    q1 = q[:, :, :1]
    cls = table.shape_class(q1, k, AttentionSpec.build(q1, k, gate=torch.empty(2, 1, 3, dtype=torch.bfloat16),
                                                       causal=True, key_padding_mask=torch.ones(2, 8).bool()))
    assert cls.key == "bf16/causal/padded/gate-row/D64/mha"
    q3 = torch.empty(1, 8, 8, 128, dtype=torch.float16)
    k3 = torch.empty(1, 2, 8, 128, dtype=torch.float16)
    spec = AttentionSpec.build(q3, k3, cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32),
                               gate_hidden=torch.empty(1, 8, 16, dtype=torch.float16))
    assert table.shape_class(q3, k3, spec).key == "fp16/full/packed/gate-token/D128/gqa"


# ------------------------------------------------------------------------------------------- the public API


def test_attention_route_and_path_on_cpu():
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 4, 16)
    pk = torch.randn(1, 2, 16)
    assert fastprefix.ops.attention_route(q, k, pk) == ("fused", "rule")
    assert fastprefix.ops.attention_route(q, k, pk, path="concat") == ("concat", "forced")
    assert fastprefix.ops.attention_route(q, k, pk, path="split") == ("split", "forced")
    assert fastprefix.ops.attention_route(q, k, pk, softcap=2.0, path="split") == ("fused", "rule")
    route_ = fastprefix.ops.attention_route(q, k, pk)
    assert route_.path == "fused" and route_.source == "rule"
    assert fastprefix.ops.attention_path(q, k, path="concat", prefix_k=pk) == "concat"
    assert fastprefix.ops.attention_path(q, k, path="concat") == "split"  # prefix unknown: split's answer
    assert isinstance(fastprefix.ops.attention_path(q, k), str)
    with pytest.raises(ValueError, match="path must be one of"):
        fastprefix.ops.attention_route(q, k, pk, path="fastest")


def test_the_env_var_takes_concat(monkeypatch):
    monkeypatch.setenv("FASTPREFIX_ATTENTION", "concat")
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 4, 16)
    pk = torch.randn(1, 2, 16)
    assert fastprefix.ops.attention_route(q, k, pk) == ("concat", "forced")
    assert dispatch.SOURCES == ("forced", "rule", "table", "model")
