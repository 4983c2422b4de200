"""Sinks: where a flush's statistics go besides the run store.

Each sink gets, at every flush, the batch of steps (numpy columns, the run store's step
schema), the per-layer rows and the events, on the Monitor's writer thread (never in the
training step). Sinks log **aggregates**, never one series per parameter:

* global scalars: ``grad/total_norm``, ``grad/total_norm_after``, ``grad/clip_coef``,
  ``grad/threshold``, ``grad/clipped``, ``grad/skipped``, ``grad/nonfinite``,
  ``train/loss``, ``train/lr``, ``train/loss_scale`` (NaN values are left out);
* per layer step: ``layers/grad_norm_max``, ``layers/grad_norm_median``,
  ``layers/grad_norm_min``, ``layers/update_ratio_median``, ``layers/nonfinite_count``, and
  the ``top_k`` layers by gradient norm as ``layer/<name>/grad_norm`` (the tag set stays as
  small as the set of layers that are ever in the top k);
* events: ``events/<rule>`` = the event's value at its step, and the message as text where
  the tracker has text.

Adapters: :class:`TensorBoardSink` (``torch.utils.tensorboard``, extra ``tensorboard``),
:class:`CSVSink` (no dependency), :class:`WandbSink` (extra ``wandb``), :class:`MLflowSink`
(extra ``mlflow``), :class:`NeptuneSink` (extra ``neptune``). A missing optional package
raises ``ImportError`` at construction, naming the extra to install.
"""

from __future__ import annotations

import csv
import importlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

GLOBAL_TAGS = {
    "total_norm": "grad/total_norm", "total_norm_after": "grad/total_norm_after",
    "clip_coef": "grad/clip_coef", "threshold": "grad/threshold", "clipped": "grad/clipped",
    "skipped": "grad/skipped", "nonfinite": "grad/nonfinite", "loss": "train/loss",
    "lr": "train/lr", "loss_scale": "train/loss_scale",
}


def require(module: str, extra: str, package: str | None = None) -> Any:
    """Import an optional dependency or raise ImportError naming the gradguard extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this gradguard sink needs the optional package {package or module!r}: "
            f"pip install 'gradguard[{extra}]'") from exc


def scalar_rows(batch: Any, top_k: int = 5) -> list[tuple[int, dict[str, float]]]:
    """``[(step, {tag: value})]`` of a batch: global scalars, layer aggregates, events."""
    out: dict[int, dict[str, float]] = {}
    st = batch.steps
    for i, step in enumerate(st["step"]):
        d = out.setdefault(int(step), {})
        for col, tag in GLOBAL_TAGS.items():
            v = float(st[col][i])
            if not math.isnan(v):
                d[tag] = v
        groups = st["lrs"][i] if "lrs" in st else None
        for g, v in enumerate(groups or ()):  # several param groups: one tag each
            if v is not None and not math.isnan(v):
                d[f"train/lr_group{g}"] = float(v)
    ly = batch.layers
    L = len(batch.layer_names)
    if L and len(ly["step"]):
        nl = len(ly["step"]) // L
        gn = np.asarray(ly["grad_norm"], dtype=np.float64).reshape(nl, L)
        ur = np.asarray(ly["update_ratio"], dtype=np.float64).reshape(nl, L)
        nf = np.asarray(ly["nonfinite_count"]).reshape(nl, L)
        for r in range(nl):
            d = out.setdefault(int(ly["step"][r * L]), {})
            row = gn[r]
            fin = row[np.isfinite(row)]
            if fin.size:
                d["layers/grad_norm_max"] = float(fin.max())
                d["layers/grad_norm_median"] = float(np.median(fin))
                d["layers/grad_norm_min"] = float(fin.min())
            u = ur[r][np.isfinite(ur[r])]
            if u.size:
                d["layers/update_ratio_median"] = float(np.median(u))
            d["layers/nonfinite_count"] = float(np.clip(nf[r], 0, None).sum())
            key = np.where(np.isnan(row), -np.inf, row)
            for j in np.argsort(-key, kind="stable")[:top_k]:
                if np.isfinite(row[j]):
                    d[f"layer/{batch.layer_names[j]}/grad_norm"] = float(row[j])
    for e in batch.events:
        v = e["value"]
        out.setdefault(int(e["step"]), {})[f"events/{e['rule']}"] = v if math.isfinite(v) else -1.0
    return sorted(out.items())


class Sink:
    """Base class: ``open(meta)``, ``write(batch)``, ``close()``; all optional."""

    name = "sink"

    def open(self, meta: dict[str, Any]) -> None:
        pass

    def write(self, batch: Any) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink(Sink):
    """TensorBoard event files through ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        log_dir: folder of the event files (default: ``<run_dir>/tensorboard`` is up to the
            caller; required here).
        top_k: layers logged by name at each layer step.
    Note TensorBoard keeps 1000 points per scalar tag by default (reservoir sampled); start
    it with ``--samples_per_plugin=scalars=0`` to see every step.
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike, top_k: int = 5):
        tb = require("torch.utils.tensorboard", "tensorboard", "tensorboard")
        self.writer = tb.SummaryWriter(log_dir=str(log_dir))
        self.top_k = top_k

    def write(self, batch):
        for step, tags in scalar_rows(batch, self.top_k):
            for tag, v in tags.items():
                self.writer.add_scalar(tag, v, step)
        for e in batch.events:
            self.writer.add_text(f"events/{e['rule']}", e["message"], e["step"])
        self.writer.flush()

    def close(self):
        self.writer.close()


class CSVSink(Sink):
    """Plain CSV: ``steps.csv`` (the store's step columns) and ``layers.csv``, appended."""

    name = "csv"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _append(path: Path, cols: dict[str, Any]) -> None:
        names = list(cols)
        n = len(cols[names[0]]) if names else 0
        if n == 0:
            return
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(names)
            arrays = [np.asarray(cols[c]) for c in names]
            for i in range(n):
                w.writerow([_fmt(a[i]) for a in arrays])

    def write(self, batch):
        self._append(self.folder / "steps.csv", batch.steps)
        self._append(self.folder / "layers.csv", batch.layers)


def _fmt(x: Any) -> Any:
    if isinstance(x, (np.floating, float)):
        return repr(float(x))
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


class WandbSink(Sink):
    """Weights & Biases: ``run.log(aggregates, step=step)``; pass ``run`` or ``wandb.init`` kwargs.

    Offline: ``WandbSink(mode="offline", dir=...)`` or ``WANDB_MODE=offline``; upload later
    with ``wandb sync``. Never uses ``wandb.watch`` (per-parameter hooks).
    """

    name = "wandb"

    def __init__(self, run: Any = None, top_k: int = 5, finish: bool | None = None, **init_kwargs: Any):
        wandb = require("wandb", "wandb")
        self._own = run is None
        self.run = run if run is not None else wandb.init(**init_kwargs)
        self.finish = self._own if finish is None else finish
        self.top_k = top_k
        self._last = -1

    def write(self, batch):
        for step, tags in scalar_rows(batch, self.top_k):
            if step <= self._last:  # W&B needs increasing steps (a resumed run may repeat)
                continue
            self.run.log(tags, step=step)
            self._last = step

    def close(self):
        if self.finish:
            self.run.finish()


class MLflowSink(Sink):
    """MLflow: aggregates through ``MlflowClient.log_batch`` (1000 metrics per call).

    Args:
        run_id: an existing run; default: a new run in ``experiment``.
        tracking_uri: e.g. ``sqlite:///mlflow.db`` or a local file store.
        experiment: experiment name for a new run (default ``"gradguard"``).
    """

    name = "mlflow"

    def __init__(self, run_id: str | None = None, tracking_uri: str | None = None,
                 experiment: str = "gradguard", top_k: int = 5):
        require("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._own = run_id is None
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            run_id = self.client.create_run(exp_id, run_name="gradguard").info.run_id
        self.run_id = run_id
        self.top_k = top_k

    def write(self, batch):
        from mlflow.entities import Metric
        metrics = []
        for step, tags in scalar_rows(batch, self.top_k):
            ts = 0
            for tag, v in tags.items():
                metrics.append(Metric(tag.replace("/", "."), v, ts, step))
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        for e in batch.events:
            self.client.set_tag(self.run_id, f"gradguard.event.{e['step']}.{e['rule']}", e["message"][:5000])

    def close(self):
        if self._own:
            self.client.set_terminated(self.run_id)


class NeptuneSink(Sink):
    """Neptune (the seed article's dashboard): series under ``gradguard/``.

    Pass ``run`` (a ``neptune.Run``) or ``neptune.init_run`` kwargs, e.g.
    ``NeptuneSink(mode="offline")`` (synced later with ``neptune sync``).
    """

    name = "neptune"

    def __init__(self, run: Any = None, top_k: int = 5, **init_kwargs: Any):
        neptune = require("neptune", "neptune")
        self._own = run is None
        self.run = run if run is not None else neptune.init_run(**init_kwargs)
        self.top_k = top_k

    def write(self, batch):
        series: dict[str, tuple[list[float], list[float]]] = {}
        for step, tags in scalar_rows(batch, self.top_k):
            for tag, v in tags.items():
                vals, steps = series.setdefault(tag, ([], []))
                vals.append(v)
                steps.append(float(step))
        for tag, (vals, steps) in series.items():
            self.run[f"gradguard/{tag}"].extend(vals, steps=steps)
        for e in batch.events:
            self.run["gradguard/events"].append(e["message"], step=float(e["step"]))

    def close(self):
        if self._own:
            self.run.stop()
