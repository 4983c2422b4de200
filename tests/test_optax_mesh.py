"""gradguard.optax over 2 (forced host) devices: shard_map and pmap with the norm reduced over
the named axis, jit on globally sharded arrays, MultiSteps under shard_map, and
docs/optax.md's shard_map table (optax's own transforms there) measured on the 2 devices.

XLA_FLAGS must be set before jax is imported, so the checks run in a subprocess (hard
timeout: a hang fails)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

SCRIPT = textwrap.dedent(r'''
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import gradguard.optax as ggo

    assert len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rng = np.random.default_rng(0)
    grads = {"w": jnp.asarray(rng.normal(size=(4, 3)) * 3, jnp.float32),
             "b": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}
    params = jax.tree.map(jnp.zeros_like, grads)
    spec = {"w": P("d"), "b": P("d")}
    SHAPES = {(4, 3), (6,)}

    def state_spec(s):
        # optimizer moments and accumulators have the parameters' shapes: sharded like them;
        # gradguard's statistics are replicated scalars and [k] vectors
        return jax.tree.map(lambda x: P("d") if tuple(x.shape) in SHAPES else P(), s)

    def sharded(tx, g, p):
        def f(g, s, p):
            return tx.update(g, s, p)
        s = tx.init(p)
        sspec = state_spec(s)
        run = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(spec, sspec, spec),
                                    out_specs=(spec, sspec)))
        return run(g, s, p)

    def single(tx, g, p):
        return jax.jit(tx.update)(g, tx.init(p), p)

    def close(a, b, rtol=1e-6):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-30)

    # 1. clippers reduce over the axis: same updates and norm as on one device
    for make in (lambda a: ggo.clip_by_global_norm(1.0, axis_name=a),
                 lambda a: ggo.zclip(warmup_steps=1, axis_name=a),
                 lambda a: ggo.autoclip(axis_name=a),
                 lambda a: ggo.auto(axis_name=a),
                 lambda a: ggo.auto(optimizer_scale=True, axis_name=a)):
        u1, s1 = single(make(None), grads, params)
        u2, s2 = sharded(make("d"), grads, params)
        close(u1, u2)
        close(optax.tree.get(s1, "total_norm"), optax.tree.get(s2, "total_norm"))
        close(optax.tree.get(s1, "threshold"), optax.tree.get(s2, "threshold"))
    # a clipping step really happened in 1.
    u, s = single(ggo.clip_by_global_norm(1.0), grads, params)
    assert bool(s.clipped)
    print("shard_map clippers ok")

    # 2. NaN on one device's shard refuses the step on both
    bad = dict(grads, b=grads["b"].at[5].set(jnp.nan))   # element 5 lives on device 1
    tx = ggo.skip_nonfinite(optax.chain(ggo.clip_by_global_norm(1.0, axis_name="d"),
                                        optax.adam(1e-2)), axis_name="d")
    u, s = sharded(tx, bad, params)
    assert bool(s.skipped) and int(s.skip_count) == 1, s
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
    ref = tx.init(params)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(s.inner_state), jax.tree.leaves(ref.inner_state)))
    u, s = sharded(tx, grads, params)
    assert not bool(s.skipped)
    close(u, single(ggo.skip_nonfinite(optax.chain(ggo.clip_by_global_norm(1.0),
                                                   optax.adam(1e-2))), grads, params)[0])
    print("shard_map skip ok")

    # 3. spike_skip under shard_map, loss as value=
    tx = ggo.spike_skip(optax.sgd(0.1), threshold=3.0, window=4, min_history=2, axis_name="d")
    def f(g, s, p, v):
        return tx.update(g, s, p, value=v)
    s = tx.init(params)
    sspec = state_spec(s)
    run = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(spec, sspec, spec, P()),
                                out_specs=(spec, sspec)))
    for i in range(3):
        _, s = run(grads, s, params, jnp.float32(1.0))
    _, s = run(jax.tree.map(lambda x: x * 100, grads), s, params, jnp.float32(1.0))
    assert bool(s.skipped), s
    print("shard_map spike ok")

    # 4. pmap with the same axis name (leaves split over the leading axis)
    tx = ggo.clip_by_global_norm(1.0, axis_name="d")
    split = jax.tree.map(lambda x: x.reshape((2, -1) + x.shape[1:]), grads)
    st = jax.tree.map(lambda x: jnp.stack([x, x]), tx.init(jax.tree.map(lambda x: x[0], split)))
    u, s = jax.pmap(tx.update, axis_name="d")(split, st)
    close(jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), u), single(ggo.clip_by_global_norm(1.0), grads, params)[0])
    assert np.allclose(np.asarray(s.total_norm), float(ggo.tree_norms(grads).total), rtol=1e-6)
    print("pmap ok")

    # 5. jit on globally sharded arrays: the norm is global without any axis name
    g_sh = jax.device_put(grads, {k: NamedSharding(mesh, v) for k, v in spec.items()})
    tx = ggo.clip_by_global_norm(1.0)
    u, s = jax.jit(tx.update)(g_sh, tx.init(params))
    close(u, single(tx, grads, params)[0])
    print("global jit ok")

    # 6. MultiSteps under shard_map (jax #23693: cond replication): one decision per real
    # step; ggo.skip_microstep keeps a NaN micro-batch out of the accumulator on every device
    # (optax.skip_not_finite decides per shard: shard_map refuses its unreplicated flag)
    ms = optax.MultiSteps(ggo.skip_nonfinite(optax.chain(ggo.zclip(warmup_steps=1, axis_name="d"),
                                                         optax.sgd(0.1)), axis_name="d"),
                          every_k_schedule=2, should_skip_update_fn=ggo.skip_microstep("d"))
    s = ms.init(params)
    sspec = state_spec(s)
    run = jax.jit(jax.shard_map(ms.update, mesh=mesh, in_specs=(spec, sspec, spec),
                                out_specs=(spec, sspec)))
    p = params
    for g in (grads, bad, grads, grads, grads):
        u, s = run(g, s, p)
        p = optax.apply_updates(p, u)
    inner = s.inner_opt_state
    assert int(inner.guard_steps) == 2 and int(inner.skip_count) == 0, inner
    assert int(optax.tree.get(inner, "rule").count) == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(p))
    print("multisteps ok")

    # 7. docs/optax.md's shard_map rows, measured here (compared with the docs below)
    from gradguard.experiments.jax_seed import cases_markdown
    print("<mesh-table>\n" + cases_markdown(mesh=True) + "\n</mesh-table>")
    print("ALL OK")
''')


def test_two_devices_shard_map_pmap_multisteps():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.join(root, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env,
                         capture_output=True, text=True, timeout=420)
    assert "ALL OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
    measured = re.search(r"<mesh-table>\n(.*?)\n</mesh-table>", out.stdout, re.S).group(1)
    with open(os.path.join(root, "docs", "optax.md")) as f:
        block = re.search(r"<!-- optax-mesh-cases -->\n(.*?)\n<!-- /optax-mesh-cases -->",
                          f.read(), re.S)
    assert block, "docs/optax.md has no optax-mesh-cases block"
    assert block.group(1).strip() == measured.strip()  # the docs' shard_map table is current
