"""The fused DePT/ADePT prompt-embedding kernels against the reference path (real kernels, interpreter on CPU).

Every comparison uses FlashAttention's rule: the kernel's error vs a float64 reference must be at most twice
the error of the PyTorch reference run in the same dtype, plus a floor of a few ulps of the tensor's scale.
Kernel-written buffers start as NaN (``FASTPREFIX_POISON_OUTPUTS=1``), so an element a kernel forgets fails.
"""

import pytest
import torch

import fastprefix.kernels.embedding.fused as pe
from fastprefix.fold import fold_adept_offsets
from fastprefix.reference import embedding as ref
from helpers.numerics import assert_flash_rule

FLOAT_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def _ids(B, S, V, repeated):
    """Token ids: drawn from 4 values when ``repeated`` (many collisions), else all distinct."""
    if repeated:
        return torch.randint(0, 4, (B, S))
    return torch.randperm(V)[: B * S].reshape(B, S)


def _adept_inputs(B, S, m, d, r, *, repeated, dropout, dtype):
    """Float64 master values, already rounded to ``dtype`` so every path sees the same numbers."""
    V = max(64, B * S)
    ids = _ids(B, S, V, repeated)
    vals = dict(
        weight=torch.randn(V, d),
        prompt=torch.randn(m, d) if m else None,
        down_weight=torch.randn(d, r) / d**0.5,
        down_bias=0.5 * torch.randn(r),
        up_weight=torch.randn(r, d) / r**0.5,
        up_bias=torch.randn(d),
        dropout_mask=(torch.rand(B, S, r) > 0.1).double() / 0.9 if dropout else None,
    )
    vals = {k: None if v is None else v.to(dtype).double() for k, v in vals.items()}
    return ids, vals


def _dept_inputs(B, S, m, d, r, s, *, repeated, dtype):
    V = max(64, B * S)
    ids = _ids(B, S, V, repeated)
    vals = dict(
        weight=torch.randn(V, d),
        prompt=torch.randn(m, d) if m else None,
        lora_a=torch.randn(s, r),
        lora_b=torch.randn(r, d) / r**0.5,
    )
    return ids, {k: None if v is None else v.to(dtype).double() for k, v in vals.items()}


def _run(fn, ids, vals, dtype, grad_names, grad_out, **kwargs):
    """Output and gradients of ``fn`` with the inputs cast to ``dtype``."""
    args = {k: None if v is None else v.to(dtype).requires_grad_(k in grad_names) for k, v in vals.items()}
    out = fn(ids, *(args[k] for k in vals if k != "dropout_mask"), **kwargs,
             **({"dropout_mask": args["dropout_mask"]} if "dropout_mask" in vals else {}))
    grads = torch.autograd.grad(out, [args[k] for k in grad_names], grad_out.to(dtype))
    return out, dict(zip(grad_names, grads))


def _floor(ref64, dtype):
    return 4 * torch.finfo(dtype).eps * max(1.0, ref64.abs().max().item())


def _check_against_reference(kernel_fn, ref_fn, ids, vals, dtype, grad_names, **kwargs):
    grad_out = torch.randn(ids.shape[0], (0 if vals["prompt"] is None else vals["prompt"].shape[0]) + ids.shape[1],
                           vals["weight"].shape[1]).to(dtype).double()
    out, grads = _run(kernel_fn, ids, vals, dtype, grad_names, grad_out, **kwargs)
    out_t, grads_t = _run(ref_fn, ids, vals, dtype, grad_names, grad_out, **kwargs)
    out_64, grads_64 = _run(ref_fn, ids, vals, torch.float64, grad_names, grad_out, **kwargs)
    assert out.dtype == dtype and out.shape == out_64.shape
    errors = {"output": assert_flash_rule(out, out_t, out_64, floor=_floor(out_64, dtype), name="output")}
    for k in grad_names:
        assert grads[k].dtype == dtype and grads[k].shape == grads_64[k].shape, k
        errors[k] = assert_flash_rule(grads[k], grads_t[k], grads_64[k], floor=_floor(grads_64[k], dtype),
                                      name=f"grad {k}")
    return errors


ADEPT_CASES = [  # B, S, m, d, r, repeated ids, dropout mask, table requires grad
    pytest.param(1, 1, 0, 16, 1, False, False, False, id="B1-S1-m0-d16-r1"),
    pytest.param(2, 3, 1, 16, 19, True, True, True, id="B2-S3-m1-d16-r19-repeated-dropout-tablegrad"),
    pytest.param(2, 130, 60, 384, 19, True, True, True, id="B2-S130-m60-d384-r19-repeated-dropout-tablegrad"),
    pytest.param(3, 3, 60, 768, 64, False, False, False, id="B3-S3-m60-d768-r64"),
    pytest.param(1, 130, 1, 768, 1, True, False, True, id="B1-S130-m1-d768-r1-repeated-tablegrad"),
    pytest.param(2, 130, 0, 384, 64, False, True, False, id="B2-S130-m0-d384-r64-dropout"),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("B,S,m,d,r,repeated,dropout,table_grad", ADEPT_CASES)
def test_adept_matches_reference(B, S, m, d, r, repeated, dropout, table_grad, dtype):
    ids, vals = _adept_inputs(B, S, m, d, r, repeated=repeated, dropout=dropout, dtype=dtype)
    grad_names = [k for k in vals if vals[k] is not None and k != "dropout_mask" and (k != "weight" or table_grad)]
    _check_against_reference(pe.adept_embedding, ref.adept_embedding, ids, vals, dtype, grad_names)


DEPT_CASES = [  # B, S, m, d, r, s (rows of lora_a), repeated ids, table requires grad
    pytest.param(1, 1, 0, 16, 1, 1, False, False, id="B1-S1-m0-d16-r1-s1"),
    pytest.param(2, 3, 60, 16, 19, 7, True, True, id="B2-S3-m60-d16-r19-s7-repeated-tablegrad"),
    pytest.param(2, 130, 1, 384, 64, 130, True, True, id="B2-S130-m1-d384-r64-s130-repeated-tablegrad"),
    pytest.param(3, 130, 60, 768, 1, 200, False, False, id="B3-S130-m60-d768-r1-s200"),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("B,S,m,d,r,s,repeated,table_grad", DEPT_CASES)
def test_dept_matches_reference(B, S, m, d, r, s, repeated, table_grad, dtype):
    ids, vals = _dept_inputs(B, S, m, d, r, s, repeated=repeated, dtype=dtype)
    grad_names = [k for k in vals if vals[k] is not None and (k != "weight" or table_grad)]
    _check_against_reference(pe.dept_embedding, ref.dept_embedding, ids, vals, dtype, grad_names,
                             scaling=8 / r**0.5)


def test_bf16_adept_and_dept_match_reference():
    ids, vals = _adept_inputs(2, 33, 5, 384, 19, repeated=True, dropout=True, dtype=torch.bfloat16)
    names = ["weight", "prompt", "down_weight", "down_bias", "up_weight", "up_bias"]
    _check_against_reference(pe.adept_embedding, ref.adept_embedding, ids, vals, torch.bfloat16, names)
    ids, vals = _dept_inputs(2, 33, 5, 384, 19, 40, repeated=True, dtype=torch.bfloat16)
    _check_against_reference(pe.dept_embedding, ref.dept_embedding, ids, vals, torch.bfloat16,
                             ["weight", "prompt", "lora_a", "lora_b"], scaling=8 / 19**0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_tile_sizes_match_reference(dtype, monkeypatch):
    """The interpreter normally runs large tiles; here the sm_80 launch configs (BLOCK_T 32, BLOCK_D 16-64)."""
    gpu_config = pe.pick_config
    monkeypatch.setattr(pe, "pick_config", lambda kernel, dt, arch, d: gpu_config(kernel, dt, 80, d))
    ids, vals = _adept_inputs(2, 37, 5, 96, 19, repeated=True, dropout=True, dtype=dtype)
    names = ["weight", "prompt", "down_weight", "down_bias", "up_weight", "up_bias"]
    _check_against_reference(pe.adept_embedding, ref.adept_embedding, ids, vals, dtype, names)
    ids, vals = _dept_inputs(2, 37, 5, 96, 19, 40, repeated=True, dtype=dtype)
    _check_against_reference(pe.dept_embedding, ref.dept_embedding, ids, vals, dtype,
                             ["weight", "prompt", "lora_a", "lora_b"], scaling=8 / 19**0.5)


def test_adept_gradcheck_float64():
    ids, vals = _adept_inputs(2, 3, 2, 16, 3, repeated=True, dropout=True, dtype=torch.float64)
    mask = vals.pop("dropout_mask")
    tensors = [v.requires_grad_() for v in vals.values()]
    assert torch.autograd.gradcheck(lambda *t: pe.adept_embedding(ids, *t, dropout_mask=mask), tensors,
                                    fast_mode=True)


def test_dept_gradcheck_float64():
    ids, vals = _dept_inputs(2, 3, 2, 16, 3, 5, repeated=True, dtype=torch.float64)
    tensors = [v.requires_grad_() for v in vals.values()]
    assert torch.autograd.gradcheck(lambda *t: pe.dept_embedding(ids, *t, scaling=1.5), tensors, fast_mode=True)


def test_adept_full_gradcheck_float64_tiny():
    """Every Jacobian entry (not fast mode) on a tiny problem: d = 4, a 3-row table, repeated ids, prompt, mask."""
    ids, vals = _adept_inputs(2, 2, 1, 4, 2, repeated=True, dropout=True, dtype=torch.float64)
    mask = vals.pop("dropout_mask")
    ids = ids % 3
    vals["weight"] = vals["weight"][:3].clone()
    assert torch.autograd.gradcheck(lambda *t: pe.adept_embedding(ids, *t, dropout_mask=mask),
                                    [v.requires_grad_() for v in vals.values()])


@pytest.mark.parametrize("needed", [("up_bias",), ("prompt",), ("weight", "down_weight"), ("down_bias", "up_weight")],
                         ids=lambda n: "+".join(n))
def test_adept_computes_only_needed_grads(needed):
    """Only some inputs require grad (the backward's skip paths): the requested gradients still match."""
    ids, vals = _adept_inputs(2, 5, 3, 16, 4, repeated=True, dropout=True, dtype=torch.float64)
    go = torch.randn(2, 8, 16, dtype=torch.float64)
    out, grads = _run(pe.adept_embedding, ids, vals, torch.float64, list(needed), go)
    out_64, grads_64 = _run(ref.adept_embedding, ids, vals, torch.float64, list(needed), go)
    torch.testing.assert_close(out, out_64, rtol=1e-12, atol=1e-12)
    for k in needed:
        torch.testing.assert_close(grads[k], grads_64[k], rtol=1e-12, atol=1e-12)


def test_stride_zero_grad_output():
    """``out.sum().backward()`` hands the backward an expanded (stride-0) gradient."""
    ids, vals = _adept_inputs(2, 5, 3, 16, 4, repeated=True, dropout=False, dtype=torch.float64)
    grads = {}
    for name, fn in [("kernel", pe.adept_embedding), ("reference", ref.adept_embedding)]:
        args = {k: None if v is None else v.clone().requires_grad_() for k, v in vals.items()}
        args.pop("dropout_mask")
        fn(ids, *args.values()).sum().backward()
        grads[name] = [a.grad for a in args.values()]
    for g, g_ref in zip(grads["kernel"], grads["reference"]):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_int32_ids_match_int64():
    ids, vals = _adept_inputs(2, 5, 3, 16, 4, repeated=True, dropout=True, dtype=torch.float64)
    go = torch.randn(2, 8, 16, dtype=torch.float64)
    names = ["weight", "prompt", "down_weight"]
    out, grads = _run(pe.adept_embedding, ids.int(), vals, torch.float64, names, go)
    out_64, grads_64 = _run(pe.adept_embedding, ids, vals, torch.float64, names, go)
    assert torch.equal(out, out_64) and all(torch.equal(grads[k], grads_64[k]) for k in names)


def test_training_forward_saves_only_inputs():
    """No activation is kept for the backward (T is recomputed): every saved tensor is an input."""
    ids, vals = _adept_inputs(2, 5, 3, 16, 4, repeated=True, dropout=True, dtype=torch.float32)
    inputs = [ids, *(v.float().requires_grad_(k != "dropout_mask") for k, v in vals.items())]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pe.adept_embedding(*inputs[:-1], dropout_mask=inputs[-1])
    assert saved and {t.data_ptr() for t in saved} <= {t.data_ptr() for t in inputs}


def test_table_grad_is_deterministic():
    ids, vals = _adept_inputs(2, 40, 2, 48, 5, repeated=True, dropout=True, dtype=torch.float32)
    go = torch.randn(2, 42, 48)
    runs = [_run(pe.adept_embedding, ids, vals, torch.float32, ["weight", "down_weight"], go)[1] for _ in range(2)]
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_empty_prompt_tensor():
    ids, vals = _dept_inputs(2, 4, 0, 16, 2, 4, repeated=False, dtype=torch.float64)
    vals["prompt"] = torch.zeros(0, 16, dtype=torch.float64)
    go = torch.randn(2, 4, 16, dtype=torch.float64)
    out, grads = _run(pe.dept_embedding, ids, vals, torch.float64, ["prompt", "lora_b"], go)
    out_64, grads_64 = _run(ref.dept_embedding, ids, vals, torch.float64, ["lora_b"], go)  # ref drops an empty prompt
    torch.testing.assert_close(out, out_64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["lora_b"], grads_64["lora_b"], rtol=1e-12, atol=1e-12)
    assert grads["prompt"].shape == (0, 16)


@pytest.mark.parametrize("bad_id", [-1, 64], ids=["negative", "equal-to-V"])
def test_out_of_range_ids_raise(bad_id):
    ids, vals = _adept_inputs(1, 4, 1, 16, 2, repeated=False, dropout=False, dtype=torch.float32)
    ids[0, 2] = bad_id
    v = {k: None if x is None else x.float() for k, x in vals.items()}
    with pytest.raises(ValueError, match="embedding table has 64 rows"):
        pe.adept_embedding(ids, v["weight"], v["prompt"], v["down_weight"], v["down_bias"], v["up_weight"],
                           v["up_bias"])
    with pytest.raises(ValueError, match="embedding table has 64 rows"):
        pe.dept_embedding(ids, v["weight"], v["prompt"], torch.zeros(4, 2), torch.zeros(2, 16))


def test_dept_sequence_longer_than_lora_a_raises():
    ids = torch.zeros(1, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="S=5.*s=4"):
        pe.dept_embedding(ids, torch.zeros(8, 16), None, torch.zeros(4, 2), torch.zeros(2, 16))


# --------------------------------------------------------------------------------------------------- fold


def _folding_inputs(V, d, r, dtype):
    return (torch.randn(V, d).to(dtype), (torch.randn(d, r) / d**0.5).to(dtype), torch.randn(r).to(dtype),
            torch.randn(r, d).to(dtype), torch.randn(d).to(dtype))


@pytest.mark.parametrize("backend", ["reference", "kernel"])
def test_folded_table_as_prompt_tuning_equals_adept(backend):
    weight, A, a, B, b = _folding_inputs(300, 384, 19, torch.float32)
    prompt = torch.randn(7, 384)
    ids = torch.randint(0, 300, (2, 130))
    fn = ref.adept_embedding if backend == "reference" else pe.adept_embedding
    adept = fn(ids, weight, prompt, A, a, B, b)
    folded = ref.prompt_tuning_embedding(ids, fold_adept_offsets(weight, A, a, B, b), prompt)
    adept_64 = ref.adept_embedding(ids, *(t.double() for t in (weight, prompt, A, a, B, b)))
    # The fold rounds once from float64: it is at least as close to the exact result as the unfolded path.
    assert_flash_rule(folded, adept, adept_64, floor=_floor(adept_64, torch.float32), name="folded")
    torch.testing.assert_close(folded, adept, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_fold_chunking_gives_identical_results(dtype):
    inputs = _folding_inputs(300, 384, 19, dtype)
    copies = [t.clone() for t in inputs]
    one_chunk = fold_adept_offsets(*inputs, chunk_rows=300)
    for chunk_rows in (2, 7, 128, 4096):  # 300 rows: last chunks of 2, 6, 44 rows, and a single chunk
        assert torch.equal(fold_adept_offsets(*inputs, chunk_rows=chunk_rows), one_chunk), chunk_rows
    assert all(torch.equal(t, c) for t, c in zip(inputs, copies)), "the inputs were modified"
    assert one_chunk.dtype == dtype and not one_chunk.requires_grad


def test_fold_float64_chunking_agrees_to_rounding():
    """A float64 table is computed in its own dtype: chunkings agree up to BLAS summation order."""
    inputs = _folding_inputs(500, 384, 19, torch.float64)
    one_chunk = fold_adept_offsets(*inputs, chunk_rows=500)
    torch.testing.assert_close(fold_adept_offsets(*inputs, chunk_rows=7), one_chunk, rtol=1e-13, atol=1e-13)


def test_fold_rejects_bad_chunk_rows_and_shapes():
    inputs = _folding_inputs(10, 16, 2, torch.float32)
    with pytest.raises(ValueError, match="chunk_rows"):
        fold_adept_offsets(*inputs, chunk_rows=0)
    with pytest.raises(ValueError, match="up_weight"):
        fold_adept_offsets(*inputs[:3], torch.zeros(3, 16), inputs[4])


# ------------------------------------------------------------------------------------ torch.library + fitness


@pytest.mark.parametrize("op", ["adept", "dept"])
def test_custom_ops_pass_opcheck(op):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of the registered ops."""
    if op == "adept":
        ids, vals = _adept_inputs(2, 3, 2, 16, 3, repeated=True, dropout=True, dtype=torch.float32)
        args = [ids, *(v.float().requires_grad_(k != "dropout_mask") for k, v in vals.items())]
        torch.library.opcheck(torch.ops.fastprefix.adept_embedding.default, args)
    else:
        ids, vals = _dept_inputs(2, 3, 2, 16, 3, 5, repeated=True, dtype=torch.float32)
        args = [ids, *(v.float().requires_grad_() for v in vals.values()), 1.5]
        torch.library.opcheck(torch.ops.fastprefix.dept_embedding.default, args)


def test_survives_torch_compile_fullgraph():
    """The registered op is one opaque node: no graph break (fullgraph), same gradients as eager."""
    ids, vals = _adept_inputs(2, 5, 3, 16, 4, repeated=True, dropout=True, dtype=torch.float32)
    mask = vals.pop("dropout_mask").float()
    grads = []
    for fn in (pe.adept_embedding, torch.compile(pe.adept_embedding, backend="aot_eager", fullgraph=True)):
        args = [v.float().requires_grad_() for v in vals.values()]
        (fn(ids, *args, dropout_mask=mask) * 2).sum().backward()
        grads.append([a.grad for a in args])
    for g, g_eager in zip(grads[1], grads[0]):
        assert torch.equal(g, g_eager)
