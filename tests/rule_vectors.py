"""Reference vectors for the pure rules (``gradguard.rules``), shared by every backend.

Each ``CASES`` entry names a rule, its configuration (the keyword arguments of
``rules.<rule>.config``) and an input sequence from ``SEQUENCES``: per step a global norm
(float32 values, with spikes, NaN and inf), whether the step is accepted by the caller (False:
skipped by something else), and for some rules a loss or a cosine. ``expected(case)`` gives
the per-step decisions from plain float64 Python written here, independently of gradguard
(it shares no code with it): the threshold (clippers), the coefficient
``min(1, thr / (g + 1e-6))`` (1.0 where ``g <= thr``), or the skip flag.

``drive(case, xp, like)`` runs the rule through any array namespace (numpy, torch, jax, tf)
and returns the same per-step records, so a backend's parity test is

    for case in CASES:
        assert_matches(drive(case, my_xp, my_like), expected(case))

``assert_matches`` requires identical skip flags and clip decisions (``coef < 1``) and values
within float32 round-off of the float64 reference (relative 2e-5; inf must be inf).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

EPS = 1e-6
NAN, INF = math.nan, math.inf


def _f32(xs) -> list[float]:
    return [float(np.float32(x)) for x in xs]


def _sequences() -> dict[str, dict[str, list]]:
    rng = np.random.default_rng(20261201)
    base = np.exp(rng.normal(0.0, 0.3, 60))
    spiky = base.copy()
    spiky[[12, 30, 31, 47]] *= [40.0, 25.0, 60.0, 100.0]
    spiky = list(spiky)
    spiky[20] = NAN
    spiky[38] = INF
    accepted = [True] * 60
    for i in (8, 25, 26, 50):
        accepted[i] = False
    losses = list(2.0 + 0.1 * rng.normal(size=60))
    losses[15] = 40.0
    losses[44] = NAN
    cos = list(np.clip(rng.normal(0.0, 0.6, 60), -1.0, 1.0))
    rise = [0.1 * 1.3 ** i for i in range(12)] + [500.0, 1.5, 1.6]
    return {
        "spiky": {"norms": _f32(spiky), "accepted": accepted, "losses": _f32(losses),
                  "cos": _f32(cos)},
        "warm": {"norms": _f32([1.0, 1.1, 0.9, 1.0, 2.0, 1.05, 30.0, 0.95, 1.0]),
                 "accepted": [True] * 9, "losses": None, "cos": _f32([0.5] * 9)},
        "rise": {"norms": _f32(rise), "accepted": [True] * len(rise), "losses": None,
                 "cos": _f32([(-1.0) ** i * 0.7 for i in range(len(rise))])},
        "few": {"norms": _f32([1.0, 10.0]), "accepted": [True, True], "losses": None,
                "cos": _f32([0.0, 0.0])},
    }


SEQUENCES = _sequences()

CASES: list[dict[str, Any]] = [
    {"rule": "norm_clip", "config": {"max_norm": 1.5}, "seq": "spiky"},
    {"rule": "norm_clip", "config": {"max_norm": INF}, "seq": "warm"},
    {"rule": "autoclip", "config": {"percentile": 10.0}, "seq": "spiky"},
    {"rule": "autoclip", "config": {"percentile": 90.0}, "seq": "spiky"},
    {"rule": "autoclip", "config": {"percentile": 100.0}, "seq": "rise"},
    {"rule": "autoclip", "config": {"percentile": 10.0}, "seq": "few"},
    {"rule": "autoclip", "config": {"percentile": 25.0, "window": 8}, "seq": "spiky"},
    {"rule": "autoclip", "config": {"percentile": 50.0, "window": 3}, "seq": "rise"},
    {"rule": "zclip", "config": {"warmup_steps": 5}, "seq": "spiky"},
    {"rule": "zclip", "config": {"alpha": 0.9, "z_threshold": 2.0, "warmup_steps": 3,
                                 "max_norm": 0.5}, "seq": "warm"},
    {"rule": "zclip", "config": {"warmup_steps": 3, "max_norm": 5.0}, "seq": "spiky"},
    {"rule": "spike_skip", "config": {"threshold": 4.0, "window": 8, "min_history": 4},
     "seq": "spiky"},
    {"rule": "spike_skip", "config": {"threshold": 3.0, "window": 16, "min_history": 4,
                                      "watch_loss": False}, "seq": "spiky"},
    {"rule": "overshoot", "config": {"mode": "cap"}, "seq": "spiky"},
    {"rule": "overshoot", "config": {"mode": "momentum", "beta": 0.3}, "seq": "spiky",
     "init_limit": 0.8},
    {"rule": "overshoot", "config": {"mode": "sgd", "beta": 0.5, "floor": 0.0}, "seq": "rise",
     "init_limit": 0.05},
    {"rule": "overshoot", "config": {"mode": "momentum", "beta": 0.3, "deadband": 0.0},
     "seq": "spiky", "init_limit": 0.8},
    {"rule": "overshoot", "config": {"mode": "level"}, "seq": "spiky"},
    {"rule": "overshoot", "config": {"mode": "level", "level_factor": 1.5, "ema": 0.8},
     "seq": "rise"},
    {"rule": "overshoot", "config": {"mode": "trust"}, "seq": "spiky", "param_norm": 4.0,
     "lr": 0.5},
    {"rule": "overshoot", "config": {"mode": "trust", "trust": 0.1}, "seq": "rise",
     "param_norm": 2.0, "lr": 0.05},
    {"rule": "overshoot", "config": {"mode": "adaptive", "beta2": 0.9}, "seq": "spiky"},
    {"rule": "overshoot", "config": {"mode": "adaptive", "beta2": 0.99, "spike_factor": 2.0},
     "seq": "rise"},
]


def case_id(case: dict) -> str:
    cfg = ",".join(f"{k}={v}" for k, v in case["config"].items())
    return f"{case['rule']}[{cfg}]-{case['seq']}"


# -- float64 references -------------------------------------------------------------------


def _coef(g: float, thr: float) -> float:
    if not math.isfinite(g) or g <= thr:
        return 1.0
    return min(1.0, thr / (g + EPS))


def _percentile(values: list[float], p: float) -> float:
    return float(np.percentile(np.array(values, dtype=np.float64), p)) if values else INF


def _ref_autoclip(seq, p, window=None):
    hist, out = [], []
    for g, ok in zip(seq["norms"], seq["accepted"]):
        cur = hist + ([g] if math.isfinite(g) else [])
        out.append(_percentile(cur, p))
        if ok and math.isfinite(g):
            hist.append(g)
            if window is not None and len(hist) > window:
                hist.pop(0)
    return out


def _ref_zclip(seq, alpha=0.97, z_threshold=2.5, warmup_steps=25, max_norm=None, eps=1e-6):
    buf, mean, var, out = [], 0.0, 0.0, []
    for g, ok in zip(seq["norms"], seq["accepted"]):
        adaptive = INF
        if len(buf) >= warmup_steps:
            sigma = math.sqrt(var)
            z = (g - mean) / (sigma + eps)
            if z > z_threshold:
                adaptive = mean + z_threshold * sigma / (z / z_threshold)
        out.append(adaptive if max_norm is None else min(adaptive, max_norm))
        if not (ok and math.isfinite(g)):
            continue
        if len(buf) < warmup_steps:
            buf.append(g)  # raw norms in warm-up (the paper's code)
            if len(buf) == warmup_steps:
                mean = sum(buf) / len(buf)
                var = sum((b - mean) ** 2 for b in buf) / len(buf)
        else:
            x = min(g, adaptive)  # the adaptive clip value, not the max_norm cap
            mean = alpha * mean + (1 - alpha) * x
            var = alpha * var + (1 - alpha) * (x - mean) ** 2
    return out


def _ref_spike(seq, threshold=6.0, window=128, min_history=None, watch_loss=True):
    min_history = max(2, window // 2) if min_history is None else min_history
    norms_h, loss_h, out = [], [], []
    losses = seq["losses"] if (watch_loss and seq["losses"] is not None) else None

    def lim(h):
        a = np.array(h, dtype=np.float64)
        std = max(float(np.std(a, ddof=1)) if len(a) > 1 else 0.0, 1e-3 * abs(float(a.mean())))
        return float(a.mean()) + threshold * std

    for i, (g, ok) in enumerate(zip(seq["norms"], seq["accepted"])):
        skip = len(norms_h) >= min_history and g > lim(norms_h)
        lo = None if losses is None else losses[i]
        if lo is not None:
            skip = skip or (len(loss_h) >= min_history and lo > lim(loss_h)) \
                or not math.isfinite(lo)
        out.append(bool(skip))
        if ok and not skip and math.isfinite(g):
            norms_h.append(g)
            norms_h[:] = norms_h[-window:]
            if lo is not None and math.isfinite(lo):
                loss_h.append(lo)
                loss_h[:] = loss_h[-window:]
    return out


def _ref_overshoot(seq, init_limit=INF, mode="cap", beta=0.1, init_step=1e-2, floor=0.02,
                   spike_factor=3.0, ema=0.95, beta2=0.999, trust=0.03, level_factor=2.0,
                   deadband=0.3, param_norm=0.0, lr=None):
    S = INF
    started = False
    log_level = log_raw = v = prev_n = 0.0
    count = 0
    out = []
    for g, ok, c in zip(seq["norms"], seq["accepted"], seq["cos"]):
        if mode == "adaptive":
            thr = spike_factor * math.sqrt(v) if count else INF
        elif mode == "level":
            thr = level_factor * math.exp(log_raw) if count else INF
        else:
            s_now = S if started else init_limit
            cap = spike_factor * math.exp(log_level) if count else INF
            if mode == "trust" and param_norm > 0:
                thr = trust * param_norm / lr if lr else INF
            else:
                thr = min(s_now, cap)
        out.append(thr)
        if not (ok and math.isfinite(g) and g > 0):
            continue
        if mode in ("momentum", "sgd"):
            s_now = S if started else init_limit
            if c < -deadband:
                new = s_now * math.exp(beta * c)
            elif count and prev_n > s_now:
                new = s_now * math.exp(beta * (c + deadband))
            else:
                new = s_now
            if count:
                new = max(new, floor * math.exp(log_raw))
            S, started = new, True
        x = min(g, thr)
        if count == 0:
            log_level, log_raw = math.log(x), math.log(g)
        else:
            log_level = ema * log_level + (1 - ema) * math.log(x)
            log_raw = ema * log_raw + (1 - ema) * math.log(g)
        if mode == "adaptive":
            n = count + 1
            v = v + (1 - beta2) / (1 - beta2 ** n) * (x * x - v)
        prev_n = g
        count += 1
    return out


def expected(case: dict) -> list[dict[str, Any]]:
    """Per-step ``{"threshold", "coef"}`` (clippers) or ``{"skip"}`` (spike_skip)."""
    seq = SEQUENCES[case["seq"]]
    cfg = dict(case["config"])
    rule = case["rule"]
    if rule == "spike_skip":
        return [{"skip": s} for s in _ref_spike(seq, **cfg)]
    if rule == "norm_clip":
        thr = [cfg["max_norm"]] * len(seq["norms"])
        return [{"threshold": t, "coef": min(1.0, t / (g + EPS)) if math.isfinite(g) else 1.0}
                for t, g in zip(thr, seq["norms"])]
    if rule == "autoclip":
        thr = _ref_autoclip(seq, cfg["percentile"], cfg.get("window"))
    elif rule == "zclip":
        thr = _ref_zclip(seq, **cfg)
    elif rule == "overshoot":
        thr = _ref_overshoot(seq, case.get("init_limit", INF), **cfg,
                             param_norm=case.get("param_norm", 0.0), lr=case.get("lr"))
    else:
        raise KeyError(rule)
    return [{"threshold": t, "coef": _coef(g, t)} for t, g in zip(thr, seq["norms"])]


# -- running a rule through a namespace ------------------------------------------------------


def drive(case: dict, xp: Any, like: Any = None, *, to_float=float) -> list[dict[str, Any]]:
    """Run ``case`` through ``gradguard.rules`` with namespace ``xp`` (arrays made by
    ``xp.full`` on ``like``'s device); ``to_float`` reads a 0-d array (test side only)."""
    from gradguard import rules

    seq = SEQUENCES[case["seq"]]
    mod = getattr(rules, case["rule"])
    cfg = mod.config(**case["config"])
    state = mod.init(cfg, xp, like)
    if case["rule"] == "overshoot" and "init_limit" in case:
        state = state._replace(init_limit=xp.full((), case["init_limit"], "f32", like))
    if case["rule"] == "overshoot" and "param_norm" in case:
        state = state._replace(param_norm=xp.full((), case["param_norm"], "f32", like))
    out = []
    for i, (g, ok) in enumerate(zip(seq["norms"], seq["accepted"])):
        total = xp.full((), g, "f32", like)
        if case["rule"] == "spike_skip":
            loss = None if seq["losses"] is None else xp.full((), seq["losses"][i], "f32", like)
            skip, prop = mod.update(cfg, state, mod.Observation(total, loss), xp)
            accept = ~skip & xp.isfinite(total) & xp.full((), ok, "bool", like)
            state = rules.commit(accept, prop, state, xp)
            out.append({"skip": bool(to_float(skip))})
            continue
        if case["rule"] == "overshoot":
            obs = mod.Observation(total, xp.full((), seq["cos"][i], "f32", like), case.get("lr"))
            thr, prop = mod.update(cfg, state, obs, xp)
        else:
            thr, prop = mod.update(cfg, state, total, xp)
        nonfinite = ~xp.isfinite(total)
        coef = rules.norm_clip.coefficient(total, thr, xp, nonfinite=nonfinite,
                                           strict=case["rule"] != "norm_clip")
        accept = ~nonfinite & xp.full((), ok, "bool", like)
        state = rules.commit(accept, prop, state, xp)
        out.append({"threshold": to_float(thr), "coef": to_float(coef)})
    return out


def assert_matches(got: list[dict], want: list[dict], rel: float = 2e-5) -> None:
    """Same skip flags and clip decisions; values within float32 round-off."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        for key, wv in w.items():
            gv = g[key]
            if key == "skip":
                assert gv == wv, (i, key, gv, wv)
                continue
            if math.isinf(wv) or wv > 3.4028234663852886e38:
                assert math.isinf(gv) and gv > 0, (i, key, gv, wv)
                continue
            assert math.isfinite(gv) and abs(gv - wv) <= rel * abs(wv) + 1e-12, (i, key, gv, wv)
        if "coef" in w:
            assert (g["coef"] < 1.0) == (w["coef"] < 1.0), (i, g, w)
