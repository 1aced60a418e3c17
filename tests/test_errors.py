"""Bad input: one-sentence TypeError/ValueError before XLA, tested by message.

For jaxbn.batch_norm and batch_norm_act (arguments, state, options, named axes),
batch_norm_bwd, init_state, population_stats, the folding functions, from_torch, and
the Flax modules' activation options. (The Equinox layer's and the Flax modules' own
argument checks are in test_equinox.py, test_linen.py and test_nnx.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from reference import affine, randn

import jaxbn
import jaxbn.linen
import jaxbn.nnx

X = jnp.ones((8, 4))
G, B, S = jnp.ones(4), jnp.zeros(4), jaxbn.init_state(4)
ST3 = jaxbn.init_state(3)


def bn(x=X, gamma=G, beta=B, state=S, **kw):
    kw.setdefault("training", True)
    return jaxbn.batch_norm(x, gamma, beta, state, **kw)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (
            {"x": jnp.ones((8, 4), jnp.int32)},
            TypeError,
            r"x must be a floating-point or complex array, got dtype int32",
        ),
        (
            {"gamma": jnp.ones(3)},
            ValueError,
            r"gamma has shape \(3,\), but x has feature shape \(4,\)",
        ),
        (
            {"beta": jnp.ones((4, 1))},
            ValueError,
            r"beta has shape \(4, 1\), but x has feature shape \(4,\)",
        ),
        (
            {"gamma": jnp.ones(4, jnp.int32)},
            TypeError,
            r"gamma must be a floating-point array or None, got dtype int32",
        ),
        (
            {"state": jaxbn.init_state(5)},
            ValueError,
            r"state.mean has shape \(5,\), but x has feature shape \(4,\).*init_state\(4\)",
        ),
        (
            {"state": (jnp.zeros(4), jnp.ones(4))},
            TypeError,
            r"state must be a jaxbn.BatchNormState",
        ),
        (
            {"state": S._replace(var=S.var.astype(jnp.float16))},
            TypeError,
            r"state.var has dtype float16 but state.mean has dtype float32",
        ),
        (
            {"state": S._replace(mean=S.mean.astype(jnp.float16), var=S.var.astype(jnp.float16))},
            TypeError,
            r"state.mean dtype must be float32 or float64",
        ),
        (
            {"state": S._replace(count=jnp.zeros(2, jnp.int32))},
            TypeError,
            r"state.count must be an integer scalar",
        ),
        (
            {"axis": 2},
            ValueError,
            r"axis 2 is out of range for x with 2 dimensions; expected a value in \[-2, 2\)",
        ),
        ({"axis": (1, -1)}, ValueError, r"axis must not repeat a dimension, got \(1, -1\)"),
        ({"axis": 1.0}, TypeError, r"axis must be an int or a tuple of ints, got 1.0"),
        ({"eps": 0.0}, ValueError, r"eps must be a finite number > 0, got 0.0"),
        ({"eps": float("nan")}, ValueError, r"eps must be a finite number > 0, got nan"),
        (
            {"eps": jnp.float32(1e-5)},
            TypeError,
            r"eps must be a Python number \(it is static configuration\), got Array",
        ),
        ({"momentum": "0.9"}, TypeError, r"momentum must be a Python number.*got str"),
        ({"momentum": 1.5}, ValueError, r"momentum must be a number in \[0, 1\].*got 1.5"),
        ({"momentum": -0.1}, ValueError, r"momentum must be a number in \[0, 1\].*got -0.1"),
        (
            {"training": "train"},
            TypeError,
            r"training must be a Python bool.*got 'train' of type str",
        ),
        ({"training": None}, TypeError, r"training must be a Python bool.*got None"),
        (
            {"x": jnp.ones((1, 4))},
            ValueError,
            r"training=True needs more than one value per feature.*x of shape \(1, 4\) has 1",
        ),
        (
            {"mask": jnp.ones((8, 3), bool)},
            ValueError,
            r"mask has shape \(8, 3\), which does not broadcast to x's shape \(8, 4\)",
        ),
        (
            {"mask": jnp.ones((2, 8, 4), bool)},
            ValueError,
            r"mask has shape \(2, 8, 4\), which does not broadcast",
        ),
        ({"mask": jnp.ones((8, 4))}, TypeError, r"mask must be a boolean array, got dtype float32"),
        (
            {"axis_index_groups": [[0, 1]]},
            ValueError,
            r"axis_index_groups was given without axis_name",
        ),
        (
            {"axis_name": ["i"]},
            TypeError,
            r"axis_name must be None, a name or a tuple of names .* got \['i'\] of type list",
        ),
    ],
)
def test_bad_argument_messages(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bn(**kwargs)


def test_missing_training_flag_is_an_error():
    with pytest.raises(TypeError, match="training"):
        jaxbn.batch_norm(X, G, B, S)


def test_eval_mode_accepts_a_batch_of_one():
    y, s = bn(x=jnp.ones((1, 4)), training=False)
    assert y.shape == (1, 4) and s is S


@pytest.mark.parametrize(
    "num_features,dtype,exc,match",
    [
        (4.0, jnp.float32, TypeError, r"num_features must be an int or a tuple of ints, got 4.0"),
        ((3, 0), jnp.float32, ValueError, r"num_features must be positive, got \(3, 0\)"),
        (
            4,
            jnp.bfloat16,
            TypeError,
            r"dtype must be float32 or float64.*got <class 'jax.numpy.bfloat16'>|dtype must be float32 or float64.*bfloat16",
        ),
        (4, jnp.int32, TypeError, r"dtype must be float32 or float64"),
    ],
)
def test_init_state_messages(num_features, dtype, exc, match):
    with pytest.raises(exc, match=match):
        jaxbn.init_state(num_features, dtype)


def test_errors_do_not_touch_the_state():
    before = [np.asarray(v).copy() for v in S]
    with pytest.raises(ValueError):
        bn(gamma=jnp.ones(3))
    for a, b in zip(before, S):
        assert np.array_equal(a, np.asarray(b))


# --- batch_norm_act ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"activation": "gelu"}, "activation must be one of"),
        ({"activation": "leaky_relu", "negative_slope": 0.0}, "must be a finite number > 0"),
        ({"residual": jnp.zeros((16, 5))}, "residual has shape"),
    ],
)
def test_batch_norm_act_option_errors(kw, match):
    x, (gamma, beta) = randn((16, 6), scale=3.0, offset=2.0), affine(6)
    with pytest.raises((TypeError, ValueError), match=match):
        jaxbn.batch_norm_act(x, gamma, beta, jaxbn.init_state(6), training=True, **kw)


@pytest.mark.parametrize("act, residual", [("relu", False), ("relu", True)])
def test_inplace_needs_an_invertible_activation(act, residual):
    x = jnp.ones((4, 3))
    r = jnp.ones((4, 3)) if residual else None
    with pytest.raises(ValueError, match="inplace=True recovers the input from the output"):
        jaxbn.batch_norm_act(
            x,
            None,
            None,
            jaxbn.init_state(3),
            training=True,
            activation=act,
            residual=r,
            inplace=True,
        )


def test_activation_errors():
    x = jnp.ones((8, 3))
    bn = jaxbn.linen.BatchNorm(use_running_average=False, activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        bn.init(jax.random.key(0), x)
    bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), activation="relu")
    with pytest.raises(ValueError, match="residual has shape"):
        bn(x, residual=jnp.ones((8, 1)))


# --- options: eps, renorm, ghost batches ----------------------------------------------


@pytest.mark.parametrize("eps", [1e-45, 1e-39])
def test_eps_below_the_normal_range_is_refused(eps):
    with pytest.raises(ValueError, match="eps must be at least 1.18e-38"):
        jaxbn.batch_norm(jnp.ones((4, 3)), None, None, ST3, training=True, eps=eps)


@pytest.mark.parametrize("size", [None, 2])
def test_an_empty_batch_is_refused(size):
    with pytest.raises(ValueError, match=r"has no values along the reduced axes \(0,\)"):
        jaxbn.batch_norm(jnp.zeros((0, 3)), None, None, ST3, training=True, virtual_batch_size=size)
    with pytest.raises(ValueError, match="has no values along the reduced axes"):
        jaxbn.batch_norm_fwd(jnp.zeros((0, 3)), None, None)


@pytest.mark.parametrize("limits", [("2", 1.0), (2.0, b"1"), (2.0, True)])
def test_renorm_limits_must_be_numbers(limits):
    with pytest.raises(TypeError, match="renorm (rmax|dmax) must be a number or a scalar array"):
        jaxbn.batch_norm(jnp.ones((4, 3)), None, None, ST3, training=True, renorm=limits)


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
def test_renorm_and_ghost_option_errors(kwargs, exc, match):
    x, (gamma, beta) = randn((24, 5), scale=2.0, offset=1.0), affine(5)
    args = {"gamma": gamma, "beta": beta, "state": jaxbn.init_state(5)}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        jaxbn.batch_norm(
            x, args.pop("gamma"), args.pop("beta"), args.pop("state"), training=True, **args
        )


# --- named axes ---------------------------------------------------------------------


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


# --- batch_norm_bwd ---------------------------------------------------------------------


def test_bwd_checks_its_axis_and_cotangent_shapes():
    (_, _, _, _), res = jax.jit(jaxbn.batch_norm_fwd)(jnp.ones((4, 3, 2)), None, None)
    with pytest.raises(ValueError, match=r"residuals hold statistics of shape \(2,\), but axis"):
        jaxbn.batch_norm_bwd(res, jnp.ones((4, 3, 2)), axis=1)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 3\), expected x's shape \(4, 3, 2\)"):
        jaxbn.batch_norm_bwd(res, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"dmean has shape \(3,\), expected \(2,\)"):
        jaxbn.batch_norm_bwd(res, jnp.ones((4, 3, 2)), jnp.ones(3))


# --- population_stats, folding, torch ------------------------------------------------


def test_population_stats_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="no values to count for batch 0"):
        jaxbn.population_stats(lambda b: b, [jnp.zeros((0, 3))])


def test_population_stats_errors():
    with pytest.raises(ValueError, match="batches is empty; expected at least one batch"):
        jaxbn.population_stats(lambda b: b, [])
    with pytest.raises(
        ValueError, match="fn returned a different structure or feature shape for batch 1"
    ):
        jaxbn.population_stats(lambda b: b, [np.ones((2, 3)), np.ones((2, 4))])


def test_kernel_that_does_not_match_the_statistics_is_refused():
    (gamma, beta), state = affine(6), jaxbn.init_state(6)
    with pytest.raises(
        ValueError,
        match=r"kernel has 5 output features \(its last axis, shape \(3, 3, 6, 5\)\), but the batch norm statistics have shape \(6,\)",
    ):
        jaxbn.fold_batch_norm(jnp.ones((3, 3, 6, 5)), None, gamma, beta, state)
    with pytest.raises(ValueError, match=r"bias has shape \(5,\), but x has feature shape \(6,\)"):
        jaxbn.fold_batch_norm(jnp.ones((4, 6)), jnp.ones(5), gamma, beta, state)


def test_fold_linen_names_a_missing_layer():
    variables = {"params": {"Conv_0": {"kernel": jnp.ones((3, 3, 2, 4))}}, "batch_stats": {}}
    with pytest.raises(
        ValueError,
        match=r"pairs names BatchNorm_7 as a BatchNorm with running statistics, but it is not in the variables' 'batch_stats' collection",
    ):
        jaxbn.fold_linen(variables, [("Conv_0", "BatchNorm_7")])
    with pytest.raises(
        ValueError,
        match=r"pairs names block/Conv_1 as a Dense or Conv layer, but it is not in the variables' 'params' collection",
    ):
        jaxbn.fold_linen(variables, [(("block", "Conv_1"), "BatchNorm_7")])


@pytest.mark.parametrize(
    "state,match",
    [
        ({"mean": jnp.zeros(2)}, r"state is a dict with keys \['mean'\]; expected"),
        ((jnp.zeros(2), jnp.ones(2)), r"state must be a jaxbn.BatchNormState or a dict"),
    ],
)
def test_fold_batch_norm_names_a_state_it_cannot_read(state, match):
    with pytest.raises(TypeError, match=match):
        jaxbn.fold_batch_norm(jnp.ones((3, 2)), None, None, None, state)


def test_missing_running_stats_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match=r"state_dict has no 'bn.running_var'; expected a BatchNorm state dict with track_running_stats=True",
    ):
        jaxbn.from_torch({"bn.running_mean": np.zeros(3)}, prefix="bn.")


def test_renorm_needs_real_x_in_training_only():
    # r and d are clipped, which complex numbers cannot be; evaluation ignores renorm
    x = jnp.asarray(randn((8, 3), seed=4), jnp.complex64) * (1 + 2j)
    state = jaxbn.init_state(3)
    with pytest.raises(
        TypeError, match=r"renorm needs real x \(r and d are clipped\), got dtype complex64"
    ):
        jaxbn.batch_norm(x, None, None, state, training=True, renorm=(3.0, 5.0))
    y, _ = jaxbn.batch_norm(x, None, None, state, training=False, renorm=(3.0, 5.0))
    want, _ = jaxbn.batch_norm(x, None, None, state, training=False)
    np.testing.assert_array_equal(y, want)
