"""jaxbn.nnx.BatchNorm against flax.nnx.BatchNorm: interface, state, training, modes, errors."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import rel_err

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import jaxbn.nnx  # noqa: E402

FlaxBN = functools.partial(nnx.BatchNorm, use_fast_variance=False)
TOL = 1e-5


class CNN(nnx.Module):
    """Conv - BatchNorm - relu twice (NHWC), then a linear head."""

    def __init__(self, bn, *, rngs, **bn_args):
        self.conv1 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = bn(8, rngs=rngs, **bn_args)
        self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.bn2 = bn(8, rngs=rngs, **bn_args)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((1, 2)))


class MLP(nnx.Module):
    """Linear - BatchNorm - relu twice, then a linear head."""

    def __init__(self, bn, *, rngs, **bn_args):
        self.lin1 = nnx.Linear(12, 32, use_bias=False, rngs=rngs)
        self.bn1 = bn(32, rngs=rngs, **bn_args)
        self.lin2 = nnx.Linear(32, 32, use_bias=False, rngs=rngs)
        self.bn2 = bn(32, rngs=rngs, **bn_args)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.lin1(x)))
        x = nnx.relu(self.bn2(self.lin2(x)))
        return self.head(x)


def batches(kind, steps=5, n=16, seed=0):
    rs = np.random.RandomState(seed)
    shape = (steps + 1, n, 8, 8, 3) if kind == "cnn" else (steps + 1, n, 12)
    x = rs.randn(*shape) * 3 + 2
    flat = x.reshape(steps + 1, n, -1)
    labels = np.argmax(flat @ rs.randn(flat.shape[-1], 10), -1)  # learnable
    return jnp.asarray(x, jnp.float32), jnp.asarray(labels)


def train(model, xs, labels, steps=5):
    """nnx.Optimizer(adam), nnx.jit, nnx.value_and_grad; returns state, losses, eval logits."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    losses = jnp.stack([step(model, optimizer, xs[i], labels[i]) for i in range(steps)])
    model.eval()
    return nnx.state(model), losses, model(xs[steps])


def assert_trees_close(a, b, tol=TOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert u.dtype == v.dtype and u.shape == v.shape, path
        assert rel_err(u, v) <= tol, (path, rel_err(u, v))


@pytest.mark.parametrize("method", ["__init__", "__call__"])
def test_signature_and_defaults_are_flaxs(method):
    def params(cls):
        sig = inspect.signature(getattr(cls, method))
        return [(p.name, p.kind, p.default) for p in sig.parameters.values()]

    extras = {
        "unbiased_running_var": False,
        "renorm": None,
        "virtual_batch_size": None,
        "frozen": False,
        "custom_vjp": True,
        "activation": None,
        "negative_slope": 0.01,
        "inplace": False,
    }
    call_extras = {"residual": None}
    ours = params(jaxbn.nnx.BatchNorm)
    skip = extras if method == "__init__" else call_extras
    assert [p for p in ours if p[0] not in skip] == params(nnx.BatchNorm)
    assert {p[0]: p[2] for p in ours if p[0] in skip} == skip


CONFIGS = [
    dict(),
    dict(use_scale=False),
    dict(use_bias=False, use_scale=False),
    dict(scale_init=nnx.initializers.normal(1.0), bias_init=nnx.initializers.uniform()),
    dict(param_dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_state_is_flaxs(config):
    # same Variable types, names, shapes, dtypes and values from the same Rngs
    ours = jaxbn.nnx.BatchNorm(6, rngs=nnx.Rngs(5), **config)
    theirs = nnx.BatchNorm(6, rngs=nnx.Rngs(5), **config)
    assert_trees_close(nnx.state(ours), nnx.state(theirs), tol=0)
    assert_trees_close(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat), tol=0)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_training_matches_flax(kind):
    net = CNN if kind == "cnn" else MLP
    xs, labels = batches(kind)
    ours = train(net(jaxbn.nnx.BatchNorm, rngs=nnx.Rngs(0), momentum=0.9), xs, labels)
    theirs = train(net(FlaxBN, rngs=nnx.Rngs(0), momentum=0.9), xs, labels)
    for a, b in zip(ours, theirs):
        assert_trees_close(a, b)
    var = ours[0]["bn1"]["var"][...]
    assert rel_err(var, jnp.ones_like(var)) > 0.1  # the statistics did move


NO_VIEW = pytest.mark.skipif(not hasattr(nnx, "view"), reason="nnx.view needs flax >= 0.12.4")


@pytest.mark.parametrize("switch", ["train_eval", "call", pytest.param("view", marks=NO_VIEW)])
def test_train_eval_switching(switch):
    xs, _ = batches("mlp")
    ours = jaxbn.nnx.BatchNorm(12, momentum=0.5, rngs=nnx.Rngs(0))
    theirs = FlaxBN(12, momentum=0.5, rngs=nnx.Rngs(0))
    for bn in (ours, theirs):
        bn(xs[0])  # one training step: the running statistics move
    before = nnx.clone(nnx.state(ours))
    outputs = []
    for bn in (ours, theirs):
        if switch == "train_eval":
            bn.eval()
            outputs.append(bn(xs[1]))
        elif switch == "call":
            outputs.append(bn(xs[1], use_running_average=True))  # takes precedence
        else:
            outputs.append(nnx.view(bn, use_running_average=True)(xs[1]))
    assert rel_err(*outputs) < TOL
    assert_trees_close(nnx.state(ours), before, tol=0)  # evaluation leaves them
    ours.train()
    ours(xs[1])
    assert rel_err(ours.var[...], before["var"][...]) > 1e-3


def test_mask_matches_flax():
    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.randn(16, 4) * 2 + 1, jnp.float32)
    mask = jnp.asarray(rs.rand(16, 1) > 0.4)
    ours, theirs = jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0)), FlaxBN(4, rngs=nnx.Rngs(0))
    assert rel_err(ours(x, mask=mask), theirs(x, mask=mask)) < TOL
    assert_trees_close(nnx.state(ours), nnx.state(theirs))


def test_large_offset_flax_default_is_wrong_jaxbn_is_not():
    rs = np.random.RandomState(3)
    x = jnp.asarray(1e4 + rs.randn(64, 4), jnp.float32)
    x64 = np.asarray(x, np.float64)
    mean, var = x64.mean(0), x64.var(0)
    y_ref = (x64 - mean) / np.sqrt(var + 1e-5)
    out = {}
    for name, cls in [("flax", nnx.BatchNorm), ("jaxbn", jaxbn.nnx.BatchNorm)]:
        bn = cls(4, momentum=0.0, rngs=nnx.Rngs(0))
        out[name] = rel_err(bn(x), y_ref), rel_err(bn.var[...], var)
    assert out["flax"][0] > 1e-2 and out["flax"][1] > 1.0  # Flax's default: E[x^2] - E[x]^2
    assert out["jaxbn"][0] < 1e-5 and out["jaxbn"][1] < 1e-5


@pytest.mark.parametrize(
    "x_dtype,param_dtype,dtype",
    [
        (jnp.bfloat16, jnp.float32, None),
        (jnp.bfloat16, jnp.bfloat16, None),
        (jnp.float32, jnp.float32, jnp.bfloat16),
    ],
)
def test_output_dtype_is_flaxs(x_dtype, param_dtype, dtype):
    x = jnp.asarray(np.random.RandomState(4).randn(16, 6) * 2 + 1, x_dtype)
    config = dict(param_dtype=param_dtype, dtype=dtype, rngs=nnx.Rngs(0))
    y, y_f = jaxbn.nnx.BatchNorm(6, **config)(x), FlaxBN(6, **config)(x)
    assert y.dtype == y_f.dtype
    assert rel_err(y, y_f) < (TOL if y.dtype == jnp.float32 else 1e-2)


def test_mixed_precision_trains_with_float32_statistics():
    xs, labels = batches("mlp", steps=10)
    model = MLP(jaxbn.nnx.BatchNorm, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, momentum=0.9)
    state, losses, _ = train(model, xs, labels, steps=10)
    assert bool(jnp.all(jnp.isfinite(losses))) and jnp.mean(losses[-3:]) < 0.8 * losses[0]
    for leaf in jax.tree.leaves(state):
        assert leaf.dtype == jnp.float32
    assert model.bn1(jnp.ones((4, 32), jnp.float32)).dtype == jnp.bfloat16


def test_mismatched_num_features():
    bn = jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"has 3 features along axis -1, but .* num_features=4"):
        bn(jnp.ones((8, 3)))


def test_use_running_average_never_given():
    bn = jaxbn.nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_running_average is None both on the module"):
        bn(jnp.ones((8, 3)))


def test_bad_num_features():
    with pytest.raises(ValueError, match="num_features must be positive, got 0"):
        jaxbn.nnx.BatchNorm(0, rngs=nnx.Rngs(0))
