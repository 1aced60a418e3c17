"""Promises at the edges: counts, masked steps, clear errors before XLA (issue 12).

The numerical edges (masks that exclude the first row, a fully masked device,
values whose squares overflow, masked constant features) are in test_programs.py,
run on both programs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn

ST3 = jaxbn.init_state(3)


def test_momentum_none_skips_a_fully_masked_step():
    x = jnp.asarray(np.random.RandomState(0).randn(8, 3) + 5.16, jnp.float32)
    none = jnp.zeros((8, 1), bool)
    kw = dict(training=True, momentum=None)
    _, s = jax.jit(lambda x, mask: jaxbn.batch_norm(x, None, None, ST3, mask=mask, **kw))(x, none)
    assert int(s.count) == 0 and np.all(np.asarray(s.mean) == 0)
    _, s = jax.jit(lambda x, s: jaxbn.batch_norm(x, None, None, s, **kw))(x, s)
    np.testing.assert_allclose(s.mean, np.asarray(x).mean(0), rtol=1e-6)  # not halved


def test_population_stats_exact_at_large_offsets():
    rs = np.random.RandomState(1)
    batches = [(1e6 + rs.randn(512, 3)).astype(np.float32) for _ in range(5)]
    with jax.enable_x64(True):
        s = jaxbn.population_stats(jnp.asarray, batches, dtype=jnp.float64)
    all_x = np.concatenate(batches).astype(np.float64)
    assert np.max(np.abs(np.asarray(s.var) / all_x.var(0) - 1)) < 1e-6
    assert np.max(np.abs(np.asarray(s.mean) - all_x.mean(0))) < 1e-6


def test_population_stats_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="no values to count for batch 0"):
        jaxbn.population_stats(lambda b: b, [jnp.zeros((0, 3))])


def test_counts_are_exact_integers_beyond_float32():
    n = 2**24 + 1
    x = jnp.zeros((n, 1), jnp.float32)
    (_, _, _, count), _ = jax.jit(lambda x: jaxbn.batch_norm_fwd(x, None, None))(x)
    assert count.dtype == jnp.int32 and int(count) == n
    mask = jnp.ones((n, 1), bool)
    fwd_masked = jax.jit(lambda x, mask: jaxbn.batch_norm_fwd(x, None, None, mask=mask))
    (_, _, _, count), _ = fwd_masked(x, mask)
    assert count.dtype == jnp.int32 and int(count[0]) == n


@pytest.mark.parametrize("eps", [1e-45, 1e-39])
def test_eps_below_the_normal_range_is_refused(eps):
    with pytest.raises(ValueError, match="eps must be at least 1.18e-38"):
        jaxbn.batch_norm(jnp.ones((4, 3)), None, None, ST3, training=True, eps=eps)


def test_eps_at_the_normal_limit_gives_finite_output():
    x = jnp.asarray(np.random.RandomState(2).randn(16, 3) * 1e-15, jnp.float32)
    x = x.at[:, 1].set(0.25)  # and a constant feature
    y, s = jaxbn.batch_norm(x, None, None, ST3, training=True, eps=1.2e-38)
    assert np.isfinite(np.asarray(y)).all() and np.all(np.asarray(y)[:, 1] == 0)


@pytest.mark.parametrize("size", [None, 2])
def test_an_empty_batch_is_refused(size):
    with pytest.raises(ValueError, match=r"has no values along the reduced axes \(0,\)"):
        jaxbn.batch_norm(jnp.zeros((0, 3)), None, None, ST3, training=True, virtual_batch_size=size)
    with pytest.raises(ValueError, match="has no values along the reduced axes"):
        jaxbn.batch_norm_fwd(jnp.zeros((0, 3)), None, None)


@pytest.mark.parametrize("fn", [jaxbn.batch_norm, jaxbn.batch_norm_act])
def test_state_with_python_fields_is_converted(fn):
    # batch_norm_act dropped the converted state (issue 23: AttributeError on a list)
    st = jaxbn.BatchNormState([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 0)
    x = jnp.asarray(np.random.RandomState(3).randn(8, 3), jnp.float32)
    _, new = fn(x, None, None, st, training=True, momentum=None)
    _, ref = fn(x, None, None, ST3, training=True, momentum=None)
    for a, b in zip(new, ref):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="state.mean must be an array, got str"):
        jaxbn.batch_norm(x, None, None, jaxbn.BatchNormState("a", [1.0], 0), training=True)


def test_unbound_axis_name_says_how_to_bind_it():
    with pytest.raises(
        ValueError, match="axis_name 'batch' is not bound here; call batch_norm inside"
    ):
        jaxbn.batch_norm(jnp.ones((4, 3)), None, None, ST3, training=True, axis_name="batch")


def vmapped(x, **kw):
    f = lambda r: jaxbn.batch_norm(r, None, None, ST3, training=True, axis_name="b", **kw)  # noqa: E731
    return jax.vmap(f, axis_name="b")(x)


def test_axis_index_groups_must_cover_the_axis():
    with pytest.raises(
        ValueError, match=r"axis_index_groups must split the 3 devices of axis_name 'b'"
    ):
        vmapped(jnp.ones((3, 2, 3)), axis_index_groups=[[0, 1]])
    with pytest.raises(ValueError, match="axis_index_groups must split the 4 devices"):
        vmapped(jnp.ones((4, 2, 3)), axis_index_groups=[[0, 1], [1, 2]])


def test_axis_index_groups_outside_pmap_says_where_they_work():
    with pytest.raises(NotImplementedError, match="axis_index_groups works under jax.pmap only"):
        vmapped(jnp.ones((4, 2, 3)), axis_index_groups=[[0, 1], [2, 3]])
    mesh = jax.make_mesh((8,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    f = lambda r: jaxbn.batch_norm(  # noqa: E731
        r, None, None, ST3, training=True, axis_name="b", axis_index_groups=groups
    )[0]
    sm = jax.shard_map(f, mesh=mesh, in_specs=P("b"), out_specs=P("b"))
    with pytest.raises(NotImplementedError, match="axis_index_groups works under jax.pmap only"):
        jax.jit(sm)(jnp.ones((16, 3)))


def test_batch_of_one_is_refused_under_a_named_axis_of_size_one():
    with pytest.raises(ValueError, match="has 1 along the reduced axes .* of axis_name 'b'"):
        vmapped(jnp.ones((1, 1, 3)))
    y, _ = jax.jit(vmapped)(jnp.arange(6.0).reshape(2, 1, 3))  # one row per device, two devices
    np.testing.assert_allclose(np.asarray(y)[:, 0, 0], [-1, 1], atol=1e-3)


def test_bwd_checks_its_axis_and_cotangent_shapes():
    (_, _, _, _), res = jaxbn.batch_norm_fwd(jnp.ones((4, 3, 2)), None, None)
    with pytest.raises(ValueError, match=r"residuals hold statistics of shape \(2,\), but axis"):
        jaxbn.batch_norm_bwd(res, jnp.ones((4, 3, 2)), axis=1)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 3\), expected x's shape \(4, 3, 2\)"):
        jaxbn.batch_norm_bwd(res, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"dmean has shape \(3,\), expected \(2,\)"):
        jaxbn.batch_norm_bwd(res, jnp.ones((4, 3, 2)), jnp.ones(3))


@pytest.mark.parametrize("limits", [("2", 1.0), (2.0, b"1"), (2.0, True)])
def test_renorm_limits_must_be_numbers(limits):
    with pytest.raises(TypeError, match="renorm (rmax|dmax) must be a number or a scalar array"):
        jaxbn.batch_norm(jnp.ones((4, 3)), None, None, ST3, training=True, renorm=limits)


def test_ghost_batches_constrain_training_only():
    x = jnp.asarray(np.random.RandomState(4).randn(5, 3), jnp.float32)
    y, s = jaxbn.batch_norm(x, None, None, ST3, training=False, virtual_batch_size=2)
    ref, _ = jaxbn.batch_norm(x, None, None, ST3, training=False)
    np.testing.assert_array_equal(y, ref)
    with pytest.raises(ValueError, match="virtual_batch_size 2 does not divide the batch size 5"):
        jaxbn.batch_norm(x, None, None, ST3, training=True, virtual_batch_size=2)


def complex_ref(x, w):
    """Plain-jnp complex batch norm (Flax's formula, var = mean(|x - mean|**2))."""
    mean = jnp.mean(x, 0, keepdims=True)
    var = jnp.mean(jnp.abs(x - mean) ** 2, 0, keepdims=True)
    return jnp.sum(((x - mean) / jnp.sqrt(var + 1e-5) * w).real), (mean[0], var[0])


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.complex128])
def test_complex_input_matches_a_plain_reference_and_its_gradient(dtype, program):
    rs = np.random.RandomState(5)
    with jax.enable_x64(dtype == jnp.complex128):
        x = jnp.asarray(rs.randn(32, 3) + 1j * rs.randn(32, 3) + (1e3 - 2e3j), dtype)
        w = jnp.asarray(rs.randn(32, 3) + 1j * rs.randn(32, 3), dtype)
        st = jaxbn.init_state(3, jnp.float64 if dtype == jnp.complex128 else jnp.float32)

        def loss(x):
            y, new = jaxbn.batch_norm(x, None, None, st, training=True, momentum=0.0)
            return jnp.sum((y * w).real), (new.mean, new.var)

        (value, (mean, var)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
        (value_r, (mean_r, var_r)), g_r = jax.jit(jax.value_and_grad(complex_ref, has_aux=True))(
            x, w
        )
        tol = 1e-4 if dtype == jnp.complex64 else 1e-10
        assert mean.dtype == dtype and var.dtype == jnp.finfo(dtype).dtype
        np.testing.assert_allclose(mean, mean_r, rtol=tol)
        np.testing.assert_allclose(var, var_r, rtol=tol)
        np.testing.assert_allclose(value, value_r, rtol=tol, atol=tol)
        np.testing.assert_allclose(g, g_r, rtol=tol, atol=tol)


def test_strict_dtype_promotion_gives_the_standard_results():
    """Under ``jax_numpy_dtype_promotion="strict"`` (Equinox's tests use it), jaxbn's own
    mixed-dtype arithmetic (bfloat16 x, float32 statistics, an int32 count) still runs,
    forward and backward, with the results of standard promotion."""
    x = (jax.random.normal(jax.random.key(0), (16, 3)) * 3 + 1).astype(jnp.bfloat16)
    g, b = jnp.full(3, 1.5), jnp.full(3, 0.5)
    ct = jax.random.normal(jax.random.key(1), (16, 3)).astype(jnp.bfloat16)

    def run():
        out = {}
        for name, fn in (("bn", jaxbn.batch_norm), ("act", jaxbn.batch_norm_act)):

            def f(x, g, b, fn=fn):
                return fn(x, g, b, jaxbn.init_state(3), training=True, unbiased_running_var=True)

            def y_state_grads(x, g, b, f=f):
                (y, state), pullback = jax.vjp(f, x, g, b)
                return y, state, pullback((ct, jax.tree.map(jnp.zeros_like, state)))

            out[name] = jax.jit(y_state_grads)(x, g, b)
        return out

    standard = run()
    with jax.numpy_dtype_promotion("strict"):
        strict = run()
    for a, b_ in zip(jax.tree.leaves(strict), jax.tree.leaves(standard)):
        assert a.dtype == b_.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b_, np.float32))
