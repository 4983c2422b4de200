"""GuardTrainer on 2 CPU processes (torchrun, gloo) agrees with one process on the global
batch; a NaN on one rank is refused on both and the LR schedule holds on both.

Run by torchrun, this file is the training script (``torchrun --nproc_per_node 2
tests/test_huggingface_ddp.py OUT_DIR``); under pytest it is the test that starts it, with a
hard timeout so that a hang fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch

STEPS, NAN_AT = 3, 1


def build(out_dir, world, nan_rank):
    from torch.utils.data import SequentialSampler
    from transformers import TrainingArguments

    import gradguard as gg
    import gradguard.huggingface as gghf

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.l = torch.nn.Linear(4, 2)
            self.calls = 0

        def forward(self, x, labels):
            loss = torch.nn.functional.mse_loss(self.l(x), labels)
            if self.training:
                self.calls += 1
                rank = int(os.environ.get("RANK", 0))
                if self.calls - 1 == NAN_AT and (nan_rank is None or rank == nan_rank):
                    loss = loss * float("nan")
            return {"loss": loss}

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(4, generator=g) * 3, "labels": torch.randn(2, generator=g)}

    class Sequential(gghf.GuardTrainer):
        # accelerate shards batches of a sequential sampler: rank r takes batch 2t + r, so
        # the two ranks' batches of step t are rows 16t..16t+15 together
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    args = TrainingArguments(output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=16 // world,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             learning_rate=0.05, lr_scheduler_type="linear", seed=0,
                             logging_steps=1, dataloader_num_workers=0,
                             ddp_backend="gloo" if world > 1 else None)
    return Sequential(model=Net(), args=args, train_dataset=DS(),
                      callbacks=[gghf.GuardCallback(clipper=gg.NormClip(1.0))])


def worker(out_dir):  # pragma: no cover - runs in the torchrun processes
    warnings.filterwarnings("ignore")
    tr = build(out_dir, 2, nan_rank=1)
    tr.train()
    torch.save({"params": [p.detach().clone() for p in tr.model.parameters()],
                "skipped": tr.guard_callback.guard.skipped_steps,
                "lr": tr.lr_scheduler.get_last_lr()},
               os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path):
    pytest.importorskip("transformers")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TRANSFORMERS_OFFLINE="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           os.path.abspath(__file__), str(tmp_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"2-process Trainer run hung (killed after {exc.timeout}s)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == 1
    assert r0["lr"] == r1["lr"]
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    warnings.filterwarnings("ignore")
    one = build(str(tmp_path / "one"), 1, nan_rank=None)
    one.train()
    assert one.guard_callback.guard.skipped_steps == 1
    assert one.lr_scheduler.get_last_lr() == r0["lr"]
    for a, b in zip(r0["params"], one.model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":  # pragma: no cover
    worker(sys.argv[1])
