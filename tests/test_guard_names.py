"""Layer names as the user's model spells them: no ``_orig_mod.`` (torch.compile), no
``module.`` (DDP, DataParallel)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

import gradguard as gg


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


PLAIN = ["0.weight", "0.bias", "2.weight", "2.bias"]


class Wrapper(torch.nn.Module):
    """What DDP and DataParallel look like from outside: the model is ``self.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


class Attach:
    def attach(self, names, params):
        self.names = list(names)

    def record(self, stats, **fields):
        pass


def test_torch_compile_prefix_is_stripped():
    model = make_model()
    compiled = torch.compile(model)  # not run: naming needs no compilation
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    rec = Attach()
    guard = gg.Guard(compiled, gg.NormClip(1.0), monitor=rec)
    assert guard.names == PLAIN and rec.names == PLAIN
    assert gg.Guard(compiled.named_parameters()).names == PLAIN


def test_ddp_style_module_prefix_is_stripped_also_nested():
    assert gg.Guard(Wrapper(make_model())).names == PLAIN
    assert gg.Guard(torch.compile(Wrapper(make_model()))).names == PLAIN
    assert gg.Guard(torch.nn.DataParallel(make_model())).names == PLAIN


def test_a_users_own_module_attribute_is_kept_when_not_a_wrapper():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Linear(2, 2)
            self.head = torch.nn.Linear(2, 1)

    assert gg.Guard(Net()).names == ["module.weight", "module.bias", "head.weight", "head.bias"]


def test_the_first_nonfinite_layer_is_named_without_the_prefix():
    model = make_model()
    guard = gg.Guard(torch.compile(model), gg.NormClip(1.0), on_nonfinite="raise")
    model(torch.randn(3, 4)).sum().backward()
    model[2].weight.grad[0, 0] = float("inf")
    try:
        guard.clip()
    except gg.NonFiniteGradientError as exc:
        assert exc.parameter == "2.weight"
    else:
        raise AssertionError("no NonFiniteGradientError")


DDP_CHILD = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    import gradguard as gg
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    guard = gg.Guard(ddp, gg.NormClip(1.0))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ddp(torch.randn(5, 4)).square().mean().backward()
    guard.step(opt)
    print(",".join(guard.names))
    dist.destroy_process_group()
""")


def test_real_one_process_ddp_names(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_CHILD)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PORT=str(port)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == ",".join(PLAIN)
