"""Experiments at tiny sizes: each asserts the qualitative result its paper or the seed reports."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from gradguard import NormClip
from gradguard.experiments import charlm, pascanu, seed_mlp, seq_lstm
from gradguard.experiments.loop import History, train
from gradguard.experiments.strategies import NORM_GRID, Strategy, strategies

S = {s.name: s for s in strategies("quick")}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- strategies ------------------------------------------------------------------------------
def test_strategy_tables():
    quick, full = strategies("quick"), strategies("full")
    names = [s.name for s in quick]
    assert names[:5] == ["none", "value 1", "global norm 1", "per-tensor norm 1", "AGC 0.01"]
    assert sum(n.startswith("global norm") for n in names) == 1
    grid = [s.name for s in full if s.name.startswith("global norm")]
    assert grid == [f"global norm {c:g}" for c in NORM_GRID]
    # a norm outside the grid joins it, in order
    grid25 = [s.name for s in strategies("full", norm=0.25) if s.name.startswith("global norm")]
    assert grid25[:2] == ["global norm 0.1", "global norm 0.25"] and len(grid25) == len(NORM_GRID) + 1
    assert len({s.slug for s in full}) == len(full)
    assert all(" " not in s.slug for s in full)
    with pytest.raises(ValueError, match="suite"):
        strategies("medium")


def test_adaptive_strategies_join_when_exported():
    import gradguard as gg

    names = [s.name for s in strategies()]
    assert ("AutoClip" in names) == hasattr(gg, "AutoClip")
    assert ("ZClip" in names) == hasattr(gg, "ZClip")
    assert ("default" in names) == hasattr(gg, "default_clipper")


def test_none_is_plain_torch_and_others_skip():
    model = torch.nn.Linear(2, 1)
    assert S["none"].guard(model).on_nonfinite == "propagate"
    assert S["none"].guard(model).clipper is None
    g = S["global norm 1"].guard(model)
    assert g.on_nonfinite == "skip" and g.max_consecutive_skips is None
    assert isinstance(g.clipper, NormClip) and g.clipper.max_norm == 1.0


# -- the shared loop -------------------------------------------------------------------------
def test_loop_counts_and_early_stop():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1) * 100
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    steps = []

    def stop(h: History) -> bool:
        return len(h.epoch_loss) == 3

    hist = train(model, lambda e: [(x, y), (x, y)], torch.nn.MSELoss(), opt,
                 Strategy("n", lambda: NormClip(0.5)).guard(model), epochs=10,
                 metric=lambda: 0.5, stop=stop, on_step=lambda: steps.append(1))
    assert hist.steps == 6 == len(steps) and hist.epoch_steps == [2, 4, 6]
    assert hist.stopped_early and hist.epoch_metric == [0.5] * 3
    assert hist.clipped_steps == 6 and hist.clip_rate == 1.0  # |g| ~ 100s > 0.5
    assert hist.max_grad_norm > 0.5


# -- 1. the seed MLP -------------------------------------------------------------------------
def test_seed_mlp_unclipped_explodes_clipped_trains():
    cfg = seed_mlp.MLPConfig().tiny()
    none = seed_mlp.run(S["none"], 0, cfg)
    # the seed: "without clipping, the norm explodes to NaN after a few epochs"
    assert none.history.first_nonfinite_epoch is not None
    assert math.isnan(none.value)
    clipped = seed_mlp.run(S["global norm 1"], 0, cfg)
    assert clipped.history.first_nonfinite_epoch is None
    losses = clipped.history.epoch_loss
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert clipped.history.clip_rate > 0.9  # unscaled targets: every step's norm is large


def test_seed_mlp_broadcast_bug_trains_a_constant_predictor():
    cfg = seed_mlp.MLPConfig().tiny()
    fixed = seed_mlp.run(S["global norm 1"], 0, cfg)
    bug = seed_mlp.run(S["global norm 1"], 0, replace(cfg, broadcast_bug=True))
    _, y = seed_mlp.make_data(cfg)
    var_y = float(y.var(unbiased=False))
    # (N,1) vs (N,): the loss is over all N^2 pairs, minimised by a constant: predictions
    # barely vary and the per-sample MSE stays at the target's variance
    assert bug.history.final_metric < 0.05
    assert bug.value == pytest.approx(var_y, rel=0.05)
    assert fixed.history.final_metric > 0.2 and fixed.value < 0.7 * var_y


# -- 2. the seed LSTM ------------------------------------------------------------------------
def test_lstm_digits_learns_and_stays_finite():
    cfg = seq_lstm.LSTMConfig().tiny()
    for name in ("none", "global norm 1"):
        r = seq_lstm.run(S[name], 0, cfg)
        assert r.history.first_nonfinite_epoch is None
        assert r.value > 0.25  # 10 classes: chance is 0.1
        assert r.history.steps == cfg.total_steps()


# -- 3. Pascanu et al. 2013 ------------------------------------------------------------------
def test_temporal_order_generator():
    g = torch.Generator().manual_seed(0)
    x, y = pascanu.generate("temporal", 64, 50, g)
    assert x.shape == (64, 50, 6) and torch.all(x.sum(-1) == 1)
    sym = x.argmax(-1)
    for i in range(64):
        pos = (sym[i] < 2).nonzero().flatten().tolist()
        assert len(pos) == 2 and 5 <= pos[0] < 10 and 25 <= pos[1] < 30
        assert int(y[i]) == int(sym[i, pos[0]]) + 2 * int(sym[i, pos[1]])


def test_adding_generator():
    g = torch.Generator().manual_seed(0)
    x, y = pascanu.generate("adding", 32, 100, g)
    assert x.shape[0] == 32 and 100 <= x.shape[1] < 110 and y.shape == (32, 1)
    marks = x[:, :, 0]
    assert torch.all(marks.sum(1) == 2)
    expect = (x[:, :, 1] * marks).sum(1, keepdim=True) / 2
    torch.testing.assert_close(y, expect)
    first = marks.argmax(1)
    assert torch.all(first < int(0.1 * x.shape[1]))
    with pytest.raises(ValueError, match="task"):
        pascanu.generate("copy", 2, 10, g)


def test_smart_init_spectral_radius():
    torch.manual_seed(0)
    m = pascanu.TanhRNN(6, 4, init="smart")
    w = m.rnn.weight_hh_l0.detach()
    assert float(torch.linalg.eigvals(w).abs().max()) == pytest.approx(0.95, rel=1e-4)
    assert torch.all((w != 0).sum(1) == 15)


def test_temporal_order_short_sequences_solve_without_clipping():
    # Pascanu et al.: clipping matters more as sequences grow; at T=10 plain SGD solves it
    cfg = pascanu.PascanuConfig(task="temporal", length=10, max_steps=600, eval_every=100,
                                eval_size=500)
    r = pascanu.run(S["none"], 0, cfg)
    assert r.value == 1.0 and r.success_step is not None and r.success_step <= 600
    assert r.extra["final error"] < 0.01
    tiny = pascanu.run(S["global norm 1"], 0, cfg.tiny())
    assert tiny.value == 0.0 and tiny.success_step is None and tiny.history.steps == 60


# -- 4. character LM (Zhang et al. 2019) -----------------------------------------------------
def test_char_corpus_is_fixed_text():
    text = charlm.corpus(50_000)
    assert len(text) == 50_000 and text == charlm.corpus(50_000)
    ids, vocab = charlm.encode(text)
    assert "".join(vocab[i] for i in ids[:200].tolist()) == text[:200]


def test_char_lm_clipping_keeps_a_large_lr_training():
    cfg = charlm.CharLMConfig().tiny()
    clip = Strategy("global norm 0.25", lambda: NormClip(0.25))
    ln_vocab = math.log(len(charlm.encode(charlm.corpus(cfg.max_chars))[1]))
    # lr 10: the unclipped run still trains
    at10 = charlm.run(S["none"], 0, cfg)
    assert at10.value < ln_vocab - 0.5
    # lr 30: unclipped SGD is thrown above the uniform predictor's loss; clipped keeps training
    none30 = charlm.run(S["none"], 0, replace(cfg, lr=30.0))
    clip30 = charlm.run(clip, 0, replace(cfg, lr=30.0))
    assert none30.value > ln_vocab
    assert clip30.value < ln_vocab - 0.5
    assert clip30.history.clip_rate > 0.5


# -- verdicts: a result that diverged or did not learn is flagged ------------------------------
def _result(value, chance=None, learned=None, higher=False, nonfinite_epoch=None):
    from gradguard.experiments.loop import RunResult

    h = History(epoch_loss=[value], first_nonfinite_epoch=nonfinite_epoch)
    return RunResult("e", "s", 0, "m", value, h, chance=chance, learned=learned,
                     higher_is_better=higher)


def test_run_verdicts():
    var = 2.3e4  # the seed MLP target's variance: the constant predictor's MSE
    assert _result(3.47e11, var, var / 2).verdict == "diverged"  # AutoClip's 3.47e+11
    assert _result(1.79e4, var, var / 2).verdict == "did not learn"  # AGC's 1.79e+04
    assert _result(0.58, var, var / 2).verdict == ""
    assert _result(math.nan, var, var / 2).verdict == "diverged"
    assert _result(0.5, var, var / 2, nonfinite_epoch=3).verdict == "diverged"
    assert _result(0.12, 0.1, 0.2, higher=True).verdict == "did not learn"  # accuracy near chance
    assert _result(0.8, 0.1, 0.2, higher=True).verdict == ""
    assert _result(1.0).verdict == ""  # no bars (solved tasks): nothing to flag


def test_row_flags_count_seeds():
    from gradguard.experiments.suite import Row

    var = 2.3e4
    row = Row("seed MLP", "AutoClip", "train MSE",
              [_result(3.47e11, var, var / 2), _result(0.5, var, var / 2), _result(2e4, var, var / 2)])
    assert row.verdict_text() == "diverged 1/3, did not learn 1/3"
    row = Row("seed MLP", "none", "train MSE", [_result(math.nan, var, var / 2)] * 3)
    assert row.verdict_text() == "diverged" and row.result_text() == "nan"
    one = Row("x", "y", "train MSE", [_result(0.25, var, var / 2)])
    assert one.result_text() == "0.25"  # one seed: no "± 0"


def test_experiments_set_their_bars():
    mlp = seed_mlp.run(S["global norm 1"], 0, seed_mlp.MLPConfig().tiny())
    _, y = seed_mlp.make_data(seed_mlp.MLPConfig())
    assert mlp.chance == pytest.approx(float(y.var(unbiased=False)), rel=1e-6)
    assert mlp.learned == pytest.approx(mlp.chance / 2)
    ids, vocab = charlm.encode(charlm.corpus(20_000))
    p = torch.bincount(ids).double() / len(ids)
    p = p[p > 0]
    assert charlm.unigram_loss(ids, len(vocab)) == pytest.approx(float(-(p * p.log()).sum()))
    assert charlm.unigram_loss(ids, len(vocab)) < math.log(len(vocab))


# -- the quick suite: each experiment shows what it is there for -----------------------------
def test_quick_temporal_order_needs_clipping_at_the_longer_length():
    from gradguard.experiments.suite import plan

    temporal = [e for e in plan("quick") if e.key == "temporal"]
    assert [e.cfg.length for e in temporal] == list(pascanu.QUICK_LENGTHS) == [10, 20]
    assert [e.folder for e in temporal] == ["temporal-T10", "temporal-T20"]
    short, long_ = (e.cfg for e in temporal)
    assert pascanu.run(S["none"], 0, short).success_step is not None  # T=10: plain SGD solves
    none = pascanu.run(S["none"], 0, long_)
    clip = pascanu.run(S["global norm 1"], 0, long_)
    assert none.success_step is None and none.extra["final error"] > 0.3  # T=20: it fails
    assert clip.success_step is not None and clip.extra["final error"] < 0.01  # clipping rescues


def test_quick_char_lm_clipped_trains_where_unclipped_is_thrown_off():
    from gradguard.experiments.suite import plan

    (exp,) = [e for e in plan("quick") if e.key == "charlm"]
    assert exp.cfg.lr == 30.0 and exp.norm == 0.25  # Zhang et al.'s lr and threshold
    clip_s = Strategy("global norm 0.25", lambda: NormClip(0.25))
    none = charlm.run(S["none"], 0, exp.cfg)
    clip = charlm.run(clip_s, 0, exp.cfg)
    assert none.verdict == "diverged" and none.value > none.chance  # above the uniform loss
    assert clip.verdict == "" and clip.value < clip.learned  # beats character frequencies
    # and at every evaluation after the first, the clipped run's loss is the lower one
    assert all(c < n for c, n in zip(clip.history.epoch_loss[1:], none.history.epoch_loss[1:]))


def test_progress_lines_when_output_is_not_a_terminal():
    import io

    from rich.console import Console

    from gradguard.experiments.suite import plan, run_suite

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=100)
    exps = plan("quick", only=["mlp", "temporal"], tiny=True)
    run_suite(exps, "quick", 1, names=["none"], run_dir=None, progress=True, console=console, jobs=1)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("[1/2] seed MLP: 1 runs done")
    assert lines[1].startswith("[2/2] temporal order T=10: 1 runs done")
    assert "\x1b" not in buf.getvalue() and "━" not in buf.getvalue()  # no bar drawn at the end
