"""jaxbn.nnx.BatchNorm against flax.nnx.BatchNorm: interface, state, training, modes,
errors, the patterns of Flax's own BatchNorm tests (issue 11), nnx's transforms, and
jaxbn's options forwarded to the core.

Each parity case builds the same model with Flax's module (use_fast_variance=False, the
oracle) and jaxbn's, from the same Rngs, and compares outputs, gradients, state or
tabulate tables (tests/flax_parity.py)."""

import contextlib
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_parity import (
    CONSOLE,
    INITS,
    NNX,
    TOL,
    assert_close,
    assert_same,
    assert_trees_close,
    batches,
    both,
    explicit_batch,
)
from flax_parity import randn as jrandn
from reference import randn, rel_err

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import jaxbn  # noqa: E402
import jaxbn.nnx  # noqa: E402

FlaxBN = NNX["flax"]


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


# --- the patterns of Flax's own BatchNorm tests (issue 11) ----------------------------


ONE_VALUE = [((1, 4), -1), ((4,), -1)]


@pytest.mark.parametrize("shape,axis", ONE_VALUE)
def test_nnx_one_value_per_feature_trains_as_flax(shape, axis):
    x, w = jrandn(0, shape, 3.0, 1.0), jrandn(1, shape)

    def run(cls):
        bn = cls(4, axis=axis, momentum=0.9, **INITS, rngs=nnx.Rngs(0))

        def loss(bn, x):
            y = bn(x)
            return jnp.sum(y * w), y

        (grads, dx), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(bn, x)
        return y, nnx.to_pure_dict(nnx.state(bn)), nnx.to_pure_dict(grads), dx

    ours, theirs = both(run, NNX)
    assert_same(ours, theirs)


class Block(nnx.Module):
    def __init__(self, bn, din, dout, rngs):
        # no bias: batch norm removes it, so its gradient is rounding noise that
        # adam would scale up to full steps
        self.linear = nnx.Linear(din, dout, use_bias=False, rngs=rngs)
        self.bn = bn(dout, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.linear(x)))


def test_nnx_tabulate_with_one_example_gives_flaxs_table():
    # Flax's nnx/summary_test.py::test_tabulate: one example through training-mode layers
    def run(cls):
        model = Block(cls, 4, 3, nnx.Rngs(0))
        table = nnx.tabulate(model, jnp.ones((1, 4)), console_kwargs=CONSOLE)
        return table, nnx.to_pure_dict(nnx.state(model))

    (ours, ours_state), (theirs, theirs_state) = both(run, NNX)
    assert ours == theirs
    assert_same(ours_state, theirs_state)


def stacked(cls, layers, din, dout):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(rngs):
        return Block(cls, din, dout, rngs)

    return create(nnx.Rngs(0))


def test_nnx_vmap_one_example_per_member_without_axis_name_trains_as_flax():
    # Flax's nnx/transforms_test.py::TestVmap::test_state_axes_super_simple
    x = jrandn(0, (5, 2), 2.0)

    def run(cls):
        model = stacked(cls, 5, 2, 3)

        @nnx.jit
        @nnx.vmap(in_axes=(0, 0), out_axes=0)
        def forward(model, x):
            return model(x)  # each member sees x of shape (2,)

        return forward(model, x), nnx.to_pure_dict(nnx.state(model))

    ours, theirs = both(run, NNX)
    assert_same(ours, theirs)


def test_nnx_scan_over_layers_with_one_example_trains_as_flax():
    # Flax's nnx/transforms_test.py::TestScan::test_complex
    x = jrandn(0, (1, 3), 2.0)

    def run(cls):
        model = stacked(cls, 4, 3, 3)

        @nnx.jit
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def forward(layer, x):
            return layer(x)

        return forward(model, x), nnx.to_pure_dict(nnx.state(model))

    ours, theirs = both(run, NNX)
    assert_same(ours, theirs)


def test_nnx_train_step_on_one_example_trains_as_flax():
    # Flax's nnx/helpers_test.py::test_train_state_methods: a (1, 4) batch
    x, labels = jrandn(0, (1, 2)), jrandn(1, (1, 4))

    def run(cls):
        model = Block(cls, 2, 4, nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        loss = lambda m: jnp.mean((m(x) - labels) ** 2)  # noqa: E731
        for _ in range(2):
            opt.update(model, nnx.grad(loss)(model))
        return nnx.to_pure_dict(nnx.state(model))

    ours, theirs = both(run, NNX)
    assert_same(ours, theirs)


HIJAX = hasattr(nnx, "with_vars")  # flax >= 0.12.8: not at the floor, 0.12.1 (pyproject.toml)


@pytest.mark.skipif(not HIJAX, reason="hijax variables need flax >= 0.12.8 (nnx.with_vars)")
@(nnx.var_defaults(hijax=True) if HIJAX else lambda test: test)
def test_nnx_hijax_variables_train_with_jax_grad_as_flax():
    # Flax's nnx/integration_test.py::test_example_mutable_arrays
    x, labels = jrandn(0, (8, 2)), jrandn(1, (8, 3))

    def run(cls):
        model = Block(cls, 2, 3, nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

        @jax.jit
        def step(x, labels):
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)

            def loss_fn(params):
                return jnp.mean((nnx.merge(graphdef, params, rest)(x) - labels) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(nnx.with_vars(params, hijax=False))
            opt.update(model, grads)
            return loss

        losses = [step(x, labels) for _ in range(2)]
        return losses, nnx.to_pure_dict(nnx.state(model))

    ours, theirs = both(run, NNX)
    assert_same(ours, theirs, atol=1e-5)


@pytest.mark.skipif(not hasattr(nnx, "view"), reason="nnx.view needs flax >= 0.12.4")
def test_nnx_view_only_batchnorm_flips_jaxbns_layers_as_flaxs():
    x = jrandn(0, (8, 3), 2.0, 1.0)

    def run(cls):
        class Model(nnx.Module):
            def __init__(self):
                self.lin = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
                self.bn = cls(3, rngs=nnx.Rngs(0))
                self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(1))

            def __call__(self, x):
                return self.drop(self.bn(self.lin(x)))

        model = Model()
        model.bn(x)  # one training call moves the running statistics
        viewed = nnx.view(model, only=nnx.BatchNorm, use_running_average=True)
        train_dropout = nnx.view(viewed, only=nnx.Dropout, deterministic=True)
        return train_dropout.bn.use_running_average, model.bn.use_running_average, train_dropout(x)

    ours, theirs = both(run, NNX)
    assert ours[:2] == theirs[:2] == (True, False)
    assert_same(ours[2], theirs[2])


def test_axis_index_groups_without_axis_name_train_as_flax():
    # Flax ignores axis_index_groups without axis_name
    x = jrandn(0, (6, 3), 2.0, 1.0)

    def run(cls):
        bn = cls(3, axis_index_groups=[[0]], rngs=nnx.Rngs(0))
        return bn(x), nnx.to_pure_dict(nnx.state(bn))

    ours, theirs = both(run, NNX)
    assert_same(ours, theirs)


def test_forward_mode_in_training_with_custom_vjp_off_matches_flax():
    x, t = jrandn(0, (6, 3), 2.0, 1.0), jrandn(1, (6, 3))

    def run(cls):
        def f(x):  # a module built outside would be mutated from inside the jvp
            bn = cls(3, **INITS, rngs=nnx.Rngs(0))
            return bn(x), nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat))

        return jax.jvp(f, (x,), (t,))

    modules = dict(NNX)
    with pytest.raises(TypeError, match="custom_vjp=False"):
        run(modules["jaxbn"])
    modules["jaxbn"] = functools.partial(modules["jaxbn"], custom_vjp=False)
    ours, theirs = both(run, modules)
    assert_same(ours, theirs)


@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")  # nnx's
@pytest.mark.filterwarnings("ignore:Casting complex values to real")  # nnx's real BatchStat
def test_complex_input_trains_as_flax():
    x = (jrandn(0, (8, 2)) + 1j * jrandn(1, (8, 2), 2.0, 1.0)).astype(jnp.complex64)

    def run(cls):
        bn = cls(2, dtype=jnp.complex64, rngs=nnx.Rngs(0))
        return bn(x), nnx.to_pure_dict(nnx.state(bn))

    ours, theirs = both(run, NNX)
    assert_same(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("context", [True, False], ids=["set_mesh", "no_mesh_context"])
def test_batch_sharded_jit_on_an_explicit_mesh_trains_as_flax(context):
    # JAX's default mesh axes are Explicit; jitting arrays sharded on one needs no
    # mesh context (issue 23: jaxbn asked for one)
    mesh, _, xs = explicit_batch((16, 3))

    def run(cls):
        with jax.set_mesh(mesh) if context else contextlib.nullcontext():
            model = cls(3, rngs=nnx.Rngs(0))
            return nnx.jit(lambda m, x: m(x))(model, xs), nnx.to_pure_dict(nnx.state(model))

    ours, theirs = both(run, NNX)
    assert_same(ours, theirs)


# --- nnx's transforms ------------------------------------------------------------------


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
    x, w = randn(shape, scale=2.0, offset=1.0), randn((*shape[:-1], 6), seed=1)
    before = nnx.state(stacked_blocks(NNX["jaxbn"]), nnx.BatchStat)
    ours, theirs = (
        nnx_step(apply, stacked_blocks(NNX[k], axis_name=axis_name), x, w)
        for k in ("jaxbn", "flax")
    )
    assert_trees_close(ours, theirs)
    for s, v in zip(jax.tree.leaves(ours[2]), jax.tree.leaves(before)):
        assert rel_err(s, v) > 1e-3


def test_nnx_remat_updates_batch_stats_once():
    # PyTorch's running statistics are updated again by a recomputed forward
    # (pytorch#96136): a block recomputed in the backward must move them once
    rs = np.random.RandomState(0)
    X = jnp.asarray(rs.randn(16, 5) * 2 + 1, jnp.float32)
    W = jnp.asarray(rs.randn(16, 5), jnp.float32)

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(5, 5, rngs=rngs)
            self.bn = jaxbn.nnx.BatchNorm(5, rngs=rngs)

        def __call__(self, x):
            return jnp.tanh(self.bn(self.dense(x)))

    def run(remat):
        model = Block(nnx.Rngs(0))
        before = np.asarray(model.bn.mean[...])

        def loss(model):
            f = nnx.remat(lambda m, x: m(x)) if remat else (lambda m, x: m(x))
            return jnp.sum(f(model, X) * W)

        _, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return before, nnx.state(model, nnx.BatchStat), grads, model

    before, stats_r, g_r, model = run(True)
    _, stats, g, _ = run(False)
    assert_close((stats_r, g_r), (stats, g))
    h = np.asarray(X, np.float64) @ np.asarray(model.dense.kernel[...], np.float64)
    h = h + np.asarray(model.dense.bias[...])
    np.testing.assert_allclose(
        np.asarray(model.bn.mean[...]), 0.99 * before + 0.01 * h.mean(0), rtol=1e-5
    )


# jaxbn's options, forwarded to the core (off by default: test_fields_and_defaults_are_flaxs)
STATIC = ("training", "momentum", "renorm", "virtual_batch_size", "unbiased_running_var")
batch_norm = jax.jit(jaxbn.batch_norm, static_argnames=STATIC)


@pytest.mark.parametrize(
    "options", [{"renorm": (1.5, 0.5)}, {"virtual_batch_size": 4}, {"unbiased_running_var": True}]
)
def test_options_are_forwarded_to_the_core(options):
    x = jnp.asarray(np.random.RandomState(0).randn(16, 5) * 2 + 3, jnp.float32)
    bn = jaxbn.nnx.BatchNorm(x.shape[-1], momentum=0.5, rngs=nnx.Rngs(0), **options)
    y = bn(x)
    y_core, s_core = batch_norm(
        x, jnp.ones(5), jnp.zeros(5), jaxbn.init_state(5), training=True, momentum=0.5, **options
    )
    y_plain, s_plain = batch_norm(
        x, jnp.ones(5), jnp.zeros(5), jaxbn.init_state(5), training=True, momentum=0.5
    )
    assert rel_err(y, y_core) < 1e-6
    assert rel_err(bn.var[...], s_core.var) < 1e-6
    # the option must change something, or the two checks above prove nothing
    assert rel_err(y, y_plain) > 1e-3 or rel_err(s_core.var, s_plain.var) > 1e-3


@pytest.mark.parametrize("cls", [jaxbn.nnx.BatchNorm, jaxbn.nnx.BatchRenorm])
def test_a_traced_use_running_average_names_the_argument_and_the_fix(cls):
    bn = cls(3, rngs=nnx.Rngs(0))
    step = nnx.jit(lambda m, x, t: m(x, use_running_average=t))
    with pytest.raises(TypeError, match=r"use_running_average must be a Python bool.*static"):
        step(bn, jnp.ones((4, 3)), True)


def test_batch_renorm_names_num_features_for_a_wrong_feature_count():
    bn = jaxbn.nnx.BatchRenorm(3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"BatchRenorm was built with num_features=3"):
        bn(jnp.ones((4, 4)))


@pytest.mark.parametrize("cls", [jaxbn.nnx.BatchNorm, jaxbn.nnx.BatchRenorm])
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"momentum": 1.5}, r"momentum must be a number in \[0, 1\].*got 1.5"),
        ({"epsilon": float("nan")}, r"epsilon must be a finite number > 0, got nan"),
    ],
)
def test_bad_momentum_and_epsilon_are_refused_at_construction(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(3, rngs=nnx.Rngs(0), **kw)


def test_batch_renorm_limits_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"r_max must be a finite number >= 1, got 0.5"):
        jaxbn.nnx.BatchRenorm(3, r_max=0.5, rngs=nnx.Rngs(0))
