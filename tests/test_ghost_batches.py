"""Ghost batch norm (virtual_batch_size=): each group of the batch normalized with its
own statistics, against a per-group plain-jnp reference; training only; with masks; and
through the Flax modules, against Flax's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_parity import INITS, LINEN, NNX, assert_same, nnx
from flax_parity import randn as jrandn
from reference import bn_ref, np_stats, problem, rel_err, vjp_jit

import jaxbn
import jaxbn.linen
import jaxbn.nnx

# one compiled program per shape and options (run eagerly, each op compiles on its own)
STATIC = ("training", "momentum", "unbiased_running_var", "virtual_batch_size")
batch_norm = jax.jit(jaxbn.batch_norm, static_argnames=STATIC)


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
        x, gamma, beta, ct = problem(shape, dtype=jnp.float64)
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
    x, gamma, beta, _ = problem((24, 5))
    s = jaxbn.init_state(5)._replace(mean=jnp.full(5, 0.5), var=jnp.full(5, 2.0))
    y_g, _ = batch_norm(x, gamma, beta, s, training=False, virtual_batch_size=4)
    y, _ = batch_norm(x, gamma, beta, s, training=False)
    assert rel_err(y_g, y) == 0
    # nor their check: 2 does not divide 5, which only training refuses (test_errors.py)
    x = jnp.asarray(np.random.RandomState(4).randn(5, 3), jnp.float32)
    st = jaxbn.init_state(3)
    y, _ = jaxbn.batch_norm(x, None, None, st, training=False, virtual_batch_size=2)
    ref, _ = jaxbn.batch_norm(x, None, None, st, training=False)
    np.testing.assert_array_equal(y, ref)


def test_ghost_with_a_mask_skips_empty_groups(program):
    x, _, _, _ = problem((24, 5))
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


# --- through the Flax modules ----------------------------------------------------------


def test_linen_virtual_batch_size_leaves_one_example_init_and_eval_as_flax():
    one, partial = jrandn(0, (1, 3)), jrandn(1, (6, 3), 2.0, 1.0)
    stats = {"mean": jrandn(2, (3,)), "var": 1 + jrandn(3, (3,)) ** 2}

    def run(cls):
        bn = cls(**INITS)
        y0, variables = bn.init_with_output(jax.random.key(0), one, use_running_average=False)
        y = bn.apply({**variables, "batch_stats": stats}, partial, use_running_average=True)
        return y0, variables, y

    ours = run(functools.partial(jaxbn.linen.BatchNorm, virtual_batch_size=4))
    assert_same(ours, run(LINEN["flax"]))


def test_nnx_virtual_batch_size_leaves_eval_as_flax():
    partial = jrandn(1, (6, 3), 2.0, 1.0)

    def run(cls):
        bn = cls(3, **INITS, rngs=nnx.Rngs(0))
        bn.mean[...], bn.var[...] = jrandn(2, (3,)), 1 + jrandn(3, (3,)) ** 2
        bn.eval()
        return bn(partial)

    ours = run(functools.partial(jaxbn.nnx.BatchNorm, virtual_batch_size=4))
    assert_same(ours, run(NNX["flax"]))
