"""No host synchronisation per step; a SIGKILLed run stays loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import gradguard as gg
from gradguard.monitor import Monitor, Spike, load_run

HOST_READS = ("item", "__bool__", "__float__", "tolist", "__int__")


def _count_reads(monkeypatch, guard, opt, net, steps=40):
    torch.manual_seed(1)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    calls: list[str] = []
    originals = {n: getattr(torch.Tensor, n) for n in HOST_READS}

    def counting(name):
        orig = originals[name]

        def wrapper(self, *a, **k):
            calls.append(name)
            return orig(self, *a, **k)
        return wrapper

    per_step = {}
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        calls.clear()
        for n in HOST_READS:
            monkeypatch.setattr(torch.Tensor, n, counting(n))
        try:
            guard.step(opt, loss=loss)
        finally:
            monkeypatch.undo()
        per_step[step] = list(calls)
    return per_step


def _setup(monitor):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    return net, opt, gg.Guard(net, clipper=gg.NormClip(1.0), monitor=monitor)


@pytest.mark.parametrize("host_math", [True, False, "gpu path"])
def test_no_host_read_on_non_flush_steps(tmp_path, monkeypatch, host_math):
    # True: numpy on the host; False: every rule in the step as tensors; "gpu path": the
    # GPU's mix on the CPU (skip rules as tensors in the step, the rest at the flush)
    net, opt, plain = _setup(None)
    baseline = _count_reads(monkeypatch, plain, opt, net)
    skip_rule = Spike(warmup=3, action="skip")  # the monitor is a device-side skip rule too
    mon = Monitor(tmp_path / "run", layer_every=5, flush_every=10, recorder_steps=8,
                  detectors=gg.monitor.default_detectors() + [skip_rule],
                  host_math=True if host_math == "gpu path" else host_math,
                  _device_path=host_math == "gpu path")
    net, opt, guard = _setup(mon)
    assert mon.can_skip
    monitored = _count_reads(monkeypatch, guard, opt, net)
    guard.close()
    # the Guard alone reads the host only on its first fused step (no optimizer state yet)
    assert {s: c for s, c in baseline.items() if c} == {1: ["__bool__"]}
    extra = {s: c for s, c in monitored.items() if c != baseline[s] and s % 10 != 0}
    assert extra == {}, f"the monitor read the host on non-flush steps: {extra}"
    run = load_run(tmp_path / "run")
    assert len(run.steps) == 40 and set(run.layers.step) == {5, 10, 15, 20, 25, 30, 35, 40}


CHILD = textwrap.dedent("""
    import sys, time, torch, gradguard as gg
    from gradguard.monitor import Monitor, Spike, Sink

    class Tell(Sink):
        def write(self, batch):
            print("flushed", int(batch.steps["step"][-1]), flush=True)

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    mon = Monitor(sys.argv[1], flush_every=10, layer_every=5, recorder_steps=6,
                  detectors=[Spike(warmup=5)], sinks=[Tell()])
    guard = gg.Guard(net, clipper=gg.NormClip(1e9), monitor=mon)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    step = 0
    while True:
        step += 1
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        if step == 25:
            net.weight.grad.mul_(1e5)
        guard.step(opt, loss=loss)
        time.sleep(0.005)
""")


def test_sigkill_leaves_a_loadable_run(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    flushed = 0
    deadline = time.monotonic() + 50
    try:
        while flushed < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if line.startswith("flushed"):
                flushed = int(line.split()[1])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert flushed >= 40
    run = load_run(run_dir)
    steps = run.steps.step.tolist()
    assert steps == list(range(1, len(steps) + 1))  # no hole, no duplicate
    assert len(steps) >= 40                           # everything flushed before the kill
    assert 25 in run.events.step.tolist()
    assert run.window(25).step.max() == 25
    assert run.meta["layers"] == ["weight", "bias"]
    assert not any(p.name.endswith(".tmp") and not p.name.startswith(".") for p in run_dir.iterdir())
