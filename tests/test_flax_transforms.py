"""The Flax modules under Flax and JAX transforms, against Flax's BatchNorm or one device.

Each case runs the same model with jaxbn's module and with
``flax.linen.BatchNorm(use_fast_variance=False)`` (or nnx's), from the same
variables, and compares outputs, gradients and updated statistics.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from reference import rel_err

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

import jaxbn.linen  # noqa: E402
import jaxbn.nnx  # noqa: E402

TOL = 1e-5
LINEN = {
    "jaxbn": jaxbn.linen.BatchNorm,
    "flax": functools.partial(nn.BatchNorm, use_fast_variance=False),
}
NNX = {
    "jaxbn": jaxbn.nnx.BatchNorm,
    "flax": functools.partial(nnx.BatchNorm, use_fast_variance=False),
}


def data(shape, seed=0):
    rs = np.random.RandomState(seed)
    return (
        jnp.asarray(rs.randn(*shape) * 2 + 1, jnp.float32),
        jnp.asarray(rs.randn(*shape[:-1], 6), jnp.float32),
    )


def assert_trees_close(a, b, tol=TOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert u.dtype == v.dtype and u.shape == v.shape, path
        assert rel_err(u, v) <= tol, (path, rel_err(u, v))


class Block(nn.Module):
    """Dense - BatchNorm - relu, in training mode."""

    bn: Any
    bn_args: tuple = ()

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.Dense(6, use_bias=False)(x)
        return nn.relu(
            self.bn(use_running_average=False, momentum=0.8, **dict(self.bn_args))(h)
        ), None


class ScanLayers(nn.Module):
    """Three Blocks with stacked params and batch_stats, applied by nn.scan."""

    bn: Any

    @nn.compact
    def __call__(self, x):
        layers = nn.scan(
            Block,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=3,
        )
        return layers(self.bn)(x, None)[0]


class Cell(nn.Module):
    bn: Any

    @nn.compact
    def __call__(self, carry, x):
        return carry, self.bn(use_running_average=False, momentum=0.8)(x)


class ScanSteps(nn.Module):
    """One BatchNorm applied to each step of a sequence; batch_stats carried across steps."""

    bn: Any

    @nn.compact
    def __call__(self, xs):
        steps = nn.scan(
            Cell,
            variable_broadcast="params",
            variable_carry="batch_stats",
            split_rngs={"params": False},
        )
        return steps(self.bn)(None, xs)[1]


class Remat(nn.Module):
    bn: Any

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.remat(Block)(self.bn)(x)[0]
        return x


def ensemble(axis_name):
    class Ensemble(nn.Module):
        """Four Blocks vmapped over a leading ensemble axis."""

        bn: Any

        @nn.compact
        def __call__(self, x):
            members = nn.vmap(
                Block,
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True},
                axis_name=axis_name,
            )
            return members(self.bn, (("axis_name", axis_name),))(x)[0]

    return Ensemble


def linen_step(model, variables, x, w):
    """Loss sum(y * w): its value, parameter gradients and new batch_stats, jitted."""

    @jax.jit
    def step(variables, x, w):
        def loss(params):
            y, upd = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(y * w), upd["batch_stats"]

        return jax.value_and_grad(loss, has_aux=True)(variables["params"])

    return step(variables, x, w)


@pytest.mark.parametrize(
    "make,shape",
    [
        (ScanLayers, (16, 6)),
        (ScanSteps, (4, 16, 6)),
        (Remat, (16, 6)),
        (ensemble(None), (4, 16, 6)),
        (ensemble("members"), (4, 16, 6)),
    ],
    ids=["scan_layers", "scan_steps", "remat", "vmap", "vmap_axis_name"],
)
def test_linen_transform_matches_flax(make, shape):
    x, w = data(shape)
    if make is ScanSteps:  # Flax's scan needs carried variables to exist before the loop
        cell = Cell(LINEN["flax"]).init(jax.random.key(0), None, x[0])
        variables = {col: {"ScanCell_0": v} for col, v in cell.items()}
    else:
        variables = make(LINEN["flax"]).init(jax.random.key(0), x)
    ours, theirs = (linen_step(make(LINEN[k]), variables, x, w) for k in ("jaxbn", "flax"))
    assert_trees_close(ours, theirs)
    stats = jax.tree.leaves(ours[0][1])
    assert all(
        rel_err(s, v) > 1e-3 for s, v in zip(stats, jax.tree.leaves(variables["batch_stats"]))
    )


def test_linen_vmap_axis_name_shares_statistics():
    # with axis_name the members normalize with the statistics of all of them
    x, w = data((4, 16, 6))
    make = ensemble("members")
    variables = make(LINEN["jaxbn"]).init(jax.random.key(0), x)
    _, upd = make(LINEN["jaxbn"]).apply(variables, x, mutable=["batch_stats"])
    means = upd["batch_stats"]["VmapBlock_0"]["BatchNorm_0"]["mean"]
    assert rel_err(means, jnp.broadcast_to(means[0], means.shape)) < 1e-6


def mesh():
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 simulated CPU devices"
    return jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))


class Net(nn.Module):
    bn_args: tuple = ()

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(6, (3, 3), use_bias=False)(x)
        return nn.relu(jaxbn.linen.BatchNorm(False, momentum=0.8, **dict(self.bn_args))(h))


def test_jit_with_batch_sharded_input_equals_one_device():
    x, w = data((32, 4, 4, 6))
    variables = Net().init(jax.random.key(0), x)
    one = linen_step(Net(), variables, x, w)
    sharding = NamedSharding(mesh(), P("batch"))
    xs, ws = jax.device_put(x, sharding), jax.device_put(w, sharding)
    many = linen_step(Net(), variables, xs, ws)
    assert_trees_close(many, one)


def test_shard_map_with_axis_name_equals_one_device():
    x, w = data((32, 4, 4, 6))
    variables = Net().init(jax.random.key(0), x)
    one = linen_step(Net(), variables, x, w)
    model = Net((("axis_name", "batch"),))

    def local(params, stats, x, w):
        y, upd = model.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jax.lax.psum(jnp.sum(y * w), "batch"), upd["batch_stats"]

    m = mesh()
    sharded = jax.shard_map(
        local, mesh=m, in_specs=(P(), P(), P("batch"), P("batch")), out_specs=(P(), P())
    )
    step = jax.jit(jax.value_and_grad(sharded, has_aux=True))
    xs, ws = (jax.device_put(v, NamedSharding(m, P("batch"))) for v in (x, w))
    many = step(variables["params"], variables["batch_stats"], xs, ws)
    assert_trees_close(many, one)


class NNXBlock(nnx.Module):
    def __init__(self, bn, rngs, **bn_args):
        self.linear = nnx.Linear(6, 6, use_bias=False, rngs=rngs)
        self.bn = bn(6, momentum=0.8, rngs=rngs, **bn_args)

    def __call__(self, x):
        return nnx.relu(self.bn(self.linear(x)))


def stacked_blocks(bn, **bn_args):
    @nnx.split_rngs(splits=4)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return NNXBlock(bn, rngs, **bn_args)

    return create(nnx.Rngs(0))


def nnx_step(apply, model, x, w):
    """Loss sum(y * w) under nnx.jit: value, Param gradients and the new state."""

    @nnx.jit
    def step(model, x, w):
        loss = lambda model: jnp.sum(apply(model, x) * w)  # noqa: E731
        return nnx.value_and_grad(loss)(model)

    value, grads = step(model, x, w)
    return value, grads, nnx.state(model, nnx.BatchStat)


def scan_layers(model, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
        return block(x)

    return forward(x, model)


def vmap_members(axis_name):
    def apply(model, x):
        return nnx.vmap(lambda block, x: block(x), in_axes=(0, 0), axis_name=axis_name)(model, x)

    return apply


@pytest.mark.parametrize(
    "apply,shape,axis_name",
    [
        (scan_layers, (16, 6), None),
        (vmap_members(None), (4, 16, 6), None),
        (vmap_members("members"), (4, 16, 6), "members"),
    ],
    ids=["scan_layers", "vmap", "vmap_axis_name"],
)
def test_nnx_transform_matches_flax(apply, shape, axis_name):
    x, w = data(shape)
    before = nnx.state(stacked_blocks(NNX["jaxbn"]), nnx.BatchStat)
    ours, theirs = (
        nnx_step(apply, stacked_blocks(NNX[k], axis_name=axis_name), x, w)
        for k in ("jaxbn", "flax")
    )
    assert_trees_close(ours, theirs)
    for s, v in zip(jax.tree.leaves(ours[2]), jax.tree.leaves(before)):
        assert rel_err(s, v) > 1e-3
