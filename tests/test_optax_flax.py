"""gradguard.optax inside flax train states (linen TrainState, nnx.Optimizer): a NaN step is
refused with parameters and the inner optimizer state bit-identical."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import gradguard.optax as ggo  # noqa: E402


def _same(a, b):
    return jax.tree.all(jax.tree.map(lambda u, v: np.array_equal(np.asarray(u), np.asarray(v),
                                                                  equal_nan=True), a, b))


def _tx():
    return ggo.skip_nonfinite(optax.chain(ggo.auto(), optax.adamw(1e-2)))


def test_linen_train_state_refuses_a_nan_step():
    import flax.linen as nn
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.relu(nn.Dense(8)(x)))

    m = MLP()
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
    st = train_state.TrainState.create(apply_fn=m.apply, params=m.init(jax.random.PRNGKey(0), x),
                                       tx=_tx())

    @jax.jit
    def step(st, x, y):
        g = jax.grad(lambda p: ((m.apply(p, x) - y) ** 2).mean())(st.params)
        return st.apply_gradients(grads=g)

    st = step(st, x, y)
    st2 = step(st, x.at[0, 0].set(jnp.nan), y)
    assert _same(st.params, st2.params)
    assert _same(st.opt_state.inner_state, st2.opt_state.inner_state)
    assert int(st2.opt_state.skip_count) == 1 and bool(st2.opt_state.skipped)
    st3 = step(st2, x, y)  # training goes on after the refused step
    assert not _same(st2.params, st3.params)
    assert jax.tree.all(jax.tree.map(lambda a: bool(jnp.isfinite(a).all()), st3.params))


def test_nnx_optimizer_refuses_a_nan_step():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 1, rngs=rngs)

        def __call__(self, x):
            return self.lin(x)

    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))

    @nnx.jit
    def step(model, opt, x, y):
        opt.update(model, nnx.grad(lambda m: ((m(x) - y) ** 2).mean())(model))

    step(model, opt, x, y)
    w = np.asarray(model.lin.kernel[...])
    step(model, opt, x.at[0, 0].set(jnp.nan), y)
    assert np.array_equal(w, np.asarray(model.lin.kernel[...]))
    step(model, opt, x, y)
    assert not np.array_equal(w, np.asarray(model.lin.kernel[...]))
