"""Bad input: one-sentence TypeError/ValueError before XLA, tested by message."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

X = jnp.ones((8, 4))
G, B, S = jnp.ones(4), jnp.zeros(4), jaxbn.init_state(4)


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
