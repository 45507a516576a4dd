"""The functional API: validate the inputs once, pick a backend, call it.

Backends: ``"torch"`` (the reference path in :mod:`fastprefix.reference`, any device and dtype) and
``"triton"`` (the kernels in ``fastprefix.kernels``). ``backend=None`` picks Triton for CUDA tensors when
Triton is installed, the reference path otherwise. The attention's inputs become one
:class:`fastprefix.spec.AttentionSpec` here, after validation, and every path takes it whole.
"""

from __future__ import annotations

import math

import torch

from typing import NamedTuple

from . import _validate as check
from . import reference
from .kernels.common.runtime import interpreting
from .sequences import check_cu_seqlens, memoized
from .spec import PATHS, AttentionSpec, default_path

try:  # the Triton kernels are optional: without Triton the reference path runs everywhere
    from .kernels.attention import dispatch as _attention_kernels
    from .kernels.embedding import fused as _embedding_kernels
except ModuleNotFoundError as e:  # pragma: no cover - exercised by the Triton-less install test
    if e.name != "triton" and not (e.name or "").startswith("triton."):
        raise
    _attention_kernels = _embedding_kernels = None

_BACKENDS = ("torch", "triton")


def _kernels(module, device):
    """The Triton kernels' ``module``, or a clear error why they can't run here."""
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); on CPU use backend='torch' "
            "or set TRITON_INTERPRET=1 before importing fastprefix to run the kernels in Triton's interpreter"
        )
    if module is None:
        raise NotImplementedError("backend='triton' needs Triton (pip install triton), which is not installed here")
    return module


def check_backend(backend):
    """``backend`` itself if it names a backend (``"torch"``, ``"triton"`` or None), else a ValueError."""
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
    return backend


def _choose(backend, device):
    if check_backend(backend) is None:
        return "triton" if device.type == "cuda" and _attention_kernels is not None else "torch"
    return backend


def attention_backend(backend, device, dtype):
    """``"triton"`` or ``"torch"``: the backend :func:`gated_prefix_attention` runs on for ``backend`` (None: Triton for
    CUDA tensors) and tensors of this device and dtype."""
    # fp64 is for gradcheck under Triton's interpreter: on a GPU the kernels have no fp64 tiles, the reference runs
    if _choose(backend, device) == "triton" and not (device.type == "cuda" and dtype == torch.float64):
        return "triton"
    return "torch"


def _layout_hint(q, k, prefix_k):
    """A sentence for shapes that look like ``[B, S, H, D]`` (transformers' layout before its transpose), else ''."""
    looks_bshd = q.shape[1] == k.shape[1] and (q.shape[2] > k.shape[2] or (
        isinstance(prefix_k, torch.Tensor) and prefix_k.dim() in (3, 4) and prefix_k.shape[-3] == k.shape[2]))
    if not looks_bshd:
        return ""
    return (f". q {list(q.shape)} and k {list(k.shape)} look like [B, S, H, D]: the op takes [B, H, S, D] "
            "(heads before the sequence), so pass q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")


def _check_attention(q, k, v, prefix_k, prefix_v, gate, gate_hidden, gate_weight, gate_bias, layer_scale,
                     key_padding_mask, causal, scale, indexed=False):
    check.named("q", q, [("B", None), ("H", None), ("Sq", None), ("D", None)])
    check.floating("q", q)
    B, H, Sq, D = q.shape
    check.named("k", k, [("B", B), ("Hkv", None), ("Sk", None), ("D", D)], like=q)
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"the number of query heads H={H} must be a multiple of the key/value heads Hkv={Hkv}")
    if Sq == 0 or Sk == 0 or D == 0 or B == 0:
        raise ValueError(f"q and k must be non-empty, got q {list(q.shape)} and k {list(k.shape)}")
    if Sq > Sk:
        raise ValueError(f"q has Sq={Sq} queries but k has only Sk={Sk} keys; need Sq <= Sk"
                         + _layout_hint(q, k, prefix_k))
    check.named("v", v, [("B", B), ("Hkv", Hkv), ("Sk", Sk), ("D", D)], like=q)
    if not isinstance(prefix_k, torch.Tensor) or prefix_k.dim() not in ((4,) if indexed else (3, 4)):
        want = (f"[A, Hkv={Hkv}, L, D={D}] (a table of A adapters' prefixes, rows picked by prefix_index)" if indexed
                else f"[Hkv={Hkv}, L, D={D}] or [B={B}, Hkv={Hkv}, L, D={D}]")
        raise ValueError(
            f"prefix_k must have shape {want}, "
            f"got {list(prefix_k.shape) if isinstance(prefix_k, torch.Tensor) else type(prefix_k).__name__}"
        )
    table = ("A", None) if indexed else ("B", B)  # per-row adapters: a table of A prefixes
    lead = [("Hkv", Hkv)] if prefix_k.dim() == 3 else [table, ("Hkv", Hkv)]
    if prefix_k.shape[-3] != Hkv and prefix_k.shape[-3] == Sk:
        raise ValueError(f"prefix_k has {prefix_k.shape[-3]} heads but k has Hkv={Hkv}" + _layout_hint(q, k, prefix_k))
    check.named("prefix_k", prefix_k, lead + [("L", None), ("D", D)], like=q)
    L = prefix_k.shape[-2]
    if L == 0:
        raise ValueError("prefix_k must hold at least one prefix token (L >= 1)")
    check.named("prefix_v", prefix_v, lead + [("L", L), ("D", D)], like=q)

    fused = [gate_hidden, gate_weight, gate_bias, layer_scale]
    if gate is not None and any(x is not None for x in fused):
        raise ValueError("pass either gate or the APT gate inputs (gate_hidden, gate_weight, gate_bias, layer_scale), not both")
    if gate is not None:
        check.tensor("gate", gate, (None,) * gate.dim(), like=q)
        try:
            torch.broadcast_shapes(gate.shape, (B, Sq, L))
        except RuntimeError:
            raise ValueError(f"gate must broadcast to [B={B}, Sq={Sq}, L={L}], got {list(gate.shape)}") from None
        if gate.dim() > 3:
            raise ValueError(f"gate must broadcast to [B={B}, Sq={Sq}, L={L}], got {list(gate.shape)}")
    elif any(x is not None for x in fused):
        if any(x is None for x in fused):
            raise ValueError("the APT gate needs all of gate_hidden, gate_weight, gate_bias and layer_scale")
        check.named("gate_hidden", gate_hidden, [("B", B), ("Sq", Sq), ("d", None)], like=q)
        dm = gate_hidden.shape[-1]
        check.named("gate_weight", gate_weight, [("d", dm), ("L", L)], like=q)
        check.named("gate_bias", gate_bias, [("L", L)], like=q)
        check.named("layer_scale", layer_scale, [], like=q)
    if key_padding_mask is not None:
        check.named("key_padding_mask", key_padding_mask, [("B", B), ("Sk", Sk)], dtype=torch.bool)
        check.same_device("key_padding_mask", key_padding_mask, q)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python number or None, got {type(scale).__name__}")


def _check_attention_features(q, k, attn_bias, window, softcap):
    """The issue #12 features: ``attn_bias`` broadcastable to ``[B, H, Sq, Sk]``, ``window`` a pair of ints
    ``>= -1``, ``softcap`` a finite positive number."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    if attn_bias is not None:
        full = (B, H, Sq, Sk)
        want = f"a floating tensor broadcastable to [B={B}, H={H}, Sq={Sq}, Sk={Sk}] (each dim full or 1)"
        if not isinstance(attn_bias, torch.Tensor):
            raise ValueError(f"attn_bias must be {want}, got {type(attn_bias).__name__}")
        if not attn_bias.is_floating_point():
            raise ValueError(f"attn_bias must be {want}, got dtype {attn_bias.dtype}")
        check.same_device("attn_bias", attn_bias, q)
        if attn_bias.dtype not in (q.dtype, torch.float32):
            raise ValueError(f"attn_bias must have q's dtype ({q.dtype}) or torch.float32, got {attn_bias.dtype}")
        shape = tuple(attn_bias.shape)
        if len(shape) > 4 or any(n not in (1, m) for n, m in zip(reversed(shape), reversed(full))):
            raise ValueError(f"attn_bias must be {want}, got shape {list(shape)}")
    if window is not None:
        ok = (isinstance(window, (tuple, list)) and len(window) == 2
              and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window))
        if not ok:
            raise ValueError(f"window must be None or a (left, right) pair of ints, each >= 0 or -1 (unbounded), "
                             f"got {window!r}")
    if softcap is not None:
        ok = (isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and math.isfinite(softcap)
              and softcap > 0)
        if not ok:
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")


def _check_prefix_index(q, prefix_k, prefix_index, prefix_lengths, cu_seqlens):
    """Per-row adapters: ``prefix_index`` int ``[B]`` into the ``A`` rows of ``prefix_k [A, Hkv, L, D]``, and
    ``prefix_lengths`` int ``[A]`` (each adapter's first ``n <= L`` slots are its prefix). The values are checked
    with a host sync once per tensor (every layer of a forward gets the same ones)."""
    if prefix_index is None:
        if prefix_lengths is not None:
            raise ValueError("prefix_lengths gives each adapter's length in a table of prefixes: it needs prefix_index")
        return
    B = q.shape[0]
    for name, t, n in (("prefix_index", prefix_index, B), ("prefix_lengths", prefix_lengths, None)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or t.dim() != 1 or (
                n is not None and t.shape[0] != n):
            size = f"B={B}" if n is not None else "A (one per table row)"
            got = f"{t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be an int32 or int64 tensor of shape [{size}], got a {got}")
        check.same_device(name, t, q)
    if cu_seqlens is not None:
        raise ValueError("prefix_index picks each batch row's adapter; a packed call (cu_seqlens) is one row: "
                         "run the packed sequences of one adapter together, or pad the batch")
    A, L = prefix_k.shape[0], prefix_k.shape[-2]
    if prefix_lengths is not None and prefix_lengths.shape[0] != A:
        raise ValueError(f"prefix_lengths must have one length per table row, A={A}, got {prefix_lengths.shape[0]}")
    bad_index = memoized(prefix_index, ("outside", A), lambda: bool(((prefix_index < 0) | (prefix_index >= A)).any()))
    bad_length = prefix_lengths is not None and memoized(
        prefix_lengths, ("outside", L), lambda: bool(((prefix_lengths < 0) | (prefix_lengths > L)).any()))
    if bad_index:
        raise ValueError(f"prefix_index values must be in [0, A={A}), got {prefix_index.tolist()}")
    if bad_length:
        raise ValueError(f"prefix_lengths values must be in [0, L={L}], got {prefix_lengths.tolist()}")


def _check_packed(q, k, cu_seqlens, key_padding_mask, attn_bias):
    """A packed call: ``cu_seqlens`` int32 ``[n + 1]`` over one row (``B == 1``) whose queries are its keys."""
    if cu_seqlens is None:
        return
    B, _, Sq, _ = q.shape
    Sk = k.shape[2]
    if B != 1 or Sq != Sk:
        raise ValueError(f"cu_seqlens describes sequences packed into one row: q must be [1, H, T, D] and k "
                         f"[1, Hkv, T, D] (its queries are its keys), got q {list(q.shape)} and k {list(k.shape)}")
    if key_padding_mask is not None:
        raise ValueError("a packed row (cu_seqlens) has no padding: pass either cu_seqlens or key_padding_mask")
    if attn_bias is not None:
        raise ValueError("attn_bias over a packed row (cu_seqlens) is not supported: pad the batch instead")
    check_cu_seqlens(cu_seqlens, Sq, q.device)


def _check_path(path):
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None (FASTPREFIX_ATTENTION, else 'auto'), got {path!r}")


def gated_prefix_attention(q, k, v, prefix_k, prefix_v, *, gate=None, gate_hidden=None, gate_weight=None,
                           gate_bias=None, layer_scale=None, key_padding_mask=None, causal=False, scale=None,
                           attn_bias=None, window=None, softcap=None, cu_seqlens=None, prefix_index=None,
                           prefix_lengths=None, backend=None, path=None):
    """Attention over ``[gated prefix ; keys]`` (P-Tuning v2 with ``gate=None``, APT otherwise).

    For query t, prefix row j and real key u (``cap(x) = softcap * tanh(x / softcap)``, the identity without
    ``softcap``)::

        logit[t, j] = cap(g[t, j] * scale * q_t . Pk_j)                    always visible
        logit[t, u] = cap(scale * q_t . k_u) + attn_bias[..., t, u]        or -inf where hidden
        out_t       = sum_j p[t, j] g[t, j] Pv_j + sum_u p[t, u] v_u,      p = softmax over the L + Sk logits

    Args:
        q: ``[B, H, Sq, D]``.
        k, v: ``[B, Hkv, Sk, D]``; ``H % Hkv == 0`` (GQA when ``Hkv < H``); ``Sq <= Sk``.
        prefix_k, prefix_v: ``[Hkv, L, D]`` (shared by the batch) or ``[B, Hkv, L, D]``; with ``prefix_index``
            ``[A, Hkv, L, D]``, a table of A adapters' prefixes.
        gate: None, or a tensor broadcastable to ``[B, Sq, L]`` scaling prefix key and value j for query t.
        gate_hidden, gate_weight, gate_bias, layer_scale: instead of ``gate``, the APT token-level gate
            ``layer_scale * sigmoid(gate_hidden @ gate_weight + gate_bias)`` from ``[B, Sq, d]``,
            ``[d, L]``, ``[L]`` and a 0-dim tensor.
        key_padding_mask: ``[B, Sk]`` bool, True = real token. The prefix is always visible.
        causal: query t sees keys ``u <= t + Sk - Sq`` (bottom-right aligned, as in decoding).
        scale: softmax scale, default ``D ** -0.5``.
        attn_bias: None, or a floating tensor (q's dtype or float32, q's device) broadcastable to
            ``[B, H, Sq, Sk]`` (at most 4 dims, each trailing-aligned dim full or 1), added to the real keys'
            logits after the cap (T5's position bias, DeBERTa's c2p/p2c terms); the prefix columns get none.
            If it requires grad it gets its gradient (summed over its broadcast dims, in its dtype).
        window: None, or ``(left, right)`` ints, each ``>= 0`` or ``-1`` (unbounded), FlashAttention's
            ``window_size``: query t (at position ``t' = t + Sk - Sq``) sees real key u iff
            ``t' - left <= u <= t' + right`` (and ``u <= t'`` with ``causal``). The prefix is always visible.
            A transformers ``sliding_window=W`` (visible iff ``t' - u < W``) is ``window=(W - 1, 0)``.
        softcap: None, or a finite number > 0 (Gemma 2's ``attn_logit_softcapping``): every logit, prefix
            (after its gate) and real keys, becomes ``softcap * tanh(logit / softcap)`` before the bias and
            the masks.
        cu_seqlens: None, or int32 ``[n + 1]``: the call is one packed row (``B == 1``, ``Sq == Sk == T``) of n
            sequences back to back, FlashAttention's cumulative lengths (0 first, T last). Each query attends to
            the prefix and to its own sequence's keys only (causally where ``causal``, within ``window``), as if
            its sequence ran alone. No ``key_padding_mask`` or ``attn_bias`` with it.
        prefix_index: None, or int ``[B]``: row b attends over table row ``prefix_index[b]`` of ``prefix_k`` /
            ``prefix_v`` (one batch serving several adapters; the table's gradients sum over the rows that share
            an adapter). Not with ``cu_seqlens``.
        prefix_lengths: None, or int ``[A]`` with ``prefix_index``: adapter a's prefix is its first
            ``prefix_lengths[a]`` slots (0: no prefix, the real keys alone); the slots after it are hidden. A query
            that then sees nothing at all gets 0. The Triton backend's fused kernel and split path read each row's
            table row in place and hide its later slots (no ``[B, Hkv, L, D]`` copy of the rows' prefixes); the
            concat path does not take per-row adapters (the dispatch rule runs the call on the other two).
        backend: ``"torch"``, ``"triton"`` or None (Triton for CUDA tensors).
        path: how the Triton backend runs the call: ``"auto"`` (the dispatch rule in
            ``fastprefix.kernels.attention.dispatch``), ``"fused"`` (the fused kernel), ``"split"`` (PyTorch's
            fused attention for the real keys + a Triton prefix merge, where a vendor op supports the call) or
            ``"concat"`` (PyTorch's fused attention over ``[gated prefix ; keys]``, for calls without a gate or
            with one gate row for every query; others fall back as the dispatch rule says). None: the
            environment variable ``FASTPREFIX_ATTENTION``, else ``"auto"``. The reference backend has one path.

    Returns:
        ``[B, H, Sq, D]``.
    """
    _check_attention(q, k, v, prefix_k, prefix_v, gate, gate_hidden, gate_weight, gate_bias, layer_scale,
                     key_padding_mask, causal, scale, indexed=prefix_index is not None or prefix_lengths is not None)
    _check_attention_features(q, k, attn_bias, window, softcap)
    _check_packed(q, k, cu_seqlens, key_padding_mask, attn_bias)
    _check_prefix_index(q, prefix_k, prefix_index, prefix_lengths, cu_seqlens)
    _check_path(path)
    spec = AttentionSpec.build(q, k, gate=gate, gate_hidden=gate_hidden, gate_weight=gate_weight, gate_bias=gate_bias,
                               layer_scale=layer_scale, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
                               attn_bias=attn_bias, window=window, softcap=softcap, cu_seqlens=cu_seqlens,
                               prefix_index=prefix_index, prefix_lengths=prefix_lengths)
    if attention_backend(backend, q.device, q.dtype) == "triton":
        kernels = _kernels(_attention_kernels, q.device)
        return kernels.gated_prefix_attention(q, k, v, prefix_k, prefix_v, spec,
                                              default_path() if path is None else path)
    return reference.gated_prefix_attention(q, k, v, prefix_k, prefix_v, spec)


class Route(NamedTuple):
    """Which path the Triton backend takes for a call, and on what authority.

    path: ``"fused"``, ``"split"`` or ``"concat"``. source: ``"forced"`` (the call named its path, or the
    environment did; a path that can't serve the call falls back by the dispatch rule), ``"rule"`` (a hard rule:
    ``softcap``, the interpreter, fp32 or a GPU older than sm_80 keep the fused kernel), ``"table"`` (the measured
    dispatch table committed for this GPU's compute capability, ``benchmarks/results/<gpu>-dispatch.json``) or
    ``"model"`` (the cost model's pick for the call's shape class, where no table covers it).
    """

    path: str
    source: str


def attention_route(q, k, prefix_k=None, *, gate=None, gate_hidden=None, key_padding_mask=None, causal=False,
                    attn_bias=None, window=None, softcap=None, cu_seqlens=None, prefix_index=None,
                    path=None) -> Route:
    """The :class:`Route` the Triton backend takes for :func:`gated_prefix_attention` on these inputs, by the
    dispatch rule in ``fastprefix.kernels.attention.dispatch``.

    q ``[B, H, Sq, D]``, k ``[B, Hkv, Sk, D]`` on a CUDA device (or any device under ``TRITON_INTERPRET=1``);
    ``prefix_k`` (``[Hkv, L, D]`` or ``[B, Hkv, L, D]``) and the gate (``gate``, or APT's ``gate_hidden``) as the
    call has them: the concat path is decided by them, so without ``prefix_k`` the answer is for a call whose
    prefix the rule is not shown, and leaves the concat path out. Other arguments as in
    :func:`gated_prefix_attention` (``prefix_index``: a call over a table of adapters' prefixes, which the concat path
    does not serve); ``path`` None: ``FASTPREFIX_ATTENTION``, else ``"auto"``. A call the Triton backend does not take
    at all (float64 on a GPU: :func:`attention_backend` says ``"torch"``) runs the reference
    path whatever this says.
    """
    _check_path(path)
    _check_packed(q, k, cu_seqlens, key_padding_mask, attn_bias)
    spec = AttentionSpec.build(q, k, gate=gate, gate_hidden=gate_hidden, key_padding_mask=key_padding_mask,
                               causal=causal, attn_bias=attn_bias, window=window, softcap=softcap,
                               cu_seqlens=cu_seqlens, prefix_index=prefix_index)
    kernels = _kernels(_attention_kernels, q.device)
    chosen = kernels.route(q, k, spec, default_path() if path is None else path, prefix_k=prefix_k)
    return Route(chosen.path, chosen.source)


def attention_path(q, k, *, key_padding_mask=None, causal=False, attn_bias=None, window=None, softcap=None,
                   path=None, prefix_k=None, gate=None, gate_hidden=None, cu_seqlens=None, prefix_index=None) -> str:
    """The path the Triton backend takes for :func:`gated_prefix_attention` on these inputs: ``"fused"``,
    ``"split"`` or ``"concat"`` (:func:`attention_route`'s path; it also says on what authority).

    ``path`` as in :func:`gated_prefix_attention` (None: ``FASTPREFIX_ATTENTION``, else ``"auto"``). q ``[B, H, Sq, D]``,
    k ``[B, Hkv, Sk, D]`` on a CUDA device (or any device under ``TRITON_INTERPRET=1``). The gate and the prefix
    decide the concat path only: pass ``prefix_k`` and the call's gate to ask about it (see
    :func:`attention_route`).
    """
    return attention_route(q, k, prefix_k, gate=gate, gate_hidden=gate_hidden, key_padding_mask=key_padding_mask,
                           causal=causal, attn_bias=attn_bias, window=window, softcap=softcap, cu_seqlens=cu_seqlens,
                           prefix_index=prefix_index, path=path).path


def apt_gate(hidden, weight, bias, layer_scale, *, mode="token", key_padding_mask=None, causal=False, past=None):
    """APT gate ``layer_scale * sigmoid(hidden @ weight + bias)``.

    Args:
        hidden: ``[B, S, d]``; weight: ``[d, L]``; bias: ``[L]``; layer_scale: 0-dim.
        mode: ``"token"`` -> ``[B, S, L]``; ``"pooled"`` (mean over real tokens) -> ``[B, 1, L]``.
        key_padding_mask: ``[B, S]`` bool, True = real token (used by ``"pooled"``).
        causal: pooled mode only: position t pools the real tokens at positions ``<= t`` (the running mean of
            their gate logits ``h W``, equal to the logit of their mean hidden state) -> ``[B, S, L]``.
        past: causal pooled mode only: ``(total [B, L], count [B])``, the sum of the gate logits ``h W`` (no
            bias) of the real tokens before ``hidden`` and their number (decoding with a cache).
    """
    check.named("hidden", hidden, [("B", None), ("S", None), ("d", None)])
    check.floating("hidden", hidden)
    B, S, d = hidden.shape
    check.named("weight", weight, [("d", d), ("L", None)], like=hidden)
    L = weight.shape[1]
    check.named("bias", bias, [("L", L)], like=hidden)
    check.named("layer_scale", layer_scale, [], like=hidden)
    if mode not in ("token", "pooled"):
        raise ValueError(f"mode must be 'token' or 'pooled', got {mode!r}")
    if key_padding_mask is not None:
        check.named("key_padding_mask", key_padding_mask, [("B", B), ("S", S)], dtype=torch.bool)
        check.same_device("key_padding_mask", key_padding_mask, hidden)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {type(causal).__name__}")
    if past is not None:
        if mode != "pooled" or not causal:
            raise ValueError(f"past is the running state of the causal pooled gate; got mode={mode!r}, causal={causal}")
        if not isinstance(past, (tuple, list)) or len(past) != 2:
            raise ValueError(f"past must be a (total [B={B}, L={L}], count [B={B}]) pair, got {type(past).__name__}")
        check.named("past total", past[0], [("B", B), ("L", L)])
        check.named("past count", past[1], [("B", B)])
    return reference.apt_gate(hidden, weight, bias, layer_scale, mode=mode, key_padding_mask=key_padding_mask,
                              causal=causal, past=past)


def _check_embedding(input_ids, weight, prompt, backend="torch", embed_scale=None):
    check.named("weight", weight, [("V", None), ("d", None)])
    check.floating("weight", weight)
    V, d = weight.shape
    # the Triton launchers check the id range themselves (they are also called directly): check it once
    # (with a scale the rows are gathered in torch, which needs the range checked first)
    check.token_ids("input_ids", input_ids, V, weight, check_range=backend != "triton" or embed_scale is not None)
    if prompt is not None:
        check.named("prompt", prompt, [("m", None), ("d", d)], like=weight)
    if embed_scale is not None:
        if isinstance(embed_scale, torch.Tensor):
            if embed_scale.dim() != 0 or not embed_scale.is_floating_point():
                raise ValueError(f"embed_scale must be a number or a 0-dim floating tensor, got a {embed_scale.dtype} "
                                 f"tensor of shape {list(embed_scale.shape)}")
            check.same_device("embed_scale", embed_scale, weight)
        elif isinstance(embed_scale, bool) or not isinstance(embed_scale, (int, float)):
            raise ValueError("embed_scale must be a number or a 0-dim floating tensor, "
                             f"got {type(embed_scale).__name__}")
    return d


def _scaled_rows(input_ids, weight, embed_scale):
    """``(ids, table)`` for the Triton launchers when the rows carry a scale: the scaled rows gathered in torch,
    numbered ``0..B*S-1`` (the kernels then see exactly the reference's ``scale * weight[ids]``)."""
    if embed_scale is None:
        return input_ids, weight
    x = torch.nn.functional.embedding(input_ids, weight) * embed_scale
    rows = torch.arange(input_ids.numel(), device=input_ids.device).view(input_ids.shape)
    return rows, x.reshape(-1, weight.shape[1])


def adept_embedding(input_ids, weight, prompt, down_weight, down_bias, up_weight, up_bias, *, dropout_mask=None,
                    embed_scale=None, backend=None):
    """ADePT input embedding ``[prompt ; X + ReLU(X @ A + a) @ B + b]`` with ``X = embed_scale * weight[input_ids]``.

    Args:
        input_ids: ``[B, S]`` int64 in ``[0, V)``; weight: ``[V, d]``; prompt: ``[m, d]`` or None.
        down_weight: ``[d, r]``; down_bias: ``[r]``; up_weight: ``[r, d]``; up_bias: ``[d]``.
        dropout_mask: ``[B, S, r]`` already scaled by ``1/(1-p)``, applied to ``X @ A + a`` before the ReLU.
        embed_scale: None, a number or a 0-dim tensor multiplying the looked-up rows (Gemma's ``sqrt(d)``);
            the prompt is not scaled.
        backend: ``"torch"``, ``"triton"`` or None (Triton for CUDA tensors).

    Returns:
        ``[B, m+S, d]``.
    """
    backend = _choose(backend, weight.device)
    _check_embedding(input_ids, weight, prompt, backend, embed_scale)
    r = check.adept_ffn(weight, down_weight, down_bias, up_weight, up_bias)
    if dropout_mask is not None:
        B, S = input_ids.shape
        check.named("dropout_mask", dropout_mask, [("B", B), ("S", S), ("r", r)], like=weight)
    if backend == "triton":
        ids, table = _scaled_rows(input_ids, weight, embed_scale)
        return _kernels(_embedding_kernels, weight.device).adept_embedding(
            ids, table, prompt, down_weight, down_bias, up_weight, up_bias, dropout_mask=dropout_mask)
    return reference.adept_embedding(input_ids, weight, prompt, down_weight, down_bias, up_weight, up_bias,
                                     dropout_mask=dropout_mask, embed_scale=embed_scale)


def dept_embedding(input_ids, weight, prompt, lora_a, lora_b, *, scaling=1.0, embed_scale=None, backend=None):
    """DePT input embedding ``[prompt ; embed_scale * weight[input_ids] + scaling * (lora_a[:S] @ lora_b)]``.

    Args:
        input_ids: ``[B, S]`` int64; weight: ``[V, d]``; prompt: ``[m, d]`` or None.
        lora_a: ``[s, r]`` with ``S <= s`` (one row per position); lora_b: ``[r, d]``.
        scaling: offset scale (DePT reference: ``8 / sqrt(r)``).
        embed_scale: None, a number or a 0-dim tensor multiplying the looked-up rows (not the prompt).
        backend: ``"torch"``, ``"triton"`` or None (Triton for CUDA tensors).

    Returns:
        ``[B, m+S, d]``.
    """
    backend = _choose(backend, weight.device)
    d = _check_embedding(input_ids, weight, prompt, backend, embed_scale)
    check.named("lora_a", lora_a, [("s", None), ("r", None)], like=weight)
    s, r = lora_a.shape
    check.named("lora_b", lora_b, [("r", r), ("d", d)], like=weight)
    S = input_ids.shape[1]
    if S > s:
        raise ValueError(
            f"input_ids has S={S} tokens but DePT's lora_a has offset rows for only s={s} positions; "
            "raise DePTConfig.max_length or truncate the input"
        )
    if not isinstance(scaling, (int, float)):
        raise ValueError(f"scaling must be a Python number, got {type(scaling).__name__}")
    if backend == "triton":
        ids, table = _scaled_rows(input_ids, weight, embed_scale)
        return _kernels(_embedding_kernels, weight.device).dept_embedding(ids, table, prompt, lora_a, lora_b,
                                                                          scaling=scaling)
    return reference.dept_embedding(input_ids, weight, prompt, lora_a, lora_b, scaling=scaling,
                                    embed_scale=embed_scale)


def prompt_tuning_embedding(input_ids, weight, prompt, *, embed_scale=None):
    """Plain prompt tuning ``[prompt ; embed_scale * weight[input_ids]]`` -> ``[B, m+S, d]`` (no kernel needed)."""
    _check_embedding(input_ids, weight, prompt, embed_scale=embed_scale)
    return reference.prompt_tuning_embedding(input_ids, weight, prompt, embed_scale=embed_scale)
