"""The reference path against deliberately naive float64 implementations written here.

The naive versions build ``[g * Pk ; K]`` and ``[g * Pv ; V]`` explicitly, per batch row, per head and per
query, with an explicit softmax: nothing shared with the code under test but torch's basic arithmetic. They are
the independent check of the package's explicit twin (``fastprefix.reference.attention.explicit_attention``,
called through tests/helpers/numerics.py), which the other op tests (tests/ops/test_attention_features.py,
tests/ops/test_split_features.py) use as their float64 oracle: it is checked here on every attention case, once
as called and once with a bias, a window and a softcap added.
"""

import math

import pytest
import torch

import fastprefix
from helpers.numerics import explicit_attention

F64 = torch.float64


# ---------------------------------------------------------------- naive implementations


def naive_attention(q, k, v, pk, pv, gate, kpm, causal, scale, attn_bias=None, window=None, softcap=None):
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    L = pk.shape[-2]
    out = torch.zeros(B, H, Sq, D, dtype=F64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            pkb = pk[b, hk] if pk.dim() == 4 else pk[hk]
            pvb = pv[b, hk] if pv.dim() == 4 else pv[hk]
            for t in range(Sq):
                g = torch.ones(L, dtype=F64) if gate is None else gate.expand(B, Sq, L)[b, t]
                keys = torch.cat([g[:, None] * pkb, k[b, hk]])  # the explicit concatenation
                vals = torch.cat([g[:, None] * pvb, v[b, hk]])
                logits = scale * (keys @ q[b, h, t])
                if softcap is not None:
                    logits = softcap * torch.tanh(logits / softcap)
                if attn_bias is not None:
                    logits[L:] += attn_bias.expand(B, H, Sq, Sk)[b, h, t]
                left, right = window if window is not None else (-1, -1)
                pos = t + Sk - Sq  # the query's position among the keys (bottom-right aligned)
                for u in range(Sk):
                    hidden = (kpm is not None and not kpm[b, u]) or (causal and u > pos)
                    hidden = hidden or (left >= 0 and u < pos - left) or (right >= 0 and u > pos + right)
                    if hidden:
                        logits[L + u] = -math.inf
                p = torch.exp(logits - logits.max())
                out[b, h, t] = (p / p.sum()) @ vals
    return out


def naive_gate(hidden, w, bias, lam, mode, kpm):
    if mode == "pooled":
        rows = []
        for b in range(hidden.shape[0]):
            real = hidden[b] if kpm is None else hidden[b][kpm[b]]
            rows.append(real.mean(0))
        hidden = torch.stack(rows)[:, None]
    return lam * (1 / (1 + torch.exp(-(hidden @ w + bias))))


def naive_adept(ids, E, P, A, a, Bm, b, mask):
    out = []
    for row in ids:
        xs = [P[i] for i in range(P.shape[0])] if P is not None else []
        for s, tok in enumerate(row):
            x = E[tok]
            t = x @ A + a
            if mask is not None:
                t = t * mask[len(out), s]
            xs.append(x + torch.clamp(t, min=0) @ Bm + b)
        out.append(torch.stack(xs))
    return torch.stack(out)


def naive_dept(ids, E, P, A, Bm, scaling):
    out = []
    for row in ids:
        xs = [P[i] for i in range(P.shape[0])] if P is not None else []
        xs += [E[tok] + scaling * (A[s] @ Bm) for s, tok in enumerate(row)]
        out.append(torch.stack(xs))
    return torch.stack(out)


# ---------------------------------------------------------------- attention

ATTN_CASES = {
    # id: B, H, Hkv, Sq, Sk, L, D, shared prefix, padding, causal, gate mode
    "mha-S1-L1": (1, 2, 2, 1, 1, 1, 16, True, False, False, None),
    "gqa-S7-L5-dense-gate": (2, 4, 2, 7, 7, 5, 16, True, False, False, "dense"),
    "mqa-S9-pad-causal-token": (2, 4, 1, 9, 9, 3, 8, False, True, True, "token"),
    "pooled-gate-pad": (3, 2, 2, 6, 6, 4, 8, True, True, False, "pooled"),
    "decode-Sq2-Sk8-causal": (2, 2, 1, 2, 8, 3, 8, True, True, True, "token"),
    "per-example-prefix-causal": (2, 2, 2, 5, 5, 2, 8, False, False, True, "dense"),
    "zero-gate": (1, 2, 2, 4, 4, 3, 8, True, False, False, "zero"),
}


def _attention_inputs(B, H, Hkv, Sq, Sk, L, D, shared, padding, gate_mode, dtype=F64, d=12):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    pshape = (Hkv, L, D) if shared else (B, Hkv, L, D)
    x = dict(q=r(B, H, Sq, D), k=r(B, Hkv, Sk, D), v=r(B, Hkv, Sk, D), prefix_k=r(*pshape), prefix_v=r(*pshape))
    kpm = None
    if padding:
        lengths = torch.randint(1, Sk + 1, (B,), generator=g)
        lengths[0] = Sk
        kpm = torch.arange(Sk)[None, :] >= (Sk - lengths[:, None])  # left padding: the real tokens last
    extra = {}
    if gate_mode == "dense":
        extra["gate"] = torch.rand(B, Sq, L, generator=g, dtype=dtype) * 2
    elif gate_mode == "zero":
        extra["gate"] = torch.zeros(1, 1, L, dtype=dtype)
    elif gate_mode in ("token", "pooled"):
        extra = dict(gate_hidden=r(B, Sq, d), gate_weight=r(d, L) * 0.5, gate_bias=r(L), layer_scale=r(()).abs() + 0.5)
    return x, kpm, extra


@pytest.mark.parametrize("case", ATTN_CASES.values(), ids=ATTN_CASES.keys())
def test_attention_matches_naive(case):
    B, H, Hkv, Sq, Sk, L, D, shared, padding, causal, gate_mode = case
    x, kpm, extra = _attention_inputs(B, H, Hkv, Sq, Sk, L, D, shared, padding, gate_mode)
    if gate_mode == "pooled":
        gate = fastprefix.apt_gate(extra["gate_hidden"], extra["gate_weight"], extra["gate_bias"],
                                   extra["layer_scale"], mode="pooled",
                                   key_padding_mask=kpm[:, -Sq:] if kpm is not None else None)
        extra = {"gate": gate}
    out = fastprefix.gated_prefix_attention(**x, **extra, key_padding_mask=kpm, causal=causal, backend="torch")
    gate = extra.get("gate")
    if "gate_hidden" in extra:
        gate = naive_gate(extra["gate_hidden"], extra["gate_weight"], extra["gate_bias"], extra["layer_scale"], "token", None)
    want = naive_attention(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], gate, kpm, causal, D ** -0.5)
    assert out.shape == (B, H, Sq, D)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # the explicit twin, as called and with the features added (a bias drawn from its own generator)
    call = dict(**extra, key_padding_mask=kpm, causal=causal)
    torch.testing.assert_close(explicit_attention(**x, **call), want, rtol=1e-12, atol=1e-12)
    features = dict(attn_bias=torch.randn(1, H, Sq, Sk, generator=torch.Generator().manual_seed(4), dtype=F64),
                    window=(2, 1), softcap=2.0)
    want = naive_attention(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], gate, kpm, causal, D ** -0.5,
                           **features)
    torch.testing.assert_close(explicit_attention(**x, **call, **features), want, rtol=1e-12, atol=1e-12)


def test_zero_gate_is_a_prefix_with_zero_keys_and_values():
    """A zero gate gives logits of 0 (mass exp(0)) and no value: never NaN, never dropped."""
    x, _, _ = _attention_inputs(1, 2, 2, 3, 3, 4, 8, True, False, None)
    out = fastprefix.gated_prefix_attention(**x, gate=torch.zeros(1, 1, 4, dtype=F64))
    zeros = torch.zeros_like(x["prefix_k"])
    want = fastprefix.gated_prefix_attention(x["q"], x["k"], x["v"], zeros, zeros)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=0, atol=1e-14)


def test_fully_padded_query_row_stays_finite():
    x, _, _ = _attention_inputs(2, 2, 2, 4, 4, 2, 8, True, False, None)
    kpm = torch.tensor([[True] * 4, [False] * 4])
    out = fastprefix.gated_prefix_attention(**x, key_padding_mask=kpm, causal=True)
    assert torch.isfinite(out).all()


def test_gqa_equals_repeated_heads():
    x, _, _ = _attention_inputs(2, 6, 2, 5, 5, 3, 8, True, False, None)
    out = fastprefix.gated_prefix_attention(**x)
    rep = {n: x[n].repeat_interleave(3, dim=-3) for n in ("k", "v", "prefix_k", "prefix_v")}
    torch.testing.assert_close(out, fastprefix.gated_prefix_attention(x["q"], **rep), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "per-example-prefix"])
@pytest.mark.parametrize("gate_mode", [None, "dense", "token"], ids=["ptv2", "dense-gate", "fused-gate"])
def test_attention_gradcheck(gate_mode, shared):
    """Through every formulation the reference picks on CPU (the gated ones: the split algorithm, whose prefix GEMMs
    fold the batch into rows for a shared prefix and run per row otherwise), GQA, padding and causal."""
    x, kpm, extra = _attention_inputs(2, 4, 2, 5, 5, 3, 8, shared, True, gate_mode)
    inputs = {**x, **extra}
    names = list(inputs)
    for t in inputs.values():
        t.requires_grad_(True)

    def f(*args):
        return fastprefix.gated_prefix_attention(**dict(zip(names, args)), key_padding_mask=kpm, causal=True)

    assert torch.autograd.gradcheck(f, tuple(inputs.values()))


@pytest.mark.parametrize("gate_mode", ["dense", "token"], ids=["dense-gate", "fused-gate"])
def test_split_path_saves_no_prefix_scores(gate_mode):
    """The CPU split path keeps what FlashAttention keeps (inputs, merged output, log-sum-exps): nothing autograd
    saves for its backward has the size of the [B, H, Sq, L] prefix scores, which the backward recomputes."""
    B, H, Sq, L = 2, 4, 6, 5
    x, kpm, extra = _attention_inputs(B, H, 2, Sq, Sq, L, 8, True, True, gate_mode)
    inputs = {**x, **extra}
    for t in inputs.values():
        t.requires_grad_(True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out = fastprefix.gated_prefix_attention(**inputs, key_padding_mask=kpm, causal=True)
    assert sizes and B * H * Sq * L not in sizes, sizes  # (q, K and the rest have other sizes here)
    out.sum().backward()  # and the backward still runs from what was kept
    assert all(t.grad is not None and t.grad.isfinite().all() for t in inputs.values())


@pytest.mark.parametrize("mode", ["token", "pooled"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_apt_gate(mode, padded):
    g = torch.Generator().manual_seed(2)
    h, w, b = (torch.randn(*s, generator=g, dtype=F64) for s in [(3, 5, 6), (6, 4), (4,)])
    lam = torch.tensor(0.7, dtype=F64)
    kpm = torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [False] + [True] * 4]) if padded else None
    got = fastprefix.apt_gate(h, w, b, lam, mode=mode, key_padding_mask=kpm)
    assert got.shape == ((3, 5, 4) if mode == "token" else (3, 1, 4))
    torch.testing.assert_close(got, naive_gate(h, w, b, lam, mode, kpm), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_attention_low_precision_close_to_float64(dtype):
    x, kpm, extra = _attention_inputs(2, 4, 2, 9, 9, 3, 16, True, True, "dense")
    out = fastprefix.gated_prefix_attention(**{n: t.to(dtype) for n, t in {**x, **extra}.items()}, key_padding_mask=kpm)
    ref = fastprefix.gated_prefix_attention(**x, **extra, key_padding_mask=kpm)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    assert (out.double() - ref).abs().max() < tol


# ---------------------------------------------------------------- embeddings

EMB_CASES = {
    # id: B, S, m, d, r, V
    "S1-m0": (1, 1, 0, 8, 1, 11),
    "S3-m1-r19": (2, 3, 1, 16, 19, 7),
    "S13-m5": (3, 13, 5, 24, 4, 50),
}


def _emb_inputs(B, S, m, d, r, V, seed=3):
    g = torch.Generator().manual_seed(seed)
    r_ = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    ids = torch.randint(0, V, (B, S), generator=g)
    ids[0, 0] = ids[-1, -1]  # a repeated id
    return ids, r_(V, d), (r_(m, d) if m else None), g


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("case", EMB_CASES.values(), ids=EMB_CASES.keys())
def test_adept_matches_naive(case, dropout):
    B, S, m, d, r, V = case
    ids, E, P, g = _emb_inputs(B, S, m, d, r, V)
    A, a, Bm, b = (torch.randn(*s, generator=g, dtype=F64) for s in [(d, r), (r,), (r, d), (d,)])
    mask = (torch.rand(B, S, r, generator=g) > 0.1).to(F64) / 0.9 if dropout else None
    out = fastprefix.adept_embedding(ids, E, P, A, a, Bm, b, dropout_mask=mask, backend="torch")
    assert out.shape == (B, m + S, d)
    torch.testing.assert_close(out, naive_adept(ids, E, P, A, a, Bm, b, mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", EMB_CASES.values(), ids=EMB_CASES.keys())
def test_dept_matches_naive(case):
    B, S, m, d, r, V = case
    ids, E, P, g = _emb_inputs(B, S, m, d, r, V)
    A, Bm = torch.randn(S + 3, r, generator=g, dtype=F64), torch.randn(r, d, generator=g, dtype=F64)
    out = fastprefix.dept_embedding(ids, E, P, A, Bm, scaling=0.8, backend="torch")
    assert out.shape == (B, m + S, d)
    torch.testing.assert_close(out, naive_dept(ids, E, P, A, Bm, 0.8), rtol=1e-12, atol=1e-12)


def test_embedding_gradcheck():
    ids, E, P, g = _emb_inputs(2, 3, 2, 6, 3, 5)
    A, a, Bm, b = (torch.randn(*s, generator=g, dtype=F64) for s in [(6, 3), (3,), (3, 6), (6,)])
    params = [E, P, A, a, Bm, b]
    for p in params:
        p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *p: fastprefix.adept_embedding(ids, *p), tuple(params))
    la, lb = torch.randn(4, 3, dtype=F64, requires_grad=True), torch.randn(3, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *p: fastprefix.dept_embedding(ids, *p, scaling=2.0), (E, P, la, lb))


# ---------------------------------------------------------------- bad input


def _ok_attention():
    x, _, _ = _attention_inputs(2, 4, 2, 5, 5, 3, 8, True, False, None)
    return x


ATTN_ERRORS = {
    "q-3d": (lambda x: x.update(q=x["q"][0]), "q must have shape"),
    "heads-not-multiple": (lambda x: x.update(k=x["k"][:, :1].expand(2, 3, 5, 8), v=x["v"][:, :1].expand(2, 3, 5, 8)),
                           "multiple of the key/value heads"),
    "v-wrong-S": (lambda x: x.update(v=x["v"][:, :, :4]), "v must have shape"),
    "prefix-wrong-D": (lambda x: x.update(prefix_k=x["prefix_k"][..., :4]), "prefix_k must have shape"),
    "prefix-v-wrong-L": (lambda x: x.update(prefix_v=x["prefix_v"][:, :2]), "prefix_v must have shape"),
    "dtype-mix": (lambda x: x.update(k=x["k"].float()), "dtype"),
    "gate-wrong-L": (lambda x: x.update(gate=torch.ones(2, 5, 4, dtype=F64)), "gate must broadcast"),
    "gate-and-fused": (lambda x: x.update(gate=torch.ones(1, 1, 3, dtype=F64), layer_scale=torch.tensor(1.0, dtype=F64)),
                       "not both"),
    "fused-incomplete": (lambda x: x.update(gate_hidden=torch.ones(2, 5, 4, dtype=F64)), "needs all of"),
    "mask-not-bool": (lambda x: x.update(key_padding_mask=torch.ones(2, 5)), "key_padding_mask must have dtype"),
    "mask-wrong-S": (lambda x: x.update(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), "key_padding_mask must have shape"),
    "more-queries-than-keys": (lambda x: x.update(q=torch.ones(2, 4, 6, 8, dtype=F64)), "Sq <= Sk"),
    "bad-backend": (lambda x: x.update(backend="cuda"), "backend must be one of"),
}


@pytest.mark.parametrize("edit,match", ATTN_ERRORS.values(), ids=ATTN_ERRORS.keys())
def test_attention_bad_input(edit, match):
    x = _ok_attention()
    edit(x)
    with pytest.raises(ValueError, match=match):
        fastprefix.gated_prefix_attention(**x)


def test_attention_device_mix():
    x = _ok_attention()
    x["k"] = x["k"].to("meta")
    with pytest.raises(ValueError, match="is on meta"):
        fastprefix.gated_prefix_attention(**x)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fastprefix.gated_prefix_attention(**_ok_attention(), backend="triton")


def _ok_adept():
    ids, E, P, g = _emb_inputs(2, 3, 2, 6, 3, 5)
    return dict(input_ids=ids, weight=E, prompt=P, down_weight=torch.zeros(6, 3, dtype=F64),
                down_bias=torch.zeros(3, dtype=F64), up_weight=torch.zeros(3, 6, dtype=F64), up_bias=torch.zeros(6, dtype=F64))


EMB_ERRORS = {
    "id-too-large": (lambda x: x.update(input_ids=torch.tensor([[0, 5]])), r"ids in \[0, 5\] but the embedding table has 5 rows"),
    "id-negative": (lambda x: x.update(input_ids=torch.tensor([[-1, 2]])), "ids in"),
    "ids-float": (lambda x: x.update(input_ids=x["input_ids"].double()), "int64"),
    "ids-1d": (lambda x: x.update(input_ids=x["input_ids"][0]), r"shape \[B, S\]"),
    "prompt-wrong-d": (lambda x: x.update(prompt=torch.zeros(2, 5, dtype=F64)), "prompt must have shape"),
    "down-wrong-d": (lambda x: x.update(down_weight=torch.zeros(5, 3, dtype=F64)), "down_weight must have shape"),
    "up-wrong-r": (lambda x: x.update(up_weight=torch.zeros(4, 6, dtype=F64)), "up_weight must have shape"),
    "dtype-mix": (lambda x: x.update(up_bias=torch.zeros(6)), "dtype"),
    "mask-wrong-r": (lambda x: x.update(dropout_mask=torch.ones(2, 3, 2, dtype=F64)), "dropout_mask must have shape"),
}


@pytest.mark.parametrize("edit,match", EMB_ERRORS.values(), ids=EMB_ERRORS.keys())
def test_adept_bad_input(edit, match):
    x = _ok_adept()
    edit(x)
    with pytest.raises(ValueError, match=match):
        fastprefix.adept_embedding(**x)


def test_dept_too_long_is_an_error_not_a_truncation():
    ids, E, P, _ = _emb_inputs(2, 6, 2, 6, 3, 5)
    with pytest.raises(ValueError, match="S=6 tokens but DePT's lora_a has offset rows for only s=4"):
        fastprefix.dept_embedding(ids, E, P, torch.zeros(4, 3, dtype=F64), torch.zeros(3, 6, dtype=F64))


@pytest.mark.parametrize("shape", [(3,), (5, 3), (1, 1, 3)], ids=["L", "Sq-L", "1-1-L"])
def test_attention_accepts_every_broadcastable_gate(shape):
    x, kpm, _ = _attention_inputs(2, 4, 2, 5, 5, 3, 8, True, True, None)
    gate = torch.rand(*shape, dtype=F64) * 2
    out = fastprefix.gated_prefix_attention(**x, gate=gate, key_padding_mask=kpm, causal=True)
    want = naive_attention(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], gate.expand(2, 5, 3), kpm, True, 8 ** -0.5)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_range_ids_are_refused_on_every_backend(backend):
    x = _ok_adept()
    x["input_ids"] = torch.tensor([[0, 5]])
    with pytest.raises(ValueError, match=r"ids in \[0, 5\] but the embedding table has 5 rows"):
        fastprefix.adept_embedding(**x, backend=backend)
    ids, E, P, _ = _emb_inputs(1, 2, 1, 6, 3, 5)
    with pytest.raises(ValueError, match=r"ids in \[-1, "):
        fastprefix.dept_embedding(torch.tensor([[-1, 1]]), E, P, torch.zeros(4, 3, dtype=F64),
                                  torch.zeros(3, 6, dtype=F64), backend=backend)
