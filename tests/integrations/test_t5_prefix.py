"""P-Tuning v2 and APT on T5-family encoder-decoders (T5, mT5, UMT5), float64 against an explicit reference.

The reference is the base model (a deep copy, fastprefix never applied) with its attention swapped for
:func:`_reference_attention`, written here from docs/methods.md: T5's eager attention with each self-attention's
prefix concatenated in front of its keys (``[g * Pk ; K]``, ``[g * Pv ; V]``), the position bias and the
padding mask on the real keys only (the ``attn_bias`` of the package's explicit twin,
``fastprefix.reference.attention``, which computes it), and the cross-attention left alone. Site ``s`` (encoder
blocks, then decoder blocks) takes slots ``2s``/``2s + 1`` of the prefix table and APT's gate ``s``, computed
from the hidden states entering its block.
"""

import copy
import dataclasses
import warnings

import pytest
import torch

import fastprefix
from fastprefix.reference.attention import attention_probs, explicit_attention
from fastprefix.spec import AttentionSpec, gate3
from helpers.models import PAD, batch, prepared, tiny

EXACT = dict(atol=1e-10, rtol=0)
REF = "t5_prefix_reference"
L = 5
METHODS = {
    "ptv2": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=L),
    "apt": lambda: fastprefix.APTConfig(num_virtual_tokens=L),
    "apt-pooled": lambda: fastprefix.APTConfig(num_virtual_tokens=L, gate="pooled"),
}
DECODER_IDS = torch.tensor([[PAD, 5, 9, 17, 4]])


# 3 heads of width 8 (inner 24 != d_model 32), 2 encoder and 3 decoder blocks: 5 prefix sites; 8 position buckets
T5 = dict(num_heads=3, dropout=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=16)
KINDS = {"t5": ("t5", "lm"), "t5-model": ("t5", "base"), "t5-encoder": ("t5", "encoder"), "mt5": ("mt5", "lm"),
         "umt5": ("umt5", "lm")}  # kind -> (the tiny family, its head); UMT5: a position bias in every layer


def _build(kind, decoder_layers=3):
    """``decoder_layers``: transformers' ``generate`` sizes T5's cache by the encoder's layer count, so it fails
    (with or without fastprefix) when the decoder has more layers: the generate test uses 1."""
    family, head = KINDS[kind]
    return tiny(family, head=head, num_decoder_layers=decoder_layers, **T5)


def _sites(model):
    """``[(block, self-attention)]`` in site order, found here from T5's layout (encoder, then decoder)."""
    stacks = [s for s in (getattr(model, "encoder", None), getattr(model, "decoder", None)) if s is not None]
    return [(block, block.layer[0].SelfAttention) for stack in stacks for block in stack.block]


def _applied(kind, method, backend="torch", config=None, decoder_layers=3):
    """``kind``'s tiny model with ``method`` applied, its module in float64, moved off its init."""
    return prepared(_build(kind, decoder_layers), config or METHODS[method](), backend=backend)


# ------------------------------------------------------------------------------------------- the reference


class _Reference:
    """The base model with :func:`_reference_attention`: what fastprefix must compute, written out."""

    def __init__(self, kind, applied, decoder_layers=3):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(REF, _reference_attention)
        AttentionMaskInterface.register(REF, eager_mask)  # T5's own additive masks, [B, 1, Sq, Sk]
        self.model = _build(kind, decoder_layers)
        self.method = applied.fastprefix
        self.config = applied.fastprefix.config
        for m in self.model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None:
                cfg._attn_implementation_internal = REF
        self.hidden, self.masks = {}, {}
        self.sites = {}
        self.encoder_sites = len(self.model.encoder.block)
        for s, (block, attn) in enumerate(_sites(self.model)):
            attn._reference, self.sites[attn] = self, s
            block.register_forward_pre_hook(lambda mod, args, s=s: self.hidden.__setitem__(s, args[0]))
        for m in self.model.modules():  # the cross-attentions: plain
            if m not in self.sites and hasattr(m, "is_causal"):
                m._reference = self

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, **kw):
        self.masks = {"encoder": attention_mask, "decoder": decoder_attention_mask}
        if decoder_input_ids is not None:
            kw.update(decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)

    def prefix(self, s):
        """Site s's ``(Pk, Pv)``, each ``[H, L, D]``: slots 2s and 2s+1 of the ``[L, 2 * sites * H * D]`` table."""
        attn = next(a for a, i in self.sites.items() if i == s)
        table = self.method.embedding.view(L, -1, attn.n_heads, attn.key_value_proj_dim)
        return table[:, 2 * s].transpose(0, 1), table[:, 2 * s + 1].transpose(0, 1)

    def gate(self, s):
        """``[B, Sq|1, L]``: ``lambda * sigmoid(h W + b)``, h entering site s's block (None for P-Tuning v2)."""
        if not isinstance(self.config, fastprefix.APTConfig):
            return None
        h = self.hidden[s]
        w, b, lam = self.method.gate_weight[s], self.method.gate_bias[s], self.method.layer_scale[s]
        if self.config.gate == "token":
            return lam * torch.sigmoid(h @ w + b)
        decoder = s >= self.encoder_sites
        mask = self.masks["decoder" if decoder else "encoder"]
        keep = torch.ones(h.shape[:2], dtype=h.dtype) if mask is None else mask.to(h.dtype)
        if not decoder:  # the mean over the real tokens
            mean = (h * keep[..., None]).sum(1, keepdim=True) / keep.sum(1)[:, None, None]
        else:  # causal: position t pools the real tokens at positions <= t
            mean = (h * keep[..., None]).cumsum(1) / keep.cumsum(1).clamp_min(1)[..., None]
        return lam * torch.sigmoid(mean @ w + b)


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None,
                         **kwargs):
    """T5's eager attention; at a prefix site over ``[g * Pk ; K]`` with zero bias and mask for the prefix.

    The position bias and T5's additive mask are the call's ``attn_bias`` on the real keys; the attention is the
    package's explicit twin (:func:`fastprefix.reference.attention.attention_probs`), the cross-attention with an
    empty prefix.
    """
    ref = module._reference
    s = ref.sites.get(module)
    if s is None:  # the cross-attention: plain
        pk = pv = query.new_zeros(query.shape[1], 0, query.shape[-1])
        g = None
    else:
        pk, pv = ref.prefix(s)
        g = ref.gate(s)
    bias = position_bias if attention_mask is None else position_bias + attention_mask
    spec = AttentionSpec.build(query, key, scale=scaling, attn_bias=bias)
    g = None if g is None else gate3(g)
    out = explicit_attention(query, key, value, pk, pv, spec, g)
    return out.transpose(1, 2).contiguous(), attention_probs(query, key, pk, spec, g)


def _outputs(out):
    """Every output tensor of a forward: logits / decoder states and the encoder's states."""
    names = ("logits", "last_hidden_state", "encoder_last_hidden_state")
    return {n: getattr(out, n) for n in names if getattr(out, n, None) is not None}


def _inputs(kind, lengths=(6, 4, 1), decoder_lengths=(5, 3, 5)):
    ids, mask = batch(lengths, "right")
    kw = dict(input_ids=ids, attention_mask=mask)
    if kind != "t5-encoder":
        dec, dec_mask = batch(decoder_lengths, "right", seed=5)
        dec[:, 0] = PAD  # the decoder start token
        kw.update(decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    return kw


# ---------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", ["t5", "t5-model", "t5-encoder", "mt5", "umt5"])
def test_the_applied_model_equals_the_explicit_reference(kind, method):
    model = _applied(kind, method)
    ref = _Reference(kind, model)
    kw = _inputs(kind)
    with torch.no_grad():
        got, want = _outputs(model(**kw)), _outputs(ref(**kw))
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], **EXACT, msg=lambda e: f"{name}: {e}")
    base = _build(kind)
    with torch.no_grad():
        plain = _outputs(base(**kw))
    assert all(not torch.allclose(got[n], plain[n]) for n in plain), "degenerate test: the prefix changed nothing"


def test_sites_are_every_self_attention_and_the_module_has_one_layer_per_site():
    model = _applied("t5", "apt")
    assert model.fastprefix.num_layers == 5 and model.fastprefix.gate_weight.shape == (5, 32, L)
    assert model.fastprefix.embedding.shape == (L, 2 * 5 * 3 * 8)
    assert fastprefix.apply(_build("t5-encoder"), METHODS["ptv2"]()).fastprefix.num_layers == 2
    cross = [b.layer[1].EncDecAttention for b in model.decoder.block]
    assert all(getattr(a, "_fastprefix_layer", None) is None for a in cross), "the cross-attention has no prefix"
    report = fastprefix.gate_report(model, _inputs("t5"))  # every site's gate: encoder and decoder
    assert report.num_layers == 5


def test_output_attentions_are_the_reference_maps():
    model = _applied("t5", "apt")
    ref = _Reference("t5", model)
    kw = dict(_inputs("t5"), output_attentions=True)
    with torch.no_grad():
        got, want = model(**kw), ref(**kw)
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        for i, (a, b) in enumerate(zip(getattr(got, name), getattr(want, name), strict=True)):
            torch.testing.assert_close(a, b, **EXACT, msg=lambda e: f"{name}[{i}]: {e}")
    assert got.encoder_attentions[0].shape[-1] == L + 6 and got.cross_attentions[0].shape[-1] == 6


@pytest.mark.parametrize("method", list(METHODS))
def test_a_padded_row_equals_the_row_alone(method):
    """Encoder padding (right and left) and decoder padding (right: the decoder is causal)."""
    model = _applied("t5", method)
    lengths, decoder_lengths = (6, 4, 1), (5, 2, 4)
    for side in ("right", "left"):
        ids, mask = batch(lengths, side)
        dec, dec_mask = batch(decoder_lengths, "right", seed=5)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        for b in range(len(lengths)):
            real, n = ids[b][mask[b].bool()][None], decoder_lengths[b]
            with torch.no_grad():
                alone = model(input_ids=real, decoder_input_ids=dec[b:b + 1, :n])
            torch.testing.assert_close(out.logits[b, :n], alone.logits[0], **EXACT,
                                       msg=lambda e: f"{side}-padded row {b}: {e}")
            torch.testing.assert_close(out.encoder_last_hidden_state[b][mask[b].bool()],
                                       alone.encoder_last_hidden_state[0], **EXACT)


@pytest.mark.parametrize("method", list(METHODS))
def test_cached_generate_equals_the_uncached_forward_at_every_step(method):
    """generate runs the encoder alone, then the decoder with its KV cache (the prefix is never in it)."""
    model = _applied("t5", method, decoder_layers=1)
    ids, mask = batch((6, 3), "right")
    seen = []
    hook = model.register_forward_hook(lambda mod, args, out: seen.append(out.logits[:, -1].clone()))
    try:
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                  pad_token_id=PAD, eos_token_id=None)
    finally:
        hook.remove()
    assert len(seen) == 4
    ref = _Reference("t5", model, decoder_layers=1)
    for step, logits in enumerate(seen):
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=seqs[:, :step + 1],
                         use_cache=False).logits[:, -1]
            explicit = ref(ids, mask, decoder_input_ids=seqs[:, :step + 1]).logits[:, -1]
        torch.testing.assert_close(logits, want, **EXACT, msg=lambda e: f"step {step}: {e}")
        torch.testing.assert_close(want, explicit, **EXACT, msg=lambda e: f"step {step} vs the reference: {e}")


def test_beam_search_with_the_causal_pooled_gate_is_a_clear_error():
    """The decoder's running gate sums live on the cache; a reordered cache (beam search) is refused."""
    model = _applied("t5", "apt-pooled", decoder_layers=2)
    ids, mask = batch((6, 3), "right")
    with pytest.raises(ValueError, match="Beam search and assisted decoding are not supported with gate='pooled'"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False,
                       pad_token_id=PAD, eos_token_id=None)


def test_disabled_runs_the_base_model_bit_for_bit():
    """Every stack's config goes back to the model's attention inside the block (configs shared by the attention
    modules included), and the stacks' hooks stand aside."""
    model = _applied("t5", "apt")
    kw = _inputs("t5")
    with torch.no_grad():  # (PyTorch's fused CPU attention takes another kernel when its inputs require grad)
        with fastprefix.disabled(model):
            off = model(**kw).logits
        on = model(**kw).logits
        base = _build("t5")(**kw).logits
    assert torch.equal(off, base) and not torch.allclose(on, base)


def test_remove_restores_the_model_bit_for_bit():
    model = _build("t5")
    params = {n: p.detach().clone() for n, p in model.state_dict().items()}
    impls = [(m, m.config._attn_implementation) for m in model.modules() if hasattr(m, "config")]
    kw = _inputs("t5")
    with torch.no_grad():
        before = model(**kw).logits
    fastprefix.apply(model, METHODS["apt"]())
    model.train()
    model(**kw, labels=kw["decoder_input_ids"]).loss.backward()
    model.eval()
    with torch.no_grad():
        during = model(**kw).logits
    assert not torch.allclose(during, before), "degenerate test: the method had no effect"
    fastprefix.remove(model)
    with torch.no_grad():
        after = model(**kw).logits
    assert torch.equal(after, before)
    assert all(torch.equal(model.state_dict()[n], p) for n, p in params.items())
    assert all(m.config._attn_implementation == impl for m, impl in impls)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert not any(k.startswith("_fastprefix") for m in model.modules() for k in m.__dict__)


@pytest.mark.parametrize("method", ["ptv2", "apt"])
def test_save_load_round_trips_bit_for_bit_and_refuses_other_sites(method, tmp_path):
    model = _applied("t5", method)
    model.fastprefix.float()  # the module a user has: float32
    kw = _inputs("t5")
    with torch.no_grad():
        want = model(**kw).logits
    fastprefix.save_adapter(model, tmp_path)
    fresh = fastprefix.load_adapter(_build("t5"), tmp_path)
    with torch.no_grad():
        got = fresh(**kw).logits
    assert torch.equal(got, want)
    encoder_only = _build("t5-encoder")  # the same config, the encoder's 2 sites of the adapter's 5
    with pytest.raises(ValueError, match="prefix_sites: adapter 5 vs model 2"):
        fastprefix.load_adapter(encoder_only, tmp_path)
    assert not hasattr(encoder_only, "fastprefix")
    with pytest.raises(ValueError, match="'t5' model"):
        fastprefix.load_adapter(_build("mt5"), tmp_path)


@pytest.mark.parametrize("method", ["ptv2", "apt"])
def test_a_few_training_steps_reduce_the_loss(method):
    model = _applied("t5", method).train()
    kw = _inputs("t5")
    labels = kw["decoder_input_ids"].roll(-1, 1)
    opt = torch.optim.AdamW(model.fastprefix.parameters(), lr=3e-2)
    losses = []
    for _ in range(8):
        loss = model(**kw, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], f"losses {losses}"


@pytest.mark.parametrize("method", ["ptv2", "apt"])
def test_checkpointed_forwards_give_the_plain_gradients(method):
    config = dataclasses.replace(METHODS[method](), prefix_dropout=0.1)  # per-forward masks survive the recompute
    grads = []
    for checkpointed in (False, True):
        model = _applied("t5", method, config=config).train()
        if checkpointed:
            with warnings.catch_warnings():  # transformers 5 renamed it activation_checkpointing_enable
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(3)
        loss = sum(model(**_inputs("t5", lengths, dec)).logits.sum() for lengths, dec in
                   [((6, 3), (5, 2)), ((4, 4, 2), (3, 3, 1))])
        loss.backward()
        grads.append({n: p.grad for n, p in model.fastprefix.named_parameters()})
    assert all(g is not None and bool(g.any()) for g in grads[0].values())
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, **EXACT, msg=lambda e: f"{name}: {e}")


@pytest.mark.parametrize("method", ["ptv2", "apt", "apt-pooled"])
def test_triton_path_equals_the_reference_path(method, monkeypatch):
    """Forward and gradients through the Triton kernels (interpreter) with T5's position bias as attn_bias:
    the encoder's (padded) and the decoder's (causal) self-attention; 1 decoder block keeps the interpreter quick."""
    from triton.runtime.interpreter import InterpretedFunction

    launches, run = [], InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: launches.append(self) or run(self, *a, **k))
    model = _applied("t5", method, decoder_layers=1).train()
    kw = _inputs("t5", (4, 2), (3, 2))
    results = []
    for backend in ("torch", "triton"):
        with fastprefix.use_backend(model, backend):
            out = model(**kw).logits
        out.sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.fastprefix.named_parameters()}))
        model.zero_grad()
        assert bool(launches) == (backend == "triton"), f"{backend}: {len(launches)} Triton launches"
    (out_t, grads_t), (out_k, grads_k) = results
    torch.testing.assert_close(out_k, out_t, **EXACT)
    for name in grads_t:
        torch.testing.assert_close(grads_k[name], grads_t[name], **EXACT, msg=lambda e: f"{name}: {e}")


def test_unsupported_encoder_decoders_and_features_are_clear_errors():
    bart = tiny("bart")
    with pytest.raises(ValueError, match=r"encoder-decoder BartForConditionalGeneration \(bart\).*T5, mT5, UMT5"):
        fastprefix.apply(bart, METHODS["ptv2"]())
    assert not hasattr(bart, "fastprefix") and all(not m._forward_pre_hooks for m in bart.modules())
    shift = fastprefix.PTuningV2Config(num_virtual_tokens=L, prefix_positions="shift")
    with pytest.raises(ValueError, match="T5ForConditionalGeneration"):
        fastprefix.apply(_build("t5"), shift)
    model = _applied("t5", "ptv2")
    with pytest.raises(RuntimeError, match="fastprefix context"):  # a block called on its own has no prefix
        model.encoder.block[0](torch.zeros(1, 2, 32, dtype=torch.float64))
    copy.deepcopy(model)  # the hooks are module-level functions: the copy works
