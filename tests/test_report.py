"""Report data path: downsampling, heatmaps, payload escaping, broken run folders, CLI, figures, inspect.

The browser side (the page as a person sees it) is in ``test_report_browser.py``.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard.cli import main
from gradguard.report import RunError, make_report, open_run, render_html
from gradguard.report.downsample import (
    bucket_edges,
    bucket_extreme_indices,
    grouped_reduce,
    select_indices,
)
from gradguard.report.inspect import inspect_run, sparkline
from gradguard.report.static import write_figures
from gradguard.report.synthetic import write_synthetic_run
from gradguard.report.views import MISSING_CODE, NONFINITE_CODE, build_views, heatmap_from_long

EVIL = "<img src=x onerror=alert(1)>"


def payload_of(html_text: str) -> dict:
    """The JSON data block of a generated page."""
    m = re.search(r'<script type="application/json" id="gg-data">(.*?)</script>', html_text, re.S)
    assert m, "data block missing"
    return json.loads(m.group(1))


# ---------------------------------------------------------------- downsampling


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=1e-6, max_value=1e6, allow_nan=False), min_size=1, max_size=400),
    st.integers(min_value=1, max_value=50),
)
def test_select_indices_keeps_every_bucket_min_and_max(values, buckets):
    v = np.array(values)
    idx = select_indices(len(v), [v], buckets=buckets)
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < len(v)
    if len(v) <= 2 * buckets:
        assert len(idx) == len(v)
        return
    edges = bucket_edges(len(v), buckets)
    for a, b in zip(edges[:-1], edges[1:]):
        inside = idx[(idx >= a) & (idx < b)]
        assert v[inside].max() == v[a:b].max()
        assert v[inside].min() == v[a:b].min()
    assert len(idx) <= 4 * buckets + 2


def test_bucket_extremes_ignore_nan_and_respect_mask():
    v = np.array([1.0, np.nan, 5.0, 2.0, np.nan, np.nan, 7.0, 0.5])
    edges = np.array([0, 3, 6, 8])
    assert bucket_extreme_indices(v, edges, mode="max").tolist() == [2, 3, 6]
    assert bucket_extreme_indices(v, edges, mode="min").tolist() == [0, 3, 7]
    mask = np.array([1, 0, 0, 1, 0, 0, 0, 1], bool)
    assert bucket_extreme_indices(v, edges, mode="max", mask=mask).tolist() == [0, 3, 7]


def test_one_spike_in_a_million_steps_survives():
    rng = np.random.default_rng(3)
    v = rng.lognormal(0, 0.2, 1_000_000)
    v[654_321] = 1e4
    idx = select_indices(len(v), [v], buckets=2000)
    assert 654_321 in idx
    assert len(idx) < 10_000


@pytest.mark.parametrize("how", ["max", "min", "mean", "sum", "count"])
def test_grouped_reduce_matches_pandas(how):
    rng = np.random.default_rng(0)
    r = rng.integers(0, 7, 500)
    c = rng.integers(0, 5, 500)
    v = rng.normal(size=500)
    v[::17] = np.nan
    got = grouped_reduce(r, c, v, (8, 5), how)
    df = pd.DataFrame({"r": r, "c": c, "v": v}).dropna()
    ref = df.groupby(["r", "c"])["v"].agg(how if how != "count" else "size")
    want = np.full((8, 5), 0.0 if how in ("sum", "count") else np.nan)
    for (i, j), x in ref.items():
        want[i, j] = x
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)


def test_heatmap_keeps_single_step_spike_and_marks_nonfinite_and_missing():
    steps = np.repeat(np.arange(1000), 3)
    layer = np.tile(np.arange(3), 1000)
    vals = np.ones(3000)
    vals[(steps == 777) & (layer == 1)] = 1e6
    vals[(steps == 10) & (layer == 2)] = np.inf
    keep = ~((layer == 0) & (steps < 100))  # layer 0 not recorded at first
    hm = heatmap_from_long(steps[keep], layer[keep], vals[keep], ~np.isfinite(vals[keep]), ["a", "b", "c"], 50, "g")
    assert hm.codes.shape == (3, 50)
    assert hm.codes[1].max() == 253 and hm.codes[1].argmax() == 777 * 50 // 1000
    assert hm.codes[2, 0] == NONFINITE_CODE
    assert (hm.codes[0, :5] == MISSING_CODE).all()
    assert hm.x0[0] == 0 and hm.x1[-1] == 999
    assert np.isclose(10**hm.hi, 1e6) and np.isclose(10**hm.lo, 1.0)


# ---------------------------------------------------------------- whole report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    a = write_synthetic_run(base / "clipped", steps=3000, layers=10, shard_steps=1000, name="clipped")
    b = write_synthetic_run(base / "plain", steps=2000, layers=10, clip=False, seed=1, name="plain")
    return a, b


def test_report_payload_has_every_view(runs, tmp_path):
    out, failed = make_report(list(runs), tmp_path / "r.html")
    assert failed == []
    text = out.read_text()
    data = payload_of(text)
    assert [r["name"] for r in data["runs"]] == ["clipped", "plain"]
    r0 = data["runs"][0]
    assert r0["summary"]["steps"] == 3000 and r0["summary"]["events"] == 4
    assert r0["norm"]["n"] == 3000 and len(r0["norm"]["x"]) == 3000  # small runs are not thinned
    assert r0["heatmap"]["rows"] == 10 and r0["heatmap"]["cols"] == 600
    assert len(r0["flow"]["mean"]) == 10 and r0["ratio"]["reference"] == 1e-3
    assert any(e["window_status"] == "embedded" for e in r0["events"])
    assert r0["events"][0]["top_layers"][0]["layer"].startswith("block")
    # no experiment in their config or name: one group, one comparison of both
    assert [(g["title"], g["runs"]) for g in data["groups"]] == [("runs", [0, 1])]
    assert len(data["groups"][0]["compare"]["norm"]) == 2
    # self-contained: no external URL is referenced by any src/href
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:|//)', text)
    assert "uPlot" in text and "Content-Security-Policy" in text


def test_norm_view_matches_the_run_at_every_shown_step(runs):
    run = open_run(runs[0])
    v = build_views(run, buckets=100)  # forces thinning
    s = run.steps.set_index("step")
    nv = v.norm
    assert nv["shown"] < nv["n"]
    for x, y in zip(nv["x"], nv["norm"]):
        true = s.loc[x, "total_norm"]
        if y is None:
            assert not np.isfinite(true)
        else:
            assert y == pytest.approx(true, rel=1e-5)
    finite = s["total_norm"][np.isfinite(s["total_norm"])]
    assert max(y for y in nv["norm"] if y is not None) == pytest.approx(finite.max(), rel=1e-5)
    assert sum(1 for y in nv["nonfinite"] if y is not None) == int((~np.isfinite(s["total_norm"])).sum())


def test_names_are_escaped_in_the_html_source(tmp_path):
    d = write_synthetic_run(
        tmp_path / "evil", steps=50, layers=3, name=EVIL + "</script><script>alert(2)</script>",
        layer_names=[EVIL, "ok.weight", "</script>"],
    )
    text = render_html([open_run(d)])
    assert EVIL not in text and "</script><script>alert(2)" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text  # title and nav, escaped
    data = payload_of(text)
    assert data["runs"][0]["name"].startswith(EVIL)
    assert data["runs"][0]["flow"]["layers"][0] == EVIL


def test_million_steps_500_layers_stays_small(tmp_path):
    d = write_synthetic_run(tmp_path / "big", steps=1_000_000, layers=500, layer_every=5000, shard_steps=250_000, spikes=6)
    text = render_html([open_run(d)])
    size = len(text.encode())
    assert size < 10_000_000, size
    r = payload_of(text)["runs"][0]
    assert r["heatmap"]["rows"] == 500
    assert r["norm"]["shown"] < 20_000
    s = open_run(d).steps
    fin = s["total_norm"][np.isfinite(s["total_norm"])]
    assert max(y for y in r["norm"]["norm"] if y is not None) == pytest.approx(fin.max(), rel=1e-5)


# ---------------------------------------------------------------- broken run folders


def test_missing_and_non_folder_and_empty(tmp_path):
    with pytest.raises(RunError, match="no such run folder"):
        open_run(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="not a folder"):
        open_run(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no run data"):
        open_run(tmp_path / "empty")


def test_half_written_run_gives_partial_report(tmp_path):
    d = write_synthetic_run(tmp_path / "live", steps=3000, layers=6, shard_steps=1000)
    # the writer is mid-flush: a truncated shard, a temp file, a cut last event line
    good = (d / "steps-r0-000002.parquet").read_bytes()
    (d / "steps-r0-000002.parquet").write_bytes(good[: len(good) // 2])
    (d / "steps-r0-000003.parquet.tmp").write_bytes(b"PAR1")
    (d / "layers-r0-000002.parquet").write_bytes(b"")
    with open(d / "events.jsonl", "a") as f:
        f.write('{"step": 2999, "rule": "spi')
    run = open_run(d)
    assert len(run.steps) == 2000 and run.steps["step"].max() == 1999
    assert any("steps-r0-000002.parquet" in n for n in run.notes)
    assert any("events.jsonl line" in n for n in run.notes)
    text = render_html([run])
    r = payload_of(text)["runs"][0]
    assert r["summary"]["steps"] == 2000
    assert any("unreadable shard" in n for n in r["notes"])


def test_missing_meta_layers_events_and_window(tmp_path):
    d = write_synthetic_run(tmp_path / "m", steps=500, layers=4)
    (d / "meta.json").unlink()
    for w in d.glob("window-*.parquet"):
        w.unlink()
    run = open_run(d)
    assert run.name == "m" and run.layer_names[0].startswith("block")
    assert any("meta.json missing" in n for n in run.notes)
    v = build_views(run)
    assert v.events and all(e["window_status"] == "missing" for e in v.events)
    for f in d.glob("layers-*.parquet"):
        f.unlink()
    (d / "events-r0.jsonl").unlink()
    v = build_views(open_run(d))
    assert v.heatmap is None and v.flow is None and v.events == []
    assert v.norm is not None
    render_html([open_run(d)])


def test_meta_only_run_just_started(tmp_path):
    d = tmp_path / "fresh"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"name": "fresh", "layers": ["a"], "config": {}, "versions": {}}))
    run = open_run(d)
    assert any("no step records" in n for n in run.notes)
    r = payload_of(render_html([run]))["runs"][0]
    assert r["norm"] is None and r["heatmap"] is None


def test_broken_meta_json_is_a_note(tmp_path):
    d = write_synthetic_run(tmp_path / "b", steps=100, layers=3)
    (d / "meta.json").write_text('{"name": "b", "lay')
    run = open_run(d)
    assert any("meta.json unreadable" in n for n in run.notes)
    assert len(run.steps) == 100


def test_one_bad_run_among_good_ones_gives_partial_report(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    out, failed = make_report([runs[0], tmp_path / "empty", tmp_path / "missing"], tmp_path / "r.html")
    assert len(failed) == 2
    data = payload_of(out.read_text())
    assert len(data["runs"]) == 1 and len(data["failed"]) == 2


def test_multi_rank_uses_lowest_rank_for_series(tmp_path):
    d = write_synthetic_run(tmp_path / "ddp", steps=200, layers=3, rank=0)
    write_synthetic_run(tmp_path / "ddp", steps=200, layers=3, rank=1, seed=5)
    run = open_run(d)
    assert sorted(run.steps["rank"].unique()) == [0, 1]
    v = build_views(run)
    assert v.summary["steps"] == 200 and v.summary["ranks"] == [0, 1]


# ---------------------------------------------------------------- CLI, figures, inspect


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    p = subprocess.run(
        [sys.executable, "-m", "gradguard.cli", "report", str(tmp_path / "empty"), "-o", str(tmp_path / "r.html")],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "no run data" in p.stderr and not (tmp_path / "r.html").exists()
    for args, msg in ((["report", str(tmp_path / "nope")], "no such run folder"),
                      (["report", str(tmp_path / "empty"), "--format", "png", "-o", str(tmp_path / "f")], "no run could be read"),
                      (["inspect", str(tmp_path / "empty")], "no run data"),
                      (["inspect", str(tmp_path / "nope")], "no such run folder")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert msg in err and "error:" in err


def test_cli_report_html_and_svg_figures(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs), "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 50_000
    assert "wrote" in capsys.readouterr().out
    d = write_synthetic_run(tmp_path / "nolayers", steps=300, layers=3, name="nl")
    for f in d.glob("layers-*.parquet"):
        f.unlink()
    assert main(["report", str(d), "--format", "svg", "-o", str(tmp_path / "svg")]) == 0
    svgs = sorted(p.name for p in (tmp_path / "svg").iterdir())
    assert svgs == ["nl-clip-rate.svg", "nl-norm.svg"]  # the views a run without layer records has
    assert "<svg" in (tmp_path / "svg" / "nl-norm.svg").read_text()[:1000]


def test_png_figures_for_two_runs_and_odd_names(tmp_path):
    a = write_synthetic_run(tmp_path / "a", steps=200, layers=3, name="plain")
    d = write_synthetic_run(tmp_path / "odd", steps=120, layers=3, name="lr $1e-3", layer_names=["a$b", "[bold]x", EVIL])
    files = write_figures([open_run(a), open_run(d)], tmp_path / "png", "png")
    names = {f.name for f in files}
    assert names == {"compare.png"} | {
        f"{r}-{k}.png" for r in ("plain", "lr_1e-3") for k in ("norm", "clip-rate", "heatmap", "gradient-flow", "update-ratio")
    }
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000


def test_inspect_summary(runs, tmp_path):
    from rich.console import Console

    d = write_synthetic_run(tmp_path / "odd", steps=300, layers=3, layer_names=["[bold]x[/bold]", "b", EVIL])
    for path, must in ((runs[0], ["3000", "clip rate", "spike", "nonfinite", "block0.attn.weight", "worst layers"]),
                       (d, ["[bold]x[/bold]", EVIL])):
        buf = io.StringIO()
        inspect_run(open_run(path), console=Console(file=buf, width=160, color_system=None))
        out = buf.getvalue()
        for m in must:
            assert m in out, (m, out)
        assert re.search("[\u2581-\u2588]{20,}", out)  # the sparkline


def test_sparkline_marks_spikes_and_nonfinite():
    v = np.ones(1000)
    v[500] = 1e3
    v[900] = np.nan
    s = sparkline(v, 10)
    assert len(s) == 10 and s[5] == "\u2588" and s[9] == "!" and s[0] == "\u2581"


def test_partial_tables_with_missing_columns(tmp_path):
    """An older writer without some columns still reports (absent columns read as NaN/False)."""
    d = tmp_path / "old"
    d.mkdir()
    pq.write_table(pa.table({"step": np.arange(10), "total_norm": np.linspace(1, 2, 10)}), d / "steps-r0-000000.parquet")
    run = open_run(d)
    assert run.steps["clipped"].dtype == bool and not run.steps["clipped"].any()
    r = payload_of(render_html([run]))["runs"][0]
    assert r["summary"]["steps"] == 10 and r["norm"]["n"] == 10


def test_run_store_reader_and_fast_reader_give_the_same_report(runs):
    """open_run reads through gradguard.load_run on small runs and the fast columnar reader on
    large ones; both must give the same views."""
    import gradguard

    direct = open_run(runs[0], use_load_run=False)
    fast = open_run(runs[0], fast_read_rows=0)
    via = open_run(runs[0])
    if hasattr(gradguard, "load_run"):
        assert not any("load_run failed" in n for n in via.notes), via.notes
    views = [build_views(r) for r in (direct, fast, via)]
    for v in views[1:]:
        assert v.norm == views[0].norm and v.rate == views[0].rate and v.flow == views[0].flow
        assert v.ratio == views[0].ratio and v.summary == views[0].summary
        np.testing.assert_array_equal(v.heatmap.codes, views[0].heatmap.codes)
        assert [e["step"] for e in v.events] == [e["step"] for e in views[0].events]
        assert [e["window_status"] for e in v.events] == [e["window_status"] for e in views[0].events]
        assert v.events == views[0].events


# ---------------------------------------------------------------- reading at a glance (issue 12)


def _set_steps(folder, **columns):
    """Overwrite step columns of a written run's shards (values by step index)."""
    for f in sorted(folder.glob("steps-*.parquet")):
        t = pq.read_table(f)
        step = t.column("step").to_numpy()
        for name, values in columns.items():
            col = t.column(name).to_numpy().astype(np.float64).copy()
            for k, v in values.items():
                col[step == k] = v
            t = t.set_column(t.schema.get_field_index(name), name, pa.array(col, t.schema.field(name).type))
        pq.write_table(t, f)


F32_MAX = float(np.finfo(np.float32).max)


def extreme_runs(base):
    """Two runs of one experiment: one whose norm reaches float32's max, then inf and NaN,
    and whose loss reaches 1e12 then NaN; one ordinary."""
    a = write_synthetic_run(base / "x" / "none", steps=400, layers=4, clip=False, name="x/none", spikes=0)
    _set_steps(a, total_norm={300: 1e20, 301: F32_MAX, 302: np.inf, 303: np.nan},
               loss={300: 1e12, 301: 3e12, 302: np.nan, 303: np.nan})
    b = write_synthetic_run(base / "x" / "clip", steps=400, layers=4, name="x/clip", spikes=0)
    return a, b


def test_compare_keeps_float32_max_and_marks_nonfinite_steps(tmp_path):
    a, b = extreme_runs(tmp_path)
    data = payload_of(render_html([open_run(a), open_run(b)]))
    (g,) = data["groups"]
    assert g["title"] == "x" and g["runs"] == [0, 1]
    cmp = g["compare"]
    x = cmp["x"]
    norm0 = dict(zip(x, cmp["norm"][0]))
    assert norm0[301] == pytest.approx(F32_MAX, rel=1e-5)  # the largest finite value is drawn
    assert [x[i] for i in cmp["norm_nonfinite"][0]] == [302, 303]  # inf and NaN: marks
    assert [x[i] for i in cmp["loss_nonfinite"][0]] == [302, 303]
    assert cmp["norm_nonfinite"][1] == [] and cmp["loss_log"]  # 0.1 .. 3e12 spans decades
    r0 = data["runs"][0]
    assert r0["norm"]["loss_log"] and sum(v is not None for v in r0["norm"]["loss_nonfinite"]) == 2


def test_loss_axis_is_linear_when_it_spans_no_decades(runs):
    data = payload_of(render_html([open_run(p) for p in runs]))
    assert data["groups"][0]["compare"]["loss_log"] is False  # synthetic loss: 0.1 .. 2.1
    assert data["runs"][0]["norm"]["loss_log"] is False


def test_thirty_two_runs_of_four_experiments_group_by_experiment(tmp_path):
    paths = []
    for e in range(4):
        for k in range(8):
            paths.append(write_synthetic_run(tmp_path / f"exp{e}" / f"s{k}", steps=60, layers=2,
                                             name=f"exp{e}/strategy-{k}", seed=k, spikes=0))
    text = render_html([open_run(p) for p in paths])
    data = payload_of(text)
    assert [(g["title"], g["runs"]) for g in data["groups"]] == [
        (f"exp{e}", list(range(8 * e, 8 * e + 8))) for e in range(4)]
    assert all(len(g["compare"]["norm"]) == 8 for g in data["groups"])
    assert [r["group"] for r in data["runs"]] == [e for e in range(4) for _ in range(8)]
    head = text[: text.index('<main id="gg-root">')]
    assert "32 runs in 4 experiments" in head
    assert "strategy-3" not in head  # the header names experiments, not 32 runs twice
    assert head.count('<a href="#exp') == 4


def test_group_comes_from_the_config_experiment_first(tmp_path):
    d = write_synthetic_run(tmp_path / "a", steps=30, layers=2, name="temporal-T20/none", spikes=0)
    meta = json.loads((d / "meta.json").read_text())
    meta["config"]["experiment"] = "temporal order T=20"
    (d / "meta.json").write_text(json.dumps(meta))
    from gradguard.report.views import run_group

    assert run_group(open_run(d)) == "temporal order T=20"
    e = write_synthetic_run(tmp_path / "b", steps=30, layers=2, name="plain", spikes=0)
    assert run_group(open_run(e)) == ""


@pytest.mark.filterwarnings("ignore:gradguard")
def test_exploded_run_shows_its_first_incident(tmp_path):
    """The seed MLP without clipping explodes before its first per-layer record (every 50
    steps): the report's per-layer story is the first incident's top layers and window."""
    import torch

    import gradguard as gg
    from gradguard.experiments import seed_mlp
    from gradguard.experiments.strategies import strategies

    none = next(s for s in strategies() if s.name == "none")
    torch.set_num_threads(1)
    mon = gg.Monitor(str(tmp_path / "mlp" / "none"), name="mlp/none", layer_every=50)
    try:
        seed_mlp.run(none, 0, seed_mlp.MLPConfig().tiny(), monitor=mon)
    finally:
        mon.close()
    v = build_views(open_run(mon.run_dir or tmp_path / "mlp" / "none"))
    assert v.heatmap is None and v.incident is not None
    ev = v.events[v.incident]
    assert ev["top_layers"] and ev["window_heatmap"] is not None
    assert any("first incident" in n for n in v.notes)
    assert not any(n.startswith("no per-layer records (layers shards") for n in v.notes)


@pytest.mark.filterwarnings("ignore:gradguard")
def test_report_shows_the_demo_result_next_to_each_run(tmp_path):
    """The same number, with the same label, as the demo's table (item: table and report
    disagreed: mean of 3 seeds vs the last step's loss of seed 0)."""
    from gradguard.experiments.suite import plan, run_suite, write_results

    exps = plan("quick", only=["mlp"], tiny=True)
    rows, folders = run_suite(exps, "quick", 2, names=["none", "global norm"],
                              run_dir=tmp_path / "runs", progress=False, jobs=1)
    written = write_results(rows, tmp_path / "runs")
    assert (tmp_path / "runs" / "demo-results.json").exists()
    out, failed = make_report([tmp_path / "runs"], tmp_path / "r.html")  # found next to the runs
    data = payload_of(out.read_text())
    by_name = {r["name"]: r for r in data["runs"]}
    assert set(by_name) == {"mlp/none", "mlp/global-norm-1"} == set(written)
    for row in rows:
        res = by_name[row.run]["result"]
        assert res["result"] == row.result_text() and res["metric"] == row.metric_name == "train MSE"
        assert res["seeds"] == 2 and res["verdict"] == row.verdict_text()
        assert res["summary"].startswith("mean ± sample sd")
    assert by_name["mlp/none"]["result"]["verdict"] == "diverged"
    assert by_name["mlp/none"]["result"]["seed0"] == "nan"
    clip = next(r for r in rows if r.strategy == "global norm 1")
    assert by_name["mlp/global-norm-1"]["result"]["seed0"] == f"{clip.results[0].value:.3g}"
    # the run order follows the demo's table, not the folder names
    assert [r["name"] for r in data["runs"]] == ["mlp/none", "mlp/global-norm-1"]


def test_static_figures_compare_per_experiment(tmp_path):
    a, b = extreme_runs(tmp_path)
    c = write_synthetic_run(tmp_path / "y" / "one", steps=100, layers=2, name="y/one", spikes=0)
    d = write_synthetic_run(tmp_path / "y" / "two", steps=100, layers=2, name="y/two", spikes=0)
    files = write_figures([open_run(p) for p in (a, b, c, d)], tmp_path / "svg", "svg")
    names = {f.name for f in files}
    assert {"compare-x.svg", "compare-y.svg"} <= names and "compare.svg" not in names
