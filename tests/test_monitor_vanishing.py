"""Vanishing fires when the gradient stops reaching a layer, not when a run converges."""

from __future__ import annotations

import warnings

import numpy as np
import torch

import gradguard as gg
from gradguard.monitor import Monitor, Vanishing, load_run


class TinyLSTM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(1, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.head(h[:, -1])


def _train(tmp_path, net, x, y, steps, lr, hook=None):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    mon = Monitor(tmp_path / "run", detectors=[Vanishing()], layer_every=1, flush_every=50)
    guard = gg.Guard(net, clipper=gg.NormClip(1e9), monitor=mon)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for s in range(1, steps + 1):
            opt.zero_grad()
            loss = ((net(x) - y) ** 2).mean()
            loss.backward()
            guard.step(opt, loss=loss)
            if hook is not None:
                hook(s, net)
        guard.close()
    return float(loss.detach()), load_run(tmp_path / "run")


def _own_ratio(run, layer, baseline_steps=50):
    """min over steps of ||g_l|| / geometric mean of its first ``baseline_steps`` norms."""
    g = run.layers[run.layers.layer == layer].sort_values("step").grad_norm.to_numpy(np.float64)
    base = np.exp(np.log(g[:baseline_steps]).mean())
    return (g[baseline_steps:] / base).min()


def test_converged_run_is_not_vanishing(tmp_path):
    torch.manual_seed(0)
    t = torch.linspace(0, 1, 10)
    x = torch.stack([torch.sin(t * 6 + p) for p in torch.linspace(0, 3, 16)])[..., None]
    final, run = _train(tmp_path, TinyLSTM(), x, x[:, -1] * 0.5, steps=700, lr=1e-2)
    assert final < 1e-4
    # every layer's gradient fell > 1000x below its early baseline (the old rule fired here)...
    assert _own_ratio(run, "lstm.l0") < 1e-3 and _own_ratio(run, "head") < 1e-3
    # ... together: nothing stopped reaching a layer
    assert run.events.empty, run.events.message.tolist()


def test_saturated_deep_tanh_net_is_vanishing(tmp_path):
    """At step 60 one middle layer of a deep tanh net saturates (bias 8: tanh' ~ 1e-6): the
    gradient no longer reaches the layers below it; the layers above keep learning."""
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [torch.nn.Linear(16, 16), torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(16, 1))
    x, y = torch.randn(64, 16), torch.randn(64, 1)

    def saturate(step, net):
        if step == 60:
            with torch.no_grad():
                net[8].bias.fill_(8.0)

    _, run = _train(tmp_path, net, x, y, steps=110, lr=1e-3, hook=saturate)
    ev = run.events
    assert ev.rule.tolist() == ["vanishing"], ev
    assert 61 + 19 <= ev.step.iloc[0] <= 61 + 25  # patience 20 after the saturation
    # the saturated Linear (net[8]) and the four below it, smallest ratio first
    assert {t["layer"] for t in ev.top_layers.iloc[0]} == {"0", "2", "4", "6", "8"}
