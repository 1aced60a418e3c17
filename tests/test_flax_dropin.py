"""Issue 11: the patterns of Flax's own BatchNorm tests, each against Flax's module.

Flax 0.12.8's tests themselves run with ``tests/flax_suite/run_flax_tests.py`` (they
are not vendored); here each pattern that broke has a test that builds the same model
with Flax's ``BatchNorm`` (``use_fast_variance=False``, the oracle) and jaxbn's, feeds
both the same input, and compares what Flax's test looks at: outputs, variable trees,
gradients, tabulate tables, intercepted methods.
"""

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import jaxbn.linen  # noqa: E402
import jaxbn.nnx  # noqa: E402

LINEN = {
    "flax": functools.partial(nn.BatchNorm, use_fast_variance=False),
    "jaxbn": jaxbn.linen.BatchNorm,
}
NNX = {
    "flax": functools.partial(nnx.BatchNorm, use_fast_variance=False),
    "jaxbn": jaxbn.nnx.BatchNorm,
}
INITS = dict(scale_init=nn.initializers.normal(1.0), bias_init=nn.initializers.normal(1.0))
CONSOLE = dict(force_terminal=False, no_color=True, width=10_000)


def assert_same(ours, theirs, atol=1e-5):
    """Same tree structure, shapes and dtypes; values within float32 rounding."""
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    flat = jax.tree_util.tree_flatten_with_path(ours)[0]
    for (path, u), v in zip(flat, jax.tree.leaves(theirs)):
        assert (u.shape, u.dtype) == (v.shape, v.dtype), path
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=atol, err_msg=str(path))


def both(run, modules):
    out = {name: run(cls) for name, cls in modules.items()}
    return out["jaxbn"], out["flax"]


def randn(seed, shape, scale=1.0, offset=0.0):
    return jax.random.normal(jax.random.key(seed), shape) * scale + offset


# Item 1: one value per feature (Flax's variance is 0 there: y = bias).

ONE_VALUE = [((1, 4), -1), ((4,), -1), ((1, 4, 1, 1), 1)]


@pytest.mark.parametrize("shape,axis", ONE_VALUE)
def test_linen_one_value_per_feature_trains_as_flax(shape, axis):
    x, w = randn(0, shape, 3.0, 1.0), randn(1, shape)
    u, v = randn(2, (4,)), randn(3, (4,))

    def run(cls):
        bn = cls(use_running_average=False, axis=axis, momentum=0.9, **INITS)
        y0, variables = bn.init_with_output(jax.random.key(4), x)

        def loss(params, x):
            y, upd = bn.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            stats = upd["batch_stats"]
            return jnp.sum(y * w) + stats["mean"] @ u + stats["var"] @ v, (y, upd)

        grad = jax.jit(jax.grad(loss, (0, 1), has_aux=True))
        grads, (y, upd) = grad(variables["params"], x)
        return y0, variables, y, upd, grads

    ours, theirs = both(run, LINEN)
    assert_same(ours, theirs)


def test_linen_bind_on_one_unbatched_example_gives_flaxs_outputs_and_stats():
    # Flax's linen_module_test.py::test_bind_stateful
    def run(cls):
        class Foo(nn.Module):
            def setup(self):
                self.a = nn.Dense(3)
                self.bn = cls()
                self.b = nn.Dense(1)

        def f(foo, x):
            return foo.b(foo.bn(foo.a(x), use_running_average=False))

        foo, x = Foo(), jnp.linspace(-1.0, 2.0, 4)
        y1, variables = nn.init_with_output(f, foo)(jax.random.key(0), x)
        foo_b = foo.bind(variables, mutable="batch_stats")
        y2 = f(foo_b, x)
        y3, new_state = nn.apply(f, foo, mutable="batch_stats")(variables, x)
        return y1, y2, y3, new_state, foo_b.variables["batch_stats"]

    ours, theirs = both(run, LINEN)
    assert_same(ours, theirs)


@pytest.mark.parametrize("shape,axis", ONE_VALUE[:2])
def test_nnx_one_value_per_feature_trains_as_flax(shape, axis):
    x, w = randn(0, shape, 3.0, 1.0), randn(1, shape)

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
    x = randn(0, (5, 2), 2.0)

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
    x = randn(0, (1, 3), 2.0)

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
    x, labels = randn(0, (1, 2)), randn(1, (1, 4))

    def run(cls):
        model = Block(cls, 2, 4, nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        loss = lambda m: jnp.mean((m(x) - labels) ** 2)  # noqa: E731
        for _ in range(2):
            opt.update(model, nnx.grad(loss)(model))
        return nnx.to_pure_dict(nnx.state(model))

    ours, theirs = both(run, NNX)
    assert_same(ours, theirs)


# Item 2: linen init in training normalizes with the batch and updates nothing.


@pytest.mark.parametrize("masked", [False, True])
def test_linen_init_in_training_normalizes_with_the_batch_as_flax(masked):
    # Flax's linen_test.py::test_batch_norm: masked-out values are NaN there
    x = randn(0, (4, 3, 2), 2.0, 1.0)
    mask = None
    if masked:
        mask = jax.random.bernoulli(jax.random.key(1), 0.6, (4, 3, 1)).at[0].set(True)
        x = jnp.where(mask, x, jnp.nan)

    def run(cls):
        bn = cls(momentum=0.9, use_running_average=False, **INITS)
        y, variables = bn.init_with_output(jax.random.key(2), x, mask=mask)
        _, upd = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
        where = None if mask is None else jnp.broadcast_to(mask, x.shape)
        return jnp.where(where, y, 0.0) if masked else y, variables, upd

    ours, theirs = both(run, LINEN)
    assert_same(ours, theirs, atol=1e-5)


# Item 4: hijax variables.

HIJAX = hasattr(nnx, "with_vars")  # flax >= 0.12.8: not at the floor, 0.12.1 (pyproject.toml)


@pytest.mark.skipif(not HIJAX, reason="hijax variables need flax >= 0.12.8 (nnx.with_vars)")
@(nnx.var_defaults(hijax=True) if HIJAX else lambda test: test)
def test_nnx_hijax_variables_train_with_jax_grad_as_flax():
    # Flax's nnx/integration_test.py::test_example_mutable_arrays
    x, labels = randn(0, (8, 2)), randn(1, (8, 3))

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


# Item 5: linen module methods: only __call__.


class Net(nn.Module):
    bn: type

    @nn.compact
    def __call__(self, x, train: bool):
        x = self.bn(use_running_average=not train)(nn.Dense(3)(x))
        return self.bn(use_running_average=not train)(nn.Dense(2)(x))


@pytest.mark.parametrize("batch", [1, 6])
def test_linen_tabulate_show_repeated_gives_flaxs_table(batch):
    x = randn(0, (batch, 4))
    tables = both(
        lambda cls: Net(cls).tabulate(
            jax.random.key(0), x, True, show_repeated=True, console_kwargs=CONSOLE
        ),
        LINEN,
    )
    assert tables[0] == tables[1]


def test_linen_intercept_methods_sees_flaxs_calls():
    x = randn(0, (6, 4))

    def run(cls):
        calls = []

        def record(next_fun, args, kwargs, context):
            calls.append((type(context.module).__name__, context.method_name))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            variables = Net(cls).init(jax.random.key(0), x, True)
            Net(cls).apply(variables, x, True, mutable=["batch_stats"])
        return calls

    ours, theirs = both(run, LINEN)
    assert ours == theirs


# Item 8 (modules): virtual_batch_size constrains training only.


def test_linen_virtual_batch_size_leaves_one_example_init_and_eval_as_flax():
    one, partial = randn(0, (1, 3)), randn(1, (6, 3), 2.0, 1.0)
    stats = {"mean": randn(2, (3,)), "var": 1 + randn(3, (3,)) ** 2}

    def run(cls):
        bn = cls(**INITS)
        y0, variables = bn.init_with_output(jax.random.key(0), one, use_running_average=False)
        y = bn.apply({**variables, "batch_stats": stats}, partial, use_running_average=True)
        return y0, variables, y

    ours = run(functools.partial(jaxbn.linen.BatchNorm, virtual_batch_size=4))
    assert_same(ours, run(LINEN["flax"]))


def test_nnx_virtual_batch_size_leaves_eval_as_flax():
    partial = randn(1, (6, 3), 2.0, 1.0)

    def run(cls):
        bn = cls(3, **INITS, rngs=nnx.Rngs(0))
        bn.mean[...], bn.var[...] = randn(2, (3,)), 1 + randn(3, (3,)) ** 2
        bn.eval()
        return bn(partial)

    ours = run(functools.partial(jaxbn.nnx.BatchNorm, virtual_batch_size=4))
    assert_same(ours, run(NNX["flax"]))


# Not in the issue: axis_index_groups without axis_name (Flax ignores them).


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_axis_index_groups_without_axis_name_train_as_flax(kind):
    x = randn(0, (6, 3), 2.0, 1.0)

    def run(cls):
        if kind == "linen":
            bn = cls(use_running_average=False, axis_index_groups=[[0]])
            return bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
        bn = cls(3, axis_index_groups=[[0]], rngs=nnx.Rngs(0))
        return bn(x), nnx.to_pure_dict(nnx.state(bn))

    ours, theirs = both(run, LINEN if kind == "linen" else NNX)
    assert_same(ours, theirs)


# Not in the issue: forward mode through a training call needs custom_vjp=False.


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_forward_mode_in_training_with_custom_vjp_off_matches_flax(kind):
    x, t = randn(0, (6, 3), 2.0, 1.0), randn(1, (6, 3))

    def run(cls):
        if kind == "linen":
            bn = cls(use_running_average=False, **INITS)
            variables = bn.init(jax.random.key(0), x)
            f = lambda x: bn.apply(variables, x, mutable=["batch_stats"])  # noqa: E731
        else:

            def f(x):  # a module built outside would be mutated from inside the jvp
                bn = cls(3, **INITS, rngs=nnx.Rngs(0))
                return bn(x), nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat))

        return jax.jvp(f, (x,), (t,))

    modules = {**(LINEN if kind == "linen" else NNX)}
    ours_cls = modules["jaxbn"]
    with pytest.raises(TypeError, match="custom_vjp=False"):
        run(ours_cls)
    modules["jaxbn"] = functools.partial(ours_cls, custom_vjp=False)
    ours, theirs = both(run, modules)
    assert_same(ours, theirs)


# Items 3, 7, 9: complex inputs, Explicit meshes, symbolic shapes, through the modules.


@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")  # nnx's
@pytest.mark.filterwarnings("ignore:Casting complex values to real")  # nnx's real BatchStat
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_complex_input_trains_as_flax(kind):
    x = (randn(0, (8, 2)) + 1j * randn(1, (8, 2), 2.0, 1.0)).astype(jnp.complex64)
    if kind == "linen":

        def run(cls):
            bn = cls(momentum=0.9, use_running_average=False, dtype=jnp.complex64)
            y0, variables = bn.init_with_output(jax.random.key(0), x)
            y1, upd = bn.apply(variables, x, mutable=["batch_stats"])
            # a second step starts from the complex running mean the first stored
            return y0, y1, upd, bn.apply({**variables, **upd}, x, mutable=["batch_stats"])

        ours, theirs = both(run, LINEN)
    else:

        def run(cls):
            bn = cls(2, dtype=jnp.complex64, rngs=nnx.Rngs(0))
            return bn(x), nnx.to_pure_dict(nnx.state(bn))

        ours, theirs = both(run, NNX)
    assert_same(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("context", [True, False], ids=["set_mesh", "no_mesh_context"])
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_batch_sharded_jit_on_an_explicit_mesh_trains_as_flax(kind, context):
    # JAX's default mesh axes are Explicit; jitting arrays sharded on one needs no
    # mesh context (issue 23: jaxbn asked for one)
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = randn(0, (16, 3), 2.0, 1.0)
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))

    def run(cls):
        if kind == "linen":
            bn = cls(use_running_average=False)
            variables = bn.init(jax.random.key(0), x)
        with jax.set_mesh(mesh) if context else contextlib.nullcontext():
            if kind == "linen":
                return jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(variables, xs)
            model = cls(3, rngs=nnx.Rngs(0))
            return nnx.jit(lambda m, x: m(x))(model, xs), nnx.to_pure_dict(nnx.state(model))

    ours, theirs = both(run, LINEN if kind == "linen" else NNX)
    assert_same(ours, theirs)


def test_export_with_a_symbolic_batch_runs_as_flax():
    (b,) = jax.export.symbolic_shape("b")
    x = randn(0, (6, 4), 2.0, 1.0)

    def run(cls):
        bn = cls(use_running_average=False)
        variables = bn.init(jax.random.key(0), x)
        f = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
        exp = jax.export.export(f)(variables, jax.ShapeDtypeStruct((b, 4), jnp.float32))
        return exp.call(variables, x)

    ours, theirs = both(run, LINEN)
    assert_same(ours, theirs)


# Flax's own test files, when a google/flax git directory is at hand (slow: minutes).


@pytest.mark.skipif(
    not os.environ.get("JAXBN_FLAX_GIT"),
    reason="set JAXBN_FLAX_GIT to a google/flax git directory to run Flax's own tests",
)
def test_flaxs_own_batchnorm_tests_pass_with_jaxbns_modules():
    from flax_suite.run_flax_tests import main

    assert main([os.environ["JAXBN_FLAX_GIT"], "--", "-x"]) == 0


# Code that selects layers by type (issue 23): jaxbn's classes are Flax's subclasses.


@pytest.mark.skipif(not hasattr(nnx, "view"), reason="nnx.view needs flax >= 0.12.4")
def test_nnx_view_only_batchnorm_flips_jaxbns_layers_as_flaxs():
    x = randn(0, (8, 3), 2.0, 1.0)

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


def test_linen_interceptor_filtering_on_nn_batchnorm_sees_jaxbns_layers():
    x = randn(0, (8, 3), 2.0, 1.0)

    def run(cls):
        class Model(nn.Module):
            @nn.compact
            def __call__(self, x):
                return cls(use_running_average=False)(nn.Dense(3)(x))

        seen = []

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
                seen.append(type(context.module).__module__)
            return next_fun(*args, **kwargs)

        model = Model()
        variables = model.init(jax.random.key(0), x)
        with nn.intercept_methods(record):
            y, _ = model.apply(variables, x, mutable=["batch_stats"])
        return len(seen), y

    (n_ours, y_ours), (n_theirs, y_theirs) = both(run, LINEN)
    assert n_ours == n_theirs == 1
    assert_same(y_ours, y_theirs)
