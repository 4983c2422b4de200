"""The seed article's experiments in JAX / optax, with gradguard.optax (``gradguard demo
--framework jax``).

``mlp``: the seed MLP (fc 20 -> 25 -> 1, ReLU, xavier-uniform kernels, biases 0.01) on
unscaled ``make_regression(1000 x 20, noise 0.1, random_state 1)``, ``optax.sgd(0.07,
momentum=0.8)``, MSE, batch 128, 50 epochs: the same setting as ``experiments.seed_mlp``
(target shaped like the output). Unclipped, the loss becomes NaN in the first epochs; clipped,
it trains.

``rnn``: a tanh Elman RNN (hidden 32, ``lax.scan``) on Hochreiter's adding problem (sequence
length ``length``: two marked positions, the target is the sum of their values), SGD;
a large learning rate makes the unclipped run diverge.

Each strategy is an optax transformation factory; every clipped strategy is wrapped in
``ggo.skip_nonfinite`` (the unclipped one is plain optax, to show what happens without).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradguard.optax as ggo


@dataclass(frozen=True)
class Strategy:
    name: str
    make: Callable[[float, float], Any]   # (lr, momentum) -> the clipping transform or None


STRATEGIES = [
    Strategy("none", lambda lr, m: None),
    Strategy("global norm 1", lambda lr, m: ggo.clip_by_global_norm(1.0)),
    Strategy("value 0.5", lambda lr, m: ggo.clip_by_value(0.5)),
    Strategy("autoclip p10", lambda lr, m: ggo.autoclip(10.0)),
    Strategy("zclip", lambda lr, m: ggo.zclip()),
    Strategy("auto (default)", lambda lr, m: ggo.auto(learning_rate=lr, momentum=m or None)),
]


def strategy(name: str) -> Strategy:
    for s in STRATEGIES:
        if s.name == name:
            return s
    raise ValueError(f"no JAX strategy named {name!r}; choose from {[s.name for s in STRATEGIES]}")


def optimizer(s: Strategy, lr: float, momentum: float) -> Any:
    base = optax.sgd(lr, momentum=momentum or None)
    clip = s.make(lr, momentum)
    if clip is None:
        return base
    return ggo.history(ggo.skip_nonfinite(optax.chain(clip, base)), length=64)


@dataclass
class Result:
    experiment: str
    strategy: str
    seed: int
    final_loss: float
    first_nonfinite_epoch: int | None
    clipped_steps: int = 0
    skipped_steps: int = 0
    steps: int = 0
    losses: list[float] = field(default_factory=list)


# -- the seed MLP ----------------------------------------------------------------------------
def _xavier(key: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -a, a)


def mlp_params(seed: int) -> dict[str, Any]:
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"fc1": {"kernel": _xavier(k1, 20, 25), "bias": jnp.full((25,), 0.01)},
            "fc2": {"kernel": _xavier(k2, 25, 1), "bias": jnp.full((1,), 0.01)}}


def mlp_apply(p: dict[str, Any], x: jax.Array) -> jax.Array:
    h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def mlp_data(n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_regression

    X, y = make_regression(n_samples=n, n_features=20, noise=0.1, random_state=1)
    return X.astype(np.float32), y.astype(np.float32).reshape(-1, 1)


def _train(params: Any, tx: Any, loss_fn: Callable, batches: Callable, epochs: int,
           evaluate: Callable, recorder: Any = None) -> tuple[list[float], int, int, int]:
    state = tx.init(params)

    @jax.jit
    def step(p, s, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        u, s = tx.update(g, s, p, value=loss) if isinstance(
            tx, optax.GradientTransformationExtraArgs) else tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    losses, clipped, skipped, steps = [], 0, 0, 0
    for epoch in range(epochs):
        for xb, yb in batches(epoch):
            params, state = step(params, state, xb, yb)
            steps += 1
            if recorder is not None:
                recorder.record(state)
            h = ggo._record._first_history(state)
            if h is not None and steps % h.history_steps.shape[0] == 0:
                c, k = _count(h, steps)
                clipped, skipped = clipped + c, skipped + k
        losses.append(evaluate(params))
    h = ggo._record._first_history(state)
    if h is not None and steps % h.history_steps.shape[0]:
        c, k = _count(h, steps, tail=steps % h.history_steps.shape[0])
        clipped, skipped = clipped + c, skipped + k
    if recorder is not None:
        recorder.close(state)
    return losses, clipped, skipped, steps


def _count(h: Any, steps: int, tail: int | None = None) -> tuple[int, int]:
    """Clipped and skipped steps among the last ``tail`` (default: all) history rows."""
    st, hist = jax.device_get((h.history_steps, h.history))
    keep = st >= (steps - (tail or len(st)))
    return int(np.sum(hist["clipped"][keep])), int(np.sum(hist["skipped"][keep]))


def run_mlp(s: Strategy, seed: int = 0, *, epochs: int = 50, lr: float = 0.07,
            momentum: float = 0.8, batch_size: int = 128, recorder: Any = None) -> Result:
    X, y = mlp_data()
    params = mlp_params(seed)
    rng = np.random.default_rng(seed)

    def batches(epoch: int):
        perm = rng.permutation(len(X))
        for i in range(0, len(X), batch_size):
            idx = perm[i:i + batch_size]
            yield jnp.asarray(X[idx]), jnp.asarray(y[idx])

    def loss_fn(p, xb, yb):
        return jnp.mean((mlp_apply(p, xb) - yb) ** 2)

    Xj, yj = jnp.asarray(X), jnp.asarray(y)
    losses, c, k, n = _train(params, optimizer(s, lr, momentum), loss_fn, batches, epochs,
                             lambda p: float(loss_fn(p, Xj, yj)), recorder)
    return _result("seed MLP (JAX)", s, seed, losses, c, k, n)


# -- the adding problem ----------------------------------------------------------------------
def adding_batch(rng: np.random.Generator, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    vals = rng.uniform(0, 1, (n, length)).astype(np.float32)
    marks = np.zeros((n, length), np.float32)
    for i in range(n):
        a = rng.integers(0, length // 2)
        b = rng.integers(length // 2, length)
        marks[i, a] = marks[i, b] = 1.0
    x = np.stack([vals, marks], axis=-1)
    return x, np.sum(vals * marks, axis=1, keepdims=True)


def rnn_params(seed: int, hidden: int = 32) -> dict[str, Any]:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"cell": {"w_in": jax.random.normal(k1, (2, hidden)) * 0.5,
                     "w_rec": jax.random.normal(k2, (hidden, hidden)) * (1.0 / math.sqrt(hidden)),
                     "bias": jnp.zeros(hidden)},
            "out": {"kernel": jax.random.normal(k3, (hidden, 1)) * 0.1, "bias": jnp.zeros(1)}}


def rnn_apply(p: dict[str, Any], x: jax.Array) -> jax.Array:
    c = p["cell"]

    def cell(h, xt):
        return jnp.tanh(xt @ c["w_in"] + h @ c["w_rec"] + c["bias"]), None

    h0 = jnp.zeros((x.shape[0], c["bias"].shape[0]))
    h, _ = jax.lax.scan(cell, h0, jnp.swapaxes(x, 0, 1))
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def run_rnn(s: Strategy, seed: int = 0, *, steps: int = 300, length: int = 30,
            lr: float = 0.5, momentum: float = 0.9, batch_size: int = 32,
            recorder: Any = None) -> Result:
    rng = np.random.default_rng(seed)
    test_x, test_y = adding_batch(np.random.default_rng(10_000 + seed), 256, length)
    per_epoch = 50

    def batches(epoch: int):
        for _ in range(per_epoch):
            xb, yb = adding_batch(rng, batch_size, length)
            yield jnp.asarray(xb), jnp.asarray(yb)

    def loss_fn(p, xb, yb):
        return jnp.mean((rnn_apply(p, xb) - yb) ** 2)

    tx, ty = jnp.asarray(test_x), jnp.asarray(test_y)
    losses, c, k, n = _train(rnn_params(seed), optimizer(s, lr, momentum), loss_fn, batches,
                             max(1, steps // per_epoch), lambda p: float(loss_fn(p, tx, ty)),
                             recorder)
    return _result(f"adding problem T={length} (JAX RNN)", s, seed, losses, c, k, n)


def _result(exp: str, s: Strategy, seed: int, losses: list[float], c: int, k: int,
            n: int) -> Result:
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    return Result(exp, s.name, seed, losses[-1] if losses else math.nan, bad, c, k, n, losses)


def run_demo(*, seeds: int = 3, tiny: bool = False, names: list[str] | None = None,
             only: list[str] | None = None, run_dir: Any = None) -> list[Result]:
    """Every experiment x strategy x seed; ``tiny``: a seconds-long version. ``run_dir``:
    write a run folder per clipped run (``{run_dir}/jax-{exp}-{strategy}-s{seed}``, replaced
    when it exists) through ``ggo.Recorder``."""
    from pathlib import Path

    chosen = [strategy(n) for n in names] if names else STRATEGIES
    exps = only or ["mlp", "rnn"]
    for exp in exps:
        if exp not in ("mlp", "rnn"):
            raise ValueError(f"no JAX experiment named {exp!r}; choose mlp or rnn")
    out = []
    for exp in exps:
        for s in chosen:
            for seed in range(seeds):
                rec = None
                if run_dir is not None and s.make(0.1, 0.9) is not None:
                    slug = s.name.replace(" ", "_").replace("(", "").replace(")", "")
                    params = mlp_params(seed) if exp == "mlp" else rnn_params(seed)
                    rec = ggo.Recorder(Path(run_dir) / f"jax-{exp}-{slug}-s{seed}", params,
                                       mode="overwrite", config={"experiment": exp,
                                                                 "strategy": s.name})
                if exp == "mlp":
                    out.append(run_mlp(s, seed, epochs=5 if tiny else 50, recorder=rec))
                else:
                    out.append(run_rnn(s, seed, steps=100 if tiny else 600, recorder=rec))
    return out


def markdown(results: list[Result]) -> str:
    """One row per experiment and strategy: final loss (mean over finite seeds), non-finite
    seeds, share of clipped and skipped steps."""
    rows = ["| experiment | strategy | final loss | non-finite seeds | clipped | skipped |",
            "| --- | --- | --- | --- | --- | --- |"]
    keys: list[tuple[str, str]] = []
    for r in results:
        if (r.experiment, r.strategy) not in keys:
            keys.append((r.experiment, r.strategy))
    for e, s in keys:
        rs = [r for r in results if r.experiment == e and r.strategy == s]
        fin = [r.final_loss for r in rs if math.isfinite(r.final_loss)]
        loss = f"{np.mean(fin):.4g}" if fin else "NaN"
        nonfin = sum(1 for r in rs if not math.isfinite(r.final_loss))
        n = sum(r.steps for r in rs) or 1
        rows.append(f"| {e} | {s} | {loss} | {nonfin}/{len(rs)} | "
                    f"{100 * sum(r.clipped_steps for r in rs) / n:.0f}% | "
                    f"{sum(r.skipped_steps for r in rs)} |")
    return "\n".join(rows)


def demo(args: Any) -> int:
    """``gradguard demo --framework jax``: uses ``--seeds``, ``--tiny``, ``--only mlp rnn``,
    ``--strategies``, ``--runs-dir`` / ``--no-runs``; prints the markdown table."""
    import sys

    try:
        rows = run_demo(seeds=args.seeds, tiny=args.tiny, names=args.strategies,
                        only=args.only, run_dir=None if args.no_runs else args.runs_dir)
    except ValueError as exc:
        print(f"gradguard demo: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(rows))
    if not args.no_runs:
        print(f"run folders under {args.runs_dir}/ (gradguard report {args.runs_dir}/jax-*)")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", nargs="+")
    ap.add_argument("--strategies", nargs="+")
    ap.add_argument("--cases", action="store_true",
                    help="print docs/optax.md's table of gradguard.optax against optax")
    ap.add_argument("--mesh-cases", action="store_true",
                    help="print its shard_map rows (2 forced host devices)")
    a = ap.parse_args(argv)
    if a.mesh_cases:
        # read when the CPU backend starts (at the first array), not at import
        import os

        flag = "--xla_force_host_platform_device_count=2"
        if flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
        print(cases_markdown(mesh=True))
        return 0
    if a.cases:
        print(cases_markdown())
        return 0
    print(markdown(run_demo(seeds=a.seeds, tiny=a.tiny, names=a.strategies, only=a.only)))
    return 0



# -- gradguard.optax against optax's own transforms (docs/optax.md's table) ------------------
def _fmt(x: Any) -> str:
    a = np.asarray(x, np.float64).ravel()
    return "[" + ", ".join(f"{v:.4g}" for v in a) + "]" if a.size > 1 else f"{float(a[0]):.4g}"


def _finite_trees(n: int = 20) -> list[tuple[dict, dict]]:
    """``n`` random (params, grads) pairs of a fixed structure, float32, norms from 1e-3 to 1e3."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        scale = 10.0 ** rng.uniform(-3, 3)
        p = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}
        g = {k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in p.items()}
        out.append((p, g))
    return out


def _max_rel(a: Any, b: Any) -> float:
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-30), initial=0)))
    return worst


def _agreement(worst: float) -> str:
    return "same to 1e-6 (relative)" if worst <= 1e-6 else f"max relative difference {worst:.3g}"


def _torch_parity() -> float:
    """Largest relative difference of the per-step thresholds and coefficients of
    ``ggo.autoclip`` / ``ggo.zclip`` / ``ggo.clip_by_global_norm(formula="torch")`` from the
    torch clippers ``gg.AutoClip`` / ``gg.ZClip`` / ``gg.NormClip`` on one norm sequence
    (a spike, a NaN step and an Inf step included)."""
    import torch

    import gradguard as gg

    rng = np.random.default_rng(7)
    norms = list(np.exp(rng.normal(0.0, 0.3, 40)).astype(np.float32))
    norms[20], norms[25], norms[30] = np.float32(40.0), np.float32(np.nan), np.float32(np.inf)
    pairs = [(gg.AutoClip(10.0), ggo.autoclip(10.0)), (gg.ZClip(warmup_steps=5), ggo.zclip(warmup_steps=5)),
             (gg.NormClip(1.0), ggo.clip_by_global_norm(1.0, formula="torch"))]
    worst = 0.0
    for clipper, tx in pairs:
        param = torch.nn.Parameter(torch.zeros(1))
        params = {"w": jnp.zeros(1)}
        state, step = tx.init(params), jax.jit(tx.update)
        for g in norms:
            param.grad = torch.tensor([float(g)])
            st = clipper([param])
            _, state = step({"w": jnp.array([g], jnp.float32)}, state, params)
            for t, j in ((float(st.threshold), float(state.threshold)),
                         (float(st.clip_coef), float(state.clip_coef))):
                if math.isfinite(t) or math.isfinite(j):
                    worst = max(worst, abs(t - j) / max(abs(t), 1e-30))
    return worst


def optax_cases() -> list[tuple[str, str, str]]:
    """``(case, optax, gradguard.optax)``: what each does on the cases of docs/optax.md,
    measured now (jax and optax as installed)."""
    rows = []
    # finite input: the same numbers as optax's own transforms
    pairs = _finite_trees()
    for name, ours, ref, needs_params in (
            ("clip_by_global_norm(1.0)", ggo.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0), False),
            ("clip_by_value(0.5) / optax.clip(0.5)", ggo.clip_by_value(0.5), optax.clip(0.5), False),
            ("agc(0.01) / adaptive_grad_clip(0.01)", ggo.agc(0.01), optax.adaptive_grad_clip(0.01), True)):
        both = jax.jit(lambda p, g, ours=ours, ref=ref, n=needs_params: (
            ours.update(g, ours.init(p), p if n else None)[0],
            ref.update(g, ref.init(p), p if n else None)[0]))
        worst = max(_max_rel(*both(p, g)) for p, g in pairs)
        rows.append((f"finite input, {len(pairs)} random pytrees (norms 1e-3 to 1e3): {name}",
                     "reference", _agreement(worst)))
    f16 = {"a": jnp.full((4,), 300.0, jnp.float16), "b": jnp.ones((3,), jnp.float32)}
    o, _ = optax.clip_by_global_norm(1.0).update(f16, optax.EmptyState())
    tx = ggo.clip_by_global_norm(1.0)
    g, s = tx.update(f16, tx.init(f16))
    rows.append(("float16 leaf of four 300s + float32 ones(3), clip 1.0: norm; float32 leaf",
                 f"norm {_fmt(optax.tree.norm(f16))}; b = {_fmt(o['b'])}",
                 f"norm {_fmt(s.total_norm)}; b = {_fmt(g['b'])}"))
    bf = {"a": jnp.full((1024,), 3.0e19, jnp.bfloat16)}
    rows.append(("bfloat16 leaf of 1024 x 3e19: norm (true 9.6e20)", _fmt(optax.tree.norm(bf)),
                 _fmt(ggo.tree_norms(bf).total)))
    tiny = {"a": jnp.full((4,), 1e-30, jnp.float32)}
    rows.append(("float32 leaf of four 1e-30: norm (true 2e-30)", _fmt(optax.tree.norm(tiny)),
                 _fmt(ggo.tree_norms(tiny).total)))
    for name, bad in (("NaN", jnp.nan), ("Inf", jnp.inf)):
        t = {"a": jnp.array([1.0, bad]), "b": jnp.full((2,), 5.0)}
        o, _ = optax.clip_by_global_norm(1.0).update(t, optax.EmptyState())
        g, s = tx.update(t, tx.init(t))
        rows.append((f"leaf [1, {name}] + leaf [5, 5], clip 1.0: a; b",
                     f"a = {_fmt(o['a'])}; b = {_fmt(o['b'])}",
                     f"a = {_fmt(g['a'])}; b = {_fmt(g['b'])} (unchanged, nonfinite={bool(s.nonfinite)})"))
    z = {"a": jnp.zeros(3)}
    o, _ = optax.clip_by_global_norm(0.0).update(z, optax.EmptyState())
    t0 = ggo.clip_by_global_norm(0.0)
    rows.append(("clip_by_global_norm(0.0) on zero gradients", _fmt(o["a"]),
                 _fmt(t0.update(z, t0.init(z))[0]["a"])))
    g35 = {"w": jnp.array([3.0, 4.0])}
    o_state = optax.clip_by_global_norm(1.0).init(g35)
    _, s = tx.update(g35, tx.init(g35))
    rows.append(("global norm of [3, 4] read from the clipper's state (optax #326)",
                 f"not in the state ({type(o_state).__name__})",
                 f"state.total_norm = {_fmt(s.total_norm)}, clip_coef = {_fmt(s.clip_coef)}"))
    # a NaN streak: apply_if_finite(max_consecutive_errors=2) vs skip_nonfinite
    bad = {"w": jnp.array([1.0, jnp.nan, 1.0])}
    p0 = {"w": jnp.array([1.0, -0.0, 2.0])}
    ref = optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=2)
    ours = ggo.skip_nonfinite(optax.adam(0.1))
    out, applied = [], []
    for opt in (ref, ours):
        p, st, step = p0, opt.init(p0), jax.jit(opt.update)
        n = 0
        for _ in range(6):
            u, st = step(bad, st, p)
            n += int(not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u)))
            p = optax.apply_updates(p, u)
        out.append(p["w"])
        applied.append(n)
    rows.append(("6 NaN steps in a row, params [1, -0, 2] (apply_if_finite max 2 / "
                 "skip_nonfinite): params; NaN updates applied",
                 _fmt(out[0]) + f", signbit of -0: {bool(np.signbit(np.asarray(out[0])[1]))}; "
                 f"{applied[0]} of 6 (the count is not reset after giving up, PR #1746)",
                 _fmt(out[1]) + f", signbit of -0: {bool(np.signbit(np.asarray(out[1])[1]))}; "
                 f"{applied[1]} of 6"))
    # MultiSteps: a NaN micro-batch
    out = []
    for skip_fn in (None, ggo.skip_microstep()):
        ms = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2, should_skip_update_fn=skip_fn)
        p = {"w": jnp.zeros(2)}
        st = ms.init(p)
        for gr in ([1.0, 1.0], [jnp.nan, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]):
            u, st = ms.update({"w": jnp.array(gr)}, st, p)
            p = optax.apply_updates(p, u)
        out.append(p["w"])
    rows.append(("MultiSteps(sgd(1), k=2), micro-batches 1, NaN, 1, 1, 1: params "
                 "(plain / should_skip_update_fn=ggo.skip_microstep())", _fmt(out[0]),
                 _fmt(out[1])))
    # MultiSteps: where the spike decision is made
    calls = [0]

    def counting(u: Any, step: Any, params: Any) -> Any:
        calls[0] += 1
        return optax.skip_large_updates(u, step, params, max_squared_norm=10.0)

    micro = ([1.0, 1.0], [5.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0])
    ms = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2, should_skip_update_fn=counting)
    p = {"w": jnp.zeros(2)}
    st = ms.init(p)
    calls[0] = 0
    for gr in micro:
        _, st = ms.update({"w": jnp.array(gr)}, st, p)
    ms2 = optax.MultiSteps(ggo.spike_skip(optax.sgd(1.0), threshold=6.0, window=8),
                           every_k_schedule=2, should_skip_update_fn=ggo.skip_microstep())
    st2, step2 = ms2.init(p), jax.jit(ms2.update)
    for gr in micro:
        _, st2 = step2({"w": jnp.array(gr)}, st2, p)
    rows.append(("MultiSteps(k=2), 6 micro-batches, one of norm^2 25: spike decisions; real "
                 "steps (should_skip_update_fn=skip_large_updates(max 10) / ggo.spike_skip "
                 "inside MultiSteps)",
                 f"{calls[0]} (one per micro-batch); {int(st.gradient_step)} (the large "
                 "micro-batch is dropped: the window stretches)",
                 f"{int(st2.inner_opt_state.guard_steps)} (one per real step, on the mean "
                 f"gradient); {int(st2.gradient_step)}"))
    sk, info = optax.skip_large_updates({"w": jnp.array([3.0, 4.0])}, 0, None, max_squared_norm=10.0)
    rows.append(("skip_large_updates(norm^2 = 25, max 10): should_skip (its docstring: "
                 "'True if ... small enough')", str(bool(sk)), "n/a (spike_skip decides on "
                 "mean + k std of accepted norms)"))
    rows.append(("adaptive clipping (AutoClip, ZClip, threshold-free): per-step thresholds and "
                 "coefficients against the torch clippers, 40 norms with a spike, a NaN and an Inf",
                 "none in optax", f"ggo.autoclip / zclip / clip_by_global_norm(formula='torch') "
                 f"vs gg.AutoClip / ZClip / NormClip: {_agreement(_torch_parity())}"))
    # jit: no host callback in the traced update
    chain_o = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), 2)
    chain_g = ggo.history(ggo.spike_skip(optax.chain(ggo.auto(), optax.adam(1e-3))), length=8)
    pj = {"w": jnp.ones((2, 2))}
    n_cb = []
    for t in (chain_o, chain_g):
        t = optax.with_extra_args_support(t)
        jaxpr = str(jax.make_jaxpr(lambda u, s, p, t=t: t.update(u, s, p, value=jnp.float32(1.0)))(
            pj, t.init(pj), pj))
        n_cb.append(jaxpr.count("callback"))
    rows.append(("jit: host callbacks in jax.make_jaxpr of the update (apply_if_finite(chain("
                 "clip_by_global_norm, adam)) / history(spike_skip(chain(auto(), adam))))",
                 str(n_cb[0]), str(n_cb[1])))
    # resume: pickle the state mid-run, restore, continue
    exact = []
    for t in (optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)), 2),
              ggo.skip_nonfinite(optax.chain(ggo.zclip(warmup_steps=3), optax.adam(1e-2)))):
        exact.append(_resume_is_bit_exact(t))
    rows.append(("checkpoint (pickle of jax.device_get(state)) after 5 of 10 steps, one NaN "
                 "step, resumed: bit-identical to the uninterrupted run (apply_if_finite(chain("
                 "clip_by_global_norm, adam)) / skip_nonfinite(chain(zclip, adam)))",
                 str(exact[0]), str(exact[1])))
    return rows


def _resume_is_bit_exact(tx: Any) -> bool:
    import pickle

    rng = np.random.default_rng(2)
    grads = [{"w": jnp.asarray(rng.normal(size=4) * 3, jnp.float32)} for _ in range(10)]
    grads[3] = {"w": grads[3]["w"].at[1].set(jnp.nan)}
    step = jax.jit(tx.update)

    def run(p: Any, s: Any, gs: list) -> Any:
        for g in gs:
            u, s = step(g, s, p)
            p = optax.apply_updates(p, u)
        return p, s

    p0 = {"w": jnp.ones(4)}
    full = run(p0, tx.init(p0), grads)
    half = pickle.loads(pickle.dumps(jax.device_get(run(p0, tx.init(p0), grads[:5]))))
    resumed = run(*jax.tree.map(jnp.asarray, half), grads[5:])
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(resumed)] == \
        [np.asarray(x).tobytes() for x in jax.tree.leaves(full)]


def mesh_cases() -> list[tuple[str, str, str]]:
    """Rows of docs/optax.md's table measured under ``shard_map`` over 2 devices (needs
    ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` set before jax is imported)."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < 2:
        raise RuntimeError("mesh_cases needs 2 devices: set XLA_FLAGS="
                           "--xla_force_host_platform_device_count=2 before importing jax")
    mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
    params = {"w": jnp.zeros(4)}

    def sharded(tx: Any, g: Any) -> Any:
        s = tx.init(params)
        sspec = jax.tree.map(lambda x: P("d") if tuple(x.shape) == (4,) else P(), s)
        f = jax.jit(jax.shard_map(lambda g, s, p: tx.update(g, s, p), mesh=mesh,
                                  in_specs=({"w": P("d")}, sspec, {"w": P("d")}),
                                  out_specs=({"w": P("d")}, sspec)))
        try:
            return f(g, s, params)[0]["w"]
        except Exception as exc:  # noqa: BLE001 - the refusal is the measurement
            why = " (its state differs per device)" if "replication" in str(exc) else ""
            return f"refused by shard_map: {type(exc).__name__}{why}"

    rows = []
    g = {"w": jnp.array([3.0, 0.0, 0.0, 4.0])}  # device 0 holds [3, 0], device 1 [0, 4]
    rows.append(("shard_map, leaf [3, 0, 0, 4] sharded over 2 devices ([3, 0] and [0, 4]), clip 1.0 "
                 "(optax.clip_by_global_norm / ggo.clip_by_global_norm(axis_name='d')): updates",
                 _fmt(sharded(optax.clip_by_global_norm(1.0), g)) + " (each shard by its own norm)",
                 _fmt(sharded(ggo.clip_by_global_norm(1.0, axis_name="d"), g))))
    bad = {"w": jnp.array([1.0, 1.0, jnp.nan, 1.0])}  # the NaN lives on device 1
    rows.append(("shard_map, NaN on device 1 only (apply_if_finite(sgd(1)) / "
                 "skip_nonfinite(sgd(1), axis_name='d')): updates",
                 _res(sharded(optax.apply_if_finite(optax.sgd(1.0), 2), bad)),
                 _fmt(sharded(ggo.skip_nonfinite(optax.sgd(1.0), axis_name="d"), bad)) +
                 " (refused on both devices)"))
    out = []
    for skip_fn in (optax.skip_not_finite, ggo.skip_microstep("d")):
        ms = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2, should_skip_update_fn=skip_fn)
        out.append(_res(sharded(ms, bad)))
    rows.append(("shard_map, MultiSteps(sgd(1), k=2), NaN micro-batch on device 1 only "
                 "(should_skip_update_fn=optax.skip_not_finite / ggo.skip_microstep('d')): "
                 "updates", out[0], out[1] + " (dropped on both devices)"))
    return rows


def _res(x: Any) -> str:
    return x if isinstance(x, str) else _fmt(x)


def cases_markdown(mesh: bool = False) -> str:
    """docs/optax.md's table; ``mesh``: the rows measured on 2 devices (``mesh_cases``)."""
    lines = ["| case | optax " + optax.__version__ + " | gradguard.optax |", "| --- | --- | --- |"]
    lines += [f"| {c} | {o} | {g} |" for c, o, g in (mesh_cases() if mesh else optax_cases())]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
