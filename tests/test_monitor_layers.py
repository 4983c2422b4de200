"""Layer names users recognise (stacked recurrent layers), warnings at the user's line,
event messages without ``nanx``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.monitor import Monitor, NonFinite, Spike, load_run
from gradguard.monitor.events import describe_layer
from gradguard.monitor.layers import LayerMap, layer_of


@pytest.mark.parametrize("cls", [torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN])
def test_stacked_recurrent_layers_are_layers(cls):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cls(3, 4, num_layers=2, bidirectional=True)
            self.head = torch.nn.Linear(8, 1)

    names = [n for n, _ in Net().named_parameters()]
    lm = LayerMap.from_names(names)
    assert lm.layers == ["rnn.l0", "rnn.l0_reverse", "rnn.l1", "rnn.l1_reverse", "head"]
    for n, i in zip(names, lm.index):
        if n.startswith("rnn."):
            assert lm.layers[i] == "rnn.l" + n.split("_l", 1)[1]
    assert layer_of("lstm.weight_hr_l0") == "lstm.l0"  # LSTM projections (proj_size)
    assert layer_of("weight_ih_l3") == "l3"          # a bare nn.LSTM given to the Guard
    assert layer_of("enc.weight_l0") == "enc"        # not a recurrent name: module path


def test_lstm_layer_norms_match_reference(tmp_path):
    torch.manual_seed(0)
    lstm, head = torch.nn.LSTM(3, 5, num_layers=2), torch.nn.Linear(5, 1)
    model = torch.nn.ModuleDict({"lstm": lstm, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = Monitor(tmp_path / "run", layer_every=1, flush_every=4, async_flush=False)
    guard = gg.Guard(model, clipper=gg.NormClip(1e9), monitor=mon)
    x = torch.randn(6, 2, 3)
    opt.zero_grad()
    head(lstm(x)[0][-1]).pow(2).mean().backward()
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters()}
    guard.step(opt)
    guard.close()
    rows = load_run(tmp_path / "run").layers.set_index("layer").grad_norm
    assert list(rows.index) == ["lstm.l0", "lstm.l1", "head"]
    for layer in rows.index:
        ref = math.sqrt(sum(float(g.square().sum()) for n, g in grads.items() if layer_of(n) == layer))
        assert rows[layer] == pytest.approx(ref, rel=1e-5)


def _loop(monitor, steps=30, bad=None):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    guard = gg.Guard(net, clipper=gg.NormClip(1e9), monitor=monitor, max_consecutive_skips=None)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for i in range(1, steps + 1):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        if bad is not None:
            bad(i, net)
        guard.step(opt)
    return guard


def test_warnings_point_at_the_users_line(tmp_path):
    def bad(i, net):
        if i == 20:
            net[0].weight.grad.mul_(1e4)

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        guard = _loop(Monitor(tmp_path / "run", flush_every=5, detectors=[Spike(warmup=5)]),
                      bad=bad)
        guard.close()
        Monitor(tmp_path / "run", flush_every=5, detectors=[]).close()  # a re-run: warns too
    ours = [x for x in w if "gradguard" in str(x.message)]
    assert any("spike" in str(x.message) for x in ours)
    assert any("already holds a run" in str(x.message) for x in ours)
    assert {x.filename for x in ours} == {__file__}, [(x.filename, str(x.message)) for x in ours]


def test_messages_never_print_nanx(tmp_path):
    """A layer without a baseline (the first step) or with a NaN norm shows its norm."""
    assert describe_layer({"layer": "a", "norm": 2.0, "baseline": 1.0, "ratio": 2.0}) == "a (2x)"
    assert describe_layer({"layer": "a", "norm": 0.5, "baseline": math.nan,
                           "ratio": math.nan}) == "a (norm 0.5)"

    def bad(i, net):
        if i in (1, 9):
            net[2].bias.grad.fill_(math.nan)

    mon = Monitor(tmp_path / "run", flush_every=5, detectors=[NonFinite()])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _loop(mon, steps=10, bad=bad).close()
    ev = load_run(tmp_path / "run").events
    assert ev.step.tolist() == [1, 9]
    assert np.isnan(ev.top_layers.iloc[0][0]["ratio"])  # no history at step 1
    for text in ev.message.tolist() + [str(x.message) for x in w]:
        assert "nanx" not in text and "infx" not in text, text
