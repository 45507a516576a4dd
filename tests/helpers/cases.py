"""Attention inputs for the op tests: one :class:`Case` (a call's shapes and features), one :func:`make_inputs`
(its leaves and keyword arguments), and the attention sweep that tests/ops/test_attention_kernel.py and
tests/ops/test_split_attention.py share.

Four families of tests build their cases here, each keeping the test ids and the random draws it had when it
had a builder of its own (``Case.family``):

- ``"kernel"``: the fused kernel and the split path (tests/ops/test_attention_kernel.py,
  tests/ops/test_split_attention.py);
- ``"features"``: ``attn_bias`` / ``window`` / ``softcap`` on the fused kernel (tests/ops/test_attention_features.py);
- ``"split"``: the same features on the split path (tests/ops/test_split_features.py);
- ``"gpu"``: the compiled kernels (tests/gpu/test_gpu_kernels.py), drawn on the device;
- ``"varlen"`` / ``"concat"``: the split path's varlen branch and the concat path (tests/ops/test_varlen_attention.py,
  tests/ops/test_concat_attention.py), whose padding is a named pattern (``PATTERNS``) rather than a random mask.

A test file whose cases lean on other defaults binds its own ``Case`` with :func:`maker`.
"""

import dataclasses
import functools
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call: ``q [B, H, Sq, D]``, ``k``/``v`` ``[B, Hkv, Sk, D]``, a prefix of ``L`` rows."""

    B: int = 1
    H: int = 2
    Hkv: int = 2
    Sq: int = 7
    Sk: int = 7
    L: int = 5
    D: int = 16
    # none | dense [B,Sq,L] | pooled [B,1,L] | fused (APT's hidden [B,Sq,d], weight, bias, layer_scale) |
    # fused_pooled (hidden [B,1,d])
    gate: str = "none"
    gate_value: str = "random"  # random | zero | large (20 + 10 x random)
    pad: object = False  # True: a random key padding mask (see padding_mask); a name: a pattern of PATTERNS
    causal: bool = False
    shared: bool = True  # prefix [Hkv,L,D] shared by the batch, else [B,Hkv,L,D]
    # the bias's dims, each B, H, q (Sq), k (Sk) or 1 ("1Hqk": T5's position bias, "B11k"), or one of
    # full (BHqk) | heads (1Hqk) | keys (B11k); None: no bias
    bias: Optional[str] = None
    bias_grad: bool = True  # False: the bias is a keyword argument, not a leaf
    window: Optional[tuple] = None  # (left, right)
    softcap: Optional[float] = None
    family: str = "kernel"  # kernel | features | split | gpu | varlen | concat: the ids' layout and the draws

    @property
    def id(self) -> str:
        """The shapes, then the features that are set (each family's layout, so that test ids stay put)."""
        if self.family in ("varlen", "concat"):  # the padding pattern and "causal" / "full" always named
            parts = [f"B{self.B}", f"H{self.H}kv{self.Hkv}", f"Sq{self.Sq}", f"Sk{self.Sk}"]
            parts += [f"L{self.L}"] * (self.family == "varlen")
            gate = "apt" if self.gate == "fused" else self.gate
            parts += [self.pad or "none", "causal" if self.causal else "full", f"gate-{gate}"]
            return "-".join(parts + ["per-example"] * (not self.shared))
        parts = [f"B{self.B}", f"H{self.H}kv{self.Hkv}", f"Sq{self.Sq}", f"Sk{self.Sk}", f"L{self.L}", f"D{self.D}"]
        gate = f"gate-{self.gate}" + ("" if self.gate_value == "random" else f"-{self.gate_value}")
        if self.family == "features":  # the bias (or "none") first, "window", "-frozen"
            parts += [f"bias-{self.bias or 'none'}" + ("-frozen" if self.bias and not self.bias_grad else ""), gate]
            if self.window is not None:
                parts.append("window{}_{}".format(*self.window))
        else:
            parts.append(gate)
            if self.family == "kernel":  # the prefix's sharing always named, next to the gate
                parts.append("shared" if self.shared else "per-example")
            if self.bias:
                parts.append(f"bias-{self.bias}-" + ("grad" if self.bias_grad else "nograd"))
            if self.window is not None:
                parts.append("win{}_{}".format(*self.window))
        if self.softcap is not None:
            parts.append(f"cap{self.softcap:g}")
        parts += ["pad"] * self.pad + ["causal"] * self.causal
        if self.family != "kernel" and not self.shared:
            parts.append("per-example")
        return "-".join(parts)


def maker(family, **defaults):
    """``Case`` of ``family`` with other field defaults, e.g. ``maker("split", B=2, Hkv=1, Sq=6, Sk=9, L=3)``."""
    return functools.partial(Case, family=family, **defaults)


@dataclasses.dataclass(frozen=True)
class Draws:
    """How a family draws its inputs (the order is always q, k, v, prefix_k, prefix_v, then the gate and the
    bias in ``bias_first`` order, then the padding mask)."""

    dtype: torch.dtype = torch.float64  # drawn in this dtype, then cast to the case's
    std: float = 1.0  # of q, k and prefix_k (v and prefix_v: 1)
    gate_max: float = 1.0  # dense / pooled gates uniform in [0, gate_max)
    hidden: int = 24  # APT's hidden width d
    weight_std: float = 0.5  # of APT's gate weight [d, L]
    layer_scale: float = 0.8  # APT's lambda
    bias_first: bool = False  # the bias drawn before the gate


DRAWS = {
    "kernel": Draws(),
    # logits that reach a softcap's bend (|x| ~ softcap) and a bias that matters
    "features": Draws(std=2.0, gate_max=2.0, hidden=12, bias_first=True),
    "split": Draws(),
    # float32 on the device: the large cases hold billions of elements
    "gpu": Draws(dtype=torch.float32, hidden=48, weight_std=48 ** -0.5),
    "varlen": Draws(hidden=8, layer_scale=0.7),
    "concat": Draws(hidden=8, layer_scale=0.7),
}


def _rows(mask, *settings):
    """``mask`` with each ``(row, columns)`` of ``settings`` set to padding; a negative row counts from the end."""
    for row, cols in settings:
        mask[row, cols] = False
    return mask


# named key padding patterns [B, Sk] (True = real key), per family: varlen's exercise every plan of the split path's
# varlen branch (contiguous keys left or right, holes, an all-padding row, rows of each kind in one batch); concat's
# "left1" leaves query 0 of a causal row with no real key
PATTERNS = {
    "varlen": {
        "right": lambda m, Sk: _rows(m, (0, slice(Sk - 2, None)), (1, slice(2, None))),
        "left": lambda m, Sk: _rows(m, (0, slice(None, 2)), (-1, slice(None, Sk - 1))),
        "holes": lambda m, Sk: _rows(m, (0, 1), (1, slice(None, None, 2))),
        "allpad": lambda m, Sk: _rows(m, (1, slice(None)), (0, Sk - 1)),
        "mixed": lambda m, Sk: _rows(m, (0, slice(None, 3)), (1, slice(Sk - 3, None))),
    },
    "concat": {
        "right": lambda m, Sk: _rows(m, (0, slice(Sk - 2, None)), (1, slice(1, None))),
        "left1": lambda m, Sk: _rows(m, (0, 0)),
        "mixed": lambda m, Sk: _rows(m, (0, slice(None, 3)), (1, slice(Sk - 3, None))),
        "allpad": lambda m, Sk: _rows(m, (1, slice(None))),
    },
}


def pattern_mask(case):
    """The key padding mask ``[B, Sk]`` of ``case.pad``'s pattern, None for ``"none"``."""
    if case.pad in (None, "none"):
        return None
    return PATTERNS[case.family][case.pad](torch.ones(case.B, case.Sk, dtype=torch.bool), case.Sk)


BIAS_DIMS = {"full": "BHqk", "heads": "1Hqk", "keys": "B11k"}


def padding_mask(B, Sk, g):
    """``[B, Sk]`` bool key mask (True: a real key) on ``g``'s device, about 30% padding drawn from ``g``.

    Row 0's last key is always padding, and with ``B > 1`` the last row is all padding: only the prefix
    is visible to it (the fully-masked-row case naive kernels turn into NaN); row 0 keeps real keys.
    """
    mask = torch.rand(B, Sk, generator=g, device=g.device) > 0.3
    mask[0, -1] = False
    if B > 1:
        mask[-1] = False
    return mask


def make_inputs(case: Case, dtype=torch.float64, seed=0, *, bias_dtype=None, device="cpu"):
    """``(tensors, kwargs)``: the leaves of ``case``'s call in ``dtype`` (all requiring grad), and its other keyword
    arguments (``causal``; ``window``, ``softcap``, ``key_padding_mask`` and a frozen bias when set).

    ``tensors`` holds q, k, v, prefix_k, prefix_v, then ``gate`` (dense / pooled) or APT's ``gate_hidden``,
    ``gate_weight``, ``gate_bias``, ``layer_scale`` (fused), and ``attn_bias`` when it requires grad. The bias is
    in ``bias_dtype`` (default ``dtype``). Drawn from one generator seeded with ``seed`` on ``device``, in the
    order and precision of ``DRAWS[case.family]``.
    """
    draws = DRAWS[case.family]
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std=1.0):
        x = torch.randn(*shape, generator=g, dtype=draws.dtype, device=device) * std
        return x.to(dtype).requires_grad_()

    B, H, Hkv, Sq, Sk, L, D = case.B, case.H, case.Hkv, case.Sq, case.Sk, case.L, case.D
    prefix_shape = (Hkv, L, D) if case.shared else (B, Hkv, L, D)
    tensors = dict(q=randn(B, H, Sq, D, std=draws.std), k=randn(B, Hkv, Sk, D, std=draws.std), v=randn(B, Hkv, Sk, D),
                   prefix_k=randn(*prefix_shape, std=draws.std), prefix_v=randn(*prefix_shape))
    kwargs = dict(causal=case.causal)

    def draw_bias():
        dims = BIAS_DIMS.get(case.bias, case.bias)
        sizes = {"B": B, "H": H, "q": Sq, "k": Sk, "1": 1}
        bias = torch.randn(*(sizes[c] for c in dims), generator=g, dtype=draws.dtype, device=device) * 2.0
        bias = bias.to(bias_dtype or dtype)
        if case.bias_grad:
            tensors["attn_bias"] = bias.requires_grad_()
        else:
            kwargs["attn_bias"] = bias

    if case.bias and draws.bias_first:
        draw_bias()
    if case.gate in ("dense", "pooled"):
        shape = (B, Sq, L) if case.gate == "dense" else (B, 1, L)
        gate = torch.rand(*shape, generator=g, dtype=draws.dtype, device=device) * draws.gate_max
        gate = {"random": gate, "zero": gate * 0, "large": 20 + 10 * gate}[case.gate_value]
        tensors["gate"] = gate.to(dtype).requires_grad_()
    elif case.gate in ("fused", "fused_pooled"):
        d = draws.hidden
        tensors.update(gate_hidden=randn(B, Sq if case.gate == "fused" else 1, d),
                       gate_weight=randn(d, L, std=draws.weight_std), gate_bias=randn(L),
                       layer_scale=torch.tensor(draws.layer_scale, dtype=dtype, device=device).requires_grad_())
    if case.bias and not draws.bias_first:
        draw_bias()
    if isinstance(case.pad, str):
        mask = pattern_mask(case)
        if mask is not None:
            kwargs["key_padding_mask"] = mask.to(device)
    elif case.pad:
        kwargs["key_padding_mask"] = padding_mask(B, Sk, g)
    if case.window is not None:
        kwargs["window"] = case.window
    if case.softcap is not None:
        kwargs["softcap"] = case.softcap
    return tensors, kwargs


# ----------------------------------------------- the attention sweep (test_attention_kernel, test_split_attention)


# A covering set rather than the cross product: every feature appears several times, big S and D
# only where needed (the interpreter is slow).
CASES = [
    Case(B=2, H=4, Hkv=2, Sq=65, Sk=65, L=5, D=64, pad=True, causal=True),
    Case(B=1, H=2, Hkv=2, Sq=7, Sk=7, L=1, D=16, gate="dense", shared=False),
    Case(B=2, H=4, Hkv=1, Sq=130, Sk=130, L=64, D=40, gate="pooled", pad=True),
    Case(B=1, H=2, Hkv=1, Sq=1, Sk=65, L=5, D=128, gate="fused", pad=True, causal=True, shared=False),
    Case(B=2, H=2, Hkv=2, Sq=65, Sk=65, L=64, D=128, gate="dense", causal=True),
    Case(B=2, H=3, Hkv=1, Sq=7, Sk=130, L=5, D=32, gate="fused_pooled", causal=True, pad=True),
    Case(B=2, H=4, Hkv=2, Sq=65, Sk=65, L=5, D=40, gate="fused", pad=True, shared=False),
    Case(B=1, H=2, Hkv=1, Sq=7, Sk=7, L=5, D=16, gate="dense", gate_value="zero", causal=True),
    Case(B=1, H=2, Hkv=2, Sq=65, Sk=65, L=5, D=64, gate="dense", gate_value="large", pad=True),
    Case(B=1, H=1, Hkv=1, Sq=1, Sk=1, L=1, D=16),
]

GRADCHECK_CASES = [  # (case, fast_mode): fast mode checks random projections of the full Jacobian
    (Case(B=1, H=1, Hkv=1, Sq=2, Sk=2, L=1, D=2, gate="dense", causal=True), False),
    (Case(B=2, H=2, Hkv=1, Sq=3, Sk=5, L=2, D=4, gate="none", pad=True, causal=True), True),
    (Case(B=2, H=2, Hkv=2, Sq=3, Sk=3, L=3, D=4, gate="dense", causal=True, shared=False), True),
    (Case(B=2, H=2, Hkv=1, Sq=3, Sk=4, L=2, D=4, gate="pooled", pad=True), True),
    (Case(B=1, H=2, Hkv=1, Sq=3, Sk=4, L=2, D=4, gate="fused", causal=True), True),
    (Case(B=2, H=2, Hkv=1, Sq=2, Sk=3, L=2, D=4, gate="fused_pooled", pad=True), True),
]


def ids(cases):
    """pytest ids of a case list, or of ``(case, fast_mode)`` gradcheck pairs (``-fast`` / ``-full``)."""
    return [c[0].id + ("-fast" if c[1] else "-full") if isinstance(c, tuple) else c.id for c in cases]
