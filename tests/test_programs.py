"""The program each platform gets, read from its StableHLO, and the clean program's edges.

The clean program (every platform but CPU) is checked by lowering for "cuda" (and
"tpu") on this CPU machine: no conditional, no barrier, one reduction over x-sized
operands per pass. Its numerics run on CPU under ``use_clean_program`` (the
``program`` fixture of conftest.py runs a test with both programs).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from reference import bn_ref, np_stats, rel_err

import jaxbn

ND = 8


def lowered(f, *args, platform="cuda"):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def x_reductions(text, size):
    """The reduce ops of the module that read an operand with ``size`` elements."""
    found = []
    for line in text.splitlines():
        if "stablehlo.reduce" not in line or "applies" in line and "stablehlo.reduce(" not in line:
            continue
        sig = line.rsplit(":", 1)[-1]
        operands = sig.split("->")[0]
        dims = re.findall(r"tensor<([0-9x]+)x[a-z]+[0-9]*>", operands)
        if any(int(np.prod([int(d) for d in ds.split("x")])) == size for ds in dims):
            found.append(line.strip())
    return found


def assert_clean(text):
    """No control flow and no barrier, but lax.platform_dependent's switch: lowered for one
    platform, a case of constants picks the one branch kept, in a one-branch case that XLA
    inlines before compiling anything (the compiled H100 program: benchmarks/gpu_program.py)."""
    picks = re.findall(r'(%\w+) = "stablehlo.case"\(%c\w*\)', text)
    kept = sum(len(re.findall(rf'"stablehlo.case"\({p}\)', text)) for p in picks)
    assert text.count('"stablehlo.case"') == len(picks) + kept, "stablehlo.case"
    for op in ("stablehlo.if", "stablehlo.while", "optimization_barrier"):
        assert op not in text, op


SHAPE = (8, 4, 4, 16)  # NHWC


def inputs(shape=SHAPE, seed=0):
    rs = np.random.RandomState(seed)
    x = jnp.asarray(rs.randn(*shape) * 2 + 3, jnp.float32)
    c = shape[-1]
    return x, jnp.asarray(rs.rand(c) + 0.5, jnp.float32), jnp.asarray(rs.randn(c), jnp.float32)


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
    x, g, b = inputs()
    text = lowered(lambda x, g, b: bn(x, g, b, **VARIANTS[variant]), x, g, b, platform=platform)
    assert_clean(text)
    assert len(x_reductions(text, x.size)) == 1, x_reductions(text, x.size)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_clean_program_forward_backward_is_two_reductions(variant):
    x, g, b = inputs()
    w = jnp.sin(x)
    f = lambda x, g, b: jnp.sum(bn(x, g, b, **VARIANTS[variant])[0] * w)  # noqa: E731
    text = lowered(jax.grad(f, (0, 1, 2)), x, g, b)
    assert_clean(text)
    # statistics in the forward, both sums of the backward in one reduce
    assert len(x_reductions(text, x.size)) == 2, x_reductions(text, x.size)


def test_clean_program_eval_has_no_reduction():
    x, g, b = inputs()
    st = jaxbn.init_state(16)
    text = lowered(lambda x: jaxbn.batch_norm(x, g, b, st, training=False)[0], x)
    assert_clean(text)
    assert x_reductions(text, x.size) == []


def test_cpu_program_keeps_its_tactics():
    # the other side of the switch: CPU still gets the fast-statistics cond and barriers
    x, g, b = inputs()
    text = lowered(lambda x, g, b: bn(x, g, b), x, g, b, platform="cpu")
    assert "stablehlo.case" in text and "optimization_barrier" in text


def test_clean_program_across_devices_under_shard_map():
    x, g, b = inputs((16, 4, 4, 16))
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

    x, _, _ = inputs()
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


def test_export_for_cpu_and_cuda_serializes_and_runs_on_cpu(program):
    export = pytest.importorskip("jax.export")
    x, g, b = inputs((32, 6))
    st = jaxbn.init_state(6)

    def step(x, g, b, st):
        def loss(x, g, b):
            y, new = jaxbn.batch_norm(x, g, b, st, training=True)
            return jnp.sum(y * jnp.sin(x)), new

        (value, new), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, g, b)
        return value, new, grads

    exp = export.export(jax.jit(step), platforms=("cpu", "cuda"))(x, g, b, st)
    got = export.deserialize(exp.serialize()).call(x, g, b, st)
    want = jax.jit(step)(x, g, b, st)
    assert isinstance(got[1], jaxbn.BatchNormState)
    for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_export_with_a_symbolic_batch():
    export = pytest.importorskip("jax.export")
    (b,) = export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, 6), jnp.float32)
    st = jaxbn.init_state(6)
    f = jax.jit(lambda x: jaxbn.batch_norm(x, None, None, st, training=True))
    exp = export.export(f, platforms=("cpu", "cuda"))(spec)
    x = jnp.asarray(np.random.RandomState(2).randn(10, 6) + 4, jnp.float32)
    for a, w in zip(jax.tree.leaves(exp.call(x)), jax.tree.leaves(f(x))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-6, atol=1e-6)


# The clean program's (and CPU's) edges: issue-12-style adversarial inputs.


def train(x, **kw):
    st = jaxbn.init_state(x.shape[-1])
    return jaxbn.batch_norm(x, None, None, st, training=True, momentum=0.0, **kw)


def y_ref(x, mask=None):
    mean, var = np_stats(x, mask=mask)
    return (np.asarray(x, np.float64) - mean) / np.sqrt(var + 1e-5), var


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_mask_excluding_the_first_row_keeps_large_offsets_exact(offset, program):
    rs = np.random.RandomState(3)
    x = (offset + rs.randn(4096, 4)).astype(np.float32)
    x[0] = -3e38  # a value that does not count may be anything
    mask = np.ones((4096, 1), bool)
    mask[0] = False
    y, s = train(jnp.asarray(x), mask=jnp.asarray(mask))
    ref, var = y_ref(x[1:])
    assert np.max(np.abs(np.asarray(s.var, np.float64) / var - 1)) < 1e-4
    assert np.max(np.abs(np.asarray(y, np.float64)[1:] - ref)) < 1e-4


@pytest.mark.parametrize("value", [1.0, 1e24, 1e26, 1e27])
def test_masked_constant_feature_with_first_value_masked_out(value, program):
    x = np.full((64, 3), value, np.float32)
    x[0] = 7.0
    mask = np.ones((64, 1), bool)
    mask[0] = False
    y, s = train(jnp.asarray(x), mask=jnp.asarray(mask))
    assert np.all(np.asarray(s.var) == 0) and np.all(np.asarray(s.mean) == np.float32(value))
    assert np.all(np.asarray(y)[1:] == 0)


def test_outlier_first_row_is_not_the_shift(program):
    rs = np.random.RandomState(4)
    x = (1e6 + rs.randn(2048, 4)).astype(np.float32)
    x[0] = 1e6 + 3e3  # a 3000-std outlier as the first value
    y, s = train(jnp.asarray(x))
    ref, var = y_ref(x)
    assert np.max(np.abs(np.asarray(s.var, np.float64) / var - 1)) < 1e-4
    assert np.max(np.abs(np.asarray(y, np.float64) - ref) / np.maximum(1, np.abs(ref))) < 1e-4


def test_values_whose_squares_overflow(program):
    rs = np.random.RandomState(5)
    x = (rs.randn(64, 2) * 1e19).astype(np.float32)
    y, s = train(jnp.asarray(x))
    ref, var = y_ref(x)
    assert np.all(np.isfinite(var)) and np.all(np.isfinite(np.asarray(s.var)))
    assert np.max(np.abs(np.asarray(s.var, np.float64) / var - 1)) < 1e-5
    assert np.max(np.abs(np.asarray(y, np.float64) - ref)) < 1e-5


def test_variance_beyond_float32_range_is_inf_and_output_is_beta(program):
    x = jnp.asarray([[3e38], [-3e38], [1e38], [-1e38]], jnp.float32)
    y, s = jaxbn.batch_norm(
        x, None, jnp.asarray([0.5]), jaxbn.init_state(1), training=True, momentum=0.0
    )
    assert abs(float(s.mean[0])) < 1e-6 * 3e38 and np.isposinf(float(s.var[0]))
    assert np.all(np.asarray(y) == 0.5)


def test_device_zero_fully_masked_keeps_large_offsets_exact(program):
    rs = np.random.RandomState(6)
    n = 8 * ND
    x = (1e6 + rs.randn(n, 4)).astype(np.float32)
    x[:8] = 1e30  # device 0's rows: garbage, masked out (finite: dy * x must be 0 there)
    mask = np.ones((n, 1), bool)
    mask[:8] = False
    g = jnp.asarray(rs.rand(4) + 0.5, jnp.float32)
    w = jnp.asarray(rs.randn(n, 4), jnp.float32)
    mesh = jax.make_mesh((ND,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))

    def local(x, m, w, g):
        def loss(x, g):
            y, st = jaxbn.batch_norm(
                x,
                g,
                None,
                jaxbn.init_state(4),
                training=True,
                mask=m,
                axis_name="batch",
                momentum=0.0,
            )
            return jnp.sum(jnp.where(m, y * w, 0)), (y, st)

        (_, (y, st)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, g)
        return y, st, grads[0], grads[1]  # the replicated gamma's gradient is summed already

    f = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P("batch"), P("batch"), P("batch"), P()),
            out_specs=(P("batch"), P(), P("batch"), P()),
        )
    )
    put = lambda v: jax.device_put(v, NamedSharding(mesh, P("batch")))  # noqa: E731
    y, st, dx, dg = f(put(jnp.asarray(x)), put(jnp.asarray(mask)), put(w), g)
    ref, var = y_ref(x[8:])
    assert np.max(np.abs(np.asarray(st.var, np.float64) / var - 1)) < 1e-4
    assert np.max(np.abs(np.asarray(y, np.float64)[8:] - ref * np.asarray(g))) < 1e-4
    with jax.enable_x64(True):
        x64 = jnp.asarray(x[8:], jnp.float64)
        loss = lambda x, g: jnp.sum(bn_ref(x, g, None)[0] * w[8:].astype(jnp.float64))  # noqa: E731
        dx_r, dg_r = jax.grad(loss, (0, 1))(x64, g.astype(jnp.float64))
    assert rel_err(np.asarray(dx)[8:], dx_r) < 1e-4 and rel_err(dg, dg_r) < 1e-4


def test_feature_no_value_counts_for_is_normalized_with_the_running_statistics(program):
    rs = np.random.RandomState(7)
    x = jnp.asarray(rs.randn(16, 3) * 2 + 1, jnp.float32)
    mask = jnp.asarray(np.tile([True, True, False], (16, 1)))
    st = jaxbn.BatchNormState(
        jnp.array([0.0, 0.0, 3.0]), jnp.array([1.0, 1.0, 4.0]), jnp.asarray(0, jnp.int32)
    )
    g, b = jnp.array([1.0, 1.0, 2.0]), jnp.array([0.0, 0.0, 0.5])
    f = lambda x, g: jaxbn.batch_norm(x, g, b, st, training=True, mask=mask)  # noqa: E731
    y, new = f(x, g)
    want = (np.asarray(x)[:, 2] - 3.0) / np.sqrt(4.0 + 1e-5) * 2.0 + 0.5
    np.testing.assert_allclose(np.asarray(y)[:, 2], want, rtol=1e-6)
    assert float(new.mean[2]) == 3.0 and float(new.var[2]) == 4.0
    dy = jnp.asarray(rs.randn(16, 3), jnp.float32)
    dx, dg = jax.vjp(lambda x, g: f(x, g)[0], x, g)[1](dy)
    # a constant affine map there: dx = gamma / sqrt(var + eps) * dy, dgamma = sum(dy * xhat)
    np.testing.assert_allclose(
        np.asarray(dx)[:, 2], 2.0 / np.sqrt(4.0 + 1e-5) * dy[:, 2], rtol=1e-5
    )
    xhat = (np.asarray(x)[:, 2] - 3.0) / np.sqrt(4.0 + 1e-5)
    np.testing.assert_allclose(float(dg[2]), float(np.sum(np.asarray(dy)[:, 2] * xhat)), rtol=1e-5)


def test_both_programs_agree_on_random_data():
    from jaxbn._platform import use_clean_program

    x, g, b = inputs((32, 5, 5, 8), seed=8)
    w = jnp.sin(x)
    f = lambda x, g, b: jnp.sum(bn(x, g, b)[0] * w)  # noqa: E731
    cpu = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(x, g, b)
    with use_clean_program():
        clean = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(x, g, b)
    for a, c in zip(jax.tree.leaves(cpu), jax.tree.leaves(clean)):
        assert rel_err(a, c) < 1e-5
