"""pytest-benchmark suites of the functional ops on the reference path (CPU), against their floors.

Run with ``make bench-ops``. Each group times one op, forward + backward, next to the cheapest thing
that computes the same amount of attention (``scaled_dot_product_attention`` over S+L keys) or
embedding (a plain lookup with the prompt concatenated). Shapes: MiniLM's (12 heads of 32, d=384)
and a GQA decoder's (8 query heads over 2 key/value heads of 64).
"""

import pytest
import torch
import torch.nn.functional as F

import fastprefix

ATTN = {  # id: B, H, Hkv, S, L, D, d, causal
    "minilm-B8-S128-L32": (8, 12, 12, 128, 32, 32, 384, False),
    "gqa-B2-S512-L64-causal": (2, 8, 2, 512, 64, 64, 512, True),
}
EMB = {  # id: B, S, m, d, r, V
    "minilm-B8-S128-m32": (8, 128, 32, 384, 19, 30522),
}


def _attention_inputs(B, H, Hkv, S, L, D, d):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_(True)  # noqa: E731
    x = dict(q=r(B, H, S, D), k=r(B, Hkv, S, D), v=r(B, Hkv, S, D), prefix_k=r(Hkv, L, D), prefix_v=r(Hkv, L, D))
    gate = dict(gate_hidden=r(B, S, d), gate_weight=r(d, L), gate_bias=r(L), layer_scale=r(()))
    return x, gate


def _fwd_bwd(fn):
    def run():
        out = fn()
        out.backward(torch.ones_like(out))
        return out
    return run


@pytest.mark.parametrize("method", ["ptv2", "apt-pooled", "apt-token", "floor-sdpa-S+L"])
@pytest.mark.parametrize("case", ATTN.values(), ids=ATTN.keys())
def test_gated_prefix_attention(benchmark, case, method):
    B, H, Hkv, S, L, D, d, causal = case
    benchmark.group = f"attention fwd+bwd {B}x{H}/{Hkv}x{S}+{L}x{D}"
    x, gate = _attention_inputs(B, H, Hkv, S, L, D, d)
    if method == "floor-sdpa-S+L":
        k = torch.randn(B, Hkv, S + L, D, requires_grad=True)
        v = torch.randn(B, Hkv, S + L, D, requires_grad=True)
        mask = None
        if causal:  # the same visibility: the first L keys seen by all, then causal
            mask = torch.ones(S, S + L, dtype=torch.bool).tril(diagonal=L)
        fn = lambda: F.scaled_dot_product_attention(x["q"], k, v, attn_mask=mask, enable_gqa=H != Hkv)  # noqa: E731
    elif method == "ptv2":
        fn = lambda: fastprefix.gated_prefix_attention(**x, causal=causal)  # noqa: E731
    elif method == "apt-pooled":
        fn = lambda: fastprefix.gated_prefix_attention(**x, causal=causal, gate=fastprefix.apt_gate(  # noqa: E731
            gate["gate_hidden"], gate["gate_weight"], gate["gate_bias"], gate["layer_scale"], mode="pooled"))
    else:
        fn = lambda: fastprefix.gated_prefix_attention(**x, **gate, causal=causal)  # noqa: E731
    out = benchmark(_fwd_bwd(fn))
    assert out.shape == (B, H, S, D) and torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["adept", "dept", "pt", "floor-lookup+concat"])
@pytest.mark.parametrize("case", EMB.values(), ids=EMB.keys())
def test_prompt_embedding(benchmark, case, method):
    B, S, m, d, r, V = case
    benchmark.group = f"embedding fwd+bwd {B}x{S}+{m}x{d} r={r}"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, S), generator=g)
    table = torch.randn(V, d, generator=g)
    prompt = torch.randn(m, d, generator=g, requires_grad=True)
    A, a, Bm, b = (torch.randn(*s, generator=g).requires_grad_(True) for s in [(d, r), (r,), (r, d), (d,)])
    if method == "adept":
        fn = lambda: fastprefix.adept_embedding(ids, table, prompt, A, a, Bm, b)  # noqa: E731
    elif method == "dept":
        la = torch.randn(S, r, generator=g, requires_grad=True)
        fn = lambda: fastprefix.dept_embedding(ids, table, prompt, la, Bm, scaling=2.0)  # noqa: E731
    elif method == "pt":
        fn = lambda: fastprefix.prompt_tuning_embedding(ids, table, prompt)  # noqa: E731
    else:
        fn = lambda: torch.cat([prompt.expand(B, -1, -1), F.embedding(ids, table)], dim=1)  # noqa: E731
    out = benchmark(_fwd_bwd(fn))
    assert out.shape == (B, m + S, d)


def test_apt_gate(benchmark):
    B, S, d, L = 8, 128, 384, 32
    benchmark.group = "apt_gate fwd+bwd"
    g = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(*s, generator=g).requires_grad_(True) for s in [(B, S, d), (d, L), (L,)])
    lam = torch.ones((), requires_grad=True)
    out = benchmark(_fwd_bwd(lambda: fastprefix.apt_gate(h, w, b, lam)))
    assert out.shape == (B, S, L)
