"""``fastprefix-bench``: fastprefix against the methods' original code, PEFT and each family's frozen-backbone floor.

Writes ``<tag>.md``, ``<tag>.json`` and ``<tag>.png`` to the results folder (``benchmarks/results`` of
the checkout by default), ``<tag>`` being the backbone name (plus ``-quick`` for ``--quick``). See
:mod:`.contenders` for what each row runs, :mod:`.measure` for how a step is timed, :mod:`.suite` for
how steps are interleaved and sampled, :mod:`.stats` for the intervals and verdicts.

Two more commands read result files: ``fastprefix-bench compare A.json B.json`` (B's speed over A's,
row by row, see :mod:`.compare`) and ``fastprefix-bench readme RESULT.json`` (rewrite the README's
generated benchmark block from a result file, see :func:`.report.readme_block`).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from . import backbones, compare, contenders, gpu, kernel_rows, report, suite
from .metronome import Metronome

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"

# How long the runs take on the CI machine (2 cores, shared), wall clock. --help and the README quote
# RUN_TIMES (a test checks they agree): re-measure both runs there and update these after changing the defaults.
# Measured 2026-12-02 on the 2-core machine, otherwise idle, with the metronome clock: fastprefix-bench 970 s and
# 976 s with inference on a quarter of the budget, 952 s, 921 s, 842 s and 854 s with half (make bench adds seconds
# for the README render); fastprefix-bench --quick 120 s.
RUN_TIMES = {"make bench": "about 15 minutes", "--quick": "about 2 minutes"}
DEFAULT_BUDGET_S = {"cpu": 300.0, "cuda": 60.0}  # --budget without the flag
QUICK = dict(batch=4, seq_len=64, repeats=6, warmup=1, curve_repeats=3, seq_lens=[64, 256, 512],
             prefix_lens=[4, 32, 128], budget=30.0)  # the defaults --quick sets


def run_times_sentence():
    """The one sentence about run times that ``--help`` and the README both carry."""
    return (f"make bench takes {RUN_TIMES['make bench']} and fastprefix-bench --quick {RUN_TIMES['--quick']} "
            f"on a 2-core machine")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="fastprefix-bench", description=__doc__.splitlines()[0],
        epilog=(f"Run time: {run_times_sentence()}. Also: 'fastprefix-bench compare A.json B.json' (B's speed "
                "over A's, row by row, with intervals) and 'fastprefix-bench readme RESULT.json' (rewrite the "
                "README's benchmark block from a result file)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="minilm",
                   help=f"one of {backbones.MODEL_CHOICES} or a local checkpoint folder")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--prefix-len", type=int, default=32, help="prefix length L = prompt length m")
    p.add_argument("--adept-rank", type=int, default=19)
    p.add_argument("--dept-rank", type=int, default=None, help="default: ADePT's trainable budget")
    p.add_argument("--prefix-projection", action="store_true", help="P-Tuning v2's reparameterisation MLP")
    p.add_argument("--repeats", type=int, default=7,
                   help="interleaved rounds of every row (the least; --budget may add training rounds)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds the table's training rounds may take in all, sampling the table's ratios (the "
                        "unsettled verdicts first) until each 95%% interval is within +/-3%% and each verdict "
                        "settled; inference gets half of it on top (default: 300 on CPU, 60 on CUDA, 30 with "
                        "--quick; 0: just --repeats)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--curve-repeats", type=int, default=3, help="interleaved rounds per curve point")
    p.add_argument("--seq-lens", type=int, nargs="*", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--prefix-lens", type=int, nargs="*", default=[4, 8, 16, 32, 64, 128])
    p.add_argument("--no-curves", action="store_true", help="skip the scaling curves")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--only", nargs="*", help="keep the rows whose name contains one of these")
    p.add_argument("--quick", action="store_true", help=f"small settings ({RUN_TIMES['--quick']} on 2 CPU cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on CPU, where one thread's CPU time is the steady clock on a "
                        "shared machine; torch's choice on CUDA)")
    p.add_argument("--clock", choices=["wall", "cpu", "metronome"], default=None,
                   help="wall clock; this process's CPU time (CPU only; it leaves out the time other processes "
                        "held the cores); or metronome: CPU time rescaled by fixed reference work timed inside each "
                        "step, which takes the shared core's speed swings out (benchmarks/metronome.py). Default: "
                        "metronome with one CPU thread, else wall")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="backbone dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the kernel rows")
    p.add_argument("--peak-gbps", type=float, default=None, help="device bandwidth for the kernel rows")
    p.add_argument("--out-dir", type=Path, default=None, help=f"default: {DEFAULT_RESULTS.name}/ of the checkout")
    p.add_argument("--tag", default=None, help="file name stem of the outputs")
    p.add_argument("--suite", choices=["table", "gpu"], default="table",
                   help="table: the contenders on one backbone (this page's options); gpu: attention, embedding-kernel "
                        "and end-to-end rows on CUDA, written to <gpu-name>.{md,json,png} (benchmarks/gpu.py)")
    p.add_argument("--smoke", action="store_true",
                   help="with --suite gpu: tiny shapes on CPU, kernels in Triton's interpreter, every code path of "
                        "the suite, no result files (its timings mean nothing)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no report on stdout (the bar is also off when CI is set)")
    if p.parse_known_args(argv)[0].quick:  # --quick changes the defaults; flags given with it still win
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    for name in ("repeats", "batch", "seq_len", "prefix_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.budget is not None and args.budget < 0:
        p.error(f"--budget must be 0 or more seconds, got {args.budget}")
    return args


def _out_dir(args):
    if args.out_dir is not None:
        return args.out_dir
    # an installed (non-editable) package can't write next to itself: fall back to the working folder
    return DEFAULT_RESULTS if os.access(DEFAULT_RESULTS.parent, os.W_OK) else Path.cwd() / "benchmark-results"


def _progress(total, quiet):
    if quiet or os.environ.get("CI"):
        return suite.NullProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc="fastprefix-bench", unit="step", file=sys.stderr, dynamic_ncols=True)


def compare_main(argv):
    p = argparse.ArgumentParser(prog="fastprefix-bench compare",
                                description="B's throughput over A's, row by row, with 95% intervals and verdicts")
    p.add_argument("a", type=Path, help="the reference run (a fastprefix-bench JSON file)")
    p.add_argument("b", type=Path, help="the run compared with it")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    args = p.parse_args(argv)
    for path in (args.a, args.b):
        if not path.is_file():
            p.error(f"no such result file: {path}")
    text = compare.markdown(report.read_json(args.a), report.read_json(args.b), args.a.name, args.b.name)
    if args.out:
        args.out.write_text(text)
    print(text, end="")


def readme_main(argv):
    p = argparse.ArgumentParser(prog="fastprefix-bench readme",
                                description="rewrite the README's generated benchmark block from a result file")
    p.add_argument("result", type=Path, nargs="?", default=DEFAULT_RESULTS / "minilm.json")
    p.add_argument("--readme", type=Path, default=README)
    args = p.parse_args(argv)
    for path in (args.result, args.readme):
        if not path.is_file():
            p.error(f"no such file: {path}")
    text = args.readme.read_text()
    new = report.replace_readme_block(text, report.readme_block(report.read_json(args.result)))
    args.readme.write_text(new)
    print(f"{args.readme}: benchmark block {'rewritten' if new != text else 'already up to date'} "
          f"from {args.result}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    if argv and argv[0] == "readme":
        return readme_main(argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv)
    if args.smoke and args.suite != "gpu":
        raise SystemExit("--smoke belongs to --suite gpu")
    if args.suite == "gpu":
        gpu.run(args, _out_dir(args))
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    clock = args.clock or ("metronome" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall")
    if clock != "wall" and device.type != "cpu":
        raise SystemExit(f"--clock {clock} times CPU work only; use the wall clock on CUDA")
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET_S.get(device.type, 60.0)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cpu" and dtype != torch.float32 and not args.quiet:
        # measured on the 2-core machine (no native 16-bit matrix units): --quick took 148 s in float32 and
        # 1,760 s in bfloat16, partly alongside a test run
        print(f"note: {args.dtype} runs many times slower than float32 on a CPU without native 16-bit matrix "
              "units (--quick: about 2 minutes in float32, about 30 in bfloat16 on a 2-core machine)", file=sys.stderr)
    started = time.perf_counter()
    machine = report.machine(device)
    counters = report.cpu_counters()
    if report.busy(machine):  # say it now, not only after minutes of noisy sampling
        print(f"warning: {report.busy(machine)}; expect a longer run", file=sys.stderr)

    backbone = backbones.load_backbone(args.model, dtype)
    shapes = backbones.describe(backbone)
    seq_lens = args.seq_lens if not args.no_curves else []
    prefix_lens = args.prefix_lens if not args.no_curves else []
    need = max([args.seq_len, *seq_lens]) + max([args.prefix_len, *prefix_lens])
    extended = backbones.extend_positions(backbone, need)
    setting = contenders.Setting(batch=args.batch, seq_len=args.seq_len, prefix_len=args.prefix_len,
                                 adept_rank=args.adept_rank, dept_rank=args.dept_rank,
                                 prefix_projection=args.prefix_projection)

    n_rows = len(contenders.build_all(backbone, shapes, setting, args.only))
    n_curve = (len(contenders.build_all(backbone, shapes, setting, suite.CURVE_ROWS, exact=True))
               * (1 + args.curve_repeats) * len(seq_lens + prefix_lens))
    total = 2 * n_rows * (args.warmup + args.repeats) + (0 if args.no_memory else n_rows) + n_curve
    kernel_results = None
    if device.type == "cuda":
        total += kernel_rows.count()
    progress = _progress(total, args.quiet)
    # one metronome for the whole run: every row and curve point in the same unit (its reference tick)
    timer = Metronome() if clock == "metronome" else clock
    try:
        rows, sampling = suite.run_table(backbone, shapes, setting, device, args.warmup, args.repeats, progress,
                                         only=args.only, memory=not args.no_memory, clock=timer, budget_s=budget)
        curves = []
        if seq_lens:
            curves.append(suite.run_curve(backbone, shapes, setting, "seq_len", seq_lens, device, 1,
                                          args.curve_repeats, progress, clock=timer))
        if prefix_lens:
            curves.append(suite.run_curve(backbone, shapes, setting, "prefix_len", prefix_lens, device, 1,
                                          args.curve_repeats, progress, clock=timer))
        if device.type == "cuda":
            kernel_results = kernel_rows.run(device, dtype, args.peak_tflops, args.peak_gbps, progress)
    finally:
        if hasattr(progress, "close"):
            progress.close()
    if isinstance(timer, Metronome):  # from the calibration tick to the run's median tick (see metronome.py)
        suite.rescale(rows, curves, timer.rescale_factor(), setting.batch * setting.seq_len)

    memory_method = ("torch.cuda.max_memory_allocated during one training step, minus the allocation before it"
                     if device.type == "cuda" else
                     "peak live tensor bytes during one training step above those live before it, replayed from "
                     "torch.profiler allocation events (CPU)")
    settings = dict(model=args.model, model_type=shapes["model_type"], backbone_params=shapes["params"],
                    batch=args.batch, seq_len=args.seq_len, prefix_len=args.prefix_len, adept_rank=args.adept_rank,
                    dept_rank=setting.resolved_dept_rank(shapes["hidden_size"]), dept_max_length=setting.dept_rows(),
                    prefix_projection=args.prefix_projection, dtype=str(dtype).replace("torch.", ""),
                    repeats=args.repeats, warmup=args.warmup, clock=clock, curve_repeats=args.curve_repeats,
                    budget_s=budget, quick=args.quick, threads=torch.get_num_threads(),
                    command=" ".join(["fastprefix-bench", *map(shlex.quote, argv)]),
                    position_table_extended_to=need if extended else None, memory_method=memory_method,
                    fastprefix_path="reference (PyTorch)" if device.type == "cpu" else "Triton",
                    wall_seconds=None, metronome=timer.summary() if clock == "metronome" else None)
    result = dict(machine=machine, settings=settings, shapes=shapes, rows=rows, curves=curves,
                  targets=suite.targets(rows), sampling=sampling, kernels=kernel_results)
    settings["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_average_end"] = report.load_average()
    result["machine"]["other_cpus"] = report.other_cpus(counters, report.cpu_counters())

    out = _out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(args.model).name) + ("-quick" if args.quick else "")
    text = report.markdown(result)
    (out / f"{tag}.md").write_text(text)
    report.write_json(result, out / f"{tag}.json")
    report.chart(result, out / f"{tag}.png")
    if not args.quiet:
        print(text)
    warn = report.busy(result["machine"])
    if warn:
        print(f"warning: {warn}", file=sys.stderr)
    if sampling["not_converged"]:
        print(f"note: {len(sampling['not_converged'])} target ratio(s) did not converge to +/-3% within the "
              f"{budget:.0f} s budget (raise --budget): " + "; ".join(sampling["not_converged"]), file=sys.stderr)
    print(f"wrote {out / tag}.{{md,json,png}} in {settings['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
