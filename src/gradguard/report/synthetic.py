"""Write a synthetic run folder in the run-store format (for tests, benchmarks and docs).

The data look like a training run: a slowly drifting log-normal gradient norm with a few spikes, a
clip threshold, clipped steps, skipped non-finite steps, per-layer norms that shrink with depth,
update-to-weight ratios around 1e-3 (a few layers far below), events with top layers and
flight-recorder windows. It is written through the run store's own writer
(:class:`gradguard.store.RunWriter`), so the files are exactly what a training run writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_synthetic_run(
    path: str | Path,
    *,
    steps: int = 2000,
    layers: int = 12,
    layer_every: int = 1,
    shard_steps: int = 10_000,
    name: str | None = None,
    layer_names: list[str] | None = None,
    spikes: int = 4,
    clip: bool = True,
    seed: int = 0,
    rank: int = 0,
    window_steps: int = 16,
    mode: str = "new",
    lr_groups: int = 1,
) -> Path:
    """Write a run of ``steps`` steps and ``layers`` layers to ``path`` through the run store's
    writer (one shard per ``shard_steps`` steps, no compaction); return the folder written
    (``mode`` as in :class:`~gradguard.store.RunWriter`: a second rank joins the folder of the
    first, a second run of the same rank goes to a versioned sibling unless ``mode`` says
    otherwise). The learning rate warms up over the first 5% of the steps to 1e-3, then
    decays (cosine) to 1e-4; ``lr_groups`` > 1 adds groups at 1/2, 1/4, ... of it (the ``lrs``
    column)."""
    import pyarrow as pa

    from ..store import LAYERS_SCHEMA, STEPS_SCHEMA, WINDOW_SCHEMA, RunWriter, layer_column

    folder = Path(path)
    rng = np.random.default_rng(seed)
    names = layer_names or [
        f"block{i // 2}.{'attn' if i % 2 == 0 else 'mlp'}.weight" for i in range(layers)
    ]
    layers = len(names)
    step = np.arange(steps, dtype=np.int64)
    drift = np.cumsum(rng.normal(0, 0.01 * min(1.0, (1000 / max(steps, 1)) ** 0.5), steps))
    log_norm = (
        0.3 * np.sin(step / max(1, steps / 7)) + drift - drift.mean() + rng.normal(0, 0.15, steps)
    )
    spike_at = (
        np.sort(
            rng.choice(
                np.arange(steps // 10, steps),
                size=min(spikes, max(0, steps - steps // 10)),
                replace=False,
            )
        )
        if steps >= 20
        else np.zeros(0, dtype=np.int64)
    )
    log_norm[spike_at] += rng.uniform(1.5, 3.0, len(spike_at))
    norm = 10.0**log_norm
    nonfinite = np.zeros(steps, dtype=bool)
    if len(spike_at) >= 2:
        nonfinite[spike_at[-1]] = True
        norm[spike_at[-1]] = np.inf
    threshold = np.full(steps, 1.5) if clip else np.full(steps, np.nan)
    clipped = (norm > threshold) & ~nonfinite if clip else np.zeros(steps, dtype=bool)
    skipped = nonfinite.copy()
    coef = np.where(clipped, threshold / norm, 1.0)
    after = np.where(nonfinite, np.nan, norm * coef)
    loss = 2.0 * np.exp(-step / max(1.0, steps / 3)) + 0.1 + 0.02 * rng.random(steps)
    loss[spike_at] *= 3.0
    time = 1.7e9 + step * 0.05
    meta = {
        "name": name or folder.name,
        "layers": names,
        "config": {"clipper": "NormClip(max_norm=1.5)" if clip else "none", "synthetic": True},
        "versions": {"gradguard": "0.1.0"},
        "started": "2025-01-01T00:00:00+00:00",
        "notes": [],
        "ranks": [rank],
    }
    writer = RunWriter(folder, rank, mode=mode, compact="off")
    folder = writer.path
    if rank == 0 or not (folder / "meta.json").exists():
        writer.write_meta(meta)
    depth = np.linspace(0.0, -1.5, layers)  # earlier layers get smaller gradients
    base_ratio = np.full(layers, -3.0) + rng.normal(0, 0.2, layers)
    if layers >= 4:
        base_ratio[1] = -5.0  # a layer that barely updates
    lstep = step[::layer_every]
    warm = max(1, steps // 20)
    frac = np.clip((step - warm) / max(1, steps - warm), 0.0, 1.0)
    lr = np.where(step < warm, 1e-3 * (step + 1) / warm, 1e-4 + 0.45e-3 * (1 + np.cos(np.pi * frac)))
    lrs = None if lr_groups < 2 else [[float(v) / 2**g for g in range(lr_groups)] for v in lr]
    list_type = STEPS_SCHEMA.field("lrs").type
    for lo in range(0, steps, shard_steps):
        hi = min(steps, lo + shard_steps)
        sl = slice(lo, hi)
        writer.write_shard("steps", pa.table({
            "step": step[sl], "time": time[sl], "loss": loss[sl], "lr": lr[sl],
            "lrs": pa.nulls(hi - lo, list_type) if lrs is None else pa.array(lrs[lo:hi], list_type),
            "total_norm": norm[sl], "total_norm_after": after[sl], "clip_coef": coef[sl],
            "threshold": threshold[sl], "clipped": clipped[sl], "skipped": skipped[sl],
            "nonfinite": nonfinite[sl], "loss_scale": np.full(hi - lo, np.nan),
            "rank": np.full(hi - lo, rank, dtype=np.int32)}, schema=STEPS_SCHEMA))
        ls = lstep[(lstep >= lo) & (lstep < hi)]
        if len(ls):
            k = len(ls)
            ln = log_norm[ls][:, None] + depth[None, :] + rng.normal(0, 0.1, (k, layers))
            gn = 10.0**ln
            nfc = np.zeros((k, layers), dtype=np.int64)
            bad = nonfinite[ls]
            if bad.any() and layers:
                gn[bad, layers // 2] = np.inf
                nfc[bad, layers // 2] = 3
            ur = 10.0 ** (base_ratio[None, :] + rng.normal(0, 0.1, (k, layers)))
            ur[skipped[ls], :] = np.nan
            writer.write_shard("layers", pa.table({
                "step": np.repeat(ls, layers), "layer": layer_column(names, k),
                "grad_norm": gn.ravel().astype(np.float32),
                "grad_max_abs": (gn / 30.0).ravel().astype(np.float32),
                "nonfinite_count": nfc.ravel(),
                "param_norm": np.full(k * layers, 10.0, dtype=np.float32),
                "update_ratio": ur.ravel().astype(np.float32),
                "rank": np.full(k * layers, rank, dtype=np.int32)}, schema=LAYERS_SCHEMA))
        writer.next_seq()
    events = []
    for s in spike_at.tolist():
        w0 = max(0, s - window_steps + 1)
        ws = np.arange(w0, s + 1)
        wl = log_norm[ws][:, None] + depth[None, :]
        wv = 10.0**wl
        if nonfinite[s] and layers:
            wv[-1, layers // 2] = np.inf
        wname = writer.write_window(s, pa.table({
            "step": np.repeat(ws, layers),
            "layer": pa.array(np.tile(np.array(names, dtype=object), len(ws)), pa.string()),
            "grad_norm": wv.ravel()}, schema=WINDOW_SCHEMA))
        order = np.argsort(-wv[-1])[:3]
        past = norm[max(0, s - 128): s]
        events.append({
            "step": int(s),
            "rule": "nonfinite" if nonfinite[s] else "spike",
            "value": None if nonfinite[s] else float(norm[s]),
            "baseline": float(np.median(past[np.isfinite(past)])) if s else 1.0,
            "action": "skip" if nonfinite[s] else "clip",
            "top_layers": [
                {"layer": names[j],
                 "norm": float(wv[-1, j]) if np.isfinite(wv[-1, j]) else None,
                 "baseline": float(10 ** (depth[j])),
                 "ratio": float(wv[-1, j] / 10 ** depth[j]) if np.isfinite(wv[-1, j]) else None}
                for j in order],
            "first_nonfinite_layer": names[layers // 2] if nonfinite[s] and layers else None,
            "window": wname,
            "message": "non-finite gradient; update skipped" if nonfinite[s] else "gradient norm spike",
            "time": float(time[s]),
            "rank": rank,
        })
    writer.append_events(events)
    writer.close()
    return folder
