"""``fastprefix-bench``: a smoke benchmark of the reference path (the full suite replaces it)."""

import time

import torch

import fastprefix


def _median_ms(fn, repeat=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main():
    torch.manual_seed(0)
    B, H, S, D, L, d, V, m, r = 4, 12, 128, 32, 16, 384, 30522, 60, 19
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    pk, pv = torch.randn(H, L, D), torch.randn(H, L, D)
    hidden, w, b, lam = torch.randn(B, S, d), torch.randn(d, L) * 0.02, torch.zeros(L), torch.tensor(1.0)
    ids, table = torch.randint(0, V, (B, S)), torch.randn(V, d)
    adept = fastprefix.AdaptiveDecomposedPrompt(fastprefix.ADePTConfig(num_virtual_tokens=m, rank=r), d).eval()
    dept = fastprefix.DecomposedPrompt(fastprefix.DePTConfig(num_virtual_tokens=m, rank=r), d)
    rows = {
        "P-Tuning v2 attention": lambda: fastprefix.gated_prefix_attention(q, k, v, pk, pv),
        "APT attention (token gate)": lambda: fastprefix.gated_prefix_attention(
            q, k, v, pk, pv, gate_hidden=hidden, gate_weight=w, gate_bias=b, layer_scale=lam),
        "DePT embedding": lambda: dept(ids, table),
        "ADePT embedding": lambda: adept(ids, table),
    }
    print(f"reference path on {torch.device('cpu')}, B={B} H={H} S={S} D={D} L={L} d={d} m={m} r={r}")
    print("| op | median ms |\n|---|---|")
    with torch.no_grad():
        for name, fn in rows.items():
            print(f"| {name} | {_median_ms(fn):.3f} |")


if __name__ == "__main__":
    main()
