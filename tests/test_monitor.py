"""Monitor: recorded statistics against float64 references, the run store, load_run."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguard as gg
from gradguard.monitor import Monitor, Spike, load_run
from gradguard.monitor.layers import LayerMap, layer_l2, layer_of
from gradguard.monitor.store import LAYERS_SCHEMA, STEPS_SCHEMA


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12))
        self.head = torch.nn.Linear(12, 2)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.head(self.enc(x)) * self.scale


def _train(tmp_path, steps=40, monitor_kw=None, clipper=None, fused=False, lr=1e-2, seed=0,
           hook=None):
    torch.manual_seed(seed)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, fused=fused)
    kw = {"layer_every": 5, "flush_every": 10, "recorder_steps": 8, "async_flush": False}
    kw.update(monitor_kw or {})
    mon = Monitor(tmp_path / "run", **kw)
    guard = gg.Guard(net, clipper=clipper or gg.NormClip(0.5), monitor=mon)
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    for i in range(steps):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        if hook is not None:
            hook(i, net, mon)
        guard.step(opt, loss=loss)
    guard.close()
    return net, load_run(tmp_path / "run")


def test_layer_of_groups_by_module_path():
    assert layer_of("encoder.layer.0.attn.weight") == "encoder.layer.0.attn"
    assert layer_of("scale") == "scale"
    lm = LayerMap.from_names(["a.w", "a.b", "b.w", "s", "a.c"])
    assert lm.layers == ["a", "b", "s"]
    assert lm.index == [0, 0, 1, 2, 0]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1e30, allow_nan=False), min_size=1, max_size=12), st.integers(1, 4))
def test_layer_l2_matches_float64_reference(norms, n_layers):
    idx = [i % n_layers for i in range(len(norms))]
    got = layer_l2(torch.tensor(norms, dtype=torch.float32), torch.tensor(idx), n_layers).double().numpy()
    f32 = np.asarray(norms, dtype=np.float32).astype(np.float64)
    ref = np.array([math.sqrt(sum(f32[i] ** 2 for i in range(len(norms)) if idx[i] == lay))
                    for lay in range(n_layers)])
    # float32 subnormals are spaced 1.4e-45 apart: a result there is rounded by up to half that
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=float(np.finfo(np.float32).smallest_subnormal))


def test_steps_and_layers_match_references(tmp_path):
    records = {}

    def hook(i, net, mon):
        step = i + 1
        if step % 5 == 0:
            records[step] = {
                "grads": {n: p.grad.detach().double().clone() for n, p in net.named_parameters()},
                "params": {n: p.detach().double().clone() for n, p in net.named_parameters()},
            }

    net, run = _train(tmp_path, steps=30, monitor_kw={"update_sample": None}, hook=hook)
    assert list(run.steps.columns) == STEPS_SCHEMA.names
    assert list(run.layers.columns) == LAYERS_SCHEMA.names
    assert run.steps.step.tolist() == list(range(1, 31))
    assert run.meta["layers"] == ["scale", "enc.0", "enc.2", "head"]
    assert ["enc.0.weight", "enc.0"] in run.meta["parameters"]
    s = run.steps
    assert s.total_norm_after.to_numpy() == pytest.approx(
        np.minimum(s.total_norm.to_numpy(), 0.5), rel=1e-4)
    assert (s.clipped == (s.total_norm > 0.5)).all()
    assert s.threshold.eq(0.5).all() and s.lr.eq(1e-2).all() and s.loss_scale.isna().all()
    assert not s.skipped.any() and not s.nonfinite.any()
    for step, rec in records.items():
        rows = run.layers[run.layers.step == step].set_index("layer")
        for layer in run.meta["layers"]:
            names = [n for n in rec["grads"] if layer_of(n) == layer]
            gn = math.sqrt(sum(float(torch.linalg.vector_norm(rec["grads"][n]) ** 2) for n in names))
            ga = max(float(rec["grads"][n].abs().max()) for n in names)
            assert rows.loc[layer, "grad_norm"] == pytest.approx(gn, rel=1e-5)
            # before clipping, like grad_norm (from the Guard's own norm pass)
            assert rows.loc[layer, "grad_max_abs"] == pytest.approx(ga, rel=1e-6)
            assert rows.loc[layer, "nonfinite_count"] == 0
    # update ratio and param norm of the last layer step against the final parameters
    last = max(records)
    rows = run.layers[run.layers.step == last].set_index("layer")
    for layer in run.meta["layers"]:
        names = [n for n in rec["params"] if layer_of(n) == layer]
        before = {n: records[last]["params"][n] for n in names}
        after = {n: p.detach().double() for n, p in net.named_parameters() if n in names}
        if last == 30:
            num = math.sqrt(sum(float(torch.sum((after[n] - before[n]) ** 2)) for n in names))
            den = math.sqrt(sum(float(torch.sum(before[n] ** 2)) for n in names))
            assert rows.loc[layer, "update_ratio"] == pytest.approx(num / den, rel=1e-4)
            pn = math.sqrt(sum(float(torch.sum(after[n] ** 2)) for n in names))
            assert rows.loc[layer, "param_norm"] == pytest.approx(pn, rel=1e-5)


def test_sampled_update_ratio_is_close(tmp_path):
    _, exact = _train(tmp_path / "a", steps=10, monitor_kw={"update_sample": None})
    _, sampled = _train(tmp_path / "b", steps=10, monitor_kw={"update_sample": 16})
    e = exact.layers.set_index(["step", "layer"]).update_ratio
    s = sampled.layers.set_index(["step", "layer"]).update_ratio
    # small layers (<= 16 elements per tensor) are exact; big ones a strided sample
    assert s.loc[(10, "scale")] == pytest.approx(e.loc[(10, "scale")], rel=1e-6)
    assert np.all(np.abs(np.log(s / e)) < 1.0)


def test_nonfinite_count_and_first_layer(tmp_path):
    def hook(i, net, mon):
        if i + 1 == 20:
            net.head.weight.grad[0, :3] = float("nan")
            net.head.bias.grad[1] = float("inf")

    _, run = _train(tmp_path, steps=25, hook=hook, monitor_kw={"detectors": [gg.monitor.NonFinite()]})
    row = run.layers[(run.layers.step == 20) & (run.layers.layer == "head")].iloc[0]
    assert row.nonfinite_count == 4
    assert math.isnan(row.grad_norm) and math.isnan(row.grad_max_abs)
    assert run.layers[(run.layers.step == 20) & (run.layers.layer != "head")].nonfinite_count.eq(0).all()
    s20 = run.steps.set_index("step").loc[20]
    assert s20.nonfinite and s20.skipped
    ev = run.events[run.events.rule == "nonfinite"]
    assert ev.step.tolist() == [20]
    assert ev.iloc[0].first_nonfinite_layer == "head"
    w = run.window(20)
    assert sorted(set(w.step)) == list(range(13, 21))  # recorder_steps = 8, up to the event
    assert set(w.layer) == set(run.meta["layers"])


def test_flight_window_matches_per_step_layer_norms(tmp_path):
    def hook(i, net, mon):
        if i + 1 == 33:
            for p in net.enc[0].parameters():
                p.grad.mul_(1e4)

    _, run = _train(tmp_path, steps=40, hook=hook, monitor_kw={"detectors": [Spike()]},
                    clipper=gg.NormClip(1e9))
    ev = run.events
    assert ev.step.tolist() == [33] and ev.rule.tolist() == ["spike"]
    assert ev.iloc[0].top_layers[0]["layer"] == "enc.0"
    assert ev.iloc[0].top_layers[0]["ratio"] > 1e3
    w = run.window(33)
    # the window's layer-33 norm agrees with the layer row of step 35 only in schema;
    # check against the step's total norm: sqrt(sum layer^2) == total norm
    w33 = w[w.step == 33].grad_norm.to_numpy()
    tot = run.steps.set_index("step").loc[33, "total_norm"]
    assert math.sqrt(float(np.sum(w33.astype(np.float64) ** 2))) == pytest.approx(tot, rel=1e-5)
    assert run.windows() == [33]


def test_standalone_record_without_attach(tmp_path):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    mon = Monitor(tmp_path / "alone", layer_every=2, flush_every=4, async_flush=True)
    clip = gg.NormClip(1.0)
    for i in range(10):
        for p in params:
            p.grad = torch.randn(5) * (i + 1)
        mon.record(clip(params), loss=torch.tensor(float(i)))
    mon.close()
    run = load_run(tmp_path / "alone")
    assert run.steps.step.tolist() == list(range(1, 11))
    assert run.steps.loss.tolist() == [float(i) for i in range(10)]
    assert run.meta["layers"] == ["param0", "param1", "param2"]
    assert run.layers.step.unique().tolist() == [2, 4, 6, 8, 10]
    assert run.layers.nonfinite_count.eq(-1).all() and run.layers.param_norm.isna().all()


def test_load_run_empty_and_torn_events(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(FileNotFoundError, match="not a gradguard run folder"):
        load_run(tmp_path / "r")  # an empty folder is not a run (it used to read as one)
    (tmp_path / "r" / "meta.json").write_text(json.dumps({"name": "r", "layers": []}))
    run = load_run(tmp_path / "r")
    assert run.steps.empty and list(run.steps.columns) == STEPS_SCHEMA.names
    assert run.layers.empty and list(run.layers.columns) == LAYERS_SCHEMA.names
    assert run.events.empty and "top_layers" in run.events.columns
    good = {"step": 3, "rule": "spike", "value": 5.0, "baseline": 1.0, "action": "warn",
            "top_layers": [], "first_nonfinite_layer": None, "window": None, "message": "m", "time": 1.0}
    (tmp_path / "r" / "events.jsonl").write_text(json.dumps(good) + "\n" + '{"step": 4, "ru')
    with pytest.warns(UserWarning, match="cut short"):
        run = load_run(tmp_path / "r")
    assert run.events.step.tolist() == [3]
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "nope")


def test_resume_appends_and_state_roundtrip(tmp_path):
    def run_steps(mon, start, n, seed):
        torch.manual_seed(seed)
        p = torch.nn.Parameter(torch.randn(4))
        clip = gg.NormClip(10.0)
        for s in range(start, start + n):
            p.grad = torch.randn(4) * (1 + 0.1 * s)
            mon.record(clip([p]), step=s, loss=float(s))

    a = Monitor(tmp_path / "full", flush_every=5, detectors=[Spike(warmup=3)], async_flush=False)
    run_steps(a, 1, 12, 0)
    sd = a.state_dict()
    run_steps(a, 13, 8, 1)
    a.close()
    b = Monitor(tmp_path / "part", flush_every=5, detectors=[Spike(warmup=3)], async_flush=False)
    run_steps(b, 1, 12, 0)
    b.close()
    c = Monitor(tmp_path / "part", flush_every=5, detectors=[Spike(warmup=3)], async_flush=False)
    c.load_state_dict(sd)
    run_steps(c, 13, 8, 1)
    # Monitor.state_dict() first runs the rules the host batches at each flush
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict()["detectors"][0].values(),
                                                   c.state_dict()["detectors"][0].values()))
    c.close()
    full, part = load_run(tmp_path / "full"), load_run(tmp_path / "part")
    assert part.steps.step.tolist() == list(range(1, 21))
    cols = ["step", "loss", "total_norm", "clip_coef"]
    assert full.steps[cols].equals(part.steps[cols])


def test_layers_store_dictionary_float32_model_order(tmp_path):
    """The layer column is a categorical of meta["layers"], rows of a step in model order,
    statistics float32 on disk and in the frame."""
    import pyarrow.parquet as pq

    _, run = _train(tmp_path, steps=20)
    lay = run.layers
    assert isinstance(lay.layer.dtype, pd.CategoricalDtype)
    assert list(lay.layer.cat.categories) == run.meta["layers"]
    for c in ("grad_norm", "grad_max_abs", "param_norm", "update_ratio"):
        assert lay[c].dtype == np.float32, c
    for _, g in lay.groupby("step"):
        assert g.layer.astype(str).tolist() == run.meta["layers"]
    shard = sorted((tmp_path / "run").glob("layers-r0-*.parquet"))[0]
    schema = pq.read_schema(shard)
    assert schema.field("layer").type == LAYERS_SCHEMA.field("layer").type
    assert (lay.layer == "head").sum() == len(lay.step.unique())


def test_load_run_reads_older_shards_and_sorts_ranks(tmp_path):
    """Shards of the earlier schema (layer as strings, float64 statistics) read next to new
    ones; several ranks interleave by (step, rank, layer order); float64 is never rounded."""
    import pyarrow as pa

    from gradguard.monitor.store import RunWriter, layer_column

    names = ["enc", "head"]
    w0 = RunWriter(tmp_path, rank=0)
    w0.write_meta({"name": "x", "layers": names})
    new = {"step": np.array([1, 1, 2, 2]), "layer": layer_column(names, 2),
           "grad_norm": np.arange(4, dtype=np.float32), "grad_max_abs": np.ones(4, np.float32),
           "nonfinite_count": np.zeros(4, np.int64), "param_norm": np.ones(4, np.float32),
           "update_ratio": np.ones(4, np.float32), "rank": np.zeros(4, np.int32)}
    w0.write_shard("layers", pa.table(new, schema=LAYERS_SCHEMA))
    w1 = RunWriter(tmp_path, rank=1)
    old = pa.table({"step": np.array([2, 2, 1, 1], dtype=np.int64),
                    "layer": pa.array(["head", "enc", "head", "enc"], pa.string()),
                    "grad_norm": np.array([0.1, 0.2, 0.3, 0.4]), "grad_max_abs": np.ones(4),
                    "nonfinite_count": np.zeros(4, np.int64), "param_norm": np.ones(4),
                    "update_ratio": np.ones(4), "rank": np.ones(4, np.int32)})
    w1.write_shard("layers", old)
    lay = load_run(tmp_path).layers
    got = list(zip(lay.step, lay["rank"], lay.layer.astype(str), lay.grad_norm))
    assert got == [(1, 0, "enc", 0.0), (1, 0, "head", 1.0), (1, 1, "enc", 0.4), (1, 1, "head", 0.3),
                   (2, 0, "enc", 2.0), (2, 0, "head", 3.0), (2, 1, "enc", 0.2), (2, 1, "head", 0.1)]
    assert lay.grad_norm.dtype == np.float64  # promoted, the float64 values kept exactly
    assert list(lay.columns) == LAYERS_SCHEMA.names


def test_standalone_monitor_reads_max_abs_itself(tmp_path):
    """Without a Guard, record() takes max |g| from the gradients as they are."""
    torch.manual_seed(0)
    net = Net()
    mon = Monitor(tmp_path / "run", layer_every=1, flush_every=1, async_flush=False)
    mon.attach([n for n, _ in net.named_parameters()], list(net.parameters()))
    ((net(torch.randn(8, 6)) ** 2).mean()).backward()
    norms = gg.grad_norm(net.parameters())
    one = torch.ones(())
    stats = gg.ClipStats(norms.total, one, one < 0, norms.nonfinite, norms.per_tensor)
    mon.record(stats, loss=1.0)
    mon.close()
    rows = load_run(tmp_path / "run").layers.set_index("layer")
    for layer in ("enc.0", "head"):
        ref = max(float(p.grad.abs().max()) for n, p in net.named_parameters() if layer_of(n) == layer)
        assert rows.loc[layer, "grad_max_abs"] == pytest.approx(ref, rel=1e-7)


def test_monitored_run_is_bit_identical_to_unmonitored(tmp_path):
    """Asking the norm pass for max |g| on layer steps changes nothing in training."""
    finals = []
    for monitored in (False, True):
        torch.manual_seed(0)
        net = Net()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        mon = Monitor(tmp_path / "run", layer_every=2, flush_every=4, async_flush=False) if monitored else None
        guard = gg.Guard(net, clipper=gg.NormClip(0.3), monitor=mon)
        x, y = torch.randn(32, 6), torch.randn(32, 2)
        for _ in range(12):
            opt.zero_grad()
            loss = ((net(x) - y) ** 2).mean()
            loss.backward()
            guard.step(opt, loss=loss)
        guard.close()
        finals.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_update_ratio_follows_replaced_parameter_memory(tmp_path):
    """Cached sample views are rebuilt when a parameter's memory is replaced (p.data = ...)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(64))
    mon = Monitor(tmp_path / "run", layer_every=1, flush_every=2, async_flush=False,
                  update_sample=None)
    mon.attach(["w"], [w])
    one = torch.ones(())
    for new_value in (2.0, 5.0):
        w.grad = torch.ones(64)
        mon.before_step(step=mon.step + 1)
        w.data = torch.full((64,), new_value)  # new memory, as some frameworks do
        norms = gg.grad_norm([w])
        mon.record(gg.ClipStats(norms.total, one, one < 0, norms.nonfinite, norms.per_tensor))
    mon.close()
    ratio = load_run(tmp_path / "run").layers.set_index("step").update_ratio
    # the snapshot is taken from the memory in use at before_step: 1 -> 2, then 2 -> 5
    assert ratio.loc[1] == pytest.approx(1.0) and ratio.loc[2] == pytest.approx(1.5)
