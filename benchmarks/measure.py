"""Timing and peak memory of one contender: training step, inference, peak memory.

- Time: wall clock of each call (``torch.cuda.synchronize`` around it on CUDA). ``clock="cpu"`` times
  the process's CPU time instead (CPU only): on a shared, oversubscribed machine it leaves out the time
  other processes held the cores, which makes single-threaded runs comparable (with several threads it
  also counts their spin-waiting). With one thread the CPU default is that CPU time corrected by the
  :mod:`.metronome` (ticks of fixed work inside the step), which :mod:`.suite` applies. Every step's
  duration is kept: :mod:`.suite` interleaves the rows' steps and :mod:`.stats` turns them into medians, spreads
  and ratios with intervals.
- Peak memory on CUDA: ``torch.cuda.max_memory_allocated`` during one step, minus the allocation before it.
- Peak memory on CPU: the peak of live tensor bytes during one step above the bytes live before it,
  replayed from ``torch.profiler``'s allocation events (``profile_memory=True``) — the CPU analogue of
  the CUDA number (process RSS is dominated by the allocator's caching and the model, and tracemalloc
  does not see torch's allocations).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def median_seconds(fn, device, warmup, repeats, clock="wall"):
    """``(median, [repeats durations])`` in seconds of ``fn()`` after ``warmup`` untimed calls."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = now()
        fn()
        _sync(device)
        times.append(now() - t0)
    return statistics.median(times), times


@contextlib.contextmanager
def _native_stderr_silenced():
    """Point file descriptor 2 at /dev/null inside the block (C++ log lines bypass Python's ``sys.stderr``).

    torch's profiler writes a "profiler_start"/"profiler_stop" line per use from C++, which would land
    between the progress bar's redraws 24 times a run. Python exceptions still carry their messages.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn):
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def peak_bytes(fn, device):
    """Peak extra bytes allocated while ``fn`` runs (see the module docstring for how)."""
    fn()  # warm: optimiser state and caches exist before we measure
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_bytes(fn)


class Runner:
    """One contender with a small classification head, an AdamW optimiser and a fixed batch."""

    def __init__(self, contender, batch, device, num_labels=2):
        self.c = contender
        self.ids, self.mask, self.labels = (t.to(device) for t in batch)
        d = contender.shapes["hidden_size"]
        self.head = nn.Linear(d, num_labels).to(device)
        self.params = contender.trainable() + list(self.head.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        self.device = device

    def train_step(self):
        self.c.train(True)
        self.opt.zero_grad(set_to_none=True)
        hidden = self.c.forward(self.ids, self.mask)
        loss = F.cross_entropy(self.head(hidden.float().mean(dim=1)), self.labels)
        loss.backward()
        self.opt.step()
        return loss

    def infer_step(self):
        self.c.train(False)
        with torch.inference_mode():
            return self.head(self.c.forward(self.ids, self.mask).float().mean(dim=1))

    def trainable_count(self):
        return sum(p.numel() for p in self.c.trainable())
