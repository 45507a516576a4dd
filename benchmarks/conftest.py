"""pytest set-up for the op benchmarks (``make bench-ops``): collect ``bench_*.py`` files too.

They are not part of ``make test`` (which runs ``tests/`` only).
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
