"""The seed article's TensorFlow and Keras programs rerun with gradguard (small and fast)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
pytest.importorskip("tensorflow")
pytest.importorskip("sklearn")

from gradguard.experiments import keras_seed, tf_seed  # noqa: E402


def test_seed_mlp_unclipped_diverges_clipped_trains():
    none = keras_seed.seed_mlp("none", epochs=3)
    assert none.first_nonfinite_epoch is not None and math.isnan(none.final_loss)
    keras_cv = keras_seed.seed_mlp("keras clipvalue=1", epochs=3)
    gg_cv = keras_seed.seed_mlp("gg ValueClip(1)", epochs=3)
    assert gg_cv.first_nonfinite_epoch is None
    assert gg_cv.final_loss == keras_cv.final_loss  # the wrapper is Keras's clipvalue, exactly
    # the seed's other Keras clip: clipnorm=1 is per variable, gg NormClip(1, per_tensor) too
    keras_cn = keras_seed.seed_mlp("keras clipnorm=1", epochs=2)
    gg_cn = keras_seed.seed_mlp("gg NormClip(1, per_tensor)", epochs=2)
    assert gg_cn.first_nonfinite_epoch is None
    assert gg_cn.final_loss == pytest.approx(keras_cn.final_loss, rel=1e-5)
    auto = keras_seed.seed_mlp("gg auto", epochs=3)
    assert auto.first_nonfinite_epoch is None and math.isfinite(auto.final_loss)
    assert "NaN in 1/1" in keras_seed.table([none, auto])


def test_seed_gradient_tape_lstm_ggtf_matches_tf():
    a = tf_seed.run("tf.clip_by_value", training_steps=20, display_step=5)
    b = tf_seed.run("ggtf.clip_by_value", training_steps=20, display_step=5)
    assert a.losses == b.losses and a.accuracy == b.accuracy
    c = tf_seed.run("tf.clip_by_norm", training_steps=20, display_step=5)
    d = tf_seed.run("ggtf.clip_by_norm", training_steps=20, display_step=5)
    np.testing.assert_allclose(c.losses, d.losses, rtol=1e-5)
    g = tf_seed.run("ggtf.clip_by_global_norm", training_steps=20, display_step=5)
    assert g.skipped == 0 and all(math.isfinite(v) for v in g.losses)
    with pytest.raises(ValueError, match="clip"):
        tf_seed.run("tf.clip")


def test_seed_keras_lstm_fit_with_the_wrapper():
    r = keras_seed.seed_lstm_fit("gg ValueClip(1)", epochs=1, max_train=256, units=8)
    k = keras_seed.seed_lstm_fit("keras clipvalue=1", epochs=1, max_train=256, units=8)
    assert r.final_loss == k.final_loss and r.accuracy == k.accuracy
    assert 0.0 <= r.accuracy <= 1.0 and math.isfinite(r.final_loss)


def _tiny_mnist(folder, n=40):
    """MNIST-shaped IDX files (28 x 28 uint8 images, labels 0-9)."""
    from gradguard.experiments.idx import write_idx

    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8))
    return folder


def test_demo_mnist_dir_trains_the_seed_programs_on_idx_files(tmp_path, monkeypatch):
    """``gradguard demo --framework tensorflow|keras --mnist-dir DIR`` hands DIR to the seed's
    LSTM programs, which read MNIST's 28 rows of 28 from the IDX files."""
    from gradguard import cli

    d = str(_tiny_mnist(tmp_path))
    xtr, ytr, xte, _ = keras_seed.digits(d)
    assert xtr.shape == (40, 28, 28) and xte.shape == (40, 28, 28) and ytr.max() <= 9
    r = tf_seed.run("ggtf.clip_by_norm", training_steps=2, display_step=2, num_units=4, mnist_dir=d)
    k = keras_seed.seed_lstm_fit("gg NormClip(1)", epochs=1, units=4, mnist_dir=d)
    assert 0.0 <= r.accuracy <= 1.0 and 0.0 <= k.accuracy <= 1.0 and math.isfinite(k.final_loss)
    seen = []
    monkeypatch.setattr(tf_seed, "run", lambda *a, **kw: seen.append(kw["mnist_dir"]) or r)
    monkeypatch.setattr(keras_seed, "seed_lstm_fit", lambda *a, **kw: seen.append(kw["mnist_dir"]) or k)
    monkeypatch.setattr(keras_seed, "seed_mlp", lambda *a, **kw: k)
    assert cli.main(["demo", "--framework", "tensorflow", "--tiny", "--mnist-dir", d]) == 0
    assert cli.main(["demo", "--framework", "keras", "--tiny", "--mnist-dir", d]) == 0
    assert seen == [d] * (len(tf_seed.CLIPS) + len(keras_seed.STRATEGIES))
