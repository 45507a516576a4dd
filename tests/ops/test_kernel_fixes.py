"""What the GPU review of the fused kernels changed (issue 10), checked under Triton's interpreter.

Attention: the output layout option, the folded grid (B * H on grid axis 0, whatever its size),
the per-target / per-dtype launch tables, the APT gate computed once per call, the dk/dv query
ranges (causal diagonal, unmasked interior, ragged tail). Prompt embedding: the chunked two-level
table gradient (one id repeated many times), padding_idx, the DePT backward's (position, d, batch)
grid. Every comparison is in float64 against an explicit torch reference.
"""

import pytest
import torch

from fastprefix.kernels.attention import configs, fused
from fastprefix.kernels.common import launch
from fastprefix.kernels.embedding import fused as embedding
from fastprefix.reference.attention import apt_gate
from fastprefix.spec import AttentionSpec
from helpers.numerics import fused_attention, reference_attention

F64 = torch.float64


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(shape, generator=g, dtype=F64).requires_grad_()


def _attention_inputs(B, H, Hkv, Sq, Sk, L, D, gate=True):
    t = dict(q=_randn(B, H, Sq, D), k=_randn(B, Hkv, Sk, D, seed=1), v=_randn(B, Hkv, Sk, D, seed=2),
             prefix_k=_randn(Hkv, L, D, seed=3), prefix_v=_randn(Hkv, L, D, seed=4))
    if gate:
        t["gate"] = torch.rand(B, Sq, L, generator=torch.Generator().manual_seed(5), dtype=F64).requires_grad_()
    return t


def _grads(out, tensors, grad_out):
    return torch.autograd.grad(out, list(tensors.values()), grad_out)


def _assert_grads_close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ attention


def test_output_layout_bshd():
    """out_layout="bshd" writes [B, Sq, H, D] memory: out.transpose(1, 2) is contiguous, values and
    gradients are the reference's (the default "bhsd" is what every other test runs)."""
    layout = "bshd"
    t = _attention_inputs(B=2, H=4, Hkv=2, Sq=5, Sk=6, L=3, D=16)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = fused_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], gate=t["gate"],
                          key_padding_mask=mask, causal=True, out_layout=layout)
    want = reference_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], gate=t["gate"],
                               key_padding_mask=mask, causal=True)
    assert out.shape == want.shape == (2, 4, 5, 16)
    assert out.transpose(1, 2).is_contiguous() and not out.is_contiguous()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(want.shape, dtype=F64)
    _assert_grads_close(_grads(out, t, grad_out), _grads(want, t, grad_out))


def test_output_layout_rejects_unknown_names():
    t = _attention_inputs(B=1, H=1, Hkv=1, Sq=2, Sk=2, L=1, D=16, gate=False)
    with pytest.raises(ValueError, match="out_layout must be one of .*'bshd'.*got 'sbhd'"):
        fused_attention(*t.values(), out_layout="sbhd")


def test_dkdv_diagonal_interior_and_tail_ranges(monkeypatch):
    """16-row tiles and Sq = 40, Sk = 45: key tile 0 sees a masked causal diagonal tile, an unmasked
    interior tile and a ragged tail, with padding (zeroed rows) and decoding offset Sk - Sq = 5."""
    monkeypatch.setattr(configs, "_INTERPRETER_CONFIG", launch.LaunchConfig(16, 16, 16, 4, 1))
    t = _attention_inputs(B=1, H=2, Hkv=1, Sq=40, Sk=45, L=3, D=16)
    mask = torch.ones(1, 45, dtype=torch.bool)
    mask[0, 5:9] = False
    kwargs = dict(gate=t["gate"], key_padding_mask=mask, causal=True)
    out = fused_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], **kwargs)
    want = reference_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], **kwargs)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(want.shape, dtype=F64)
    got = _grads(out, t, grad_out)
    _assert_grads_close(got, _grads(want, t, grad_out))
    names = list(t)
    assert torch.equal(got[names.index("k")][0, 0, 5:9], torch.zeros(4, 16, dtype=F64))  # padded keys


def test_apt_gate_is_computed_once_and_matches_a_precomputed_gate():
    """The APT inputs give the same output (bitwise) and gradients as the gate tensor they define."""
    t = _attention_inputs(B=2, H=2, Hkv=1, Sq=4, Sk=4, L=3, D=16, gate=False)
    hidden, w, b, lam = _randn(2, 4, 8, seed=6), _randn(8, 3, seed=7), _randn(3, seed=8), _randn(seed=9)
    args = (t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"])
    out = fused_attention(*args, gate_hidden=hidden, gate_weight=w, gate_bias=b, layer_scale=lam)
    want = fused_attention(*args, gate=apt_gate(hidden, w, b, lam))
    assert torch.equal(out, want)
    grad_out = torch.randn(out.shape, dtype=F64)
    inputs = [*args, hidden, w, b, lam]
    ref = reference_attention(*args, gate_hidden=hidden, gate_weight=w, gate_bias=b, layer_scale=lam)
    _assert_grads_close(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out))


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel: records kernel[grid](..., **options) instead of running."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **options: self.log.append((self.name, grid, options))


@pytest.mark.parametrize("B,H,Hkv", [(70_000, 1, 1), (1_100, 64, 8)], ids=["B70000-H1", "B1100-H64kv8"])
def test_grid_folds_batch_heads_into_axis_0(monkeypatch, B, H, Hkv):
    """B * H >= 65,536 (CUDA's cap on grid axes 1 and 2): every launch puts it on axis 0 and keeps
    axes 1 and 2 small; every launch sets enable_fp_fusion explicitly."""
    log = []
    for name in ("_fwd_kernel", "_bwd_delta_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_prefix_kernel"):
        monkeypatch.setattr(fused, name, _LaunchRecorder(name, log))
    Sq = Sk = 3
    q = torch.zeros(B, H, Sq, 16)
    k = torch.zeros(B, Hkv, Sk, 16)
    prefix = torch.zeros(Hkv, 2, 16)
    out, lse = fused._forward(q, k, k, prefix, prefix, AttentionSpec(scale=0.25, causal=True), False)
    fused._backward(out, q, k, k, prefix, prefix, out, lse, AttentionSpec(scale=0.25, causal=True))
    grids = {name: grid for name, grid, _ in log}
    assert grids["_fwd_kernel"] == grids["_bwd_delta_kernel"] == grids["_bwd_dq_kernel"] == (B * H,)  # 64 rows
    assert grids["_bwd_dkdv_kernel"] == (B * Hkv,)  # one 32-row key tile
    assert grids["_bwd_prefix_kernel"] == (B * Hkv, 1)  # one prefix tile, one query split
    assert all(max(grid[1:], default=0) <= 65_535 for grid in grids.values())
    assert all(options["enable_fp_fusion"] is launch.FP_FUSION for _, _, options in log)


def test_folded_grid_limit():
    assert launch.folded_grid(3, 70_000, 2) == (210_000, 2)
    with pytest.raises(ValueError, match="2147483648 programs exceed"):
        launch.folded_grid(2 ** 16, 2 ** 15)


def test_launch_tables_per_target_and_dtype():
    """sm_80, sm_86/89 and sm_90 have their own tables; fp32 its own tiles; the prefix tile follows L."""
    assert [configs.target_of(a) for a in (75, 80, 86, 87, 89, 90, 100)] == [86, 80, 86, 80, 86, 90, 90]
    for kind in configs.KINDS:
        for D in (64, 128):
            half = configs.pick_config(kind, D, 80, torch.float16)
            assert configs.pick_config(kind, D, 80, torch.bfloat16) == half
            assert configs.pick_config(kind, D, 80, torch.float32) is configs._CONFIGS_FP32[80][kind][D]
            assert configs.pick_config(kind, D, 89, torch.float16) is configs._CONFIGS_16BIT[86][kind][D]
    assert configs.pick_config("bwd_dkdv", 128, 80).block_n == 64  # Q and dO read once per 64 keys
    assert [launch.prefix_tile(L, 64) for L in (1, 5, 16, 17, 64, 65, 300)] == [16, 16, 16, 32, 64, 64, 64]
    with pytest.raises(ValueError, match="kind must be one of"):
        configs.pick_config("fwd_fused", 64, 80)


# ---------------------------------------------------------------------------------- prompt embedding


def _table_grad_reference(ids, src, vocab, padding_idx=None):
    ref = torch.zeros(vocab, src.shape[-1], dtype=F64).index_add_(0, ids.reshape(-1), src)
    if padding_idx is not None:
        ref[padding_idx] = 0
    return ref


@pytest.mark.parametrize("chunk,padding_idx", [(3, -1), (8, 3), (200, -1)],
                         ids=["chunk3", "chunk8-padding3", "one-chunk"])
def test_table_gradient_chunks(chunk, padding_idx):
    """One id repeated 100 times (a run crossing many chunks, starting and ending mid-chunk), short
    runs and singletons: the two-level sum matches index_add_; padding rows get exact zeros."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (1, 130), generator=g)
    ids[0, 7:107] = 3
    src = torch.randn(130, 40, generator=g, dtype=F64)
    out = embedding._segment_sum_rows(ids, src, 130, 0, 0, 40, 11, F64, padding_idx, chunk=chunk)
    want = _table_grad_reference(ids, src, 11, padding_idx if padding_idx >= 0 else None)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    if padding_idx >= 0:
        assert torch.equal(out[padding_idx], torch.zeros(40, dtype=F64))


@pytest.mark.parametrize("method", ["adept", "dept"])
def test_padding_idx_table_gradient(method):
    """padding_idx as in torch.nn.Embedding: its tokens add nothing to the table gradient; the other
    gradients are unchanged. A negative padding_idx counts from the end."""
    V, d, r, B, S, m = 9, 24, 4, 2, 20, 2
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    ids[:, 14:] = V - 1  # right padding
    table, prompt = _randn(V, d, seed=10), _randn(m, d, seed=11)
    if method == "adept":
        params = [_randn(d, r, seed=12), _randn(r, seed=13), _randn(r, d, seed=14), _randn(d, seed=15)]
        out = embedding.adept_embedding(ids, table, prompt, *params, padding_idx=-1)
        a, a_bias, b, b_bias = params
        x = torch.nn.functional.embedding(ids, table, padding_idx=V - 1)
        want = torch.cat([prompt.expand(B, m, d), x + torch.relu(x @ a + a_bias) @ b + b_bias], 1)
    else:
        params = [_randn(50, r, seed=16), _randn(r, d, seed=17)]
        out = embedding.dept_embedding(ids, table, prompt, *params, scaling=0.5, padding_idx=V - 1)
        x = torch.nn.functional.embedding(ids, table, padding_idx=V - 1)
        want = torch.cat([prompt.expand(B, m, d), x + 0.5 * (params[0][:S] @ params[1])], 1)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(want.shape, dtype=F64)
    inputs = [table, prompt, *params]
    got = torch.autograd.grad(out, inputs, grad_out)
    _assert_grads_close(got, torch.autograd.grad(want, inputs, grad_out))
    assert torch.equal(got[0][V - 1], torch.zeros(d, dtype=F64))
    with pytest.raises(ValueError, match=r"padding_idx must be None or an int in \[-9, 9\), got 9"):
        embedding.dept_embedding(ids, table, prompt, _randn(50, r), _randn(r, d), padding_idx=V)


def test_dept_backward_grid_over_positions_chunks_and_batch(monkeypatch):
    """With 16-column chunks, S = 37 spans two 32-row position tiles, d = 40 three column chunks (a
    ragged one) and the batch two splits of 3 and 2 rows: the partials add up to the reference."""
    config = embedding.pick_config

    def narrow(kernel, *args):
        cfg = config(kernel, *args)
        return cfg._replace(block_n=16) if kernel == "dept_bwd" else cfg

    monkeypatch.setattr(embedding, "pick_config", narrow)
    V, d, r, B, S, m = 7, 40, 4, 5, 37, 1
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    table, prompt, lora_a, lora_b = _randn(V, d, seed=20), _randn(m, d, seed=21), _randn(45, r, seed=22), \
        _randn(r, d, seed=23)
    rows = embedding._dept_rows_per_split(B, 2 * 3, torch.device("cpu"), None)  # what the launcher asks
    assert (rows, -(-B // rows)) == (3, 2)
    out = embedding.dept_embedding(ids, table, prompt, lora_a, lora_b, scaling=0.25)
    want = torch.cat([prompt.expand(B, m, d), table[ids] + 0.25 * (lora_a[:S] @ lora_b)], 1)
    grad_out = torch.randn(want.shape, dtype=F64)
    inputs = [table, prompt, lora_a, lora_b]
    got = torch.autograd.grad(out, inputs, grad_out)
    _assert_grads_close(got, torch.autograd.grad(want, inputs, grad_out))
    assert torch.equal(got[2][S:], torch.zeros(45 - S, r, dtype=F64))  # positions past S
