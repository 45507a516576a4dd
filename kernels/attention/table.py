"""The measured dispatch table: the shape classes of an attention call, and the per-GPU files that say which path
was fastest for each class (``make gpu`` writes them, the ``"auto"`` rule reads them: dispatch.py).

What it holds.

- :class:`ShapeClass`: what the dispatch rule distinguishes in a call, beyond what rules a path out: the dtype
  (fp16 / bf16: the only ones the automatic rule times), causal or not, the batch layout (``dense``, a ``padded``
  batch with some padding, a ``packed`` row), the gate (``none``; ``row``: one gate row for every query, which folds
  into the prefix; ``token``: a gate per query), the head-dim bucket (64 for D <= 64, else 128, the launch tables'
  buckets), and GQA (``H != Hkv``). :func:`shape_class` reads it off a call; :func:`model_shape` turns it into the
  cost model's shape (costs.py), which the rule consults where no table covers the class.
- the table file ``benchmarks/results/<gpu>-dispatch.json``, one per GPU ``make gpu`` ran on::

      {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "arch": 90, "date": ..., "versions": {...},
       "mode": "forward+backward",
       "classes": {"bf16/causal/dense/gate-none/D128/gqa":
                       {"path": "concat", "relative": {"concat": 1.0, "split": 1.08, "fused": 1.31},
                        "shapes": ["llama B8 H32/8 S2048 L64 D128 causal", ...]}, ...}}

  ``relative``: each path's forward + backward time over the fastest path's, the geometric mean over the class's
  benchmark shapes (only paths timed at every one of them). :func:`measured` builds it from the GPU suite's
  attention rows; :func:`ranking` reads the table of the running GPU's compute capability (``arch``: 80 for 8.0),
  the newest file where several GPUs share one.

Caveats. Files are found next to the package (``<fastprefix>/benchmarks/results``, the repo's
``benchmarks/results`` in an editable install) and read once per process and capability
(:func:`clear_cache` forgets them). A class no benchmark shape falls in, or a GPU without a file, gets the cost
model's pick. The table says nothing of fp32 or of GPUs before sm_80: the rule keeps the fused kernel there.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import NamedTuple, Optional

from . import costs

# next to the package: the repo root in an editable install, site-packages/fastprefix in a wheel
TABLE_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SUFFIX = "-dispatch.json"
MODE = "forward+backward"
_DTYPES = {"torch.float16": "fp16", "torch.bfloat16": "bf16"}


class ShapeClass(NamedTuple):
    """A call's class: dtype ``"fp16"``/``"bf16"``, causal, layout ``"dense"``/``"padded"``/``"packed"``, gate
    ``"none"``/``"row"``/``"token"``, head_dim bucket 64 or 128, gqa."""

    dtype: str
    causal: bool
    layout: str
    gate: str
    head_dim: int
    gqa: bool

    @property
    def key(self) -> str:
        return "/".join((self.dtype, "causal" if self.causal else "full", self.layout, f"gate-{self.gate}",
                         f"D{self.head_dim}", "gqa" if self.gqa else "mha"))

    @classmethod
    def of_key(cls, key: str) -> "ShapeClass":
        dtype, causal, layout, gate, head_dim, gqa = key.split("/")
        return cls(dtype, causal == "causal", layout, gate.removeprefix("gate-"), int(head_dim[1:]), gqa == "gqa")


def shape_class(q, k, spec) -> ShapeClass:
    """The class of a call: q ``[B, H, Sq, D]``, k ``[B, Hkv, Sk, D]``, ``spec`` its ``AttentionSpec`` (a padding
    mask with every key real should be dropped first: it is classed ``padded``)."""
    rows = spec.gate_rows
    gate = "none" if rows is None else "row" if rows == 1 or q.shape[2] == 1 else "token"
    layout = "packed" if spec.cu_seqlens is not None else "padded" if spec.key_padding_mask is not None else "dense"
    return ShapeClass(_DTYPES.get(str(q.dtype), str(q.dtype).replace("torch.", "")), bool(spec.causal), layout,
                      gate, 64 if q.shape[-1] <= 64 else 128, q.shape[1] != k.shape[1])


def model_shape(cls: ShapeClass) -> costs.Shape:
    """The cost model's shape for a class: B = 8, H = 32 (Hkv = 8 with GQA), S = 2048, L = 64, D = the bucket."""
    return costs.Shape(Hkv=8 if cls.gqa else 32, D=cls.head_dim, causal=cls.causal, layout=cls.layout)


# ------------------------------------------------------------------------------------------------ reading


def arch_of_capability(capability: str) -> int:
    """``"8.0"`` -> 80."""
    major, minor = capability.split(".")
    return 10 * int(major) + int(minor)


@functools.lru_cache(maxsize=None)
def _load(directory: str, arch: int) -> Optional[dict]:
    found = []
    for path in sorted(Path(directory).glob(f"*{SUFFIX}")):
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if table.get("arch") == arch and isinstance(table.get("classes"), dict):
            found.append((str(table.get("date", "")), path.name, table))
    return max(found, key=lambda t: t[:2])[2] if found else None


def load(arch: Optional[int]) -> Optional[dict]:
    """The table committed for compute capability ``arch`` (80 for 8.0), or None."""
    return None if arch is None else _load(str(TABLE_DIR), int(arch))


def clear_cache() -> None:
    _load.cache_clear()


def ranking(arch: Optional[int], cls: ShapeClass) -> Optional[dict]:
    """``{path: relative time}`` the table of ``arch`` measured for ``cls`` (1.0: the fastest), or None."""
    table = load(arch)
    entry = None if table is None else table["classes"].get(cls.key)
    return None if entry is None else dict(entry["relative"])


# ------------------------------------------------------------------------------------------------ writing


def measured(rows, gpu: str, capability: str, date: str = "", versions: Optional[dict] = None) -> dict:
    """The table of one GPU run from its attention rows: dicts with ``class`` (a :class:`ShapeClass` key),
    ``path`` (``"fused"``, ``"split"``, ``"concat"``), ``shape``, ``mode`` and, where timed, ``summary``
    (``median`` milliseconds). Only ``forward+backward`` rows count."""
    times = {}  # class key -> shape -> path -> median ms
    for r in rows:
        if r.get("mode") != MODE or "summary" not in r or "error" in r or not r.get("class") or not r.get("path"):
            continue
        times.setdefault(r["class"], {}).setdefault(r["shape"], {})[r["path"]] = r["summary"]["median"]
    classes = {}
    for key, shapes in sorted(times.items()):
        common = set.intersection(*(set(t) for t in shapes.values()))
        if not common:
            continue
        relative = {}
        for path in sorted(common):
            logs = [math.log(t[path] / min(t[p] for p in common)) for t in shapes.values()]
            relative[path] = round(math.exp(sum(logs) / len(logs)), 4)
        best = min(relative, key=lambda p: (relative[p], costs.PATHS.index(p)))
        classes[key] = dict(path=best, relative=relative, shapes=sorted(shapes))
    return dict(gpu=gpu, capability=capability, arch=arch_of_capability(capability) if capability else None,
                date=date, versions=versions or {}, mode=MODE, classes=classes)


def write(table: dict, out: Path, tag: str) -> Path:
    """Write ``<tag>-dispatch.json`` to ``out``; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{tag}{SUFFIX}"
    target.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return target
