"""gradguard.optax in training: the seed MLP in JAX (unclipped NaN, clipped trains), a small
RNN, MultiSteps (one decision per real step), the recorder into the run store (report and
load_run read it), and bit-exact resume of every stateful transform."""

from __future__ import annotations

import functools
import math
import pickle

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
from test_optax import train_steps  # noqa: E402

import gradguard.optax as ggo  # noqa: E402
from gradguard.experiments import jax_seed  # noqa: E402


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_seed_mlp_unclipped_goes_nan_and_clipped_trains():
    none = jax_seed.run_mlp(jax_seed.strategy("none"), 0, epochs=3)
    assert none.first_nonfinite_epoch is not None and not math.isfinite(none.final_loss)
    clipped = jax_seed.run_mlp(jax_seed.strategy("global norm 1"), 0, epochs=3)
    assert clipped.first_nonfinite_epoch is None
    assert clipped.losses[-1] < clipped.losses[0] and clipped.clipped_steps > 0
    # the default (auto) trains it too: test_cli_demo_framework_jax


def test_small_rnn_unclipped_goes_nan_and_clipped_learns():
    none = jax_seed.run_rnn(jax_seed.strategy("none"), 0, steps=50, length=10)
    assert none.first_nonfinite_epoch == 0 and not math.isfinite(none.final_loss)
    r = jax_seed.run_rnn(jax_seed.strategy("auto (default)"), 0, steps=50, length=10)
    assert r.first_nonfinite_epoch is None and r.steps == 50 and r.clipped_steps > 0
    # the target is a sum of two U(0, 1): predicting its mean gives MSE 2/12
    assert r.final_loss < 2 / 12


def test_multisteps_decides_once_per_real_step_on_the_mean_gradient():
    params = {"w": jnp.zeros(2)}
    inner = ggo.skip_nonfinite(optax.chain(ggo.clip_by_global_norm(1.0), optax.sgd(1.0)))
    ms = optax.MultiSteps(inner, every_k_schedule=2, should_skip_update_fn=ggo.skip_microstep())
    s = ms.init(params)
    step = jax.jit(ms.update)
    micro = [[3.0, 0.0], [1.0, 0.0], [jnp.nan, 0.0], [0.2, 0.0], [0.4, 0.0]]
    p = params
    norms = []
    for g in micro:
        u, s = step({"w": jnp.array(g)}, s, p)
        p = optax.apply_updates(p, u)
        norms.append(float(optax.tree.get(s.inner_opt_state, "total_norm")))
    # real step 1: mean of 3 and 1 = 2 -> clipped to 1; the NaN micro-batch is dropped (the
    # window stretches); real step 2: mean of 0.2 and 0.4 = 0.3, unclipped
    np.testing.assert_allclose(np.asarray(p["w"]), [-1.3, 0.0], rtol=1e-6)
    assert int(s.inner_opt_state.guard_steps) == 2 and int(s.inner_opt_state.skip_count) == 0
    assert norms[1] == pytest.approx(2.0) and norms[-1] == pytest.approx(0.3)


def test_optax_multisteps_keeps_a_nan_forever_and_the_skip_holds():
    """The measured optax behaviour ggo.skip_microstep exists for: the accumulator is reset
    as (1 - emit) * acc, so one NaN micro-batch poisons every later window. Inside it,
    skip_nonfinite never applies the NaN (it refuses every later real step instead)."""
    params = {"w": jnp.zeros(2)}
    plain = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
    guarded = optax.MultiSteps(ggo.skip_nonfinite(optax.sgd(1.0)), every_k_schedule=2)
    for ms, finite in ((plain, False), (guarded, True)):
        s, p = ms.init(params), params
        for g in ([1.0, 1.0], [jnp.nan, 1.0], [1.0, 1.0], [1.0, 1.0]):
            u, s = ms.update({"w": jnp.array(g)}, s, p)
            p = optax.apply_updates(p, u)
        assert np.isnan(np.asarray(s.acc_grads["w"][0]))  # still NaN two windows later
        assert bool(np.all(np.isfinite(np.asarray(p["w"])))) == finite


def test_recorder_writes_a_run_that_load_run_and_the_report_read(tmp_path):
    from gradguard.report import make_report
    from gradguard.store import load_run

    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    tx = ggo.history(ggo.skip_nonfinite(optax.chain(ggo.zclip(warmup_steps=3),
                                                    optax.adam(1e-2))), length=8)
    s = tx.init(params)
    step = jax.jit(tx.update)
    rec = ggo.Recorder(tmp_path / "jrun", params, config={"model": "toy"})
    rng = np.random.default_rng(0)
    for i in range(21):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        if i == 11:
            g["dense"]["bias"] = g["dense"]["bias"].at[0].set(jnp.nan)
        u, s = step(g, s, params, value=jnp.float32(1.0 / (i + 1)))
        params = optax.apply_updates(params, u)
        # between reads of the history (every 8th call) record() reads nothing from the
        # device: it is given the state's shapes only, with no values to read (the CPU
        # backend's transfer guard does not see device-to-host copies)
        rec.record(s if (i + 1) % 8 == 0 else _shapes_only(s))
    rec.close(s)
    run = load_run(rec.path)
    assert list(run.steps["step"]) == list(range(21))
    assert list(run.steps["skipped"]) == [i == 11 for i in range(21)]
    assert run.steps["loss"].iloc[3] == pytest.approx(0.25)
    assert run.meta["layers"] == ["dense/bias", "dense/kernel"]
    assert run.meta["config"]["model"] == "toy" and run.meta["finished"]
    assert len(run.layers) == 21 * 2
    bad = run.layers[run.layers["step"] == 11]
    assert list(bad["nonfinite_count"]) == [1, 0]
    assert run.events["step"].tolist() == [11]
    assert run.events["first_nonfinite_layer"].tolist() == ["dense/bias"]
    ok = run.layers[run.layers["step"] == 4]
    assert np.all(np.isfinite(ok["grad_norm"]))
    out, failed = make_report([str(rec.path)], str(tmp_path / "r.html"))
    assert not failed and out.exists()


def test_recorder_without_history_samples_and_never_raises_on_a_broken_store(tmp_path):
    params = {"w": jnp.zeros(2)}
    tx = ggo.skip_nonfinite(optax.chain(ggo.clip_by_global_norm(1.0), optax.sgd(0.1)))
    s = tx.init(params)
    rec = ggo.Recorder(tmp_path / "r2", params, every=3)
    for i in range(7):
        _, s = tx.update({"w": jnp.array([3.0, 4.0])}, s, params)
        rec.record(s if (i + 1) % 3 == 0 else _shapes_only(s))  # every 3rd call reads
    rec.close(s)
    from gradguard.store import load_run

    run = load_run(rec.path)
    assert list(run.steps["step"]) == [2, 5, 6]
    assert np.allclose(run.steps["clip_coef"], 0.2)
    # a store that cannot be written warns once and training goes on
    rec = ggo.Recorder(tmp_path / "r3", params, every=1)
    rec._writer.write_shard = _raise_oserror
    with pytest.warns(RuntimeWarning, match="cannot write the run store"):
        for _ in range(3):
            rec.record(s)
    rec.close()


def _shapes_only(state):
    """The state with every array replaced by its shape and dtype (nothing to read)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _raise_oserror(*a, **k):
    raise OSError(28, "No space left on device")


def test_recorder_raises_only_when_asked(tmp_path):
    from gradguard.errors import GradientExplosionError

    params = {"w": jnp.zeros(2)}
    tx = ggo.skip_nonfinite(optax.sgd(0.1))
    s = tx.init(params)
    rec = ggo.Recorder(tmp_path / "r4", params, every=1, max_consecutive_skips=2)
    with pytest.raises(GradientExplosionError, match="3 updates in a row"):
        for _ in range(5):
            _, s = tx.update({"w": jnp.array([jnp.nan, 0.0])}, s, params)
            rec.record(s)
    rec.close()


@pytest.mark.parametrize("make", [
    lambda: ggo.history(ggo.spike_skip(optax.chain(ggo.autoclip(window=4), optax.adam(1e-2)),
                                       threshold=3.0, window=4, min_history=2), length=4),
    lambda: ggo.skip_nonfinite(optax.chain(ggo.zclip(warmup_steps=3), optax.sgd(0.1, 0.9))),
    lambda: ggo.skip_nonfinite(optax.chain(ggo.auto(learning_rate=0.1, momentum=0.9),
                                           optax.sgd(0.1, momentum=0.9))),
    lambda: optax.MultiSteps(ggo.skip_nonfinite(optax.chain(ggo.autoclip(), optax.adam(1e-2))),
                             every_k_schedule=2, should_skip_update_fn=ggo.skip_microstep()),
], ids=["history-spike-autoclip", "zclip", "auto-momentum", "multisteps-autoclip"])
def test_checkpoint_resume_is_bit_exact(make, tmp_path):
    rng = np.random.default_rng(3)
    grads = [{"w": jnp.asarray(rng.normal(size=(3, 2)) * (30 if i == 6 else 1), jnp.float32)}
             for i in range(12)]
    grads[4] = {"w": grads[4]["w"].at[0, 0].set(jnp.nan)}
    tx = make()
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, value=jnp.sum(g["w"]))
                   if isinstance(tx, optax.GradientTransformationExtraArgs) else tx.update(g, s, p))

    run = functools.partial(train_steps, step)

    p0 = {"w": jnp.ones((3, 2))}
    full = run(p0, tx.init(p0), grads)
    half = run(p0, tx.init(p0), grads[:7])
    f = tmp_path / "ckpt.pkl"
    f.write_bytes(pickle.dumps(jax.device_get(half)))
    restored = jax.tree.map(jnp.asarray, pickle.loads(f.read_bytes()))
    resumed = run(*restored, grads[7:])
    assert _bits(resumed) == _bits(full)


def test_cli_demo_framework_jax(tmp_path, capsys):
    from gradguard.cli import main
    from gradguard.store import load_run

    rc = main(["demo", "--framework", "jax", "--tiny", "--seeds", "1", "--only", "mlp",
               "--strategies", "auto (default)", "--runs-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "| seed MLP (JAX) | auto (default) |" in out
    run = load_run(tmp_path / "jax-mlp-auto_default-s0")
    assert len(run.steps) == 5 * 8 and run.steps["clipped"].any()
    # the threshold-free default trains the seed MLP (unclipped it goes NaN: above)
    loss = run.steps["loss"].to_numpy()
    assert np.all(np.isfinite(loss)) and loss[-8:].mean() < loss[:8].mean()
    assert not run.steps["skipped"].any()
    assert main(["demo", "--framework", "jax", "--only", "cnn", "--no-runs"]) == 2
