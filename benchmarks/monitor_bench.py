"""Monitor overhead on the GPT-2-small parameter set (CPU or CUDA), and the run store at scale.

    python benchmarks/monitor_bench.py                              # full sizes
    python benchmarks/monitor_bench.py --quick                      # a smoke run
    python3 benchmarks/monitor_bench.py --device cuda --steps 0     # on a GPU, overhead only

On CUDA every timed call is bracketed by ``torch.cuda.synchronize()``: the times are wall
times of host and device work together (what a step costs when the GPU waits for the host).

1. Guard + Monitor (``layer_every=10``, ``flush_every=100``) against Guard alone, both with
   ``NormClip(1.0)`` and a foreach SGD, in one process, the three variants interleaved step
   by step (Guard and Guard + Monitor in alternating order). The clip's own cost is the
   median of ``t(Guard alone) - t(optimizer.step alone)`` over steps; the Monitor's overhead
   the median of ``t(Guard + Monitor) - t(Guard alone)`` of the same step, separately for
   ordinary and layer steps, amortised as ``(9 * ordinary + layer) / 10``; also the time
   spent inside the Monitor's own methods (``before_step`` + ``record``), which other load
   on the machine disturbs less.
2. The run store: ``--steps`` steps (default 1e5) x ``--layers`` layers (default 200) of
   per-layer rows (every step, the worst case) written as Parquet shards of 1000 steps
   through ``RunWriter``, then read with ``load_run``: seconds and bytes on disk.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

import gradguard as gg
from gradguard.monitor.store import LAYERS_SCHEMA, STEPS_SCHEMA, RunWriter, layer_column, load_run


def gpt2_small() -> list[tuple[str, tuple[int, ...]]]:
    """The 148 parameter tensors of GPT-2 small (124,439,808 parameters)."""
    d, vocab, ctx = 768, 50257, 1024
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(12):
        h = f"h.{i}"
        shapes += [(f"{h}.ln_1.weight", (d,)), (f"{h}.ln_1.bias", (d,)),
                   (f"{h}.attn.c_attn.weight", (d, 3 * d)), (f"{h}.attn.c_attn.bias", (3 * d,)),
                   (f"{h}.attn.c_proj.weight", (d, d)), (f"{h}.attn.c_proj.bias", (d,)),
                   (f"{h}.ln_2.weight", (d,)), (f"{h}.ln_2.bias", (d,)),
                   (f"{h}.mlp.c_fc.weight", (d, 4 * d)), (f"{h}.mlp.c_fc.bias", (4 * d,)),
                   (f"{h}.mlp.c_proj.weight", (4 * d, d)), (f"{h}.mlp.c_proj.bias", (d,))]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def bench_overhead(steps: int, tmp: Path, device: str = "cpu") -> dict[str, float]:
    torch.manual_seed(0)
    shapes = gpt2_small()
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for _, s in shapes]
    names = [n for n, _ in shapes]
    grads = [torch.randn(s, device=device) * 1e-3 for _, s in shapes]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n_params = sum(p.numel() for p in params)
    assert len(params) == 148 and n_params == 124_439_808, (len(params), n_params)
    opt = torch.optim.SGD(params, lr=1e-6, foreach=True)
    plain = gg.Guard(list(zip(names, params)), clipper=gg.NormClip(1.0))
    mon = gg.Monitor(tmp / "bench-run", layer_every=10, flush_every=100)
    monitored = gg.Guard(list(zip(names, params)), clipper=gg.NormClip(1.0), monitor=mon)
    loss = torch.tensor(2.0, device=device)

    # time spent inside the Monitor's own methods (robust to other load on the machine)
    inside = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - t0
        return wrapper

    mon.record = timed(mon.record)  # type: ignore[method-assign]
    mon.before_step = timed(mon.before_step)  # type: ignore[method-assign]

    def set_grads():
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    rows: list[dict[str, float]] = []
    for i in range(steps + 2):
        order = ("opt", "plain", "monitored") if i % 2 else ("opt", "monitored", "plain")
        t: dict[str, float] = {}
        layer_step = (monitored.step_count + 1) % 10 == 0
        for key in order:
            set_grads()
            inside[0] = 0.0
            sync()
            t0 = time.perf_counter()
            if key == "opt":
                opt.step()
            elif key == "plain":
                plain.step(opt, loss=loss)
            else:
                monitored.step(opt, loss=loss)
            sync()
            t[key] = time.perf_counter() - t0
            if key == "monitored":
                t["inside"] = inside[0]
        if i >= 2:  # warm-up
            t["layer"] = float(layer_step)
            rows.append(t)
    t0 = time.perf_counter()
    monitored.close()
    t_close = time.perf_counter() - t0

    def med(xs):
        return float(np.median(xs)) if len(xs) else math.nan

    ordinary = [r for r in rows if not r["layer"]]
    layer = [r for r in rows if r["layer"]]
    clip = med([r["plain"] - r["opt"] for r in rows])
    d_ord = med([r["monitored"] - r["plain"] for r in ordinary])
    d_lay = med([r["monitored"] - r["plain"] for r in layer])
    in_ord = med([r["inside"] for r in ordinary])
    in_lay = med([r["inside"] for r in layer])
    out = {"params": n_params, "tensors": len(params), "steps": len(rows), "layer_steps": len(layer),
           "opt_ms": med([r["opt"] for r in rows]) * 1e3,
           "guard_ms": med([r["plain"] for r in rows]) * 1e3,
           "guard_monitor_ms": med([r["monitored"] for r in ordinary]) * 1e3,
           "guard_monitor_layer_ms": med([r["monitored"] for r in layer]) * 1e3,
           "clip_ms": clip * 1e3, "overhead_step_ms": d_ord * 1e3, "overhead_layer_ms": d_lay * 1e3,
           "inside_step_ms": in_ord * 1e3, "inside_layer_ms": in_lay * 1e3, "close_ms": t_close * 1e3}
    out["overhead_ms"] = (9 * d_ord + d_lay) / 10 * 1e3
    out["inside_ms"] = (9 * in_ord + in_lay) / 10 * 1e3
    out["overhead_vs_clip"] = out["overhead_ms"] / out["clip_ms"]
    out["inside_vs_clip"] = out["inside_ms"] / out["clip_ms"]
    return out


def bench_store(n_steps: int, n_layers: int, shard: int, tmp: Path) -> dict[str, float]:
    rng = np.random.default_rng(0)
    path = tmp / "store-run"
    w = RunWriter(path)
    layer_names = [f"blocks.{i // 4}.part{i % 4}" for i in range(n_layers)]
    w.write_meta({"name": "bench", "layers": layer_names, "config": {}, "versions": {},
                  "started": None, "notes": [], "ranks": [0]})
    t_write = 0.0
    for start in range(0, n_steps, shard):
        steps = np.arange(start + 1, min(start + shard, n_steps) + 1, dtype=np.int64)
        n = len(steps)
        st = {"step": steps, "time": np.full(n, 1.7e9), "loss": rng.random(n), "lr": np.full(n, 1e-3),
              "total_norm": rng.random(n), "total_norm_after": rng.random(n),
              "clip_coef": np.ones(n), "threshold": np.ones(n), "clipped": np.zeros(n, bool),
              "skipped": np.zeros(n, bool), "nonfinite": np.zeros(n, bool),
              "loss_scale": np.full(n, np.nan), "rank": np.zeros(n, np.int32),
              "lrs": pa.nulls(n, STEPS_SCHEMA.field("lrs").type)}
        m = n * n_layers
        ly = {"step": np.repeat(steps, n_layers), "layer": layer_column(layer_names, n),
              "grad_norm": rng.random(m, dtype=np.float32),
              "grad_max_abs": rng.random(m, dtype=np.float32),
              "nonfinite_count": np.zeros(m, np.int64),
              "param_norm": rng.random(m, dtype=np.float32),
              "update_ratio": rng.random(m, dtype=np.float32),
              "rank": np.zeros(m, np.int32)}
        t0 = time.perf_counter()
        w.write_shard("steps", pa.table(st, schema=STEPS_SCHEMA))
        w.write_shard("layers", pa.table(ly, schema=LAYERS_SCHEMA))
        w.next_seq()
        t_write += time.perf_counter() - t0
    size = sum(p.stat().st_size for p in path.iterdir())
    t0 = time.perf_counter()
    run = load_run(path)
    t_read = time.perf_counter() - t0
    assert len(run.steps) == n_steps and len(run.layers) == n_steps * n_layers
    return {"steps": n_steps, "layers": n_layers, "layer_rows": n_steps * n_layers,
            "write_s": t_write, "read_s": t_read, "bytes": size,
            "bytes_per_layer_row": size / (n_steps * n_layers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--overhead-steps", type=int, default=100)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.quick:
        a.overhead_steps, a.steps = 10, 5_000
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        o = bench_overhead(a.overhead_steps, tmp, a.device)
        where = (torch.cuda.get_device_name() if a.device.startswith("cuda")
                 else f"{torch.get_num_threads()} threads")
        print(f"GPT-2-small parameter set: {o['tensors']} tensors, {o['params']:,} parameters, "
              f"{where}, {o['steps']} steps ({o['layer_steps']} layer steps, "
              "layer_every=10); medians, variants interleaved step by step")
        print(f"  optimizer.step alone        {o['opt_ms']:8.1f} ms")
        print(f"  Guard alone                 {o['guard_ms']:8.1f} ms  -> clip's own cost {o['clip_ms']:.1f} ms")
        print(f"  Guard + Monitor, plain step {o['guard_monitor_ms']:8.1f} ms  ({o['overhead_step_ms']:+.1f} ms; "
              f"inside the Monitor {o['inside_step_ms']:.2f} ms)")
        print(f"  Guard + Monitor, layer step {o['guard_monitor_layer_ms']:8.1f} ms  ({o['overhead_layer_ms']:+.1f} ms; "
              f"inside the Monitor {o['inside_layer_ms']:.1f} ms)")
        print(f"  Monitor overhead, amortised over layer_every=10: {o['overhead_ms']:+.1f} ms per step "
              f"= {100 * o['overhead_vs_clip']:+.1f}% of the clip's own cost (time inside the Monitor: "
              f"{o['inside_ms']:.1f} ms = {100 * o['inside_vs_clip']:.1f}%); close() {o['close_ms']:.0f} ms")
        if a.steps <= 0:
            return
        s = bench_store(a.steps, a.layers, 1000, tmp)
        print(f"Run store: {s['steps']:,} steps x {s['layers']} layers = {s['layer_rows']:,} layer rows")
        print(f"  write {s['write_s']:.2f} s, read (load_run) {s['read_s']:.2f} s, "
              f"{s['bytes'] / 1e6:.1f} MB on disk ({s['bytes_per_layer_row']:.2f} B per layer row)")


if __name__ == "__main__":
    main()
