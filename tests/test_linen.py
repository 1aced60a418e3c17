"""jaxbn.linen.BatchNorm against flax.linen.BatchNorm: interface, trees, training, dtypes, errors."""

import dataclasses
import functools
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import rel_err

nn = pytest.importorskip("flax.linen")
flax = pytest.importorskip("flax")
optax = pytest.importorskip("optax")

import jaxbn.linen  # noqa: E402

FlaxBN = functools.partial(nn.BatchNorm, use_fast_variance=False)
TOL = 1e-5


class CNN(nn.Module):
    """Conv - BatchNorm - relu twice (NHWC), then a linear head."""

    bn: Any = jaxbn.linen.BatchNorm
    bn_args: tuple = ()

    @nn.compact
    def __call__(self, x, train: bool):
        bn = functools.partial(self.bn, use_running_average=not train, **dict(self.bn_args))
        x = nn.relu(bn()(nn.Conv(8, (3, 3), use_bias=False)(x)))
        x = nn.relu(bn()(nn.Conv(8, (3, 3), strides=2, use_bias=False)(x)))
        return nn.Dense(10)(x.mean((1, 2)))


class MLP(nn.Module):
    """Dense - BatchNorm - relu twice, then a linear head."""

    bn: Any = jaxbn.linen.BatchNorm
    bn_args: tuple = ()

    @nn.compact
    def __call__(self, x, train: bool):
        bn = functools.partial(self.bn, use_running_average=not train, **dict(self.bn_args))
        x = nn.relu(bn()(nn.Dense(32, use_bias=False)(x)))
        x = nn.relu(bn()(nn.Dense(32, use_bias=False)(x)))
        return nn.Dense(10)(x)


def batches(kind, steps=5, n=16, seed=0):
    rs = np.random.RandomState(seed)
    shape = (steps + 1, n, 8, 8, 3) if kind == "cnn" else (steps + 1, n, 12)
    x = rs.randn(*shape) * 3 + 2
    flat = x.reshape(steps + 1, n, -1)
    labels = np.argmax(flat @ rs.randn(flat.shape[-1], 10), -1)  # learnable
    return jnp.asarray(x, jnp.float32), jnp.asarray(labels)


def train(model, xs, labels, steps=5):
    """Adam, jitted step, mutable batch_stats; returns params, stats, losses, eval logits."""
    variables = model.init(jax.random.key(0), xs[0], train=False)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(params):
            logits, upd = model.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    losses = []
    for i in range(steps):
        params, stats, opt_state, loss = step(params, stats, opt_state, xs[i], labels[i])
        losses.append(loss)
    logits = model.apply({"params": params, "batch_stats": stats}, xs[steps], train=False)
    return params, stats, jnp.stack(losses), logits


def assert_trees_close(a, b, tol=TOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert u.dtype == v.dtype and u.shape == v.shape, path
        assert rel_err(u, v) <= tol, (path, rel_err(u, v))


# jaxbn's own options (issue 5), each with a default that keeps Flax's behaviour
EXTRAS = {
    "unbiased_running_var": False,
    "renorm": None,
    "virtual_batch_size": None,
    "frozen": False,
    "custom_vjp": True,
    "activation": None,
    "negative_slope": 0.01,
    "inplace": False,
}


def test_fields_and_defaults_are_flaxs():
    ours = {f.name: f.default for f in dataclasses.fields(jaxbn.linen.BatchNorm)}
    theirs = {f.name: f.default for f in dataclasses.fields(nn.BatchNorm)}
    assert [k for k in ours if k not in EXTRAS] == list(theirs)
    assert {k: v for k, v in ours.items() if k not in EXTRAS} == theirs
    assert {k: ours[k] for k in EXTRAS} == EXTRAS


CONFIGS = [
    dict(),
    dict(use_scale=False),
    dict(use_bias=False, use_scale=False),
    dict(axis=1),
    dict(axis=(1, 2)),
    dict(scale_init=nn.initializers.normal(1.0), bias_init=nn.initializers.uniform()),
    dict(param_dtype=jnp.bfloat16),
    dict(param_dtype=jnp.bfloat16, force_float32_reductions=False),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_init_gives_flaxs_variables(config):
    # same tree, shapes, dtypes and values; in training mode, where statistics are
    # computed during init by Flax but stored by neither module
    x = batches("cnn")[0][0]
    ours = jaxbn.linen.BatchNorm(use_running_average=False, **config)
    theirs = nn.BatchNorm(use_running_average=False, **config)
    key = jax.random.key(3)
    assert_trees_close(ours.init(key, x), theirs.init(key, x), tol=0)


def test_init_accepts_one_example():
    # a common idiom: one value per feature, normalized to bias as in Flax
    x = jnp.ones((1, 5))
    ours = MLP().init(jax.random.key(0), x, train=True)
    theirs = MLP(FlaxBN).init(jax.random.key(0), x, train=True)
    assert_trees_close(ours, theirs, tol=0)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_training_matches_flax(kind):
    net = CNN if kind == "cnn" else MLP
    xs, labels = batches(kind)
    args = (("momentum", 0.9),)  # statistics that move visibly in 5 steps
    ours = train(net(jaxbn.linen.BatchNorm, args), xs, labels)
    theirs = train(net(FlaxBN, args), xs, labels)
    for a, b in zip(ours, theirs):
        assert_trees_close(a, b)
    stats = ours[1]["BatchNorm_0"]
    assert rel_err(stats["var"], jnp.ones_like(stats["var"])) > 0.1  # they did move


def test_eval_uses_running_statistics_and_leaves_them():
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.randn(16, 6) * 2 + 1, jnp.float32)
    stats = {
        "mean": jnp.asarray(rs.randn(6), jnp.float32),
        "var": jnp.asarray(rs.rand(6) + 0.5, jnp.float32),
    }
    params = {
        "scale": jnp.asarray(rs.rand(6) + 0.5, jnp.float32),
        "bias": jnp.asarray(rs.randn(6), jnp.float32),
    }
    variables = {"params": params, "batch_stats": stats}
    y, upd = jaxbn.linen.BatchNorm(True).apply(variables, x, mutable=["batch_stats"])
    s64, p64 = jax.tree.map(lambda v: np.asarray(v, np.float64), (stats, params))
    ref = (np.asarray(x, np.float64) - s64["mean"]) / np.sqrt(s64["var"] + 1e-5)
    assert rel_err(y, ref * p64["scale"] + p64["bias"]) < TOL
    assert_trees_close(upd["batch_stats"], stats, tol=0)


def test_use_running_average_from_constructor_or_call():
    x = batches("mlp")[0][0]
    variables = jaxbn.linen.BatchNorm(False).init(jax.random.key(0), x)
    for ctor, call in [(False, None), (None, False)]:
        y, upd = jaxbn.linen.BatchNorm(ctor).apply(variables, x, call, mutable=["batch_stats"])
        y_f, upd_f = FlaxBN(ctor).apply(variables, x, call, mutable=["batch_stats"])
        assert rel_err(y, y_f) < TOL
        assert_trees_close(upd, upd_f)


def test_mask_matches_flax():
    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.randn(16, 4) * 2 + 1, jnp.float32)
    mask = jnp.asarray(rs.rand(16, 1) > 0.4)
    variables = FlaxBN(False).init(jax.random.key(0), x)
    y, upd = jaxbn.linen.BatchNorm(False).apply(variables, x, mask=mask, mutable=["batch_stats"])
    y_f, upd_f = FlaxBN(False).apply(variables, x, mask=mask, mutable=["batch_stats"])
    assert rel_err(y, y_f) < TOL
    assert_trees_close(upd, upd_f)


def test_large_offset_flax_default_is_wrong_jaxbn_is_not():
    rs = np.random.RandomState(3)
    x = jnp.asarray(1e4 + rs.randn(64, 4), jnp.float32)
    x64 = np.asarray(x, np.float64)
    mean, var = x64.mean(0), x64.var(0)
    y_ref = (x64 - mean) / np.sqrt(var + 1e-5)
    out = {}
    for name, bn in [
        ("flax", nn.BatchNorm(False, momentum=0.0)),
        ("jaxbn", jaxbn.linen.BatchNorm(False, momentum=0.0)),
    ]:
        y, upd = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
        out[name] = rel_err(y, y_ref), rel_err(upd["batch_stats"]["var"], var)
    assert out["flax"][0] > 1e-2 and out["flax"][1] > 1.0  # Flax's default: E[x^2] - E[x]^2
    assert out["jaxbn"][0] < 1e-5 and out["jaxbn"][1] < 1e-5


def test_use_fast_variance_is_accepted_and_changes_nothing():
    x = batches("mlp")[0][0] + 1e3
    variables = jaxbn.linen.BatchNorm(False).init(jax.random.key(0), x)
    fast, slow = (
        jaxbn.linen.BatchNorm(False, use_fast_variance=f).apply(
            variables, x, mutable=["batch_stats"]
        )
        for f in (True, False)
    )
    assert_trees_close(fast, slow, tol=0)


DTYPES = [
    # x, param_dtype, dtype
    (jnp.float32, jnp.float32, None),
    (jnp.bfloat16, jnp.float32, None),
    (jnp.bfloat16, jnp.bfloat16, None),
    (jnp.float32, jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32, jnp.float32),
    (jnp.float16, jnp.float32, jnp.float16),
]


@pytest.mark.parametrize("x_dtype,param_dtype,dtype", DTYPES)
def test_output_dtype_and_values_are_flaxs(x_dtype, param_dtype, dtype):
    rs = np.random.RandomState(4)
    x = jnp.asarray(rs.randn(16, 6) * 2 + 1, x_dtype)
    config = dict(param_dtype=param_dtype, dtype=dtype, scale_init=nn.initializers.normal(1.0))
    ours, theirs = jaxbn.linen.BatchNorm(False, **config), FlaxBN(False, **config)
    variables = theirs.init(jax.random.key(0), x)
    y, upd = ours.apply(variables, x, mutable=["batch_stats"])
    y_f, upd_f = theirs.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == y_f.dtype
    tol = 1e-5 if y.dtype == jnp.float32 else 1e-2
    assert rel_err(y, y_f) < tol
    assert_trees_close(upd, upd_f)


def test_mixed_precision_trains_with_float32_statistics():
    xs, labels = batches("mlp", steps=10)
    args = (("dtype", jnp.bfloat16), ("param_dtype", jnp.float32), ("momentum", 0.9))
    params, stats, losses, _ = train(MLP(jaxbn.linen.BatchNorm, args), xs, labels, steps=10)
    assert bool(jnp.all(jnp.isfinite(losses))) and jnp.mean(losses[-3:]) < 0.8 * losses[0]
    for leaf in jax.tree.leaves((params, stats)):
        assert leaf.dtype == jnp.float32
    y = jaxbn.linen.BatchNorm(True, dtype=jnp.bfloat16).apply(
        {"params": params["BatchNorm_0"], "batch_stats": stats["BatchNorm_0"]},
        jnp.ones((4, 32), jnp.float32),
    )
    assert y.dtype == jnp.bfloat16
    # the same training with Flax's module: statistics agree to bf16 precision
    _, stats_f, losses_f, _ = train(MLP(FlaxBN, args), xs, labels, steps=10)
    assert rel_err(losses, losses_f) < 3e-2
    assert rel_err(stats["BatchNorm_0"]["var"], stats_f["BatchNorm_0"]["var"]) < 3e-2


def test_use_running_average_given_twice():
    x = jnp.ones((4, 3))
    bn = jaxbn.linen.BatchNorm(use_running_average=True)
    variables = bn.init(jax.random.key(0), x)
    with pytest.raises(
        ValueError, match=r"use_running_average was given both .* \(True\) .* \(False\)"
    ):
        bn.apply(variables, x, False)


def test_use_running_average_never_given():
    with pytest.raises(ValueError, match="use_running_average was given neither"):
        jaxbn.linen.BatchNorm().init(jax.random.key(0), jnp.ones((4, 3)))


def test_training_without_mutable_batch_stats_raises_flaxs_error():
    x = jnp.ones((4, 3))
    for bn in (jaxbn.linen.BatchNorm(use_running_average=False), FlaxBN(False)):
        variables = bn.init(jax.random.key(0), x)
        with pytest.raises(
            flax.errors.ModifyScopeVariableError, match='collection "batch_stats" is immutable'
        ):
            bn.apply(variables, x)
    # jaxbn's says what to pass too, in Flax's exception class (issue 23)
    bn = jaxbn.linen.BatchNorm(use_running_average=False)
    with pytest.raises(flax.errors.ModifyScopeVariableError) as err:
        bn.apply(bn.init(jax.random.key(0), x), x)
    assert type(err.value) is flax.errors.ModifyScopeVariableError
    assert str(err.value).startswith('Cannot update variable "mean" in "/" because collection')
    assert 'pass mutable=["batch_stats"] to apply' in str(err.value)


def test_bad_momentum_is_reported_by_name():
    with pytest.raises(ValueError, match="momentum must be a number in"):
        jaxbn.linen.BatchNorm(False, momentum=1.5).init(jax.random.key(0), jnp.ones((4, 3)))


def test_import_jaxbn_does_not_import_flax_and_missing_flax_says_what_to_install():
    code = (
        "import sys; import jaxbn; assert 'flax' not in sys.modules, 'flax imported'\n"
        "sys.modules['flax'] = None\n"
        "for name in ('jaxbn.linen', 'jaxbn.nnx'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError as e:\n"
        "        print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    for name, line in zip(("jaxbn.linen", "jaxbn.nnx"), lines):
        assert (
            line
            == f'{name} needs flax, which is not installed; install it with pip install "jaxbn[flax]".'
        )
