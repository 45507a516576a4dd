"""GPU fitness without a GPU: every launch config the kernels can pick compiles for sm_80, sm_86 (for
sm_86/89) and sm_90 without register spills and within the target's shared memory.

The compile runs in a subprocess because the test session runs Triton's interpreter
(TRITON_INTERPRET=1), under which @triton.jit functions cannot be compiled ahead of time.
"""

import json
import os
import subprocess
import sys

import pytest

from fastprefix.kernels import fitness
from fastprefix.kernels.attention import configs as attention
from fastprefix.kernels.attention import fused


def _measure_module(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-P", "-m", "fastprefix.kernels.fitness", "--json", "--module", module], env=env,
                          capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode in (0, 1) and (rows or proc.returncode == 0), proc.stderr[-3000:]
    return rows


@pytest.fixture(scope="module")
def attention_results():
    return _measure_module("attention.fused")


@pytest.mark.parametrize("module", fitness.KERNEL_MODULES)
def test_no_spills_and_shared_memory_fits(module, attention_results):
    results = attention_results if module == "attention.fused" else _measure_module(module)
    if module == "attention.fused":
        assert results
    bad = [r for r in results if r["spill_store_bytes"] != 0 or r["shared_bytes"] > fitness.SHARED_LIMIT[r["arch"]]]
    assert not bad, "\n".join(f"{r['name']}: {r['spill_store_bytes']} B spilled, {r['shared_bytes']} B shared"
                              for r in bad)
    assert all(r["ok"] and r["registers"] <= 255 for r in results)


def test_attention_configs_cover_what_the_launcher_picks(attention_results):
    by_name = {r["name"]: r for r in attention_results}
    # every kind x {fp16, bf16, fp32} x D {64, 128} x {sm_80, sm_86, sm_90}, plus the delta kernel
    assert len(by_name) == len(attention_results) == 3 * 3 * 2 * (len(attention.KINDS) + 1)
    assert {r["arch"] for r in attention_results} == set(fitness.TARGETS) == {80, 86, 90}
    for arch in fitness.TARGETS:  # every kernel x dtype x D, measured with the launcher's own choice
        for torch_dtype, dtype in attention.FITNESS_DTYPES:
            for D in (64, 128):
                for kind, kernel in attention.FITNESS_KERNELS.items():
                    cfg = attention.pick_config(kind, D, arch, torch_dtype)
                    r = by_name[f"attn.{kernel} sm{arch} {dtype} D{D}"]
                    assert r["arch"] == arch
                    assert (r["num_warps"], r["num_stages"]) == (cfg.num_warps, cfg.num_stages)
                    assert r["blocks"].startswith(f"M{cfg.block_m} N{cfg.block_n}")
                assert f"attn.bwd_delta sm{arch} {dtype} D{D}" in by_name


def test_signature_specialisation():
    sig, constexprs, attrs = fitness.signature_of(fused._bwd_dkdv_kernel, {"Q": "*fp16"}, {"BLOCK_M": 32},
                                                  floats=("qk_hi",), ones=("stride_kn",),
                                                  multiples_of_16=("stride_qm",))
    names = fused._bwd_dkdv_kernel.arg_names
    assert sig["Q"] == "*fp16" and sig["qk_hi"] == "fp32" and sig["Sq"] == "i32"
    assert sig["BLOCK_M"] == sig["stride_kn"] == "constexpr" and constexprs["stride_kn"] == 1
    assert attrs[(names.index("stride_qm"),)] == [["tt.divisibility", 16]]
    assert (names.index("Sq"),) not in attrs


def test_discover_skips_modules_without_configs():
    assert fitness.discover(["fitness"]) == []
    assert fitness.discover(["no_such_kernel_module"]) == []


def test_measure_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fitness.measure(next(iter(fitness.discover(["attention.fused"]))))
