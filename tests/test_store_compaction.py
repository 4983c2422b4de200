"""Compaction: few files however long the run, no row lost or read twice if killed midway
(also by SIGKILL in a subprocess), marks respected; a model-based property test of the
writer/reader pair; the many-flushes benchmark case run small."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
from fixtures_store import NAMES, flush, write_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradguard.store import RunStoreWarning, RunWriter, compact_run, load_run
from gradguard.store import compact as C
from gradguard.store import reader as R

REPO = Path(__file__).resolve().parents[1]


def quiet_load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunStoreWarning)
        return load_run(path, **kw)


def shard_files(path: Path, kind: str | None = None) -> list[str]:
    kinds = ("steps-", "layers-") if kind is None else (f"{kind}-",)
    return sorted(p.name for p in Path(path).iterdir() if p.name.startswith(kinds))


def same_frames(a, b) -> None:
    pd.testing.assert_frame_equal(a.steps, b.steps)
    pd.testing.assert_frame_equal(a.layers, b.layers)
    pd.testing.assert_frame_equal(a.events, b.events)


def test_auto_compaction_bounds_the_files_and_keeps_every_row(tmp_path):
    off = write_run(tmp_path / "off", 1, 2000, compact="off", events_at=range(5, 2000, 50))
    on = write_run(tmp_path / "on", 1, 2000, close=False, events_at=range(5, 2000, 50))
    assert len(shard_files(off.path)) == 400  # one per flush and kind
    live = shard_files(on.path, "steps")
    assert len(live) < 2 * C.FANOUT and len(live) == len(shard_files(on.path, "layers"))
    assert "steps-r0-000000-000015.parquet" in live  # 16 flushes merged on the way
    same_frames(quiet_load(on.path), quiet_load(off.path))  # readable while written
    on.close()
    assert shard_files(on.path) == ["layers-r0-000000-000199.parquet", "steps-r0-000000-000199.parquet"]
    same_frames(quiet_load(on.path), quiet_load(off.path))


def test_compaction_killed_before_removing_its_parts(tmp_path):
    w = write_run(tmp_path / "x", 1, 400, compact="off", events_at=[7])
    before = quiet_load(w.path)
    parts = tmp_path / "parts"
    shutil.copytree(w.path, parts)
    assert compact_run(w.path) == 2
    for p in parts.iterdir():  # the merged shards written, the parts not yet removed
        if p.name.startswith(("steps-", "layers-")):
            shutil.copy(p, w.path / p.name)
    assert len(shard_files(w.path)) == 82
    same_frames(quiet_load(w.path), before)  # the parts inside the merged range are ignored
    RunWriter(w.path, mode="resume").close()  # a resumed writer removes them
    assert len(shard_files(w.path)) == 2
    same_frames(quiet_load(w.path), before)


def test_a_reader_racing_a_compaction_lists_again(tmp_path, monkeypatch):
    w = write_run(tmp_path / "x", 1, 200, compact="off")
    before = quiet_load(w.path)
    real, done, lock = R.read_shard, [], threading.Lock()

    def racing(s, schema):
        with lock:
            if not done:
                done.append(compact_run(w.path))  # another process merges under our feet
        return real(s, schema)

    monkeypatch.setattr(R, "read_shard", racing)
    same_frames(quiet_load(w.path), before)
    assert done == [2]


def test_compaction_never_merges_across_a_resume_mark(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "FANOUT", 2)
    write_run(tmp_path / "x", 1, 80, every=5, close=False)._release()  # killed at step 80
    w = RunWriter(tmp_path / "x", mode="resume")
    w.resume_from(30)
    for lo in range(31, 61, 5):
        flush(w, range(lo, lo + 5), tag=0.5)
    w.close()
    run = quiet_load(tmp_path / "x")
    assert run.steps.step.tolist() == list(range(1, 61))
    tags = (run.steps.total_norm - run.steps.step).tolist()
    assert tags == [0.0] * 30 + [0.5] * 30
    assert len(run.layers) == 60 * len(NAMES)
    seqs = [tuple(map(int, n[:-8].split("-")[2:])) for n in shard_files(tmp_path / "x", "steps")]
    mark = R.read_marks(tmp_path / "x", 0)[0]["seq"]
    assert all(not (lo < mark <= hi) for lo, *rest in seqs for hi in [rest[-1] if rest else lo])


def test_final_plan_caps_rows_and_keeps_big_shards(monkeypatch):
    monkeypatch.setattr(C, "MAX_ROWS", 100)
    segs = [C.Segment(i, i, r, 1, Path(f"s{i}")) for i, r in enumerate([30, 30, 30, 30, 60, 10, 10])]
    groups = C.plan_final(segs, [])
    assert [[s.lo for s in g] for g in groups] == [[0, 1, 2], [5, 6]]  # 60 >= 50 stays alone
    assert [[s.lo for s in g] for g in C.plan_final(segs, [2])] == [[0, 1], [2, 3], [5, 6]]


# -- model-based: any sequence of flushes, resumes and reopenings reads back as the model ----
OPS = st.lists(st.one_of(st.tuples(st.just("flush"), st.integers(1, 7)),
                         st.tuples(st.just("resume"), st.integers(0, 12)),
                         st.tuples(st.just("reopen"), st.just(0))), min_size=1, max_size=30)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, fanout=st.integers(2, 4), max_rows=st.sampled_from([12, 40, 10_000]))
def test_writer_and_reader_agree_with_a_model(tmp_path_factory, ops, fanout, max_rows):
    mp = pytest.MonkeyPatch()
    mp.setattr(C, "FANOUT", fanout)
    mp.setattr(C, "MAX_ROWS", max_rows)
    try:
        path = tmp_path_factory.mktemp("run") / "x"
        model: dict[int, float] = {}  # step -> tag of its newest write
        events: dict[int, float] = {}
        cur = 0
        w = RunWriter(path)
        w.write_meta({"name": "x", "layers": NAMES})
        for i, (op, n) in enumerate(ops):
            if op == "flush":
                steps = list(range(cur + 1, cur + n + 1))
                ev = [{"step": steps[0], "rule": "spike", "value": float(i)}]
                flush(w, steps, tag=i / 100, layers=i % 2 == 0, events=ev)
                model.update({s: i / 100 for s in steps})
                events[steps[0]] = float(i)
                cur += n
            else:
                w.close()
                w = RunWriter(path, mode="resume")
                if op == "resume":
                    cur = max(0, cur - n)
                    w.resume_from(cur)
                    model = {s: t for s, t in model.items() if s <= cur}
                    events = {s: v for s, v in events.items() if s <= cur}
            run = quiet_load(path)  # also while the writer is open
            assert run.steps.step.tolist() == sorted(model)
        w.close()
        run = quiet_load(path)
        assert run.steps.step.tolist() == sorted(model)
        got = (run.steps.total_norm - run.steps.step).round(6).tolist()
        assert got == [round(model[s], 6) for s in sorted(model)]
        assert run.events.step.tolist() == sorted(events)
        assert run.events.value.tolist() == [events[s] for s in sorted(events)]
        lay = run.layers
        assert lay.step.is_monotonic_increasing and set(lay.step) <= set(model)
        assert (lay.groupby("step").size() == len(NAMES)).all()
        assert ((lay.grad_norm - lay.step).round(3).groupby(lay.step).min().to_dict()
                == {s: round(model[s], 3) for s in set(lay.step)})
    finally:
        mp.undo()


# -- SIGKILL ----------------------------------------------------------------------------------
KILLED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import gradguard.store.compact as C
    C.FANOUT = 2  # merges at almost every flush: the kill often lands inside one
    from fixtures_store import flush
    from gradguard.store import RunWriter
    w = RunWriter({path!r})
    w.write_meta({{"name": "x", "layers": ["enc", "mid", "head"]}})
    lo = 1
    while True:
        flush(w, range(lo, lo + 10), events=[{{"step": lo, "rule": "spike"}}])
        print(lo + 9, flush=True)
        lo += 10
""")


@pytest.mark.parametrize("after", [3, 17, 40])
def test_sigkill_keeps_every_finished_flush(tmp_path, after):
    path = tmp_path / "x"
    code = KILLED.format(tests=str(REPO / "tests"), path=str(path))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    done, deadline = 0, time.monotonic() + 240
    try:
        while done < after * 10:
            line = p.stdout.readline()
            assert line and time.monotonic() < deadline, "writer died or hung"
            done = int(line)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait(timeout=60)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        run = load_run(path)
    # at most the line being appended when the kill came is cut short
    assert all("cut short" in str(r.message) for r in rec if r.category is RunStoreWarning)
    steps = run.steps.step.tolist()
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= done  # nothing lost, no dups
    assert run.layers.groupby("step").size().eq(len(NAMES)).all()
    assert run.events.step.is_unique
    w = RunWriter(path, mode="resume")  # the dead writer's lock is stale: taken over
    flush(w, range(len(steps) + 1, len(steps) + 11))
    w.close()
    assert quiet_load(path).steps.step.tolist() == list(range(1, len(steps) + 11))


# -- the many-flushes benchmark case, small -----------------------------------------------------
def test_report_bench_many_flushes_small(tmp_path):
    spec = importlib.util.spec_from_file_location("report_bench", REPO / "benchmarks" / "report_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.FLUSH_CASES == [(1_000_000, 500, 100, 100)]
    rows = {r["case"]: r for r in bench.flush_case(tmp_path, 3000, 20, 10, 10)}
    assert rows["clean close (compacted)"]["files"] == 2
    assert rows["killed before close"]["files"] < 4 * C.FANOUT
    assert rows["compaction off"]["files"] == 600
    assert next(r for c, r in rows.items() if c.startswith("then compact_run"))["files"] == 2
    assert {r["steps"] for r in rows.values()} == {3000}
    assert {r["rows"] for r in rows.values()} == {300 * 20}
