"""GuardedOptimizer under tf.distribute.MirroredStrategy over two logical CPUs.

The logical devices must be configured before TensorFlow initialises, so the checks run in a
fresh subprocess (hard timeout) that prints one JSON object; the assertions are made here.
Set-up of research/checks/t_mirror.py: one weight, SGD lr 1, true gradient 3, threshold 1:
Keras's own clipnorm/clipvalue/global_clipnorm give w = -2 with two replicas (each replica
clips its half, then the halves are summed); the single-device answer is w = -1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

SCRIPT = textwrap.dedent('''
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"; os.environ["KERAS_BACKEND"] = "tensorflow"
    import numpy as np, tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import gradguard.keras as ggk

    x = np.ones((4, 1), "float32"); y = np.full((4, 1), -1.5, "float32")
    mirror = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.get_strategy()

    def run(strategy, clipper=None, keras_kw=None, y=y, lso=False, skip=None, epochs=1, x=x, y2=None):
        with strategy.scope():
            m = keras.Sequential([keras.Input((x.shape[1],)),
                                  keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
            if keras_kw is not None:
                opt = keras.optimizers.SGD(1.0, **keras_kw)
            else:
                opt = ggk.GuardedOptimizer(keras.optimizers.SGD(1.0), clipper=clipper, skip=skip)
            outer = keras.optimizers.LossScaleOptimizer(opt, initial_scale=8.0) if lso else opt
            m.compile(optimizer=outer, loss="mse")
        m.fit(x, y, batch_size=4, epochs=epochs, verbose=0, shuffle=False)
        before = m.layers[0].kernel.numpy().ravel().tolist()
        skipped_before = None if keras_kw is not None else int(opt.skipped_steps.numpy())
        if y2 is not None:  # one more step on other targets
            m.fit(x, y2, batch_size=4, epochs=1, verbose=0, shuffle=False)
        out = {"w": m.layers[0].kernel.numpy().ravel().tolist(), "it": int(opt.iterations.numpy()),
               "w_before_last": before, "skipped_before_last": skipped_before}
        if keras_kw is None:
            out["skipped"] = int(opt.skipped_steps.numpy())
            out["state"] = [v.numpy().ravel().tolist() for v in opt.variables]
        if lso:
            out["scale"] = float(outer.dynamic_scale.numpy())
        return out

    res = {}
    specs = {"norm": {"rule": "norm", "max_norm": 1.0},
             "per_tensor": {"rule": "norm_per_tensor", "max_norm": 1.0},
             "value": {"rule": "value", "min_value": -1.0, "max_value": 1.0}}
    for name, spec in specs.items():
        res[name] = {"single": run(single, spec), "mirror": run(mirror, spec)}
    res["keras_global_clipnorm"] = run(mirror, keras_kw={"global_clipnorm": 1.0})
    bad2 = y.copy(); bad2[3, 0] = np.nan      # only the second replica's half
    bad1 = y.copy(); bad1[0, 0] = np.nan      # only the first replica's half
    res["nan_replica2"] = run(mirror, specs["norm"], y=bad2)
    res["nan_replica1"] = run(mirror, specs["norm"], y=bad1)
    res["lso_nan_replica2"] = run(mirror, specs["norm"], y=bad2, lso=True)
    res["lso_ok"] = run(mirror, specs["norm"], lso=True)
    # an adaptive clip and a skip rule over several steps: the same state on 1 and 2 replicas
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(4, 3)).astype("float32"); ys = (rng.normal(size=(4, 1)) * 5).astype("float32")
    zc = {"rule": "zclip", "warmup_steps": 2}
    sk = {"rule": "spike_skip", "threshold": 3.0, "window": 4, "min_history": 2}
    # then one more step with a spike only in the second replica's half: SpikeSkip refuses it
    spiked = ys.copy(); spiked[3, 0] = 1e4
    res["zclip"] = {"single": run(single, zc, skip=sk, epochs=6, x=xs, y=ys, y2=spiked),
                    "mirror": run(mirror, zc, skip=sk, epochs=6, x=xs, y=ys, y2=spiked)}
    # every other rule: the same weights and state on 1 and 2 replicas ("auto" with plain SGD
    # is the trust region: ||theta_0|| read from the mirrored variables)
    for name, spec in {"agc": {"rule": "agc", "clipping": 0.05},
                       "autoclip": {"rule": "autoclip", "percentile": 50.0},
                       "auto": {"rule": "overshoot"}}.items():
        res[name] = {"single": run(single, spec, epochs=4, x=xs, y=ys),
                     "mirror": run(mirror, spec, epochs=4, x=xs, y=ys)}
    res["unclipped_4_epochs"] = run(single, None, epochs=4, x=xs, y=ys)
    # a monitored run on two replicas, NaN in replica 2's half of step 2: the run store gets
    # every step, the skip, the per-layer rows and the detector's event
    import tempfile, gradguard as gg
    folder = tempfile.mkdtemp()
    mon = ggk.Monitor(folder + "/run", flush_every=2, layer_every=2)
    with mirror.scope():
        mm = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="a"),
                               keras.layers.Dense(1, name="b")], name="net")
        mm.compile(optimizer=ggk.GuardedOptimizer(keras.optimizers.SGD(0.1), clipper=None, monitor=mon),
                   loss="mse")
    xm = np.tile(xs, (3, 1)); ym = np.tile(ys, (3, 1)); ym[7, 0] = np.nan
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mm.fit(xm, ym, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[mon])
    mon.close()
    run = gg.load_run(mon._writer.path)
    res["monitor"] = {"steps": run.steps.step.tolist(), "skipped": run.steps.skipped.tolist(),
                      "layer_steps": sorted(set(run.layers.step.tolist())),
                      "events": [[int(e["step"]), e["rule"], e["first_nonfinite_layer"]]
                                 for e in run.events.to_dict("records")]}
    print("RESULT" + json.dumps(res))
''')


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=420, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[0][len("RESULT"):])


@pytest.mark.parametrize("name", ["norm", "per_tensor", "value"])
def test_two_replicas_clip_like_one_device(results, name):
    r = results[name]
    # -1 up to the 1e-6 of torch's formula min(1, c / (n + 1e-6)) for the global norm clip
    assert r["single"]["w"][0] == pytest.approx(-1.0, rel=1e-6)
    assert r["mirror"]["w"] == r["single"]["w"]      # Keras's own options give -2 here
    assert r["mirror"]["state"] == r["single"]["state"]


def test_keras_global_clipnorm_doubles_the_threshold_the_reproduction(results):
    assert results["keras_global_clipnorm"]["w"] == [-2.0]


@pytest.mark.parametrize("which", ["nan_replica1", "nan_replica2"])
def test_nan_on_either_replica_skips_on_all(results, which):
    r = results[which]
    assert r["w"] == [0.0] and r["it"] == 0 and r["skipped"] == 1


def test_loss_scale_optimizer_outside(results):
    # LSO takes its finite check from replica 0 only and applies; the guard catches the NaN
    r = results["lso_nan_replica2"]
    assert r["w"] == [0.0] and r["skipped"] == 1 and r["it"] == 0
    ok = results["lso_ok"]
    assert ok["w"][0] == pytest.approx(-1.0, rel=1e-6) and ok["scale"] == 8.0


def test_adaptive_rule_state_identical_on_one_and_two_replicas(results):
    s, m = results["zclip"]["single"], results["zclip"]["mirror"]
    assert m["it"] == s["it"] and m["skipped"] == s["skipped"]
    for a, b in zip(m["w"], s["w"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for va, vb in zip(m["state"], s["state"]):
        for a, b in zip(va, vb):
            assert (a != a and b != b) or a == pytest.approx(b, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["agc", "autoclip", "auto"])
def test_every_other_rule_clips_like_one_device(results, name):
    s, m = results[name]["single"], results[name]["mirror"]
    assert s["w"] != results["unclipped_4_epochs"]["w"]  # the rule clipped: the check is not void
    for a, b in zip(m["w"], s["w"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for va, vb in zip(m["state"], s["state"]):
        for a, b in zip(va, vb):
            assert (a != a and b != b) or a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_spike_on_replica_2_is_refused_on_all(results):
    """SpikeSkip's refusal is decided on the summed gradient: a spike in the second replica's
    half skips the step on both, as on one device, and the weights stay as they were."""
    s, m = results["zclip"]["single"], results["zclip"]["mirror"]
    for r in (s, m):
        assert r["skipped"] == r["skipped_before_last"] + 1, r   # the spiked step was refused
        assert r["w"] == r["w_before_last"]
    assert m["skipped"] == s["skipped"] and m["it"] == s["it"]
    for a, b in zip(m["w"], s["w"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_monitor_on_two_replicas(results):
    r = results["monitor"]
    assert r["steps"] == [1, 2, 3] and r["skipped"] == [False, True, False]
    assert r["layer_steps"] == [2]
    assert r["events"] == [[2, "nonfinite", "net/a"]]
