"""Learning rates in the run store: every param group's lr as the optimizer used it, per step.

The reference is the optimizer itself: the test reads ``opt.param_groups`` before each
``guard.step`` (the rates that step uses) and compares the stored ``lr`` / ``lrs`` exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import gradguard as gg
from gradguard.monitor import Monitor, load_run
from gradguard.store import STEPS_SCHEMA

HOST_READS = ("item", "__bool__", "__float__", "tolist", "__int__")


def _warmup(k: int) -> float:
    return min(1.0, (k + 1) / 10)  # linear warmup over 10 steps


def _model_opt(tensor_lr: bool = False, fused: bool = False):
    """Two param groups (0.1 and 0.01) under a 10-step LambdaLR warmup; ``fused``: the Guard's
    path without a host read of the skip decision (as in test_monitor_sync)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    lr0, lr1 = (torch.tensor(0.1), torch.tensor(0.01)) if tensor_lr else (0.1, 0.01)
    opt = torch.optim.SGD([{"params": net[0].parameters(), "lr": lr0},
                           {"params": net[2].parameters(), "lr": lr1}], lr=lr0, momentum=0.9,
                          fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
    return net, opt, sched


def _lrs_now(opt) -> list[float]:
    return [float(g["lr"].item()) if isinstance(g["lr"], torch.Tensor) else g["lr"]
            for g in opt.param_groups]


def _steps(guard, net, opt, sched, first: int, last: int, *, scale: float = 1.0,
           reads: list | None = None, monkeypatch=None) -> list[list[float]]:
    """Train steps ``first..last``; returns the lrs each step used (read before the step)."""
    used = []
    for step in range(first, last + 1):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean() * scale
        loss.backward()
        used.append(_lrs_now(opt))
        if monkeypatch is not None:
            _count(monkeypatch, reads)
        try:
            guard.step(opt, loss=loss)
        finally:
            if monkeypatch is not None:
                monkeypatch.undo()
        sched.step()
    return used


def _count(monkeypatch, calls):
    for name in HOST_READS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float lr", "tensor lr"])
@pytest.mark.parametrize("device_path", [False, True], ids=["host cells", "device cells"])
def test_lambda_lr_warmup_two_groups_recorded_exactly(tmp_path, tensor_lr, device_path):
    net, opt, sched = _model_opt(tensor_lr)
    mon = Monitor(tmp_path / "run", flush_every=4, detectors=[], _device_path=device_path)
    with gg.Guard(net, clipper=gg.NormClip(1.0), monitor=mon) as guard:
        used = _steps(guard, net, opt, sched, 1, 15)
    run = load_run(tmp_path / "run")
    assert run.steps.step.tolist() == list(range(1, 16))
    assert run.steps.lr.tolist() == [u[0] for u in used]        # group 0, to plot
    assert run.steps.lrs.map(list).tolist() == used             # every group, exactly
    assert used[0] == pytest.approx([0.01, 0.001]) and used[-1] == pytest.approx([0.1, 0.01])
    lr = run.learning_rates()
    assert list(lr.columns) == ["step", "rank", "lr0", "lr1"]
    np.testing.assert_array_equal(lr[["lr0", "lr1"]].to_numpy(), np.array(used))


def test_one_group_keeps_lrs_null(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
    with gg.Guard(net, monitor=Monitor(tmp_path / "run", flush_every=3, detectors=[])) as guard:
        used = []
        for _ in range(7):
            opt.zero_grad()
            net(torch.randn(8, 4)).pow(2).mean().backward()
            used.append(opt.param_groups[0]["lr"])
            guard.step(opt)
            sched.step()
    run = load_run(tmp_path / "run")
    assert run.steps.lr.tolist() == used
    assert run.steps.lrs.isna().all()
    assert run.learning_rates().lr0.tolist() == used


@pytest.mark.parametrize("device_path", [False, True], ids=["host cells", "device cells"])
def test_no_host_read_for_the_learning_rates(tmp_path, monkeypatch, device_path):
    """Tensor learning rates of two groups, rewritten in place by the scheduler: the Monitor
    reads none of them in the step (the Guard alone reads once, on its first fused step)."""
    def reads_per_step(monitor):
        net, opt, sched = _model_opt(tensor_lr=True, fused=True)
        guard = gg.Guard(net, clipper=gg.NormClip(1.0), monitor=monitor)
        out = {}
        for step in range(1, 15):
            out[step] = []
            _steps(guard, net, opt, sched, step, step, reads=out[step], monkeypatch=monkeypatch)
        guard.close()
        return out

    baseline = reads_per_step(None)
    assert {s: c for s, c in baseline.items() if c} == {1: ["__bool__"]}
    monitored = reads_per_step(Monitor(tmp_path / "run", flush_every=5, detectors=[],
                                       _device_path=device_path))
    extra = {s: c for s, c in monitored.items() if c != baseline[s] and s % 5}
    assert extra == {}, f"the monitor read the host on non-flush steps: {extra}"
    run = load_run(tmp_path / "run")
    assert len(run.steps) == 14 and run.steps.lrs.map(len).eq(2).all()
    assert list(run.steps.lrs.iloc[-1]) == pytest.approx([0.1, 0.01], rel=1e-6)


def test_resume_keeps_the_learning_rates_of_the_resumed_run(tmp_path):
    """Checkpoint at step 6; the first process goes on to step 12 with other rates (flushed
    at 8 and 12), then dies; the resumed process runs 7-12 again. Each step once, with the
    rates the resumed optimizer used."""
    net, opt, sched = _model_opt()
    mon = Monitor(tmp_path / "run", flush_every=4, detectors=[], async_flush=False)
    guard = gg.Guard(net, clipper=gg.NormClip(1.0), monitor=mon)
    used = _steps(guard, net, opt, sched, 1, 6)
    ckpt = {"guard": guard.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "net": {k: v.clone() for k, v in net.state_dict().items()}}
    for g in opt.param_groups:  # the abandoned continuation: ten times the rates
        g["lr"] *= 10
    sched.base_lrs = [b * 10 for b in sched.base_lrs]
    abandoned = _steps(guard, net, opt, sched, 7, 12)
    mon.close()
    assert load_run(tmp_path / "run").steps.lrs.map(list).tolist()[6:] == abandoned

    net2, opt2, sched2 = _model_opt()
    net2.load_state_dict(ckpt["net"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    mon2 = Monitor(tmp_path / "run", flush_every=4, detectors=[], async_flush=False)
    with gg.Guard(net2, clipper=gg.NormClip(1.0), monitor=mon2) as guard2:
        guard2.load_state_dict(ckpt["guard"])
        used += _steps(guard2, net2, opt2, sched2, 7, 12)
    assert mon2.run_dir == tmp_path / "run"
    run = load_run(tmp_path / "run")
    assert run.steps.step.tolist() == list(range(1, 13))
    assert run.steps.lrs.map(list).tolist() == used
    assert run.steps.lr.tolist() == [u[0] for u in used]


def test_a_run_written_without_lrs_still_loads(tmp_path):
    """A run folder from before the ``lrs`` column: its shards read ``lrs`` as null (and a
    shard without ``lr`` either, as NaN); the report and inspect read it too."""
    from gradguard.report import open_run
    from gradguard.report.views import build_views

    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "meta.json").write_text(json.dumps({"name": "old", "layers": [], "config": {}}))
    n = 5
    old_cols = [f for f in STEPS_SCHEMA if f.name not in ("lrs",)]
    cols = {f.name: pa.array(np.arange(1, n + 1) if f.name == "step" else
                             np.full(n, 0.5) if pa.types.is_floating(f.type) else
                             np.zeros(n, bool) if pa.types.is_boolean(f.type) else
                             np.zeros(n, np.int32), f.type) for f in old_cols}
    pq.write_table(pa.table(cols), run_dir / "steps-r0-000000.parquet")
    del cols["lr"]
    cols["step"] = pa.array(np.arange(n + 1, 2 * n + 1), pa.int64())
    pq.write_table(pa.table(cols), run_dir / "steps-r0-000001.parquet")
    run = load_run(run_dir)
    assert list(run.steps.columns) == STEPS_SCHEMA.names
    assert run.steps.step.tolist() == list(range(1, 2 * n + 1))
    assert run.steps.lrs.isna().all()
    assert run.steps.lr.tolist()[:n] == [0.5] * n and run.steps.lr[n:].isna().all()
    assert run.learning_rates().lr0.tolist()[:n] == [0.5] * n
    views = build_views(open_run(run_dir))
    assert views.lr is not None and views.lr["groups"] == 1


def test_keras_monitor_writes_the_lr_column(tmp_path):
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    from gradguard import keras as ggk

    keras.utils.set_random_seed(0)
    sched = keras.optimizers.schedules.PolynomialDecay(0.1, decay_steps=8, end_learning_rate=0.02)
    mon = ggk.Monitor(tmp_path / "run", flush_every=4, layer_every=2)
    opt = ggk.GuardedOptimizer(keras.optimizers.SGD(sched), clipper=gg.NormClip(1.0), monitor=mon)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(optimizer=opt, loss="mse")
    x = np.random.default_rng(0).normal(size=(80, 3)).astype("float32")
    model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0, callbacks=[mon])
    mon.close()
    run = load_run(mon.run_dir)
    assert run.steps.step.tolist() == list(range(1, 11))
    want = [float(tf.cast(sched(k), tf.float32).numpy()) for k in range(10)]  # lr of update k
    np.testing.assert_allclose(run.steps.lr.to_numpy(), want, rtol=1e-6)
    assert run.steps.lrs.isna().all()  # one learning rate per Keras optimizer


def test_optax_recorder_writes_the_lr_column(tmp_path):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    from gradguard import optax as ggo

    params = {"w": jnp.ones(3)}
    sched = optax.linear_schedule(0.0, 1e-2, 10)

    def grads(k):
        return {"w": jnp.full(3, 1.0 + k)}

    # the lr from an inject_hyperparams state, read on the device with the history
    tx = ggo.history(ggo.skip_nonfinite(optax.chain(
        ggo.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.sgd)(learning_rate=sched))),
        length=4)
    st = tx.init(params)
    rec = ggo.Recorder(tmp_path / "a", params)
    update = jax.jit(tx.update)
    for k in range(8):
        _, st = update(grads(k), st, params)
        rec.record(st)
    rec.close(st)
    a = load_run(rec.path)
    want = [float(np.float32(sched(k))) for k in range(8)]  # the rate of update k
    assert a.steps.step.tolist() == list(range(8))
    np.testing.assert_allclose(a.steps.lr.to_numpy(), want, rtol=1e-6)  # jit's float32 rounding
    assert a.steps.lr.iloc[0] == 0.0 and a.steps.lr.iloc[-1] > a.steps.lr.iloc[1]
    assert a.steps.lrs.isna().all()

    # a schedule passed to the Recorder; and none: NaN (unknown)
    tx2 = ggo.history(optax.chain(ggo.clip_by_global_norm(1.0), optax.sgd(sched)), length=4)
    for name, kw, expect in (("b", {"learning_rate": sched}, [float(sched(k)) for k in range(8)]),
                             ("c", {"learning_rate": 0.5}, [0.5] * 8), ("d", {}, None)):
        st2 = tx2.init(params)
        rec2 = ggo.Recorder(tmp_path / name, params, **kw)
        for k in range(8):
            _, st2 = tx2.update(grads(k), st2, params)
            rec2.record(st2)
        rec2.close(st2)
        got = load_run(rec2.path).steps.lr
        if expect is None:
            assert got.isna().all()
        else:
            assert got.tolist() == expect
    with pytest.raises(TypeError, match="learning_rate"):
        ggo.Recorder(tmp_path / "e", params, learning_rate="1e-3")


def test_report_and_inspect_show_every_groups_rate(tmp_path):
    import io

    from rich.console import Console

    from gradguard.report import open_run
    from gradguard.report.html import _run_json
    from gradguard.report.inspect import inspect_run
    from gradguard.report.synthetic import write_synthetic_run
    from gradguard.report.views import build_views

    d = write_synthetic_run(tmp_path / "r", steps=300, layers=3, lr_groups=2)
    run = open_run(d)
    v = build_views(run, buckets=50)  # 300 steps > 2 x 50: downsampled
    stored = load_run(d).learning_rates()
    assert v.lr["groups"] == 2 and v.lr["labels"] == ["group 0", "group 1"]
    last = [stored.lr0.iloc[-1], stored.lr1.iloc[-1]]
    assert not v.lr["constant"] and v.lr["last"] == pytest.approx(last, rel=1e-5)
    at = stored.set_index("step")
    for g in range(2):  # every point shown is the stored rate of that step
        np.testing.assert_allclose(v.lr["series"][g], at[f"lr{g}"].loc[v.lr["x"]], rtol=1e-5)  # 6 digits shown
    top = int(at.lr0.idxmax())
    assert top in v.lr["x"]  # the peak of the warmup survives the downsampling
    assert _run_json(v, 0, None)["lr"] is v.lr
    buf = io.StringIO()
    inspect_run(run, console=Console(file=buf, width=120, color_system=None))
    text = buf.getvalue()
    assert f"2 groups: {last[0]:.2e}, {last[1]:.2e} (last step)" in text
    assert "\nlr    " in text  # a sparkline: the rate changes

    one = build_views(open_run(write_synthetic_run(tmp_path / "c", steps=20, layers=2)))
    assert one.lr["groups"] == 1 and one.lr["labels"] == ["lr"]


def test_sinks_get_every_groups_rate(tmp_path):
    import csv

    from gradguard.monitor import CSVSink, Sink
    from gradguard.monitor.sinks import scalar_rows

    class Keep(Sink):
        def __init__(self):
            self.rows = []

        def write(self, batch):
            self.rows += scalar_rows(batch)

    keep = Keep()
    net, opt, sched = _model_opt()
    mon = Monitor(None, flush_every=3, detectors=[], sinks=[keep, CSVSink(tmp_path / "csv")])
    with gg.Guard(net, clipper=gg.NormClip(1.0), monitor=mon) as guard:
        used = _steps(guard, net, opt, sched, 1, 5)
    assert [(d["train/lr"], d["train/lr_group0"], d["train/lr_group1"]) for _, d in keep.rows] == \
        [(u[0], u[0], u[1]) for u in used]
    with open(tmp_path / "csv" / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert [json.loads(r["lrs"]) for r in rows] == used
