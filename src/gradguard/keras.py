"""gradguard for Keras 3: ``GuardedOptimizer``, an optimizer wrapper that clips and skips right.

Size: one Keras optimizer subclass and its monitor callback; Keras needs the wrapper's
variables, build, apply, serialization and distribution hooks in one class, so they stay
together.

::

    import keras, gradguard as gg, gradguard.keras as ggk
    opt = ggk.GuardedOptimizer(keras.optimizers.SGD(0.01, momentum=0.9), clipper=gg.NormClip(1.0))
    model.compile(optimizer=opt, loss="mse"); model.fit(x, y)

What it does to every step, in order (``apply``):

1. unscale by ``loss_scale_factor`` (taken over from the inner optimizer);
2. under ``tf.distribute`` (``MirroredStrategy`` ...) **sum the gradients across replicas
   first**, then decide once on the global gradient: every replica sees the same norm, the
   same clip and the same skip (Keras clips each replica's share before its all-reduce, which
   multiplies the threshold by the number of replicas, and ``LossScaleOptimizer`` takes its
   finite check from replica 0 only);
3. norms in float32 (one read, ``gradguard.tensorflow.norms``): per variable and total;
4. the clipper (the same specs as ``gradguard.Guard``: ``gg.NormClip(1.0)``,
   ``gg.NormClip(1.0, per_tensor=True)``, ``gg.ValueClip(...)``, ``gg.AGC()``,
   ``gg.AutoClip()``, ``gg.ZClip()``, ``"auto"`` (the threshold-free default) or None) and the
   skip rule (``gg.SpikeSkip()``) compute their decision from the shared pure rules in
   ``gradguard.rules`` (TensorFlow namespace ``gradguard.rules.xp_tf``);
5. ``accept = finite and not refused``; ``ops.cond(accept, inner.apply(clipped), nothing)``:
   a skipped step does not call the inner optimizer at all, so the weights, every inner
   optimizer variable (momenta, Adam moments) and ``iterations`` stay bit-for-bit as they were,
   and a learning-rate schedule does not advance;
6. rule state is committed only for accepted steps; the step's statistics go into optimizer
   variables (a ring of ``flush_every`` rows) that ``gradguard.keras.Monitor`` (a callback)
   writes to the run store every ``flush_every`` steps: no host read per step.

Everything is graph ops (``tf.function``, ``jit_compile=True``). The wrapper's state (rule
state, counters, statistics) lives in Keras variables, so it saves and restores with the
optimizer (``model.save`` / ``keras.saving.load_model``, ``tf.train.Checkpoint``); the
wrapper is ``register_keras_serializable`` and serialises its clipper as a plain dict.

Composes with mixed precision as ``LossScaleOptimizer(GuardedOptimizer(inner))``: the loss
scale optimizer unscales, then this wrapper sees the true gradients.

Backends: TensorFlow only (tested, with ``MirroredStrategy`` over two logical CPUs). On Keras's
JAX or torch backend the constructor raises ``NotImplementedError`` naming the backend (tested
for JAX): every step here is TensorFlow graph ops. Units: norms and thresholds are L2 norms in
the gradients' units.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from . import tensorflow as ggtf
from .errors import close_at_exit
from .rules.xp_tf import TF

try:  # the decorator LossScaleOptimizer.build uses: variables made in build are tracked once
    from keras.src.utils.tracking import no_automatic_dependency_tracking as _no_tracking
except ImportError:  # pragma: no cover - other Keras layouts
    def _no_tracking(fn):
        return fn

__all__ = ["GuardedOptimizer", "Monitor", "clipper_config"]

_POLICIES = ("skip", "zero", "propagate")

#: columns of the statistics ring, one row per step (the run store's step columns)
STEP_FIELDS = ("loss", "lr", "total_norm", "total_norm_after", "clip_coef", "threshold",
               "clipped", "skipped", "nonfinite", "loss_scale")
#: per-layer statistics of a layer step
LAYER_FIELDS = ("grad_norm", "grad_max_abs", "nonfinite_count", "param_norm", "update_ratio")


# -- clipper specs ------------------------------------------------------------------------------
_RULE_OF = {"AutoClip": "autoclip", "ZClip": "zclip", "OvershootClip": "overshoot",
            "SpikeSkip": "spike_skip"}


def clipper_config(spec: Any, name: str = "clipper") -> dict[str, Any] | None:
    """The plain-dict form of a clipper or skip spec (what ``get_config`` stores).

    Accepts the gradguard objects (``gg.NormClip``, ``gg.ValueClip``, ``gg.AGC``,
    ``gg.AutoClip``, ``gg.ZClip``, ``gg.OvershootClip``, ``gg.SpikeSkip``; their
    configuration is read, nothing of torch is used), ``"auto"`` (``OvershootClip()``), None,
    or such a dict (``{"rule": "zclip", "warmup_steps": 10}``: the keyword arguments of
    ``gradguard.rules.<rule>.config``; for ``"norm"`` / ``"norm_per_tensor"``: ``max_norm``;
    ``"value"``: ``min_value``/``max_value``; ``"agc"``: ``clipping``, ``eps``;
    ``"overshoot"``: its arguments plus ``optimizer_scale``). Checked at once: errors name
    the argument.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec == "auto":
            return _checked({"rule": "overshoot"}, name)
        raise ValueError(f"{name} must be 'auto', None or a gradguard clipper, got {spec!r}")
    if isinstance(spec, dict):
        if "rule" not in spec:
            raise ValueError(f"{name} dict needs a 'rule' key, got {spec!r}")
        return _checked(dict(spec), name)
    kind = type(spec).__name__
    if kind in ("NormClip", "PerTensorNormClip"):
        if float(getattr(spec, "norm_type", 2.0)) != 2.0:
            raise ValueError(f"{name}: Keras clipping supports norm_type=2 only, got "
                             f"{spec.norm_type!r}")
        per = kind == "PerTensorNormClip" or getattr(spec, "per_tensor", False) is True
        rule = "norm_per_tensor" if per else "norm"
        return _checked({"rule": rule, "max_norm": float(spec.max_norm)}, name)
    if kind == "ValueClip":
        return _checked({"rule": "value", "min_value": spec.min_value, "max_value": spec.max_value}, name)
    if kind == "AGC":
        return _checked({"rule": "agc", "clipping": float(spec.clipping), "eps": float(spec.eps)}, name)
    if kind == "OvershootClip":
        cfg = {k: getattr(spec, k) for k in ("beta", "init_step", "floor", "spike_factor", "ema",
                                             "trust", "level_factor", "deadband")}
        return _checked({"rule": "overshoot", **cfg, "optimizer_scale": bool(spec.optimizer_scale)}, name)
    if kind in _RULE_OF and hasattr(spec, "cfg"):
        return _checked({"rule": _RULE_OF[kind], **spec.cfg._asdict()}, name)
    raise TypeError(f"{name} must be a gradguard clipper (NormClip, ValueClip, AGC, AutoClip, ZClip, "
                    f"OvershootClip), SpikeSkip, 'auto' or None; got {type(spec).__name__} {spec!r}")


def _checked(d: dict[str, Any], name: str) -> dict[str, Any]:
    """``d`` after building its rule configuration once (so a bad value fails here)."""
    _rule_cfg(d, name)
    return d


def _rule_cfg(d: dict[str, Any], name: str = "clipper", mode: str = "cap", beta2: float = 0.999) -> Any:
    """The ``gradguard.rules`` configuration of a spec dict."""
    from . import rules

    kw = {k: v for k, v in d.items() if k != "rule"}
    rule = d["rule"]
    if rule in ("norm", "norm_per_tensor"):
        return rules.norm_clip.config(**kw)
    if rule == "value":
        return rules.value_clip.config(**kw)
    if rule == "agc":
        return rules.agc.config(**kw)
    if rule == "overshoot":
        kw.pop("optimizer_scale", None)
        return rules.overshoot.config(mode, beta2=beta2, **kw)
    if rule in ("autoclip", "zclip", "spike_skip"):
        return getattr(rules, rule).config(**kw)
    raise ValueError(f"{name}: unknown rule {rule!r}")


# -- the wrapper ---------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="gradguard")
class GuardedOptimizer(keras.optimizers.Optimizer):
    """Wrap a Keras optimizer: clip after the cross-replica sum, skip bad steps, record stats.

    Args:
        inner: the Keras optimizer doing the update (its ``loss_scale_factor`` moves here; it
            must not use ``gradient_accumulation_steps``).
        clipper: ``"auto"`` (default, threshold-free), None (no clipping) or a gradguard
            clipper spec (see the module docstring).
        skip: None or ``gg.SpikeSkip(...)``: refuse steps whose norm spikes.
        monitor: None or a ``gradguard.keras.Monitor`` (also pass it to ``fit`` as a callback).
        on_nonfinite: ``"skip"`` (default: no update at all when any gradient element is NaN or
            Inf), ``"zero"`` (NaN/Inf elements set to 0, then clip and step) or
            ``"propagate"`` (Keras's behaviour; for comparisons).
    """

    def __init__(self, inner: keras.optimizers.Optimizer, clipper: Any = "auto", skip: Any = None,
                 monitor: Any = None, on_nonfinite: str = "skip", name: str | None = None, **kwargs: Any):
        _require_tf_backend()
        if not isinstance(inner, keras.optimizers.Optimizer):
            raise TypeError(f"inner must be a keras.optimizers.Optimizer, got {type(inner).__name__} {inner!r}")
        for k in ("clipnorm", "clipvalue", "global_clipnorm", "gradient_accumulation_steps", "use_ema"):
            if kwargs.get(k) not in (None, False):
                raise ValueError(f"GuardedOptimizer does not take {k}={kwargs[k]!r}; use clipper= "
                                 "(or set it on the inner optimizer)")
            kwargs.pop(k, None)
        for k in ("weight_decay", "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
                  "learning_rate"):
            kwargs.pop(k, None)  # base-class defaults that get_config/from_config round-trip
        if kwargs:
            raise TypeError(f"GuardedOptimizer got unexpected arguments {sorted(kwargs)}")
        if inner.gradient_accumulation_steps:
            raise ValueError("GuardedOptimizer: inner.gradient_accumulation_steps="
                             f"{inner.gradient_accumulation_steps!r} is not supported (the clip must "
                             "see the accumulated gradient); accumulate before calling apply")
        if on_nonfinite not in _POLICIES:
            raise ValueError(f"on_nonfinite must be one of {_POLICIES}, got {on_nonfinite!r}")
        super().__init__(learning_rate=0.0, name=name or "guarded_optimizer")
        self.inner_optimizer = inner
        self.clipper_config = clipper_config(clipper, "clipper")
        self.skip_config = clipper_config(skip, "skip")
        if self.skip_config is not None and self.skip_config["rule"] != "spike_skip":
            raise TypeError(f"skip must be gg.SpikeSkip(...) or None, got {skip!r}")
        self.on_nonfinite = on_nonfinite
        self.monitor = monitor
        if monitor is not None and not isinstance(monitor, Monitor):
            raise TypeError(f"monitor must be a gradguard.keras.Monitor or None, got {type(monitor).__name__}")
        # the loss is scaled by this wrapper (Keras calls the outer optimizer's scale_loss) and
        # unscaled here, before clipping: the inner optimizer must not unscale a second time
        self.loss_scale_factor = inner.loss_scale_factor
        inner.loss_scale_factor = None
        self._pending_loss: Any = None
        self._ring: _Ring | None = None
        self._clip = _make_clip(self.clipper_config)
        self._skip_rule = _make_skip(self.skip_config)

    # -- Keras plumbing -------------------------------------------------------------------------
    @property
    def iterations(self):
        """The inner optimizer's step counter: accepted steps only (a skip does not advance it)."""
        return self.inner_optimizer.iterations

    @property
    def steps_seen(self):
        """Every ``apply`` call, accepted or skipped (the wrapper's own counter)."""
        return self._iterations

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self.inner_optimizer.learning_rate = value

    @property
    def variables(self):
        return self._variables[:] + self.inner_optimizer.variables

    @_no_tracking
    def build(self, var_list):
        var_list = list(var_list)
        f32 = "float32"
        self.skipped_steps = self.add_variable((), initializer="zeros", dtype="int64", name="gg_skipped_steps")
        self.consecutive_skips = self.add_variable((), initializer="zeros", dtype="int64",
                                                   name="gg_consecutive_skips")
        self.last_total_norm = self.add_variable((), initializer="zeros", dtype=f32, name="gg_total_norm")
        self.last_clip_coef = self.add_variable((), initializer="ones", dtype=f32, name="gg_clip_coef")
        self._clip.build(self, var_list)
        if self._skip_rule is not None:
            self._skip_rule.build(self, var_list)
        self._layer_names, self._layer_index = _layers(var_list)
        self._var_list = var_list
        self._ring = None
        if self.monitor is not None:
            self._attach_monitor(self.monitor)
        self.inner_optimizer.build(var_list)
        # The wrapper sums the gradients across replicas itself (before clipping); the inner
        # optimizer must not sum them a second time.
        self.inner_optimizer._all_reduce_sum_gradients = _no_reduce
        super().build(var_list)

    def attach_monitor(self, monitor: Monitor) -> None:
        """Record into ``monitor`` from now on (e.g. for an optimizer restored by
        ``keras.saving.load_model``; call it before the next ``fit``, which retraces)."""
        if not isinstance(monitor, Monitor):
            raise TypeError(f"monitor must be a gradguard.keras.Monitor, got {type(monitor).__name__}")
        self.monitor = monitor
        if self.built:
            self._attach_monitor(monitor)

    def _attach_monitor(self, monitor: Monitor) -> None:
        # The statistics ring is transient: kept out of the optimizer's variables (so a model
        # saves and loads the same with or without a monitor) and out of checkpoints.
        self._ring = _Ring(monitor.ring_rows, monitor.layer_every, len(self._layer_names),
                           monitor.ring_rows + monitor.recorder_steps, self._var_list,
                           monitor.update_sample)
        monitor._attach(self, self._var_list, self._layer_names, self._layer_index)

    def scale_loss(self, loss):
        # Keras's train_step hands the loss over here; keep it for this step's statistics
        self._pending_loss = loss
        return super().scale_loss(loss)

    # -- the step -------------------------------------------------------------------------------
    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            if not self.built:
                raise ValueError("GuardedOptimizer.apply needs trainable_variables before it is built")
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            self.build(trainable_variables)
            self.built = True
        grads = list(grads)
        if len(grads) != len(trainable_variables):
            raise ValueError(f"apply: {len(grads)} gradients for {len(trainable_variables)} variables")
        if self.loss_scale_factor is not None:
            grads = [None if g is None else g / self.loss_scale_factor for g in grads]
        loss, self._pending_loss = self._pending_loss, None
        _require_tf_backend()
        ctx = tf.distribute.get_replica_context()
        if ctx is None:
            raise ValueError("GuardedOptimizer.apply must be called in a replica context")
        if tf.distribute.has_strategy():
            reduced = _all_reduce(ctx, grads, loss)
            ctx.merge_call(self._cross_replica_step, args=(reduced[0], trainable_variables, reduced[1]))
        else:
            self._single_step(grads, trainable_variables, loss)

    def _single_step(self, grads, tvs, loss):
        d = self._decide(grads, tvs, loss)
        ops.cond(d["accept"], lambda: self._inner_step(grads, tvs, d["apply"]), lambda: None)
        self._commit(d, tvs)

    def _cross_replica_step(self, distribution, grads, tvs, loss):
        local = [None if g is None else distribution.experimental_local_results(g)[0] for g in grads]
        loss0 = None if loss is None else distribution.experimental_local_results(loss)[0]
        d = self._decide(local, tvs, loss0)

        def apply_fn():
            distribution.extended.call_for_each_replica(self._inner_step, args=(grads, tvs, d["apply"]))

        # the cond is taken in the cross-replica context (the inner apply calls merge_call)
        ops.cond(d["accept"], apply_fn, lambda: None)
        self._commit(d, tvs)

    def _inner_step(self, grads, tvs, apply_args):
        grads = self._prepare(grads)
        clipped = self._clip.apply(grads, tvs, apply_args)
        self.inner_optimizer.apply(clipped, tvs)

    def _prepare(self, grads):
        if self.on_nonfinite == "zero":
            return [None if g is None else _map_values(g, _zero_nonfinite) for g in grads]
        return grads

    def _decide(self, grads, tvs, loss) -> dict[str, Any]:
        """Norms, clip decision, skip decision and proposed rule state, from global gradients."""
        raw_per, raw_total = ggtf.norms(grads)
        nonfinite = ~tf.math.is_finite(raw_total)
        grads = self._prepare(grads)
        if self.on_nonfinite == "zero":
            per, total = ggtf.norms(grads)
        else:
            per, total = raw_per, raw_total
        params = [_read(v) for v in tvs]
        # the update ratio's parameter sample, copied before the update on layer steps only
        sample = self._sample(tvs) if self._ring is not None else None
        # "zero": the clip sees the cleaned gradients (finite, unless a norm overflows)
        c = self._clip.decide(grads, params, per, total, self, ~tf.math.is_finite(total))
        refuse = tf.zeros((), tf.bool)
        skip_state = None
        if self._skip_rule is not None:
            refuse, skip_state = self._skip_rule.decide(total, loss, self)
        if self.on_nonfinite == "skip":
            accept = ~nonfinite & ~refuse
        else:
            accept = ~refuse
        # the learning rate this update uses: read before the inner apply advances its schedule
        lr = tf.cast(self.inner_optimizer._get_current_learning_rate(), tf.float32) \
            if hasattr(self.inner_optimizer, "_get_current_learning_rate") else tf.constant(math.nan, tf.float32)
        return {"accept": accept, "refuse": refuse, "nonfinite": nonfinite, "total": raw_total,
                "per": raw_per, "clip": c, "apply": c["apply"], "skip_state": skip_state,
                "loss": loss, "grads": grads, "params": params, "lr": lr, "sample": sample}

    def _commit(self, d, tvs):
        accept = d["accept"]
        self._clip.commit(accept, d["clip"], self)
        if self._skip_rule is not None:
            self._skip_rule.commit(accept, d["skip_state"], self)
        skipped = tf.cast(~accept, tf.int64)
        self.skipped_steps.assign(self.skipped_steps + skipped)
        self.consecutive_skips.assign((self.consecutive_skips + skipped) * skipped)
        self.last_total_norm.assign(tf.cast(d["total"], tf.float32))
        coef = d["clip"]["coef"]
        self.last_clip_coef.assign(coef)
        if self._ring is not None:
            self._record(d)
        self._iterations.assign_add(1)

    def _record(self, d):
        """Write this step's row into the statistics ring (slot = step mod flush_every)."""
        step = tf.cast(self._iterations, tf.int64)  # 0-based index of this apply call
        c = d["clip"]
        f32 = tf.float32
        loss = tf.constant(math.nan, f32) if d["loss"] is None else tf.cast(tf.reshape(d["loss"], []), f32)
        lr = d["lr"]
        total = tf.cast(d["total"], f32)
        nan = tf.constant(math.nan, f32)
        row = tf.stack([loss, tf.reshape(lr, []), total, total * c["coef"], c["coef"],
                        nan if c.get("threshold") is None else tf.cast(c["threshold"], f32),
                        tf.cast(c["clipped"], f32), tf.cast(~d["accept"], f32),
                        tf.cast(d["nonfinite"], f32), nan,
                        tf.constant(0.0 if d["loss"] is None else 1.0, f32)])  # has_loss
        rows = self._ring.steps
        slot = tf.math.floormod(step, rows.shape[0])
        rows.assign(tf.tensor_scatter_nd_update(rows.value if hasattr(rows, "value") else rows,
                                                tf.reshape(slot, [1, 1]), row[None]))
        if self._layer_names:  # the flight recorder: every step's per-layer gradient norms
            rec = self._ring.recorder
            rslot = tf.math.floormod(step, rec.shape[0])
            lay_norms = _layer_norms(d["per"], self._layer_index, len(self._layer_names))
            rec.assign(tf.tensor_scatter_nd_update(rec.value, tf.reshape(rslot, [1, 1]), lay_norms[None]))
        every = self.monitor.layer_every

        def layer_row():
            after = self._sample_now(self._var_list)
            lay = _layer_stats(d["per"], d["grads"], d["params"], self._layer_index, len(self._layer_names),
                               d["sample"], after)
            lrows = self._ring.layers
            lslot = tf.math.floormod((step + 1) // every, lrows.shape[0])
            lrows.assign(tf.tensor_scatter_nd_update(lrows.value, tf.reshape(lslot, [1, 1]), lay[None]))

        ops.cond(tf.equal(tf.math.floormod(step + 1, every), 0), layer_row, lambda: None)

    def _layer_step(self):
        return tf.equal(tf.math.floormod(tf.cast(self._iterations, tf.int64) + 1, self.monitor.layer_every), 0)

    def _sample_now(self, tvs):
        """The update-ratio sample of every float variable now (``_Ring.sample_index``)."""
        return [None if ix is None else _take(v, ix) for v, ix in zip(tvs, self._ring.sample_index)]

    def _sample(self, tvs):
        """The sample before this step's update: a copy on layer steps, zeros otherwise (one
        branch for all variables)."""
        pairs = [(v, ix) for v, ix in zip(tvs, self._ring.sample_index) if ix is not None]
        if not pairs:
            return [None] * len(tvs)
        taken = tf.cond(self._layer_step(), lambda: [_take(v, ix) for v, ix in pairs],
                        lambda: [tf.zeros([len(ix)], _acc_dtype(v.dtype)) for v, ix in pairs])
        it = iter(taken)
        return [None if ix is None else next(it) for ix in self._ring.sample_index]

    # -- serialisation --------------------------------------------------------------------------
    def get_config(self):
        return {"name": self.name,
                "inner": keras.saving.serialize_keras_object(self.inner_optimizer),
                "clipper": self.clipper_config, "skip": self.skip_config,
                "on_nonfinite": self.on_nonfinite}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner"), custom_objects=custom_objects)
        return cls(inner, **config)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)


def _require_tf_backend() -> None:
    backend = keras.backend.backend()
    if backend != "tensorflow":
        alt = {"jax": "gradguard.optax (ggo.auto(), ggo.skip_nonfinite(...))",
               "torch": "gradguard's torch API (gg.Guard) in a PyTorch training loop"}.get(backend, "the TensorFlow backend")
        raise NotImplementedError(
            f"GuardedOptimizer needs Keras's TensorFlow backend; keras.backend.backend() is "
            f"{backend!r} (KERAS_BACKEND={backend}). Set KERAS_BACKEND=tensorflow, or use {alt}")


class _Ring:
    """The statistics ring of a monitored optimizer (a plain holder: not tracked, not saved):
    the step rows (STEP_FIELDS and ``has_loss``), the layer rows (every ``layer_every`` steps)
    and the flight recorder (every step's per-layer gradient norms, ``rec_rows`` steps)."""

    def __init__(self, rows: int, layer_every: int, n_layers: int, rec_rows: int,
                 var_list: list[Any] = (), update_sample: int | None = 4096):
        lrows = -(-rows // layer_every) + 1
        self.sample_index = [_sample_index(v, update_sample) for v in var_list]
        self.steps = keras.Variable(tf.zeros([rows, len(STEP_FIELDS) + 1]), trainable=False,
                                    name="gg_step_rows")
        self.recorder = keras.Variable(tf.zeros([rec_rows, max(n_layers, 1)]), trainable=False,
                                       name="gg_recorder_rows")
        self.layers = keras.Variable(tf.zeros([lrows, n_layers, len(LAYER_FIELDS)]),
                                     trainable=False, name="gg_layer_rows")


def _no_reduce(grads_and_vars):
    return list(grads_and_vars)


def _all_reduce(ctx, grads, loss):
    """Sum the gradients (and the loss, for the statistics) across replicas, None kept."""
    present = [g for g in grads if g is not None]
    extra = [] if loss is None else [tf.reshape(tf.cast(loss, tf.float32), [])]
    reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, present + extra) if present or extra else []
    it = iter(reduced[:len(present)])
    out = [None if g is None else next(it) for g in grads]
    return out, (reduced[len(present)] if extra else None)


def _read(v):
    return v.value if isinstance(v, keras.Variable) else v


def _map_values(g, fn):
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(fn(g.values), g.indices, g.dense_shape)
    return fn(g)


def _zero_nonfinite(x):
    return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))


def _layers(var_list) -> tuple[list[str], list[int]]:
    """Layer names from Keras variable paths (``dense_1/kernel`` -> ``dense_1``)."""
    names, index, pos = [], [], {}
    for v in var_list:
        path = getattr(v, "path", None) or getattr(v, "name", "var")
        lay = path.rsplit("/", 1)[0] if "/" in path else path
        if lay not in pos:
            pos[lay] = len(names)
            names.append(lay)
        index.append(pos[lay])
    return names, index


def _var_paths(var_list) -> list[str]:
    return [getattr(v, "path", None) or getattr(v, "name", f"var{i}") for i, v in enumerate(var_list)]


def _acc_dtype(dtype) -> tf.DType:
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


def _sample_index(v, sample: int | None):
    """The fixed update-ratio sample of a variable, as flat indices (the torch Monitor's
    ``monitor.update_sample``: a tensor of at most ``sample`` elements whole, a larger one
    runs of 16 consecutive elements, every k-th run, ``k = ceil((n // 16) / (sample // 16))``;
    ``sample=None``: every element). None for a non-float variable."""
    import numpy as np

    if not tf.as_dtype(v.dtype).is_floating:
        return None
    n = int(np.prod(v.shape))
    if sample is None or n <= sample:
        return np.arange(n, dtype=np.int64)
    run = 16
    k = -(-(n // run) // max(sample // run, 1))
    starts = np.arange(0, n // run, k, dtype=np.int64) * run
    return (starts[:, None] + np.arange(run, dtype=np.int64)[None]).reshape(-1)


def _take(v, ix):
    """``v``'s sample elements, read now, in float32 (float64 for float64)."""
    x = tf.reshape(tf.convert_to_tensor(_read(v)), [-1])
    return tf.cast(tf.gather(x, ix), _acc_dtype(x.dtype))


def _layer_norms(per, index, n_layers):
    """[n_layers] float32: each layer's gradient norm, the L2 norm of its variables' norms
    (squares summed in float64: no overflow below 1e154; NaN and Inf propagate)."""
    present = [(tf.square(tf.cast(n, tf.float64)), j) for n, j in zip(per, index) if n is not None]
    if not present:
        return tf.zeros([n_layers], tf.float32)
    sq = tf.stack([q for q, _ in present])
    seg = tf.constant([j for _, j in present], tf.int32)
    return tf.cast(tf.sqrt(tf.math.unsorted_segment_sum(sq, seg, n_layers)), tf.float32)


def _layer_stats(per, grads, params, index, n_layers, before=None, after=None):
    """[n_layers, 5]: grad_norm, grad_max_abs, nonfinite_count, param_norm (after the step),
    update_ratio per layer (a layer's norm is the L2 norm of all its variables' gradients
    together; ``update_ratio = ||w(t) - w(t-1)|| / ||w(t-1)||`` over the samples ``before`` /
    ``after``, NaN without them or where ``||w(t-1)|| = 0``)."""
    f32 = tf.float32
    members: list[list[int]] = [[] for _ in range(n_layers)]
    for i, j in enumerate(index):
        members[j].append(i)
    rows = []
    for j in range(n_layers):
        sq, mx, bad, psq, dsq, bsq = [], [], [], [], [], []
        for i in members[j]:
            p = tf.convert_to_tensor(params[i])
            if p.dtype.is_floating:
                psq.append(tf.square(tf.cast(ggtf.global_norm([p]), f32)))
            if before is not None and before[i] is not None:
                dsq.append(tf.cast(tf.reduce_sum(tf.square(after[i] - before[i])), tf.float64))
                bsq.append(tf.cast(tf.reduce_sum(tf.square(before[i])), tf.float64))
            if per[i] is None:
                continue
            x = tf.reshape(tf.cast(_vals(grads[i]), f32), [-1])
            sq.append(tf.square(tf.cast(per[i], f32)))
            mx.append(TF.amax(tf.concat([tf.abs(x), tf.zeros([1], f32)], 0)))  # NaN stays NaN
            bad.append(tf.reduce_sum(tf.cast(~tf.math.is_finite(x), f32)))
        z = tf.zeros((), f32)
        ratio = tf.constant(math.nan, f32)
        if bsq:
            b2 = tf.add_n(bsq)
            ratio = tf.cast(tf.where(b2 > 0, tf.sqrt(tf.add_n(dsq) / tf.where(b2 > 0, b2, 1.0)),
                                     tf.constant(math.nan, tf.float64)), f32)
        rows.append(tf.stack([tf.sqrt(tf.add_n(sq)) if sq else z,
                              tf.reduce_max(tf.stack(mx)) if mx else z,
                              tf.add_n(bad) if bad else z,
                              tf.sqrt(tf.add_n(psq)) if psq else z, ratio]))
    return tf.stack(rows) if rows else tf.zeros([0, len(LAYER_FIELDS)], f32)


# -- clip and skip rules as Keras state ------------------------------------------------------------
class _Clip:
    """One clipper spec over the shared rules: ``build`` makes its state variables,
    ``decide`` computes the step's decision from the global gradients (pure: the proposed
    state is returned, not assigned), ``apply`` clips one replica's gradients with it and
    ``commit`` keeps the proposed state only for accepted steps (``rules.commit``)."""

    def __init__(self, cfg: dict[str, Any] | None):
        self.spec = cfg

    def build(self, opt, var_list) -> None:
        pass

    def decide(self, grads, params, per, total, opt, nonfinite) -> dict[str, Any]:
        return {"coef": tf.ones((), tf.float32), "clipped": tf.zeros((), tf.bool),
                "threshold": None, "apply": []}

    def apply(self, grads, tvs, apply_args):
        return grads

    def commit(self, accept, decision, opt) -> None:
        pass


def _after_ratio(after, before):
    """``||g after|| / ||g before||`` (1 where the norm before is 0)."""
    after = tf.cast(after, tf.float32)
    before = tf.cast(before, tf.float32)
    ok = before > 0
    return tf.where(ok, after / tf.where(ok, before, tf.ones_like(before)), tf.ones_like(before))


def _vals(g):
    return g.values if isinstance(g, tf.IndexedSlices) else g


def _scale_each(grads, coefs):
    """Scale each present gradient by its own coefficient (None entries have none)."""
    it = iter(coefs)
    out = []
    for g in grads:
        if g is None:
            out.append(None)
            continue
        k = next(it)
        out.append(_map_values(g, lambda x, k=k: ggtf._scale(x, k)))
    return out


class _ValueClip(_Clip):
    """``rules.value_clip``: every element into ``[min_value, max_value]``."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.cfg = _rule_cfg(cfg)

    def _clamp(self, grads):
        from .rules import value_clip
        return [None if g is None else _map_values(g, lambda x: value_clip.clip(self.cfg, x, TF))
                for g in grads]

    def decide(self, grads, params, per, total, opt, nonfinite):
        clamped = self._clamp(grads)
        _, after = ggtf.norms(clamped)
        changed = [tf.reduce_any(tf.not_equal(_vals(a), _vals(g))) for a, g in zip(clamped, grads)
                   if g is not None]
        clipped = tf.reduce_any(tf.stack(changed)) if changed else tf.zeros((), tf.bool)
        return {"coef": _after_ratio(after, total), "clipped": clipped, "threshold": None, "apply": []}

    def apply(self, grads, tvs, apply_args):
        return self._clamp(grads)


class _ScalarClip(_Clip):
    """A global-norm clip: ``rules.norm_clip.coefficient(total, threshold)``; the threshold is
    fixed (``gg.NormClip``) or comes from a stateful rule (subclasses)."""

    strict = False  # torch's formula bit for bit for the fixed NormClip, as gg.NormClip

    def __init__(self, cfg):
        super().__init__(cfg)
        self.cfg = _rule_cfg(cfg)

    def threshold(self, total, grads, params, opt):
        """(threshold, proposed state or None)."""
        from .rules import norm_clip
        return norm_clip.threshold(self.cfg, TF, total), None

    def decide(self, grads, params, per, total, opt, nonfinite):
        from .rules import norm_clip
        total = tf.cast(total, tf.float32)
        thr, state = self.threshold(total, grads, params, opt)
        coef = norm_clip.coefficient(total, thr, TF, nonfinite=nonfinite,
                                     propagate=opt.on_nonfinite == "propagate", strict=self.strict)
        return {"coef": coef, "clipped": coef < 1.0, "threshold": thr, "apply": [coef], "state": state}

    def apply(self, grads, tvs, apply_args):
        return _scale_each(grads, [apply_args[0]] * sum(g is not None for g in grads))


class _PerTensorClip(_Clip):
    """``rules.norm_clip.per_tensor_coefficients``: each variable to its own norm
    (``gg.NormClip(max_norm, per_tensor=True)``, Keras ``clipnorm``)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.cfg = _rule_cfg(cfg)

    def decide(self, grads, params, per, total, opt, nonfinite):
        from .rules import norm_clip
        present = [tf.cast(n, tf.float32) for n in per if n is not None]
        if not present:
            return super().decide(grads, params, per, total, opt, nonfinite)
        norms = tf.stack(present)
        coefs = norm_clip.per_tensor_coefficients(norms, self.cfg.max_norm, TF, nonfinite=nonfinite,
                                                  propagate=opt.on_nonfinite == "propagate")
        after = tf.sqrt(tf.reduce_sum(tf.square(norms * coefs)))
        return {"coef": _after_ratio(after, total), "clipped": tf.reduce_any(coefs < 1.0),
                "threshold": tf.constant(self.cfg.max_norm, tf.float32),
                "apply": tf.unstack(coefs, num=len(present))}

    def apply(self, grads, tvs, apply_args):
        return _scale_each(grads, apply_args)


class _AGC(_Clip):
    """``rules.agc`` (Brock et al. 2021): each unit's gradient to ``clipping * max(||W_unit||,
    eps)``. Keras kernels are (..., in, out): a unit is a slice of the last axis (the norm is
    taken over all other axes); 0-d and 1-d variables are one unit each."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.cfg = _rule_cfg(cfg)

    def _coefs(self, grads, params, opt, nonfinite):
        present = [(g, p) for g, p in zip(grads, params) if g is not None]
        return ggtf.agc_units(self.cfg, [g for g, _ in present], [p for _, p in present],
                              nonfinite=nonfinite, propagate=opt.on_nonfinite == "propagate")

    def decide(self, grads, params, per, total, opt, nonfinite):
        units = self._coefs(grads, params, opt, nonfinite)
        if not units:
            return super().decide(grads, params, per, total, opt, nonfinite)
        # the clipped tensors' norms are max-normalised; their total too (squares of 1e20)
        after = ggtf.global_norm([a for _, a in units])
        clipped = tf.reduce_any(tf.stack([tf.reduce_any(k < 1.0) for k, _ in units]))
        return {"coef": _after_ratio(after, total), "clipped": clipped, "threshold": None,
                "apply": [k for k, _ in units]}

    def apply(self, grads, tvs, apply_args):
        return _scale_each(grads, apply_args)


class _StateVars:
    """A rule's State NamedTuple kept in Keras optimizer variables (saved with the optimizer)."""

    def __init__(self, opt, prefix: str, make_state: Any):
        with tf.init_scope():  # build may run inside the first traced step: make values eagerly
            state0 = make_state()
            inits = [v.numpy() for v in state0]
        self.type = type(state0)
        self.vars = []
        for field, value, init in zip(state0._fields, state0, inits):
            self.vars.append(opt.add_variable(tuple(value.shape), dtype=value.dtype.name,
                                              initializer=lambda shape, dtype, v=init: v,
                                              name=f"gg_{prefix}_{field}"))

    def read(self):
        return self.type(*[tf.convert_to_tensor(_read(v)) for v in self.vars])

    def assign(self, state) -> None:
        for v, x in zip(self.vars, state):
            v.assign(tf.cast(x, v.dtype))


class _RuleClip(_ScalarClip):
    """An adaptive global-norm clip (``rules.autoclip``, ``rules.zclip``, ``rules.overshoot``):
    the threshold comes from the rule's ``update`` on its state variables; the coefficient
    is ``norm_clip.coefficient(..., strict=True)`` as in the torch facades."""

    strict = True

    def __init__(self, cfg):
        _Clip.__init__(self, cfg)
        from . import rules
        self.mod = getattr(rules, cfg["rule"])
        self.cfg = _rule_cfg(cfg)
        self.mode = getattr(self.cfg, "mode", None)

    def build(self, opt, var_list) -> None:
        if self.spec["rule"] == "overshoot":
            self.cfg = _overshoot_cfg(self.spec, opt.inner_optimizer)
            self.mode = self.cfg.mode
        self.state = _StateVars(opt, self.spec["rule"], lambda: self.mod.init(self.cfg, TF, None))

    def threshold(self, total, grads, params, opt):
        st = self.state.read()
        if self.spec["rule"] != "overshoot":
            return self.mod.update(self.cfg, st, total, TF)
        cos = lr = None
        if self.mode == "momentum":
            st = st._replace(init_limit=tf.where((st.count == 0) & ~st.started,
                                                 _initial_limit(self.cfg, params, opt), st.init_limit))
            cos = _momentum_cosine(grads, opt.inner_optimizer)
        elif self.mode == "trust":
            # ||theta_0|| once, at the first step (a branch: no parameter pass afterwards)
            st = st._replace(param_norm=tf.cond(st.param_norm > 0, lambda: st.param_norm,
                                                lambda: _param_norm(params)))
            lr = tf.cast(opt.inner_optimizer._get_current_learning_rate(), tf.float32)
        return self.mod.update(self.cfg, st, self.mod.Observation(total, cos, lr), TF)

    def commit(self, accept, decision, opt) -> None:
        from . import rules
        self.state.assign(rules.commit(accept, decision["state"], self.state.read(), TF))


def _overshoot_cfg(spec: dict[str, Any], inner) -> Any:
    """The default's mode from the inner optimizer, as the torch facade picks it: step-size
    control with SGD + momentum, the trust region with plain SGD, the level cap with an
    Adam-like optimizer (``beta_2``, RMSprop, Adagrad; the optimizer-scale cap with
    ``optimizer_scale``), else the geometric spike cap."""
    if isinstance(inner, keras.optimizers.SGD):
        return _rule_cfg(spec, mode="momentum" if float(inner.momentum) > 0 else "trust")
    if hasattr(inner, "beta_2") or isinstance(inner, (keras.optimizers.RMSprop,
                                                      keras.optimizers.Adagrad)):
        if spec.get("optimizer_scale") and hasattr(inner, "beta_2"):
            return _rule_cfg(spec, mode="adaptive", beta2=float(inner.beta_2))
        return _rule_cfg(spec, mode="level")
    return _rule_cfg(spec, mode="cap")


def _param_norm(params):
    floats = [tf.convert_to_tensor(p) for p in params if p.dtype.is_floating]
    return tf.cast(ggtf.global_norm(floats), tf.float32)


def _initial_limit(cfg, params, opt):
    from .rules import overshoot
    pnorm = _param_norm(params)
    lr = tf.cast(opt.inner_optimizer._get_current_learning_rate(), tf.float32)
    return overshoot.initial_limit(cfg, pnorm, lr, TF)


def _momentum_cosine(grads, inner):
    """``cos(g_t, u_{t-1})``, ``u`` the direction of the last update: Keras SGD keeps
    ``m <- momentum * m - lr * g`` and adds ``m``, so torch's buffer (``u``) is ``-m / lr``:
    the cosine with ``-m``. Over every variable (one extra read of g and m)."""
    from .rules import overshoot
    dot, gsq, msq = [], [], []
    for g, m in zip(grads, inner.momentums):
        if g is None:
            continue
        x = tf.cast(tf.convert_to_tensor(g), tf.float32)  # IndexedSlices densified here
        u = -tf.cast(tf.convert_to_tensor(_read(m)), tf.float32)
        dot.append(tf.reduce_sum(x * u))
        gsq.append(tf.reduce_sum(x * x))
        msq.append(tf.reduce_sum(u * u))
    if not dot:
        return tf.zeros((), tf.float32)
    return overshoot.cosine(tf.add_n(dot), tf.sqrt(tf.add_n(gsq)), tf.sqrt(tf.add_n(msq)), TF)


class _SpikeSkip:
    """``rules.spike_skip`` on Keras variables: refuse a step whose norm (or loss, when Keras
    hands it over through ``scale_loss``) spikes."""

    def __init__(self, cfg):
        from .rules import spike_skip
        self.spec = cfg
        self.mod = spike_skip
        self.cfg = _rule_cfg(cfg)

    def build(self, opt, var_list) -> None:
        self.state = _StateVars(opt, "skip", lambda: self.mod.init(self.cfg, TF, None))

    def decide(self, total, loss, opt):
        loss = None if loss is None or not self.cfg.watch_loss else \
            tf.cast(tf.reshape(loss, []), tf.float32)
        skip, prop = self.mod.update(self.cfg, self.state.read(),
                                     self.mod.Observation(tf.cast(total, tf.float32), loss), TF)
        return skip, prop

    def commit(self, accept, proposed, opt) -> None:
        from . import rules
        self.state.assign(rules.commit(accept, proposed, self.state.read(), TF))


def _make_clip(cfg: dict[str, Any] | None) -> _Clip:
    if cfg is None:
        return _Clip(None)
    table = {"value": _ValueClip, "norm": _ScalarClip, "norm_per_tensor": _PerTensorClip,
             "agc": _AGC, "autoclip": _RuleClip, "zclip": _RuleClip, "overshoot": _RuleClip}
    if cfg["rule"] not in table:
        raise ValueError(f"clipper: {cfg['rule']!r} is not a clipper rule")
    return table[cfg["rule"]](cfg)


def _make_skip(cfg: dict[str, Any] | None):
    return None if cfg is None else _SpikeSkip(cfg)


# -- monitoring -----------------------------------------------------------------------------------
class Monitor(keras.callbacks.Callback):
    """The gradguard run store for a Keras run: pass it to ``GuardedOptimizer(monitor=...)``
    **and** to ``fit(callbacks=[...])``.

    The optimizer writes each step's statistics (STEP_FIELDS: loss, lr, norm before and after
    clipping, clip coefficient, threshold, clipped / skipped / non-finite flags) into a ring of
    ``2 * flush_every`` rows held in optimizer variables, and every ``layer_every`` steps the
    per-layer gradient norm, max |g|, non-finite count and parameter norm (layers from the
    Keras variable paths: ``dense_1/kernel`` belongs to layer ``dense_1``). This callback copies
    the ring to the host every ``flush_every`` batches (one read of two variables, never per
    step) and appends the rows to the run folder through ``gradguard.store.RunWriter``, so
    ``gradguard report`` and ``gg.load_run`` read a Keras run as they read a torch one. In a
    custom loop call ``monitor.after_step()`` once per step (it reads nothing except at a
    flush) and ``monitor.close()`` at the end, or use ``with Monitor(...) as monitor:``; an
    unclosed Monitor is closed at interpreter exit, so an exception leaving ``fit`` loses no
    recorded step.

    ``time`` is the wall time of the flush that wrote the row; ``update_ratio`` is
    ``||w(t) - w(t-1)|| / ||w(t-1)||`` per layer on layer steps, over the torch Monitor's fixed
    sample of ``update_sample`` elements per variable (copied before the update on layer steps
    only; None: every element, exact); ``loss`` is the loss Keras hands to
    ``optimizer.scale_loss`` (NaN in a custom loop that does not call it). Monitoring never raises into training: a failing store warns once
    and is noted in ``meta.json``. ``mode`` is the store's folder policy (``"new"``,
    ``"resume"``, ``"overwrite"``).

    Detectors and events, as ``gg.Monitor``'s: every step's per-layer gradient norms also go
    into a flight recorder on the device (``recorder_steps`` steps before the last flush's);
    at each flush the torch Monitor's detectors (``detectors``: default
    ``gradguard.monitor.detectors.default_detectors()``, NonFinite, Spike, LossSpike, Growth,
    Vanishing, action ``"warn"``) run on the host copies of the flushed rows, in step order,
    and each firing becomes an event in ``events.jsonl`` with its top layers, first non-finite
    layer and flight-recorder window, so the report shows a Keras run's incidents as it shows a
    torch run's. Actions: ``"warn"`` (rate-limited, ``warn_interval`` seconds per rule),
    ``"callback"``, ``"raise"`` (``AnomalyError`` out of the flush, i.e. out of ``fit``);
    ``"skip"`` is refused (use ``GuardedOptimizer(skip=gg.SpikeSkip())``, decided in the step).
    ``detectors=[]`` runs none (and does not import torch). Detector state starts afresh in
    each Monitor (a resumed run's detectors re-learn their baselines).
    """

    def __init__(self, run_dir, *, flush_every: int = 100, layer_every: int = 10,
                 recorder_steps: int = 32, detectors: Any = None, top_k: int = 5,
                 warn_interval: float = 60.0, update_sample: int | None = 4096,
                 name: str | None = None, config: dict[str, Any] | None = None, mode: str = "new"):
        super().__init__()
        for arg, v in (("flush_every", flush_every), ("layer_every", layer_every),
                       ("recorder_steps", recorder_steps), ("top_k", top_k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        if update_sample is not None and (isinstance(update_sample, bool) or not isinstance(update_sample, int)
                                          or update_sample < 16):
            raise ValueError(f"update_sample must be None or an int >= 16, got {update_sample!r}")
        self.recorder_steps = recorder_steps
        self.top_k = top_k
        self.update_sample = update_sample
        self._runner, self._notices = _detector_runner(detectors, warn_interval)
        from pathlib import Path

        self.run_dir = Path(run_dir)
        self.flush_every = flush_every
        self.layer_every = layer_every
        self.name = name or self.run_dir.name
        self.user_config = dict(config or {})
        self.mode = mode
        self.notes: list[str] = []
        self.ring_rows = 2 * flush_every
        self._opt: GuardedOptimizer | None = None
        self._writer = None
        self._written = 0        # steps already in the store
        self._since = 0          # batches since the last flush (host counter, no read)
        self._failed = False
        self._closed = False
        self._started = _now()
        import weakref

        # an unclosed Monitor (fit left by an exception, a script that never calls close) is
        # flushed and closed at interpreter exit; holds only a weak reference to the Monitor
        self._finalizer = weakref.finalize(self, close_at_exit, weakref.ref(self))

    # -- wiring ---------------------------------------------------------------------------------
    def _attach(self, opt, var_list, names, index) -> None:
        self._opt = opt
        self._paths = _var_paths(var_list)
        self._layers = names
        self._index = index
        with tf.init_scope():  # attach may run inside the first traced step: read eagerly
            self._written = int(opt.steps_seen.numpy())
        self._rec_first = self._written + 1  # the first step in this process's flight recorder
        self._safe(self._open)

    def _open(self) -> None:
        if self._writer is None:
            self._writer = _store().RunWriter(self.run_dir, 0, mode=self.mode)
            if self._written and self.mode == "resume":
                self._writer.resume_from(self._written)
        self._writer.write_meta(self._meta())

    def _meta(self) -> dict[str, Any]:
        import platform

        from . import __version__
        opt = self._opt
        return {
            "name": self.name, "layers": list(getattr(self, "_layers", [])),
            "parameters": [[p, self._layers[i]] for p, i in zip(getattr(self, "_paths", []),
                                                                 getattr(self, "_index", []))],
            "config": {"framework": "keras", "layer_every": self.layer_every,
                       "flush_every": self.flush_every,
                       "clipper": None if opt is None else opt.clipper_config,
                       "skip": None if opt is None else opt.skip_config,
                       "on_nonfinite": None if opt is None else opt.on_nonfinite,
                       "inner": None if opt is None else type(opt.inner_optimizer).__name__,
                       "recorder_steps": self.recorder_steps, "top_k": self.top_k,
                       "detectors": [] if self._runner is None else
                       [repr(d) for d in self._runner.detectors],
                       **self.user_config},
            "versions": {"gradguard": __version__, "tensorflow": tf.__version__,
                         "keras": keras.__version__, "python": platform.python_version()},
            "started": self._started, "notes": list(self.notes), "ranks": [0],
            "finished": _now() if self._closed else None,
        }

    def _safe(self, fn, *args) -> None:
        """Run a store operation; never raise into training (warn once, note it)."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - principle 4: monitoring never takes training down
            if not self._failed:
                import warnings

                self._failed = True
                msg = f"gradguard keras monitor: {type(exc).__name__}: {exc}; training continues"
                self.notes.append(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)

    # -- callback hooks -------------------------------------------------------------------------
    def on_train_batch_end(self, batch, logs=None):
        self.after_step(getattr(self.model, "steps_per_execution", 1) or 1 if self.model else 1)

    def on_train_end(self, logs=None):
        self.flush()

    def after_step(self, n: int = 1) -> None:
        """Count ``n`` finished steps; flush every ``flush_every`` of them (no read otherwise)."""
        self._since += int(n)
        if self._since >= self.flush_every:
            self.flush()

    # -- flushing -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Copy the steps recorded since the last flush to the run store (one host read)."""
        self._since = 0
        if self._opt is not None and self._opt.built and not self._closed:
            self._safe(self._flush)
        if self._notices is not None:
            self._notices.deliver(allow_raise=not self._closed)  # warnings; "raise" into fit

    def _flush(self) -> None:
        import time

        import numpy as np
        import pyarrow as pa

        st = _store()
        opt = self._opt
        seen = int(opt.steps_seen.numpy())
        if seen <= self._written:
            return
        rows = opt._ring.steps.numpy()
        lrows = opt._ring.layers.numpy()
        R, LR = rows.shape[0], lrows.shape[0]
        first = max(self._written + 1, seen - R + 1)
        if first > self._written + 1:
            self.notes.append(f"steps {self._written + 1}..{first - 1} were overwritten in the ring "
                              f"before a flush (flush more often than every {R} steps)")
        steps = np.arange(first, seen + 1, dtype=np.int64)
        vals = rows[(steps - 1) % R]
        now = time.time()
        cols: dict[str, Any] = {"step": steps, "time": np.full(len(steps), now)}
        for j, name in enumerate(STEP_FIELDS):
            v = vals[:, j].astype(np.float64)
            cols[name] = v > 0.5 if name in ("clipped", "skipped", "nonfinite") else v
        # lr: the inner optimizer's current learning rate (a schedule evaluated in the step, on
        # the device, into the ring); lrs null: a Keras optimizer has one learning rate
        cols["lrs"] = pa.nulls(len(steps), st.STEPS_SCHEMA.field("lrs").type)
        cols["rank"] = np.zeros(len(steps), np.int32)
        events = [] if self._runner is None else self._detect(steps, rows, seen, cols["time"])
        self._writer.write_shard("steps", pa.table(cols, schema=st.STEPS_SCHEMA))
        every = self.layer_every
        lsteps = steps[steps % every == 0]
        lsteps = lsteps[lsteps > seen - (LR - 1) * every]  # still in the layer ring
        L = len(self._layers)
        if len(lsteps) and L:
            lay = lrows[(lsteps // every) % LR]  # [n, L, 4]
            n = len(lsteps)
            lcols = {"step": np.repeat(lsteps, L),
                     "layer": st.layer_column(self._layers, n),
                     "grad_norm": lay[:, :, 0].reshape(-1).astype(np.float32),
                     "grad_max_abs": lay[:, :, 1].reshape(-1).astype(np.float32),
                     "nonfinite_count": lay[:, :, 2].reshape(-1).astype(np.int64),
                     "param_norm": lay[:, :, 3].reshape(-1).astype(np.float32),
                     "update_ratio": lay[:, :, 4].reshape(-1).astype(np.float32),
                     "rank": np.zeros(n * L, np.int32)}
            self._writer.write_shard("layers", pa.table(lcols, schema=st.LAYERS_SCHEMA))
        self._writer.next_seq()
        self._writer.append_events(events)
        self._written = seen
        self._writer.write_meta(self._meta())

    def _detect(self, steps, rows, seen, times) -> list[dict[str, Any]]:
        """The detectors over this flush's rows (host copies, step order) and their events,
        explained by the flight recorder; windows written to the run folder."""
        import numpy as np
        import pyarrow as pa

        from .monitor.events import build_events, window_columns

        runner = self._runner
        rec = self._opt._ring.recorder.numpy()
        R2 = rec.shape[0]
        ring_steps = np.arange(max(self._rec_first, seen - R2 + 1), seen + 1, dtype=np.int64)
        ring = rec[(ring_steps - 1) % R2][:, :len(self._layers)]
        columns = list(STEP_FIELDS) + runner.columns + ["has_loss"]
        vals = rows[(steps - 1) % rows.shape[0]].astype(np.float64)
        buf = np.full((len(steps), len(columns)), np.nan)
        buf[:, :len(STEP_FIELDS)] = vals[:, :len(STEP_FIELDS)]
        buf[:, -1] = vals[:, len(STEP_FIELDS)]
        try:
            runner.run_deferred(buf, columns, ring, ring_steps, steps)
        except Exception as exc:  # noqa: BLE001 - principle 4
            self._safe(_raise, exc)
            return []
        col = {c: buf[:, j] for j, c in enumerate(columns)}
        names = self._layers

        def dump(step: int) -> str | None:
            table = pa.table(window_columns(step, ring, ring_steps, names, self.recorder_steps))
            return self._writer.write_window(step, table)

        found = build_events(runner.detectors, {"step": steps, "time": times,
                                                "skipped": col["skipped"] > 0.5}, col, ring,
                             ring_steps, names, rank=0, top_k=self.top_k,
                             recorder_steps=self.recorder_steps, dump_window=dump)
        for d, e in found:
            self._notices.event(d, e)
        return [e for _, e in found]

    def close(self) -> None:
        """Flush, finish ``meta.json`` and release the run folder."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._writer is not None:
            self._safe(self._writer.write_meta, self._meta())
            self._safe(self._writer.close)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        """``with Monitor(...) as mon:``: every recorded step is written however the block
        ends (an exception leaving ``fit`` included)."""
        self.close()

    def __repr__(self) -> str:
        return f"Monitor({str(self.run_dir)!r}, flush_every={self.flush_every}, layer_every={self.layer_every})"


def _detector_runner(detectors: Any, warn_interval: float):
    """``(RuleRunner, Notices)`` for the Keras Monitor's detectors (run at the flush, on the
    host), or ``(None, None)`` for ``detectors=[]``."""
    if detectors is not None and not isinstance(detectors, (list, tuple)):
        raise TypeError(f"detectors must be a list of gradguard detectors or None, got "
                        f"{type(detectors).__name__} {detectors!r}")
    if detectors is not None and len(detectors) == 0:
        return None, None
    from .monitor.detectors import default_detectors
    from .monitor.notices import Notices
    from .monitor.rules import RuleRunner

    runner = RuleRunner(default_detectors() if detectors is None else list(detectors), host_math=True)
    if runner.now:
        bad = runner.now[0]
        raise ValueError(f"detectors: {bad!r} runs in the step (action='skip' or host_math=False); "
                         "the Keras Monitor runs detectors at the flush. Refuse steps with "
                         "GuardedOptimizer(skip=gg.SpikeSkip())")
    return runner, Notices(warn_interval)


def _raise(exc: BaseException) -> None:
    raise exc


def _store():
    try:
        from . import store
    except ImportError:  # pragma: no cover - before the store package existed
        from .monitor import store
    return store


def _now() -> str:
    from datetime import datetime, timezone
    return datetime.now(timezone.utc).isoformat()
