"""Statistics out of the optimizer state, a device-side history, and the host recorder.

``stats(state)``  the last step's statistics as a dict of arrays, found in any optax state
                  (``optax.tree`` look-ups of the ``ClipState`` / ``SkipState`` fields); works
                  under ``jit``.
``history(inner, length)``  a wrapper that writes ``stats`` of every step into fixed-size
                  device ring buffers in its state (a dynamic-update-slice per field, no host
                  transfer), so a host reader needs one transfer per ``length`` steps.
``Recorder(run_dir, params)``  the host side: ``record(opt_state)`` after each update reads the
                  history every ``length`` calls (or, without ``history``, the last step's
                  stats every ``every`` calls) and writes steps/layers rows into the same run
                  store as ``gg.Monitor`` (``gradguard.store.RunWriter``), layers named by leaf
                  path, so ``gradguard report`` / ``inspect`` / ``gg.load_run`` read JAX runs.

Durability: with ``history``, the recorder keeps a reference to the last history's ring
buffers it was given (small arrays, not the optimizer state), so ``close()`` without an
``opt_state``, the end of a ``with Recorder(...)`` block left by an exception and interpreter
exit (an unclosed recorder) still write every step recorded so far; without ``history`` the
steps since the last sample need ``close(opt_state)``.

Failures of the store (full disk, read-only folder) warn once and are noted in the run's
meta; they never raise into the training loop. ``max_consecutive_skips`` makes ``record``
raise ``GradientExplosionError`` when a read shows that many refused updates in a row (the
only exception it raises, and only when asked).
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from datetime import datetime, timezone
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..errors import close_at_exit
from . import _args
from ._tree import F32, leaf_names

#: scalar statistics per step (name -> dtype); leaf statistics are [k] arrays
SCALARS = {"total_norm": F32, "clip_coef": F32, "threshold": F32, "clipped": jnp.bool_,
           "skipped": jnp.bool_, "nonfinite": jnp.bool_, "loss": F32,
           "consecutive_skips": jnp.int32, "skip_count": jnp.int32}
LEAVES = {"leaf_norms": F32, "leaf_max_abs": F32, "leaf_nonfinite": jnp.int32}


def _first(state: Any, key: str) -> Any:
    found = optax.tree_utils.tree_get_all_with_path(state, key)
    return found[0][1] if found else None


def stats(state: Any, value: Any = None) -> dict[str, jax.Array]:
    """The last step's statistics from an optax state (jit-able; nothing is read on the host).

    ``total_norm`` is the norm of the incoming update as the outermost gradguard transform
    saw it (``SkipState.grad_norm`` when there is a skip wrapper: it is current even on a
    refused step, when the inner clipper's state is held); ``clip_coef``, ``threshold``,
    ``clipped`` come from the first ``ClipState`` (1, NaN, False without one; ``clipped`` also
    from the value / per-leaf / AGC clippers' states; on a refused step 1 and False: nothing
    was applied); ``skipped``, ``skip_count``,
    ``consecutive_skips`` from the ``SkipState``; ``leaf_*`` per leaf. ``value``: the loss
    (NaN when not given). ``lr`` only when the state holds an ``optax.inject_hyperparams``
    state with a ``learning_rate``: the learning rate of the last update, as the optimizer used
    it (the first such state; no key otherwise, so a history without one keeps its layout).
    """
    skip = _first(state, "skip_count") is not None
    f = jnp.full((), math.nan, F32)
    out: dict[str, jax.Array] = {}
    skipped = _first(state, "skipped") if skip else jnp.zeros((), bool)
    coef = _first(state, "clip_coef")
    out["clip_coef"] = jnp.where(skipped, 1.0, coef if coef is not None else 1.0).astype(F32)
    clipped = _first(state, "clipped")
    if clipped is None:  # the other clippers' own fields
        for key, test in (("clipped_elements", lambda v: v > 0),
                          ("per_leaf_coefs", lambda v: jnp.any(v < 1.0)),
                          ("agc_clipped_units", lambda v: v > 0)):
            v = _first(state, key)
            if v is not None:
                clipped = test(v)
                break
    out["clipped"] = (~skipped & (clipped if clipped is not None else False)).astype(bool)
    thr = _first(state, "threshold")
    out["threshold"] = jnp.asarray(thr if thr is not None else f, F32)
    if skip:
        out["total_norm"] = _first(state, "grad_norm").astype(F32)
        out["leaf_norms"] = _first(state, "grad_leaf_norms")
        out["leaf_max_abs"] = _first(state, "grad_leaf_max_abs")
        out["leaf_nonfinite"] = _first(state, "grad_leaf_nonfinite")
        out["skip_count"] = _first(state, "skip_count")
        out["consecutive_skips"] = _first(state, "consecutive_skips")
    else:
        tn = _first(state, "total_norm")
        out["total_norm"] = jnp.asarray(tn if tn is not None else f, F32)
        ln = _first(state, "leaf_norms")
        if ln is not None:
            out["leaf_norms"] = ln
            out["leaf_max_abs"] = _first(state, "leaf_max_abs")
            out["leaf_nonfinite"] = jnp.where(jnp.isfinite(out["leaf_max_abs"]), 0, -1
                                              ).astype(jnp.int32)  # -1: count unknown
        out["skip_count"] = jnp.zeros((), jnp.int32)
        out["consecutive_skips"] = jnp.zeros((), jnp.int32)
    out["skipped"] = jnp.asarray(skipped, bool)
    out["nonfinite"] = ~jnp.isfinite(out["total_norm"])
    out["loss"] = f if value is None else jnp.reshape(jnp.asarray(value, F32), ())
    lr = _injected_lr(state)
    if lr is not None:
        out["lr"] = lr
    return out


def _injected_lr(state: Any) -> jax.Array | None:
    """The ``learning_rate`` of the first ``inject_hyperparams`` state, as a float32 scalar."""
    for _path, hp in optax.tree_utils.tree_get_all_with_path(state, "hyperparams"):
        if isinstance(hp, dict) and "learning_rate" in hp:
            v = jnp.ravel(jnp.asarray(hp["learning_rate"], F32))
            if v.shape[0]:
                return v[0]
    return None


class HistoryState(NamedTuple):
    """``inner_state``; ``history_step`` int32 updates recorded; ``history``: a dict of ring
    buffers, ``[length]`` per scalar statistic and ``[length, k]`` per leaf statistic, row
    ``i`` holding step ``history_steps[i]`` (-1: never written)."""

    inner_state: Any
    history_step: jax.Array
    history_steps: jax.Array
    history: dict[str, jax.Array]


def history(inner: Any, length: int = 100) -> optax.GradientTransformationExtraArgs:
    """Keep the last ``length`` steps' ``stats`` in device ring buffers in the state (no host
    transfer; the loss comes from ``update(..., value=loss)`` when given). Wrap the whole
    optimizer: ``ggo.history(ggo.skip_nonfinite(...))``; read it with ``Recorder``."""
    inner = optax.with_extra_args_support(_args.transformation(inner, "inner"))
    length = _args.int_at_least(length, "length", 1)

    def init_fn(params: Any) -> HistoryState:
        st = inner.init(params)
        shapes = jax.eval_shape(lambda s: stats(s), st)
        hist = {k: jnp.zeros((length,) + v.shape, v.dtype) for k, v in shapes.items()}
        return HistoryState(st, jnp.zeros((), jnp.int32), jnp.full((length,), -1, jnp.int32), hist)

    def update_fn(updates: Any, state: HistoryState, params: Any = None, **extra_args: Any):
        u, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        st = stats(new_inner, extra_args.get("value"))
        i = state.history_step % length
        hist = {k: state.history[k].at[i].set(st[k].astype(state.history[k].dtype))
                for k in state.history}
        return u, HistoryState(new_inner, state.history_step + 1,
                               state.history_steps.at[i].set(state.history_step), hist)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _versions() -> dict[str, str]:
    import platform

    from .. import __version__

    return {"gradguard": __version__, "jax": jax.__version__, "optax": optax.__version__,
            "python": platform.python_version()}


class Recorder:
    """Writes an optax run's statistics into a gradguard run folder (see the module docstring).

    Args:
        run_dir: the run folder (``gradguard.store.RunWriter`` policy ``mode``: "new" picks a
            fresh sibling when it holds a run, "resume", "overwrite"). With ``history`` and
            ``mode="resume"`` the first ``record`` reads the restored state's update count:
            what the abandoned continuation wrote after the checkpoint is superseded.
        params: the parameter pytree (its leaf paths become the layer names).
        every: without ``ggo.history`` in the state, read the last step's stats every
            ``every`` calls of ``record`` (one small transfer each time); with it, the
            history is read every ``length`` calls and every step is written.
        layer_every: write per-leaf rows for steps that are multiples of it.
        max_consecutive_skips: raise ``GradientExplosionError`` from ``record`` when a read
            shows more refused updates in a row than this (None: never).
        learning_rate: the ``lr`` column when the state does not carry it: a number, or a
            schedule ``step -> lr`` evaluated on the host at the 0-based update number (with a
            skip wrapper the inner optimizer's count lags on refused updates: wrap the inner
            optimizer in ``optax.inject_hyperparams`` instead, whose ``learning_rate`` is read
            from the state on the device and takes precedence). None and neither: NaN
            (unknown). ``lrs`` is always null (one learning rate per optax optimizer).
    """

    def __init__(self, run_dir: Any, params: Any, *, name: str | None = None, every: int = 10,
                 layer_every: int = 1, mode: str = "new", config: dict | None = None,
                 max_consecutive_skips: int | None = None, learning_rate: Any = None):
        from ..store import RunWriter

        if learning_rate is not None and not callable(learning_rate):
            if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float, np.number)):
                raise TypeError(f"learning_rate must be None, a number or a schedule (a callable "
                                f"step -> lr), got {learning_rate!r}")
            learning_rate = float(learning_rate)
        self.learning_rate = learning_rate

        self.every = _args.int_at_least(every, "every", 1)
        self.layer_every = _args.int_at_least(layer_every, "layer_every", 1)
        self.max_consecutive_skips = None if max_consecutive_skips is None else \
            _args.int_at_least(max_consecutive_skips, "max_consecutive_skips", 1)
        self.layers = leaf_names(params)
        self.notes: list[str] = []
        self.calls = 0
        self.written = 0        # next device step not yet written
        self.started = datetime.now(timezone.utc).isoformat()
        self.name = name
        self.config = dict(config or {})
        self.closed = False
        self._steps: list[dict[str, Any]] = []
        self._layer_rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        self._failed = False
        self._last_history: HistoryState | None = None
        self._resuming = mode == "resume"
        self._writer = RunWriter(run_dir, mode=mode)
        self.path = self._writer.path
        self.name = name or self.path.name
        self._meta()
        # an unclosed recorder is closed at interpreter exit (an uncaught exception included)
        self._finalizer = weakref.finalize(self, close_at_exit, weakref.ref(self))

    # -- reading the device ----------------------------------------------------------------
    def record(self, opt_state: Any) -> None:
        """Call once after every update. Reads the device only every ``length`` (history) or
        ``every`` calls; never raises, except ``GradientExplosionError`` when asked."""
        if self.closed:
            return
        self.calls += 1
        hist = _first_history(opt_state)
        if hist is not None and self._resuming:
            self._resume(hist)
        if hist is not None:
            # the ring buffers only (never the inner state): what close() reads if not given
            self._last_history = HistoryState(None, hist.history_step, hist.history_steps,
                                              hist.history)
            if self.calls % hist.history_steps.shape[0] == 0:
                self._read_history(hist)
        elif self.calls % self.every == 0:
            self._read_last(opt_state, self.calls - 1)

    def _resume(self, hist: HistoryState) -> None:
        """``mode="resume"``, first ``record``: the state comes from a checkpoint taken after
        ``k`` updates (one read of the history's step counter). Rows and events the abandoned
        continuation wrote for steps ``>= k`` are superseded (``RunWriter.resume_from``), and
        the restored ring's steps before ``k`` are not written again."""
        self._resuming = False
        try:
            k = int(jax.device_get(hist.history_step)) - 1  # updates before this call's one
            self.written = max(self.written, k)
            if k >= 1:
                self._writer.resume_from(k - 1)
        except Exception as exc:  # noqa: BLE001 - recording never raises into training
            self._fail(exc)

    def _read_history(self, hist: HistoryState) -> None:
        steps, data = jax.device_get((hist.history_steps, hist.history))
        order = np.argsort(steps, kind="stable")
        for i in order:
            s = int(steps[i])
            if s < self.written:
                continue
            self._row(s, {k: v[i] for k, v in data.items()})
        self.written = max(self.written, int(steps.max()) + 1)
        self._flush()

    def _read_last(self, opt_state: Any, step: int) -> None:
        self._row(step, jax.device_get(stats(opt_state)))
        self._flush()

    def _row(self, step: int, st: dict[str, Any]) -> None:
        total, coef = float(st["total_norm"]), float(st["clip_coef"])
        self._steps.append({
            "step": step, "time": time.time(), "loss": float(st["loss"]), "lr": self._lr(step, st),
            "lrs": None,
            "total_norm": total, "total_norm_after": total * coef if not st["skipped"] else 0.0,
            "clip_coef": coef, "threshold": float(st["threshold"]), "clipped": bool(st["clipped"]),
            "skipped": bool(st["skipped"]), "nonfinite": bool(st["nonfinite"]),
            "loss_scale": math.nan, "rank": 0})
        if "leaf_norms" in st and step % self.layer_every == 0:
            self._layer_rows.append((step, np.asarray(st["leaf_norms"], np.float32),
                                     np.asarray(st["leaf_max_abs"], np.float32),
                                     np.asarray(st["leaf_nonfinite"], np.int64)))
        if bool(st["skipped"]) or bool(st["nonfinite"]):
            self._events.append({
                "step": step, "rule": "nonfinite" if bool(st["nonfinite"]) else "spike",
                "value": total, "baseline": float(st["threshold"]), "action": "skip" if bool(
                    st["skipped"]) else "none", "top_layers": [], "first_nonfinite_layer":
                _first_bad(self.layers, st), "window": None,
                "message": f"step {step}: update {'refused' if bool(st['skipped']) else 'not finite'}"
                           f" (global norm {total:.4g})", "time": time.time(), "rank": 0})
        if self.max_consecutive_skips is not None and \
                int(st["consecutive_skips"]) > self.max_consecutive_skips:
            self._flush()
            from ..errors import GradientExplosionError

            raise GradientExplosionError(
                f"gradguard.optax: {int(st['consecutive_skips'])} updates in a row were "
                f"refused at step {step} (max_consecutive_skips={self.max_consecutive_skips})")

    def _lr(self, step: int, st: dict[str, Any]) -> float:
        if "lr" in st:
            return float(st["lr"])
        lr = self.learning_rate
        if lr is None:
            return math.nan
        if not callable(lr):
            return lr
        try:
            return float(lr(step))
        except Exception as exc:  # noqa: BLE001 - recording never raises into training
            msg = (f"gradguard.optax recorder: learning_rate({step}) failed ({exc!r}); lr is "
                   "recorded as NaN from here on")
            self.notes.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
            self.learning_rate = None
            return math.nan

    @property
    def _events(self) -> list[dict[str, Any]]:
        if not hasattr(self, "_event_rows"):
            self._event_rows: list[dict[str, Any]] = []
        return self._event_rows

    # -- writing ---------------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._steps and not self._layer_rows and not self._events:
            return
        import pyarrow as pa

        from ..store import LAYERS_SCHEMA, STEPS_SCHEMA, layer_column

        try:
            if self._steps:
                cols = {f.name: [r[f.name] for r in self._steps] for f in STEPS_SCHEMA}
                self._writer.write_shard("steps", pa.table(cols, schema=STEPS_SCHEMA))
            if self._layer_rows:
                n, k = len(self._layer_rows), len(self.layers)
                cnt = np.concatenate([r[3] for r in self._layer_rows])
                table = pa.table({
                    "step": pa.array(np.repeat([r[0] for r in self._layer_rows], k), pa.int64()),
                    "layer": layer_column(self.layers, n),
                    "grad_norm": pa.array(np.concatenate([r[1] for r in self._layer_rows])),
                    "grad_max_abs": pa.array(np.concatenate([r[2] for r in self._layer_rows])),
                    "nonfinite_count": pa.array(cnt, pa.int64(), mask=cnt < 0),
                    "param_norm": pa.nulls(n * k, pa.float32()),
                    "update_ratio": pa.nulls(n * k, pa.float32()),
                    "rank": pa.array(np.zeros(n * k, np.int32)),
                }, schema=LAYERS_SCHEMA)
                self._writer.write_shard("layers", table)
            self._writer.next_seq()
            self._writer.append_events(self._events)
        except OSError as exc:
            self._fail(exc)
        finally:
            self._steps, self._layer_rows = [], []
            self._events.clear()

    def _fail(self, exc: BaseException) -> None:
        if not self._failed:
            self._failed = True
            msg = f"gradguard.optax recorder: cannot write the run store ({exc}); training continues"
            self.notes.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _meta(self) -> None:
        meta = {"name": self.name, "layers": list(self.layers),
                "parameters": [[n, n] for n in self.layers],
                "config": {"framework": "jax", "every": self.every,
                           "layer_every": self.layer_every, **self.config},
                "versions": _versions(), "started": self.started, "notes": list(self.notes),
                "ranks": [0], "finished": datetime.now(timezone.utc).isoformat()
                if self.closed else None}
        try:
            self._writer.write_meta(meta)
        except OSError as exc:
            self._fail(exc)

    def close(self, opt_state: Any = None) -> None:
        """Write what is left (with ``history``, the steps since the last read, from the last
        state ``record`` saw unless ``opt_state`` is given; without it, pass the final
        ``opt_state``), finish the meta, release the folder. Never raises."""
        if self.closed:
            return
        if opt_state is not None or self._last_history is not None:
            hist = _first_history(opt_state) if opt_state is not None else self._last_history
            try:
                if hist is not None:
                    self._read_history(hist)
                elif self.calls % self.every:
                    self._read_last(opt_state, self.calls - 1)
            except Exception as exc:  # noqa: BLE001 - closing never raises into the loop
                self._fail(exc)
        self._last_history = None
        try:
            self._flush()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
        self.closed = True
        self._meta()
        try:
            self._writer.close()
        except OSError as exc:
            self._fail(exc)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_history(state: Any) -> HistoryState | None:
    if isinstance(state, HistoryState):
        return state
    found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, HistoryState))
             if isinstance(x, HistoryState)]
    return found[0] if found else None


def _first_bad(layers: list[str], st: dict[str, Any]) -> str | None:
    if "leaf_max_abs" not in st:
        return None
    bad = np.flatnonzero(~np.isfinite(np.asarray(st["leaf_max_abs"], np.float64)))
    return layers[int(bad[0])] if len(bad) and int(bad[0]) < len(layers) else None
