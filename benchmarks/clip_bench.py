"""Clipping speed: gradguard.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_ and the memory floor.

    python benchmarks/clip_bench.py                 # the default sets of this device
    python benchmarks/clip_bench.py --device cpu --sets gpt2-124M:float32 --repeats 21
    gradguard bench ...                             # the same, from the installed package

What each column means is in ``gradguard.kernels.bench`` and docs/performance.md.
"""

from __future__ import annotations

import os
import sys

try:
    from gradguard.kernels import bench
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from gradguard.kernels import bench

if __name__ == "__main__":
    sys.exit(bench.main())
