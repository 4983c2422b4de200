"""The seed article's Keras programs, rerun with ``gradguard.keras.GuardedOptimizer``.

1. **The seed MLP on unscaled ``make_regression``** (the article's before/after study, which it
   ran in PyTorch), in Keras: Dense 20 -> 25 (ReLU, Glorot-uniform, bias 0.01) -> 1, SGD lr
   0.07 momentum 0.8, MSE, batch 128, 50 epochs, make_regression(1000 x 20, noise 0.1,
   random_state 1). Unclipped, the norms explode and the loss becomes NaN; clipped, it trains.
2. **The seed's Keras LSTM fit**: ``SGD(0.01, momentum=0.9, clipvalue=1.0)`` (or
   ``clipnorm=1.0``) replaced by ``GuardedOptimizer(SGD(0.01, momentum=0.9),
   clipper=gg.ValueClip(1.0))`` (``gg.NormClip(1.0, per_tensor=True)``). Data: sklearn's 8x8
   digits as sequences of 8 rows (the default), or real MNIST (28 rows of 28) from local IDX
   files (``mnist_dir``), as the torch demo does. The seed compiled with
   ``loss='binary_crossentropy'`` on 10 classes, a slip; sparse categorical cross-entropy on
   logits is used here.

Strategies are names: ``"none"``, ``"keras clipvalue=1"``, ``"keras clipnorm=1"``,
``"gg ValueClip(1)"``, ``"gg NormClip(1)"``, ``"gg NormClip(1, per_tensor)"``, ``"gg auto"``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

STRATEGIES = ("none", "keras clipvalue=1", "keras clipnorm=1", "gg ValueClip(1)", "gg NormClip(1)",
              "gg NormClip(1, per_tensor)", "gg auto")


@dataclass
class Result:
    """One run: the final train loss (MSE for the MLP, cross-entropy for the LSTM), the first
    epoch (1-based) whose loss is not finite (None if none), test accuracy (LSTM), skips."""

    program: str
    strategy: str
    seed: int
    final_loss: float
    first_nonfinite_epoch: int | None
    accuracy: float | None = None
    skipped: int = 0


def optimizer(strategy: str, lr: float, momentum: float):
    """The Keras optimizer of a strategy name (see the module docstring)."""
    import keras

    import gradguard as gg
    import gradguard.keras as ggk

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "none":
        return keras.optimizers.SGD(lr, momentum=momentum)
    if strategy.startswith("keras "):
        k, v = strategy.split(" ", 1)[1].split("=")
        return keras.optimizers.SGD(lr, momentum=momentum, **{k: float(v)})
    clipper = {"gg ValueClip(1)": lambda: gg.ValueClip(1.0), "gg NormClip(1)": lambda: gg.NormClip(1.0),
               "gg NormClip(1, per_tensor)": lambda: gg.NormClip(1.0, per_tensor=True),
               "gg auto": lambda: "auto"}[strategy]()
    return ggk.GuardedOptimizer(keras.optimizers.SGD(lr, momentum=momentum), clipper=clipper)


class _Epochs:
    """Per-epoch train loss, from ``fit``'s history."""

    @staticmethod
    def first_nonfinite(losses: list[float]) -> int | None:
        for i, v in enumerate(losses, 1):
            if not math.isfinite(v):
                return i
        return None


def seed_mlp(strategy: str, seed: int = 0, *, epochs: int = 50, n_samples: int = 1000,
             monitor: Any = None) -> Result:
    """The seed MLP before/after in Keras; ``final_loss`` is the train-set MSE at the end."""
    import keras
    from sklearn.datasets import make_regression

    X, y = make_regression(n_samples=n_samples, n_features=20, noise=0.1, random_state=1)
    X, y = X.astype("float32"), y.astype("float32").reshape(-1, 1)
    keras.utils.set_random_seed(seed)
    init = dict(kernel_initializer="glorot_uniform", bias_initializer=keras.initializers.Constant(0.01))
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(25, activation="relu", **init),
                              keras.layers.Dense(1, **init)])
    opt = optimizer(strategy, 0.07, 0.8)
    if monitor is not None:
        opt.attach_monitor(monitor)
    model.compile(optimizer=opt, loss="mse")
    cbs = [monitor] if monitor is not None else []
    hist = model.fit(X, y, batch_size=128, epochs=epochs, verbose=0, shuffle=True, callbacks=cbs)
    losses = [float(v) for v in hist.history["loss"]]
    final = float(np.mean((model.predict(X, verbose=0, batch_size=1000) - y) ** 2))
    return Result("seed MLP (Keras)", strategy, seed, final, _Epochs.first_nonfinite(losses),
                  skipped=_skipped(opt))


def _skipped(opt) -> int:
    s = getattr(opt, "skipped_steps", None)
    return 0 if s is None else int(s.numpy())


def digits(mnist_dir: str | None = None, max_train: int | None = None):
    """(x_train, y_train, x_test, y_test): images as row sequences (N, rows, cols), standardised
    with the train set's mean and std; sklearn's 8x8 digits unless ``mnist_dir``."""
    if mnist_dir:
        from .idx import load_mnist

        xtr, ytr, xte, yte = load_mnist(mnist_dir)
        xtr, xte = xtr.astype(np.float32) / 255.0, xte.astype(np.float32) / 255.0
    else:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = d.images.astype(np.float32) / 16.0
        xtr, xte, ytr, yte = train_test_split(x, d.target.astype(np.int64), test_size=0.2,
                                              random_state=0, stratify=d.target)
    if max_train is not None:
        xtr, ytr = xtr[:max_train], ytr[:max_train]
    mean, std = float(xtr.mean()), float(xtr.std())
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


def seed_lstm_fit(strategy: str, seed: int = 0, *, epochs: int = 5, units: int = 32,
                  batch_size: int = 32, mnist_dir: str | None = None,
                  max_train: int | None = None) -> Result:
    """The seed's Keras ``Sequential([LSTM(num_units), Dense(num_classes)])`` fit with
    ``SGD(0.01, momentum=0.9)`` and the strategy's clipping; test accuracy at the end."""
    import keras

    xtr, ytr, xte, yte = digits(mnist_dir, max_train)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input(xtr.shape[1:]), keras.layers.LSTM(units), keras.layers.Dense(10)])
    opt = optimizer(strategy, 0.01, 0.9)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    hist = model.fit(xtr, ytr, batch_size=batch_size, epochs=epochs, verbose=0)
    losses = [float(v) for v in hist.history["loss"]]
    acc = float(np.mean(np.argmax(model.predict(xte, verbose=0), axis=1) == yte))
    return Result("seed LSTM fit (Keras)", strategy, seed, losses[-1],
                  _Epochs.first_nonfinite(losses), acc, _skipped(opt))


def table(results: list[Result]) -> str:
    """A markdown table of results (one row per program and strategy, seeds averaged)."""
    rows = {}
    for r in results:
        rows.setdefault((r.program, r.strategy), []).append(r)
    out = ["| program | strategy | final train loss (mean over seeds) | runs with NaN (first epoch) "
           "| test accuracy | skipped steps |", "| --- | --- | --- | --- | --- | --- |"]
    for (prog, strat), rs in rows.items():
        finite = [r.final_loss for r in rs if math.isfinite(r.final_loss)]
        loss = f"{np.mean(finite):.4g}" if len(finite) == len(rs) else \
            (f"NaN in {len(rs) - len(finite)}/{len(rs)}" + (f"; others {np.mean(finite):.4g}" if finite else ""))
        nan = [r.first_nonfinite_epoch for r in rs if r.first_nonfinite_epoch is not None]
        nan_s = f"{len(nan)}/{len(rs)} (epoch {min(nan)})" if nan else f"0/{len(rs)}"
        accs = [r.accuracy for r in rs if r.accuracy is not None]
        acc = f"{np.mean(accs):.3f}" if accs else "-"
        out.append(f"| {prog} | {strat} | {loss} | {nan_s} | {acc} | {sum(r.skipped for r in rs)} |")
    return "\n".join(out)


def demo(args: Any) -> int:
    """``gradguard demo --framework keras``: the seed MLP before/after and the seed's LSTM fit in
    Keras (``--seeds``; ``--tiny``: 5 epochs, one seed, one LSTM epoch; ``--mnist-dir``: the
    LSTM on real MNIST from IDX files instead of the 8x8 digits); prints two tables."""
    tiny = bool(getattr(args, "tiny", False))
    seeds = 1 if tiny else int(getattr(args, "seeds", 3))
    names = getattr(args, "strategies", None) or STRATEGIES
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        import sys

        print(f"gradguard demo: error: --strategies {unknown[0]!r} is not a Keras strategy; "
              f"choose from {', '.join(STRATEGIES)}", file=sys.stderr)
        return 2
    mlp = [seed_mlp(s, k, epochs=5 if tiny else 50) for s in names for k in range(seeds)]
    print(table(mlp))
    lstm = [seed_lstm_fit(s, 0, epochs=1 if tiny else 5, mnist_dir=getattr(args, "mnist_dir", None))
            for s in names]
    print()
    print(table(lstm))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m gradguard.experiments.keras_seed [--quick] [--seeds N] [--mnist DIR]``:
    the Keras tables of ``docs/results.md`` (the seed MLP before/after, the seed's LSTM fit)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m gradguard.experiments.keras_seed")
    p.add_argument("--quick", action="store_true", help="5 epochs, one seed")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--mnist", metavar="DIR", help="MNIST IDX files for the LSTM (default: 8x8 digits)")
    a = p.parse_args(argv)
    seeds = 1 if a.quick else a.seeds
    mlp = [seed_mlp(s, k, epochs=5 if a.quick else 50) for s in STRATEGIES for k in range(seeds)]
    print(table(mlp))
    lstm = [seed_lstm_fit(s, 0, epochs=1 if a.quick else 5, mnist_dir=a.mnist) for s in STRATEGIES]
    print()
    print(table(lstm))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
