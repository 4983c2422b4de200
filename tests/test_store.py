"""The run store: run-folder policy (new / resume / overwrite, lock), resume supersedes,
damaged files are never silent, ranks. Every folder is written through RunWriter."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_store import NAMES, flush, write_run

import gradguard as gg
from gradguard.store import (
    LAYER_COLUMNS,
    STEP_COLUMNS,
    RunLockedError,
    RunNotFoundError,
    RunStoreWarning,
    RunWriter,
    StoreError,
    find_runs,
    load_run,
)
from gradguard.store import schema as S

REPO = Path(__file__).resolve().parents[1]


def quiet_load(path, **kw):
    """load_run that fails the test on any RunStoreWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunStoreWarning)
        return load_run(path, **kw)


# -- one owner of the format ----------------------------------------------------------------
def test_one_format_owner():
    from gradguard.monitor import store as old
    from gradguard.report import data

    assert old.STEPS_SCHEMA is S.STEPS_SCHEMA and old.RunWriter is RunWriter
    assert old.load_run is load_run and gg.load_run is load_run
    assert list(data.STEP_DTYPES) == list(STEP_COLUMNS) == S.STEPS_SCHEMA.names
    assert list(data.LAYER_DTYPES) == list(LAYER_COLUMNS)
    assert S.shard_name("steps", 3, 12) == "steps-r3-000012.parquet"
    assert S.SHARD_RE.match(S.shard_name("layers", 0, 0, 99)).groups() == ("layers", "0", "000000", "000099")
    assert "torch" not in sys.modules or True  # the import check below runs in a fresh process
    code = "import sys, gradguard.store as s; s.load_run; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_synthetic_runs_are_written_by_the_writer(tmp_path):
    from gradguard.report.synthetic import write_synthetic_run

    d = write_synthetic_run(tmp_path / "s", steps=300, layers=4, shard_steps=100)
    names = sorted(p.name for p in d.iterdir())
    assert "events-r0.jsonl" in names and "steps-r0-000002.parquet" in names
    assert pq.read_schema(d / "layers-r0-000000.parquet").field("layer").type == S.LAYER_TYPE
    run = quiet_load(d)
    assert run.steps.step.tolist() == list(range(300)) and len(run.events) >= 1
    again = write_synthetic_run(tmp_path / "s", steps=50, layers=4)
    assert again == tmp_path / "s-2"  # a second synthetic run never mixes into the first


# -- re-runs never append silently ------------------------------------------------------------
def test_rerun_goes_to_a_versioned_folder(tmp_path):
    a = write_run(tmp_path / "x", 1, 10)
    b = write_run(tmp_path / "x", 1, 10)
    c = write_run(tmp_path / "x", 1, 10)
    assert (a.path, b.path, c.path) == (tmp_path / "x", tmp_path / "x-2", tmp_path / "x-3")
    for p in (a.path, b.path, c.path):
        assert quiet_load(p).steps.step.tolist() == list(range(1, 11))  # once each, not 2x


def test_an_empty_or_foreign_folder_is_used_as_it_is(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "README.txt").write_text("mine")
    w = write_run(tmp_path / "x", 1, 5)
    assert w.path == tmp_path / "x"
    assert (tmp_path / "x" / "README.txt").read_text() == "mine"


def test_resume_appends_to_the_run(tmp_path):
    write_run(tmp_path / "x", 1, 30)
    w = write_run(tmp_path / "x", 31, 50, mode="resume")
    assert w.path == tmp_path / "x"
    assert quiet_load(tmp_path / "x").steps.step.tolist() == list(range(1, 51))


def test_overwrite_removes_only_run_store_files(tmp_path):
    write_run(tmp_path / "x", 1, 30, events_at=[5])
    (tmp_path / "x" / "notes.txt").write_text("keep me")
    (tmp_path / "x" / "sub").mkdir()
    w = write_run(tmp_path / "x", 1, 5, tag=0.5, mode="overwrite")
    assert w.path == tmp_path / "x"
    run = quiet_load(tmp_path / "x")
    assert run.steps.step.tolist() == [1, 2, 3, 4, 5]
    assert run.steps.total_norm.tolist() == [1.5, 2.5, 3.5, 4.5, 5.5]
    assert run.events.empty
    assert (tmp_path / "x" / "notes.txt").read_text() == "keep me" and (tmp_path / "x" / "sub").is_dir()


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="'append'"):
        RunWriter(tmp_path / "x", mode="append")
    with pytest.raises(ValueError, match="-1"):
        RunWriter(tmp_path / "x", rank=-1)
    with pytest.raises(TypeError, match="None"):
        RunWriter(None)
    with pytest.raises(ValueError, match="'lots'"):
        RunWriter(tmp_path / "x", compact="lots")
    w = RunWriter(tmp_path / "x", lazy=True)
    with pytest.raises(ValueError, match="-3"):
        w.resume_from(-3)
    with pytest.raises(ValueError, match="'bogus'"):
        w.write_shard("bogus", pa.table({"step": [1]}))
    with pytest.raises(TypeError, match="'a'"):
        load_run(tmp_path, rank="a")


# -- the lock ---------------------------------------------------------------------------------
def test_second_live_writer_is_refused_or_versioned(tmp_path):
    first = RunWriter(tmp_path / "x")
    first.write_meta({"name": "x", "layers": NAMES})
    with pytest.raises(RunLockedError, match="writer-r0.lock") as exc:
        RunWriter(tmp_path / "x", mode="resume")
    assert str(os.getpid()) in str(exc.value) and socket.gethostname() in str(exc.value)
    with pytest.raises(RunLockedError):
        RunWriter(tmp_path / "x", mode="overwrite")
    other = RunWriter(tmp_path / "x")  # mode "new": a live run is a run
    assert other.path == tmp_path / "x-2"
    other.close()
    first.close()
    assert not (tmp_path / "x" / "writer-r0.lock").exists()
    RunWriter(tmp_path / "x", mode="resume").close()  # free again


def test_the_lock_is_one_however_the_folder_is_spelled(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    os.symlink(tmp_path / "runs", tmp_path / "link")
    w = RunWriter(tmp_path / "runs" / "x")
    monkeypatch.chdir(tmp_path)
    for spelled in ("runs/x", "link/x", "./runs/../runs/x"):
        with pytest.raises(RunLockedError):
            RunWriter(spelled, mode="resume")
    w.close()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    write_run(tmp_path / "x", 1, 10)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=60)
    lock = tmp_path / "x" / "writer-r0.lock"
    lock.write_text(json.dumps({"pid": p.pid, "host": socket.gethostname(), "token": "t"}))
    w = RunWriter(tmp_path / "x", mode="resume")  # stale: its process is gone
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    w.close()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "token": "t"}))
    with pytest.raises(RunLockedError, match="elsewhere.example"):
        RunWriter(tmp_path / "x", mode="resume")  # another host: cannot be checked, respected
    lock.unlink()


def test_a_writer_dropped_without_close_frees_its_lock(tmp_path):
    w = RunWriter(tmp_path / "x")
    w.write_meta({"name": "x"})
    del w
    RunWriter(tmp_path / "x", mode="resume").close()


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from fixtures_store import flush
    from gradguard.store import RunWriter
    w = RunWriter({path!r}, compact="off")
    w.write_meta({{"name": "x", "layers": ["enc", "mid", "head"]}})
    print(w.path, flush=True)
    for lo in range(1, 301, 10):
        flush(w, range(lo, lo + 10), layers=False)
        time.sleep(0.005)
    w.close()
""")


def test_two_concurrent_writers_lose_nothing(tmp_path):
    """Two processes writing the same folder at once (600 rows): each gets its own folder and
    keeps its 300 rows (one folder used to keep 300-320 of the 600)."""
    code = WRITER.format(tests=str(REPO / "tests"), path=str(tmp_path / "x"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(outs) == [str(tmp_path / "x"), str(tmp_path / "x-2")]
    for o in outs:
        assert quiet_load(o).steps.step.tolist() == list(range(1, 301))


# -- lazy claim, resume supersedes -------------------------------------------------------------
def test_lazy_writer_claims_at_the_first_write(tmp_path):
    write_run(tmp_path / "x", 1, 10)
    w = RunWriter(tmp_path / "y", lazy=True)
    assert not (tmp_path / "y").exists() and not w.claimed
    w.write_meta({"name": "y"})
    assert w.claimed and (tmp_path / "y" / "writer-r0.lock").exists()
    w.close()
    # a lazy writer whose state is loaded from a checkpoint before training resumes the run
    w = RunWriter(tmp_path / "x", lazy=True)
    w.resume_from(10)
    flush(w, range(11, 21))
    w.close()
    assert w.path == tmp_path / "x" and w.mode == "resume"
    assert quiet_load(tmp_path / "x").steps.step.tolist() == list(range(1, 21))


def test_resume_from_an_older_checkpoint_supersedes(tmp_path):
    """The issue's "77 steps (1-70)": a run flushed up to step 77, resumed from a checkpoint
    at step 70, returns 70 steps, then each step once (the newest copy), events likewise."""
    write_run(tmp_path / "x", 1, 77, events_at=[5, 72, 76])
    w = RunWriter(tmp_path / "x", mode="resume")
    w.resume_from(70)
    run = quiet_load(tmp_path / "x")
    assert run.steps.step.tolist() == list(range(1, 71))
    assert run.layers.step.unique().tolist() == list(range(1, 71))
    assert run.events.step.tolist() == [5]
    flush(w, range(71, 81), tag=0.25, events=[{"step": 72, "rule": "spike", "value": 1.0}])
    w.close()
    run = quiet_load(tmp_path / "x")
    assert run.steps.step.tolist() == list(range(1, 81))
    new = run.steps.set_index("step").total_norm
    assert new.loc[70] == 70.0 and new.loc[71] == 71.25 and new.loc[77] == 77.25
    assert len(run.layers) == 80 * len(NAMES) and run.layers.step.is_monotonic_increasing
    assert run.events.step.tolist() == [5, 72] and run.events.value.tolist()[1] == 1.0


def test_resume_twice_and_windows_of_the_abandoned_steps(tmp_path):
    w = write_run(tmp_path / "x", 1, 50, close=False)
    w.write_window(45, pa.table({"step": [45], "layer": ["enc"], "grad_norm": [1.0]},
                                schema=S.WINDOW_SCHEMA))
    w.close()
    w = RunWriter(tmp_path / "x", mode="resume")
    w.resume_from(40)
    flush(w, range(41, 46), tag=0.5)
    w.close()
    w = RunWriter(tmp_path / "x", mode="resume")
    w.resume_from(30)
    flush(w, range(31, 36), tag=0.75)
    w.close()
    run = quiet_load(tmp_path / "x")
    assert run.steps.step.tolist() == list(range(1, 36))
    assert run.steps.total_norm.iloc[-1] == 35.75
    assert run.windows() == []  # the dump of step 45 belonged to an abandoned continuation
    assert (tmp_path / "x" / S.SUPERSEDED_DIR).is_dir()  # kept aside, not deleted


def test_resume_from_moves_back_from_a_fresh_versioned_folder(tmp_path):
    """A writer claimed eagerly in mode "new" (so x-2) and then told to resume: it goes back
    to x, carrying its meta, and removes the empty x-2."""
    write_run(tmp_path / "x", 1, 20)
    w = RunWriter(tmp_path / "x")
    w.write_meta({"name": "x", "layers": NAMES, "notes": ["resumed"]})
    assert w.path == tmp_path / "x-2"
    w.resume_from(20)
    flush(w, range(21, 31))
    w.close()
    assert w.path == tmp_path / "x" and not (tmp_path / "x-2").exists()
    run = quiet_load(tmp_path / "x")
    assert run.steps.step.tolist() == list(range(1, 31)) and run.meta["notes"] == ["resumed"]
    w = write_run(tmp_path / "y", 1, 5, close=False)
    with pytest.raises(StoreError, match="already wrote"):
        w.resume_from(3, tmp_path / "x")
    w.close()
    with pytest.raises(StoreError, match="closed"):
        w.write_meta({})


def test_rows_stored_twice_without_a_mark_warn_and_keep_the_newest(tmp_path):
    write_run(tmp_path / "x", 1, 77)
    write_run(tmp_path / "x", 71, 80, tag=0.5, mode="resume")  # no resume_from: a user's slip
    with pytest.warns(RunStoreWarning, match=r"\(71-77\) were stored twice"):
        run = load_run(tmp_path / "x")
    assert run.steps.step.tolist() == list(range(1, 81))
    assert run.steps.set_index("step").total_norm.loc[75] == 75.5
    assert len(run.layers) == 80 * len(NAMES)


# -- damaged files are never silent -----------------------------------------------------------
def test_damaged_and_foreign_shards_are_named(tmp_path):
    write_run(tmp_path / "x", 1, 100, compact="off")
    shard = tmp_path / "x" / "steps-r0-000003.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.warns(RunStoreWarning, match="steps-r0-000003.parquet: unreadable shard"):
        run = load_run(tmp_path / "x")
    assert len(run.steps) == 90 and any("steps-r0-000003" in n for n in run.notes)
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), tmp_path / "x" / "layers-r0-000004.parquet")
    with pytest.warns(RunStoreWarning, match="layers-r0-000004.parquet: foreign schema"):
        run = load_run(tmp_path / "x")
    assert run.layers.step.nunique() == 90


def test_bad_meta_and_event_lines_warn_not_raise(tmp_path):
    w = write_run(tmp_path / "x", 1, 20, events_at=[3, 13])
    (w.path / "meta.json").write_bytes(b'{"name": "caf\xe9", "layers": ["enc", "mid", "head"]}')
    with open(w.path / "events-r0.jsonl", "a") as f:
        f.write('{"step": null, "rule": "spike"}\n[1, 2]\n{"step": "abc"}\n')
    with pytest.warns(RunStoreWarning) as rec:
        run = load_run(w.path)
    msgs = " | ".join(str(r.message) for r in rec)
    assert "not UTF-8" in msgs and "line(s) 3, 4, 5" in msgs
    assert run.meta["name"] == "caf\ufffd" and run.events.step.tolist() == [3, 13]
    (w.path / "meta.json").write_text(json.dumps({"name": "x", "layers": 5}))
    with pytest.warns(RunStoreWarning, match='"layers" is 5'):
        run = load_run(w.path)
    assert run.meta["layers"] == NAMES and list(run.layers.layer.cat.categories) == NAMES


def test_meta_with_layers_5_reports_and_inspects(tmp_path, capsys):
    from gradguard.report import open_run, render_html

    w = write_run(tmp_path / "x", 1, 20)
    (w.path / "meta.json").write_text(json.dumps({"name": "x", "layers": 5}))
    run = open_run(w.path)
    assert any('"layers" is 5' in n for n in run.notes) and run.layer_names == NAMES
    assert "gradguard" in render_html([run])
    from gradguard.cli import main

    assert main(["inspect", str(w.path)]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(RunNotFoundError, match="no run folder"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFoundError, match="not a gradguard run folder"):
        load_run(tmp_path / "empty")
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunNotFoundError, match="is a file"):
        load_run(tmp_path / "f")
    write_run(tmp_path / "runs" / "a", 1, 5)
    write_run(tmp_path / "runs" / "b" / "c", 1, 5)
    with pytest.raises(RunNotFoundError, match=r"2 run folder\(s\): a, b/c"):
        load_run(tmp_path / "runs")
    assert find_runs(tmp_path / "runs") == [tmp_path / "runs" / "a", tmp_path / "runs" / "b" / "c"]


class _FullDisk:
    """A file object whose write fails as on a full disk (after creating the file)."""

    def __init__(self, path, mode="r", *a, **k):
        self.f = open(path, mode, *a, **k)  # noqa: SIM115

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_failed_atomic_write_leaves_no_tmp(tmp_path, monkeypatch):
    from gradguard.store import _io

    w = RunWriter(tmp_path / "x")
    monkeypatch.setattr(_io, "open", _FullDisk, raising=False)
    with pytest.raises(OSError, match="No space"):
        w.write_meta({"name": "x"})
    monkeypatch.undo()

    def half(table, where, **k):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", half)
    with pytest.raises(OSError, match="No space"):
        flush(w, [1, 2])
    with pytest.raises(OSError, match="No space"):
        w.write_window(2, pa.table({"step": [1], "layer": ["a"], "grad_norm": [1.0]}))
    monkeypatch.undo()
    assert sorted(p.name for p in w.path.iterdir()) == ["writer-r0.lock"]
    w.close()


# -- ranks --------------------------------------------------------------------------------------
def test_each_rank_writes_its_own_files_and_load_run_merges(tmp_path):
    a = write_run(tmp_path / "ddp", 1, 30, events_at=[4], rank=0, close=False)
    b = write_run(tmp_path / "ddp", 1, 30, events_at=[4, 5], rank=1, tag=0.5, close=False)
    assert a.path == b.path == tmp_path / "ddp"  # rank 1 joins rank 0's folder
    a.close()
    b.close()
    names = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert {S.file_rank(n) for n in names} == {0, 1, None}  # None: meta.json only
    assert "events-r1.jsonl" in names and "meta.json" in names
    run = quiet_load(tmp_path / "ddp")
    assert list(zip(run.steps.step, run.steps["rank"]))[:4] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert run.events[["step", "rank"]].values.tolist() == [[4, 0], [4, 1], [5, 1]]
    one = quiet_load(tmp_path / "ddp", rank=1)
    assert one.steps["rank"].unique().tolist() == [1] and len(one.steps) == 30
    assert one.events.step.tolist() == [4, 5] and (one.layers["rank"] == 1).all()
    assert len(quiet_load(tmp_path / "ddp", rank=[0, 1]).steps) == 60
    # a re-run of the 2-rank job: both ranks pick the same fresh folder
    c = write_run(tmp_path / "ddp", 1, 5, rank=0, close=False)
    d = write_run(tmp_path / "ddp", 1, 5, rank=1, close=False)
    assert c.path == d.path == tmp_path / "ddp-2"
    c.close()
    d.close()


def test_rank_0_joins_a_live_rank_that_flushed_first(tmp_path):
    b = write_run(tmp_path / "ddp", 1, 10, rank=1, close=False)  # rank 1 was faster
    a = write_run(tmp_path / "ddp", 1, 10, rank=0, close=False)
    assert a.path == b.path == tmp_path / "ddp"
    a.close()
    b.close()
    # once that job is over its rank-1 files are a run: rank 0 of a new job does not mix in
    (tmp_path / "old").mkdir()
    write_run(tmp_path / "old", 1, 10, rank=1)
    assert write_run(tmp_path / "old", 1, 10, rank=0).path == tmp_path / "old-2"


def test_events_of_earlier_versions_are_read(tmp_path):
    w = write_run(tmp_path / "x", 1, 10)
    ev = {"step": 2, "rule": "spike", "value": 1.0}
    (w.path / "events.jsonl").write_text(json.dumps(ev) + "\n")
    run = quiet_load(w.path)
    assert run.events.step.tolist() == [2] and run.events["rank"].tolist() == [0]


def test_old_shards_without_columns_read_with_defaults(tmp_path):
    (tmp_path / "old").mkdir()
    pq.write_table(pa.table({"step": np.arange(5), "total_norm": np.ones(5)}),
                   tmp_path / "old" / "steps-r2-000000.parquet")
    with pytest.warns(RunStoreWarning, match="meta.json missing"):
        run = load_run(tmp_path / "old")
    s = run.steps
    assert s["rank"].tolist() == [2] * 5 and s.clipped.dtype == bool and not s.clipped.any()
    assert s.loss.isna().all() and list(s.columns) == list(STEP_COLUMNS)
