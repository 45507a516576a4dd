"""Triton is required only where it installs: with it blocked, fastprefix imports, the reference path runs (ops,
modules, a model tuned by `apply`), and asking for the Triton backend says Triton is missing."""

import subprocess
import sys

SCRIPT = r"""
import sys
sys.modules["triton"] = None  # as on a machine where Triton does not install: `import triton` fails
import torch, transformers as tf
import fastprefix
B, H, S, D, L = 2, 4, 5, 8, 3
q, k = torch.randn(B, H, S, D), torch.randn(B, 2, S, D)
prefix = torch.randn(2, L, D)
out = fastprefix.gated_prefix_attention(q, k, k, prefix, prefix, gate=torch.rand(B, S, L), causal=True)
assert out.shape == (B, H, S, D) and torch.isfinite(out).all()
for method in (fastprefix.APTConfig(num_virtual_tokens=3), fastprefix.ADePTConfig(num_virtual_tokens=3, rank=4)):
    config = tf.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=40, vocab_size=50)
    model = fastprefix.apply(tf.LlamaForCausalLM(config), method)
    ids = torch.randint(3, 50, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
try:
    fastprefix.gated_prefix_attention(q, k, k, prefix, prefix, backend="triton")
except (NotImplementedError, ValueError) as e:
    print("refused:", e)
print("ok")
"""


def test_reference_path_without_triton(tmp_path):
    # TRITON_INTERPRET=1 (set by the test session) asks for the interpreter: a missing Triton is still said plainly
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "ok"
    assert lines[0].startswith("refused:") and "needs Triton" in lines[0]
