"""gradguard.huggingface in a real transformers.Trainer (CPU, a tiny local model, no hub)."""

from __future__ import annotations

import os
import pathlib
import re
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gghf = pytest.importorskip("gradguard.huggingface")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import gradguard as gg  # noqa: E402

os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")


class Net(torch.nn.Module):
    """Linear regression; ``poison_at`` puts +inf into one weight-gradient element at that
    (0-based) optimizer step, the case that torch's clip_grad_norm_ turns into all-NaN."""

    def __init__(self, poison_at=None, nan_loss=False, spike=None):
        super().__init__()
        torch.manual_seed(0)
        self.l = torch.nn.Linear(4, 2)
        self.poison_at, self.nan_loss, self.spike, self.calls = poison_at, nan_loss, spike, 0
        self.l.weight.register_hook(self._hook)

    def _hook(self, g):
        if self.poison_at is not None and self.calls - 1 == self.poison_at and not self.nan_loss:
            if self.spike is not None:  # a finite spike: the weight gradient times ``spike``
                return g * self.spike
            return g.clone().index_fill_(1, torch.tensor([0]), float("inf"))
        return g

    def forward(self, x, labels):
        if self.training:
            self.calls += 1
        loss = torch.nn.functional.mse_loss(self.l(x), labels)
        if self.nan_loss and self.training and self.calls - 1 == self.poison_at:
            loss = loss * float("nan")
        return {"loss": loss}


class DS(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(4, generator=g) * 3, "labels": torch.randn(2, generator=g)}


class Grads(TrainerCallback):
    """float64 copies of the gradients the optimizer is about to use (pre-clip with GuardTrainer)."""

    def __init__(self):
        self.norms = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.norms.append(float(np.sqrt(sum((p.grad.double().numpy() ** 2).sum()
                                            for p in model.parameters()))))


class Snap(TrainerCallback):
    """Params, optimizer state and LR after each optimizer step, by ``global_step``."""

    def __init__(self):
        self.at = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        opt = optimizer.optimizer
        self.at[state.global_step] = (
            [p.detach().clone() for p in model.parameters()],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
            lr_scheduler.get_last_lr())


def make_args(tmp, steps, **kw):
    base = dict(output_dir=str(tmp), max_steps=steps, per_device_train_batch_size=8,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                disable_tqdm=True, learning_rate=0.05, lr_scheduler_type="linear", seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def train(tmp, net, steps, trainer_cls=None, callbacks=(), **kw):
    cls = trainer_cls or gghf.GuardTrainer
    tr = cls(model=net, args=make_args(tmp, steps, **kw), train_dataset=DS(), callbacks=list(callbacks))
    tr.train()
    return tr


def snapshot(tr):
    opt = tr.optimizer.optimizer
    params = [p.detach().clone() for p in tr.model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in tr.model.parameters()]
    return params, state, tr.lr_scheduler.get_last_lr()


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for sx, sy in zip(a[1], b[1]):
        assert sx.keys() == sy.keys()
        for k in sx:
            assert torch.equal(sx[k], sy[k]), k
    assert a[2] == b[2]  # the LR scheduler did not advance on the refused step


def train_logs(tr):
    return [h for h in tr.state.log_history if "loss" in h and "train_runtime" not in h]


@pytest.mark.parametrize("how", ["GuardTrainer", "callback"])
@pytest.mark.parametrize("fused", [False, True])
def test_inf_step_is_skipped_bit_identical_and_scheduler_holds(tmp_path, how, fused):
    """Step 2 of 3 has an inf gradient element: after it, params, AdamW state and the LR equal
    the run stopped after 2 steps. Plain Trainer writes NaN into the weights here."""
    cls = gghf.GuardTrainer if how == "GuardTrainer" else Trainer
    cbs = [gghf.GuardCallback(clipper=gg.NormClip(1.0))]
    optim = "adamw_torch_fused" if fused else "adamw_torch"
    bad = train(tmp_path / "a", Net(poison_at=2), 3, trainer_cls=cls, callbacks=cbs, optim=optim)
    cb = [c for c in bad.callback_handler.callbacks if isinstance(c, gghf.GuardCallback)][0]
    assert cb.guard.skipped_steps == 1
    # the reference: the same 3-step schedule, stopped after 2 clean steps
    ref = cls(model=Net(), args=make_args(tmp_path / "c", 3, optim=optim),
              train_dataset=DS(), callbacks=[gghf.GuardCallback(clipper=gg.NormClip(1.0))])

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True
    ref.add_callback(Stop())
    ref.train()
    assert_same(snapshot(bad), snapshot(ref))
    assert all(torch.isfinite(p).all() for p in bad.model.parameters())
    logs = train_logs(bad)
    assert [h["gradguard/skipped_steps"] for h in logs] == [0.0, 0.0, 1.0]
    if how == "GuardTrainer":  # the true pre-clip norm, not the NaN of clip_grad_norm_(inf)
        assert logs[2]["grad_norm"] == float("inf")
    assert bad.args.max_grad_norm == 1.0  # restored after the run (callback) / never changed


def test_guard_trainer_takes_over_max_grad_norm_where_the_trainer_has_no_clip_hooks(tmp_path, monkeypatch):
    """transformers releases whose Trainer clips inline (no ``_clip_grad_norm`` to override):
    GuardTrainer then sets max_grad_norm to 0 for the run, as the callback does in a plain
    Trainer, and restores it; with the hooks (5.x) it leaves max_grad_norm alone."""
    seen = []

    class Seen(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append(args.max_grad_norm)
    tr = train(tmp_path / "a", Net(), 2, callbacks=[Seen()], max_grad_norm=0.3)
    assert seen == [0.3, 0.3] and tr.guard_callback.owner_clips
    monkeypatch.delattr(Trainer, "_clip_grad_norm")
    seen.clear()
    tr = train(tmp_path / "b", Net(), 2, callbacks=[Seen()], max_grad_norm=0.3)
    assert seen == [0.0, 0.0] and not tr.guard_callback.owner_clips
    assert tr.args.max_grad_norm == 0.3
    assert [h["gradguard/skipped_steps"] for h in train_logs(tr)] == [0.0, 0.0]


def test_plain_trainer_baseline_turns_weights_nan(tmp_path):
    """What GuardCallback fixes: the Trainer's log-only path and its clip both apply the inf."""
    tr = train(tmp_path, Net(poison_at=1), 2, trainer_cls=Trainer, max_grad_norm=0.0)
    assert not all(torch.isfinite(p).all() for p in tr.model.parameters())


@pytest.mark.parametrize("clipper", [gg.NormClip(0.3), "auto", "max_grad_norm"])
def test_logged_norm_is_the_float64_pre_clip_norm(tmp_path, clipper):
    grads = Grads()
    tr = train(tmp_path, Net(), 4, callbacks=[gghf.GuardCallback(clipper=clipper), grads],
               max_grad_norm=0.3)
    logs = train_logs(tr)
    assert len(logs) == 4 and len(grads.norms) == 4
    for h, ref in zip(logs, grads.norms):
        assert h["grad_norm"] == pytest.approx(ref, rel=1e-6)
        assert h["gradguard/grad_norm"] == pytest.approx(ref, rel=1e-6)
        if clipper != "auto":
            assert h["gradguard/clip_coef"] == pytest.approx(min(1.0, 0.3 / (ref + 1e-6)), rel=1e-5)
    if clipper == "max_grad_norm":
        assert isinstance(tr.guard_callback.guard.clipper, gg.NormClip)


def test_no_double_clipping_with_the_callback_in_a_plain_trainer(tmp_path):
    """Plain Trainer, max_grad_norm=0.3 (the Trainer would clip), GuardCallback(clipper=None): the
    applied update is the unclipped one, i.e. equals a GuardTrainer run without clipping."""
    a = train(tmp_path / "a", Net(), 3, trainer_cls=Trainer,
              callbacks=[gghf.GuardCallback(clipper=None)], max_grad_norm=0.3)
    b = train(tmp_path / "b", Net(), 3, trainer_cls=Trainer, max_grad_norm=0.0)
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x, y)


def test_nan_loss_hidden_by_logging_filter_still_shows_as_skipped(tmp_path):
    tr = train(tmp_path, Net(poison_at=1, nan_loss=True), 3)
    logs = train_logs(tr)
    assert np.isfinite(logs[1]["loss"])  # the Trainer's logging_nan_inf_filter at work
    assert logs[1]["gradguard/skipped_steps"] == 1.0
    assert np.isnan(logs[1]["grad_norm"])


def test_bf16_on_cpu(tmp_path):
    grads = Grads()
    tr = train(tmp_path, Net(poison_at=2), 4, callbacks=[gghf.GuardCallback(clipper=gg.NormClip(1.0)), grads],
               bf16=True)
    logs = train_logs(tr)
    assert [h["gradguard/skipped_steps"] for h in logs] == [0.0, 0.0, 1.0, 1.0]
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    for i in (0, 1, 3):
        assert logs[i]["grad_norm"] == pytest.approx(grads.norms[i], rel=1e-6)


def test_resume_from_trainer_checkpoint_is_exact(tmp_path):
    """4 steps with a checkpoint at 2, then a fresh Trainer resumed from checkpoint-2: params,
    AdamW state, LR and the adaptive clipper's state equal the uninterrupted run."""
    kw = dict(save_strategy="steps", save_steps=2)
    full = train(tmp_path, Net(poison_at=1), 4, callbacks=[gghf.GuardCallback(clipper=gg.ZClip(warmup_steps=1))], **kw)
    assert os.path.exists(tmp_path / "checkpoint-2" / "gradguard.pt")
    net = Net(poison_at=None)
    net.l.weight.data.fill_(7.0)  # overwritten by the checkpoint
    res = gghf.GuardTrainer(model=net, args=make_args(tmp_path, 4, **kw), train_dataset=DS(),
                            callbacks=[gghf.GuardCallback(clipper=gg.ZClip(warmup_steps=1))])
    res.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert_same(snapshot(full), snapshot(res))
    a, b = full.guard_callback.guard.state_dict(), res.guard_callback.guard.state_dict()
    assert a["step_count"] == b["step_count"] == 4 and b["skipped_steps"] == 1
    assert repr(a) == repr(b)


def test_spike_is_refused_and_the_schedule_holds(tmp_path):
    """SpikeSkip in the Trainer: a finite x1e3 gradient at step 4 of 6 is refused; after it
    params, AdamW state and LR are bit-identical to before it, and the logs count it."""
    snap = Snap()
    tr = train(tmp_path, Net(poison_at=4, spike=1e3), 6, callbacks=[gghf.GuardCallback(
        clipper=None, skip=gg.SpikeSkip(threshold=6.0, window=8, min_history=3)), snap])
    logs = train_logs(tr)
    assert [h["gradguard/skipped_steps"] for h in logs] == [0, 0, 0, 0, 1, 1]
    assert np.isfinite(logs[4]["grad_norm"]) and logs[4]["grad_norm"] > 10 * logs[3]["grad_norm"]
    assert_same(snap.at[4], snap.at[5])
    assert snap.at[6][2] < snap.at[5][2]  # the schedule moves on after the refused step


def test_gradscaler_path_in_the_trainer(tmp_path):
    """The Trainer's fp16 flow (accelerate scales the loss in backward; the AcceleratedOptimizer
    holds a GradScaler) with a CPU GradScaler given to the Trainer's Accelerator (fp16=True builds
    one only on CUDA): the Guard unscales once, the logged norm is the float64 norm of the
    unscaled gradient, an inf step is refused (state and LR bit-identical) and the scale backs off."""
    grads, snap = Grads(), Snap()
    tr = gghf.GuardTrainer(model=Net(poison_at=2), args=make_args(tmp_path, 4), train_dataset=DS(),
                           callbacks=[gghf.GuardCallback(clipper=gg.NormClip(0.3)), grads, snap])
    tr.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    scales = []

    class Scale(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            scales.append(tr.accelerator.scaler.get_scale())
    tr.add_callback(Scale())
    tr.train()
    assert tr.optimizer.scaler is tr.accelerator.scaler
    logs = train_logs(tr)
    assert [h["gradguard/skipped_steps"] for h in logs] == [0.0, 0.0, 1.0, 1.0]
    assert scales == [16.0, 16.0, 16.0, 8.0] and tr.accelerator.scaler.get_scale() == 8.0
    for i in (0, 1, 3):  # the hook saw scaled gradients; the Guard logs the unscaled norm
        ref = grads.norms[i] / scales[i]
        assert logs[i]["grad_norm"] == pytest.approx(ref, rel=1e-6)
        assert logs[i]["gradguard/clip_coef"] == pytest.approx(min(1.0, 0.3 / (ref + 1e-6)), rel=1e-5)
    assert_same(snap.at[2], snap.at[3])
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_resume_with_the_callback_in_a_plain_trainer(tmp_path):
    """A plain Trainer with GuardCallback: the Guard's state goes into checkpoint-2/gradguard.pt
    and comes back on resume_from_checkpoint; resumed == uninterrupted."""
    kw = dict(save_strategy="steps", save_steps=2)

    def callback():
        return gghf.GuardCallback(clipper=gg.ZClip(warmup_steps=1))
    full_cb = callback()
    full = train(tmp_path, Net(poison_at=1), 4, trainer_cls=Trainer, callbacks=[full_cb], **kw)
    assert os.path.exists(tmp_path / "checkpoint-2" / "gradguard.pt")
    net = Net()
    net.l.weight.data.fill_(7.0)  # overwritten by the checkpoint
    res_cb = callback()
    res = Trainer(model=net, args=make_args(tmp_path, 4, **kw), train_dataset=DS(), callbacks=[res_cb])
    res.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert_same(snapshot(full), snapshot(res))
    a, b = full_cb.guard.state_dict(), res_cb.guard.state_dict()
    assert a["step_count"] == b["step_count"] == 4 and b["skipped_steps"] == 1
    assert repr(a) == repr(b)


def test_arguments_checked_where_written():
    with pytest.raises(ValueError, match="on_nonfinite"):
        gghf.GuardCallback(on_nonfinite="maybe")
    with pytest.raises(TypeError, match="guard must be"):
        gghf.GuardTrainer(model=Net(), args=make_args("/tmp/unused", 1), guard=object())
    with pytest.raises(TypeError, match="AcceleratedOptimizer"):
        gghf.attach_guard(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                          gg.Guard([torch.nn.Parameter(torch.zeros(1))]))


# -- accelerate -----------------------------------------------------------------------------
accelerate = pytest.importorskip("accelerate")


def test_accelerate_clip_grad_norm_drop_in():
    acc = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 5) * 4
    for m in (a, b):
        m(x).pow(2).sum().backward()
    exact = np.sqrt(sum((p.grad.double().numpy() ** 2).sum() for p in a.parameters()))
    ref = acc.clip_grad_norm_(a.parameters(), 0.5)
    got = gghf.clip_grad_norm_(acc, b.parameters(), 0.5)
    assert float(got) == pytest.approx(exact, rel=1e-6)
    assert float(ref) == pytest.approx(exact, rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7)
    # an inf element: accelerate (torch) zeroes every finite gradient (max_norm / inf = 0) and
    # turns the inf into NaN; gradguard leaves them as they are
    for m in (a, b):
        m.weight.grad[0, 0] = float("inf")
    keep = b.bias.grad.clone()
    acc.clip_grad_norm_(a.parameters(), 0.5)
    assert (a.bias.grad == 0).all() and torch.isnan(a.weight.grad[0, 0])
    assert float(gghf.clip_grad_norm_(acc, b.parameters(), 0.5)) == float("inf")
    assert torch.equal(b.bias.grad, keep)


@pytest.mark.parametrize("fused", [False, True])
def test_accelerate_attach_guard_reports_skip_and_holds_scheduler(fused):
    acc = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt, sched = acc.prepare(model, opt, sched)
    guard = gg.Guard(model, clipper=gg.NormClip(1.0))
    undo = gghf.attach_guard(opt, guard)
    skipped, lrs = [], []
    for step in range(4):
        x = torch.randn(8, 4)
        loss = model(x).pow(2).mean() * (float("nan") if step == 2 else 1.0)
        acc.backward(loss)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        sched.step()
        skipped.append(acc.optimizer_step_was_skipped)
        lrs.append(sched.get_last_lr()[0])
        if step == 2:
            assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
        opt.zero_grad()
    assert skipped == [False, False, True, False]
    assert lrs[2] == lrs[1] and lrs[3] < lrs[2]
    assert guard.skipped_steps == 1
    undo()
    assert "step" not in vars(opt)


@pytest.mark.parametrize("attach", [False, True])
def test_accelerate_loop_with_the_drop_in_and_a_fused_optimizer(attach):
    """An accelerate loop as users write it, ``accelerator.clip_grad_norm_`` replaced by
    ``gghf.clip_grad_norm_``, fused AdamW, an inf gradient element at step 2. The drop-in leaves
    the gradients as they are and returns inf; alone it cannot stop the fused step (weights
    go non-finite, accelerate reports no skip, the LR moves on); with
    ``attach_guard(opt, gg.Guard(model, clipper=None))`` (the drop-in clips, the Guard only
    refuses) the step is refused and reported, and the LR holds."""
    acc = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt, sched = acc.prepare(model, opt, sched)
    if attach:
        gghf.attach_guard(opt, gg.Guard(model, clipper=None))
    norms, skipped, lrs, refs = [], [], [], []
    for step in range(4):
        acc.backward(model(torch.randn(8, 4) * 3).pow(2).mean())
        if step == 2:
            model.weight.grad[0, 0] = float("inf")
        refs.append(np.sqrt(sum((p.grad.double().numpy() ** 2).sum() for p in model.parameters())))
        norms.append(float(gghf.clip_grad_norm_(acc, model.parameters(), 0.5)))
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        sched.step()
        skipped.append(acc.optimizer_step_was_skipped)
        lrs.append(sched.get_last_lr()[0])
        if step == 2 and attach:
            assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
        opt.zero_grad()
        if not attach and step == 2:
            break  # the weights are no longer finite
    assert norms[2] == float("inf")
    for n, r in zip(norms[:2], refs[:2]):
        assert n == pytest.approx(r, rel=1e-6)
    if attach:
        assert skipped == [False, False, True, False] and lrs[2] == lrs[1]
        assert all(torch.isfinite(p).all() for p in model.parameters())
    else:  # what the drop-in alone cannot do: the fused step applies the inf gradient
        assert skipped == [False, False, False] and lrs[2] < lrs[1]
        assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_readme_recipe_runs_as_written(tmp_path, monkeypatch):
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- huggingface -->\s*```python\n(.*?)```\s*<!-- /huggingface -->", text, re.S)
    assert block, "README.md has no <!-- huggingface --> block"
    monkeypatch.chdir(tmp_path)
    env = {"model": Net(poison_at=1), "args": make_args(tmp_path, 3), "train_dataset": DS()}
    exec(compile(block.group(1), "README-huggingface", "exec"), env)  # noqa: S102 - the README's code
    assert env["trainer"].state.global_step == 3
    assert env["trainer"].guard_callback.guard.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in env["model"].parameters())


def test_one_callback_per_model(tmp_path):
    cb = gghf.GuardCallback()
    train(tmp_path / "a", Net(), 1, callbacks=[cb])
    with pytest.raises(ValueError, match="already guards another model"):
        train(tmp_path / "b", Net(), 1, callbacks=[cb])


@pytest.mark.parametrize("attach", [False, True])
def test_accelerate_4242_fused_adamw_under_a_gradscaler(attach):
    """accelerate#4242 on the CPU: an Accelerator given a GradScaler (what mixed_precision="fp16"
    builds on CUDA) and AdamW(fused=True). An inf step is refused by the fused kernel either way;
    accelerate alone reports no skip and the scheduler advances, attach_guard reports it and the
    scheduler holds. The scaler backs off in both cases."""
    acc = accelerate.Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt, sched = acc.prepare(model, opt, sched)
    assert opt.scaler is acc.scaler
    guard = gg.Guard(model, clipper=gg.NormClip(1.0))
    if attach:
        gghf.attach_guard(opt, guard)
    skipped, lrs, changed = [], [], []
    for step in range(4):
        loss = model(torch.randn(8, 4)).pow(2).mean() * (float("inf") if step == 2 else 1.0)
        acc.backward(loss)
        before = model.weight.detach().clone()
        opt.step()
        sched.step()
        skipped.append(acc.optimizer_step_was_skipped)
        changed.append(not torch.equal(before, model.weight))
        lrs.append(sched.get_last_lr()[0])
        opt.zero_grad()
    assert changed == [True, True, False, True]
    assert acc.scaler.get_scale() == 4.0
    if attach:
        assert skipped == [False, False, True, False] and lrs[2] == lrs[1]
        assert guard.skipped_steps == 1
    else:  # the bug: the refused step is reported as taken and the schedule moves on
        assert skipped == [False] * 4 and lrs[2] < lrs[1]


def test_attach_guard_reads_the_flag_once_per_step_with_a_fused_optimizer(sync_counter):
    """The Trainer/accelerate decide on the host whether the scheduler steps: that one read of the
    skip flag is all attach_guard adds to a fused step."""
    acc = accelerate.Accelerator(cpu=True)
    model = torch.nn.Linear(4, 1)
    opt = acc.prepare(torch.optim.AdamW(model.parameters(), lr=0.1, fused=True))
    gghf.attach_guard(opt, gg.Guard(model, clipper=gg.NormClip(1.0)))
    reads = []
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        start = len(sync_counter.calls)
        opt.step()
        reads.append(sync_counter.calls[start:])
        opt.zero_grad()
    assert reads[1:] == [["__bool__"], ["__bool__"]]


def test_gradient_accumulation_guards_the_accumulated_gradient(tmp_path):
    grads = Grads()
    tr = train(tmp_path, Net(), 3, callbacks=[gghf.GuardCallback(clipper=gg.NormClip(0.3)), grads],
               gradient_accumulation_steps=2)
    logs = train_logs(tr)
    assert tr.guard_callback.guard.step_count == 3 == len(grads.norms) == len(logs)
    for h, ref in zip(logs, grads.norms):
        assert h["gradguard/grad_norm"] == pytest.approx(ref, rel=1e-6)


def test_monitor_run_store(tmp_path):
    run = tmp_path / "run"
    tr = train(tmp_path, Net(poison_at=1), 4,
               callbacks=[gghf.GuardCallback(clipper=gg.NormClip(1.0), monitor=gg.Monitor(str(run)))])
    steps = gg.load_run(str(run)).steps
    assert len(steps) == 4 and tr.state.global_step == 4
    assert list(steps["skipped"].astype(bool)) == [False, True, False, False]
    from gradguard.cli import main
    out = tmp_path / "report.html"
    assert main(["report", str(run), "-o", str(out)]) == 0 and out.stat().st_size > 1000
