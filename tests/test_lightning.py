"""gradguard.lightning.GuardCallback inside a real pytorch-lightning Trainer (CPU, tiny model)."""

from __future__ import annotations

import pathlib
import re
import warnings

import numpy as np
import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")
ggl = pytest.importorskip("gradguard.lightning")
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import gradguard as gg  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 3
Y = torch.randn(64, 1, generator=torch.Generator().manual_seed(1))


class Net(pl.LightningModule):
    def __init__(self, nan_at=None, manual=False, fused=False, opt="adamw", sched=False,
                 poison=float("nan")):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.nan_at, self.fused, self.opt, self.sched = nan_at, fused, opt, sched
        self.poison = poison  # the loss factor at step nan_at: NaN, or a large finite spike
        self.automatic_optimization = not manual
        self.grads: list[list[np.ndarray]] = []   # float64 copies of the pre-clip gradients

    def training_step(self, batch, i):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.nan_at is not None and self.global_step == self.nan_at:
            loss = loss * self.poison
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            if self.sched:
                self.lr_schedulers().step()
            return None
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.grads.append([p.grad.detach().double().numpy().copy() for p in self.parameters()])

    def configure_optimizers(self):
        if self.opt == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        opt = torch.optim.AdamW(self.parameters(), lr=0.05, fused=self.fused or None)
        if self.sched:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


class Logged(pl.Callback):
    """Every value logged under gradguard/, per step (read from trainer.callback_metrics)."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()
                          if k.startswith("gradguard/")})


def fit(model, callbacks, steps=6, rows=slice(None), **kw):
    kw.setdefault("max_steps", steps)
    kw.setdefault("logger", False)
    trainer = pl.Trainer(enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1,
                         callbacks=callbacks, **kw)
    trainer.fit(model, DataLoader(TensorDataset(X[rows], Y[rows]), batch_size=8))
    return trainer


def without_batch(k, n=8):
    """Row indices of batches 0..n-1 of 8 rows, batch k left out."""
    return torch.cat([torch.arange(8 * i, 8 * i + 8) for i in range(n) if i != k])


def state(model, trainer):
    opt = trainer.optimizers[0]
    return ([p.detach().clone() for p in model.parameters()],
            [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for p in model.parameters()],
            [g["lr"] for g in opt.param_groups])


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for sx, sy in zip(a[1], b[1]):
        assert sx.keys() == sy.keys()
        for k in sx:
            assert torch.equal(torch.as_tensor(sx[k]), torch.as_tensor(sy[k])), k
    assert a[2] == b[2]  # learning rates


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("manual", [False, True])
def test_nan_step_is_skipped_bit_identical(manual, fused):
    """A NaN loss at step 2 of 4: params, AdamW state and the per-step LR schedule equal a
    3-step run without that batch. Plain Lightning leaves NaN weights here."""
    bad = Net(nan_at=2, manual=manual, fused=fused, sched=not manual)
    cb = ggl.GuardCallback(clipper=gg.NormClip(1.0))
    tb = fit(bad, [cb], steps=4)
    assert cb.skipped_steps == 1
    # reference: the same batches except the poisoned one, through the same Guard
    ref = Net(manual=manual, fused=fused, sched=not manual)
    # replays batches 0, 1, 3 (the NaN run consumed batch 2)
    data = TensorDataset(torch.cat([X[:16], X[24:32]]), torch.cat([Y[:16], Y[24:32]]))
    tr = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", max_steps=3,
                    callbacks=[ggl.GuardCallback(clipper=gg.NormClip(1.0))])
    tr.fit(ref, DataLoader(data, batch_size=8))
    assert_same(state(bad, tb), state(ref, tr))
    assert all(torch.isfinite(p).all() for p in bad.parameters())


def test_spike_is_skipped_bit_identical_with_spikeskip():
    """SpikeSkip in Trainer.fit: a finite loss x1e3 at step 4 of 6 (a gradient spike, not a NaN)
    is refused; params, AdamW state and the per-step LR equal a 5-step run without that batch."""
    def callback():
        return ggl.GuardCallback(clipper=None, skip=gg.SpikeSkip(threshold=6.0, window=8, min_history=3))
    bad, logged, cb = Net(nan_at=4, poison=1e3, sched=True), Logged(), callback()
    tb = fit(bad, [cb, logged], steps=6)
    assert [r["gradguard/skipped"] for r in logged.rows] == [0, 0, 0, 0, 1, 0]
    assert np.isfinite(logged.rows[4]["gradguard/grad_norm"])  # refused as a spike: finite norm
    assert cb.skipped_steps == 1
    ref = Net(sched=True)
    tr = fit(ref, [callback()], steps=5, rows=without_batch(4))
    assert_same(state(bad, tb), state(ref, tr))


def test_values_reach_lightnings_logger(tmp_path):
    """Through a real Lightning logger (CSVLogger, every step): the pre-clip norm equals a float64
    reference of the gradients the hooks saw, the coefficient min(1, c/norm), the skip flag and
    the running count; the NaN step's row says nan and skipped."""
    import csv

    from pytorch_lightning.loggers import CSVLogger
    m = Net(nan_at=3)
    tr = fit(m, [ggl.GuardCallback(clipper=gg.NormClip(0.5))], steps=5,
             logger=CSVLogger(str(tmp_path), name="run"), log_every_n_steps=1)
    with open(pathlib.Path(tr.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("gradguard/grad_norm")]
    rows.sort(key=lambda r: int(r["step"]))
    assert len(rows) == 5 == len(m.grads)
    assert [float(r["gradguard/skipped"]) for r in rows] == [0, 0, 0, 1, 0]
    assert [float(r["gradguard/skipped_steps"]) for r in rows] == [0, 0, 0, 1, 1]
    for i, (g, r) in enumerate(zip(m.grads, rows)):
        ref = np.sqrt(sum((x ** 2).sum() for x in g))
        if i == 3:
            assert np.isnan(ref) and np.isnan(float(r["gradguard/grad_norm"]))
            continue
        assert float(r["gradguard/grad_norm"]) == pytest.approx(ref, rel=1e-6)
        assert float(r["gradguard/clip_coef"]) == pytest.approx(min(1.0, 0.5 / (ref + 1e-6)), rel=1e-5)


def test_scheduler_moves_on_without_hold_scheduler():
    a, b = Net(nan_at=2, sched=True), Net(nan_at=2, sched=True)
    ta = fit(a, [ggl.GuardCallback(clipper=gg.NormClip(1.0))], steps=4)
    tb = fit(b, [ggl.GuardCallback(clipper=gg.NormClip(1.0), hold_scheduler=False)], steps=4)
    assert ta.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 / 4)   # 3 scheduler steps
    assert tb.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 / 5)   # 4 scheduler steps


def test_plain_lightning_applies_the_nan():
    """The baseline the callback fixes (Lightning#5152): without it the weights go NaN."""
    m = Net(nan_at=1)
    fit(m, [], steps=2, gradient_clip_val=0.5)
    assert not all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_logged_norm_and_coef_match_float64_reference(opt):
    m = Net(opt=opt)
    logged = Logged()
    fit(m, [ggl.GuardCallback(clipper=gg.NormClip(0.5)), logged], steps=5)
    assert len(m.grads) == 5 and len(logged.rows) == 5
    for g, row in zip(m.grads, logged.rows):
        ref = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g))
        assert row["gradguard/grad_norm"] == pytest.approx(ref, rel=1e-6)
        assert row["gradguard/clip_coef"] == pytest.approx(min(1.0, 0.5 / (ref + 1e-6)), rel=1e-5)
        assert row["gradguard/skipped"] == 0.0
    assert logged.rows[-1]["gradguard/skipped_steps"] == 0.0


def test_logged_skip_count_and_auto_clipper():
    m = Net(nan_at=3)
    logged = Logged()
    cb = ggl.GuardCallback()  # clipper="auto"
    fit(m, [cb, logged], steps=6)
    skipped = [r["gradguard/skipped"] for r in logged.rows]
    assert skipped == [0, 0, 0, 1, 0, 0]
    assert [r["gradguard/skipped_steps"] for r in logged.rows] == [0, 0, 0, 1, 1, 1]
    assert np.isnan(logged.rows[3]["gradguard/grad_norm"])
    assert cb.guards[0].step_count == 6


def test_clipping_matches_guard_in_plain_loop():
    """Lightning + callback == a hand-written loop with gg.Guard (same batches, same clipper)."""
    m = Net()
    tr = fit(m, [ggl.GuardCallback(clipper=gg.ZClip(warmup_steps=2))], steps=6)
    torch.manual_seed(0)
    ref = Net()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05)
    guard = gg.Guard(ref, clipper=gg.ZClip(warmup_steps=2))
    for i in range(6):
        x, y = X[8 * i:8 * i + 8], Y[8 * i:8 * i + 8]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ref.net(x), y)
        loss.backward()
        guard.step(opt, loss=loss.detach())
    for a, b in zip(m.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert tr.global_step == 6


def test_bf16_mixed_on_cpu_skips_and_logs():
    """bf16 autocast on the CPU: the NaN step is refused, norms equal the float64 reference.
    (Lightning turns "16-mixed" on a CPU accelerator into "bf16-mixed": float16 autocast with
    a GradScaler is tested through a MixedPrecision plugin below.)"""
    m = Net(nan_at=2)
    logged = Logged()
    cb = ggl.GuardCallback(clipper=gg.NormClip(1.0))
    fit(m, [cb, logged], steps=4, precision="bf16-mixed")
    assert cb.skipped_steps == 1
    assert [r["gradguard/skipped"] for r in logged.rows] == [0, 0, 1, 0]
    assert all(torch.isfinite(p).all() for p in m.parameters())
    for g, row in zip(m.grads[:2], logged.rows[:2]):
        ref = np.sqrt(sum((x ** 2).sum() for x in g))
        assert row["gradguard/grad_norm"] == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("manual", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_gradscaler_precision_plugin_path_on_cpu(fused, manual):
    """The GradScaler path (precision plugin replaced) with a CPU fp16 MixedPrecision plugin,
    automatic and manual optimization: the scaler's unscale happens once, a NaN step is counted
    as skipped, the weights stay finite (with a fused AdamW Lightning's own clipping raises here)."""
    from pytorch_lightning.plugins.precision import MixedPrecision
    m = Net(nan_at=2, fused=fused, manual=manual)
    cb = ggl.GuardCallback(clipper=gg.NormClip(1.0))
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 4))
    logged = Logged()
    fit(m, [cb, logged], steps=4, plugins=[plugin])
    assert cb.skipped_steps == 1
    assert [r["gradguard/skipped"] for r in logged.rows] == [0, 0, 1, 0]
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # the hooks saw unscaled gradients: the logged norm equals their float64 norm
    for g, row in zip(m.grads[:2], logged.rows[:2]):
        assert row["gradguard/grad_norm"] == pytest.approx(np.sqrt(sum((x ** 2).sum() for x in g)),
                                                           rel=1e-5)
    # ... and unscaled truly (not 16x): step 0's norm is the float32 one up to float16 autocast
    f32 = Net()
    torch.nn.functional.mse_loss(f32.net(X[:8]), Y[:8]).backward()
    ref = np.sqrt(sum((p.grad.double() ** 2).sum().item() for p in f32.parameters()))
    assert logged.rows[0]["gradguard/grad_norm"] == pytest.approx(ref, rel=1e-2)
    assert plugin.scaler.get_scale() == 8.0  # the scaler saw the NaN step and backed off once


def test_gradient_clip_val_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"gradient_clip_val=0\.5.*NormClip\(0\.5\)"):
        fit(Net(), [ggl.GuardCallback()], steps=1, gradient_clip_val=0.5)


def test_overridden_configure_gradient_clipping_warns():
    """A module clipping in its own configure_gradient_clipping (no gradient_clip_val needed)
    would clip before the Guard: the fit warns, naming the method; the default does not."""
    class Clips(Net):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.clip_gradients(optimizer, gradient_clip_val=0.01, gradient_clip_algorithm="norm")

    with pytest.warns(UserWarning, match="Clips overrides configure_gradient_clipping"):
        fit(Clips(), [ggl.GuardCallback()], steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*configure_gradient_clipping.*")
        fit(Net(), [ggl.GuardCallback()], steps=1)


def test_bad_arguments_raise_where_written():
    with pytest.raises(ValueError, match="on_nonfinite"):
        ggl.GuardCallback(on_nonfinite="ignore")
    with pytest.raises(TypeError, match="clipper"):
        ggl.GuardCallback(clipper=gg.NormClip)
    with pytest.raises(TypeError, match="log"):
        ggl.GuardCallback(log="yes")


def test_resume_from_lightning_checkpoint_is_exact(tmp_path):
    """fit 1 epoch, save, resume to 2 epochs == 2 epochs uninterrupted (params, AdamW state and
    the adaptive clipper's state all come back from Lightning's own checkpoint)."""
    def trainer(epochs, cbs):
        return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, accelerator="cpu", max_epochs=epochs,
                          callbacks=cbs)
    data = DataLoader(TensorDataset(X[:32], Y[:32]), batch_size=8)
    full = Net(nan_at=5)
    cb_full = ggl.GuardCallback(clipper=gg.ZClip(warmup_steps=3))
    t_full = trainer(2, [cb_full])
    t_full.fit(full, data)

    first = Net(nan_at=5)
    t1 = trainer(1, [ggl.GuardCallback(clipper=gg.ZClip(warmup_steps=3))])
    t1.fit(first, data)
    ckpt = tmp_path / "e1.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = Net(nan_at=5)
    cb_res = ggl.GuardCallback(clipper=gg.ZClip(warmup_steps=3))
    t2 = trainer(2, [cb_res])
    t2.fit(resumed, data, ckpt_path=str(ckpt))
    assert t2.global_step == t_full.global_step == 8
    assert_same(state(full, t_full), state(resumed, t2))
    assert cb_res.guards[0].state_dict()["step_count"] == 8
    assert cb_res.skipped_steps == cb_full.skipped_steps == 1
    sd_a, sd_b = cb_full.guards[0].state_dict(), cb_res.guards[0].state_dict()
    assert repr(sd_a) == repr(sd_b)


def test_monitor_run_store(tmp_path):
    """The Monitor's run store from Trainer.fit holds what a hand-written gg.Guard loop's store
    holds (same batches: norms, skips, losses), and `gradguard report` renders it."""
    from gradguard.cli import main
    run = tmp_path / "run"
    m = Net(nan_at=2)
    cb = ggl.GuardCallback(clipper=gg.NormClip(1.0), monitor=gg.Monitor(str(run), flush_every=2))
    fit(m, [cb], steps=5)
    steps = gg.load_run(str(run)).steps
    assert len(steps) == 5
    assert list(steps["skipped"].astype(bool)) == [False, False, True, False, False]

    torch.manual_seed(0)
    ref = Net()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05)
    guard = gg.Guard(ref, clipper=gg.NormClip(1.0), monitor=gg.Monitor(str(tmp_path / "loop"), flush_every=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(ref.net(X[8 * i:8 * i + 8]), Y[8 * i:8 * i + 8])
            (loss * (float("nan") if i == 2 else 1.0)).backward()
            guard.step(opt, loss=(loss * (float("nan") if i == 2 else 1.0)).detach())
        guard.close()
    loop = gg.load_run(str(tmp_path / "loop")).steps
    assert list(steps.columns) == list(loop.columns)
    for col in ("total_norm", "total_norm_after", "loss"):
        np.testing.assert_array_equal(steps[col].to_numpy(), loop[col].to_numpy(), err_msg=col)
    assert list(steps["skipped"]) == list(loop["skipped"])
    out = tmp_path / "report.html"
    assert main(["report", str(run), "-o", str(out)]) == 0 and out.stat().st_size > 1000


def test_several_optimizers_manual_each_guarded():
    class Two(Net):
        def __init__(self):
            super().__init__(manual=True)

        def training_step(self, batch, i):
            x, y = batch
            a, b = self.optimizers()
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            if self.global_step == 2:  # Lightning counts each optimizer step
                loss = loss * float("nan")
            a.zero_grad()
            b.zero_grad()
            self.manual_backward(loss)
            a.step()
            b.step()

        def configure_optimizers(self):
            return (torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                    torch.optim.AdamW(self.net[2].parameters(), lr=0.1))

    m = Two()
    logged = Logged()
    cb = ggl.GuardCallback(clipper=gg.NormClip(1.0))
    fit(m, [cb, logged], steps=6)
    assert len(cb.guards) == 2
    assert [n for n in cb.guards[0].names] == ["net.0.weight", "net.0.bias"]
    assert [n for n in cb.guards[1].names] == ["net.2.weight", "net.2.bias"]
    assert cb.skipped_steps == 2  # both optimizers refused the NaN step (global_step 2 -> batch 1)
    assert "gradguard/grad_norm_1" in logged.rows[0]
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_readme_recipe_runs_as_written(tmp_path, monkeypatch):
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- lightning -->\s*```python\n(.*?)```\s*<!-- /lightning -->", text, re.S)
    assert block, "README.md has no <!-- lightning --> block"
    monkeypatch.chdir(tmp_path)
    env = {"pl": pl, "model": Net(nan_at=1), "train_loader": DataLoader(TensorDataset(X, Y), batch_size=8)}
    code = block.group(1)
    exec(compile(code, "README-lightning", "exec"), env)  # noqa: S102 - the README's own code
    assert env["trainer"].global_step > 0
    assert all(torch.isfinite(p).all() for p in env["model"].parameters())


def test_one_callback_per_model_and_refit():
    cb = ggl.GuardCallback(clipper=gg.NormClip(1.0))
    m = Net()
    fit(m, [cb], steps=2)
    assert "step" not in vars(m.trainer.optimizers[0])  # unpatched at teardown
    with pytest.raises(ValueError, match="earlier fit"):
        fit(Net(), [cb], steps=1)


@pytest.mark.parametrize("opt,expected", [("adamw", []), ("sgd", ["__bool__"])])
def test_host_reads_per_step_are_the_guards_only(sync_counter, opt, expected):
    """With a fused AdamW (and no per-step scheduler) the callback's step reads nothing on the
    host; with SGD (not fused) exactly the Guard's one documented read (whether to step).
    (torch's non-fused CPU AdamW reads its own step counters: SGD keeps that out of the count.)"""
    cb = ggl.GuardCallback(clipper=gg.NormClip(1.0))
    inner = cb._guard_step
    per_step = []

    def counted(*a, **k):
        start = len(sync_counter.calls)
        out = inner(*a, **k)
        per_step.append(sync_counter.calls[start:])
        return out

    cb._guard_step = counted
    fit(Net(fused=True, opt=opt), [cb], steps=4)
    assert per_step[1:] == [expected] * 3  # the first fused step takes the host path (no state yet)


def test_gradient_accumulation_guards_the_accumulated_gradient():
    m = Net()
    logged = Logged()
    cb = ggl.GuardCallback(clipper=gg.NormClip(0.5))
    fit(m, [cb, logged], steps=3, accumulate_grad_batches=2)
    assert cb.guards[0].step_count == 3 == len(m.grads)
    rows = logged.rows[1::2]  # the optimizer steps after every 2nd batch
    assert len(rows) == 3
    for g, row in zip(m.grads, rows):
        ref = np.sqrt(sum((x ** 2).sum() for x in g))
        assert row["gradguard/grad_norm"] == pytest.approx(ref, rel=1e-6)
