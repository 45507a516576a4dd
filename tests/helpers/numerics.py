"""Numerical comparison helpers shared by the tests (the error rule and its floors, gradcheck, running a call
forward and backward), the attention paths called with the keyword arguments of ``fastprefix.gated_prefix_attention``
(the paths themselves take an :class:`fastprefix.spec.AttentionSpec`), an op-call recorder and the fake-CUDA
helpers of the op-call tests. The attention inputs are built by tests/helpers/cases.py."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastprefix
from fastprefix.kernels.attention import dispatch, fused, split
from fastprefix.reference import attention as reference
from fastprefix.spec import AttentionSpec, default_path


def assert_flash_rule(out, out_ref_same_dtype, out_ref_f64, *, floor, name="output"):
    """FlashAttention's rule: error vs float64 <= 2 x the PyTorch same-dtype error + floor."""
    err = (out.double() - out_ref_f64).abs().max().item()
    ref_err = (out_ref_same_dtype.double() - out_ref_f64).abs().max().item()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    assert err <= 2 * ref_err + floor, f"{name}: max error {err:.3e} > 2 x {ref_err:.3e} + {floor:.1e}"
    return err, ref_err


# floor of the rule, relative to the largest magnitude of the float64 reference tensor
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}

ATTENTION_INPUTS = ("q", "k", "v", "prefix_k", "prefix_v")  # the positional arguments of the attention ops


def run(fn, tensors, kwargs, grad_out):
    """``(out, grads)``: ``fn(q, k, v, prefix_k, prefix_v, **other tensors, **kwargs)`` and the gradient of every
    tensor of ``tensors`` (a dict of leaves holding the :data:`ATTENTION_INPUTS`) under ``grad_out``."""
    others = {k: v for k, v in tensors.items() if k not in ATTENTION_INPUTS}
    out = fn(*(tensors[n] for n in ATTENTION_INPUTS), **others, **kwargs)
    grads = torch.autograd.grad(out, list(tensors.values()), grad_out)
    return out, dict(zip(tensors, grads))


def upcast(tensors):
    """float64 leaves holding the values of ``tensors`` (for the float64 reference)."""
    return {k: v.detach().double().requires_grad_() for k, v in tensors.items()}


def assert_runs_match(fn, reference, tensors, kwargs, grad_out, *, tol):
    """``fn`` and ``reference`` give the same output and the same gradient of every leaf of ``tensors`` under
    ``grad_out``, to ``tol`` (relative and absolute)."""
    out, grads = run(fn, tensors, kwargs, grad_out)
    out_ref, grads_ref = run(reference, tensors, kwargs, grad_out)
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"d{name}: {m}")


def torch_backend(q, k, v, prefix_k, prefix_v, **kwargs):
    """``fastprefix.gated_prefix_attention`` on the torch backend (the same-dtype side of the error rule)."""
    return fastprefix.gated_prefix_attention(q, k, v, prefix_k, prefix_v, backend="torch", **kwargs)


def assert_flash_rule_parts(got, ref_same_dtype, ref64, *, floor, name=None, extra_floor=None):
    """FlashAttention's rule on a call's output and every gradient. ``got``, ``ref_same_dtype`` and ``ref64`` are
    ``(out, {leaf: grad})`` pairs as :func:`run` returns them (``got``'s leaves name the gradients checked): each
    part (``"out"``, ``"d<leaf>"``) has ``ref64``'s shape and ``ref_same_dtype``'s dtype, and its error against
    ``ref64`` is at most 2 x ``ref_same_dtype``'s + ``floor x max(1, |x64|.max())``, plus
    ``extra_floor[part] x |x64|.max()`` for a part ``extra_floor`` names. The parts are compared on ``ref64``'s
    device. Messages name ``"<name> <part>"``. Returns ``{part: (err, ref_err)}``."""
    (out, grads), (out_ref, grads_ref), (out_64, grads_64) = got, ref_same_dtype, ref64
    parts = [("out", out, out_ref, out_64)] + [(f"d{n}", grads[n], grads_ref[n], grads_64[n]) for n in grads]
    errors = {}
    for part, x, x_ref, x_64 in parts:
        label = part if name is None else f"{name} {part}"
        assert x.shape == x_64.shape and x.dtype == x_ref.dtype, (label, x.shape, x_64.shape, x.dtype, x_ref.dtype)
        largest = x_64.abs().max().item()
        part_floor = floor * max(1.0, largest)
        if extra_floor and part in extra_floor:
            part_floor += extra_floor[part] * largest
        errors[part] = assert_flash_rule(x.to(x_64.device), x_ref.to(x_64.device), x_64, floor=part_floor,
                                         name=label)
    return errors


def assert_flash_rule_run(fn, twin, tensors, kwargs, grad_out, *, floor, name, same_dtype=torch_backend):
    """:func:`assert_flash_rule_parts` on one call of ``fn``: its output and every leaf's gradient against ``twin``
    in float64, beside ``same_dtype`` (the torch backend unless given) in the same dtype."""
    got = run(fn, tensors, kwargs, grad_out)
    ref = run(same_dtype, tensors, kwargs, grad_out)
    ref64 = run(twin, upcast(tensors), kwargs, grad_out.double())
    return assert_flash_rule_parts(got, ref, ref64, floor=floor, name=name)


def gradcheck_attention(attention, tensors, kwargs, fast_mode):
    """float64 ``gradcheck`` of ``attention(q, k, v, prefix_k, prefix_v, **other tensors, **kwargs)``.

    Every tensor of ``tensors`` (a dict of leaves holding the :data:`ATTENTION_INPUTS`) is an input of the check.
    """
    names = list(tensors)

    def fn(*args):
        t = dict(zip(names, args))
        qkv = [t.pop(n) for n in ATTENTION_INPUTS]  # popped before **t is built
        return attention(*qkv, **t, **kwargs)

    return torch.autograd.gradcheck(fn, tuple(tensors.values()), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=fast_mode)


# ------------------------------------------------------------------- the attention paths, keyword arguments in


def call(fn, tensors, kwargs):
    """``fn(q, k, v, prefix_k, prefix_v, **other tensors, **kwargs)`` from a dict of leaves (:data:`ATTENTION_INPUTS`
    first)."""
    return fn(*(tensors[n] for n in ATTENTION_INPUTS),
              **{n: x for n, x in tensors.items() if n not in ATTENTION_INPUTS}, **kwargs)


def max_errors(fn, reference, tensors, kwargs, seed=1):
    """Max abs error of ``fn`` against ``reference`` on one call, forward and every leaf's gradient (a random
    output gradient drawn from ``seed``): ``{"out": e, "d<name>": e, ...}``."""
    out, want = call(fn, tensors, kwargs), call(reference, tensors, kwargs)
    assert out.shape == want.shape and out.dtype == want.dtype
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed), dtype=want.dtype)
    got = torch.autograd.grad(out, list(tensors.values()), g)
    ref = torch.autograd.grad(want, list(tensors.values()), g)
    result = {"out": (out - want).abs().max().item()}
    result.update({f"d{n}": (a - b).abs().max().item() for n, a, b in zip(tensors, got, ref)})
    return result


def spec_of(q, k, **kwargs):
    """The call's spec, from the keyword arguments of ``fastprefix.gated_prefix_attention`` (gate, gate_hidden, ...,
    key_padding_mask, causal, scale, attn_bias, window, softcap)."""
    return AttentionSpec.build(q, k, **kwargs)


def reference_attention(q, k, v, prefix_k, prefix_v, **kwargs):
    """The reference path (``fastprefix.reference.attention.gated_prefix_attention``)."""
    return reference.gated_prefix_attention(q, k, v, prefix_k, prefix_v, spec_of(q, k, **kwargs))


def explicit_attention(q, k, v, prefix_k, prefix_v, **kwargs):
    """The explicit formulation (``fastprefix.reference.attention.explicit_attention``): softmax over the
    ``[prefix ; keys]`` logits built whole, the float64 twin the kernels and paths are checked against (itself
    checked against tests/ops/test_reference.py's naive loops)."""
    spec = spec_of(q, k, **kwargs)
    return reference.explicit_attention(q, k, v, prefix_k, prefix_v, spec, reference.gate_of(spec))


def fused_attention(q, k, v, prefix_k, prefix_v, out_layout="bhsd", **kwargs):
    """The fused Triton kernel (``fastprefix.kernels.attention.fused.gated_prefix_attention``)."""
    return fused.gated_prefix_attention(q, k, v, prefix_k, prefix_v, spec_of(q, k, **kwargs), out_layout)


def split_attention(q, k, v, prefix_k, prefix_v, op=None, **kwargs):
    """The split path (``fastprefix.kernels.attention.split.split_attention``)."""
    return split.split_attention(q, k, v, prefix_k, prefix_v, spec_of(q, k, **kwargs), op=op)


def triton_attention(q, k, v, prefix_k, prefix_v, path=None, **kwargs):
    """The Triton backend's dispatch (``fastprefix.kernels.attention.dispatch``); ``path`` None: as ``fastprefix.ops``
    resolves it (``FASTPREFIX_ATTENTION``, else ``"auto"``)."""
    path = default_path() if path is None else path
    return dispatch.gated_prefix_attention(q, k, v, prefix_k, prefix_v, spec_of(q, k, **kwargs), path)


def choose_path(q, k, path=None, **kwargs):
    """``dispatch.choose_path`` for this call, ``path`` resolved as in :func:`triton_attention`."""
    return dispatch.choose_path(q, k, spec_of(q, k, **kwargs), default_path() if path is None else path)


# ------------------------------------------------------------------------------------------- op recorder


class OpLog(TorchDispatchMode):
    """Every op call with its arguments bound to the schema's names (defaults filled in): ``calls`` holds
    ``(op, {name: value})`` pairs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bound = {a.name: args[i] if i < len(args) else kwargs.get(a.name, a.default_value)
                 for i, a in enumerate(func._schema.arguments)}
        self.calls.append((func, bound))
        return func(*args, **kwargs)


def fake_cuda_plan(plan):
    """A varlen plan (``fastprefix.kernels.attention.varlen.Plan``) built on the host, its tensors as fake CUDA
    tensors of the same shapes and dtypes (call under ``FakeTensorMode``); None stays None."""
    if plan is None:
        return None

    def fake(x):
        return None if x is None else torch.empty(x.shape, dtype=x.dtype, device="cuda")
    return plan._replace(**{n: fake(getattr(plan, n)) for n in ("keys", "cu_q", "cu_k", "cu_k2", "order")})


def fake_rng_matches(rng, like):
    """Fake rng states (seed, offset) with the shapes and dtypes of ``like``'s."""
    return all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(rng, like))
