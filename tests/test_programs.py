"""The program each platform gets, read from its StableHLO, and the compiled program's
structure on CPU.

The clean program (every platform but CPU) is checked by lowering for "cuda" (and
"tpu") on this CPU machine: no conditional, no barrier, one reduction over x-sized
operands per pass. Its numerics run on CPU under ``use_clean_program`` (the
``program`` fixture of conftest.py runs a test with both programs), in the feature
files (test_batch_norm_numerics.py, test_masks.py, ...).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo import assert_clean, lowered, x_reductions
from jax.sharding import PartitionSpec as P
from reference import problem

import jaxbn

ND = 8


SHAPE = (8, 4, 4, 16)  # NHWC


def bn(x, g, b, **kw):
    return jaxbn.batch_norm(x, g, b, jaxbn.init_state(x.shape[-1]), training=True, **kw)


VARIANTS = {
    "plain": {},
    "masked": {"mask": jnp.asarray(np.random.RandomState(1).rand(SHAPE[0], 1, 1, 1) > 0.3)},
    "renorm": {"renorm": (2.0, 1.0)},
    "ghost": {"virtual_batch_size": 4},
    "momentum_none": {"momentum": None},
}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_clean_program_forward_is_one_pass_of_statistics(variant, platform):
    x, g, b, _ = problem(SHAPE, offset=3.0)
    text = lowered(lambda x, g, b: bn(x, g, b, **VARIANTS[variant]), x, g, b, platform=platform)
    assert_clean(text)
    assert len(x_reductions(text, x.size)) == 1, x_reductions(text, x.size)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_clean_program_forward_backward_is_two_reductions(variant):
    x, g, b, _ = problem(SHAPE, offset=3.0)
    w = jnp.sin(x)
    f = lambda x, g, b: jnp.sum(bn(x, g, b, **VARIANTS[variant])[0] * w)  # noqa: E731
    text = lowered(jax.grad(f, (0, 1, 2)), x, g, b)
    assert_clean(text)
    # statistics in the forward, both sums of the backward in one reduce
    assert len(x_reductions(text, x.size)) == 2, x_reductions(text, x.size)


def test_clean_program_eval_has_no_reduction():
    x, g, b, _ = problem(SHAPE, offset=3.0)
    st = jaxbn.init_state(16)
    text = lowered(lambda x: jaxbn.batch_norm(x, g, b, st, training=False)[0], x)
    assert_clean(text)
    assert x_reductions(text, x.size) == []


def test_cpu_program_keeps_its_tactics():
    # the other side of the switch: CPU still gets the fast-statistics cond and barriers
    x, g, b, _ = problem(SHAPE, offset=3.0)
    text = lowered(lambda x, g, b: bn(x, g, b), x, g, b, platform="cpu")
    assert "stablehlo.case" in text and "optimization_barrier" in text


def test_clean_program_across_devices_under_shard_map():
    x, g, b, _ = problem((16, 4, 4, 16), offset=3.0)
    mesh = jax.make_mesh((ND,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))

    def local(x, g, b):
        y, st = bn(x, g, b, axis_name="batch")
        return y, st

    f = jax.shard_map(
        local, mesh=mesh, in_specs=(P("batch"), P(), P()), out_specs=(P("batch"), P())
    )
    w = jnp.sin(x)
    loss = lambda x, g, b: jnp.sum(f(x, g, b)[0] * w)  # noqa: E731
    text = lowered(jax.grad(loss, (0, 1, 2)), x, g, b)
    assert_clean(text)
    local_size = x.size // ND
    assert len(x_reductions(text, local_size)) == 2


@pytest.mark.parametrize("module", ["linen", "nnx"])
def test_clean_program_in_a_flax_training_step(module):
    import optax

    x, _, _, _ = problem(SHAPE, offset=3.0)
    labels = jnp.sin(x)
    if module == "linen":
        import flax.linen as nn

        import jaxbn.linen

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                h = nn.Dense(16, use_bias=False)(x)  # a bias's gradient would be a reduction too
                return jaxbn.linen.BatchNorm(use_running_average=False)(h)

        net = Net()
        variables = net.init(jax.random.key(0), x)
        opt = optax.sgd(0.1)
        opt_state = opt.init(variables["params"])

        def step(params, stats, opt_state, x):
            def loss(params):
                y, upd = net.apply(
                    {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
                )
                return jnp.mean((y - labels) ** 2), upd

            (_, upd), grads = jax.value_and_grad(loss, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state)
            return optax.apply_updates(params, updates), upd, opt_state

        args = (variables["params"], variables["batch_stats"], opt_state, x)
        text = lowered(step, *args)
    else:
        from flax import nnx

        import jaxbn.nnx

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.dense = nnx.Linear(16, 16, use_bias=False, rngs=rngs)
                self.bn = jaxbn.nnx.BatchNorm(16, rngs=rngs)

            def __call__(self, x):
                return self.bn(self.dense(x))

        model = Net(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

        def step(model, optimizer, x):
            loss = lambda m: jnp.mean((m(x) - labels) ** 2)  # noqa: E731
            grads = nnx.grad(loss)(model)
            optimizer.update(model, grads)

        graphdef, state = nnx.split((model, optimizer))

        def pure(state, x):
            m, o = nnx.merge(graphdef, state)
            step(m, o, x)
            return nnx.split((m, o))[1]

        text = lowered(pure, state, x)
    assert_clean(text)
    assert len(x_reductions(text, x.size)) == 2


def _root_and_x(f, *args, options):
    """The compiled entry computation's ROOT line, and the name of its first parameter,
    compiled with `options` (XLA's default fusions: the ``xla_cpu_defaults`` fixture)."""
    text = jax.jit(f).lower(*args).compile(compiler_options=options).as_text()
    lines = text[text.index("\nENTRY") :].splitlines()
    root = next(ln for ln in lines if ln.strip().startswith("ROOT"))
    x = next(ln for ln in lines if " parameter(0)" in ln).split("=")[0].strip()
    return root.split(", metadata")[0], x


@pytest.mark.parametrize("training", [True, False])
def test_output_fuses_with_a_following_relu(training, xla_cpu_defaults):
    # relu(y) comes out of one fusion that reads x: the normalization leaves XLA free
    # to fuse its consumer (no cond, call or custom call around it), as flax's does.
    x, g, b, _ = problem((64, 16))
    s = jaxbn.init_state(16)
    f = lambda x, s: jax.nn.relu(jaxbn.batch_norm(x, g, b, s, training=training)[0])  # noqa: E731
    root, x_name = _root_and_x(f, x, s, options=xla_cpu_defaults)
    assert "maximum" in root and " fusion(" in root and x_name in root, root
