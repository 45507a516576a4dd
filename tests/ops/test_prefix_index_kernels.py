"""Per-row adapters on the Triton kernels: the fused kernel and the split path read row b's prefix from the table
``[A, Hkv, L, D]`` at ``prefix_index[b]`` in place (no ``[B, Hkv, L, D]`` copy) and hide the slots past its adapter's
length ``prefix_lengths[a]``, forward and backward (the table's gradient summed over the rows that share an adapter).

Contract, checked under the Triton interpreter: float64 outputs and gradients equal the reference path's (itself
checked row by row against each row alone in tests/ops/test_prefix_index.py) over odd shapes (one query, one prefix
slot, a prefix longer than one tile, GQA, head dims 16 to 128, left padding, a row with no real key and an empty
adapter), float64 ``gradcheck`` through the kernels, and FlashAttention's error rule in float32.
"""

import dataclasses

import pytest
import torch

import fastprefix
from fastprefix.kernels.attention import fused, split

from helpers.numerics import FLOOR, assert_flash_rule_run, gradcheck_attention, max_errors, run

F64 = torch.float64


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int = 4
    H: int = 4
    Hkv: int = 2
    Sq: int = 5
    Sk: int = 7
    L: int = 3
    D: int = 16
    A: int = 3

    @property
    def id(self):
        return f"B{self.B}-H{self.H}/{self.Hkv}-Sq{self.Sq}-Sk{self.Sk}-L{self.L}-D{self.D}-A{self.A}"


SHAPES = [
    Shape(),
    Shape(Sq=1, Sk=9),  # decoding: one query over a cache
    Shape(L=1, H=2, Hkv=2),  # one prefix slot, MHA
    Shape(L=37, Sq=19, Sk=19, D=32),  # a prefix over several tiles, S not a block multiple
    Shape(B=3, H=8, Hkv=1, D=128, Sq=6, Sk=6, A=2),  # MQA, the widest head
]


def _index(shape):
    """Rows' adapters: the last adapter shared by two rows where the batch allows it, every row in range."""
    return torch.tensor([(shape.A - 1 - b) % shape.A for b in range(shape.B - 1)] + [shape.A - 1])


def _lengths(shape):
    """Adapter lengths: the full L, a shorter one, and 0 (the last adapter: no prefix at all)."""
    return torch.tensor([shape.L, max(shape.L // 2, 1), 0][:shape.A - 1] + [0])


def _tensors(shape, dtype=F64, gate=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dtype).requires_grad_()  # noqa: E731
    t = dict(q=r(shape.B, shape.H, shape.Sq, shape.D), k=r(shape.B, shape.Hkv, shape.Sk, shape.D),
             v=r(shape.B, shape.Hkv, shape.Sk, shape.D), prefix_k=r(shape.A, shape.Hkv, shape.L, shape.D),
             prefix_v=r(shape.A, shape.Hkv, shape.L, shape.D))
    if gate == "token":
        t["gate"] = (torch.rand(shape.B, shape.Sq, shape.L, generator=g, dtype=F64) * 2).to(dtype).requires_grad_()
    elif gate == "pooled":
        t["gate"] = torch.rand(shape.B, 1, shape.L, generator=g, dtype=F64).to(dtype).requires_grad_()
    return t


def _padding(shape):
    """Left padding on row 1, and the last row (adapter A-1, length 0 with own lengths) with no real key."""
    kpm = torch.ones(shape.B, shape.Sk, dtype=torch.bool)
    if shape.B > 2:
        kpm[1, :min(3, shape.Sk - 1)] = False
    kpm[-1, :] = False
    return kpm


def _call(shape, lengths, pad, causal):
    return dict(prefix_index=_index(shape), prefix_lengths=_lengths(shape) if lengths else None,
                key_padding_mask=_padding(shape) if pad else None, causal=causal)


def _triton(path):
    def attention(q, k, v, prefix_k, prefix_v, **kwargs):
        return fastprefix.gated_prefix_attention(q, k, v, prefix_k, prefix_v, backend="triton", path=path, **kwargs)
    return attention


def _torch(q, k, v, prefix_k, prefix_v, **kwargs):
    return fastprefix.gated_prefix_attention(q, k, v, prefix_k, prefix_v, backend="torch", **kwargs)


PATHS = ["fused", "split"]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
@pytest.mark.parametrize("gate", [None, "token", "pooled"], ids=["ptv2", "token-gate", "pooled-gate"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full-length", "own-lengths"])
@pytest.mark.parametrize("pad,causal", [(False, False), (True, False), (True, True)],
                         ids=["dense", "padded", "padded-causal"])
@pytest.mark.parametrize("path", PATHS)
def test_the_kernels_match_the_reference_in_float64(path, pad, causal, lengths, gate, shape):
    tensors = _tensors(shape, gate=gate)
    errors = max_errors(_triton(path), _torch, tensors, _call(shape, lengths, pad, causal))
    assert max(errors.values()) < 1e-12, errors


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_the_table_is_read_in_place(path, index_dtype, monkeypatch):
    """The kernels get the table itself (A rows, its own memory), not the rows' prefixes gathered to [B, ...]; an
    int32 or int64 index and lengths give the reference's rows."""
    shape = Shape(B=6, A=2)
    seen = []
    target, name = (fused, "_forward") if path == "fused" else (split, "merge_forward")
    real = getattr(target, name)

    def spy(*args, **kwargs):
        seen.append(args[3] if path == "fused" else args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, spy)
    tensors = _tensors(shape)
    call = dict(prefix_index=torch.tensor([0, 1, 1, 0, 1, 1], dtype=index_dtype),
                prefix_lengths=torch.tensor([3, 1], dtype=index_dtype))
    out = fastprefix.gated_prefix_attention(**tensors, **call, backend="triton", path=path)
    assert len(seen) == 1 and seen[0].shape[0] == shape.A
    assert seen[0].data_ptr() == tensors["prefix_k"].data_ptr()
    torch.testing.assert_close(out, _torch(**tensors, **call), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gate", [None, "token"], ids=["ptv2", "token-gate"])
def test_gradcheck_through_the_kernels(path, gate):
    shape = Shape(B=3, H=2, Hkv=1, Sq=3, Sk=4, L=3, D=16, A=3)
    tensors = _tensors(shape, gate=gate)
    call = _call(shape, True, True, True)
    call["prefix_index"] = torch.tensor([2, 0, 0])  # two rows share adapter 0; row 0 sees only its real keys
    call["key_padding_mask"][0] = True
    assert gradcheck_attention(_triton(path), tensors, call, fast_mode=True)


@pytest.mark.parametrize("gate", [None, "token"], ids=["ptv2", "token-gate"])
@pytest.mark.parametrize("path", PATHS)
def test_float32_keeps_flash_attentions_error_rule(path, gate):
    shape = Shape(L=21, Sq=9, Sk=11, D=32)
    tensors = _tensors(shape, dtype=torch.float32, gate=gate)
    call = _call(shape, True, True, True)
    grad = torch.randn(shape.B, shape.H, shape.Sq, shape.D, generator=torch.Generator().manual_seed(2))
    assert_flash_rule_run(_triton(path), _torch, tensors, call, grad, floor=FLOOR[torch.float32],
                          name=f"{path} per-row adapters")


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_a_row_that_sees_nothing_is_zero_with_zero_gradients(path, dtype):
    """No prefix slot (an empty adapter) and no real key: out 0 and no gradient anywhere, never NaN."""
    shape = Shape()
    tensors = _tensors(shape, dtype=dtype, gate="token")
    call = _call(shape, True, True, False)
    out, grads = run(_triton(path), tensors, call, torch.ones(shape.B, shape.H, shape.Sq, shape.D, dtype=dtype))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    assert torch.equal(grads["q"][-1], torch.zeros_like(grads["q"][-1]))
    assert torch.equal(grads["gate"][-1], torch.zeros_like(grads["gate"][-1]))


@pytest.mark.parametrize("path", PATHS)
def test_hidden_slots_get_no_gradient(path):
    """Slots past an adapter's length are not part of it: their table rows and gate entries get exactly 0."""
    shape = Shape(L=6)
    tensors = _tensors(shape, gate="token")
    call = _call(shape, True, False, False)
    _, grads = run(_triton(path), tensors, call, torch.ones(shape.B, shape.H, shape.Sq, shape.D, dtype=F64))
    lengths, index = call["prefix_lengths"], call["prefix_index"]
    for a, n in enumerate(lengths.tolist()):
        assert torch.equal(grads["prefix_k"][a, :, n:], torch.zeros_like(grads["prefix_k"][a, :, n:]))
        assert torch.equal(grads["prefix_v"][a, :, n:], torch.zeros_like(grads["prefix_v"][a, :, n:]))
    for b, a in enumerate(index.tolist()):
        n = lengths[a]
        assert torch.equal(grads["gate"][b, :, n:], torch.zeros_like(grads["gate"][b, :, n:]))


def test_a_forced_concat_path_falls_back_for_per_row_adapters(monkeypatch):
    """The concat path would build each row's [prefix ; keys]: asked for, a per-row call runs where split would (the
    dispatch rule's fallback) and gives the reference's rows and gradients."""
    from fastprefix.kernels.attention import concat

    monkeypatch.setattr(concat, "concat_attention", lambda *a, **k: pytest.fail("the concat path took the call"))
    shape = Shape()
    tensors = _tensors(shape, gate="pooled")
    errors = max_errors(_triton("concat"), _torch, tensors, _call(shape, True, True, False))
    assert max(errors.values()) < 1e-12, errors


def test_the_route_of_a_per_row_call_is_never_concat():
    """``attention_route`` told of the table (``prefix_index``) answers what the call takes: split where it is asked
    for concat, as the call itself falls back."""
    shape = Shape()
    t = _tensors(shape)
    index = _index(shape)
    shared = t["prefix_k"][0]  # one adapter's prefix for every row: the concat path serves that call
    assert fastprefix.ops.attention_route(t["q"], t["k"], shared, path="concat").path == "concat"
    assert fastprefix.ops.attention_route(t["q"], t["k"], t["prefix_k"], prefix_index=index,
                                          path="concat") == ("split", "forced")
    assert fastprefix.ops.attention_path(t["q"], t["k"], prefix_k=t["prefix_k"], prefix_index=index,
                                         path="concat") == "split"
