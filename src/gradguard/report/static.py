"""Static figures (PNG or SVG) of every report view through matplotlib, for papers and slides."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .data import RunData
from .html import compare_json, groups_of
from .views import MISSING_CODE, NONFINITE_CODE, RunViews, build_views

FORMATS = ("png", "svg")


def _arr(values: list[Any] | None) -> np.ndarray:
    return np.array(
        [np.nan if v is None or isinstance(v, str) else v for v in values or []], dtype=np.float64
    )


def slug(name: str) -> str:
    """A file-name-safe form of a run name."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return s[:80] or "run"


def _safe(text: str) -> str:
    """Text for matplotlib with mathtext turned off (a ``$`` in a layer name stays a dollar)."""
    return str(text).replace("$", r"\$")


def _logy(ax: Any) -> None:
    """Log y axis with plain ``1e-3`` labels (no mathtext: faster, and like the HTML page)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _norm_fig(v: RunViews, plt: Any) -> Any:
    nv = v.norm
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.array(nv["x"])
    ax.plot(x, _arr(nv["norm"]), lw=0.8, color="#2563eb", label="total norm (pre-clip)")
    thr = _arr(nv["threshold"])
    if np.isfinite(thr).any():
        ax.plot(x, thr, lw=1, ls="--", color="#111827", label="threshold")
    for key, color, size, label in (
        ("clipped", "#f59e0b", 6, "clipped"),
        ("skipped", "#dc2626", 18, "skipped"),
        ("nonfinite", "#e11d48", 30, "non-finite"),
    ):
        y = _arr(nv[key])
        if np.isfinite(y).any():
            ax.scatter(x, y, s=size, color=color, label=label, zorder=3)
    _logy(ax)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm")
    loss = _arr(nv["loss"])
    if np.isfinite(loss).any():
        ax2 = ax.twinx()
        ax2.plot(x, loss, lw=0.8, color="#9ca3af", label="loss")
        if nv["loss_log"]:
            _logy(ax2)
        ax2.set_ylabel("loss")
        h2, l2 = ax2.get_legend_handles_labels()
    else:
        h2, l2 = [], []
    h, lab = ax.get_legend_handles_labels()
    ax.legend(h + h2, lab + l2, loc="upper left", bbox_to_anchor=(1.1, 1.0), fontsize=8)
    ax.set_title(f"{_safe(v.name)}: global gradient norm")
    return fig


def _rate_fig(v: RunViews, plt: Any) -> Any:
    rv = v.rate
    fig, ax = plt.subplots(figsize=(10, 2.8))
    x = np.array(rv["x"])
    ax.plot(x, _arr(rv["clip"]), color="#f59e0b", label="clip rate")
    ax.plot(x, _arr(rv["skip"]), color="#dc2626", label="skip rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(f"rate (rolling {rv['window']} steps)")
    ax.legend(fontsize=8)
    ax.set_title(f"{_safe(v.name)}: clip rate")
    return fig


def _heatmap_fig(v: RunViews, plt: Any) -> Any:
    from matplotlib.colors import ListedColormap

    hm = v.heatmap
    rows, cols = hm.codes.shape
    fig, ax = plt.subplots(figsize=(10, max(2.5, min(12, 0.25 * rows + 1.5))))
    logs = np.where(hm.codes < NONFINITE_CODE, hm.log_values, np.nan)
    im = ax.imshow(
        logs,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=hm.lo,
        vmax=hm.hi,
        extent=(-0.5, cols - 0.5, rows - 0.5, -0.5),
    )
    over = np.full(hm.codes.shape, np.nan)
    over[hm.codes == NONFINITE_CODE] = 1.0
    over[hm.codes == MISSING_CODE] = 0.0
    ax.imshow(
        over,
        aspect="auto",
        interpolation="nearest",
        cmap=ListedColormap(["#ececec", "#e60050"]),
        vmin=0,
        vmax=1,
        extent=(-0.5, cols - 0.5, rows - 0.5, -0.5),
    )
    ticks = np.unique(np.linspace(0, cols - 1, min(cols, 8)).round().astype(int))
    ax.set_xticks(ticks, [str(hm.x0[t]) for t in ticks])
    if rows <= 40:
        ax.set_yticks(range(rows), [_safe(n) for n in hm.layers], fontsize=7)
    else:
        ax.set_ylabel("layer index")
    ax.set_xlabel("step")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("log10 gradient norm (max per cell)")
    ax.set_title(f"{_safe(v.name)}: layer x step gradient norm (red: non-finite)")
    return fig


def _bars(
    ax: Any, labels: list[str], series: list[tuple[str, list[Any], str]], ref: float | None = None
) -> None:
    x = np.arange(len(labels))
    for label, values, color in series:
        y = _arr(values)
        ax.bar(x, np.where(np.isfinite(y), y, 0), width=0.8, color=color, label=label)
    if ref is not None:
        ax.axhline(ref, ls="--", color="#111827", lw=1, label=f"{ref:g}")
    _logy(ax)
    if len(labels) <= 60:
        ax.set_xticks(x, [_safe(n) for n in labels], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xlabel(f"layer index (0-{len(labels) - 1})")
    ax.legend(fontsize=8)


def _flow_fig(v: RunViews, plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(10, 4.5))
    _bars(
        ax,
        v.flow["layers"],
        [("max norm", v.flow["max"], "#67e8f9"), ("mean norm", v.flow["mean"], "#1d4ed8")],
    )
    ax.set_ylabel("gradient norm")
    ax.set_title(f"{_safe(v.name)}: gradient flow")
    return fig


def _ratio_fig(v: RunViews, plt: Any) -> Any:
    ur = v.ratio
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7))
    x = np.array(ur["x"])
    for key, color in (("max", "#fca5a5"), ("median", "#7c3aed"), ("min", "#93c5fd")):
        a1.plot(x, _arr(ur[key]), color=color, label=key)
    a1.axhline(ur["reference"], ls="--", color="#111827", lw=1, label="1e-3")
    _logy(a1)
    a1.set_xlabel("step")
    a1.set_ylabel("update / weight")
    a1.legend(fontsize=8)
    a1.set_title(f"{_safe(v.name)}: update-to-weight ratio")
    _bars(
        a2,
        ur["layers"],
        [("update/weight (geometric mean)", ur["per_layer"], "#7c3aed")],
        ref=ur["reference"],
    )
    fig.tight_layout()
    return fig


def _compare_fig(views: list[RunViews], plt: Any, title: str = "all runs") -> Any:
    cmp = compare_json(views)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    x = np.array(cmp["x"])
    for v, n, lo in zip(views, cmp["norm"], cmp["loss"]):
        y = _arr(n)
        ok = np.isfinite(y)
        a1.plot(x[ok], y[ok], lw=0.8, label=_safe(v.name))
        yl = _arr(lo)
        ok = np.isfinite(yl)
        a2.plot(x[ok], yl[ok], lw=0.8, label=_safe(v.name))
    _logy(a1)
    a1.set_ylabel("gradient norm")
    a1.legend(fontsize=8)
    a1.set_title(f"global gradient norm: {_safe(title)}")
    if cmp["loss_log"]:
        _logy(a2)
    a2.set_ylabel("loss")
    a2.set_xlabel("step")
    return fig


def write_figures(runs: list[RunData], outdir: str | Path, fmt: str = "png") -> list[Path]:
    """Write one figure per view and run (and a comparison when several runs) into ``outdir``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    views = [build_views(r) for r in runs]
    written: list[Path] = []
    used: set[str] = set()

    def save(fig: Any, stem: str) -> None:
        path = out / f"{stem}.{fmt}"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    groups = [(t, [views[i] for i in idx]) for t, idx in groups_of(views)]
    for title, members in groups:  # one comparison per experiment, as in the HTML report
        if len(members) > 1:
            save(_compare_fig(members, plt, title), "compare" if len(groups) == 1 else f"compare-{slug(title)}")
    for v in views:
        base = slug(v.name)
        while base in used:
            base += "_"
        used.add(base)
        for key, make, ok in (
            ("norm", _norm_fig, v.norm is not None),
            ("clip-rate", _rate_fig, v.rate is not None),
            ("heatmap", _heatmap_fig, v.heatmap is not None),
            ("gradient-flow", _flow_fig, v.flow is not None),
            ("update-ratio", _ratio_fig, v.ratio is not None),
        ):
            if ok:
                save(make(v, plt), f"{base}-{key}")
    return written
