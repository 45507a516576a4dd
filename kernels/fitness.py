"""GPU fitness without a GPU: compile kernels ahead of time for sm_80, sm_86 (which stands for
sm_86/sm_89: same 99 KB shared-memory limit) and sm_90 and read what ptxas reports (registers,
spill stores) plus the shared memory Triton allocates.

Each kernel module (``KERNEL_MODULES``: ``attention.fused``, ``attention.split``, ``embedding.fused``) offers
``fitness_configs()``, built by its op's ``configs`` module from the module's kernels, yielding tuples

    (name, jit_fn, signature, constexprs, num_warps, num_stages, arch)

with ``jit_fn`` the ``@triton.jit`` function, ``signature`` the
``{arg: "*fp16" | "i32" | "fp32" | "constexpr" ...}`` map of ``triton.compiler.ASTSource`` and
``constexprs`` the values of its constexpr arguments; an optional 8th item gives ASTSource
``attrs`` (divisibility hints; ``signature_of`` builds all three the way Triton's launcher
specialises a launch on contiguous tensors). The configs are the ones the module's launcher can
pick, so "no spills and shared memory within the device limit" holds for real runs. They compile
with ``common.launch.FP_FUSION`` (the enable_fp_fusion every launch passes).

On a cold Triton cache each config costs a few seconds (Triton compile + ptxas); results come
from Triton's own ptxas run when it compiles, or a second ptxas run on a cache hit.

    python -m fastprefix.kernels.fitness            # table of every config, exit 1 on a failure
    python -m fastprefix.kernels.fitness --json     # the same as JSON lines (used by the tests)
    python -m fastprefix.kernels.fitness --module attention --filter sm90   # an op (or one module: attention.split)
    python -m fastprefix.kernels.fitness --features  # the attention's attn_bias / window / softcap variants
    python -m fastprefix.kernels.fitness --adapters  # the attention's per-row adapter variants (prefix_index)

Compilation needs a real (not interpreted) Triton: run without TRITON_INTERPRET=1. No GPU and no
CUDA driver are needed; the wheel's own ptxas is used.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from typing import Iterable, NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from .common.launch import FP_FUSION, signature_of
from .common.runtime import interpreting

__all__ = ["FitnessConfig", "Fitness", "SHARED_LIMIT", "TARGETS", "KERNEL_MODULES", "signature_of", "measure",
           "discover", "measure_all", "main"]

# Opt-in shared memory per block (bytes): A100 (sm_80, 163 KB), RTX 30xx / L4 / L40 (sm_86 and sm_89,
# 99 KB) and H100 (sm_90, 227 KB).
SHARED_LIMIT = {80: 166_912, 86: 101_376, 90: 232_448}
TARGETS = tuple(SHARED_LIMIT)

# Kernel modules that may define fitness_configs(); a module without it is skipped. ``--module`` also takes an
# op (the folder: every kernel module of it).
KERNEL_MODULES = ("attention.fused", "attention.split", "embedding.fused")
OPS = tuple(dict.fromkeys(m.split(".")[0] for m in KERNEL_MODULES))


class FitnessConfig(NamedTuple):
    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    arch: int
    attrs: dict = {}  # ASTSource attrs, e.g. {(3,): [["tt.divisibility", 16]]}


class Fitness(NamedTuple):
    name: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    spill_store_bytes: int
    shared_bytes: int
    blocks: str = ""  # the config's BLOCK_* constexprs, e.g. "M128 N64 D64"

    @property
    def ok(self) -> bool:
        return self.spill_store_bytes == 0 and self.shared_bytes <= SHARED_LIMIT[self.arch]


def _ptxas(arch: int) -> str:
    """The wheel's bundled ptxas that Triton itself uses for `arch` (a newer one for sm_90+)."""
    return get_ptxas(arch).path


def _ptxas_report(compiled, arch: int) -> str:
    """`ptxas -v` on the compiled kernel's PTX with the flags Triton itself uses."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([_ptxas(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", ptx, "-o",
                                 os.path.join(tmp, "kernel.o")], capture_output=True, text=True, check=True)
    return report.stdout + report.stderr


def measure(cfg: FitnessConfig) -> Fitness:
    """AOT-compile one config; registers and spills from ptxas -v, shared bytes from Triton."""
    if interpreting():
        raise RuntimeError("fitness needs compiled Triton: unset TRITON_INTERPRET")
    src = ASTSource(cfg.fn, cfg.signature, cfg.constexprs, cfg.attrs)
    # Triton runs the bundled ptxas -v itself on a cold compile: keep its log instead of running it twice.
    log, knobs = io.StringIO(), triton.knobs.nvidia
    saved, knobs.dump_ptxas_log = knobs.dump_ptxas_log, True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", cfg.arch, 32),
                                      options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                                   enable_fp_fusion=FP_FUSION))
    finally:
        knobs.dump_ptxas_log = saved
    text = log.getvalue()
    if "registers" not in text:  # served from Triton's cache: no ptxas ran
        text = _ptxas_report(compiled, cfg.arch)
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = re.search(r"(\d+) bytes spill stores", text)
    blocks = " ".join(f"{k[len('BLOCK_'):]}{v}" for k, v in cfg.constexprs.items() if k.startswith("BLOCK_"))
    return Fitness(cfg.name, cfg.arch, cfg.num_warps, cfg.num_stages, registers,
                   int(spills.group(1)) if spills else 0, int(compiled.metadata.shared), blocks)


def _expand(modules: Iterable[str]) -> list[str]:
    """Kernel module names, an op (``attention``) standing for each of its modules."""
    return [m for name in modules for m in ([k for k in KERNEL_MODULES if k.split(".")[0] == name] or [name])]


def discover(modules: Iterable[str] = KERNEL_MODULES, variant: str = "") -> list[FitnessConfig]:
    """Configs of every kernel module (or op) that defines fitness_configs(); with a ``variant`` (``"features"``,
    ``"adapters"``), instead that variant of the modules whose fitness_configs takes it as a flag (the attention's
    attn_bias / window / softcap kernels; its per-row adapter kernels)."""
    configs = []
    for name in _expand(modules):
        full_name = f"{__package__ or 'fastprefix.kernels'}.{name}"
        try:
            module = importlib.import_module(full_name)
        except ModuleNotFoundError as e:
            if e.name != full_name:  # a broken import inside the module is a real error
                raise
            continue
        provider = getattr(module, "fitness_configs", None)
        if provider is None:
            continue
        if not variant:
            configs.extend(FitnessConfig(*c) for c in provider())
        elif variant in inspect.signature(provider).parameters:
            configs.extend(FitnessConfig(*c) for c in provider(**{variant: True}))
    return configs


_CONFIGS: list = []


def _measure_index(i: int) -> Fitness:
    return measure(_CONFIGS[i])


def measure_all(configs: list[FitnessConfig], workers: int = 0) -> list[Fitness]:
    """Measure configs in `workers` forked processes (default: all cores)."""
    global _CONFIGS
    _CONFIGS = configs
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(configs) == 1:
        return [measure(c) for c in configs]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_measure_index, range(len(configs)), chunksize=1)


def format_table(results: list[Fitness]) -> str:
    wn = max([len("config")] + [len(r.name) for r in results])
    wb = max([len("blocks")] + [len(r.blocks) for r in results])
    head = (f"{'config':{wn}} {'blocks':{wb}} {'arch':>5} {'warps':>5} {'stages':>6} {'regs':>5} {'spills':>7} "
            f"{'shared':>8}  ok")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.name:{wn}} {r.blocks:{wb}} {'sm_' + str(r.arch):>5} {r.num_warps:>5} {r.num_stages:>6} "
                     f"{r.registers:>5} {r.spill_store_bytes:>7} {r.shared_bytes:>8}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per config instead of a table")
    parser.add_argument("--module", action="append", choices=OPS + KERNEL_MODULES,
                        help="only this op or kernel module (repeatable; default: all)")
    parser.add_argument("--filter", default="", help="only configs whose name contains this text")
    parser.add_argument("--workers", type=int, default=0, help="compile processes (default: all cores)")
    variants = parser.add_mutually_exclusive_group()
    variants.add_argument("--features", action="store_true",
                          help="the optional-feature kernel variants (attention bias, window, softcap) instead")
    variants.add_argument("--adapters", action="store_true",
                          help="the per-row adapter kernel variants (a table of prefixes, prefix_index) instead")
    args = parser.parse_args(argv)
    variant = "features" if args.features else "adapters" if args.adapters else ""
    configs = [c for c in discover(args.module or KERNEL_MODULES, variant) if args.filter in c.name]
    results = measure_all(configs, args.workers)
    if args.json:
        for r in results:
            print(json.dumps({**r._asdict(), "ok": r.ok}))
    else:
        print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
