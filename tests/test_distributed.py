"""Distributed training on CPU/gloo: DDP, FSDP2, FSDP2 + TP (2 x 2) and two pipeline stages.

Each test launches N ranks of ``tests/dist/worker.py`` (plain subprocesses with the
torch.distributed environment variables set) under a hard timeout that fails the test
instead of hanging, and reads each rank's verdict. What each case checks is in the worker's
docstrings: norms against a single-process float64 reference of the same model and global
batch, NaN on one rank or shard skipping on every rank with bit-identical state, training
with the default clipper matching the single-process run, one all-reduce per call, and no
torch >= 2.6 API on the path (torch 2.4 compatibility).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORKER = Path(__file__).parent / "dist" / "worker.py"
# generous: the ranks start torch on contended cores; a hang still fails, it does not block
TIMEOUT = float(os.environ.get("GRADGUARD_DIST_TIMEOUT", 300))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cases: list[str], n: int, out: Path, timeout: float = TIMEOUT) -> dict[str, str]:
    """Run ``cases`` in turn on ``n`` gloo ranks (one start-up); return, per case, "" when
    every rank passed it, else the ranks' tracebacks (or why there is no verdict)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(n), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               GRADGUARD_THREADS="1")
    procs = []
    logs = []
    for r in range(n):
        log = open(out / f"r{r}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), ",".join(cases), str(out)],
                                      env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                      stdout=log, stderr=subprocess.STDOUT))
    timed_out = False
    try:
        for p in procs:
            try:
                p.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for p in procs:  # only the processes this launch started
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = []
    for log in logs:
        log.seek(0)
        tails.append(log.read()[-3000:])
        log.close()
    result = {}
    for case in cases:
        errors = []
        for r in range(n):
            f = out / f"{case}-r{r}.json"
            verdict = json.loads(f.read_text()) if f.exists() else None
            if verdict is None:
                why = "timed out (a rank hung)" if timed_out else "no verdict"
                errors.append(f"--- rank {r}: {why}; an earlier case may have failed; log "
                              f"tail:\n{tails[r]}")
            elif not verdict.get("ok"):
                errors.append(f"--- rank {r}:\n{verdict['error']}")
        result[case] = "\n".join(errors)
    return result


TWO = ["fsdp2", "fsdp2_train", "ddp", "pipeline", "monitor"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The 2-rank cases, run once in the same two processes."""
    return launch(TWO, 2, tmp_path_factory.mktemp("dist2"))


def _verdict(results: dict[str, str], case: str) -> None:
    assert not results[case], f"{case}:\n{results[case]}"


def test_fsdp2_norms_and_clip(two_ranks):
    """grad_norm / clip_grad_norm_ on FSDP2 (uneven shards, p = 1, 2, inf, float32 and
    float64): one all-reduce, global norms equal to the float64 reference."""
    _verdict(two_ranks, "fsdp2")


def test_fsdp2_guard_training_and_nan_skip(two_ranks):
    """Guard(model) with the default clipper and fused AdamW on FSDP2: K steps equal the
    single-process run; NaN in one shard skips on both ranks, state bit-identical."""
    _verdict(two_ranks, "fsdp2_train")


def test_ddp_norms_training_and_nan_skip(two_ranks):
    """DDP with gradient_as_bucket_view: names without ``module.``, norms, training and a NaN
    on one rank as above; the loss and flag in one all-reduce over DDP's group."""
    _verdict(two_ranks, "ddp")


def test_pipeline_two_stages(two_ranks):
    """Two pipeline stages with pp_group: global total, per-stage per-tensor norms, a NaN
    on stage 0 skips both stages, the loss-spike limits agree."""
    _verdict(two_ranks, "pipeline")


def test_monitor_one_run_folder(two_ranks):
    """A 2-rank FSDP2 run with a Monitor: one run (and report), global step and layer rows
    (norms, max |g|, non-finite count, update ratio) equal to the single-process run's, a NaN
    shard and a Monitor "skip" detector skip the same steps on every rank; 1 all-reduce per
    step, 3 on layer steps."""
    _verdict(two_ranks, "monitor")


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """The 4-rank cases, run once in the same four processes."""
    return launch(FOUR, 4, tmp_path_factory.mktemp("dist4"))


FOUR = ["tp2d", "fsdp2"]


def test_fsdp2_tp_2x2_mixed_meshes(four_ranks):
    """FSDP2 + TP on a 2 x 2 mesh with a dp-only LayerNorm (4 ranks): torch's clip raises
    (pytorch#180346); here one all-reduce gives the reference norms, a NaN on one shard of
    one rank skips on all four with state bit-identical."""
    _verdict(four_ranks, "tp2d")


def test_fsdp2_norms_and_clip_four_ranks(four_ranks):
    """The FSDP2 norm and clip checks at N = 4 (33 rows sharded 9 + 9 + 9 + 6, a 1-element
    tensor empty on three ranks)."""
    _verdict(four_ranks, "fsdp2")
