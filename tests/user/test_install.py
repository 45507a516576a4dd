"""The installed layout: fastprefix.kernels is a subpackage, never a top-level `kernels`.

Runs in a fresh interpreter from a neutral folder, as a user's script would.
"""

import subprocess
import sys

SCRIPT = """
import importlib.util
assert importlib.util.find_spec("kernels") is None, "a top-level `kernels` is importable"
import fastprefix, fastprefix.kernels, fastprefix.reference
print(fastprefix.__version__)
"""


def test_kernels_is_only_a_subpackage(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_import_does_not_initialise_cuda(tmp_path):
    code = "import fastprefix, torch; assert not torch.cuda.is_initialized(); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
