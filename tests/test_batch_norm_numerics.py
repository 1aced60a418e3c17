"""jaxbn.batch_norm's forward values and running statistics against float64 NumPy and
Flax: layouts, momentum, eval mode, dtypes, and the numerical edges (large offsets,
constant features, outliers, overflow, the eps and count limits), on both programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jitted import batch_norm, train
from reference import affine, np_stats, randn, rel_err, y_ref

import jaxbn

# --- training output and running statistics ------------------------------------------


@pytest.mark.parametrize(
    "shape,axis",
    [((32, 6), -1), ((4, 5, 5, 6), -1), ((4, 6, 5, 5), 1), ((5, 4, 6), (1, 2))],
)
def test_training_output_and_state_update(shape, axis):
    rs = np.random.RandomState(5)
    x = (rs.randn(*shape) * 2 + 3).astype(np.float32)
    mean, var = np_stats(x, axis)
    gamma, beta = rs.rand(*mean.shape) + 0.5, rs.randn(*mean.shape)
    state = jaxbn.BatchNormState(
        jnp.asarray(rs.randn(*mean.shape), jnp.float32),
        jnp.asarray(rs.rand(*mean.shape) + 1, jnp.float32),
        jnp.asarray(3, jnp.int32),
    )
    y, new = batch_norm(
        x,
        jnp.asarray(gamma, jnp.float32),
        jnp.asarray(beta, jnp.float32),
        state,
        training=True,
        axis=axis,
        momentum=0.8,
    )
    keep = lambda v: np.expand_dims(
        v, [i for i in range(x.ndim) if i not in np.atleast_1d(axis) % x.ndim]
    )  # noqa: E731
    y_ref = keep(gamma) * (x - keep(mean)) / np.sqrt(keep(var) + 1e-5) + keep(beta)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(new.mean, 0.8 * np.asarray(state.mean) + 0.2 * mean) < 1e-6
    assert rel_err(new.var, 0.8 * np.asarray(state.var) + 0.2 * var) < 1e-6
    assert int(new.count) == 4


def test_first_update_matches_flax_closed_form():
    # flax's linen_test: after one step from init, mean = 0.1 * batch mean, var = 0.9 + 0.1 * var.
    x = np.random.RandomState(6).randn(20, 4).astype(np.float32) + 1
    _, new = batch_norm(x, None, None, jaxbn.init_state(4), training=True)
    mean, var = np_stats(x)
    assert rel_err(new.mean, 0.1 * mean) < 1e-6 and rel_err(new.var, 0.9 + 0.1 * var) < 1e-6


def test_momentum_none_is_cumulative_average():
    rs = np.random.RandomState(7)
    batches = [rs.randn(10, 3).astype(np.float32) * (i + 1) + i for i in range(4)]
    state = jaxbn.init_state(3)
    for b in batches:
        _, state = batch_norm(b, None, None, state, training=True, momentum=None)
    stats = [np_stats(b) for b in batches]
    assert rel_err(state.mean, np.mean([m for m, _ in stats], 0)) < 1e-6
    assert rel_err(state.var, np.mean([v for _, v in stats], 0)) < 1e-6


def test_unbiased_running_var_stores_n_over_n_minus_one():
    x = randn((24, 5), scale=2.0, offset=1.0)
    _, s = batch_norm(
        x, None, None, jaxbn.init_state(5), training=True, momentum=0.7, unbiased_running_var=True
    )
    x64 = np.asarray(x, np.float64)
    assert rel_err(s.var, 0.7 + 0.3 * x64.var(0, ddof=1)) < 1e-6
    assert rel_err(s.mean, 0.3 * x64.mean(0)) < 1e-6


def test_eval_mode_uses_running_statistics_and_returns_state_unchanged():
    rs = np.random.RandomState(8)
    x = (rs.randn(16, 4, 4, 3) + 1e4).astype(np.float32)
    state = jaxbn.BatchNormState(
        jnp.asarray(1e4 + rs.randn(3), jnp.float32),
        jnp.asarray(rs.rand(3) + 0.5, jnp.float32),
        jnp.asarray(7, jnp.int32),
    )
    gamma, beta = jnp.asarray(rs.rand(3) + 0.5, jnp.float32), jnp.asarray(rs.randn(3), jnp.float32)
    y, same = jaxbn.batch_norm(x, gamma, beta, state, training=False)
    assert same is state
    m, v = np.asarray(state.mean, np.float64), np.asarray(state.var, np.float64)
    y_ref = (x.astype(np.float64) - m) * np.asarray(gamma, np.float64) / np.sqrt(
        v + 1e-5
    ) + np.asarray(beta, np.float64)
    assert np.max(np.abs(np.asarray(y, np.float64) - y_ref)) < 1e-4


def test_nchw_axis_equals_nhwc_after_transpose():
    x = np.random.RandomState(11).randn(4, 6, 5, 5).astype(np.float32)
    y1, s1 = train(jnp.asarray(x), axis=1)
    y2, s2 = train(jnp.asarray(x.transpose(0, 2, 3, 1)), axis=-1)
    assert rel_err(y1, np.asarray(y2).transpose(0, 3, 1, 2)) < 1e-6
    assert rel_err(s1.var, s2.var) < 1e-6


@pytest.mark.parametrize("axis", [-1, 1])
def test_matches_flax_batchnorm(axis):
    flax = pytest.importorskip("flax.linen")
    rs = np.random.RandomState(14)
    x = rs.randn(8, 6, 4, 4).astype(np.float32) * 2 + 0.5
    bn = flax.BatchNorm(use_running_average=False, axis=axis, use_fast_variance=False)
    variables = bn.init(jax.random.key(0), x)
    y_flax, upd = bn.apply(variables, x, mutable=["batch_stats"])
    c = x.shape[axis]
    y, s = batch_norm(
        x, jnp.ones(c), jnp.zeros(c), jaxbn.init_state(c), training=True, axis=axis, momentum=0.99
    )
    assert rel_err(y, y_flax) < 1e-5
    assert rel_err(s.mean, upd["batch_stats"]["mean"]) < 1e-5
    assert rel_err(s.var, upd["batch_stats"]["var"]) < 1e-5


@pytest.mark.parametrize("fn", [jaxbn.batch_norm, jaxbn.batch_norm_act])
def test_state_with_python_fields_is_converted(fn):
    # batch_norm_act dropped the converted state (issue 23: AttributeError on a list)
    st = jaxbn.BatchNormState([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 0)
    x = jnp.asarray(np.random.RandomState(3).randn(8, 3), jnp.float32)
    _, new = fn(x, None, None, st, training=True, momentum=None)
    _, ref = fn(x, None, None, jaxbn.init_state(3), training=True, momentum=None)
    for a, b in zip(new, ref):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="state.mean must be an array, got str"):
        jaxbn.batch_norm(x, None, None, jaxbn.BatchNormState("a", [1.0], 0), training=True)


# --- numerical edges ----------------------------------------------------------------


@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6, -1e6])
@pytest.mark.parametrize("n", [7, 4096])
def test_large_offset_statistics_and_output(offset, n, program):
    rs = np.random.RandomState(0)
    x = (offset + rs.randn(n, 16) * rs.uniform(0.5, 2, 16)).astype(np.float32)
    y, s = train(jnp.asarray(x))
    mean, var = np_stats(x)
    assert np.max(np.abs(np.asarray(s.var, np.float64) / var - 1)) < 1e-4
    x64 = x.astype(np.float64)
    y_ref = (x64 - mean) / np.sqrt(var + 1e-5)
    assert np.max(np.abs(np.asarray(y, np.float64) - y_ref)) < 1e-4


def test_flax_default_fails_where_jaxbn_does_not():
    flax = pytest.importorskip("flax.linen")
    x = (1e4 + np.random.RandomState(1).randn(256, 4)).astype(np.float32)
    _, var = np_stats(x)
    bn = flax.BatchNorm(use_running_average=False, momentum=0.0)
    _, upd = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    flax_err = np.max(np.abs(np.asarray(upd["batch_stats"]["var"]) / var - 1))
    _, s = train(jnp.asarray(x))
    ours_err = np.max(np.abs(np.asarray(s.var) / var - 1))
    assert flax_err > 1e-2 and ours_err < 1e-5


@pytest.mark.parametrize("value", [0.1, 3.7e5, -1e-30, 1e30, 0.0])
def test_constant_feature_gives_zero_variance_and_exactly_beta(value, program):
    x = np.random.RandomState(2).randn(100, 3).astype(np.float32)
    x[:, 1] = value
    gamma = jnp.array([2.0, 5.0, 0.5])
    beta = jnp.array([1.0, 2.5, 3.0])
    y, s = train(jnp.asarray(x), gamma, beta)
    assert float(s.var[1]) == 0.0
    assert np.all(np.asarray(y)[:, 1] == 2.5)
    assert np.isfinite(np.asarray(y)).all()


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1.0, 1e6, 1e15])
@pytest.mark.parametrize("offset", [0.0, 1.0, -1e10])
def test_finite_input_never_gives_nan_or_inf(scale, offset, program):
    rs = np.random.RandomState(3)
    x = (offset + scale * rs.standard_cauchy((64, 5))).astype(np.float32)
    x[0, 0] = offset + scale * 1e3  # an outlier as the first value of a feature
    for kw in ({}, {"mask": jnp.asarray(rs.rand(64, 1) > 0.5)}):
        y, s = train(jnp.asarray(x), jnp.ones(5), jnp.zeros(5), **kw)
        assert np.isfinite(np.asarray(y)).all()
        assert np.isfinite(np.asarray(s.var)).all() and np.isfinite(np.asarray(s.mean)).all()


def test_outlier_first_value_still_accurate(program):
    # The shift is the batch's first value; the correction pass absorbs a bad one.
    x = np.random.RandomState(4).randn(1000, 3).astype(np.float32)
    x[0] = 1e4
    _, s = train(jnp.asarray(x))
    mean, var = np_stats(x)
    assert rel_err(s.var, var) < 1e-5
    assert np.max(np.abs(np.asarray(s.mean) - mean) / np.sqrt(var)) < 1e-5  # in units of std


def test_outlier_first_row_is_not_the_shift(program):
    rs = np.random.RandomState(4)
    x = (1e6 + rs.randn(2048, 4)).astype(np.float32)
    x[0] = 1e6 + 3e3  # a 3000-std outlier as the first value
    y, s = train(jnp.asarray(x))
    ref, var = y_ref(x)
    assert np.max(np.abs(np.asarray(s.var, np.float64) / var - 1)) < 1e-4
    assert np.max(np.abs(np.asarray(y, np.float64) - ref) / np.maximum(1, np.abs(ref))) < 1e-4


def test_values_whose_squares_overflow(program):
    rs = np.random.RandomState(5)
    x = (rs.randn(64, 2) * 1e19).astype(np.float32)
    y, s = train(jnp.asarray(x))
    ref, var = y_ref(x)
    assert np.all(np.isfinite(var)) and np.all(np.isfinite(np.asarray(s.var)))
    assert np.max(np.abs(np.asarray(s.var, np.float64) / var - 1)) < 1e-5
    assert np.max(np.abs(np.asarray(y, np.float64) - ref)) < 1e-5


def test_variance_beyond_float32_range_is_inf_and_output_is_beta(program):
    x = jnp.asarray([[3e38], [-3e38], [1e38], [-1e38]], jnp.float32)
    y, s = train(x, None, jnp.asarray([0.5]))
    assert abs(float(s.mean[0])) < 1e-6 * 3e38 and np.isposinf(float(s.var[0]))
    assert np.all(np.asarray(y) == 0.5)


def test_eps_at_the_normal_limit_gives_finite_output():
    x = jnp.asarray(np.random.RandomState(2).randn(16, 3) * 1e-15, jnp.float32)
    x = x.at[:, 1].set(0.25)  # and a constant feature
    y, s = batch_norm(x, None, None, jaxbn.init_state(3), training=True, eps=1.2e-38)
    assert np.isfinite(np.asarray(y)).all() and np.all(np.asarray(y)[:, 1] == 0)


def test_counts_are_exact_integers_beyond_float32():
    n = 2**24 + 1
    x = jnp.zeros((n, 1), jnp.float32)
    (_, _, _, count), _ = jax.jit(lambda x: jaxbn.batch_norm_fwd(x, None, None))(x)
    assert count.dtype == jnp.int32 and int(count) == n
    mask = jnp.ones((n, 1), bool)
    fwd_masked = jax.jit(lambda x, mask: jaxbn.batch_norm_fwd(x, None, None, mask=mask))
    (_, _, _, count), _ = fwd_masked(x, mask)
    assert count.dtype == jnp.int32 and int(count[0]) == n


def test_both_programs_agree_on_random_data(clean_program):
    x = randn((32, 5, 5, 8), seed=8, scale=2.0, offset=3.0)
    g, b = affine(8, seed=9)
    w = jnp.sin(x)
    st = jaxbn.init_state(8)
    f = lambda x, g, b: jnp.sum(jaxbn.batch_norm(x, g, b, st, training=True)[0] * w)  # noqa: E731
    cpu = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(x, g, b)
    with clean_program():
        clean = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(x, g, b)
    for a, c in zip(jax.tree.leaves(cpu), jax.tree.leaves(clean)):
        assert rel_err(a, c) < 1e-5


# --- dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_output_keeps_input_dtype_and_state_stays_float32(dtype):
    x = jnp.asarray(np.random.RandomState(9).randn(32, 4), dtype)
    for training in (True, False):
        y, s = batch_norm(
            x, jnp.ones(4, dtype), jnp.zeros(4, dtype), jaxbn.init_state(4), training=training
        )
        assert y.dtype == dtype
        assert s.mean.dtype == s.var.dtype == jnp.float32 and s.count.dtype == jnp.int32


def test_float64_input_keeps_float64_statistics():
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.RandomState(10).randn(32, 4) + 1e8)
        y, s = batch_norm(
            x, None, None, jaxbn.init_state(4, jnp.float64), training=True, momentum=0.0
        )
        mean, var = np_stats(np.asarray(x))
        assert y.dtype == s.var.dtype == jnp.float64
        assert rel_err(s.var, var) < 1e-10


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
