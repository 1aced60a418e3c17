"""jit, vmap, scan, remat, donation and export (symbolic shapes too); nothing is mutated,
state shapes never change, and recomputation never updates the running state twice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import (
    bn_ref,
    problem,
    rel_err,
)

import jaxbn
from jaxbn import _core


def test_jit_equals_eager():
    x, g, b, _ = problem((16, 4))
    s = jaxbn.init_state(4)
    f = lambda x, s: jaxbn.batch_norm(x, g, b, s, training=True)  # noqa: E731
    for a, c in zip(jax.tree.leaves(f(x, s)), jax.tree.leaves(jax.jit(f)(x, s))):
        assert rel_err(a, c) < 1e-6


def test_vmap_leading_axis_is_independent_problems():
    rs = np.random.RandomState(1)
    xs = jnp.asarray(rs.randn(3, 16, 4) * np.array([1, 10, 100])[:, None, None], jnp.float32)
    w = jnp.asarray(rs.randn(3, 16, 4), jnp.float32)
    _, g, b, _ = problem((16, 4))
    states = jax.vmap(lambda _: jaxbn.init_state(4))(jnp.arange(3))

    def loss(x, s, w):
        y, new = jaxbn.batch_norm(x, g, b, s, training=True)
        return jnp.sum(y * w), new

    grad = jax.value_and_grad(loss, has_aux=True)
    (vals, news), dxs = jax.jit(jax.vmap(grad))(xs, states, w)
    for i in range(3):
        (v, new), dx = jax.jit(grad)(xs[i], jaxbn.init_state(4), w[i])
        assert rel_err(vals[i], v) < 1e-5 and rel_err(dxs[i], dx) < 1e-5
        assert rel_err(news.var[i], new.var) < 1e-6


def test_scan_threads_state_through_steps():
    rs = np.random.RandomState(2)
    batches = jnp.asarray(rs.randn(5, 16, 4), jnp.float32)
    _, g, b, _ = problem((16, 4))

    def step(s, x):
        y, s = jaxbn.batch_norm(x, g, b, s, training=True)
        return s, y

    s_scan, ys = jax.lax.scan(step, jaxbn.init_state(4), batches)
    s = jaxbn.init_state(4)
    for i in range(5):
        s, y = jax.jit(step)(s, batches[i])
        assert rel_err(ys[i], y) < 1e-6
    assert rel_err(s_scan.mean, s.mean) < 1e-6 and int(s_scan.count) == 5


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.nothing_saveable])
def test_checkpoint_gives_the_same_gradients(policy):
    x, g, b, _ = problem((16, 4), seed=3)
    w = jnp.asarray(np.random.RandomState(4).randn(16, 4), jnp.float32)
    layer = lambda x, g, b: jnp.tanh(
        jaxbn.batch_norm(x, g, b, jaxbn.init_state(4), training=True)[0]
    )  # noqa: E731
    loss = lambda f: lambda x, g, b: jnp.sum(f(f(x, g, b), g, b) * w)  # noqa: E731
    plain = jax.jit(jax.grad(loss(layer), (0, 1, 2)))(x, g, b)
    remat = jax.jit(jax.grad(loss(jax.checkpoint(layer, policy=policy)), (0, 1, 2)))(x, g, b)
    ref = jax.jit(jax.grad(loss(lambda x, g, b: jnp.tanh(bn_ref(x, g, b)[0])), (0, 1, 2)))(x, g, b)
    for p, r, f in zip(plain, remat, ref):
        assert rel_err(p, f) < 1e-5 and rel_err(r, f) < 1e-5


def test_donated_state_and_input():
    x, g, b, _ = problem((16, 4), seed=5)
    f = jax.jit(lambda x, s: jaxbn.batch_norm(x, g, b, s, training=True), donate_argnums=(0, 1))
    ref_y, ref_s = jaxbn.batch_norm(x, g, b, jaxbn.init_state(4), training=True)
    y, s = f(jnp.array(x), jaxbn.init_state(4))
    assert rel_err(y, ref_y) < 1e-6 and rel_err(s.var, ref_s.var) < 1e-6


@pytest.mark.parametrize("training", [True, False])
def test_state_is_never_mutated_and_keeps_shapes_and_dtypes(training):
    x, g, b, _ = problem((8, 3, 5), seed=6)
    with jax.enable_x64(True):
        for dtype in (jnp.float32, jnp.float64):
            s = jaxbn.init_state((3, 5), dtype)
            before = [np.asarray(v).copy() for v in s]
            x_before = np.asarray(x).copy()
            _, new = jaxbn.batch_norm(x, None, None, s, training=training, axis=(1, 2))
            for a, v in zip(before, s):
                assert np.array_equal(a, np.asarray(v))
            assert np.array_equal(x_before, np.asarray(x))
            assert jax.tree.map(lambda v: (v.shape, v.dtype), new) == jax.tree.map(
                lambda v: (v.shape, v.dtype), s
            )


JAX_MINOR = tuple(int(p) for p in jax.__version__.split(".")[:2])


@pytest.mark.skipif(
    JAX_MINOR < (0, 10),
    reason="jax 0.8 cannot batch psum_invariant inside a jaxpr (TypeError: axis_index_groups)",
)
@pytest.mark.parametrize("per_device_stats", [False, True])
def test_vmap_over_a_shard_map_with_gradients_equals_a_loop(program, per_device_stats):
    # vmap over seeds of a data-parallel step: JAX turns the CPU program's conds into
    # selects, which failed on a pvary ("invariant->variant") until jaxbn._compat
    # .vary_like_predicate; the clean program has no cond
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("b",), axis_types=(AxisType.Auto,))
    axis_name = None if per_device_stats else "b"
    rs = np.random.RandomState(7)
    xs = jnp.asarray(rs.randn(3, 16, 4) * 3 + 5, jnp.float32)  # (seeds, batch, features)
    gammas = jnp.asarray(rs.rand(3, 4) + 0.5, jnp.float32)
    w = jnp.asarray(rs.randn(16, 4), jnp.float32)

    def step(gamma, x, w):
        def loss(gamma, x):
            y, st = jaxbn.batch_norm(
                x, gamma, None, jaxbn.init_state(4), training=True, axis_name=axis_name
            )
            return jnp.sum(y * w + y**3 / 10), st

        (_, st), (dg, dx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(gamma, x)
        return jax.lax.psum(dg, "b"), dx, jax.lax.pmean(st.var, "b")

    sharded = jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P("b"), P("b")), out_specs=(P(), P("b"), P())
    )
    got = jax.jit(jax.vmap(sharded, in_axes=(0, 0, None)))(gammas, xs, w)
    for k in range(3):
        want = jax.jit(sharded)(gammas[k], xs[k], w)
        for a, b in zip(got, want):
            assert rel_err(a[k], b) < 1e-6


def test_jax_checkpoint_updates_the_state_once():
    # PyTorch's in-place running statistics are updated again by every recomputed
    # forward (pytorch#96136, fairscale#1035); a state jaxbn returns cannot be
    rs = np.random.RandomState(0)
    X = jnp.asarray(rs.randn(16, 5) * 2 + 1, jnp.float32)
    W = jnp.asarray(rs.randn(16, 5), jnp.float32)
    K = jnp.asarray(rs.randn(5, 5) * 0.5, jnp.float32)

    def block(k, x, state):
        y, new = jaxbn.batch_norm(x @ k, None, None, state, training=True)
        return jnp.tanh(y), new

    def loss(k, x, state, remat):
        f = jax.checkpoint(block) if remat else block
        y, new = f(k, x, state)
        y, new = f(k, y, new)  # two applications: two updates, no more
        return jnp.sum(y * W), new

    state = jaxbn.init_state(5)
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=3)
    (_, new_r), g_r = grad(K, X, state, True)
    (_, new), g = grad(K, X, state, False)
    for u, v in zip(jax.tree.leaves((new_r, g_r)), jax.tree.leaves((new, g))):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)
    assert int(new_r.count) == 2


def test_export_for_cpu_and_cuda_serializes_and_runs_on_cpu(program):
    export = pytest.importorskip("jax.export")
    x, g, b, _ = problem((32, 6), offset=3.0)
    st = jaxbn.init_state(6)

    def step(x, g, b, st):
        def loss(x, g, b):
            y, new = jaxbn.batch_norm(x, g, b, st, training=True)
            return jnp.sum(y * jnp.sin(x)), new

        (value, new), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, g, b)
        return value, new, grads

    exp = export.export(jax.jit(step), platforms=("cpu", "cuda"))(x, g, b, st)
    got = export.deserialize(exp.serialize()).call(x, g, b, st)
    want = jax.jit(step)(x, g, b, st)
    assert isinstance(got[1], jaxbn.BatchNormState)
    for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_export_with_a_symbolic_batch():
    export = pytest.importorskip("jax.export")
    (b,) = export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, 6), jnp.float32)
    st = jaxbn.init_state(6)
    f = jax.jit(lambda x: jaxbn.batch_norm(x, None, None, st, training=True))
    exp = export.export(f, platforms=("cpu", "cuda"))(spec)
    x = jnp.asarray(np.random.RandomState(2).randn(10, 6) + 4, jnp.float32)
    for a, w in zip(jax.tree.leaves(exp.call(x)), jax.tree.leaves(f(x))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_the_rule_is_traced_once_per_configuration(monkeypatch, clean_program):
    # JAX caches a jitted function's trace and its vmap and gradient: a model's
    # same-shaped layers, or a program traced again, reuse the rule's (its platform
    # forms and their conds make it many times a plain jnp batch norm's trace); the
    # clean program is another configuration (use_clean_program is in jit's cache key)
    calls = []
    forward = _core.forward
    monkeypatch.setattr(_core, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    jax.clear_caches()  # no earlier test's trace of these shapes
    x, g, b, _ = problem((23, 17))
    xs, w = jnp.stack([x, 2 * x]), jnp.stack([x, -x])
    s = jax.vmap(lambda _: jaxbn.init_state(17))(jnp.arange(2))

    def program():  # a new function each time, so jit's own cache cannot serve it
        def loss(x, s, w):
            y, new = jaxbn.batch_norm(x, g, b, s, training=True)
            return jnp.sum(y * w), new

        return jax.vmap(jax.value_and_grad(loss, has_aux=True))

    jax.make_jaxpr(program())(xs, s, w)
    assert calls, "the rule was not traced"
    traced = len(calls)
    jax.make_jaxpr(program())(xs, s, w)
    assert len(calls) == traced
    with clean_program():
        jax.make_jaxpr(program())(xs, s, w)
    assert len(calls) > traced, "the clean program reused the platform program's trace"
