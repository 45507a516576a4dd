"""The benchmark's metronome: which sub-layers it ticks after, when it ticks, and the corrected step time.

The correction is checked on synthetic clocks with a known machine speed (a constant slowdown comes out
exactly; a slow spell inside a step comes out far closer than the raw time); the hooks on a tiny real
BERT: ticks after each sub-layer's forward and at its gradient in training, none outside a timed step,
gradients unchanged by them, and the run's median tick as the final unit.
"""

import statistics
import time

import pytest
import torch
from torch import nn

from fastprefix.benchmarks import backbones, measure, suite
from fastprefix.benchmarks.metronome import Metronome, blocks, tick_points
from helpers.models import tiny


def _tiny_bert(layers=3, vocab_size=64):
    return tiny("bert", dtype=torch.float32, dropout=0.0, num_hidden_layers=layers, vocab_size=vocab_size,
                max_position_embeddings=32)


@pytest.fixture(scope="module")
def metronome():
    return Metronome(reps=2, calibration_ticks=5)


# ---------------------------------------------------------------- which blocks


def test_blocks_are_the_outermost_module_lists():
    bert = _tiny_bert(layers=3)
    assert blocks(bert) == list(bert.encoder.layer)

    class Stack(nn.Module):  # blocks holding module lists of their own (T5's block.layer) tick once per block
        def __init__(self):
            super().__init__()
            self.block = nn.ModuleList(nn.Sequential(nn.ModuleList([nn.Linear(2, 2)])) for _ in range(2))

    stack = Stack()
    assert blocks(stack) == list(stack.block)
    plain = nn.Linear(2, 2)
    assert blocks(plain) == [plain]


def test_ticks_go_after_each_sub_layer_that_holds_a_matrix():
    bert = _tiny_bert(layers=2)
    assert tick_points(bert) == [m for layer in bert.encoder.layer
                                 for m in (layer.attention, layer.intermediate, layer.output)]

    class NormOnly(nn.Module):  # no sub-layer with a matrix: the block itself is the tick point
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.LayerNorm(2))])

    norm = NormOnly()
    assert tick_points(norm) == [norm.layers[0]]


# ---------------------------------------------------------------- the correction


def _machine(segments):
    """Clock readings for a step that alternates work and ticks: ``[(work, tick, speed)]``, times scale by speed.

    The work is in reference seconds; the tick costs 1 reference second. Returns ``(start, end, ticks,
    raw)`` where ``raw`` is the step's duration minus its ticks.
    """
    now, ticks, raw = 0.0, [], 0.0
    for work, tick, speed in segments:
        now += work * speed
        raw += work * speed
        if tick:
            ticks.append((now, now + speed))
            now += speed
    return 0.0, now, ticks, raw


def test_a_constant_slowdown_comes_out_exactly(metronome):
    metronome.reference = 1.0
    for speed in (0.8, 1.0, 1.7):
        start, end, ticks, raw = _machine([(0.3, True, speed), (0.5, True, speed), (0.2, False, speed)])
        assert metronome.corrected(start, end, ticks) == pytest.approx(1.0, rel=1e-12)
        assert raw == pytest.approx(speed, rel=1e-12)


def test_a_slow_spell_inside_the_step_is_mostly_taken_out(metronome):
    metronome.reference = 1.0
    # 1.0 reference seconds of work; the machine runs 30% slow for the middle third
    speeds = [1.0, 1.0, 1.3, 1.3, 1.0, 1.0]
    start, end, ticks, raw = _machine([(1 / 6, True, s) for s in speeds[:-1]] + [(1 / 6, False, speeds[-1])])
    corrected = metronome.corrected(start, end, ticks)
    assert abs(corrected - 1.0) < 0.25 * abs(raw - 1.0)


def test_no_ticks_leaves_the_time_as_it_is(metronome):
    assert metronome.corrected(2.0, 3.5, []) == 1.5


# ---------------------------------------------------------------- the hooks on a real model


def test_ticks_fire_per_block_in_forward_and_backward_and_only_when_timed(metronome):
    bert = _tiny_bert(layers=3)
    handles = metronome.attach(bert)
    ids = torch.randint(0, 64, (2, 5))
    embeds = bert.embeddings.word_embeddings(ids).detach().requires_grad_(True)

    def train():
        bert(inputs_embeds=embeds).last_hidden_state.sum().backward()

    def infer():
        with torch.inference_mode():
            bert(input_ids=ids)

    before = metronome.ticks
    train()  # untimed (a warm-up step): no tick
    assert metronome.ticks == before
    metronome.time(train)
    assert metronome.ticks - before == 18  # 3 blocks x (attention, intermediate, output), forward and gradient
    metronome.time(infer)
    assert metronome.ticks - before == 27
    for h in handles:
        h.remove()


def test_ticks_leave_gradients_and_outputs_unchanged(metronome):
    bert = _tiny_bert(layers=2)
    ids = torch.randint(0, 64, (2, 5))

    def grads():
        bert.zero_grad(set_to_none=True)
        out = bert(input_ids=ids).last_hidden_state
        out.pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in bert.parameters() if p.grad is not None]

    out0, g0 = grads()
    handles = metronome.attach(bert)
    box = {}
    metronome.time(lambda: box.update(r=grads()))
    out1, g1 = box["r"]
    for h in handles:
        h.remove()
    assert torch.equal(out0, out1) and len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_timed_steps_leave_the_ticks_out_and_summarise():
    m = Metronome(reps=2, calibration_ticks=5)
    bert = _tiny_bert(layers=2)
    m.attach(bert)
    ids = torch.randint(0, 64, (2, 5))
    t = m.time(lambda: bert(input_ids=ids))
    s = m.summary()
    assert t > 0 and s["steps"] == 1 and s["ticks_per_step"] == 6 and 0 < s["tick_share"] < 1
    assert s["calibration_ms"] == pytest.approx(1000 * m.reference, rel=1e-3)
    # the final unit is the median tick of the run, not the calibration burst's
    assert len(m.durations) == 6
    assert m.rescale_factor() == pytest.approx(statistics.median(m.durations) / m.reference, rel=1e-12)
    assert s["reference_ms"] == pytest.approx(1000 * statistics.median(m.durations), rel=1e-3)


def test_the_suite_hooks_every_row_and_times_by_the_metronome():
    m = Metronome(reps=2, calibration_ticks=5)
    bert = _tiny_bert(layers=2, vocab_size=2048)  # the rows draw token ids from [1000, 2000)
    shapes = backbones.describe(bert)
    setting = suite.C.Setting(batch=2, seq_len=6, prefix_len=3)
    runners = suite._runners(bert, shapes, setting, torch.device("cpu"), ["P-Tuning v2 (original)", "floor"],
                             exact=True, clock=m)
    times = {n: [] for n, _ in runners}
    suite._round(runners, "train_step", torch.device("cpu"), m, 0, times, suite.NullProgress(), "t")
    assert all(len(v) == 1 and v[0] > 0 for v in times.values())
    assert m.ticks == 12 * len(runners)  # 2 blocks x 3 sub-layers, forward and backward, in every row's own copy


def test_the_metronome_reads_the_clock_it_is_given():
    readings = iter(range(10_000))
    m = Metronome(clock=lambda: float(next(readings)), reps=1, calibration_ticks=3)
    assert m.reference == 1.0  # each tick spans two consecutive readings
    assert measure.CLOCKS["cpu"] is time.process_time
