"""Sinks against the real packages (offline / local), and monitoring never takes training down."""

from __future__ import annotations

import errno
import glob
import json
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import gradguard as gg
from gradguard.monitor import (
    CSVSink,
    MLflowSink,
    Monitor,
    NeptuneSink,
    Sink,
    Spike,
    TensorBoardSink,
    WandbSink,
    load_run,
)
from gradguard.monitor import store as store_mod


def train(monitor, steps=30, spike_at=25):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    guard = gg.Guard(net, clipper=gg.NormClip(1e9), monitor=monitor)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    w0 = net[0].weight.detach().clone()
    for i in range(steps):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        if i + 1 == spike_at:
            net[0].weight.grad.mul_(1e3)
        guard.step(opt, loss=loss)
    guard.close()
    assert guard.step_count == steps
    assert not torch.equal(w0, net[0].weight)  # training went on
    return net


def mon(path, sinks=(), **kw):
    kw.setdefault("detectors", [Spike(warmup=5)])
    return Monitor(path, flush_every=10, layer_every=5, recorder_steps=6, sinks=sinks, **kw)


def test_tensorboard_sink_logs_aggregates(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(mon(tmp_path / "run", [TensorBoardSink(tmp_path / "tb", top_k=2)]))
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    run = load_run(tmp_path / "run")
    tn = [e.value for e in acc.Scalars("grad/total_norm")]
    np.testing.assert_allclose(tn, run.steps.total_norm.to_numpy(), rtol=1e-6)
    assert [e.step for e in acc.Scalars("grad/total_norm")] == run.steps.step.tolist()
    assert "layers/grad_norm_max" in tags and "train/loss" in tags and "events/spike" in tags
    per_layer = [t for t in tags if t.startswith("layer/")]
    assert 1 <= len(per_layer) <= len(run.meta["layers"])  # top-k only, never per parameter


def test_csv_sink_matches_store(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(mon(tmp_path / "run", [CSVSink(tmp_path / "csv")]))
    run = load_run(tmp_path / "run")
    csv = pd.read_csv(tmp_path / "csv" / "steps.csv")
    assert csv.step.tolist() == run.steps.step.tolist()
    np.testing.assert_allclose(csv.total_norm, run.steps.total_norm, rtol=1e-12)
    lay = pd.read_csv(tmp_path / "csv" / "layers.csv")
    assert len(lay) == len(run.layers)


def test_wandb_sink_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sink = WandbSink(project="gradguard-test", dir=str(tmp_path), mode="offline")
        train(mon(tmp_path / "run", [sink]))
    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    data = open(files[0], "rb").read()
    run = load_run(tmp_path / "run")
    assert data.count(b"grad/total_norm") >= 1
    assert json.dumps(float(run.steps.total_norm.iloc[-1])).encode() in data
    assert b"events/spike" in data


def test_mlflow_sink_local_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sink = MLflowSink(tracking_uri=uri, experiment="gg")
        train(mon(tmp_path / "run", [sink]))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    hist = sorted(client.get_metric_history(sink.run_id, "grad.total_norm"), key=lambda m: m.step)
    run = load_run(tmp_path / "run")
    assert [m.step for m in hist] == run.steps.step.tolist()
    np.testing.assert_allclose([m.value for m in hist], run.steps.total_norm, rtol=1e-6)
    r = client.get_run(sink.run_id)
    assert r.info.status == "FINISHED"
    assert any(k.startswith("gradguard.event.25.spike") for k in r.data.tags)


def test_neptune_sink_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sink = NeptuneSink(mode="offline")
        train(mon(tmp_path / "run", [sink]))
    logs = glob.glob(str(tmp_path / ".neptune" / "offline" / "*" / "data-*.log"))
    assert logs
    values = []
    for f in logs:
        for line in open(f):
            op = json.loads(line)["obj"]
            if op.get("path") == ["gradguard", "grad", "total_norm"]:
                values += [(v["step"], v["value"]) for v in op["values"]]
    run = load_run(tmp_path / "run")
    values.sort()
    assert [int(s) for s, _ in values] == run.steps.step.tolist()
    np.testing.assert_allclose([v for _, v in values], run.steps.total_norm, rtol=1e-6)


@pytest.mark.parametrize("cls,module,extra", [(WandbSink, "wandb", "wandb"),
                                              (NeptuneSink, "neptune", "neptune"),
                                              (MLflowSink, "mlflow", "mlflow")])
def test_missing_optional_dependency_names_the_extra(monkeypatch, cls, module, extra):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"gradguard\[{extra}\]"):
        cls()


# -- never take training down ---------------------------------------------------------------
def _gg_warnings(w):
    return [x for x in w if "gradguard" in str(x.message)]


def test_disk_full_warns_once_and_notes(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.pq, "write_table", full)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = mon(tmp_path / "run", detectors=[])
        train(m)
    msgs = [str(x.message) for x in _gg_warnings(w)]
    assert len(msgs) == 1 and "No space left" in msgs[0]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert any("No space left" in n for n in meta["notes"])
    assert load_run(tmp_path / "run").steps.empty


def test_read_only_folder(tmp_path):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = mon("/proc/gradguard-read-only/run", sinks=[CSVSink(tmp_path / "csv")], detectors=[])
        train(m)
    assert len(_gg_warnings(w)) == 1
    assert m.notes and "cannot create the run folder" in m.notes[0]
    assert len(pd.read_csv(tmp_path / "csv" / "steps.csv")) == 30  # sinks still fed


def test_folder_turns_read_only_mid_run(tmp_path, monkeypatch):
    real = store_mod.os.replace
    first = tmp_path / "run" / "steps-r0-000000.parquet"

    def replace(src, dst):
        if first.exists():  # read-only from the second flush on (shards and meta)
            raise OSError(errno.EROFS, "Read-only file system")
        return real(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", replace)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train(mon(tmp_path / "run", detectors=[]))
    assert len(_gg_warnings(w)) == 1
    assert len(load_run(tmp_path / "run").steps) == 10  # the first flush landed


class Broken(Sink):
    def write(self, batch):
        raise RuntimeError("tracker is down")


def test_sink_that_raises(tmp_path):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train(mon(tmp_path / "run", [Broken(), CSVSink(tmp_path / "csv")], detectors=[]))
    msgs = [str(x.message) for x in _gg_warnings(w)]
    assert len(msgs) == 1 and "tracker is down" in msgs[0]
    run = load_run(tmp_path / "run")
    assert len(run.steps) == 30
    assert any("tracker is down" in n for n in run.meta["notes"])
    assert len(pd.read_csv(tmp_path / "csv" / "steps.csv")) == 30  # the other sink still works
