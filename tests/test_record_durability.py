"""The JAX recorder keeps its story too: an exception leaving the loop, a close() without the
final state and interpreter exit all write every recorded step (issue 12)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from gradguard import optax as ggo  # noqa: E402
from gradguard.store import load_run  # noqa: E402


def _tx(length=5):
    return ggo.history(ggo.skip_nonfinite(optax.chain(ggo.clip_by_global_norm(1.0),
                                                      optax.sgd(0.1))), length=length)


def _train(rec, tx, n, fail_at=None):
    params = {"w": jnp.ones(3)}
    st = tx.init(params)
    update = jax.jit(tx.update)
    for k in range(n):
        if k == fail_at:
            raise RuntimeError("data loader died")
        u, st = update({"w": jnp.full(3, 1.0 + k)}, st, params)
        params = optax.apply_updates(params, u)
        rec.record(st)
    return st


def test_an_exception_leaving_the_with_block_keeps_every_step(tmp_path):
    tx = _tx()
    with pytest.raises(RuntimeError, match="data loader"):
        with ggo.Recorder(tmp_path / "run", {"w": jnp.ones(3)}) as rec:
            _train(rec, tx, 20, fail_at=7)  # read at 5; steps 5 and 6 only in the history
    run = load_run(tmp_path / "run")
    assert run.steps.step.tolist() == list(range(7))
    assert run.steps.total_norm.tolist() == pytest.approx([3 ** 0.5 * (1 + k) for k in range(7)])
    assert run.meta["finished"]


def test_close_without_the_final_state_writes_the_last_steps(tmp_path):
    rec = ggo.Recorder(tmp_path / "run", {"w": jnp.ones(3)})
    _train(rec, _tx(length=4), 11)
    rec.close()
    assert load_run(tmp_path / "run").steps.step.tolist() == list(range(11))


def test_an_unclosed_recorder_is_written_at_interpreter_exit(tmp_path):
    code = textwrap.dedent("""
        import sys, jax, jax.numpy as jnp, optax
        from gradguard import optax as ggo
        tx = ggo.history(optax.chain(ggo.clip_by_global_norm(1.0), optax.sgd(0.1)), length=10)
        params = {"w": jnp.ones(3)}
        st = tx.init(params)
        rec = ggo.Recorder(sys.argv[1], params)      # plain form, never closed
        for k in range(100):
            if k == 13:
                raise RuntimeError("diverged")        # uncaught
            u, st = tx.update({"w": jnp.full(3, 1.0 + k)}, st, params)
            rec.record(st)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 1 and "diverged" in out.stderr, out.stderr[-2000:]
    assert "Exception ignored" not in out.stderr
    run = load_run(tmp_path / "run")
    assert run.steps.step.tolist() == list(range(13))
    assert run.meta["finished"]


KERAS_FIT = """
import sys
import numpy as np
import keras
import gradguard as gg
from gradguard import keras as ggk

class Dies(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 29:
            raise RuntimeError("data loader died")

x = np.random.default_rng(0).normal(size=(400, 3)).astype("float32")

keras.utils.set_random_seed(0)
mon = ggk.Monitor(sys.argv[1], flush_every=100, layer_every=5)
opt = ggk.GuardedOptimizer(keras.optimizers.SGD(0.01), clipper=gg.NormClip(1.0), monitor=mon)
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
model.compile(optimizer=opt, loss="mse")
"""


def _keras_steps(run_dir):
    run = load_run(run_dir)
    n = len(run.steps)
    assert n >= 25 and run.steps.step.tolist() == list(range(1, n + 1))
    assert run.meta["finished"]
    return n


def test_keras_fit_left_by_an_exception_keeps_every_step(tmp_path):
    pytest.importorskip("tensorflow")
    ns: dict = {"sys": sys}
    sys_argv = sys.argv
    try:
        sys.argv = ["x", str(tmp_path / "run")]
        exec(KERAS_FIT, ns)  # noqa: S102 - the same program as the subprocess below
    finally:
        sys.argv = sys_argv
    with pytest.raises(RuntimeError, match="data loader"):
        with ns["mon"]:
            ns["model"].fit(ns["x"], ns["x"][:, :1], batch_size=8, epochs=1, verbose=0,
                            callbacks=[ns["mon"], ns["Dies"]()])
    assert _keras_steps(tmp_path / "run") == int(ns["opt"].steps_seen.numpy()) == 30


def test_keras_unclosed_monitor_is_written_at_interpreter_exit(tmp_path):
    pytest.importorskip("tensorflow")
    code = KERAS_FIT + "model.fit(x, x[:, :1], batch_size=8, verbose=0, callbacks=[mon, Dies()])\n"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 1 and "data loader died" in out.stderr, out.stderr[-2000:]
    assert "Exception ignored" not in out.stderr
    _keras_steps(tmp_path / "run")


def test_optax_resume_supersedes_what_the_abandoned_run_wrote(tmp_path):
    """Checkpoint after 6 updates; the first process goes on to 12 with 10x gradients (read
    at 8 and 12), then dies; the resumed recorder writes 6..11 again. Each step once, with the
    resumed run's values, no 'stored twice' note, its events only."""
    import warnings

    tx = _tx(length=4)
    update = jax.jit(tx.update)
    params = {"w": jnp.ones(3)}

    def steps(rec, st, ks, scale=1.0, nan_at=9):
        for k in ks:
            g = {"w": jnp.full(3, (1.0 + k) * scale).at[0].set(jnp.nan if k == nan_at else 1.0 + k)}
            _, st = update(g, st, params)
            rec.record(st)
        return st

    a = ggo.Recorder(tmp_path / "run", params)
    st = steps(a, tx.init(params), range(6))
    ckpt = jax.tree.map(jnp.copy, st)
    steps(a, st, range(6, 12), scale=10.0, nan_at=7)
    a._finalizer.detach()  # the process dies: no close, nothing after the last read
    a._writer.close()

    b = ggo.Recorder(tmp_path / "run", params, mode="resume")
    b.close(steps(b, ckpt, range(6, 12)))
    ref = ggo.Recorder(tmp_path / "ref", params)
    ref.close(steps(ref, tx.init(params), range(12)))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RunStoreWarning: nothing stored twice
        run = load_run(tmp_path / "run")
    want = load_run(tmp_path / "ref")
    assert run.steps.step.tolist() == list(range(12))
    assert run.steps.total_norm.equals(want.steps.total_norm)
    assert run.events.step.tolist() == want.events.step.tolist() == [9]  # not the abandoned 7
