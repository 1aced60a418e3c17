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


def test_fold_under_jit():
    gamma, beta, state = stats(6)
    kernel = jnp.asarray(np.random.RandomState(6).randn(4, 6), jnp.float32)
    eager = jaxbn.fold_batch_norm(kernel, None, gamma, beta, state)
    jitted = jax.jit(lambda k, s: jaxbn.fold_batch_norm(k, None, gamma, beta, s))(kernel, state)
    for a, b in zip(eager, jitted):
        assert rel_err(a, b) < 1e-6


class TwoBlocks(nn.Module):
    """Conv -> BN twice; ``fold_first`` replaces the first pair by one conv with bias."""

    fold_first: bool = False
    affine: bool = True

    @nn.compact
    def __call__(self, x):
        bn = lambda name: nn.BatchNorm(  # noqa: E731
            use_running_average=True, use_scale=self.affine, use_bias=self.affine, name=name
        )
        x = nn.Conv(5, (3, 3), use_bias=self.fold_first, name="conv_a")(x)
        if not self.fold_first:
            x = bn("bn_a")(x)
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv_b")(nn.relu(x))
        return bn("bn_b")(x)


def random_variables(model, x, seed):
    variables = model.init(jax.random.key(0), x)
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda v: v + jnp.asarray(rs.rand(*v.shape), v.dtype), variables)


def test_fold_linen_keeps_the_batch_stats_of_unfolded_batch_norms():
    x = jnp.asarray(np.random.RandomState(7).randn(2, 8, 8, 3), jnp.float32)
    variables = random_variables(TwoBlocks(), x, seed=8)
    folded = jaxbn.fold_linen(variables, [("conv_a", "bn_a")])
    assert list(folded["batch_stats"]) == ["bn_b"]
    y = TwoBlocks(fold_first=True).apply(folded, x)
    assert rel_err(y, TwoBlocks().apply(variables, x)) < 1e-5


def test_fold_linen_keeps_other_collections_and_leaves_the_input_unchanged():
    variables = {
        "params": {"Dense_0": {"kernel": jnp.ones((3, 2))}, "BatchNorm_0": {"scale": jnp.ones(2)}},
        "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(2), "var": jnp.ones(2)}},
        "cache": {"step": jnp.array(3)},
    }
    folded = jaxbn.fold_linen(variables, [("Dense_0", "BatchNorm_0")])
    assert sorted(folded) == ["cache", "params"] and int(folded["cache"]["step"]) == 3
    assert sorted(variables["params"]) == ["BatchNorm_0", "Dense_0"]
    assert "bias" not in variables["params"]["Dense_0"] and variables["batch_stats"]


def test_fold_linen_folds_a_batch_norm_without_scale_or_bias():
    x = jnp.asarray(np.random.RandomState(9).randn(2, 8, 8, 3), jnp.float32)
    variables = random_variables(TwoBlocks(affine=False), x, seed=10)
    assert "bn_a" not in variables["params"]
    folded = jaxbn.fold_linen(variables, [("conv_a", "bn_a")])
    y = TwoBlocks(fold_first=True, affine=False).apply(folded, x)
    assert rel_err(y, TwoBlocks(affine=False).apply(variables, x)) < 1e-5


def test_fold_batch_norm_takes_flax_batch_stats_dict():
    x = jnp.asarray(np.random.RandomState(11).randn(2, 8, 8, 3), jnp.float32)
    variables = random_variables(TwoBlocks(), x, seed=12)
    params, stats = variables["params"], variables["batch_stats"]
    kernel, bias = jaxbn.fold_batch_norm(
        params["conv_a"]["kernel"],
        None,
        params["bn_a"]["scale"],
        params["bn_a"]["bias"],
        stats["bn_a"],
    )
    folded = {
        "params": {**params, "conv_a": {"kernel": kernel, "bias": bias}},
        "batch_stats": stats,
    }
    y = TwoBlocks(fold_first=True).apply(folded, x)
    assert rel_err(y, TwoBlocks().apply(variables, x)) < 1e-5


class Block(nn.Module):
    fold: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, use_bias=self.fold)(x)
        return x if self.fold else nn.BatchNorm(use_running_average=True)(x)


class Nested(nn.Module):
    fold_first: bool = False

    @nn.compact
    def __call__(self, x):
        return Block(name="b1")(Block(self.fold_first, name="b0")(x))


def test_fold_linen_nested_paths_keep_the_other_blocks_stats():
    x = jnp.asarray(np.random.RandomState(13).randn(5, 3), jnp.float32)
    variables = random_variables(Nested(), x, seed=14)
    folded = jaxbn.fold_linen(variables, [(("b0", "Dense_0"), ("b0", "BatchNorm_0"))])
    assert list(folded["batch_stats"]) == ["b1"]
    assert rel_err(Nested(fold_first=True).apply(folded, x), Nested().apply(variables, x)) < 1e-5
