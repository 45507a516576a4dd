"""The Triton kernels compiled on a CUDA GPU (``make gpu-test``): accuracy, determinism, large shapes.

Marked ``cuda``: skipped without a GPU, or under ``TRITON_INTERPRET=1`` (these tests are about compiled code;
the interpreter versions are tests/ops/test_attention_kernel.py and tests/ops/test_embedding_kernel.py).

- Every attention path (the fused kernel, and the split path forced with ``path="split"``)
  and both embedding kernels in fp16, bf16 and fp32, under FlashAttention's rule: the error of every output
  and gradient against a float64 reference is at most twice the error of the PyTorch reference path in the
  same dtype, plus a small floor. Split cases skip (saying so) when the dispatch sends that call to the fused
  kernel anyway; that is asked of the code, never assumed.
- Bitwise run-to-run determinism of every backward.
- Large cases: B x H > 65,535 (grid limits), S = 16,384, and tensors past 2^31 elements (int64 offsets),
  each guarded by a free-memory check that skips with the numbers.

``FASTPREFIX_GPU_TEST_DEVICE=cpu`` runs the same logic on CPU under the interpreter with the shapes shrunk
(for developing these tests without a GPU; the large cases skip there).
"""

import dataclasses
import os

import pytest
import torch

import fastprefix
from helpers import cases
from helpers.cases import ids
from helpers.numerics import ATTENTION_INPUTS as NAMES
from helpers.numerics import FLOOR, assert_flash_rule, assert_flash_rule_parts

pytestmark = pytest.mark.cuda

ON_CPU = os.environ.get("FASTPREFIX_GPU_TEST_DEVICE") == "cpu"
DEVICE = torch.device("cpu" if ON_CPU else "cuda")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def need_free_gib(gib):
    """Skip unless the GPU has ``gib`` GiB free (the large cases)."""
    if ON_CPU:
        pytest.skip("large cases run on a GPU only")
    free, total = torch.cuda.mem_get_info(DEVICE)
    if free < gib * 2**30:
        pytest.skip(f"needs {gib:.0f} GiB of free GPU memory, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")


# ------------------------------------------------------------------------------------ attention cases


# tests/helpers/cases.py's Case, drawn on the device (float32 draws cast to the dtype, APT's hidden width 48)
Case = cases.maker("gpu")


def small(case):
    """The same features at interpreter size (``FASTPREFIX_GPU_TEST_DEVICE=cpu``)."""
    return dataclasses.replace(case, B=min(case.B, 2), Sq=min(case.Sq, 9), Sk=min(case.Sk, 19) if
                               case.Sq < case.Sk else min(case.Sk, 9), L=min(case.L, 5))


# few distinct kernel configurations (compile time), every feature at least once
CASES = [
    Case(2, 8, 2, 300, 300, 20, 128, causal=True),  # Llama-like GQA, causal, ragged tiles
    Case(2, 4, 4, 200, 200, 16, 64, gate="pooled", pad=True),  # BERT-like padded batch, pooled gate
    Case(2, 8, 2, 257, 257, 64, 64, gate="fused", causal=True, shared=False),  # APT token gate, own prefixes
    Case(3, 4, 1, 1, 190, 8, 128, gate="dense", pad=True, causal=True),  # decoding: Sq=1 < Sk
]


def make_inputs(case, dtype, seed=0):
    """Leaves in ``dtype`` (drawn on the device: the large cases hold billions of elements) and the call's
    keyword arguments. The references upcast these very values."""
    return cases.make_inputs(case, dtype, seed, device=DEVICE)


def attend(leaves, kwargs, grad_out, backend, path=None):
    """Output and gradients of every leaf, ``path`` forced (``path=``) on the Triton backend."""
    leaves = {k: v.detach().requires_grad_() for k, v in leaves.items()}  # no copy: ops never write their inputs
    out = fastprefix.gated_prefix_attention(*(leaves[n] for n in NAMES), backend=backend, path=path, **kwargs,
                                            **{k: v for k, v in leaves.items() if k not in NAMES})
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return out.detach(), dict(zip(leaves, grads))


def check_rule(case_id, dtype, got, ref, ref64, path=None):
    """FlashAttention's rule for the output and every gradient. The split path's dq is the vendor's dq of the real
    keys, which the vendor op returns rounded to the dtype, plus the prefix's share added by the merge kernel and
    rounded again: one rounding more than a single kernel (or the PyTorch path's one fused SDPA) makes, which the
    PyTorch path's error cannot account for. Its floor holds that half ulp of the largest |dq| on top."""
    out, grads = got
    for name, x in [("out", out)] + [(f"d{n}", g) for n, g in grads.items()]:
        assert x.dtype == dtype, (name, x.shape, x.dtype)
    extra_floor = {"dq": torch.finfo(dtype).eps / 2} if path == "split" else None
    assert_flash_rule_parts(got, ref, ref64, floor=FLOOR[dtype], name=case_id, extra_floor=extra_floor)


def _path_or_skip(path, leaves, kwargs):
    if path == "split":
        taken = fastprefix.ops.attention_path(leaves["q"], leaves["k"], key_padding_mask=kwargs.get("key_padding_mask"),
                                              causal=kwargs["causal"], path="split")
        if taken != "split":
            pytest.skip("the split path does not cover this call (its dispatch takes the fused kernel)")


def check_attention(case, dtype, path, *, rule_path=None, grad_out_in_dtype=False, reference_dtype=torch.float64):
    """:func:`check_rule` on one call: ``case``'s inputs in ``dtype`` (a split call the dispatch sends elsewhere
    skips), a random output gradient (drawn in float32 and cast to ``dtype``; drawn in ``dtype`` itself with
    ``grad_out_in_dtype``), the Triton backend with ``path`` forced against the torch backend in ``dtype`` and in
    ``reference_dtype``. ``rule_path`` is what :func:`check_rule` is told (the split path's dq floor)."""
    leaves, kwargs = make_inputs(case, dtype)
    _path_or_skip(path, leaves, kwargs)
    if grad_out_in_dtype:
        grad_out = torch.randn(case.B, case.H, case.Sq, case.D, device=DEVICE, dtype=dtype)
    else:
        grad_out = torch.randn(case.B, case.H, case.Sq, case.D, device=DEVICE).to(dtype)
    got = attend(leaves, kwargs, grad_out, "triton", path)
    ref = attend(leaves, kwargs, grad_out, "torch")
    ref_hi = attend({k: v.to(reference_dtype) for k, v in leaves.items()}, kwargs, grad_out.to(reference_dtype),
                    "torch")
    check_rule(case.id, dtype, got, ref, ref_hi, rule_path)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
@pytest.mark.parametrize("path", ["fused", "split"])
def test_attention_matches_float64_reference(path, case, dtype):
    check_attention(small(case) if ON_CPU else case, dtype, path, rule_path=path)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_attention_backward_is_bitwise_deterministic(path):
    case = Case(2, 8, 2, 257, 257, 64, 64, gate="fused", causal=True, shared=False)
    case = small(case) if ON_CPU else case
    leaves, kwargs = make_inputs(case, torch.bfloat16)
    _path_or_skip(path, leaves, kwargs)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, device=DEVICE, dtype=torch.bfloat16)
    first = attend(leaves, kwargs, grad_out, "triton", path)
    for _ in range(3):
        again = attend(leaves, kwargs, grad_out, "triton", path)
        assert torch.equal(again[0], first[0]), "output differs between runs"
        for n in first[1]:
            assert torch.equal(again[1][n], first[1][n]), f"d{n} differs between runs"


# (case, dtype): the APT token gate in every dtype; a padded batch (the split path's varlen op) in bf16
_TOKEN_GATE = Case(4, 8, 2, 300, 300, 40, 128, gate="fused", causal=True, shared=False)  # GQA, causal
_PADDED = Case(4, 4, 4, 200, 200, 16, 64, gate="pooled", pad=True, shared=False)
ADAPTER_CASES = [(_TOKEN_GATE, name) for name in DTYPES] + [(_PADDED, "bf16")]


@pytest.mark.parametrize("case,dtype", [(c, DTYPES[d]) for c, d in ADAPTER_CASES],
                         ids=[f"{c.id}-{d}" for c, d in ADAPTER_CASES])
@pytest.mark.parametrize("path", ["fused", "split"])
def test_per_row_adapters_match_float64_reference(path, case, dtype):
    """The kernels reading a table of 4 adapters' prefixes in place (``prefix_index``; lengths L, L/2, 0 and L-1:
    an empty one hides every slot), two rows on one adapter: FlashAttention's rule as above."""
    case = dataclasses.replace(small(case), B=case.B) if ON_CPU else case  # the 4 rows the table needs
    leaves, kwargs = make_inputs(case, dtype)
    L = case.L
    kwargs = dict(kwargs, prefix_index=torch.tensor([2, 0, 0, 3][:case.B], device=DEVICE),
                  prefix_lengths=torch.tensor([L, L // 2, 0, L - 1][:case.B], device=DEVICE))
    _path_or_skip(path, leaves, kwargs)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, device=DEVICE).to(dtype)
    got = attend(leaves, kwargs, grad_out, "triton", path)
    ref = attend(leaves, kwargs, grad_out, "torch")
    ref64 = attend({k: v.double() for k, v in leaves.items()}, kwargs, grad_out.double(), "torch")
    check_rule(f"{case.id} adapters", dtype, got, ref, ref64, path)


# ------------------------------------------------------------------------------------ attention, large


@pytest.mark.parametrize("path", ["fused", "split"])
def test_attention_more_than_65535_batch_heads(path):
    """B x H = 67,200: a launch grid that put B*H on axis 1 or 2 would exceed 65,535 there."""
    need_free_gib(8)
    check_attention(Case(2100, 32, 8, 16, 16, 4, 64, gate="fused", causal=True), torch.bfloat16, path,
                    grad_out_in_dtype=True)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_attention_sequence_16k(path):
    """S = 16,384, causal, GQA, a pooled gate. float32 stands in for float64 as the reference at this size
    (float32's error is ~1e4 below bf16's, so the rule is unchanged in effect), and the gate is the pooled
    one because the reference path then runs PyTorch's fused attention: with a token gate it builds the
    S x S scores (tens of GiB here)."""
    need_free_gib(24)
    check_attention(Case(1, 8, 2, 16384, 16384, 64, 128, gate="pooled", causal=True), torch.bfloat16, path,
                    grad_out_in_dtype=True, reference_dtype=torch.float32)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_attention_offsets_past_2_to_the_31_elements(path):
    """q, k, v, out and their gradients hold 2100 x 16 x 512 x 128 = 2.2e9 > 2^31 elements: a kernel that
    computed offsets in int32 would read and write the wrong rows of the last batch elements. Every gradient
    is per batch element (per-example prefixes), so slices of the batch are checked against the reference
    run on the same slices."""
    need_free_gib(48)
    case = Case(2100, 16, 16, 512, 512, 16, 128, shared=False)
    assert case.B * case.H * case.Sq * case.D > 2**31
    leaves, kwargs = make_inputs(case, torch.bfloat16)
    _path_or_skip(path, leaves, kwargs)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, device=DEVICE, dtype=torch.bfloat16)
    out, grads = attend(leaves, kwargs, grad_out, "triton", path)
    for b in (0, case.B // 2, case.B - 1):
        part = {k: v[b:b + 1] for k, v in leaves.items()}
        got = (out[b:b + 1], {k: v[b:b + 1] for k, v in grads.items()})
        ref = attend(part, kwargs, grad_out[b:b + 1], "torch")
        ref64 = attend({k: v.double() for k, v in part.items()}, kwargs, grad_out[b:b + 1].double(), "torch")
        check_rule(f"{case.id} batch row {b}", torch.bfloat16, got, ref, ref64)
    del out, grads


# ------------------------------------------------------------------------------------ embedding kernels


EMB = dict(B=4, S=300, m=10, d=512, r=32, V=1000)


def _embedding_inputs(method, dtype, dropout=False, seed=0, **shape):
    p = {**EMB, **shape}
    if ON_CPU:
        p.update(B=2, S=7, m=3, d=32, r=4, V=50)
    g = torch.Generator().manual_seed(seed)

    def rn(*s, std=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * std).to(dtype).to(DEVICE)

    ids = torch.randint(0, p["V"], (p["B"], p["S"]), generator=g).to(DEVICE)
    ids[0, : p["S"] // 2] = 3  # one id repeated: many programs read the same table row
    table = rn(p["V"], p["d"])
    if method == "adept":
        leaves = dict(prompt=rn(p["m"], p["d"]), down_weight=rn(p["d"], p["r"], std=p["d"] ** -0.5),
                      down_bias=rn(p["r"], std=0.5), up_weight=rn(p["r"], p["d"], std=p["r"] ** -0.5),
                      up_bias=rn(p["d"]))
        extra = {}
        if dropout:
            mask = (torch.rand(p["B"], p["S"], p["r"], generator=g) > 0.1).double() / 0.9
            extra["dropout_mask"] = mask.to(dtype).to(DEVICE)
    else:
        leaves = dict(prompt=rn(p["m"], p["d"]), lora_a=rn(p["S"] + 5, p["r"]), lora_b=rn(p["r"], p["d"], std=0.1))
        extra = dict(scaling=8 / p["r"] ** 0.5)
    return ids, table, leaves, extra, p


def embed(method, ids, table, leaves, extra, grad_out, backend):
    leaves = {k: v.detach().requires_grad_() for k, v in leaves.items()}  # no copy: ops never write their inputs
    table = table.detach()
    dtype = table.dtype
    if method == "adept":
        kw = dict(extra)
        if "dropout_mask" in kw:
            kw["dropout_mask"] = kw["dropout_mask"].to(dtype)
        out = fastprefix.adept_embedding(ids, table, leaves["prompt"], leaves["down_weight"], leaves["down_bias"],
                                         leaves["up_weight"], leaves["up_bias"], backend=backend, **kw)
    else:
        out = fastprefix.dept_embedding(ids, table, leaves["prompt"], leaves["lora_a"], leaves["lora_b"],
                                        backend=backend, **extra)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return out.detach(), dict(zip(leaves, grads))


def _double(table, leaves, extra):
    ex = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}
    return table.double(), {k: v.double() for k, v in leaves.items()}, ex


EMB_CASES = [("adept", False), ("adept", True), ("dept", False)]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("method, dropout", EMB_CASES, ids=["adept", "adept-dropout", "dept"])
def test_embedding_matches_float64_reference(method, dropout, dtype):
    ids, table, leaves, extra, p = _embedding_inputs(method, dtype, dropout)
    grad_out = torch.randn(p["B"], p["m"] + p["S"], p["d"], generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(dtype).to(DEVICE)
    got = embed(method, ids, table, leaves, extra, grad_out, "triton")
    ref = embed(method, ids, table, leaves, extra, grad_out, "torch")
    t64, l64, e64 = _double(table, leaves, extra)
    ref64 = embed(method, ids, t64, l64, e64, grad_out.double(), "torch")
    check_rule(f"{method}{'-dropout' * dropout}", dtype, got, ref, ref64)


@pytest.mark.parametrize("method", ["adept", "dept"])
def test_embedding_backward_is_bitwise_deterministic(method):
    ids, table, leaves, extra, p = _embedding_inputs(method, torch.bfloat16, dropout=method == "adept")
    grad_out = torch.randn(p["B"], p["m"] + p["S"], p["d"], device=DEVICE, dtype=torch.bfloat16)
    first = embed(method, ids, table, leaves, extra, grad_out, "triton")
    for _ in range(3):
        again = embed(method, ids, table, leaves, extra, grad_out, "triton")
        assert torch.equal(again[0], first[0]), "output differs between runs"
        for n in first[1]:
            assert torch.equal(again[1][n], first[1][n]), f"d{n} differs between runs"


@pytest.mark.parametrize("method", ["adept", "dept"])
def test_embedding_offsets_past_2_to_the_31_elements(method):
    """The output [B, m+S, d] = 64 x 8224 x 4096 = 2.16e9 > 2^31 elements (forward; the batch's last rows are
    checked against the reference on the same rows)."""
    need_free_gib(24)
    shape = dict(B=64, S=8192, m=32, d=4096, r=64, V=32000)
    ids, table, leaves, extra, p = _embedding_inputs(method, torch.bfloat16, **shape)
    assert p["B"] * (p["m"] + p["S"]) * p["d"] > 2**31
    with torch.no_grad():
        if method == "adept":
            call = lambda i, t, lv, backend: fastprefix.adept_embedding(  # noqa: E731
                i, t, lv["prompt"], lv["down_weight"], lv["down_bias"], lv["up_weight"], lv["up_bias"], backend=backend)
        else:
            call = lambda i, t, lv, backend: fastprefix.dept_embedding(  # noqa: E731
                i, t, lv["prompt"], lv["lora_a"], lv["lora_b"], backend=backend, **extra)
        out = call(ids, table, leaves, "triton")
        for b in (0, p["B"] - 1):
            got = out[b:b + 1]
            ref = call(ids[b:b + 1], table, leaves, "torch")
            t64, l64, _ = _double(table, leaves, {})
            ref64 = call(ids[b:b + 1], t64, l64, "torch")
            floor = FLOOR[torch.bfloat16] * max(1.0, ref64.abs().max().item())
            assert_flash_rule(got, ref, ref64, floor=floor, name=f"{method} batch row {b}")
        del out
