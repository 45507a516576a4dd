"""A metronome inside each timed CPU step: takes a shared machine's speed swings out of the step time.

Why: on a shared 2-core machine one core's speed swings by about 10-15% over fractions of a second (a
fixed 1.7 ms matrix product's CPU time has a CV of 14% over 0.1 s windows, 11% over 1 s windows, and
two neighbouring 0.1 s windows correlate 0.84), and the two cores swing independently (their 0.1 s
windows correlate 0.02). A training step of MiniLM takes about 1 s, so two rows' steps run back to back
still see different speeds: their per-round ratio had a CV of 10-15%, which needs dozens of rounds per
ratio before a 95% interval is narrow enough for a verdict to repeat from one run to the next.

How: a *tick* is a fixed piece of work (``reps`` products of two ``size x size`` float32 matrices, about
3 ms; its operands, 64 KiB each, stay in cache) whose CPU time is recorded. Forward hooks on the
backbone's blocks (the outermost ``nn.ModuleList``: BERT's ``encoder.layer``, T5's ``block``s, Llama's
``layers``) tick after each block, and, in training, a gradient hook on the block's output ticks when
the backward pass reaches it: 12 ticks per MiniLM training step, 6 per inference step. Each stretch of
the step between two ticks is rescaled to the machine's reference speed by the mean of the two ticks'
durations around it (the first and last stretches by their one neighbour):

    corrected = sum_j  stretch_j * reference / local_tick_j

and the ticks' own time is left out. ``reference`` is one process-wide tick duration (the median of a
calibration burst), so every row and every curve point is in the same unit: seconds at the machine's
usual speed. On that machine the corrected step time's CV fell from 9-12% to 3-5% and the per-round
ratio of two rows from 10-15% to about 4% (30 rounds each, measured 2026-12-02), while the ratios'
medians stayed within a percent of the uncorrected ones.

Caveats: it assumes the swings slow the model's work and the tick alike (CPU time's correlation with
the tick's was 0.93 on that machine); a machine whose slow spells hit memory-bound work only would be
corrected less. It adds about 4% wall time (the ticks). Ticks fire only inside :meth:`Metronome.time`,
so warm-up steps and the peak-memory profile see plain hooks that return at once. CPU only (CUDA steps
are timed by events, which a shared host's swings do not reach in this way); with several torch threads
use the wall clock, which this does not correct.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def blocks(model):
    """The backbone's transformer blocks: the children of every outermost ``nn.ModuleList`` of ``model``.

    ``[model]`` itself when it has no ``ModuleList`` (the metronome then ticks once per forward).
    """
    found, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, nn.ModuleList) and len(module):
            inside.add(name)
            found.extend(module)
    return found or [model]


class Metronome:
    """Ticks of fixed work inside a timed step, and the step time corrected by their speed.

    ``clock``: the CPU-time function (``time.process_time``); ``size``/``reps``: one tick's work.
    Attach it to each row's model (:meth:`attach`); time steps with :meth:`time`. One instance serves
    every row of a run, so all corrected times share its :attr:`reference`.
    """

    def __init__(self, clock=time.process_time, size=128, reps=40, calibration_ticks=30):
        self.clock, self.reps = clock, reps
        g = torch.Generator().manual_seed(0)
        self._a = torch.randn(size, size, generator=g)
        self._b = torch.randn(size, size, generator=g)
        self._out = torch.empty(size, size)
        self._ticks = None  # a list while a step is timed, else None (hooks do nothing)
        self.steps = self.ticks = 0
        self.tick_seconds = self.raw_seconds = 0.0
        for _ in range(5):  # warm the tick's code path and caches
            self._tick([])
        burst = []
        for _ in range(calibration_ticks):
            self._tick(burst)
        self.reference = statistics.median(e - s for s, e in burst)

    def _tick(self, into):
        start = self.clock()
        for _ in range(self.reps):
            torch.mm(self._a, self._b, out=self._out)
        into.append((start, self.clock()))

    def _after_block(self, module, args, output):
        if self._ticks is None:
            return
        self._tick(self._ticks)
        out = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(out) and out.requires_grad:
            ticks = self._ticks
            out.register_hook(lambda grad: self._tick(ticks) if self._ticks is ticks else None)

    def attach(self, model):
        """Forward hooks on ``model``'s :func:`blocks`; returns their handles (``.remove()`` each to detach)."""
        return [block.register_forward_hook(self._after_block) for block in blocks(model)]

    def corrected(self, start, end, ticks):
        """The stretch ``[start, end]`` of the clock with ``ticks`` ``[(s, e)]`` inside it, at the reference speed."""
        if not ticks:
            return end - start
        local = [e - s for s, e in ticks]
        edges = [start, *[t for tick in ticks for t in tick], end]
        total = 0.0
        for j in range(len(ticks) + 1):
            speed = local[0] if j == 0 else local[-1] if j == len(ticks) else (local[j - 1] + local[j]) / 2
            total += (edges[2 * j + 1] - edges[2 * j]) * self.reference / speed
        return total

    def time(self, fn):
        """Run ``fn()`` once with ticks on: its corrected duration in seconds (see the module docstring)."""
        self._ticks = ticks = []
        try:
            start = self.clock()
            fn()
            end = self.clock()
        finally:
            self._ticks = None
        spent = sum(e - s for s, e in ticks)
        self.steps += 1
        self.ticks += len(ticks)
        self.tick_seconds += spent
        self.raw_seconds += end - start - spent
        return self.corrected(start, end, ticks)

    def summary(self):
        """What the result file records: the reference tick, ticks per step, and their share of the time."""
        total = self.tick_seconds + self.raw_seconds
        return dict(reference_ms=round(1000 * self.reference, 4), steps=self.steps,
                    ticks_per_step=round(self.ticks / max(self.steps, 1), 2),
                    tick_share=round(self.tick_seconds / total, 4) if total else 0.0)
