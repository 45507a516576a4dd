"""``fastprefix-bench adapters`` (its command line is in ``__main__``): one batch over A adapters in one call,
against A separate calls.

B rows, row i on adapter ``i % A`` (adapters of one method, ``METHODS``, P-Tuning v2 by default, with the prefix or
prompt length, on the frozen backbone): one call with
``adapter_names=`` against A calls of the same rows, each with its adapter set active (what serving or multi-task
training does without per-row adapters), for A in ``--adapters``. Measured per A: training-step and inference
tokens/s (the B·S real tokens over the time of the one call or of the A calls; median (interquartile range) of
interleaved rounds, process CPU time on CPU) and the training step's peak memory (as the main benchmark measures
it). The rows' outputs of the two ways are checked equal before anything is timed.
"""

from __future__ import annotations

import statistics

import torch

import fastprefix

from . import backbones, measure


# the --method choices: (what the table calls it, its config for a prefix / prompt of L tokens)
METHODS = {
    "ptv2": ("P-Tuning v2", lambda L: fastprefix.PTuningV2Config(num_virtual_tokens=L)),
    "apt": ("APT (token gate)", lambda L: fastprefix.APTConfig(num_virtual_tokens=L)),
    "pt": ("prompt tuning", lambda L: fastprefix.PromptTuningConfig(num_virtual_tokens=L)),
    "dept": ("DePT", lambda L: fastprefix.DePTConfig(num_virtual_tokens=L)),
    "adept": ("ADePT", lambda L: fastprefix.ADePTConfig(num_virtual_tokens=L)),
}


def _adapters(model, A, L, method="ptv2"):
    config = METHODS[method][1]
    fastprefix.apply(model, config(L), adapter_name="a0")
    for a in range(1, A):
        fastprefix.add_adapter(model, config(L), f"a{a}")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct adapters: each moved off its init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p) * 0.1)
    return model


def _ways(model, ids, mask, names):
    """``(one_call, separate_calls)``: each a function ``(train) -> the rows' last hidden states [B, S, d]``."""
    groups = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)

    def one(train):
        out = model(input_ids=ids, attention_mask=mask, adapter_names=names).last_hidden_state
        if train:
            out.float().pow(2).mean().backward()
        return out

    def separate(train):
        out = None
        for name, rows in groups.items():
            fastprefix.set_adapter(model, name)
            part = model(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state
            if train:
                part.float().pow(2).sum().div(part.numel() // len(rows) * len(names)).backward()  # the same mean
            if out is None:
                out = part.new_empty(len(names), *part.shape[1:])
            out[rows] = part.detach()
        return out

    return one, separate


def measure_adapters(model_name, batch, seq_len, prefix_len, adapter_counts, rounds, device, load=None, atol=1e-4,
                     method="ptv2"):
    """One row per A: ``dict(A, train/infer tokens/s (median, q1, q3) of each way, their ratio, peak MiB)``, for
    adapters of ``method`` (a key of :data:`METHODS`).

    ``load``: a function giving a fresh frozen backbone on ``device`` (default: ``model_name``'s, from
    :func:`backbones.load_backbone`); ``atol``: how far the two ways' outputs may differ (a 16-bit model's GEMMs
    round rows differently in batches of other sizes)."""
    rows = []
    for A in adapter_counts:
        backbone = load() if load is not None else backbones.load_backbone(model_name).to(device)
        model = _adapters(backbone, A, prefix_len, method)
        model.train()
        g = torch.Generator().manual_seed(1)
        vocab = model.get_input_embeddings().num_embeddings  # ids in [1000, 20000) where the vocabulary allows
        ids = torch.randint(min(1000, vocab // 2), min(20000, vocab), (batch, seq_len), generator=g).to(device)
        mask = torch.ones_like(ids)
        names = [f"a{i % A}" for i in range(batch)]
        one, separate = _ways(model, ids, mask, names)
        with torch.no_grad():
            model.eval()
            assert torch.allclose(one(False), separate(False), atol=atol), "the two ways give other outputs"
        clock = "wall" if device.type == "cuda" else "cpu"
        result = dict(A=A)
        for phase, train in (("train", True), ("infer", False)):
            model.train(train)
            times = {"one": [], "separate": []}
            for r in range(rounds + 1):
                for way, fn in ((("one", one), ("separate", separate)) if r % 2 else
                                (("separate", separate), ("one", one))):
                    def step(fn=fn):
                        with torch.set_grad_enabled(train):
                            fn(train)
                        model.zero_grad(set_to_none=True)
                    seconds = measure.median_seconds(step, device, 0, 1, clock)[0]  # one timed call, synced
                    if r:  # the first round warms up
                        times[way].append(seconds)
            for way, ts in times.items():
                q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
                result[f"{phase}_{way}"] = tuple(batch * seq_len / t for t in (q[1], q[2], q[0]))
            result[f"{phase}_ratio"] = statistics.median(s / o for o, s in zip(times["one"], times["separate"]))
        model.train()
        for way, fn in (("one", one), ("separate", separate)):
            result[f"peak_{way}"] = measure.peak_bytes(lambda fn=fn: (fn(True), model.zero_grad(set_to_none=True)),
                                                       device) / 2 ** 20
        rows.append(result)
    return rows


def markdown(rows, model_name, batch, seq_len, prefix_len, rounds, device, method="ptv2"):
    """The results as a Markdown table with its setting."""
    return "\n".join([setting(model_name, batch, seq_len, prefix_len, rounds, device, method), "", *table(rows)]) + "\n"


def setting(model_name, batch, seq_len, prefix_len, rounds, device, method="ptv2"):
    """One paragraph: what :func:`measure_adapters` ran and how to read its table."""
    return (f"Backbone **{model_name}** (frozen), batch {batch}, sequence {seq_len}, {METHODS[method][0]} adapters "
            f"of length "
            f"{prefix_len}, row i on adapter i mod A, on {device}; {rounds} interleaved rounds after one warm-up, "
            f"tokens/s of the B·S tokens, median (interquartile range); x: the one call's speed over the A calls' "
            f"(median of the rounds' ratios); peak: the training step's peak live tensor bytes.")


def table(rows):
    """The Markdown table's lines, one row per A."""
    def tps(x):
        return f"{x[0]:,.0f} ({x[1]:,.0f}-{x[2]:,.0f})"

    lines = [
        "| A | train tok/s, one call | train tok/s, A calls | x | infer tok/s, one call | infer tok/s, A calls | x "
        "| peak MiB, one call | peak MiB, A calls |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['A']} | {tps(r['train_one'])} | {tps(r['train_separate'])} | {r['train_ratio']:.2f} "
                     f"| {tps(r['infer_one'])} | {tps(r['infer_separate'])} | {r['infer_ratio']:.2f} "
                     f"| {r['peak_one']:.1f} | {r['peak_separate']:.1f} |")
    return lines
