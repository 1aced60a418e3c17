"""jaxbn's options on the Flax modules: forwarded to the core, off by default."""

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import rel_err

import jaxbn
import jaxbn.linen
import jaxbn.nnx

GOLDEN = np.load(Path(__file__).parent / "golden" / "torch_batchnorm.npz")

# Jitted, once per shape and options: run eagerly, each call would dispatch op by op
STATIC = ("training", "momentum", "renorm", "virtual_batch_size", "unbiased_running_var")
batch_norm = jax.jit(jaxbn.batch_norm, static_argnames=STATIC)


def test_linen_torch_parity_through_momentum_and_unbiased_options():
    g = GOLDEN
    bn = jaxbn.linen.BatchNorm(
        use_running_average=False,
        axis=1,
        momentum=jaxbn.momentum_from_torch(0.1),
        unbiased_running_var=True,
    )
    variables = jax.jit(bn.init)(jax.random.key(0), g["x"][0])
    variables = {
        "params": {"scale": jnp.asarray(g["weight"]), "bias": jnp.asarray(g["bias"])},
        "batch_stats": variables["batch_stats"],
    }
    apply = jax.jit(functools.partial(bn.apply, mutable=["batch_stats"]))
    for i, x in enumerate(g["x"]):
        y, upd = apply(variables, x)
        variables = {**variables, **upd}
        assert rel_err(y, g[f"ema_y{i}"]) < 1e-5
        assert rel_err(upd["batch_stats"]["var"], g[f"ema_step{i}_running_var"]) < 1e-5


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_momentum_none_keeps_a_cumulative_average_with_a_count(kind):
    g = GOLDEN
    if kind == "linen":
        bn = jaxbn.linen.BatchNorm(
            use_running_average=False, axis=1, momentum=None, unbiased_running_var=True
        )
        variables = jax.jit(bn.init)(jax.random.key(0), g["x"][0])
        assert sorted(variables["batch_stats"]) == ["count", "mean", "var"]
        variables = {
            "params": {"scale": jnp.asarray(g["weight"]), "bias": jnp.asarray(g["bias"])},
            "batch_stats": variables["batch_stats"],
        }
        apply = jax.jit(functools.partial(bn.apply, mutable=["batch_stats"]))
        for x in g["x"]:
            _, upd = apply(variables, x)
            variables = {**variables, **upd}
        stats = variables["batch_stats"]
    else:
        bn = jaxbn.nnx.BatchNorm(
            6, axis=1, momentum=None, unbiased_running_var=True, rngs=nnx.Rngs(0)
        )
        bn.scale[...], bn.bias[...] = jnp.asarray(g["weight"]), jnp.asarray(g["bias"])
        for x in g["x"]:
            bn(jnp.asarray(x))
        stats = {"mean": bn.mean[...], "var": bn.var[...], "count": bn.count[...]}
    assert int(stats["count"]) == 3
    assert rel_err(stats["mean"], g["cumulative_step2_running_mean"]) < 1e-5
    assert rel_err(stats["var"], g["cumulative_step2_running_var"]) < 1e-5


def run_linen(x, **options):
    bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.5, **options)
    variables = jax.jit(bn.init)(jax.random.key(0), x)
    return jax.jit(functools.partial(bn.apply, mutable=["batch_stats"]))(variables, x)


def run_nnx(x, **options):
    bn = jaxbn.nnx.BatchNorm(x.shape[-1], momentum=0.5, rngs=nnx.Rngs(0), **options)
    y = bn(x)
    return y, {"batch_stats": {"mean": bn.mean[...], "var": bn.var[...]}}


@pytest.mark.parametrize("run", [run_linen, run_nnx])
@pytest.mark.parametrize(
    "options", [{"renorm": (1.5, 0.5)}, {"virtual_batch_size": 4}, {"unbiased_running_var": True}]
)
def test_options_are_forwarded_to_the_core(run, options):
    x = jnp.asarray(np.random.RandomState(0).randn(16, 5) * 2 + 3, jnp.float32)
    y, upd = run(x, **options)
    y_core, s_core = batch_norm(
        x, jnp.ones(5), jnp.zeros(5), jaxbn.init_state(5), training=True, momentum=0.5, **options
    )
    y_plain, s_plain = batch_norm(
        x, jnp.ones(5), jnp.zeros(5), jaxbn.init_state(5), training=True, momentum=0.5
    )
    assert rel_err(y, y_core) < 1e-6
    assert rel_err(upd["batch_stats"]["var"], s_core.var) < 1e-6
    # the option must change something, or the two checks above prove nothing
    assert rel_err(y, y_plain) > 1e-3 or rel_err(s_core.var, s_plain.var) > 1e-3


def test_linen_frozen_is_a_fixed_affine_map_without_gradients_for_its_params():
    x = jnp.asarray(np.random.RandomState(1).randn(8, 4, 4, 3) + 2, jnp.float32)

    class Net(nn.Module):
        frozen: bool

        @nn.compact
        def __call__(self, x):
            return jaxbn.linen.BatchNorm(use_running_average=False, frozen=self.frozen)(x)

    variables = Net(True).init(jax.random.key(0), x)
    mean, var = jnp.full(3, 2.0), jnp.full(3, 0.5)
    stats = {"BatchNorm_0": {"mean": mean, "var": var}}
    variables = {"params": variables["params"], "batch_stats": stats}
    y = Net(True).apply(variables, x)  # no mutable collection needed: nothing updates
    y_eval, _ = jaxbn.batch_norm(
        x,
        jnp.ones(3),
        jnp.zeros(3),
        jaxbn.BatchNormState(mean, var, jnp.asarray(0)),
        training=False,
    )
    assert rel_err(y, y_eval) == 0
    grads = jax.jit(
        jax.grad(lambda p: jnp.sum(Net(True).apply({"params": p, "batch_stats": stats}, x) ** 2))
    )(variables["params"])
    assert all(not np.any(np.asarray(v)) for v in jax.tree.leaves(grads))


def test_nnx_frozen_keeps_its_statistics_in_training():
    bn = jaxbn.nnx.BatchNorm(3, frozen=True, rngs=nnx.Rngs(0))
    bn.train()
    x = jnp.asarray(np.random.RandomState(2).randn(8, 3) + 5, jnp.float32)
    y = bn(x)
    assert float(bn.mean[...].sum()) == 0.0 and float(bn.var[...].sum()) == 3.0
    assert rel_err(y, x / np.sqrt(1 + 1e-5)) < 1e-6


def test_defaults_keep_flax_trees():
    x = jnp.ones((4, 3))
    ours = jaxbn.linen.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    theirs = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
