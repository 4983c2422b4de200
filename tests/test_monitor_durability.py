"""A run never loses its story: exceptions, interpreter exit, garbage collection, SIGKILL;
and honest run folders (a re-run never mixes into a run, a resume never duplicates steps)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import weakref

import pytest
import torch

import gradguard as gg
from gradguard.monitor import Monitor, Spike, load_run

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def _python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


QUICKSTART_DIVERGES = """
    import sys, torch, gradguard as gg
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, monitor=gg.Monitor(sys.argv[1]))   # plain form, never closed
    for step in range(100):
        x, y = torch.randn(32, 20), torch.randn(32, 1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if step >= 15:                      # the run diverges: every gradient is NaN
            model[0].weight.grad.fill_(float("nan"))
        guard.step(optimizer, loss=loss)    # raises GradientExplosionError after 10 skips
"""


def test_uncaught_exception_leaves_every_step_on_disk(tmp_path):
    """The README quickstart ended by the Guard's own GradientExplosionError, uncaught."""
    run_dir = tmp_path / "run"
    out = _python(QUICKSTART_DIVERGES, str(run_dir))
    assert out.returncode == 1 and "GradientExplosionError" in out.stderr, out.stderr[-2000:]
    run = load_run(run_dir)
    n = len(run.steps)
    assert n >= 25 and run.steps.step.tolist() == list(range(1, n + 1))  # 15 good, >= 10 skipped
    assert run.steps.skipped.sum() == n - 15
    assert 16 in run.events[run.events.rule == "nonfinite"].step.tolist()
    assert run.window(16).step.max() == 16  # the flight recorder's story of the divergence
    assert run.meta["finished"] is not None
    assert "Exception ignored" not in out.stderr  # the exit hook never raises


def test_with_block_flushes_when_an_exception_leaves_it(tmp_path):
    """``with Monitor(...)``: on the way out of the block, even with os._exit afterwards
    (no interpreter-exit hooks), every step is on disk."""
    code = """
        import os, sys, torch, gradguard as gg
        p = torch.nn.Parameter(torch.ones(4))
        clip = gg.NormClip(1.0)
        try:
            with gg.Monitor(sys.argv[1], flush_every=100) as mon:
                for step in range(1, 100):
                    p.grad = torch.full((4,), float(step))
                    mon.record(clip([p]), loss=1.0)
                    if step == 7:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        os._exit(0)
    """
    out = _python(code, str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert load_run(tmp_path / "run").steps.step.tolist() == list(range(1, 8))


def test_unclosed_monitor_is_flushed_when_collected_and_not_kept_alive(tmp_path):
    def train():
        mon = Monitor(tmp_path / "run", flush_every=100, detectors=[])
        p = torch.nn.Parameter(torch.ones(3))
        for _ in range(5):
            p.grad = torch.ones(3)
            mon.record(gg.NormClip(1.0)([p]))
        return weakref.ref(mon)

    ref = train()
    gc.collect()
    assert ref() is None  # the exit hook holds no reference to the Monitor
    assert load_run(tmp_path / "run").steps.step.tolist() == [1, 2, 3, 4, 5]


def test_exit_hook_never_raises(tmp_path):
    code = """
        import sys, torch, gradguard as gg
        from gradguard.monitor import Sink
        class Bad(Sink):
            def write(self, batch): raise RuntimeError("tracker down")
            def close(self): raise RuntimeError("tracker down at close")
        mon = gg.Monitor(sys.argv[1], sinks=[Bad()])
        p = torch.nn.Parameter(torch.ones(3))
        for _ in range(3):
            p.grad = torch.ones(3)
            mon.record(gg.NormClip(1.0)([p]))
    """
    out = _python(code, str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr
    assert "tracker down" in out.stderr  # a warning, once
    assert len(load_run(tmp_path / "run").steps) == 3


KILLED = """
    import sys, time, torch, gradguard as gg
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    guard = gg.Guard(net, clipper=gg.NormClip(1e9),
                     monitor=gg.Monitor(sys.argv[1], flush_every=10, layer_every=5))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    step = 0
    while True:
        step += 1
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        guard.step(opt)
        print("step", step, flush=True)
        time.sleep(0.02)
"""


@pytest.mark.parametrize("kill_after", [15, 25])
def test_sigkill_loses_at_most_one_flush_interval(tmp_path, kill_after):
    """Killed half-way through the 2nd (3rd) interval, the 1st (2nd) flush is on disk: the
    first write does not wait for imports that take longer than an interval (a flush interval
    is lost, never two)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED), str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    seen = 0
    deadline = time.monotonic() + 90
    try:
        while seen < kill_after and time.monotonic() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if line.startswith("step"):
                seen = int(line.split()[1])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert seen >= kill_after
    steps = load_run(run_dir).steps.step.tolist()
    assert steps == list(range(1, len(steps) + 1))
    assert len(steps) >= seen - 10 + 5  # at most the current interval (5 steps into it) lost


# -- run folders ------------------------------------------------------------------------------
def _steps(mon, start, n, seed=0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(4))
    clip = gg.NormClip(10.0)
    for s in range(start, start + n):
        p.grad = torch.randn(4) * (1 + 0.1 * s)
        mon.record(clip([p]), step=s, loss=float(s))


def test_same_script_twice_gives_two_runs(tmp_path):
    for _ in range(2):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with Monitor(tmp_path / "x", flush_every=4, detectors=[]) as mon:
                _steps(mon, 1, 10)
    assert mon.run_dir == tmp_path / "x-2"
    msgs = [str(m.message) for m in w if "already holds a run" in str(m.message)]
    assert len(msgs) == 1 and str(tmp_path / "x-2") in msgs[0]
    for folder in ("x", "x-2"):
        assert load_run(tmp_path / folder).steps.step.tolist() == list(range(1, 11))


HOLDER = """
    import sys, time, torch, gradguard as gg
    m = gg.Monitor(sys.argv[1], flush_every=2, detectors=[])
    p = torch.nn.Parameter(torch.ones(3))
    for _ in range(4):
        p.grad = torch.ones(3)
        m.record(gg.NormClip(1.0)([p]))
    m.flush(wait=True)
    print("ready", flush=True)
    sys.stdin.readline()           # holds the folder until the test says
    m.close()
"""


def test_a_second_live_writer_is_refused_across_processes(tmp_path):
    """Another process is writing runs/x: resume or overwrite would mix two runs in one
    folder, so the store refuses (a warning naming the pid and the lock; training goes on);
    "new" writes a sibling. The live run keeps exactly its own steps."""
    run_dir = tmp_path / "x"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(run_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        for mode in ("resume", "overwrite", "new"):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                mon = Monitor(run_dir, flush_every=2, detectors=[], mode=mode)
                _steps(mon, 1, 3)
                mon.close()
            msgs = [str(m.message) for m in w]
            if mode == "new":
                assert mon.run_dir == tmp_path / "x-2"
                assert load_run(mon.run_dir).steps.step.tolist() == [1, 2, 3]
            else:
                hit = [m for m in msgs if "another live writer" in m]
                assert len(hit) == 1 and f"pid {holder.pid}" in hit[0], msgs
                assert "cannot write to the run folder" in hit[0] and "writer-r0.lock" in hit[0]
        assert load_run(run_dir).steps.step.tolist() == [1, 2, 3, 4]  # nothing mixed in
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    assert load_run(run_dir).steps.total_norm.tolist() == pytest.approx([3 ** 0.5] * 4, rel=1e-6)
    assert not (run_dir / "writer-r0.lock").exists()


def test_resume_from_a_checkpoint_older_than_the_last_flush(tmp_path):
    """Steps 16-30 written by the first process are superseded by the resumed one: each step
    once, events once, values those of the resumed run."""
    def mon():
        return Monitor(tmp_path / "run", flush_every=10, detectors=[Spike(warmup=3)],
                       async_flush=False)

    a = mon()
    _steps(a, 1, 15)
    checkpoint = a.state_dict()
    _steps(a, 16, 15, seed=1)  # flushed at 20 and 30, then the process dies
    a.close()
    b = mon()
    b.load_state_dict(checkpoint)
    _steps(b, 16, 20, seed=2)
    b.close()
    assert b.run_dir == tmp_path / "run"
    run = load_run(tmp_path / "run")
    assert run.steps.step.tolist() == list(range(1, 36))
    assert run.steps.loss.tolist() == [float(s) for s in range(1, 36)]
    ref = Monitor(tmp_path / "ref", flush_every=10, detectors=[], async_flush=False)
    _steps(ref, 1, 15)
    _steps(ref, 16, 20, seed=2)
    ref.close()
    assert run.steps.total_norm.equals(load_run(tmp_path / "ref").steps.total_norm)
    assert not run.events.duplicated(["step", "rule"]).any()


def test_with_guard_closes_the_monitor_on_an_exception(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    mon = Monitor(tmp_path / "run", flush_every=100, detectors=[])
    with pytest.raises(RuntimeError, match="data loader"):
        with gg.Guard(net, monitor=mon) as guard:
            for step in range(1, 50):
                opt.zero_grad()
                net(torch.randn(4, 3)).pow(2).mean().backward()
                guard.step(opt)
                if step == 7:
                    raise RuntimeError("data loader died")
    assert mon.closed
    assert load_run(tmp_path / "run").steps.step.tolist() == list(range(1, 8))


def test_monitor_is_the_guards_recorder():
    from gradguard.protocols import Recorder

    mon = Monitor(None, detectors=[])
    assert isinstance(mon, Recorder)
    mon.close()
    assert mon.closed
