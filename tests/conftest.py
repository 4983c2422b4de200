import os
import sys

import pytest
import torch

try:  # triton's LLVM must load before TensorFlow's: the other order aborts the process
    import triton  # noqa: F401  (LLVM "registered more than once" when torch.optim loads it later)
except ImportError:
    pass

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class SyncCounter:
    """Counts host reads of tensor values: Tensor.item, __bool__, __float__, __int__, tolist."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "tolist")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        calls = self.calls
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def wrapper(self_t, *a, _orig=orig, _name=name, **k):
                calls.append(_name)
                return _orig(self_t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapper)


@pytest.fixture
def sync_counter(monkeypatch):
    return SyncCounter(monkeypatch)
