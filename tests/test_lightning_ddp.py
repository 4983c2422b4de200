"""GuardCallback under Lightning's own DDP strategy (2 CPU processes over gloo) agrees with one
process on the global batch; a NaN on one rank skips the step on both.

Run directly, this file is the training script that Lightning's DDP launcher starts once per
rank (``python tests/test_lightning_ddp.py OUT_DIR``); under pytest it is the test that starts
it, with a hard timeout so that a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 3
Y = torch.randn(64, 1, generator=torch.Generator().manual_seed(1))
STEPS, NAN_AT = 4, 2


def make_module(pl, nan_rank):
    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

        def training_step(self, batch, i):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            if self.global_step == NAN_AT and (nan_rank is None or self.global_rank == nan_rank):
                loss = loss * float("nan")
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.05)
    return Net()


def run(pl, ggl, gg, batch_size, nan_rank, rows=slice(None), **trainer_kw):
    from torch.utils.data import DataLoader, TensorDataset
    model = make_module(pl, nan_rank)
    cb = ggl.GuardCallback(clipper=gg.NormClip(1.0))
    trainer = pl.Trainer(max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", callbacks=[cb], **trainer_kw)
    trainer.fit(model, DataLoader(TensorDataset(X[rows], Y[rows]), batch_size=batch_size,
                                  shuffle=False))
    return model, cb, trainer


def worker(out_dir):  # pragma: no cover - runs in the launched processes
    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl

    import gradguard as gg
    import gradguard.lightning as ggl
    # each rank its own rows (Lightning's DistributedSampler would shuffle): rank r reads rows
    # r, r+2, ..., so the two ranks' batches of step t are rows 16t..16t+15 together
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher for rank 1
    model, cb, trainer = run(pl, ggl, gg, 8, nan_rank=1, rows=slice(rank, None, 2),
                             strategy="ddp", devices=2, use_distributed_sampler=False)
    torch.save({"params": [p.detach().clone() for p in model.parameters()],
                "skipped": cb.skipped_steps, "steps": cb.guards[0].step_count},
               os.path.join(out_dir, f"rank{trainer.global_rank}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    import gradguard as gg
    import gradguard.lightning as ggl
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("LOCAL_RANK", None)
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"2-process DDP run hung (killed after {exc.timeout}s)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == 1 and r0["steps"] == r1["steps"] == STEPS
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # every rank took (and refused) the same updates
    warnings.filterwarnings("ignore")
    # one process on the global batch (rows 16t..16t+15 at step t), the NaN in that batch
    model, cb, _ = run(pl, ggl, gg, 16, nan_rank=None, devices=1)
    assert cb.skipped_steps == 1
    for a, b in zip(r0["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":  # pragma: no cover
    worker(sys.argv[1])
