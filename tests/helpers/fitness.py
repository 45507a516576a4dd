"""GPU fitness checks shared by tests/ops/test_fitness_<op>_sm<arch>.py: every launch config the kernels can pick
compiles for the target without register spills and within its shared memory, and the attention's measured
configs are the ones its launcher picks. One op and one target a file, so no file runs over a minute of one core
on a cold Triton cache (the compile runs in a subprocess: the test session runs Triton's interpreter, under which
@triton.jit functions cannot be compiled ahead of time)."""

import functools
import json
import os
import subprocess
import sys

from fastprefix.kernels import fitness
from fastprefix.kernels.attention import configs as attention


def measure(op, arch):
    """The fitness rows of every kernel module of ``op`` (``"attention"``, ``"embedding"``) compiled for ``arch``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-P", "-m", "fastprefix.kernels.fitness", "--json", "--module", op,
                           "--filter", f"sm{arch} "], env=env, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode in (0, 1) and rows, proc.stderr[-3000:]
    assert {r["arch"] for r in rows} == {arch}
    return rows


def assert_fits(results):
    bad = [r for r in results if r["spill_store_bytes"] != 0 or r["shared_bytes"] > fitness.SHARED_LIMIT[r["arch"]]]
    assert not bad, "\n".join(f"{r['name']}: {r['spill_store_bytes']} B spilled, {r['shared_bytes']} B shared"
                              for r in bad)
    assert all(r["ok"] and r["registers"] <= 255 for r in results)


def assert_attention_configs_cover_what_the_launcher_picks(results, arch):
    by_name = {r["name"]: r for r in results if r["name"].startswith("attn.")}
    # every kind x {fp16, bf16, fp32} x D {64, 128} on this target, plus the delta kernel
    assert len(by_name) == 3 * 2 * (len(attention.KINDS) + 1)
    for torch_dtype, dtype in attention.FITNESS_DTYPES:  # every kernel x dtype x D, with the launcher's own choice
        for D in (64, 128):
            for kind, kernel in attention.FITNESS_KERNELS.items():
                cfg = attention.pick_config(kind, D, arch, torch_dtype)
                r = by_name[f"attn.{kernel} sm{arch} {dtype} D{D}"]
                assert (r["num_warps"], r["num_stages"]) == (cfg.num_warps, cfg.num_stages)
                assert r["blocks"].startswith(f"M{cfg.block_m} N{cfg.block_n}")
            assert f"attn.bwd_delta sm{arch} {dtype} D{D}" in by_name


@functools.lru_cache(maxsize=None)
def _results(op, arch):
    return measure(op, arch)


def checks(op, arch):
    """The test functions of one ``test_fitness_<op>_sm<arch>.py`` file (one compile run each, cached)."""

    def test_no_spills_and_shared_memory_fits():
        assert_fits(_results(op, arch))

    def test_attention_configs_cover_what_the_launcher_picks():
        assert_attention_configs_cover_what_the_launcher_picks(_results(op, arch), arch)

    if op == "attention":
        return test_no_spills_and_shared_memory_fits, test_attention_configs_cover_what_the_launcher_picks
    return (test_no_spills_and_shared_memory_fits,)
