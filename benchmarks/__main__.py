"""``fastprefix-bench``: fastprefix against the methods' original code, PEFT and the frozen-backbone floor.

Writes ``<tag>.md``, ``<tag>.json`` and ``<tag>.png`` to the results folder (``benchmarks/results`` of
the checkout by default), ``<tag>`` being the backbone name (plus ``-quick`` for ``--quick``). See
:mod:`.contenders` for what each row runs and :mod:`.measure` for how it is measured.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch

from . import backbones, contenders, report, suite

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fastprefix-bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="minilm",
                   help=f"one of {backbones.MODEL_CHOICES} or a local checkpoint folder")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--prefix-len", type=int, default=32, help="prefix length L = prompt length m")
    p.add_argument("--adept-rank", type=int, default=19)
    p.add_argument("--dept-rank", type=int, default=None, help="default: ADePT's trainable budget")
    p.add_argument("--prefix-projection", action="store_true", help="P-Tuning v2's reparameterisation MLP")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per contender (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--curve-repeats", type=int, default=2)
    p.add_argument("--seq-lens", type=int, nargs="*", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--prefix-lens", type=int, nargs="*", default=[4, 8, 16, 32, 64, 128])
    p.add_argument("--no-curves", action="store_true", help="skip the scaling curves")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--only", nargs="*", help="keep the rows whose name contains one of these")
    p.add_argument("--quick", action="store_true", help="small settings, finishes in ~3 min on 2 CPU cores")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall clock, or this process's CPU time (steadier on a shared machine; CPU only)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="backbone dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the kernel rows")
    p.add_argument("--peak-gbps", type=float, default=None, help="device bandwidth for the kernel rows")
    p.add_argument("--out-dir", type=Path, default=None, help=f"default: {DEFAULT_RESULTS.name}/ of the checkout")
    p.add_argument("--tag", default=None, help="file name stem of the outputs")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.repeats, args.warmup, args.curve_repeats = 4, 64, 3, 1, 2
        args.seq_lens, args.prefix_lens = [64, 256, 512], [4, 32, 128]
    return args


def _out_dir(args):
    if args.out_dir is not None:
        return args.out_dir
    # an installed (non-editable) package can't write next to itself: fall back to the working folder
    return DEFAULT_RESULTS if os.access(DEFAULT_RESULTS.parent, os.W_OK) else Path.cwd() / "benchmark-results"


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv)
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu times CPU work only; use the wall clock on CUDA")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    started = time.perf_counter()
    machine = report.machine(device)

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
    total = 2 * n_rows * (args.warmup + args.repeats) + n_rows + n_curve
    kernel_results = None
    if device.type == "cuda":
        from . import kernel_rows
        total += kernel_rows.count()
    with tqdm(total=total, desc="fastprefix-bench", unit="step", file=sys.stderr) as progress:
        rows = suite.run_table(backbone, shapes, setting, device, args.warmup, args.repeats, progress,
                               only=args.only, memory=not args.no_memory, clock=args.clock)
        curves = []
        if seq_lens:
            curves.append(suite.run_curve(backbone, shapes, setting, "seq_len", seq_lens, device, 1,
                                          args.curve_repeats, progress, clock=args.clock))
        if prefix_lens:
            curves.append(suite.run_curve(backbone, shapes, setting, "prefix_len", prefix_lens, device, 1,
                                          args.curve_repeats, progress, clock=args.clock))
        if device.type == "cuda":
            kernel_results = kernel_rows.run(device, dtype, args.peak_tflops, args.peak_gbps, progress)

    memory_method = ("torch.cuda.max_memory_allocated during one training step, minus the allocation before it"
                     if device.type == "cuda" else
                     "peak live tensor bytes during one training step above those live before it, replayed from "
                     "torch.profiler allocation events (CPU)")
    settings = dict(model=args.model, model_type=shapes["model_type"], backbone_params=shapes["params"],
                    batch=args.batch, seq_len=args.seq_len, prefix_len=args.prefix_len, adept_rank=args.adept_rank,
                    dept_rank=setting.resolved_dept_rank(shapes["hidden_size"]), dept_max_length=setting.dept_rows(),
                    prefix_projection=args.prefix_projection, dtype=str(dtype).replace("torch.", ""),
                    repeats=args.repeats, warmup=args.warmup, clock=args.clock, curve_repeats=args.curve_repeats,
                    quick=args.quick, threads=torch.get_num_threads(),
                    position_table_extended_to=need if extended else None, memory_method=memory_method,
                    fastprefix_path="reference (PyTorch)" if device.type == "cpu" else "Triton",
                    wall_seconds=None)
    result = dict(machine=machine, settings=settings, shapes=shapes, rows=rows, curves=curves,
                  targets=suite.targets(rows), kernels=kernel_results)
    settings["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    out = _out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(args.model).name) + ("-quick" if args.quick else "")
    text = report.markdown(result)
    (out / f"{tag}.md").write_text(text)
    report.write_json(result, out / f"{tag}.json")
    report.chart(result, out / f"{tag}.png")
    print(text)
    print(f"wrote {out / tag}.{{md,json,png}} in {settings['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
