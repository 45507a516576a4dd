"""Per-row adapters in one call of a prefix-method model: ``model(..., adapter_names=[...])``.

Row b of a mixed, padded batch must give what row b gives alone with its adapter active (``"__base__"``: with the
method disabled), in float64; training on the mixed batch must give each adapter the gradient of its own rows
run alone, also under gradient checkpointing; mistakes are errors before any work.
"""

import pytest
import torch

import fastprefix
from helpers.families import FAMILIES
from helpers.models import PREFIX_METHODS, assert_adapter_name_errors, batch, cached_and_uncached_logits, prepared, tiny

KINDS = ("bert", "llama", "t5")
# a second adapter of each prefix method: another length, projection or gate mode than METHODS'
OTHER = {
    "ptv2": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=7),
    "ptv2-proj": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=3, prefix_projection=True,
                                                    projection_hidden=8),
    "apt": lambda: fastprefix.APTConfig(num_virtual_tokens=2, gate="pooled"),
    "apt-pooled": lambda: fastprefix.APTConfig(num_virtual_tokens=6),
}
NAMES = ["b", "default", "__base__", "b"]
CLOSE = dict(rtol=0, atol=1e-12)


def _model(kind, method, other=None, dropout=None):
    """``kind``'s model with ``method`` as "default" and ``other`` (default OTHER[method]) as "b", both moved off
    their init and in float64 (their gradients then compare to rounding); ``dropout``: the base model's (None: its
    family's default)."""
    model = prepared(tiny(kind, dropout=dropout), method, seed=None, double=False, scale=0.5)
    fastprefix.add_adapter(model, other or OTHER[method](), "b")
    model.fastprefix.double()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.fastprefix_adapters["b"].double().parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def _call(kind, lengths=(6, 4, 5, 3)):
    ids, mask = batch(list(lengths), side="left" if FAMILIES[kind].kind == "decoder" else "right")
    kw = dict(input_ids=ids, attention_mask=mask)
    if FAMILIES[kind].kind == "seq2seq":
        kw["labels"] = torch.arange(3, 7).repeat(len(lengths), 1)
    return kw


def _out(model, kind, **kw):
    out = model(**kw)
    return out.last_hidden_state if FAMILIES[kind].kind == "encoder" else out.logits


def _alone(model, kind, kw, b, name):
    """Row b alone, its adapter active (the base model for "__base__")."""
    row = {k: v[b:b + 1] for k, v in kw.items()}
    if name == "__base__":
        with fastprefix.disabled(model):
            return _out(model, kind, **row)
    before = fastprefix.active_adapter(model)
    fastprefix.set_adapter(model, name)
    try:
        return _out(model, kind, **row)
    finally:
        fastprefix.set_adapter(model, before)


def _real(kind, kw, b):
    """Row b's positions that hold real tokens (T5's outputs are the decoder's, all real)."""
    return slice(None) if FAMILIES[kind].kind == "seq2seq" else kw["attention_mask"][b].bool()


@pytest.mark.parametrize("method", PREFIX_METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_each_row_is_that_row_alone_with_its_adapter(kind, method):
    model, kw = _model(kind, method), _call(kind)
    with torch.no_grad():
        out = _out(model, kind, **kw, adapter_names=NAMES)
        for b, name in enumerate(NAMES):
            real = _real(kind, kw, b)
            torch.testing.assert_close(out[b][real], _alone(model, kind, kw, b, name)[0][real], **CLOSE)
    assert fastprefix.active_adapter(model) == "default"


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("method", ["ptv2", "apt"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_each_adapter_gets_the_gradient_of_its_own_rows(kind, method, checkpointing):
    """A loss that sums per-row terms (each row's output along a fixed random direction, dropout off): each
    adapter's gradient from the mixed batch equals the sum of its rows' gradients run alone (checkpointed: one
    forward of the mixed batch and another before the backward), and is far from 0."""
    model, kw = _model(kind, method, dropout=0.0), _call(kind)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = ["b", "default", "b", "default"]
    with torch.no_grad():
        direction = torch.randn(_out(model, kind, **kw, adapter_names=names).shape,
                                generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def loss(out, rows):
        return sum((out[i][_real(kind, kw, b)] * direction[b][_real(kind, kw, b)]).sum() for i, b in enumerate(rows))

    if checkpointing:
        _out(model, kind, **kw, adapter_names=names).sum().backward()  # an earlier forward and backward
        model.zero_grad()
    loss(_out(model, kind, **kw, adapter_names=names), range(4)).backward()
    mixed = _grads(model)
    model.zero_grad()
    for b, name in enumerate(names):
        fastprefix.set_adapter(model, name)
        loss(_out(model, kind, **{k: v[b:b + 1] for k, v in kw.items()}), [b]).backward()
    fastprefix.set_adapter(model, "default")
    alone = _grads(model)
    assert mixed.keys() == alone.keys() and any(k.startswith("fastprefix_adapters.b.") for k in mixed)
    for k in mixed:
        assert mixed[k].abs().max() > 1e-6, f"{k}: the loss barely reaches it"
        torch.testing.assert_close(mixed[k], alone[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("method", ["ptv2", "apt"])
@pytest.mark.parametrize("kind", KINDS)
def test_base_rows_are_the_base_model_on_the_same_batch(kind, method):
    """A "__base__" row of a mixed call is the base model's row on the same batch, bit for bit: its real keys take the
    vendor attention the base model runs (on T5 with the position bias in its mask), and the prefix's weight is
    exactly 0."""
    model, kw = _model(kind, method), _call(kind)
    with torch.no_grad():
        out = _out(model, kind, **kw, adapter_names=NAMES)
        with fastprefix.disabled(model):
            base = _out(model, kind, **kw)
    for b in [i for i, name in enumerate(NAMES) if name == "__base__"]:
        real = _real(kind, kw, b)
        assert torch.equal(out[b][real], base[b][real])


def test_mistakes_are_errors_before_any_work():
    model, kw = _model("llama", "ptv2"), _call("llama")
    assert_adapter_name_errors(model, kw)
    shifted = fastprefix.apply(tiny("llama"),
                               fastprefix.PTuningV2Config(num_virtual_tokens=3, prefix_positions="shift"))
    with pytest.raises(ValueError, match="per-row adapters need prefix_positions='none'"):
        shifted(**kw, adapter_names=["default"] * 4)


@pytest.mark.parametrize("kind,names", [("llama", ["b", "default", "b", "default"]), ("llama", NAMES),
                                        ("bert", NAMES), ("t5", NAMES)],
                         ids=["llama-same-length", "llama-own-lengths", "bert-own-lengths", "t5-own-lengths"])
def test_the_triton_backend_gives_the_same_rows_and_gradients(kind, names):
    """Under Triton's interpreter the kernels read each row's prefix from the adapters' table (also for adapters of
    other lengths and a "__base__" row, whose slots they hide; T5's with its position bias): the rows and every
    adapter's gradient are the torch backend's."""
    model = _model(kind, "apt", fastprefix.APTConfig(num_virtual_tokens=5, gate="pooled"), dropout=0.0)
    model.train()
    kw = _call(kind)
    with torch.no_grad():
        direction = torch.randn(_out(model, kind, **kw, adapter_names=names).shape,
                                generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    results = {}
    for backend in ("torch", "triton"):
        with fastprefix.use_backend(model, backend):
            out = _out(model, kind, **kw, adapter_names=names)
            sum((out[b][_real(kind, kw, b)] * direction[b][_real(kind, kw, b)]).sum()
                for b in range(len(names))).backward()
        results[backend] = out.detach(), _grads(model)
        model.zero_grad()
    (want, want_grads), (got, got_grads) = results["torch"], results["triton"]
    for b in range(len(names)):
        real = _real(kind, kw, b)
        torch.testing.assert_close(got[b][real], want[b][real], rtol=0, atol=1e-10)
    assert got_grads.keys() == want_grads.keys() and any(k.startswith("fastprefix_adapters.b.") for k in got_grads)
    for k in want_grads:
        assert want_grads[k].abs().max() > 1e-6, f"{k}: the loss barely reaches it"
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-9, atol=1e-10, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("search", [dict(do_sample=False), dict(num_beams=2, do_sample=False)],
                         ids=["greedy", "beam-search"])
@pytest.mark.parametrize("method", ["ptv2", "apt"])
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_generate_gives_each_row_its_adapters_tokens(kind, method, search):
    """generate(..., adapter_names=...) (with its KV cache; beam search repeats each row, and its name) gives each row
    the tokens it generates alone with its adapter active (the base model for "__base__")."""
    # APT: a token-gate "b" (the causal pooled gate keeps running statistics per adapter while decoding, which
    # per-row adapters refuse for now)
    model = _model(kind, method, fastprefix.APTConfig(num_virtual_tokens=6) if method == "apt" else None)
    ids, mask = _call(kind, lengths=(5, 3, 4))["input_ids"], _call(kind, lengths=(5, 3, 4))["attention_mask"]
    names = ["b", "default", "__base__"]
    call = dict(max_new_tokens=4, pad_token_id=0, **search)
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **call)
    for b, name in enumerate(names):
        row = dict(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], **call)
        if name == "__base__":
            with fastprefix.disabled(model):
                want = model.generate(**row)
        else:
            fastprefix.set_adapter(model, name)
            want = model.generate(**row)
            fastprefix.set_adapter(model, "default")
        got, want = out[b], want[0]
        if FAMILIES[kind].kind == "decoder":  # left padding: the row's own tokens
            got = got[got.shape[0] - want.shape[0]:] if got.shape[0] > want.shape[0] else got
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="adapter_names has 2 names for a batch of 3 rows"):
        model.generate(input_ids=ids, attention_mask=mask, adapter_names=names[:2], **call)


@pytest.mark.parametrize("method", ["ptv2", "apt"])
def test_generate_logits_equal_the_uncached_forward_at_every_step(method):
    """Greedy generate with a KV cache on a left-padded mixed batch (two adapters of other lengths and a "__base__"
    row): every step's logits are the uncached forward's over the same tokens and names."""
    # APT: a token-gate "b" (the causal pooled gate is refused while decoding with per-row adapters)
    model = _model("llama", method, fastprefix.APTConfig(num_virtual_tokens=6) if method == "apt" else None)
    kw = _call("llama", lengths=(5, 3, 4, 2))
    pairs = cached_and_uncached_logits(model, kw["input_ids"], kw["attention_mask"], adapter_names=NAMES)
    for t, (got, want) in enumerate(pairs):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m, t=t: f"step {t}: {m}")
