"""A metronome inside each timed CPU step: takes a shared machine's speed swings out of the step time.

Why: on a shared 2-core machine one core's speed swings by about 10-15% over fractions of a second (a
fixed 1.7 ms matrix product's CPU time has a CV of 14% over 0.1 s windows, 11% over 1 s windows, and
two neighbouring 0.1 s windows correlate 0.84), and the two cores swing independently (their 0.1 s
windows correlate 0.02). A training step of MiniLM takes about 1 s, so two rows' steps run back to back
still see different speeds: their per-round ratio had a CV of 10-15%, which needs dozens of rounds per
ratio before a 95% interval is narrow enough for a verdict to repeat from one run to the next.

How: a *tick* is a fixed piece of work (``reps`` products of two ``size x size`` float32 matrices, about
1.5 ms; its operands, 64 KiB each, stay in cache) whose CPU time is recorded. Forward hooks tick after
each sub-layer of each of the backbone's blocks (:func:`tick_points`: BERT's attention, intermediate and
output modules, Llama's ``self_attn`` and ``mlp``; the blocks are the outermost ``nn.ModuleList``'s
children), and, in training, a gradient hook on each sub-layer's output ticks when the backward pass
reaches it: 36 ticks per MiniLM training step, 18 per inference step. Each stretch of the step between
two ticks is rescaled by the mean of the two ticks' durations around it (the first and last stretches by
their one neighbour):

    corrected = sum_j  stretch_j * reference / local_tick_j

and the ticks' own time is left out. ``reference`` starts as the median of a calibration burst; at the
end of a run :meth:`Metronome.rescale_factor` gives the factor that brings every time to the median tick
of the whole run instead (:func:`.suite.rescale`), so a run's times are seconds at that run's typical
speed, and two runs compare (a start-of-run burst had caught two runs' speeds 35% apart). On the 2-core
machine, 30 rounds of two rows (APT token gate and P-Tuning v2 (PEFT)) measured 2026-12-02: the per-round
ratio's standard deviation (of its log) was 10-13% uncorrected, 4.7% with a tick per block (12 per
step), 2.7-3.0% with a tick per sub-layer (36 per step) or per linear layer (69), so the sub-layers it
is; a tick mixing in a 16 MiB memory sweep tracked worse (6.3%). The medians stayed within the noise.

Caveats: it assumes the swings slow the model's work and the tick alike (CPU time's correlation with
the tick's was 0.93 on that machine); a machine whose slow spells hit memory-bound work only would be
corrected less. It adds about 5% wall time (the ticks). Ticks fire only inside :meth:`Metronome.time`,
so warm-up steps and the peak-memory profile see plain hooks that return at once. CPU only (CUDA steps
are timed by events, which a shared host's swings do not reach in this way); with several torch threads
use the wall clock, which this does not correct.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def _called_children(module):
    # containers are never called themselves: look through them
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.ParameterList)):
            yield from _called_children(child)
        else:
            yield child


def tick_points(model):
    """The modules the metronome ticks after: each block's sub-layers that hold a weight matrix.

    Norms and activations (no matrix) are skipped; a block with no such sub-layer is ticked as a whole.
    """
    points = []
    for block in blocks(model):
        inner = [m for m in _called_children(block) if any(p.ndim >= 2 for p in m.parameters())]
        points.extend(inner or [block])
    return points


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

    def __init__(self, clock=time.process_time, size=128, reps=20, calibration_ticks=30):
        self.clock, self.reps = clock, reps
        g = torch.Generator().manual_seed(0)
        self._a = torch.randn(size, size, generator=g)
        self._b = torch.randn(size, size, generator=g)
        self._out = torch.empty(size, size)
        self._ticks = None  # a list while a step is timed, else None (hooks do nothing)
        self.steps = 0
        self.raw_seconds = 0.0  # the timed steps' CPU time without their ticks
        for _ in range(5):  # warm the tick's code path and caches
            self._tick([])
        burst = []
        for _ in range(calibration_ticks):
            self._tick(burst)
        self.reference = statistics.median(e - s for s, e in burst)
        self.durations = []  # every timed step's tick durations: the run's median tick, counts and shares

    @property
    def ticks(self):
        """How many ticks the timed steps have had so far."""
        return len(self.durations)

    def _tick(self, into):
        start = self.clock()
        for _ in range(self.reps):
            torch.mm(self._a, self._b, out=self._out)
        into.append((start, self.clock()))

    def _after_layer(self, module, args, output):
        if self._ticks is None:
            return
        self._tick(self._ticks)
        out = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(out) and out.requires_grad:
            ticks = self._ticks
            out.register_hook(lambda grad: self._tick(ticks) if self._ticks is ticks else None)

    def attach(self, model):
        """Forward hooks on ``model``'s :func:`tick_points`; returns their handles (``.remove()`` each to detach)."""
        return [m.register_forward_hook(self._after_layer) for m in tick_points(model)]

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
        spent = [e - s for s, e in ticks]
        self.durations.extend(spent)
        self.steps += 1
        self.raw_seconds += end - start - sum(spent)
        return self.corrected(start, end, ticks)

    def rescale_factor(self):
        """The factor taking the times :meth:`time` returned to the run's median tick as the reference."""
        return statistics.median(self.durations) / self.reference if self.durations else 1.0

    def summary(self):
        """What the result file records: the reference ticks, ticks per step, and their share of the time."""
        tick_seconds = sum(self.durations)
        total = tick_seconds + self.raw_seconds
        return dict(calibration_ms=round(1000 * self.reference, 4),
                    reference_ms=round(1000 * self.reference * self.rescale_factor(), 4), steps=self.steps,
                    ticks_per_step=round(self.ticks / max(self.steps, 1), 2),
                    tick_share=round(tick_seconds / total, 4) if total else 0.0)
