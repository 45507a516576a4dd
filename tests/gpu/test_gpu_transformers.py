"""🤗 transformers models tuned by fastprefix on a CUDA GPU in bfloat16, the Triton kernels compiled.

Marked ``cuda`` (skipped without a GPU or under ``TRITON_INTERPRET=1``). Each check uses FlashAttention's
rule at the model level: the bf16 Triton run's error against the same model in float64 (PyTorch reference
path) is at most twice the error of the bf16 PyTorch reference path, plus a floor.

- a padded batch gives each sequence what it gives alone (encoders right-padded, decoders left-padded);
- ``generate`` with the KV cache (the prefix attended at every step, never cached) gives the logits of an
  uncached forward over the generated sequence;
- non-reentrant gradient checkpointing gives the adapter's gradients;
- ``torch.compile`` (inductor) runs the model, forward and backward, with the kernels as opaque custom ops.

``FASTPREFIX_GPU_TEST_DEVICE=cpu`` runs the same logic on CPU under the interpreter (developing the tests).
"""

import copy
import os

import pytest
import torch

import fastprefix
from helpers.models import PAD, PROMPT_METHODS, applied, batch, positions
from helpers.numerics import assert_flash_rule

pytestmark = pytest.mark.cuda

ON_CPU = os.environ.get("FASTPREFIX_GPU_TEST_DEVICE") == "cpu"
DEVICE = torch.device("cpu" if ON_CPU else "cuda")
BF16 = torch.bfloat16
FLOOR = 2e-3  # relative to the largest magnitude of the float64 reference (bf16)
SIDE = {"bert": "right", "llama": "left"}


def three_models(kind, method):
    """The same tuned model three times on the device: bf16 (Triton), bf16 (PyTorch path), float64 (PyTorch)."""
    master = applied(kind, method, scale=0.3)  # float64, method parameters moved off their init
    got = copy.deepcopy(master).to(DEVICE, BF16)
    same = copy.deepcopy(master).to(DEVICE, BF16)
    ref = copy.deepcopy(master).to(DEVICE)
    return got, same, ref


def forward(model, kind, ids, mask, backend):
    kw = dict(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE))
    if kind == "llama":
        kw["position_ids"] = positions(mask).to(DEVICE)
    with fastprefix.use_backend(model, backend):
        out = model(**kw)
    return out.logits if kind == "llama" else out.last_hidden_state


def rule(name, x, x_same, x_64):
    floor = FLOOR * max(1.0, x_64.abs().max().item())
    assert_flash_rule(x, x_same, x_64, floor=floor, name=name)


def _real_rows(out, b, mask, m):
    keep = torch.cat([torch.ones(m, dtype=torch.bool), mask[b].bool()]).to(out.device)
    return out[b][keep]


@pytest.mark.parametrize("method", ["ptv2", "apt", "apt-pooled", "dept", "adept"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_padded_batch_equals_each_sequence_alone(kind, method):
    got, same, ref = three_models(kind, method)
    lengths = [9, 5, 1]
    ids, mask = batch(lengths, SIDE[kind])
    m = got.fastprefix.num_virtual_tokens if method in PROMPT_METHODS else 0
    with torch.no_grad():
        out = forward(got, kind, ids, mask, "triton")
        for b in range(len(lengths)):
            real = ids[b][mask[b].bool()][None]
            ones = torch.ones_like(real)
            alone_same = forward(same, kind, real, ones, "torch")[0]
            alone_64 = forward(ref, kind, real, ones, "torch")[0]
            rule(f"{kind} {method} sequence {b}", _real_rows(out, b, mask, m), alone_same, alone_64)


@pytest.mark.parametrize("method", ["ptv2", "apt", "adept"])
def test_generate_with_cache_gives_the_uncached_logits(method):
    got, same, ref = three_models("llama", method)
    ids, mask = batch([6, 3], "left")
    steps = 4
    with torch.no_grad(), fastprefix.use_backend(got, "triton"):
        out = got.generate(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), max_new_tokens=steps,
                           do_sample=False, pad_token_id=PAD, eos_token_id=None, return_dict_in_generate=True,
                           output_logits=True)
    seq = out.sequences.cpu()
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], steps, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        logits_same = forward(same, "llama", seq, full_mask, "torch")
        logits_64 = forward(ref, "llama", seq, full_mask, "torch")
    # the logits of step i predict token P + i, from position P - 1 + i (plus the m prompt rows in front)
    at = logits_64.shape[1] - seq.shape[1] + ids.shape[1] - 1
    for i in range(steps):
        rule(f"{method} step {i}", out.logits[i], logits_same[:, at + i], logits_64[:, at + i])


def _adapter_grads(model, kind, ids, mask, backend, checkpointing):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.zero_grad(set_to_none=True)
    logits = forward(model, kind, ids, mask, backend)
    real = mask.to(DEVICE).bool()
    m = logits.shape[1] - real.shape[1]
    loss = logits[:, m:][real].float().square().mean()
    loss.backward()
    if checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return {n: p.grad for n, p in model.fastprefix.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["ptv2", "apt", "adept"])
def test_gradient_checkpointing_gives_the_adapter_gradients(method):
    got, same, ref = three_models("llama", method)
    ids, mask = batch([7, 4], "left")
    grads = _adapter_grads(got, "llama", ids, mask, "triton", checkpointing=True)
    grads_same = _adapter_grads(same, "llama", ids, mask, "torch", checkpointing=False)
    grads_64 = _adapter_grads(ref, "llama", ids, mask, "torch", checkpointing=False)
    assert grads and grads.keys() == grads_64.keys()
    for n in grads:
        assert grads[n] is not None, f"{n}: no gradient under checkpointing"
        rule(f"{method} d{n}", grads[n], grads_same[n], grads_64[n])


def test_torch_compile_inductor_forward_and_backward():
    """APT's token gate on a Llama: the model compiled by inductor, padded batch, forward and adapter gradients."""
    got, same, ref = three_models("llama", "apt")
    ids, mask = batch([7, 4], "left")
    compiled = torch.compile(got, backend="inductor")
    kw = dict(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), position_ids=positions(mask).to(DEVICE))
    with fastprefix.use_backend(got, "triton"):
        logits = compiled(**kw).logits
    real = mask.to(DEVICE).bool()
    logits[real].float().square().mean().backward()
    grads = {n: p.grad for n, p in got.fastprefix.named_parameters() if p.requires_grad}
    with torch.no_grad():
        logits_same = forward(same, "llama", ids, mask, "torch")
        logits_64 = forward(ref, "llama", ids, mask, "torch")
    rule("compiled logits", logits.detach()[real], logits_same[real], logits_64[real])
    grads_same = _adapter_grads(same, "llama", ids, mask, "torch", checkpointing=False)
    grads_64 = _adapter_grads(ref, "llama", ids, mask, "torch", checkpointing=False)
    for n in grads_64:
        assert grads[n] is not None, f"{n}: no gradient through the compiled model"
        rule(f"compiled d{n}", grads[n], grads_same[n], grads_64[n])
