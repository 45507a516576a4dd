"""fastprefix.apply / remove on 🤗 transformers models: padding exactness, generate, backends, errors.

Tiny models run in float64 so that "a padded sequence equals the sequence run alone" and "the Triton path
equals the reference path" can be checked to rounding (1e-10), not to a loose tolerance.
"""

import pytest
import torch
from torch import nn

import fastprefix
from fastprefix.integrations import transformers as integration
from helpers.models import (DECODERS, ENCODERS, METHODS, PAD, PREFIX_METHODS, PROMPT_METHODS, applied, batch,
                       minilm_path, perturb, positions, run, tiny)

EXACT = dict(atol=1e-10, rtol=0)
LENGTHS = [7, 4, 1]  # three sequences, one of a single token


def _cases():
    for kind in ENCODERS + DECODERS + ("t5",):
        for method in PROMPT_METHODS + (() if kind == "t5" else PREFIX_METHODS):
            for side in ("right", "left") if kind in DECODERS else ("right",):
                yield pytest.param(kind, method, side, id=f"{kind}-{method}-{side}")


def _real_rows(out, b, mask, m):
    """The output rows of sequence b's real tokens (and its m prompt slots in front, if any)."""
    keep = torch.cat([torch.ones(m, dtype=torch.bool), mask[b].bool()])
    return out[b][keep]


@pytest.mark.parametrize("kind, method, side", list(_cases()))
def test_padded_batch_equals_each_sequence_alone(kind, method, side):
    model = applied(kind, method)
    ids, mask = batch(LENGTHS, side)
    m = model.fastprefix.num_virtual_tokens if method in PROMPT_METHODS and kind != "t5" else 0
    with torch.no_grad():
        out = run(model, kind, ids, mask)
        for b, n in enumerate(LENGTHS):
            real = ids[b][mask[b].bool()][None]
            alone = run(model, kind, real, torch.ones_like(real))
            got = out[b] if kind == "t5" else _real_rows(out, b, mask, m)
            torch.testing.assert_close(got, alone[0], **EXACT, msg=f"sequence {b} ({n} tokens)")


def _remove_cases():
    for kind in ("llama", "bert", "t5"):
        for method in PROMPT_METHODS + (() if kind == "t5" else PREFIX_METHODS):
            yield pytest.param(kind, method, id=f"{kind}-{method}")


@pytest.mark.parametrize("kind, method", list(_remove_cases()))
def test_apply_changes_the_output_and_remove_restores_it_bitwise(kind, method):
    model = tiny(kind)
    next(model.parameters()).requires_grad_(False)  # remove must restore a mixed freeze too
    before_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    impl = model.config._attn_implementation
    ids, mask = batch(LENGTHS, "left" if kind in DECODERS else "right")
    with torch.no_grad():
        before = run(model, kind, ids, mask)
    fastprefix.apply(model, METHODS[method]())
    perturb(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fastprefix.") for n in trainable)
    assert any(n.startswith("fastprefix.") for n in model.state_dict())
    with torch.no_grad():
        during = run(model, kind, ids, mask)
    assert not torch.allclose(during[:, -1], before[:, -1]), "the method had no effect"
    with pytest.raises(ValueError, match="already applied"):
        fastprefix.apply(model, METHODS[method]())
    fastprefix.remove(model)
    with torch.no_grad():
        after = run(model, kind, ids, mask)
    assert torch.equal(after, before)
    assert model.config._attn_implementation == impl
    assert not hasattr(model, "fastprefix")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_grad
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all("_fastprefix_state" not in m.__dict__ and "_fastprefix_layer" not in m.__dict__ for m in model.modules())
    fastprefix.apply(model, METHODS[method]())  # can be applied again after remove


def _backend_cases():
    for kind, side, methods in (("bert", "right", ("ptv2", "apt-pooled", "dept", "adept")),
                                ("llama", "left", ("ptv2", "apt", "dept", "adept")), ("qwen2", "right", ("apt",))):
        for method in methods:
            yield pytest.param(kind, method, side, id=f"{kind}-{method}-{side}")


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_attention_gets_the_padding_mask_from_the_registered_mask_function(kind, monkeypatch):
    """The known trap: an attention function registered without a mask function receives attention_mask=None."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    model = applied(kind, "ptv2")
    assert model.config._attn_implementation == "fastprefix"
    assert "fastprefix" in AttentionInterface._global_mapping and "fastprefix" in AttentionMaskInterface._global_mapping
    seen = []
    real = fastprefix.ops.gated_prefix_attention
    monkeypatch.setattr(fastprefix.ops, "gated_prefix_attention",
                        lambda *a, **k: seen.append((k["key_padding_mask"], k["causal"])) or real(*a, **k))
    ids, mask = batch(LENGTHS, "left" if kind in DECODERS else "right")
    with torch.no_grad():
        run(model, kind, ids, mask)
    assert len(seen) == 2  # one call per layer
    for key_mask, causal in seen:
        assert torch.equal(key_mask, mask.bool()) and causal == (kind in DECODERS)


def _spy_on_kernels(monkeypatch):
    """Count calls into the Triton launchers, so a silent fallback to PyTorch cannot pass the test."""
    import importlib

    calls = []
    for module, name in (("attention.fused", "gated_prefix_attention"), ("attention.split", "split_attention"),
                         ("embedding.fused", "adept_embedding"), ("embedding.fused", "dept_embedding")):
        mod = importlib.import_module(f"fastprefix.kernels.{module}")
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


@pytest.mark.parametrize("kind, method, side", list(_backend_cases()))
def test_triton_path_matches_reference_path(kind, method, side, monkeypatch):
    """Same model, same batch, fastprefix ops forced to the Triton kernels (interpreter on CPU) vs PyTorch."""
    calls = _spy_on_kernels(monkeypatch)
    model = applied(kind, method)
    model.fastprefix.double()
    ids, mask = batch([5, 3], side)
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with fastprefix.use_backend(model, backend):
            out = run(model, kind, ids, mask)
        out.pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.fastprefix.named_parameters() if p.grad is not None}
        results[backend] = out.detach(), grads
        assert bool(calls) == (backend == "triton")
    (ref, ref_grads), (tri, tri_grads) = results["torch"], results["triton"]
    torch.testing.assert_close(tri, ref, **EXACT)
    assert ref_grads.keys() == tri_grads.keys() and ref_grads
    for name in ref_grads:
        torch.testing.assert_close(tri_grads[name], ref_grads[name], **EXACT, msg=name)


def test_apply_backend_option_is_used():
    model = applied("bert", "apt", backend="triton")
    assert integration.state_of(model).backend == "triton"
    with fastprefix.use_backend(model, "torch"):
        assert integration.state_of(model).backend == "torch"
    assert integration.state_of(model).backend == "triton"
    with pytest.raises(ValueError, match="backend"):
        fastprefix.apply(tiny("bert"), METHODS["apt"](), backend="cuda")


def _greedy_by_hand(model, kind, ids, mask, steps):
    """Greedy decoding without a cache: recompute the whole sequence and take the argmax, step by step."""
    cur, cur_mask = ids, mask
    for _ in range(steps):
        logits = run(model, kind, cur, cur_mask) if kind != "t5" else None
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        cur, cur_mask = torch.cat([cur, nxt], 1), torch.cat([cur_mask, torch.ones_like(nxt)], 1)
    return cur


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("method", ("ptv2", "apt", "pt", "dept", "adept"))
def test_greedy_generate_with_cache_equals_stepwise_argmax(kind, method):
    """The prefix is not in the KV cache yet attended at every step; left padding and positions stay right."""
    model = applied(kind, method, scale=0.2)
    ids, mask = batch([6, 3], "left")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             pad_token_id=PAD, eos_token_id=None)
        want = _greedy_by_hand(model, kind, ids, mask, 5)
    assert torch.equal(out, want)
    assert len(set(out[:, ids.shape[1]:].flatten().tolist())) > 1, "degenerate test: one token generated"


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_t5_generate_with_prompt(method):
    """generate runs T5's encoder on its own: the prompt must still reach it, and the cross-attention mask."""
    model = applied("t5", method, scale=1.0)
    ids, mask = batch([6, 3], "right")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        cur = torch.full((2, 1), PAD, dtype=torch.long)
        for step in range(4):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=cur, use_cache=False).logits[:, -1]
            # generate keeps its logits in float32: equal up to that rounding (one ulp)
            torch.testing.assert_close(out.logits[step], logits.float(), atol=0, rtol=2 ** -23, msg=f"step {step}")
            cur = torch.cat([cur, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, cur)


def test_token_labels_get_prompt_padding_and_sequence_labels_do_not():
    model = tiny("llama")
    fastprefix.apply(model, METHODS["pt"]())
    ids, mask = batch([5, 5])
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    m = model.fastprefix.num_virtual_tokens
    assert out.logits.shape[1] == m + ids.shape[1]
    # the tokens the model alone scores: each slot t >= m on the token after it (the first token stays unscored)
    manual = nn.functional.cross_entropy(out.logits[:, m:-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual.to(out.loss.dtype), atol=1e-6, rtol=0)

    cls = tiny("bert", head="seq")
    fastprefix.apply(cls, METHODS["adept"](), trainable=("classifier",))
    labels = torch.tensor([0, 1])
    out = cls(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), labels=labels)
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)
    assert cls.classifier.weight.requires_grad and not cls.bert.pooler.dense.weight.requires_grad


def test_unsupported_models_and_configs_are_clear_errors():
    with pytest.raises(ValueError, match="PreTrainedModel"):
        fastprefix.apply(nn.Linear(3, 3), METHODS["apt"]())
    bart = tiny("bart")
    with pytest.raises(ValueError, match="encoder-decoder"):  # T5, mT5 and UMT5 are the encoder-decoders supported
        fastprefix.apply(bart, METHODS["ptv2"]())
    with pytest.raises(ValueError, match="config is a dict.*config_from_dict"):
        fastprefix.apply(tiny("bert"), {"method": "apt"})
    with pytest.raises(ValueError, match="trainable"):
        fastprefix.apply(tiny("bert"), METHODS["pt"](), trainable=("nope",))
    with pytest.raises(ValueError, match="not applied"):
        fastprefix.remove(tiny("bert"))
    model = applied("llama", "pt")
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.randn(1, 3, 32, dtype=torch.float64))


def test_unsupported_attention_dispatch_names_what_is_missing():
    model = tiny("bert")
    type(model)._supports_attention_backend, old = False, type(model)._supports_attention_backend
    try:
        with pytest.raises(ValueError, match="AttentionInterface"):
            fastprefix.apply(model, METHODS["apt"]())
    finally:
        type(model)._supports_attention_backend = old
    # sliding-window layers (Qwen2's here) are supported: the invariants matrix
    # (tests/integrations/test_invariants_*.py) holds windowed Mistral and Gemma 2/3 to every invariant,
    # tests/integrations/test_model_reach.py windowed Qwen2
    qwen = tiny("qwen2", hidden_size=32, num_attention_heads=4, use_sliding_window=True, sliding_window=4,
                max_window_layers=0)
    fastprefix.apply(qwen, METHODS["ptv2"]())


def test_apt_gate_report_is_computed_from_the_hidden_states_entering_each_layer():
    model = applied("bert", "apt")
    ids, mask = batch(LENGTHS)
    seen = []
    hook = model.encoder.layer[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        run(model, "bert", ids, mask)
    hook.remove()
    stats = integration.state_of(model).gate_stats
    assert set(stats) == {0, 1}
    real = mask.bool()[..., None]
    alpha = torch.sigmoid(seen[0] @ model.fastprefix.gate_weight[1].double() + model.fastprefix.gate_bias[1].double())
    torch.testing.assert_close(stats[1].double(), (alpha * real).sum((0, 1)) / real.sum(), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).double().eval()


SENTENCES = ["a small cat sat on the warm mat", "dogs bark", "prefix tuning keeps the model frozen and learns a little"]


@pytest.mark.parametrize("method", ("apt", "ptv2", "adept", "dept"))
def test_real_minilm_padded_batch_equals_each_sentence_alone(minilm, method):
    tok, model = minilm
    fastprefix.apply(model, METHODS[method]())
    try:
        perturb(model, scale=0.2)
        enc = tok(SENTENCES, padding=True, return_tensors="pt")
        m = model.fastprefix.num_virtual_tokens if method in PROMPT_METHODS else 0
        with torch.no_grad():
            out = model(**enc).last_hidden_state
            for b, text in enumerate(SENTENCES):
                alone = model(**tok([text], return_tensors="pt")).last_hidden_state
                torch.testing.assert_close(_real_rows(out, b, enc["attention_mask"], m), alone[0], **EXACT)
    finally:
        fastprefix.remove(model)


@pytest.mark.parametrize("method", ["ptv2", "pt"])
def test_matches_peft_given_the_same_prefix_or_prompt(method):
    """Cross-check against PEFT: same table -> same logits. PEFT keeps the prefix in the KV cache, so its real
    tokens sit at positions L.. (after the prefix); fastprefix's prefix takes no positions, so it is fed the
    same shifted positions here. PEFT ignores position_ids for prompt tuning (so it is not exact under left
    padding): that case is compared right-padded, positions left to the model."""
    import copy

    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    base = tiny("llama")
    ours = perturb(fastprefix.apply(copy.deepcopy(base), METHODS[method]()))
    L = ours.fastprefix.num_virtual_tokens
    peft_cfg = (PrefixTuningConfig if method == "ptv2" else PromptTuningConfig)(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=L)
    theirs = get_peft_model(copy.deepcopy(base), peft_cfg)
    ids, mask = batch([6, 4], "left" if method == "ptv2" else "right")
    pos = positions(mask)
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(
            ours.fastprefix.embedding if method == "ptv2" else ours.fastprefix.prompt)
        if method == "ptv2":
            want = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            got = ours(input_ids=ids, attention_mask=mask, position_ids=pos + L).logits
        else:
            want = theirs(input_ids=ids, attention_mask=mask).logits
            got = ours(input_ids=ids, attention_mask=mask).logits
    real = torch.cat([torch.ones(2, want.shape[1] - ids.shape[1], dtype=torch.bool), mask.bool()], 1)
    torch.testing.assert_close(got[real], want[real], **EXACT)
