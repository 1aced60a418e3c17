"""Folding eval-mode batch norm into the preceding Dense/Conv, checked against the unfolded pair."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import rel_err

import jaxbn


def stats(c, seed=0):
    rs = np.random.RandomState(seed)
    return (
        jnp.asarray(rs.rand(c) + 0.5, jnp.float32),
        jnp.asarray(rs.randn(c), jnp.float32),
        jaxbn.BatchNormState(
            jnp.asarray(rs.randn(c) * 2, jnp.float32),
            jnp.asarray(rs.rand(c) * 3 + 0.1, jnp.float32),
            jnp.asarray(5, jnp.int32),
        ),
    )


LAYERS = [
    ("dense", lambda: nn.Dense(6), (8, 5)),
    ("dense_nobias", lambda: nn.Dense(6, use_bias=False), (8, 5)),
    ("conv_strided", lambda: nn.Conv(6, (3, 3), strides=(2, 2)), (2, 9, 9, 4)),
    ("conv_grouped", lambda: nn.Conv(6, (3, 3), feature_group_count=2), (2, 7, 7, 4)),
    ("conv1d", lambda: nn.Conv(6, (3,), padding="VALID"), (2, 11, 4)),
]


@pytest.mark.parametrize("name,make,shape", LAYERS)
def test_folded_layer_equals_layer_then_eval_batch_norm(name, make, shape):
    layer = make()
    x = jnp.asarray(np.random.RandomState(1).randn(*shape), jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    gamma, beta, state = stats(6)
    y_ref, _ = jaxbn.batch_norm(
        layer.apply({"params": params}, x), gamma, beta, state, training=False
    )
    kernel, bias = jaxbn.fold_batch_norm(params["kernel"], params.get("bias"), gamma, beta, state)
    folded = make().clone(use_bias=True)
    y = folded.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    assert rel_err(y, y_ref) < 1e-5


class ConvBN(nn.Module):
    fold: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), use_bias=self.fold)(x)
        if not self.fold:
            x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.relu(x)
        x = nn.Dense(4, name="head")(x.mean((1, 2)))
        if not self.fold:
            x = nn.BatchNorm(use_running_average=True, name="head_bn")(x)
        return x


def test_fold_linen_tree_against_flax_batchnorm():
    x = jnp.asarray(np.random.RandomState(2).randn(3, 8, 8, 3), jnp.float32)
    variables = ConvBN().init(jax.random.key(0), x)
    rs = np.random.RandomState(3)
    variables = jax.tree.map(lambda v: v + jnp.asarray(rs.rand(*v.shape), v.dtype), variables)
    folded = jaxbn.fold_linen(variables, [("Conv_0", "BatchNorm_0"), ("head", "head_bn")])
    assert "BatchNorm_0" not in folded["params"] and "batch_stats" not in folded
    assert rel_err(ConvBN(fold=True).apply(folded, x), ConvBN().apply(variables, x)) < 1e-5


def test_fold_nnx():
    rngs = nnx.Rngs(0)
    conv, bn = (
        nnx.Conv(3, 6, (3, 3), strides=2, use_bias=False, rngs=rngs),
        nnx.BatchNorm(6, rngs=rngs),
    )
    gamma, beta, state = stats(6, seed=4)
    bn.scale[...], bn.bias[...], bn.mean[...], bn.var[...] = gamma, beta, state.mean, state.var
    bn.eval()
    x = jnp.asarray(np.random.RandomState(5).randn(2, 9, 9, 3), jnp.float32)
    folded = jaxbn.fold_nnx(conv, bn)
    assert conv.bias is None  # the original is unchanged
    assert rel_err(folded(x), bn(conv(x))) < 1e-5


def test_kernel_that_does_not_match_the_statistics_is_refused():
    gamma, beta, state = stats(6)
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
        ValueError, match=r"BatchNorm_7 is not in the variables' 'params' collection"
    ):
        jaxbn.fold_linen(variables, [("Conv_0", "BatchNorm_7")])


def test_fold_under_jit():
    gamma, beta, state = stats(6)
    kernel = jnp.asarray(np.random.RandomState(6).randn(4, 6), jnp.float32)
    eager = jaxbn.fold_batch_norm(kernel, None, gamma, beta, state)
    jitted = jax.jit(lambda k, s: jaxbn.fold_batch_norm(k, None, gamma, beta, s))(kernel, state)
    for a, b in zip(eager, jitted):
        assert rel_err(a, b) < 1e-6
