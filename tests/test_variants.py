"""Running-statistic options, batch renormalization, ghost batches and frozen batch norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import bn_ref, np_stats, rel_err, vjp_jit

import jaxbn

# one compiled program per shape and options (run eagerly, each op compiles on its own)
STATIC = ("training", "momentum", "unbiased_running_var", "virtual_batch_size")
batch_norm = jax.jit(jaxbn.batch_norm, static_argnames=STATIC)


def problem(shape=(24, 5), seed=0, dtype=jnp.float64):
    rs = np.random.RandomState(seed)
    c = shape[-1]
    x = jnp.asarray(rs.randn(*shape) * 2 + 1, dtype)
    return (
        x,
        jnp.asarray(rs.rand(c) + 0.5, dtype),
        jnp.asarray(rs.randn(c), dtype),
        jnp.asarray(rs.randn(*shape), dtype),
    )


def test_unbiased_running_var_stores_n_over_n_minus_one():
    x, _, _, _ = problem(dtype=jnp.float32)
    _, s = batch_norm(
        x, None, None, jaxbn.init_state(5), training=True, momentum=0.7, unbiased_running_var=True
    )
    x64 = np.asarray(x, np.float64)
    assert rel_err(s.var, 0.7 + 0.3 * x64.var(0, ddof=1)) < 1e-6
    assert rel_err(s.mean, 0.3 * x64.mean(0)) < 1e-6


def test_unbiased_running_var_with_mask_uses_each_features_count():
    x, _, _, _ = problem(dtype=jnp.float32)
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


# --- batch renormalization: a float64 reference of Ioffe (2017), Algorithm 1 ---------------


def renorm_ref(x, gamma, beta, run_mean, run_var, rmax, dmax, eps=1e-5):
    row = lambda v: v[None, :]  # noqa: E731
    mu = jnp.mean(x, 0, keepdims=True)
    sigma = jnp.sqrt(jnp.mean((x - mu) ** 2, 0, keepdims=True) + eps)
    run_sigma = row(jnp.sqrt(run_var + eps))
    r = jax.lax.stop_gradient(jnp.clip(sigma / run_sigma, 1 / rmax, rmax))
    d = jax.lax.stop_gradient(jnp.clip((mu - row(run_mean)) / run_sigma, -dmax, dmax))
    return row(gamma) * ((x - mu) / sigma * r + d) + row(beta)


@pytest.mark.parametrize("custom", [True, False])
@pytest.mark.parametrize("limits", [(1.5, 0.5), (100.0, 100.0), (1.0, 0.0)])
def test_renorm_matches_the_paper(custom, limits):
    with jax.enable_x64(True):
        x, gamma, beta, ct = problem()
        state = jaxbn.BatchNormState(
            jnp.asarray(np.linspace(-1, 3, 5)),
            jnp.asarray(np.linspace(0.3, 9, 5)),
            jnp.asarray(0, jnp.int32),
        )
        f = lambda x, g, b: jaxbn.batch_norm(  # noqa: E731
            x, g, b, state, training=True, renorm=limits, custom_vjp=custom
        )[0]
        ref = lambda x, g, b: renorm_ref(x, g, b, state.mean, state.var, *limits)  # noqa: E731
        y, grads = vjp_jit(f, (x, gamma, beta), ct)
        y_ref, grads_ref = vjp_jit(ref, (x, gamma, beta), ct)
        assert rel_err(y, y_ref) < 1e-10
        for a, b in zip(grads, grads_ref):
            assert rel_err(a, b) < 1e-10
        if limits == (1.0, 0.0):  # r = 1, d = 0: plain batch norm
            assert rel_err(y, jax.jit(bn_ref)(x, gamma, beta)[0]) < 1e-10


def test_renorm_limits_can_be_traced_for_a_schedule():
    x, gamma, beta, _ = problem(dtype=jnp.float32)
    f = jax.jit(
        lambda rmax, dmax: jaxbn.batch_norm(
            x, gamma, beta, jaxbn.init_state(5), training=True, renorm=(rmax, dmax)
        )[0]
    )
    y_static = jaxbn.batch_norm(
        x, gamma, beta, jaxbn.init_state(5), training=True, renorm=(2.0, 1.0)
    )[0]
    assert rel_err(f(2.0, 1.0), y_static) < 1e-6


def test_renorm_only_in_training_and_state_updates_as_usual():
    x, gamma, beta, _ = problem(dtype=jnp.float32)
    s = jaxbn.init_state(5)
    y_e, _ = jaxbn.batch_norm(x, gamma, beta, s, training=False, renorm=(3.0, 5.0))
    assert rel_err(y_e, jaxbn.batch_norm(x, gamma, beta, s, training=False)[0]) == 0
    _, s_r = jaxbn.batch_norm(x, gamma, beta, s, training=True, renorm=(3.0, 5.0))
    _, s_p = jaxbn.batch_norm(x, gamma, beta, s, training=True)
    assert rel_err(s_r.var, s_p.var) == 0 and rel_err(s_r.mean, s_p.mean) == 0


# --- ghost batch norm ------------------------------------------------------------------


def ghost_ref(x, gamma, beta, size):
    groups = [bn_ref(x[i : i + size], gamma, beta) for i in range(0, x.shape[0], size)]
    y = jnp.concatenate([g[0] for g in groups])
    return (
        y,
        jnp.mean(jnp.stack([g[1] for g in groups]), 0),
        jnp.mean(jnp.stack([g[2] for g in groups]), 0),
    )


@pytest.mark.parametrize("custom,shape", [(True, (24, 5)), (True, (12, 3, 3, 5)), (False, (24, 5))])
def test_ghost_batches_match_a_per_group_reference(custom, shape, program):
    with jax.enable_x64(True):
        x, gamma, beta, ct = problem(shape)
        state = jaxbn.init_state(5, jnp.float64)
        f = lambda x, g, b: jaxbn.batch_norm(
            x, g, b, state, training=True, virtual_batch_size=4, momentum=0.0, custom_vjp=custom
        )  # noqa: E731
        zeros = jnp.zeros(5, jnp.float64)
        cts = (ct, jaxbn.BatchNormState(zeros, zeros, np.zeros((), jax.dtypes.float0)))
        (y, new), got = vjp_jit(f, (x, gamma, beta), cts)
        (y_ref, mean_ref, var_ref), want = vjp_jit(
            lambda x, g, b: ghost_ref(x, g, b, 4), (x, gamma, beta), (ct, zeros, zeros)
        )
        assert rel_err(y, y_ref) < 1e-10
        assert rel_err(new.mean, mean_ref) < 1e-10 and rel_err(new.var, var_ref) < 1e-10
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-10


def test_ghost_batches_do_not_apply_at_inference():
    # tf-keras applied virtual batches at inference too (its issue 15790)
    x, gamma, beta, _ = problem(dtype=jnp.float32)
    s = jaxbn.init_state(5)._replace(mean=jnp.full(5, 0.5), var=jnp.full(5, 2.0))
    y_g, _ = batch_norm(x, gamma, beta, s, training=False, virtual_batch_size=4)
    y, _ = batch_norm(x, gamma, beta, s, training=False)
    assert rel_err(y_g, y) == 0


def test_ghost_with_a_mask_skips_empty_groups(program):
    x, _, _, _ = problem(dtype=jnp.float32)
    mask = np.ones((24, 1), bool)
    mask[:8] = False  # the first two ghost batches of 4 see nothing
    _, s = batch_norm(
        x,
        None,
        None,
        jaxbn.init_state(5),
        training=True,
        momentum=0.0,
        virtual_batch_size=4,
        mask=jnp.asarray(mask),
    )
    x64 = np.asarray(x, np.float64)
    groups = [np_stats(x64[i : i + 4]) for i in range(8, 24, 4)]
    assert rel_err(s.mean, np.mean([m for m, _ in groups], 0)) < 1e-6
    assert rel_err(s.var, np.mean([v for _, v in groups], 0)) < 1e-6


# --- frozen batch norm -----------------------------------------------------------------


def frozen_problem():
    x, gamma, beta, ct = problem((16, 4, 4, 5), dtype=jnp.float32)
    rs = np.random.RandomState(3)
    state = jaxbn.BatchNormState(
        jnp.asarray(rs.randn(5), jnp.float32),
        jnp.asarray(rs.rand(5) + 0.5, jnp.float32),
        jnp.asarray(9, jnp.int32),
    )
    return x, gamma, beta, ct, state


def test_frozen_equals_eval_mode_and_gradients():
    x, gamma, beta, ct, state = frozen_problem()
    y_eval, grads_eval = vjp_jit(
        lambda x, g, b: jaxbn.batch_norm(x, g, b, state, training=False)[0], (x, gamma, beta), ct
    )
    y, grads = vjp_jit(
        lambda x, g, b: jaxbn.frozen_batch_norm(x, g, b, state, trainable=True),
        (x, gamma, beta),
        ct,
    )
    assert rel_err(y, y_eval) == 0
    for a, b in zip(grads, grads_eval):
        assert rel_err(a, b) < 1e-6
    frozen = lambda x, g, b: jaxbn.frozen_batch_norm(x, g, b, state)  # noqa: E731
    _, (dx, dg, db) = vjp_jit(frozen, (x, gamma, beta), ct)
    assert rel_err(dx, grads_eval[0]) < 1e-6
    assert not np.any(np.asarray(dg)) and not np.any(np.asarray(db))


def test_frozen_state_gets_no_gradient():
    x, gamma, beta, ct, state = frozen_problem()
    f = lambda m, v: jnp.sum(
        jaxbn.frozen_batch_norm(x, gamma, beta, state._replace(mean=m, var=v)) * ct
    )  # noqa: E731
    dm, dv = jax.jit(jax.grad(f, (0, 1)))(state.mean, state.var)
    assert not np.any(np.asarray(dm)) and not np.any(np.asarray(dv))


def test_frozen_backward_keeps_no_input_sized_residual():
    x, gamma, beta, _, state = frozen_problem()

    def full_size_residuals(f):
        _, vjp = jax.vjp(f, x)
        return [
            leaf for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "size") and leaf.size == x.size
        ]

    assert full_size_residuals(lambda x: jaxbn.frozen_batch_norm(x, gamma, beta, state)) == []
    trainable = lambda x, g, b: jaxbn.frozen_batch_norm(x, g, b, state, trainable=True)  # noqa: E731
    _, vjp = jax.vjp(trainable, x, gamma, beta)  # dgamma needs x: one input-sized residual
    assert [leaf.size for leaf in jax.tree.leaves(vjp) if getattr(leaf, "size", 0) == x.size]


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (
            {"renorm": (0.5, 1.0)},
            ValueError,
            r"renorm rmax must be a finite number >= 1, got 0.5 \(r is clipped to \[1/rmax, rmax\]\)",
        ),
        (
            {"renorm": (2.0, -1.0)},
            ValueError,
            r"renorm dmax must be a finite number >= 0, got -1.0",
        ),
        ({"renorm": 3.0}, TypeError, r"renorm must be None or a pair \(rmax, dmax\), got 3.0"),
        (
            {"renorm": (jnp.ones(2), 1.0)},
            TypeError,
            r"renorm rmax must be a scalar, got shape \(2,\)",
        ),
        (
            {"virtual_batch_size": 5},
            ValueError,
            r"virtual_batch_size 5 does not divide the batch size 24",
        ),
        (
            {"virtual_batch_size": 0},
            ValueError,
            r"virtual_batch_size must be a positive int or None, got 0",
        ),
        (
            {
                "virtual_batch_size": 4,
                "axis": 0,
                "gamma": None,
                "beta": None,
                "state": jaxbn.init_state(24),
            },
            ValueError,
            r"axis 0 is a feature axis",
        ),
        (
            {"virtual_batch_size": 4, "axis_name": "i"},
            ValueError,
            r"virtual_batch_size cannot be combined with axis_name",
        ),
        (
            {"virtual_batch_size": 1},
            ValueError,
            r"training=True needs more than one value per feature",
        ),
    ],
)
def test_option_errors(kwargs, exc, match):
    x, gamma, beta, _ = problem(dtype=jnp.float32)
    args = {"gamma": gamma, "beta": beta, "state": jaxbn.init_state(5)}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        jaxbn.batch_norm(
            x, args.pop("gamma"), args.pop("beta"), args.pop("state"), training=True, **args
        )
