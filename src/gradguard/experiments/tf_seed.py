"""The seed article's TensorFlow program, with ``tf.clip_by_value`` / ``tf.clip_by_norm``
replaced by ``gradguard.tensorflow``.

The seed's ``run_optimization``: an LSTM (``num_units`` 32) and a Dense logit layer, Adam(1e-3),
sparse softmax cross-entropy, inside ``tf.GradientTape``; the gradients clipped element-wise
(``clip_by_value(-1, 1)``) or per tensor (``clip_by_norm(2.0)``) before
``optimizer.apply_gradients``. Data: sklearn's 8x8 digits as sequences of 8 rows (default) or
MNIST (28 x 28) from local IDX files (``mnist_dir``); batches of 32, reshuffled each pass.

``clip`` is one of ``"tf.clip_by_value"``, ``"tf.clip_by_norm"``, ``"ggtf.clip_by_value"``,
``"ggtf.clip_by_norm"``, ``"ggtf.clip_by_global_norm"`` (then a non-finite step is skipped,
since the returned norm says so) or ``"none"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

CLIPS = ("none", "tf.clip_by_value", "tf.clip_by_norm", "ggtf.clip_by_value", "ggtf.clip_by_norm",
         "ggtf.clip_by_global_norm")


@dataclass
class TapeResult:
    clip: str
    seed: int
    losses: list[float]   # the train-batch loss every ``display_step`` steps (the seed's print)
    accuracy: float       # test accuracy at the end
    skipped: int


def run(clip: str = "ggtf.clip_by_value", seed: int = 0, *, training_steps: int = 300,
        batch_size: int = 32, num_units: int = 32, learning_rate: float = 1e-3,
        display_step: int = 100, mnist_dir: str | None = None) -> TapeResult:
    """Train the seed's GradientTape LSTM classifier with one clipping choice."""
    import keras
    import tensorflow as tf

    import gradguard.tensorflow as ggtf

    from .keras_seed import digits

    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {CLIPS}, got {clip!r}")
    xtr, ytr, xte, yte = digits(mnist_dir)
    keras.utils.set_random_seed(seed)
    lstm, out = keras.layers.LSTM(units=num_units), keras.layers.Dense(10)

    def network(x):
        return out(lstm(x))

    network(tf.zeros((1,) + xtr.shape[1:]))  # build
    variables = lstm.trainable_variables + out.trainable_variables
    optimizer = keras.optimizers.Adam(learning_rate)
    skipped = tf.Variable(0, dtype=tf.int64)

    def cross_entropy_loss(logits, y):
        y = tf.cast(y, tf.int64)
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))

    @tf.function
    def run_optimization(x, y):
        with tf.GradientTape() as tape:
            loss = cross_entropy_loss(network(x), y)
        gradients = tape.gradient(loss, variables)
        if clip == "tf.clip_by_value":
            gradients = [tf.clip_by_value(g, clip_value_min=-1.0, clip_value_max=1.0) for g in gradients]
        elif clip == "tf.clip_by_norm":
            gradients = [tf.clip_by_norm(g, clip_norm=2.0) for g in gradients]
        elif clip == "ggtf.clip_by_value":
            gradients = ggtf.clip_by_value(gradients, clip_value_min=-1.0, clip_value_max=1.0)
        elif clip == "ggtf.clip_by_norm":
            gradients = ggtf.clip_by_norm(gradients, clip_norm=2.0)
        elif clip == "ggtf.clip_by_global_norm":
            gradients, norm = ggtf.clip_by_global_norm(gradients, 2.0)
            ok = tf.math.is_finite(norm)
            tf.cond(ok, lambda: optimizer.apply_gradients(zip(gradients, variables)),
                    lambda: skipped.assign_add(1))
            return loss
        optimizer.apply_gradients(zip(gradients, variables))
        return loss

    rng = np.random.default_rng(seed)
    losses, step = [], 0
    while step < training_steps:
        perm = rng.permutation(len(xtr))
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            loss = run_optimization(tf.constant(xtr[idx]), tf.constant(ytr[idx]))
            step += 1
            if step % display_step == 0:
                losses.append(float(loss))
            if step >= training_steps:
                break
    acc = float(np.mean(np.argmax(network(tf.constant(xte)).numpy(), axis=1) == yte))
    return TapeResult(clip, seed, losses, acc, int(skipped.numpy()))


def demo(args: Any) -> int:
    """``gradguard demo --framework tensorflow``: the seed's GradientTape LSTM classifier with
    each clipping choice of ``CLIPS`` (``--seeds``; ``--tiny``: 50 steps, one seed;
    ``--mnist-dir``: real MNIST from IDX files instead of the 8x8 digits)."""
    tiny = bool(getattr(args, "tiny", False))
    mnist_dir = getattr(args, "mnist_dir", None)
    seeds = 1 if tiny else int(getattr(args, "seeds", 3))
    steps = 50 if tiny else 300
    rows = ["| clip | mean train-batch loss at the end | test accuracy | skipped steps |",
            "| --- | --- | --- | --- |"]
    for clip in CLIPS:
        rs = [run(clip, k, training_steps=steps, display_step=min(100, steps), mnist_dir=mnist_dir)
              for k in range(seeds)]
        last = [r.losses[-1] for r in rs]
        rows.append(f"| {clip} | {np.mean(last):.4g} | {np.mean([r.accuracy for r in rs]):.3f} | "
                    f"{sum(r.skipped for r in rs)} |")
    print("\n".join(rows))
    return 0
