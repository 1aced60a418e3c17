"""jaxbn.batch_norm_act against jax.vjp of the plain composition act(bn_ref(x) + r), and
activation= on jaxbn.linen.BatchNorm and jaxbn.nnx.BatchNorm against Flax's own
BatchNorm (use_fast_variance=False) followed by the activation, with the same
variables: outputs, running statistics and gradients of a random cotangent must agree,
and a Flax checkpoint must load unchanged."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cpu_bench import program as compiled_program
from cpu_bench import residual_bytes
from flax import nnx
from hlo import assert_clean, lowered, x_reductions
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
from reference import bn_ref, problem, randn, rel_err, vjp_jit

import jaxbn
import jaxbn.linen
import jaxbn.nnx

SLOPE = 0.1
ACTS = {
    "relu": jax.nn.relu,
    "leaky_relu": lambda p: jax.nn.leaky_relu(p, SLOPE),
    "identity": lambda p: p,
}
LAYOUTS = {  # shape, feature axis, masked
    "nc": ((16, 6), -1, False),
    "nchw_masked": ((4, 3, 3, 2), 1, True),
}
TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}


def make(layout, dtype, seed=0):
    shape, axis, masked = LAYOUTS[layout]
    x, gamma, beta, dz = problem(shape, axis, seed=seed, dtype=dtype, scale=3.0, offset=2.0)
    r = randn(shape, seed=seed + 3, dtype=dtype)
    rs = np.random.RandomState(seed + 4)
    mask = None
    if masked:  # every feature keeps values
        m = rs.rand(*shape) > 0.4
        m[:2] = True
        mask = jnp.asarray(m)
    return x, gamma, beta, r, dz, mask, axis


def fused(act, axis, mask, state, **kw):
    """The op, keeping z (inplace) wherever it can, so that both paths are tested."""

    def f(x, gamma, beta, r):
        kw.setdefault("inplace", act != "relu")
        z, st = jaxbn.batch_norm_act(
            x, gamma, beta, state, training=True, activation=act, negative_slope=SLOPE,
            residual=r, axis=axis, mask=mask, **kw,
        )  # fmt: skip
        return z, st.mean, st.var

    return f


def composed(act, axis, mask, state):
    def f(x, gamma, beta, r):
        y, mean, var = bn_ref(x, gamma, beta, axis=axis, mask=mask)
        z = ACTS[act](y if r is None else y + r)
        return z, 0.9 * state.mean + 0.1 * mean, 0.9 * state.var + 0.1 * var

    return f


@pytest.mark.parametrize(
    "act, with_residual, layout, clean",  # every activation in both layouts, with and without r
    [
        ("relu", False, "nc", False),
        ("relu", True, "nchw_masked", False),
        ("leaky_relu", False, "nchw_masked", False),
        ("leaky_relu", True, "nc", False),
        ("identity", False, "nc", False),
        ("identity", True, "nchw_masked", False),
        ("relu", True, "nchw_masked", True),  # the clean program: keep x, then keep z
        ("leaky_relu", False, "nchw_masked", True),
        ("leaky_relu", True, "nchw_masked", "keep x"),  # x and the sign of p, not z and r
    ],
)
def test_gradients_equal_the_composition(act, with_residual, layout, clean, clean_program):
    kw = dict(inplace=False) if clean == "keep x" else {}
    with clean_program() if clean is True else contextlib.nullcontext():
        for dtype in (jnp.float64, jnp.float32):
            with jax.enable_x64(True):
                _check_gradients(act, with_residual, layout, dtype, **kw)


def _check_gradients(act, with_residual, layout, dtype, **kw):
    x, gamma, beta, r, dz, mask, axis = make(layout, dtype)
    r = r if with_residual else None
    st = jaxbn.init_state(x.shape[axis], dtype)
    rs = np.random.RandomState(1)
    cts = (dz, *(jnp.asarray(rs.randn(x.shape[axis]), dtype) for _ in range(2)))
    vjp = lambda f: jax.jit(lambda *a: jax.vjp(f, *a)[1](cts))  # noqa: E731
    got = vjp(fused(act, axis, mask, st, **kw))(x, gamma, beta, r)
    want = vjp(composed(act, axis, mask, st))(x, gamma, beta, r)
    for name, a, b in zip(("x", "gamma", "beta", "r"), got, want):
        assert (a is None) == (b is None) == (name == "r" and not with_residual)
        if a is not None:
            assert a.dtype == b.dtype
            assert rel_err(a, b) < TOL[dtype], (layout, dtype, name)


# each activation, and each of relu's residual choices (x and the sign; x alone)
@pytest.mark.parametrize(
    "act,with_residual",
    [("relu", False), ("relu", True), ("leaky_relu", False), ("identity", True)],
)
def test_second_order_reverse(act, with_residual):
    with jax.enable_x64(True):
        x, gamma, beta, r, _, _, axis = make("nc", jnp.float64, seed=3)
        st = jaxbn.init_state(x.shape[axis], jnp.float64)
        w = jnp.asarray(np.random.RandomState(4).randn(*x.shape))
        f = fused(act, axis, None, st)
        loss = jax.jit(lambda x, g, b, r: jnp.sum(f(x, g, b, r)[0] * w))
        args = (x, gamma, beta, r if with_residual else None)
        check_grads(loss, args, order=2, modes=["rev"])


def test_gamma_near_zero_keeping_z():
    with jax.enable_x64(True):
        x, gamma, beta, _, dz, _, axis = make("nc", jnp.float64)
        gamma = gamma.at[0].set(0.0).at[1].set(1e-3).at[2].set(-1e-6)
        st = jaxbn.init_state(6, jnp.float64)
        cts = (dz, jnp.zeros(6), jnp.zeros(6))
        primals = (x, gamma, beta, None)
        dx, dg, db, _ = vjp_jit(fused("leaky_relu", axis, None, st), primals, cts)[1]
        dx0, dg0, db0, _ = vjp_jit(composed("leaky_relu", axis, None, st), primals, cts)[1]
        assert rel_err(dx, dx0) < 1e-10 and rel_err(db, db0) < 1e-10
        # z holds no xhat where gamma == 0: dgamma is 0 there, exact elsewhere
        assert dg[0] == 0 and dg0[0] != 0
        assert rel_err(dg[1:], dg0[1:]) < 1e-9


@pytest.mark.parametrize(
    "act, with_residual, kept, full",
    [
        ("relu", False, "x", 1.0),
        ("relu", True, "x", 1.25),  # x and one byte of sign per value
        ("identity", True, "zr", 2.0),  # z and the residual (an input kept anyway)
        ("leaky_relu", True, "zr", 2.0),
        ("leaky_relu", False, "z", 1.0),
        ("identity", False, "z", 1.0),
    ],
)
def test_residual_bytes(act, with_residual, kept, full):
    x, gamma, beta, r, _, _, _ = make("nc", jnp.float32)
    x, r = jnp.tile(x, (8, 1)), jnp.tile(r, (8, 1))  # x-sized leaves stand out
    f = lambda x, g, b: fused(act, -1, None, jaxbn.init_state(6))(  # noqa: E731
        x, g, b, r if with_residual else None
    )
    measured = residual_bytes(f, x, gamma, beta)
    assert measured["full"] == full, measured
    assert measured["all"] < full + 0.1, measured
    _, vjp = jax.vjp(f, x, gamma, beta)
    big = [v for v in jax.tree.leaves(vjp) if v.size == x.size and v.dtype == x.dtype]
    want = {"x": [x], "z": [f(x, gamma, beta)[0]], "zr": [f(x, gamma, beta)[0], r]}[kept]
    assert len(big) == len(want)
    for got in want:  # each kept array is one of the leaves
        assert any(np.array_equal(b, got) for b in big)


@pytest.mark.parametrize("act", list(ACTS))
def test_clean_program_has_one_reduce_per_pass(act):
    x, gamma, beta, r, dz, mask, _ = make("nc", jnp.float32)
    for res in (None, r):
        f = lambda x, g, b, res=res: jnp.sum(  # noqa: E731
            fused(act, -1, None, jaxbn.init_state(6))(x, g, b, res)[0] * dz
        )
        text = lowered(jax.grad(f, (0, 1, 2)), x, gamma, beta)
        assert_clean(text)
        assert len(x_reductions(text, x.size)) == 2, x_reductions(text, x.size)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_program_keeping_x_is_batch_norm_then_relu(dtype):
    # On XLA:CPU writing g once is the fastest form (jaxbn._act); XLA compiles BN then
    # relu to that too, so the fused op must compile to exactly the same program.
    rs = np.random.RandomState(0)
    x, dz = (jnp.asarray(rs.randn(64, 16), dtype) for _ in range(2))
    gamma, beta = jnp.asarray(rs.rand(16) + 0.5), jnp.asarray(rs.randn(16))
    state = jaxbn.init_state(16)

    def loss(bn_relu):
        return lambda x, g, b, dz: jnp.sum(bn_relu(x, g, b).astype(jnp.float32) * dz)

    def fused_op(x, g, b):
        return jaxbn.batch_norm_act(x, g, b, state, training=True, activation="relu")[0]

    def composition(x, g, b):
        return jax.nn.relu(jaxbn.batch_norm(x, g, b, state, training=True)[0])

    programs = [
        compiled_program(jax.grad(loss(f), (0, 1, 2)), x, gamma, beta, dz)
        for f in (fused_op, composition)
    ]
    assert sorted(programs[0]) == sorted(programs[1])  # the same kernels (order aside)


def test_across_devices_equals_one_device(program):
    x, gamma, beta, r, dz, _, _ = make("nc", jnp.float32)
    x, r, dz = (jnp.tile(v, (2, 1)) for v in (x, r, dz))
    msh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
    for act, res in (("relu", r), ("leaky_relu", None)):

        def grads(x, r, dz, gamma, beta, axis_name=None, act=act):
            def loss(x, gamma, beta, r):
                z, _ = jaxbn.batch_norm_act(
                    x, gamma, beta, jaxbn.init_state(6), training=True, activation=act,
                    residual=r, axis_name=axis_name,
                )  # fmt: skip
                return jnp.sum(z * dz)

            return jax.grad(loss, (0, 1, 2, 3))(x, gamma, beta, r)

        spec = P() if res is None else P("batch")
        f = jax.shard_map(
            lambda x, r, dz, g, b: grads(x, r, dz, g, b, "batch"),
            mesh=msh,
            in_specs=(P("batch"), spec, P("batch"), P(), P()),
            out_specs=(P("batch"), P(), P(), spec),
        )
        put = lambda v: jax.device_put(v, NamedSharding(msh, P("batch")))  # noqa: E731
        got = jax.jit(f)(put(x), None if res is None else put(r), put(dz), gamma, beta)
        for a, b in zip(got, jax.jit(grads)(x, res, dz, gamma, beta)):
            assert (a is None) == (b is None)
            if a is not None:
                assert rel_err(a, b) < 1e-5


def test_eval_forward_mode_and_dtype():
    x, gamma, beta, r, _, _, _ = make("nc", jnp.float32)
    st = jaxbn.init_state(6)._replace(mean=jnp.full(6, 0.5), var=jnp.full(6, 2.0))
    z, st2 = jaxbn.batch_norm_act(x, gamma, beta, st, training=False, residual=r)
    y, _ = jaxbn.batch_norm(x, gamma, beta, st, training=False)
    np.testing.assert_array_equal(z, jax.nn.relu(y + r))
    assert st2 is st
    f = lambda x, custom: jaxbn.batch_norm_act(  # noqa: E731
        x, gamma, beta, st, training=True, activation="leaky_relu", custom_vjp=custom
    )[0]
    ref = lambda x: jax.nn.leaky_relu(bn_ref(x, gamma, beta)[0], 0.01)  # noqa: E731
    t = jnp.asarray(np.random.RandomState(5).randn(*x.shape), jnp.float32)
    jvp = jax.jit(lambda f, x, t: jax.jvp(f, (x,), (t,))[1], static_argnums=0)
    assert rel_err(jvp(lambda x: f(x, False), x, t), jvp(ref, x, t)) < 1e-5
    with pytest.raises(TypeError, match="pass custom_vjp=False"):
        jax.jvp(lambda x: f(x, True), (x,), (t,))
    zb, stb = jaxbn.batch_norm_act(x.astype(jnp.bfloat16), gamma, beta, st, training=True)
    assert zb.dtype == jnp.bfloat16 and stb.mean.dtype == jnp.float32


def test_by_default_x_is_kept_and_a_zero_gamma_gets_its_gradient():
    with jax.enable_x64(True):
        x, gamma, beta, _, dz, _, axis = make("nc", jnp.float64)
        gamma = gamma.at[0].set(0.0)
        st = jaxbn.init_state(6, jnp.float64)
        cts = (dz, jnp.zeros(6), jnp.zeros(6))
        f = fused("leaky_relu", axis, None, st, inplace=False)
        got = vjp_jit(f, (x, gamma, beta, None), cts)[1]
        want = vjp_jit(composed("leaky_relu", axis, None, st), (x, gamma, beta, None), cts)[1]
        for a, b in zip(got[:3], want[:3]):
            assert rel_err(a, b) < 1e-10
        assert got[1][0] != 0


# --- activation= on the Flax modules -----------------------------------------------------

MODULE_ACTS = {
    "relu": nn.relu,
    "leaky_relu": lambda p: nn.leaky_relu(p, 0.2),
    "identity": lambda p: p,
}
CASES = [("relu", False), ("leaky_relu", False), ("identity", True), ("relu", True)]


def _data(seed=0, shape=(16, 4, 4, 3)):
    x, _, _, ct = problem(shape, seed=seed, scale=3.0, offset=2.0)
    return x, randn(shape, seed=seed + 3), ct


class _FlaxBlock(nn.Module):
    act: str

    @nn.compact
    def __call__(self, x, residual, train: bool):
        y = nn.BatchNorm(use_running_average=not train, use_fast_variance=False)(x)
        return MODULE_ACTS[self.act](y if residual is None else y + residual)


class _JaxbnBlock(nn.Module):
    act: str

    @nn.compact
    def __call__(self, x, residual, train: bool):
        bn = jaxbn.linen.BatchNorm(
            use_running_average=not train, activation=self.act, negative_slope=0.2
        )
        return bn(x, residual=residual)


def _apply(model, variables, x, r, train):
    if train:
        return model.apply(variables, x, r, True, mutable=["batch_stats"])
    return model.apply(variables, x, r, False), {}


@pytest.mark.parametrize(
    "act,with_residual,train", [(a, r, True) for a, r in CASES] + [("relu", True, False)]
)
def test_linen_matches_flax_batchnorm_then_activation(act, with_residual, train):
    x, r, ct = _data()
    r = r if with_residual else None
    ours, theirs = _JaxbnBlock(act), _FlaxBlock(act)
    variables = theirs.init(jax.random.key(1), x, r, False)
    variables = jax.tree.map(
        lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape), variables
    )
    # same auto-named variables: Flax's checkpoint is ours unchanged
    assert jax.tree.structure(ours.init(jax.random.key(1), x, r, False)) == jax.tree.structure(
        variables
    )

    def forward_and_grads(model):
        @jax.jit
        def run(params, x, r):
            fn = lambda p, x_, r_: _apply(model, {**variables, "params": p}, x_, r_, train)  # noqa: E731
            (z, upd), pullback = jax.vjp(fn, params, x, r)
            zeros = jax.tree.map(jnp.zeros_like, upd)
            return z, upd, pullback((ct, zeros))

        return run(variables["params"], x, r)

    z1, upd1, g1 = forward_and_grads(ours)
    z2, upd2, g2 = forward_and_grads(theirs)
    np.testing.assert_allclose(z1, z2, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(upd1), jax.tree.leaves(upd2)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_linen_inplace_and_frozen_and_one_value():
    x, _, ct = _data(shape=(32, 5))
    flax_bn = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    variables = flax_bn.init(jax.random.key(0), x)
    ref = lambda v, x_: nn.leaky_relu(flax_bn.apply(v, x_, mutable=["batch_stats"])[0], 0.2)  # noqa: E731
    ours_bn = jaxbn.linen.BatchNorm(
        use_running_average=False, activation="leaky_relu", negative_slope=0.2, inplace=True
    )
    ours = lambda v, x_: ours_bn.apply(v, x_, mutable=["batch_stats"])[0]  # noqa: E731
    z1, g1 = vjp_jit(ours, (variables, x), ct)
    z2, g2 = vjp_jit(ref, (variables, x), ct)
    np.testing.assert_allclose(z1, z2, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    # frozen: the stored statistics, then the activation
    stats = {"mean": jnp.arange(5.0), "var": jnp.linspace(0.5, 2.0, 5)}
    v = {**variables, "batch_stats": stats}
    frozen = jaxbn.linen.BatchNorm(True, frozen=True, activation="relu").apply(v, x)
    expected = nn.relu(nn.BatchNorm(use_running_average=True).apply(v, x))
    np.testing.assert_allclose(frozen, expected, atol=1e-5, rtol=1e-5)
    # one example per feature (init with one example): Flax's rule, then the activation
    one = x[:1]
    z, upd = ours_bn.apply(variables, one, mutable=["batch_stats"])
    zf, updf = flax_bn.apply(variables, one, mutable=["batch_stats"])
    np.testing.assert_allclose(z, nn.leaky_relu(zf, 0.2), atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], updf["batch_stats"]["var"], atol=1e-6)


@pytest.mark.parametrize("act,with_residual", [CASES[1], CASES[2]])
def test_nnx_matches_flax_batchnorm_then_activation(act, with_residual):
    x, r, ct = _data(seed=3)
    r = r if with_residual else None
    ours = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), activation=act, negative_slope=0.2)
    theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(0), use_fast_variance=False)
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))

    def grads(module, call):
        graphdef, state = nnx.split(module)

        def f(state, x_, r_):
            m = nnx.merge(graphdef, state)
            return call(m, x_, r_), nnx.state(m, nnx.BatchStat)

        @jax.jit
        def run(state, x, r):
            (z, stats), pullback = jax.vjp(f, state, x, r)
            return z, stats, pullback((ct, jax.tree.map(jnp.zeros_like, stats)))

        return run(state, x, r)

    z1, s1, g1 = grads(ours, lambda m, x_, r_: m(x_, residual=r_))
    z2, s2, g2 = grads(
        theirs, lambda m, x_, r_: MODULE_ACTS[act](m(x_) if r_ is None else m(x_) + r_)
    )
    np.testing.assert_allclose(z1, z2, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    ours.eval()
    theirs.eval()
    np.testing.assert_allclose(
        ours(x, residual=r), MODULE_ACTS[act](theirs(x) if r is None else theirs(x) + r), atol=2e-5
    )


@pytest.mark.parametrize("option", [dict(renorm=(1.5, 0.5)), dict(virtual_batch_size=4)])
@pytest.mark.parametrize("inplace", [False, True])
def test_every_batch_norm_option_reaches_batch_norm_act(option, inplace):
    # one pipeline: batch_norm_act(..., option) is act(batch_norm(..., option) + r), with
    # its gradients (a random cotangent) and running statistics
    rs = np.random.RandomState(3)
    x, r, dz = (jnp.asarray(rs.randn(16, 5) * 2 + 1, jnp.float32) for _ in range(3))
    gamma, beta = jnp.asarray(rs.rand(5) + 0.5, jnp.float32), jnp.asarray(rs.randn(5), jnp.float32)
    state = jaxbn.BatchNormState(jnp.full(5, 0.7), jnp.full(5, 2.5), jnp.zeros((), jnp.int32))
    act = dict(activation="leaky_relu", negative_slope=SLOPE, inplace=inplace)

    def fused_op(x, g, b, r):
        return jaxbn.batch_norm_act(x, g, b, state, training=True, residual=r, **act, **option)

    def composition(x, g, b, r):
        y, st = jaxbn.batch_norm(x, g, b, state, training=True, **option)
        return jax.nn.leaky_relu(y + r, SLOPE), st

    cts = (dz, jax.tree.map(jnp.zeros_like, state))
    (z, st), grads = vjp_jit(fused_op, (x, gamma, beta, r), cts)
    (z_ref, st_ref), grads_ref = vjp_jit(composition, (x, gamma, beta, r), cts)
    np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(st, st_ref):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
