"""Adaptive clippers: per-step cost that does not grow with steps, and the default-rule table.

    python benchmarks/adaptive_bench.py cost            # step 100 vs step 100 000, per rule
    python benchmarks/adaptive_bench.py table [--quick] [--task NAME]  # default vs grid and peers

``cost`` times the clipper's own work (norms given; ``clip_`` + ``observe`` and, for SpikeSkip,
``check`` + ``observe``) on a small model's gradients, after 100 steps and again after 100 000
steps, and prints the ratio (target <= 1.1); see ``cost`` for the method. ``table`` trains
every task of the experiment suite with each strategy for 3 seeds and prints the final losses
as the markdown tables of ``docs/adaptive.md``. On the Adam LSTM task the loss is the mean test
CE over the evaluations after each step of the last epoch, and a second table gives the test CE
after the last step alone (the older, noisier metric) from the same runs.

    python benchmarks/adaptive_bench.py table --task Adam --seeds 5 --first-seed 3  # seeds 3-7
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace

import torch

import gradguard as gg
from gradguard.norms import compute_norms


# -- cost -----------------------------------------------------------------------------------
def _rules():
    return {
        "AutoClip (full history)": lambda: gg.AutoClip(10.0),
        "AutoClip (window 1000)": lambda: gg.AutoClip(10.0, window=1000),
        "ZClip": lambda: gg.ZClip(),
        "OvershootClip (momentum SGD)": lambda: gg.OvershootClip(),
        "OvershootClip (plain SGD: trust)": lambda: gg.OvershootClip(),
        "OvershootClip (Adam: level)": lambda: gg.OvershootClip(),
        "SpikeSkip": lambda: gg.SpikeSkip(),
    }


def _run_steps(rule, params, grads, norms, n: int) -> float:
    """Run ``n`` steps of the rule's own work; seconds per step."""
    accept = torch.ones((), dtype=torch.bool)
    skip_rule = isinstance(rule, gg.SpikeSkip)
    t0 = time.perf_counter()
    for _ in range(n):
        if skip_rule:
            s = rule.check(norms.total, None)
            rule.observe(norms.total, None, ~s)
        else:
            rule.clip_(params, grads, norms, apply=False)
            rule.observe(norms, accept)
    return (time.perf_counter() - t0) / n


def cost(reps: int = 300, rounds: int = 7, far: int = 100_000) -> list[tuple[str, float, float]]:
    """Per-step cost of each rule at step 100 and at step ``far``.

    Both states are reached by running the rule for real (100 and ``far`` steps on a small
    model's gradients, whose norm is jittered so the statistics move). Then, to cancel the
    load of a shared machine, the two are timed in alternation, ``rounds`` times ``reps``
    steps each, each round starting again from the saved state; the minimum is reported.
    """
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(16, 64)).pow(2).mean().backward()
    opt.step()  # momentum buffers exist
    others = {"trust": torch.optim.SGD(model.parameters(), lr=0.01),
              "level": torch.optim.Adam(model.parameters(), lr=0.01)}
    params = list(model.parameters())
    grads = [p.grad for p in params]
    base = compute_norms(grads)
    jitter = [compute_norms([g * (1.0 + 0.5 * math.sin(i)) for g in grads]) for i in range(16)]
    rows = []
    for name, make in _rules().items():
        states = {}
        for label, steps in (("early", 100), ("late", far)):
            rule = make()
            if hasattr(rule, "bind_optimizer"):
                kind = next((k for k in others if k in name), None)
                rule.bind_optimizer(others[kind] if kind else opt)
            done = 0
            while done < steps:
                n = min(1000, steps - done)
                _run_steps(rule, params, grads, jitter[(done // 1000) % 16], n)
                done += n
            states[label] = (rule, copy.deepcopy(rule.state_dict()))
        best = {"early": math.inf, "late": math.inf}
        for _ in range(rounds):
            for label, (rule, sd) in states.items():
                rule.load_state_dict(copy.deepcopy(sd))
                best[label] = min(best[label], _run_steps(rule, params, grads, base, reps))
        rows.append((name, best["early"], best["late"]))
        print(f"{name:30s} step 100: {best['early'] * 1e6:8.1f} us   step {far}: "
              f"{best['late'] * 1e6:8.1f} us   ratio {best['late'] / best['early']:5.2f}",
              flush=True)
    return rows


# -- table ----------------------------------------------------------------------------------
GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


class Jitter(gg.Clipper):
    """No clipping, but every gradient element multiplied by (1 + 0.01 N(0, 1)): a change far
    below minibatch noise. Its row shows how far the final loss moves for reasons that have
    nothing to do with clipping (the noise floor of the comparison)."""

    def __init__(self, rel: float = 0.01):
        self.rel = rel
        self.gen = torch.Generator().manual_seed(123)

    def clip_(self, params, grads, norms, *, apply=True, propagate_nonfinite=False):
        from gradguard.clippers import ClipStats

        for g in grads:
            g.mul_(1.0 + self.rel * torch.randn(g.shape, generator=self.gen).to(g))
        one = torch.ones((), dtype=torch.float32, device=norms.total.device)
        return ClipStats(norms.total, one, one < 0, norms.nonfinite, norms.per_tensor)


#: the default's opt-in variant for adaptive optimizers; differs only where Adam is used
VARIANT_ADAM = "*(variant: OvershootClip(optimizer_scale=True))*"
ONLY_ON = {VARIANT_ADAM: "Adam"}


def _strategies(only: str | None = None):
    from gradguard.experiments.strategies import Strategy

    rows = [Strategy(f"global norm {c:g}", (lambda c=c: gg.NormClip(c))) for c in GRID]
    rows += [
        Strategy("default (OvershootClip)", lambda: gg.OvershootClip()),
        Strategy(VARIANT_ADAM, lambda: gg.OvershootClip(optimizer_scale=True)),
        Strategy("ZClip (no cap)", lambda: gg.ZClip()),
        Strategy("AutoClip p10", lambda: gg.AutoClip(10.0)),
        Strategy("AGC 0.01", lambda: gg.AGC(0.01)),
        Strategy("none", lambda: None, on_nonfinite="propagate"),
        Strategy("noise floor: none + 1% gradient jitter", lambda: Jitter(0.01),
                 on_nonfinite="propagate"),
    ]
    if only is not None:
        wanted = [w.strip().lower() for w in only.split("|")]
        keep = [r for r in rows if any(w in r.name.lower() for w in wanted)]
        # the grid is always run: the ratios are to its best value
        rows = [r for r in rows if r.name.startswith("global norm")] + [
            r for r in keep if not r.name.startswith("global norm")]
    return rows


def _pascanu_run(strategy, seed: int, steps: int, task: str = "adding", length: int = 10,
                 lr: float | None = None):
    """A Pascanu et al. task with the suite's model and optimizer (tanh RNN 50, basic init, SGD
    lr 0.01, batch 20), a fixed budget of ``steps``; the loss is the task's own loss (adding:
    MSE, temporal order: cross-entropy) on 1000 fixed held-out sequences after the last step
    (not the suite's stop-when-solved run: every strategy trains for the same steps)."""
    from gradguard.experiments import pascanu
    from gradguard.experiments.loop import train

    cfg = pascanu.PascanuConfig(task=task, length=length)
    if lr is not None:
        cfg = replace(cfg, lr=lr)
    torch.manual_seed(seed)
    n_in, n_out = (6, 4) if task == "temporal" else (2, 1)
    model = pascanu.TanhRNN(n_in, n_out, cfg.hidden, cfg.init)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    guard = strategy.guard(model)
    gen = torch.Generator().manual_seed(10_000 + seed)
    xe, ye = pascanu.generate(task, 1000, length, torch.Generator().manual_seed(99))
    loss_fn = torch.nn.CrossEntropyLoss() if task == "temporal" else torch.nn.MSELoss()
    per_epoch = 100

    def batches(epoch: int):
        for _ in range(per_epoch):
            yield pascanu.generate(task, cfg.batch_size, length, gen)

    def evaluate() -> float:
        with torch.no_grad():
            return float(loss_fn(model(xe), ye))

    return train(model, batches, loss_fn, opt, guard, steps // per_epoch, evaluate=evaluate)


#: the two tasks' budgets (steps); one run takes about 6 s (temporal) and 25-30 s (char LM)
#: on one core
TEMPORAL_STEPS, TEMPORAL_LENGTH = 3000, 20
CHARLM_STEPS = 2000
#: plain SGD at large learning rates (issue 14): the char tanh-RNN LM, and the Pascanu tasks at
#: an lr where the unclipped run fails ((task, length, lr, steps))
RNN_LM_LRS, RNN_LM_STEPS = (3.0, 10.0), 300
PASCANU_BIG = (("temporal", 20, 0.2, 2000),)
#: AdamW with a short warmup on a small transformer
TRANSFORMER_LR, TRANSFORMER_STEPS = 0.01, 300


def _tasks(quick: bool, extra: bool = False):
    from gradguard.experiments import charlm, seed_mlp, seq_lstm

    # each returns (History, the test loss after the last step when the table's loss is a
    # mean over the last epoch, else None)
    def mlp(s, seed):
        return seed_mlp.run(s, seed).history, None

    def lstm(s, seed):
        # Adam at lr 0.01 ends bouncing: the loss is the mean test CE over evaluations after
        # each step of the last epoch (15 steps); the single point after the last step is kept
        cfg = seq_lstm.LSTMConfig(epochs=2 if quick else 5)
        cfg = replace(cfg, tail_evals=cfg.total_steps() // cfg.epochs)
        r = seq_lstm.run(s, seed, cfg)
        return r.history, r.extra.get("final_point_loss", math.nan)

    def lstm_sgd(s, seed):
        cfg = seq_lstm.LSTMConfig(epochs=5 if quick else 20, optimizer="sgd")
        return seq_lstm.run(s, seed, cfg).history, None

    def adding(s, seed):
        return _pascanu_run(s, seed, 500 if quick else 2000), None

    def temporal(s, seed):
        # results.md section 3's configuration (T = 20, 3000 steps, plain SGD lr 0.01)
        steps = 500 if quick else TEMPORAL_STEPS
        return _pascanu_run(s, seed, steps, "temporal", TEMPORAL_LENGTH), None

    def charlm_task(s, seed):
        # the suite's model and lr 10 (results.md section 4), 2000 of its 3000 steps
        cfg = replace(charlm.CharLMConfig(), steps=100 if quick else CHARLM_STEPS)
        return charlm.run(s, seed, cfg).history, None

    def lstm_cosine(s, seed):
        # not a task of the criterion: the Adam task run to convergence (10 epochs, lr decayed
        # to 0 along a cosine), to see which strategies win once the noise has settled
        cfg = seq_lstm.LSTMConfig(epochs=10, lr_schedule="cosine")
        cfg = replace(cfg, tail_evals=cfg.total_steps() // cfg.epochs)
        r = seq_lstm.run(s, seed, cfg)
        return r.history, r.extra.get("final_point_loss", math.nan)

    def rnn_lm(lr):
        def task(s, seed):
            r = charlm.run(s, seed, charlm.CharLMConfig.rnn(lr, 100 if quick else RNN_LM_STEPS))
            return r.history, None, r.value
        return task

    def pascanu_big(name, length, lr, steps):
        def task(s, seed):
            return _pascanu_run(s, seed, 300 if quick else steps, name, length, lr), None
        return task

    def transformer(s, seed):
        cfg = charlm.CharLMConfig.transformer(TRANSFORMER_LR, 100 if quick else TRANSFORMER_STEPS)
        r = charlm.run(s, seed, cfg)
        return r.history, None, r.value

    def spikes(optimizer, lr):
        def task(s, seed):
            from gradguard.experiments import spikes as sp

            cfg = sp.SpikeConfig(optimizer=optimizer, lr=lr, epochs=3 if quick else 10)
            return sp.run(s, seed, cfg).history, None
        return task

    if extra:
        return {"LSTM digits, Adam, 10 epochs cosine lr (test CE, mean over the last epoch)":
                lstm_cosine}
    return {"seed MLP (train MSE)": mlp,
            "LSTM digits, Adam (test CE, mean over the last epoch)": lstm,
            "LSTM digits, SGD momentum 0.9 (test CE)": lstm_sgd,
            "RNN adding (test MSE)": adding,
            f"RNN temporal order T={TEMPORAL_LENGTH} (test CE)": temporal,
            "char LSTM LM, SGD lr 10 (held-out CE, nats/char)": charlm_task,
            **{f"char tanh-RNN LM, plain SGD lr {lr:g} (train CE, mean of the last 50 steps)":
               rnn_lm(lr) for lr in RNN_LM_LRS},
            **{f"RNN {name} T={n}, plain SGD lr {lr:g} (test {'CE' if name == 'temporal' else 'MSE'})":
               pascanu_big(name, n, lr, steps) for name, n, lr, steps in PASCANU_BIG},
            f"char transformer LM, AdamW peak lr {TRANSFORMER_LR:g}, warmup (train CE, mean of "
            "the last 50 steps)": transformer,
            "digits MLP with bad batches, SGD momentum 0.9 (test CE, mean over the last epoch)":
                spikes("sgd", 0.05),
            "digits MLP with bad batches, Adam (test CE, mean over the last epoch)":
                spikes("adam", 0.003)}


def _select(tasks: dict, only: str | None) -> dict:
    if only is None:
        return tasks
    wanted = [w.strip().lower() for w in only.split("|")]
    picked = {k: v for k, v in tasks.items() if any(w in k.lower() for w in wanted)}
    if not picked:
        raise SystemExit(f"no task matches {only!r}; tasks: {list(tasks)}")
    return picked


#: tasks solved to a loss far below what the evaluation resolves: in the ratios a loss under
#: the floor counts as the floor, for every row alike (temporal order at lr 0.2: a CE of 3e-4
#: against 5e-4 on 1000 held-out sequences is two solved runs, not a 1.6x gap)
RESOLUTION = {"plain SGD lr 0.2": 0.01}


def _print_table(title: str, res: dict[str, list[float]], seeds: list[int]) -> None:
    n = len(seeds)
    floor = next((f for k, f in RESOLUTION.items() if k in title), 0.0)
    res_f = {k: [max(v, floor) if math.isfinite(v) else v for v in vals] for k, vals in res.items()}
    best = [min((res_f[f"global norm {c:g}"][i] for c in GRID), key=lambda v: (math.isnan(v), v))
            for i in range(n)]
    print(f"\n### {title}\n")
    if floor:
        print(f"(ratios count a loss below {floor:g} as {floor:g}: solved)\n")
    print("| strategy | " + " | ".join(f"seed {s}" for s in seeds) + " | worst ratio to best grid |")
    print("|---" * (n + 2) + "|")
    for name, vals in res.items():
        ratios = [v / b if math.isfinite(v) else math.inf for v, b in zip(res_f[name], best)]
        cells = " | ".join("diverged" if not math.isfinite(v) else f"{v:.4g}" for v in vals)
        print(f"| {name} | {cells} | {max(ratios):.2f} |")
    raw = [min((res[f"global norm {c:g}"][i] for c in GRID), key=lambda v: (math.isnan(v), v))
           for i in range(n)]
    print("| best of grid | " + " | ".join(f"{b:.4g}" for b in raw) + " | 1.00 |")
    sys.stdout.flush()


def _one(job: tuple[int, int, int]) -> tuple[float, float | None]:
    """One run of the table, by index (so a forked worker rebuilds the closures itself)."""
    torch.set_num_threads(1)
    t, k, seed = job
    fn = list(_JOB["tasks"].values())[t]
    out = fn(_JOB["strategies"][k], seed)
    h, point = out[0], out[1]
    value = out[2] if len(out) > 2 else h.final_loss
    finite = h.first_nonfinite_epoch is None and math.isfinite(value)
    return (value if finite else math.nan,
            None if point is None else (point if finite else math.nan))


_JOB: dict = {}


def table(quick: bool = False, seeds: int = 3, only: str | None = None,
          strategy: str | None = None, first_seed: int = 0, extra: bool = False,
          jobs: int = 1) -> None:
    """Every selected task x strategy x seed; ``jobs`` > 1 runs them in that many forked
    processes of one thread each (the same numbers: each run seeds itself)."""
    torch.set_num_threads(1)
    strategies = _strategies(strategy)
    seed_list = list(range(first_seed, first_seed + seeds))
    tasks = _select(_tasks(quick, extra), only)
    _JOB.update(tasks=tasks, strategies=strategies)
    for task in tasks:
        t = list(tasks).index(task)
        runs = [(t, k, seed) for k, st in enumerate(strategies)
                if not (st.name in ONLY_ON and ONLY_ON[st.name] not in task) for seed in seed_list]
        if jobs > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(jobs) as pool:
                got = pool.map(_one, runs, chunksize=1)
        else:
            got = [_one(r) for r in runs]
        res: dict[str, list[float]] = {}
        points: dict[str, list[float]] = {}
        for (_, k, _), (v, p) in zip(runs, got):
            res.setdefault(strategies[k].name, []).append(v)
            if p is not None:
                points.setdefault(strategies[k].name, []).append(p)
        for name, vals in res.items():
            print(f"  {task} | {name}: {vals}", file=sys.stderr, flush=True)
        _print_table(task, res, seed_list)
        if points:
            _print_table(task.split(" (")[0] + " (test CE after the last step: the single-point "
                         "metric, same runs)", points, seed_list)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--reps", type=int, default=300)
    c.add_argument("--far", type=int, default=100_000)
    t = sub.add_parser("table")
    t.add_argument("--quick", action="store_true")
    t.add_argument("--seeds", type=int, default=3)
    t.add_argument("--first-seed", type=int, default=0,
                   help="seeds first_seed .. first_seed + seeds - 1 (extra-seed validation)")
    t.add_argument("--extra", action="store_true",
                   help="instead of the suite, the extra measurement: the Adam task with 10 "
                        "epochs and a cosine lr decay (not part of the criterion)")
    t.add_argument("--task", default=None, help="only the tasks whose name contains this")
    t.add_argument("--jobs", type=int, default=1,
                   help="processes (one thread each) running the table's runs side by side")
    t.add_argument("--strategy", default=None,
                   help="only the grid and the strategies whose name contains this (or one "
                        "of these, separated by |)")
    args = ap.parse_args(argv)
    if args.cmd == "cost":
        torch.set_num_threads(1)
        rows = cost(args.reps, far=args.far)
        worst = max(late / early for _, early, late in rows)
        print(f"worst ratio {worst:.2f} (target <= 1.1)")
    else:
        table(args.quick, args.seeds, args.task, args.strategy, args.first_seed, args.extra,
              args.jobs)


if __name__ == "__main__":
    main()
