"""mask=: only the values a mask keeps count, in statistics, outputs, counts and the
running state, against float64 NumPy of the kept values, on both programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_parity import LINEN, NNX, TOL, assert_trees_close, nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jitted import batch_norm, train
from reference import (
    bn_ref,
    np_stats,
    randn,
    rel_err,
    vjp_jit,
    y_ref,
)

import jaxbn
import jaxbn.linen
import jaxbn.nnx


def test_mask_counts_only_masked_in_values(program):
    rs = np.random.RandomState(12)
    x = rs.randn(40, 5).astype(np.float32) * 3 + 1
    mask = rs.rand(40, 5) > 0.5
    x_garbage = np.where(mask, x, np.float32(np.inf))  # masked-out values never leak in
    y, s = train(jnp.asarray(x_garbage), mask=jnp.asarray(mask))
    mean, var = np_stats(x, mask=mask)
    assert rel_err(s.mean, mean) < 1e-6 and rel_err(s.var, var) < 1e-6
    assert np.isfinite(np.asarray(y)[mask]).all()


def test_feature_with_no_masked_in_value_keeps_its_statistics(program):
    x = np.random.RandomState(13).randn(10, 3).astype(np.float32)
    mask = np.ones((10, 3), bool)
    mask[:, 2] = False
    state = jaxbn.BatchNormState(
        jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 5.0, 6.0]), jnp.asarray(0, jnp.int32)
    )
    _, new = batch_norm(x, None, None, state, training=True, mask=jnp.asarray(mask))
    assert float(new.mean[2]) == 3.0 and float(new.var[2]) == 6.0
    assert float(new.mean[0]) != 1.0


def test_feature_no_value_counts_for_is_normalized_with_the_running_statistics(program):
    rs = np.random.RandomState(7)
    x = jnp.asarray(rs.randn(16, 3) * 2 + 1, jnp.float32)
    mask = jnp.asarray(np.tile([True, True, False], (16, 1)))
    st = jaxbn.BatchNormState(
        jnp.array([0.0, 0.0, 3.0]), jnp.array([1.0, 1.0, 4.0]), jnp.asarray(0, jnp.int32)
    )
    g, b = jnp.array([1.0, 1.0, 2.0]), jnp.array([0.0, 0.0, 0.5])
    f = lambda x, g: jaxbn.batch_norm(x, g, b, st, training=True, mask=mask)  # noqa: E731
    y, new = jax.jit(f)(x, g)
    want = (np.asarray(x)[:, 2] - 3.0) / np.sqrt(4.0 + 1e-5) * 2.0 + 0.5
    np.testing.assert_allclose(np.asarray(y)[:, 2], want, rtol=1e-6)
    assert float(new.mean[2]) == 3.0 and float(new.var[2]) == 4.0
    dy = jnp.asarray(rs.randn(16, 3), jnp.float32)
    _, (dx, dg) = vjp_jit(lambda x, g: f(x, g)[0], (x, g), dy)
    # a constant affine map there: dx = gamma / sqrt(var + eps) * dy, dgamma = sum(dy * xhat)
    np.testing.assert_allclose(
        np.asarray(dx)[:, 2], 2.0 / np.sqrt(4.0 + 1e-5) * dy[:, 2], rtol=1e-5
    )
    xhat = (np.asarray(x)[:, 2] - 3.0) / np.sqrt(4.0 + 1e-5)
    np.testing.assert_allclose(float(dg[2]), float(np.sum(np.asarray(dy)[:, 2] * xhat)), rtol=1e-5)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_mask_excluding_the_first_row_keeps_large_offsets_exact(offset, program):
    rs = np.random.RandomState(3)
    x = (offset + rs.randn(4096, 4)).astype(np.float32)
    x[0] = -3e38  # a value that does not count may be anything
    mask = np.ones((4096, 1), bool)
    mask[0] = False
    y, s = train(jnp.asarray(x), mask=jnp.asarray(mask))
    ref, var = y_ref(x[1:])
    assert np.max(np.abs(np.asarray(s.var, np.float64) / var - 1)) < 1e-4
    assert np.max(np.abs(np.asarray(y, np.float64)[1:] - ref)) < 1e-4


@pytest.mark.parametrize("value", [1.0, 1e24, 1e26, 1e27])
def test_masked_constant_feature_with_first_value_masked_out(value, program):
    x = np.full((64, 3), value, np.float32)
    x[0] = 7.0
    mask = np.ones((64, 1), bool)
    mask[0] = False
    y, s = train(jnp.asarray(x), mask=jnp.asarray(mask))
    assert np.all(np.asarray(s.var) == 0) and np.all(np.asarray(s.mean) == np.float32(value))
    assert np.all(np.asarray(y)[1:] == 0)


def test_device_zero_fully_masked_keeps_large_offsets_exact(program):
    rs = np.random.RandomState(6)
    n = 8 * 8
    x = (1e6 + rs.randn(n, 4)).astype(np.float32)
    x[:8] = 1e30  # device 0's rows: garbage, masked out (finite: dy * x must be 0 there)
    mask = np.ones((n, 1), bool)
    mask[:8] = False
    g = jnp.asarray(rs.rand(4) + 0.5, jnp.float32)
    w = jnp.asarray(rs.randn(n, 4), jnp.float32)
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))

    def local(x, m, w, g):
        def loss(x, g):
            y, st = jaxbn.batch_norm(
                x,
                g,
                None,
                jaxbn.init_state(4),
                training=True,
                mask=m,
                axis_name="batch",
                momentum=0.0,
            )
            return jnp.sum(jnp.where(m, y * w, 0)), (y, st)

        (_, (y, st)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, g)
        return y, st, grads[0], grads[1]  # the replicated gamma's gradient is summed already

    f = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P("batch"), P("batch"), P("batch"), P()),
            out_specs=(P("batch"), P(), P("batch"), P()),
        )
    )
    put = lambda v: jax.device_put(v, NamedSharding(mesh, P("batch")))  # noqa: E731
    y, st, dx, dg = f(put(jnp.asarray(x)), put(jnp.asarray(mask)), put(w), g)
    ref, var = y_ref(x[8:])
    assert np.max(np.abs(np.asarray(st.var, np.float64) / var - 1)) < 1e-4
    assert np.max(np.abs(np.asarray(y, np.float64)[8:] - ref * np.asarray(g))) < 1e-4
    with jax.enable_x64(True):
        x64 = jnp.asarray(x[8:], jnp.float64)
        loss = lambda x, g: jnp.sum(bn_ref(x, g, None)[0] * w[8:].astype(jnp.float64))  # noqa: E731
        dx_r, dg_r = jax.jit(jax.grad(loss, (0, 1)))(x64, g.astype(jnp.float64))
    assert rel_err(np.asarray(dx)[8:], dx_r) < 1e-4 and rel_err(dg, dg_r) < 1e-4


def test_momentum_none_skips_a_fully_masked_step():
    x = jnp.asarray(np.random.RandomState(0).randn(8, 3) + 5.16, jnp.float32)
    none = jnp.zeros((8, 1), bool)
    kw = dict(training=True, momentum=None)
    _, s = jax.jit(
        lambda x, mask: jaxbn.batch_norm(x, None, None, jaxbn.init_state(3), mask=mask, **kw)
    )(x, none)
    assert int(s.count) == 0 and np.all(np.asarray(s.mean) == 0)
    _, s = jax.jit(lambda x, s: jaxbn.batch_norm(x, None, None, s, **kw))(x, s)
    np.testing.assert_allclose(s.mean, np.asarray(x).mean(0), rtol=1e-6)  # not halved


def test_unbiased_running_var_with_mask_uses_each_features_count():
    x = randn((24, 5), scale=2.0, offset=1.0)
    mask = np.random.RandomState(1).rand(24, 5) > 0.5
    _, s = batch_norm(
        x,
        None,
        None,
        jaxbn.init_state(5),
        training=True,
        momentum=0.0,
        mask=jnp.asarray(mask),
        unbiased_running_var=True,
    )
    x64 = np.asarray(x, np.float64)
    expect = [x64[mask[:, j], j].var(ddof=1) for j in range(5)]
    assert rel_err(s.var, expect) < 1e-5


# --- through the Flax modules, against Flax's mask= ----------------------------------


def test_linen_mask_matches_flax():
    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.randn(16, 4) * 2 + 1, jnp.float32)
    mask = jnp.asarray(rs.rand(16, 1) > 0.4)
    variables = LINEN["flax"](False).init(jax.random.key(0), x)
    y, upd = jaxbn.linen.BatchNorm(False).apply(variables, x, mask=mask, mutable=["batch_stats"])
    y_f, upd_f = LINEN["flax"](False).apply(variables, x, mask=mask, mutable=["batch_stats"])
    assert rel_err(y, y_f) < TOL
    assert_trees_close(upd, upd_f)


def test_nnx_mask_matches_flax():
    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.randn(16, 4) * 2 + 1, jnp.float32)
    mask = jnp.asarray(rs.rand(16, 1) > 0.4)
    ours, theirs = jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0)), NNX["flax"](4, rngs=nnx.Rngs(0))
    assert rel_err(ours(x, mask=mask), theirs(x, mask=mask)) < TOL
    assert_trees_close(nnx.state(ours), nnx.state(theirs))
