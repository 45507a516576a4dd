"""DeBERTa (v3/v2 and v1) with the prefix methods (P-Tuning v2, APT) through its disentangled attention.

Every model is a tiny random float64 DeBERTa with relative attention (c2p and p2c). The reference is written
here from the module weights: DeBERTa's logits (content + c2p + p2c over its scale ``sqrt(D * f)``, positions
log-bucketed), the layer's prefix put in front of the keys with zero relative scores for the prefix columns (as
the original P-Tuning v2 DeBERTa code pads them), APT's gate on the prefix logits and values; the softmax over
``[prefix ; keys]`` is the package's explicit twin (``fastprefix.reference.attention``) with the relative scores
as its ``attn_bias``. With an empty prefix the reference reproduces the unmodified model, which is checked first.
"""

import copy
import dataclasses
import io
import math
import warnings

import pytest
import torch

import fastprefix
from fastprefix.reference.attention import attention_probs, explicit_attention
from fastprefix.spec import AttentionSpec, gate3
from helpers.models import perturb, prepared, tiny
from helpers.models import batch as _batch

EXACT = dict(atol=1e-10, rtol=0)
LENGTHS = (7, 4, 1)  # a right-padded batch of three, one sequence a single token
# the tiny DeBERTa families (helpers.families: relative attention, c2p and p2c) with large initial weights, no
# dropout and a 2-label classifier head
_COMMON = dict(dropout=0.0, initializer_range=0.3, num_labels=2)
KINDS = {  # kind -> (the tiny family, its config overrides)
    # DeBERTa-v3: position projections shared with q/k, log buckets, LayerNorm'd relative embeddings
    "v3": ("deberta-v2", dict(share_att_key=True, position_buckets=8, norm_rel_ebd="layer_norm",
                              pos_att_type="p2c|c2p")),
    # DeBERTa-v2 (xlarge): own position projections, no buckets, a convolution beside layer 0
    "v2": ("deberta-v2", dict(share_att_key=False, position_buckets=-1, pos_att_type="c2p|p2c", conv_kernel_size=3)),
    # DeBERTa v1: fused in_proj with q/v biases, q pre-scaled
    "v1": ("deberta", dict(pos_att_type="c2p|p2c")),
}
METHODS = {
    "ptv2": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=5),
    "apt": lambda: fastprefix.APTConfig(num_virtual_tokens=5),
    "apt-pooled": lambda: fastprefix.APTConfig(num_virtual_tokens=5, gate="pooled"),
}
CELLS = [pytest.param(kind, method, id=f"{kind}-{method}") for kind in KINDS for method in METHODS]


# ---------------------------------------------------------------------------------------------------- models


def deberta(kind, classifier=False):
    """A fresh copy of ``kind``'s tiny float64 DeBERTa in eval mode (the same weights every call)."""
    family, overrides = KINDS[kind]
    return tiny(family, head="seq" if classifier else "base", **_COMMON, **overrides)


def applied(kind, method, backend="torch", config=None, classifier=False):
    return prepared(deberta(kind, classifier), config or METHODS[method](), backend=backend)


def _attentions(model):
    return [layer.attention.self for layer in model.base_model.encoder.layer]


# ------------------------------------------------------------------------------------------------- reference


def _bucket(rel, buckets, max_position):
    """DeBERTa's relative position buckets: exact up to ``buckets // 2``, logarithmic beyond (sign kept)."""
    if buckets <= 0 or max_position <= 0:
        return rel
    mid = buckets // 2

    def one(r):
        if abs(r) <= mid:
            return r
        return int(math.copysign(math.ceil(math.log(abs(r) / mid) / math.log((max_position - 1) / mid) * (mid - 1))
                                 + mid, r))

    return torch.tensor([[one(r) for r in row] for row in rel.tolist()])


def _heads(x, H):
    """``[B, S, H * D]`` -> ``[B, H, S, D]``."""
    return x.view(x.shape[0], x.shape[1], H, -1).transpose(1, 2)


def _deberta_logits(model, attn, h):
    """``(q, k, v [B, H, S, D], rel [B, H, S, S], s)``: DeBERTa's c2p + p2c relative logits, and its scale ``s``
    (the logits are ``(q.k + rel) / s``)."""
    cfg, enc = model.config, model.base_model.encoder
    H, S = attn.num_attention_heads, h.shape[1]
    types = cfg.pos_att_type
    max_rel = cfg.max_relative_positions if cfg.max_relative_positions >= 1 else cfg.max_position_embeddings
    t = torch.arange(S)
    if cfg.model_type == "deberta":  # v1
        D = cfg.hidden_size // H
        qkv = _heads(attn.in_proj(h), H)  # per head [q | k | v]
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
        q = q + attn.q_bias.view(H, D)[None, :, None]
        v = v + attn.v_bias.view(H, D)[None, :, None]
        span = min(S, max_rel)
        table = enc.rel_embeddings.weight[max_rel - span:max_rel + span]
        # the position keys/queries [H, 2 span, D], built only for the terms the config has (only theirs exist)
        pos_k = (lambda: _heads(attn.pos_proj(table[None]), H)[0])
        pos_q = (lambda: _heads(attn.pos_q_proj(table[None]), H)[0])
        rel = t[:, None] - t[None, :]
    else:
        q, k, v = (_heads(proj(h), H) for proj in (attn.query_proj, attn.key_proj, attn.value_proj))
        D = q.shape[-1]
        buckets = getattr(cfg, "position_buckets", -1)
        span = buckets if buckets > 0 else max_rel
        table = enc.rel_embeddings.weight
        if "layer_norm" in getattr(cfg, "norm_rel_ebd", "none"):
            table = torch.nn.functional.layer_norm(table, table.shape[-1:], enc.LayerNorm.weight, enc.LayerNorm.bias,
                                                   cfg.layer_norm_eps)
        table = table[:2 * span][None]
        shared = getattr(cfg, "share_att_key", False)
        pos_k = (lambda: _heads((attn.key_proj if shared else attn.pos_key_proj)(table), H)[0])
        pos_q = (lambda: _heads((attn.query_proj if shared else attn.pos_query_proj)(table), H)[0])
        rel = _bucket(t[:, None] - t[None, :], buckets, max_rel)
    idx = (rel + span).clamp(0, 2 * span - 1)  # [S, S]: the embedding row of (query t, key u)
    s = float(torch.tensor(D * (1 + len(types)), dtype=torch.float32).sqrt())  # DeBERTa's float32 square root
    rel = torch.zeros(q.shape[0], H, S, S, dtype=q.dtype)
    if "c2p" in types:  # query t's content against the position of key u relative to t
        rel = rel + torch.einsum("bhtd,htud->bhtu", q, pos_k()[:, idx])
    if "p2c" in types:  # key u's content against the same relative position, seen from the key
        rel = rel + torch.einsum("bhud,htud->bhtu", k, pos_q()[:, idx])
    return q, k, v, rel, s


def _gate(apt, i, h, mask):
    """APT's gate ``[B, S|1, L]``: ``lambda * sigmoid(h W + b)``, pooled: of the mean over the real tokens."""
    if apt.config.gate == "pooled":
        w = mask.to(h.dtype)[..., None]
        h = (h * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    return apt.layer_scale[i] * torch.sigmoid(h @ apt.gate_weight[i] + apt.gate_bias[i])


def _prefix_attention(q, k, v, rel, s, mask, pk, pv, gate):
    """Softmax over ``[prefix ; keys]``: prefix logits ``g * q.Pk / s`` (no relative term), keys DeBERTa's logits
    ``(q.k + rel) / s`` (``rel / s`` is the call's ``attn_bias``), padding hidden: the package's explicit twin
    (:func:`fastprefix.reference.attention.attention_probs`) with that spec.

    Returns ``(out [B, H, S, D], probabilities [B, H, S, L + S])``.
    """
    spec = AttentionSpec.build(q, k, key_padding_mask=mask, scale=1 / s, attn_bias=rel / s)
    g = None if gate is None else gate3(gate)  # [B, S|1, L]
    return explicit_attention(q, k, v, pk, pv, spec, g), attention_probs(q, k, pk, spec, g)


def reference(model, method_module, ids, mask, output_attentions=False):
    """The reference forward of ``model`` (a DeBERTa without fastprefix) with ``method_module``'s prefix.

    ``method_module`` None: an empty prefix. Returns the base model's output (differentiable in the prefix).
    """
    ref = copy.deepcopy(model)
    prefixes = None if method_module is None else method_module.eval()()
    for i, attn in enumerate(_attentions(ref)):
        def forward(hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None,
                    rel_embeddings=None, attn=attn, i=i):
            q, k, v, rel, s = _deberta_logits(ref, attn, hidden_states)
            H, D = q.shape[1], q.shape[-1]
            if prefixes is None:
                pk = pv = q.new_zeros(H, 0, D)
            else:
                pk, pv = prefixes[2 * i], prefixes[2 * i + 1]
            gate = _gate(method_module, i, hidden_states, mask) if hasattr(method_module, "gate_weight") else None
            out, p = _prefix_attention(q, k, v, rel, s, mask, pk, pv, gate)
            return out.transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], -1), p

        attn.forward = forward
    return ref(input_ids=ids, attention_mask=mask, output_attentions=output_attentions)


def _loss(out):
    g = torch.Generator().manual_seed(7)  # a fixed random projection: every output element gets its own gradient
    return (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()


# --------------------------------------------------------------------------------------------------- checks


@pytest.mark.parametrize("kind", KINDS)
def test_reference_with_empty_prefix_is_the_model(kind):
    """The reference itself: with no prefix it is the model's own attention (real query rows)."""
    model = deberta(kind)
    ids, mask = _batch(LENGTHS)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = reference(model, None, ids, mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **EXACT)


@pytest.mark.parametrize("kind, method", CELLS)
def test_equals_reference(kind, method):
    """Outputs and the method's gradients (through the c2p/p2c bias of the later layer too) equal the reference."""
    model = applied(kind, method)
    ids, mask = _batch(LENGTHS)
    params = dict(model.fastprefix.named_parameters())
    got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    want = reference(deberta(kind), model.fastprefix, ids, mask).last_hidden_state
    torch.testing.assert_close(got, want, **EXACT)
    grads = torch.autograd.grad(_loss(got), list(params.values()))
    want_grads = torch.autograd.grad(_loss(want), list(params.values()))
    for name, g, w in zip(params, grads, want_grads):
        assert bool(w.any()), f"degenerate test: no gradient for {name}"
        torch.testing.assert_close(g, w, **EXACT, msg=lambda e: f"{name}: {e}")
    got = got.detach()
    with torch.no_grad():
        base = deberta(kind)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(got[mask.bool()], base[mask.bool()], atol=1e-3), "degenerate: the prefix changed nothing"


@pytest.mark.parametrize("kind, method", CELLS)
def test_padded_eq_alone(kind, method):
    model = applied(kind, method)
    ids, mask = _batch(LENGTHS)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for b, n in enumerate(LENGTHS):
            alone = model(input_ids=ids[b:b + 1, :n], attention_mask=mask[b:b + 1, :n]).last_hidden_state[0]
            torch.testing.assert_close(out[b, :n], alone, **EXACT, msg=lambda e: f"row {b} ({n} tokens): {e}")


@pytest.mark.parametrize("kind", KINDS)
def test_output_attentions_map_prefix_and_keys(kind):
    model = applied(kind, "apt")
    ids, mask = _batch(LENGTHS)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    want = reference(deberta(kind), model.fastprefix, ids, mask, output_attentions=True).attentions
    L, (B, S) = model.fastprefix.num_virtual_tokens, ids.shape
    assert len(got) == len(want) == 2
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == (B, 4, S, L + S), f"layer {i}: {tuple(g.shape)}"
        torch.testing.assert_close(g, w, **EXACT, msg=lambda e: f"layer {i}: {e}")


@pytest.mark.parametrize("kind", KINDS)
def test_remove_bitexact(kind):
    model = deberta(kind)
    params = {n: p.detach().clone() for n, p in model.state_dict().items()}
    ids, mask = _batch(LENGTHS)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    fastprefix.apply(model, METHODS["apt"]())
    perturb(model)
    _loss(model.train()(input_ids=ids, attention_mask=mask).last_hidden_state).backward()
    model.eval()
    with torch.no_grad():
        during = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with fastprefix.disabled(model):  # the base model inside the block, bit for bit
            off = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(off, before), f"disabled differs by {(off - before).abs().max():.3g}"
    assert not torch.allclose(during, before), "degenerate test: the method had no effect"
    fastprefix.remove(model)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(after, before), f"outputs after remove differ by {(after - before).abs().max():.3g}"
    state = model.state_dict()
    assert state.keys() == params.keys() and all(torch.equal(state[n], p) for n, p in params.items())
    assert all(p.requires_grad for p in model.parameters())
    for name, m in model.named_modules():
        assert "forward" not in m.__dict__, f"{name} kept an instance forward"
        assert not any(k.startswith("_fastprefix") for k in m.__dict__), f"{name} kept a fastprefix attribute"
        assert not (m._forward_pre_hooks or m._forward_hooks or m._forward_hooks_always_called), f"{name}: a hook"


@pytest.mark.parametrize("kind", KINDS)
def test_saveload_bitexact(kind, tmp_path):
    model = deberta(kind)
    fastprefix.apply(model, METHODS["apt"]())
    perturb(model)
    ids, mask = _batch(LENGTHS)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    fastprefix.save_adapter(model, tmp_path)
    fresh = fastprefix.load_adapter(deberta(kind), tmp_path)
    with torch.no_grad():
        got = fresh(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got, want), f"outputs after load differ by {(got - want).abs().max():.3g}"
    # the whole model deep-copied and pickled: each copy's attention forward runs the copy's own module
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert all(a.forward.module is a for a in _attentions(other))
        with torch.no_grad():
            assert torch.equal(other(input_ids=ids, attention_mask=mask).last_hidden_state, want)


@pytest.mark.parametrize("method", ["ptv2", "apt"])
def test_training_reduces_loss(method):
    """Sequence classification, only the method's parameters trainable: the loss goes down."""
    model = deberta("v3", classifier=True)
    torch.manual_seed(0)
    fastprefix.apply(model, METHODS[method]())
    model.fastprefix.double()
    model.train()
    ids, mask = _batch((7, 5, 6, 4), seed=5)
    labels = torch.tensor([1, 0, 1, 0])
    opt = torch.optim.AdamW(model.fastprefix.parameters(), lr=3e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"losses {[round(x, 4) for x in losses]}"


def _count_kernel_launches(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: launches.append(self) or run(self, *a, **k))
    return launches


@pytest.mark.parametrize("kind, method", [pytest.param(k, m, id=f"{k}-{m}") for k, m in
                                          (("v3", "apt"), ("v1", "apt-pooled"))])
def test_triton_equals_torch(kind, method, monkeypatch):
    """The Triton path (the interpreter) gives the PyTorch path's outputs and gradients, c2p/p2c bias included."""
    ids, mask = _batch((6, 3))  # padded; small: the interpreter runs one program per row and head
    results = []
    for backend in ("torch", "triton"):
        model = applied(kind, method, backend=backend).train()
        launches = _count_kernel_launches(monkeypatch) if backend == "triton" else None
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        _loss(out[mask.bool()]).backward()
        if launches is not None:
            assert launches, "the Triton path launched no kernel"
        results.append((out.detach(), {n: p.grad for n, p in model.fastprefix.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], **EXACT)
    for name, g in want_grads.items():
        assert g is not None and bool(g.any()), f"degenerate test: no gradient for {name}"
        torch.testing.assert_close(got_grads[name], g, **EXACT, msg=lambda e: f"{name}: {e}")


@pytest.mark.parametrize("kind, method", [pytest.param(k, m, id=f"{k}-{m}") for k, m in
                                          (("v3", "apt"), ("v2", "ptv2"), ("v1", "apt"))])
def test_checkpointing_eq_plain(kind, method):
    """Two forwards of different shapes, one backward: non-reentrant checkpointing gives the plain gradients."""
    config = dataclasses.replace(METHODS[method](), prefix_dropout=0.1)  # per-forward masks survive the recompute
    batches = [_batch((6, 3)), _batch((5, 5, 2), seed=3)]
    grads = []
    for checkpointed in (False, True):
        model = applied(kind, method, config=config).train()
        if checkpointed:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.encoder.layer)
        torch.manual_seed(3)  # the same dropout masks in both runs
        loss = sum(_loss(model(input_ids=ids, attention_mask=m).last_hidden_state) for ids, m in batches)
        loss.backward()
        grads.append({n: p.grad for n, p in model.fastprefix.named_parameters()})
    plain, ckpt = grads
    for name, want in plain.items():
        assert want is not None and bool(want.any()), f"degenerate test: no gradient for {name}"
        torch.testing.assert_close(ckpt[name], want, **EXACT, msg=lambda e: f"{name}: {e}")


# ------------------------------------------------------------------------------------------------- refusals


def test_talking_heads_refused():
    model = tiny("deberta", talking_head=True, **_COMMON)
    with pytest.raises(ValueError, match="DebertaModel.*talking"):
        fastprefix.apply(model, METHODS["ptv2"]())
    assert not hasattr(model, "fastprefix")
    assert all(not m._forward_pre_hooks and "forward" not in m.__dict__ for m in model.modules())


def test_3d_attention_mask_refused():
    model = applied("v3", "ptv2")
    ids, mask = _batch(LENGTHS)
    mask3 = mask[:, None, :] * mask[:, :, None]
    with pytest.raises(ValueError, match=r"attention_mask.*2D.*\[3, 7, 7\]"):
        model(input_ids=ids, attention_mask=mask3)
    with torch.no_grad():  # the failed call left no state behind: the next one is right
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    want = reference(deberta("v3"), model.fastprefix, ids, mask).last_hidden_state
    torch.testing.assert_close(got, want, **EXACT)


def test_layer_called_alone_refused():
    model = applied("v3", "apt")
    h = torch.randn(1, 3, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="call the model"):
        model.encoder.layer[0](h, torch.ones(1, 1, 3, 3), rel_embeddings=model.encoder.get_rel_embedding())


def test_enhanced_mask_decoder_steps_refused():
    model = applied("v3", "ptv2")
    model.z_steps = 2  # DeBERTa's EMD: the last layer again with query_states
    ids, mask = _batch(LENGTHS)
    with pytest.raises(NotImplementedError, match="query_states"):
        model(input_ids=ids, attention_mask=mask)
