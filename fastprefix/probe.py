"""APT's gates as a probe: which layers lean on their prefix (the APT paper's analysis).

Every forward of an APT model records, per layer i, the token gate ``alpha_i = sigmoid(h W_i + b_i)``
averaged over the real query tokens (``[L]``, one value per prefix token). :func:`gate_report` turns that
and the layer scales ``lambda_i`` into a per-layer table and an optional bar chart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .integrations import transformers as integration


@dataclass
class GateReport:
    """Per-layer APT gate statistics: ``alpha`` (mean token gate), ``lam`` (lambda), ``gate`` (lambda * alpha)."""

    alpha: list
    lam: list
    gate: list
    alpha_per_token: list  # [N][L]: the mean gate of every prefix token

    @property
    def num_layers(self):
        return len(self.alpha)

    def to_dict(self):
        return {"alpha": self.alpha, "lambda": self.lam, "gate": self.gate, "alpha_per_token": self.alpha_per_token}

    def __str__(self):
        rows = ["layer  mean alpha    lambda  mean lambda*alpha"]
        for i, (a, lam, g) in enumerate(zip(self.alpha, self.lam, self.gate)):
            rows.append(f"{i:5d}  {a:10.4f}  {lam:8.4f}  {g:17.4f}")
        return "\n".join(rows)

    def plot(self, path, *, title="APT gates per layer"):
        """Draw a bar chart of mean alpha and mean lambda*alpha per layer to ``path`` (PNG). Returns ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = range(self.num_layers)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * self.num_layers + 2), 3.2))
        w = 0.4
        ax.bar([i - w / 2 for i in layers], self.alpha, w, label="mean token gate alpha")
        ax.bar([i + w / 2 for i in layers], self.gate, w, label="mean lambda * alpha")
        ax.set_xlabel("layer")
        ax.set_xticks(list(layers))
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def gate_report(model, inputs=None):
    """APT gate statistics of ``model``'s last forward, or of running ``inputs`` now (model kwargs, e.g. a batch).

    Returns a :class:`GateReport`. ValueError if the applied method is not APT or nothing was recorded.
    """
    state = integration.state_of(model)
    if not state.gated:
        raise ValueError(f"gate_report needs an APT model; the applied method is {state.config.method!r}")
    if inputs is not None:
        if not isinstance(inputs, Mapping):
            raise ValueError(f"inputs must be a mapping of model keyword arguments, got {type(inputs).__name__}")
        state.gate_stats.clear()
        with torch.no_grad():
            model(**inputs)
    n = state.module.num_layers  # one gate per prefix site (T5: encoder and decoder self-attentions)
    if len(state.gate_stats) != n:
        raise ValueError("no gate statistics recorded yet: run a forward pass first or pass inputs")
    lam = state.module.layer_scale.detach().float().cpu()
    per_token = [state.gate_stats[i].cpu() for i in range(n)]
    alpha = [float(t.mean()) for t in per_token]
    return GateReport(alpha=alpha, lam=[float(x) for x in lam], gate=[float(x) * a for x, a in zip(lam, alpha)],
                      alpha_per_token=[t.tolist() for t in per_token])


def record_gates(model, enabled=True):
    """Turn the per-forward gate recording of an APT model on (default) or off.

    Recording costs one extra ``[B*S, d] x [d, L]`` product per layer in token mode (~1% of a layer); turn it
    off for benchmarks or production training when no gate report is wanted. Returns ``model``.
    """
    state = integration.state_of(model)
    if not state.gated:
        raise ValueError(f"record_gates needs an APT model; the applied method is {state.config.method!r}")
    state.record_gates = bool(enabled)
    if not enabled:
        state.gate_stats.clear()
    return model
