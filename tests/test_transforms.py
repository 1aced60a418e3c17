"""jit, vmap, scan, remat and donation; nothing is mutated, state shapes never change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import bn_ref, rel_err

import jaxbn


def setup(seed=0, shape=(16, 4)):
    rs = np.random.RandomState(seed)
    x = jnp.asarray(rs.randn(*shape) * 2 + 1, jnp.float32)
    c = shape[-1]
    return x, jnp.asarray(rs.rand(c) + 0.5, jnp.float32), jnp.asarray(rs.randn(c), jnp.float32)


def test_jit_equals_eager():
    x, g, b = setup()
    s = jaxbn.init_state(4)
    f = lambda x, s: jaxbn.batch_norm(x, g, b, s, training=True)  # noqa: E731
    for a, c in zip(jax.tree.leaves(f(x, s)), jax.tree.leaves(jax.jit(f)(x, s))):
        assert rel_err(a, c) < 1e-6


def test_vmap_leading_axis_is_independent_problems():
    rs = np.random.RandomState(1)
    xs = jnp.asarray(rs.randn(3, 16, 4) * np.array([1, 10, 100])[:, None, None], jnp.float32)
    w = jnp.asarray(rs.randn(3, 16, 4), jnp.float32)
    _, g, b = setup()
    states = jax.vmap(lambda _: jaxbn.init_state(4))(jnp.arange(3))

    def loss(x, s, w):
        y, new = jaxbn.batch_norm(x, g, b, s, training=True)
        return jnp.sum(y * w), new

    (vals, news), dxs = jax.vmap(jax.value_and_grad(loss, has_aux=True))(xs, states, w)
    for i in range(3):
        (v, new), dx = jax.value_and_grad(loss, has_aux=True)(xs[i], jaxbn.init_state(4), w[i])
        assert rel_err(vals[i], v) < 1e-5 and rel_err(dxs[i], dx) < 1e-5
        assert rel_err(news.var[i], new.var) < 1e-6


def test_scan_threads_state_through_steps():
    rs = np.random.RandomState(2)
    batches = jnp.asarray(rs.randn(5, 16, 4), jnp.float32)
    _, g, b = setup()

    def step(s, x):
        y, s = jaxbn.batch_norm(x, g, b, s, training=True)
        return s, y

    s_scan, ys = jax.lax.scan(step, jaxbn.init_state(4), batches)
    s = jaxbn.init_state(4)
    for i in range(5):
        s, y = step(s, batches[i])
        assert rel_err(ys[i], y) < 1e-6
    assert rel_err(s_scan.mean, s.mean) < 1e-6 and int(s_scan.count) == 5


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.nothing_saveable])
def test_checkpoint_gives_the_same_gradients(policy):
    x, g, b = setup(3)
    w = jnp.asarray(np.random.RandomState(4).randn(16, 4), jnp.float32)
    layer = lambda x, g, b: jnp.tanh(
        jaxbn.batch_norm(x, g, b, jaxbn.init_state(4), training=True)[0]
    )  # noqa: E731
    loss = lambda f: lambda x, g, b: jnp.sum(f(f(x, g, b), g, b) * w)  # noqa: E731
    plain = jax.grad(loss(layer), (0, 1, 2))(x, g, b)
    remat = jax.jit(jax.grad(loss(jax.checkpoint(layer, policy=policy)), (0, 1, 2)))(x, g, b)
    ref = jax.grad(loss(lambda x, g, b: jnp.tanh(bn_ref(x, g, b)[0])), (0, 1, 2))(x, g, b)
    for p, r, f in zip(plain, remat, ref):
        assert rel_err(p, f) < 1e-5 and rel_err(r, f) < 1e-5


def test_donated_state_and_input():
    x, g, b = setup(5)
    f = jax.jit(lambda x, s: jaxbn.batch_norm(x, g, b, s, training=True), donate_argnums=(0, 1))
    ref_y, ref_s = jaxbn.batch_norm(x, g, b, jaxbn.init_state(4), training=True)
    y, s = f(jnp.array(x), jaxbn.init_state(4))
    assert rel_err(y, ref_y) < 1e-6 and rel_err(s.var, ref_s.var) < 1e-6


@pytest.mark.parametrize("training", [True, False])
def test_state_is_never_mutated_and_keeps_shapes_and_dtypes(training):
    x, g, b = setup(6, (8, 3, 5))
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


def _root_and_x(f, *args):
    """The compiled entry computation's ROOT line, and the name of its first parameter."""
    text = jax.jit(f).lower(*args).compile().as_text()
    lines = text[text.index("\nENTRY") :].splitlines()
    root = next(ln for ln in lines if ln.strip().startswith("ROOT"))
    x = next(ln for ln in lines if " parameter(0)" in ln).split("=")[0].strip()
    return root.split(", metadata")[0], x


@pytest.mark.parametrize("training", [True, False])
def test_output_fuses_with_a_following_relu(training):
    # relu(y) comes out of one fusion that reads x: the normalization leaves XLA free
    # to fuse its consumer (no cond, call or custom call around it), as flax's does.
    x, g, b = setup(shape=(64, 16))
    s = jaxbn.init_state(16)
    f = lambda x, s: jax.nn.relu(jaxbn.batch_norm(x, g, b, s, training=training)[0])  # noqa: E731
    root, x_name = _root_and_x(f, x, s)
    assert "maximum" in root and " fusion(" in root and x_name in root, root


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
