"""Prefix methods (P-Tuning v2, APT) on 🤗 models: per-forward state, attention switches, the causal pooled gate,
``output_attentions`` and autocast. Float64 against explicit references unless the test is about a dtype."""

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastprefix
from fastprefix.integrations import attention as _attention
from fastprefix.integrations.gates import RUNNING
from fastprefix.reference.attention import gate_of
from fastprefix.spec import AttentionSpec
from helpers.models import batch, perturb, positions, run, tiny

EXACT = dict(atol=1e-10, rtol=1e-10)
# prefix dropout on, so a recompute that drew a new mask would show
CONFIGS = {
    "ptv2": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=5, prefix_dropout=0.3),
    "ptv2-proj": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=5, prefix_dropout=0.3, prefix_projection=True,
                                                    projection_hidden=16),
    "apt": lambda: fastprefix.APTConfig(num_virtual_tokens=5, prefix_dropout=0.3),
    "apt-pooled": lambda: fastprefix.APTConfig(num_virtual_tokens=5, prefix_dropout=0.3, gate="pooled"),
}
KINDS = ("llama", "bert")  # a decoder (GQA, causal) and an encoder


def _applied(kind, method, dtype=torch.float64, **kw):
    model = tiny(kind, dtype=dtype)
    fastprefix.apply(model, CONFIGS[method](), **kw)
    return perturb(model)


def _side(kind):
    return "left" if kind == "llama" else "right"


def _checkpointing(model):
    with warnings.catch_warnings():  # transformers 5 renamed it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _accumulated_grads(kind, method, checkpointing):
    """Three forwards of different batch sizes and lengths (dropout on), one backward of their summed losses."""
    model = _applied(kind, method).train()
    if checkpointing:
        _checkpointing(model)
    torch.manual_seed(11)
    loss = 0
    for k, lengths in enumerate(([6, 3], [4, 4, 2], [5])):
        ids, mask = batch(lengths, _side(kind), seed=3 + k)
        loss = loss + run(model, kind, ids, mask).pow(2).mean() * (k + 1)
    loss.backward()
    return {n: p.grad for n, p in model.fastprefix.named_parameters()}


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_forwards_of_any_shapes_before_one_backward_give_the_plain_gradients(kind, method):
    want = _accumulated_grads(kind, method, checkpointing=False)
    got = _accumulated_grads(kind, method, checkpointing=True)
    assert all(g is not None and bool(g.abs().sum() > 0) for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], **EXACT, msg=name)


def test_deepcopy_after_a_forward_with_grad_copies_a_working_model():
    model = _applied("llama", "apt-pooled").train()
    ids, mask = batch([6, 3], "left")
    run(model, "llama", ids, mask).sum().backward()  # leaves nothing of the forward on the model
    twin = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(twin, "llama", ids, mask), run(model, "llama", ids, mask), atol=0, rtol=0)
    assert fastprefix.gate_report(twin).num_layers == 2


def test_torch_save_of_an_applied_model_loads_in_a_fresh_process(tmp_path):
    model = _applied("llama", "apt").eval()
    ids, mask = batch([6, 3], "left")
    with torch.no_grad():
        want = run(model, "llama", ids, mask)
    torch.save({"model": model, "ids": ids, "mask": mask, "want": want}, tmp_path / "model.pt")
    code = ("import sys, torch; sys.path.insert(0, sys.argv[2]); from helpers.models import run\n"
            "d = torch.load(sys.argv[1], weights_only=False)\n"
            "with torch.no_grad(): got = run(d['model'], 'llama', d['ids'], d['mask'])\n"
            "assert torch.equal(got, d['want']), (got - d['want']).abs().max()\n")
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt"), tests], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("how", ["top-level", "top-level dict", "inner model", "config attribute"])
def test_switching_the_attention_away_is_a_clear_error_and_remove_allows_it(how):
    model = _applied("llama", "ptv2").eval()
    ids, mask = batch([6, 3], "left")
    with torch.no_grad():
        want = run(model, "llama", ids, mask)
    if how == "config attribute":  # no call to intercept: the next forward refuses
        model.model.config._attn_implementation = "sdpa"
        with pytest.raises(ValueError, match=r"'sdpa' attention.*fastprefix\.remove"):
            run(model, "llama", ids, mask)
    else:
        target, value = {"top-level": (model, "sdpa"), "top-level dict": (model, {"": "sdpa"}),
                         "inner model": (model.model, "sdpa")}[how]
        with pytest.raises(ValueError, match=r"would drop its prefix.*fastprefix\.remove\(model\) first"):
            target.set_attn_implementation(value)
    model.set_attn_implementation("fastprefix")  # setting it back (or to itself) is fine
    with torch.no_grad():
        torch.testing.assert_close(run(model, "llama", ids, mask), want, atol=0, rtol=0)
    fastprefix.remove(model)
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


# --- APT's pooled gate on causal attention -----------------------------------------------------------------------


def _pooled_causal_gate(hidden, mask, w, b, lam):
    """Explicit reference: position t gates with ``lam * sigmoid(mean_{u <= t real} h_u @ W + b)``."""
    B, S, _ = hidden.shape
    out = torch.empty(B, S, w.shape[1], dtype=hidden.dtype)
    for i in range(B):
        for t in range(S):
            real = [u for u in range(t + 1) if mask[i, u]]
            mean = hidden[i, real].mean(0) if real else torch.zeros(hidden.shape[-1], dtype=hidden.dtype)
            out[i, t] = lam * torch.sigmoid(mean @ w + b)
    return out


def test_causal_pooled_gate_pools_the_real_tokens_up_to_each_position():
    g = torch.Generator().manual_seed(0)
    B, S, d, L = 3, 7, 6, 4
    hidden = torch.randn(B, S, d, generator=g, dtype=torch.float64)
    w, b, lam = (torch.randn(d, L, generator=g, dtype=torch.float64), torch.randn(L, generator=g, dtype=torch.float64),
                 torch.tensor(0.7, dtype=torch.float64))
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[2, 5:] = False  # right padding
    want = _pooled_causal_gate(hidden, mask, w, b, lam)
    got = fastprefix.apt_gate(hidden, w, b, lam, mode="pooled", key_padding_mask=mask, causal=True)
    torch.testing.assert_close(got, want, **EXACT)
    # decoding: the running totals of the first 4 tokens continue the last 3
    apt = fastprefix.AdaptivePrefix(fastprefix.APTConfig(num_virtual_tokens=L, gate="pooled"), 1, 1, 2, d).double()
    with torch.no_grad():
        apt.gate_weight[0].copy_(w)
    past = apt.pooled_totals(0, hidden[:, :4], mask[:, :4])
    tail = fastprefix.apt_gate(hidden[:, 4:], w, b, lam, mode="pooled", key_padding_mask=mask[:, 4:], causal=True,
                               past=past)
    torch.testing.assert_close(tail, want[:, 4:], **EXACT)
    # the last position pools everything: the encoder's full mean
    full = fastprefix.apt_gate(hidden, w, b, lam, mode="pooled", key_padding_mask=mask)
    torch.testing.assert_close(got[2:, -1:], full[2:], **EXACT)
    with pytest.raises(ValueError, match="causal pooled"):
        fastprefix.apt_gate(hidden, w, b, lam, mode="token", past=past)


def _gate_shapes(model, kind, ids, mask, monkeypatch):
    seen = []
    real = _attention.ops.gated_prefix_attention

    def spy(*args, **kw):
        seen.append(tuple(kw["gate"].shape))
        return real(*args, **kw)

    monkeypatch.setattr(_attention.ops, "gated_prefix_attention", spy)
    with torch.no_grad():
        run(model, kind, ids, mask)
    monkeypatch.setattr(_attention.ops, "gated_prefix_attention", real)
    return seen


def test_pooled_gate_is_causal_on_decoders_and_a_full_mean_on_encoders(monkeypatch):
    ids, mask = batch([6, 3], "left")
    model = _applied("llama", "apt-pooled").eval()
    assert _gate_shapes(model, "llama", ids, mask, monkeypatch) == [(2, 6, 5)] * 2
    # no later token changes an earlier position's logits
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 90 + 3
    with torch.no_grad():
        a, b = run(model, "llama", ids, mask), run(model, "llama", changed, mask)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], atol=0, rtol=0)
    assert not torch.equal(a[:, -1], b[:, -1])
    ids, mask = batch([6, 3], "right")
    assert _gate_shapes(_applied("bert", "apt-pooled").eval(), "bert", ids, mask, monkeypatch) == [(2, 1, 5)] * 2


@pytest.mark.parametrize("side", ["unpadded-no-mask", "left"])
def test_cached_decoding_with_the_causal_pooled_gate_equals_the_uncached_forward(side):
    """Greedy decoding with the cache, float64 logits at every step against the uncached forward over the same
    tokens; ``generate`` (which hands back float32 logits) picks the same tokens."""
    model = _applied("llama", "apt-pooled").eval()
    ids, mask = batch([6, 6] if side.startswith("unpadded") else [6, 3], "left")
    steps, seq, m = 4, ids, mask
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=None if side.startswith("unpadded") else mask,
                    position_ids=positions(mask), use_cache=True)
        for k in range(steps):
            want = model(input_ids=seq, attention_mask=m, position_ids=positions(m)).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], want, **EXACT, msg=f"step {k}")
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
            out = model(input_ids=nxt, attention_mask=None if side.startswith("unpadded") else m,
                        position_ids=positions(m)[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(generated, seq)


def test_beam_search_or_a_foreign_cache_with_the_causal_pooled_gate_is_a_clear_error():
    model = _applied("llama", "apt-pooled").eval()
    ids, mask = batch([6, 6], "left")
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        del cache.__dict__[RUNNING]  # as a cache filled without fastprefix would be
        with pytest.raises(ValueError, match="holds 6 earlier tokens but not their running gate statistics"):
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="reordered.*gate='token'"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False,
                       pad_token_id=0)


def test_causal_pooled_gate_triton_path_matches_the_reference_path():
    ids, mask = batch([6, 3], "left")
    results = []
    for backend in ("torch", "triton"):
        model = _applied("llama", "apt-pooled", backend=backend).train()
        for module in model.fastprefix.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        out = run(model, "llama", ids, mask)
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.fastprefix.named_parameters()}))
    (ref, ref_grads), (tri, tri_grads) = results
    torch.testing.assert_close(tri, ref, **EXACT)
    for name in ref_grads:
        torch.testing.assert_close(tri_grads[name], ref_grads[name], **EXACT, msg=name)


# --- output_attentions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ptv2", "apt", "apt-pooled"])
@pytest.mark.parametrize("kind", KINDS)
def test_output_attentions_are_the_maps_over_prefix_and_keys(kind, method, monkeypatch):
    """Each layer's map is ``[B, H, Sq, L + Sk]`` and is the attention: map @ [g * Pv ; V] is the layer's output."""
    model = _applied(kind, method).eval()
    ids, mask = batch([6, 3], _side(kind))
    calls = []
    real = _attention.ops.gated_prefix_attention

    def spy(q, k, v, pk, pv, **kw):
        out = real(q, k, v, pk, pv, **kw)
        spec = AttentionSpec.build(q, k, **{n: x for n, x in kw.items() if n not in ('backend', 'path')})
        calls.append((v, pv, gate_of(spec), out))
        return out

    monkeypatch.setattr(_attention.ops, "gated_prefix_attention", spy)
    kw = dict(input_ids=ids, attention_mask=mask, output_attentions=True)
    if kind == "llama":
        kw["position_ids"] = positions(mask)
    with torch.no_grad():
        maps = model(**kw).attentions
    B, S, L = ids.shape[0], ids.shape[1], 5
    assert len(maps) == 2 and all(a.shape == (B, 4, S, L + S) for a in maps)
    for a, (v, pv, gate, out) in zip(maps, calls):
        torch.testing.assert_close(a.sum(-1), torch.ones(B, 4, S, dtype=a.dtype), **EXACT)
        g = torch.ones(1, 1, L, dtype=a.dtype) if gate is None else gate.reshape(-1, gate.shape[-2], L)
        group = 4 // v.shape[1]
        pvh, vh = pv.repeat_interleave(group, 0), v.repeat_interleave(group, 1)  # [H, L, D], [B, H, S, D]
        want = (torch.einsum("bhtl,btl,hld->bhtd", a[..., :L], g.expand(B, S, L), pvh)
                + torch.einsum("bhtu,bhud->bhtd", a[..., L:], vh))
        torch.testing.assert_close(want, out, **EXACT)


# --- autocast ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", ["ptv2", "apt", "apt-pooled"])  # ptv2-proj: ptv2's attention path
@pytest.mark.parametrize("kind", KINDS)
def test_training_under_autocast_on_a_float32_model(kind, method, dtype, monkeypatch):
    model = _applied(kind, method, dtype=torch.float32).train()
    ids, mask = batch([6, 3], _side(kind))
    gates = []
    real = _attention.ops.gated_prefix_attention

    def spy(q, *args, **kw):
        gates.extend(kw[k].dtype for k in ("gate", "gate_hidden") if kw.get(k) is not None)
        assert q.dtype == dtype
        return real(q, *args, **kw)

    monkeypatch.setattr(_attention.ops, "gated_prefix_attention", spy)
    with torch.autocast("cpu", dtype=dtype):
        loss = run(model, kind, ids, mask).float().pow(2).mean()
    (loss * 2.0 ** 12).backward()  # scaled as a GradScaler does: float16's small gradients would flush to zero
    assert gates == ([dtype] * 2 if method.startswith("apt") else [])
    for name, p in model.fastprefix.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert bool(torch.isfinite(p.grad).all()) and bool(p.grad.abs().sum() > 0), name
