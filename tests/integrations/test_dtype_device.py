"""What `.to()` does to an applied model, and models without real weights (issue 25): casting the model down
(`half()`, `.to(torch.bfloat16)`) leaves the adapter float32, with float32 gradients, as it was created; casting up
and moving devices apply to it as to any module; a meta-device model is refused at `apply`."""

import pytest
import torch

import fastprefix
from helpers.models import VOCAB, tiny

# float32, LlamaConfig's own position table and special tokens
LLAMA = dict(dtype=torch.float32, max_position_embeddings=2048, pad_token_id=None, eos_token_id=2)
CONFIGS = {"apt": lambda: fastprefix.APTConfig(num_virtual_tokens=3),
           "adept": lambda: fastprefix.ADePTConfig(num_virtual_tokens=3, rank=4),
           "dept": lambda: fastprefix.DePTConfig(num_virtual_tokens=3, rank=4, max_length=16)}


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
@pytest.mark.parametrize("method", CONFIGS)
def test_casting_the_model_down_keeps_the_adapter_float32(method, cast):
    model = fastprefix.apply(tiny("llama", **LLAMA).train(), CONFIGS[method]())
    dtype = getattr(torch, "float16" if cast == "half" else cast)
    model = model.half() if cast == "half" else model.to(dtype)
    assert model.model.embed_tokens.weight.dtype == dtype  # the frozen base model is cast
    assert {p.dtype for p in model.fastprefix.parameters()} == {torch.float32}
    ids = torch.randint(3, VOCAB, (2, 5))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == dtype
    out.loss.backward()
    grads = [p.grad for p in model.fastprefix.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_casting_up_and_moving_apply_as_to_any_module():
    model = fastprefix.apply(tiny("llama", **LLAMA), CONFIGS["apt"]())
    model.double()
    assert {p.dtype for p in model.fastprefix.parameters()} == {torch.float64}
    model.to("meta")  # a device move (meta: no memory) is not a cast: it applies
    assert {p.device.type for p in model.fastprefix.parameters()} == {"meta"}


def test_a_meta_device_model_is_refused_at_apply():
    with torch.device("meta"):
        model = tiny("llama", **LLAMA)
    with pytest.raises(ValueError, match="meta device.*Materialise the model first"):
        fastprefix.apply(model, CONFIGS["apt"]())
    assert not hasattr(model, "fastprefix")
