"""The hand-derived backward against autodiff of an independent plain-jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference import bn_ref, problem, rel_err, vjp_jit

import jaxbn

# (shape, feature axis): (N, D), NHWC, NCHW, two feature axes, a leading feature axis.
LAYOUTS = [
    ((16, 5), -1),
    ((4, 3, 3, 6), -1),
    ((4, 6, 3, 3), 1),
    ((6, 4, 3), (1, 2)),
    ((3, 5, 4), 0),
]
TOL = {jnp.float32: 1e-5, jnp.float64: 1e-10}


def make(shape, axis, dtype, affine, seed=0, masked=False):
    x, gamma, beta, _ = problem(shape, axis, seed=seed, dtype=dtype, scale=3.0, offset=2.0)
    fshape = gamma.shape
    if not affine:
        gamma = beta = None
    rs = np.random.RandomState(seed + 3)
    mask = None
    if masked:
        # per-position mask, with every feature keeping at least two values
        m = rs.rand(*shape) > 0.4
        m.reshape(-1)[: 2 * int(np.prod(fshape)) or 2] = True
        mask = jnp.asarray(m)
    return x, gamma, beta, mask, fshape


def outputs(fn, x, gamma, beta, mask, axis):
    """(y, batch mean, batch var) from jaxbn; momentum=0 makes new state = batch stats."""
    state = jaxbn.init_state(
        tuple(x.shape[a] for a in sorted(np.atleast_1d(np.array(axis)) % x.ndim)),
        x.dtype if x.dtype == jnp.float64 else jnp.float32,
    )
    y, s = fn(x, gamma, beta, state, training=True, axis=axis, momentum=0.0, mask=mask)
    return y, s.mean, s.var


# float64 with gamma and beta on every layout, masked and not; the other cases (float32's
# tolerance and dtypes, no gamma and beta) on a few layouts: they do not depend on it
VJP_CASES = (
    [(jnp.float64, *layout, True, masked) for layout in LAYOUTS for masked in (False, True)]
    + [(jnp.float64, *LAYOUTS[0], False, False), (jnp.float64, *LAYOUTS[2], False, True)]
    + [(jnp.float32, *LAYOUTS[i], True, masked) for i, masked in ((1, False), (2, True))]
    + [(jnp.float32, *LAYOUTS[i], True, masked) for i, masked in ((3, False), (4, True))]
)


@pytest.mark.parametrize("dtype,shape,axis,affine,masked", VJP_CASES)
def test_vjp_matches_reference(dtype, shape, axis, affine, masked):
    with jax.enable_x64(dtype == jnp.float64):
        x, gamma, beta, mask, fshape = make(shape, axis, dtype, affine, masked=masked)
        rs = np.random.RandomState(1)
        cts = (
            jnp.asarray(rs.randn(*shape), dtype),
            jnp.asarray(rs.randn(*fshape), dtype),
            jnp.asarray(rs.randn(*fshape), dtype),
        )

        def ours(x, gamma, beta):
            y, mean, var = outputs(jaxbn.batch_norm, x, gamma, beta, mask, axis)
            return y, mean.astype(dtype), var.astype(dtype)

        def ref(x, gamma, beta):
            return bn_ref(x, gamma, beta, axis, mask=mask)

        out, grads = vjp_jit(ours, (x, gamma, beta), cts)
        out_ref, grads_ref = vjp_jit(ref, (x, gamma, beta), cts)
        for a, b in zip(out, out_ref):
            assert rel_err(a, b) < TOL[dtype]
        for a, b in zip(grads, grads_ref):
            if b is None:
                assert a is None
            else:
                assert a.dtype == b.dtype and rel_err(a, b) < TOL[dtype]


# second order through the rule: on XLA:CPU's program for three layouts here, on the
# clean program for the other two (test_clean_program_vjp_matches_reference)
SECOND_ORDER_CPU = [LAYOUTS[0], LAYOUTS[2], LAYOUTS[4]]
SECOND_ORDER_CLEAN = [LAYOUTS[1], LAYOUTS[3]]


@pytest.mark.parametrize("shape,axis", SECOND_ORDER_CPU)
def test_check_grads_second_order(shape, axis):
    with jax.enable_x64(True):
        x, gamma, beta, _, _ = make(shape, axis, jnp.float64, True)
        w = jnp.asarray(np.random.RandomState(2).randn(*shape))

        def f(x, gamma, beta):
            y, _ = jaxbn.batch_norm(
                x, gamma, beta, jaxbn.init_state(gamma.shape, jnp.float64), training=True, axis=axis
            )
            return y * w

        check_grads(jax.jit(f), (x, gamma, beta), order=2, modes=["rev"])


def test_grad_of_grad_matches_reference(program):
    with jax.enable_x64(True):
        x, gamma, beta, _, _ = make((12, 4), -1, jnp.float64, True)
        w = jnp.asarray(np.random.RandomState(3).randn(12, 4))
        loss = lambda x, g: jnp.sum(
            jnp.sin(
                jaxbn.batch_norm(x, g, beta, jaxbn.init_state(4, jnp.float64), training=True)[0]
            )
            * w
        )  # noqa: E731
        loss_ref = lambda x, g: jnp.sum(jnp.sin(bn_ref(x, g, beta)[0]) * w)  # noqa: E731
        outer = lambda f: jax.grad(lambda x, g: jnp.sum(jax.grad(f, (0, 1))(x, g)[0] ** 2), (0, 1))  # noqa: E731
        for a, b in zip(jax.jit(outer(loss))(x, gamma), jax.jit(outer(loss_ref))(x, gamma)):
            assert rel_err(a, b) < 1e-10


def test_value_and_grad_uses_the_custom_rule(monkeypatch):
    import jaxbn._core as core  # the rule's backward: private, as is what it checks

    calls, real_bwd = [], core.backward
    monkeypatch.setattr(core, "backward", lambda *a: calls.append(1) or real_bwd(*a))
    jax.clear_caches()  # the rule is jitted: a test before may have traced these shapes
    x, gamma, beta, _, _ = make((16, 5), -1, jnp.float32, True)
    w = jnp.asarray(np.random.RandomState(4).randn(16, 5), jnp.float32)
    f = lambda x, g, b: jnp.sum(
        jaxbn.batch_norm(x, g, b, jaxbn.init_state(5), training=True)[0] * w
    )  # noqa: E731
    (v, g), (v_ref, g_ref) = (
        jax.jit(jax.value_and_grad(f, (0, 1, 2)))(x, gamma, beta),
        jax.jit(jax.value_and_grad(lambda x, g, b: jnp.sum(bn_ref(x, g, b)[0] * w), (0, 1, 2)))(
            x, gamma, beta
        ),
    )
    assert rel_err(v, v_ref) < 1e-5
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-5
    assert calls, "the gradient did not go through jaxbn._core.backward"


def test_public_fwd_bwd_equal_jax_vjp():
    x, gamma, beta, _, _ = make((4, 6, 3, 3), 1, jnp.float32, True)
    dy = jnp.asarray(np.random.RandomState(5).randn(4, 6, 3, 3), jnp.float32)
    (y, mean, var, count), res = jax.jit(jaxbn.batch_norm_fwd, static_argnames="axis")(
        x, gamma, beta, axis=1
    )
    dx, dgamma, dbeta = jax.jit(jaxbn.batch_norm_bwd, static_argnames="axis")(res, dy, axis=1)
    y_ref, grads_ref = vjp_jit(lambda x, g, b: bn_ref(x, g, b, 1)[0], (x, gamma, beta), dy)
    assert rel_err(y, y_ref) < 1e-5
    for a, b in zip((dx, dgamma, dbeta), grads_ref):
        assert rel_err(a, b) < 1e-5
    assert float(count) == 4 * 3 * 3


def test_residuals_hold_x_once():
    x, gamma, beta, _, _ = make((64, 32), -1, jnp.float32, True)
    _, res = jaxbn.batch_norm_fwd(x, gamma, beta)
    full = [leaf for leaf in jax.tree.leaves(res) if leaf.size == x.size]
    assert len(full) == 1 and full[0] is x


def _forward_mode_case():
    x, gamma, beta, _, _ = make((6, 3), -1, jnp.float64, True)
    w = jnp.asarray(np.random.RandomState(6).randn(6, 3))
    st = jaxbn.init_state(3, jnp.float64)

    def loss(x, custom):
        y = jaxbn.batch_norm(x, gamma, beta, st, training=True, custom_vjp=custom)[0]
        return jnp.sum(jnp.tanh(y) * w)

    return x, w, loss, lambda x: jnp.sum(jnp.tanh(bn_ref(x, gamma, beta)[0]) * w)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd"])
def test_pure_forward_mode_through_the_documented_switch(transform):
    with jax.enable_x64(True):
        x, w, loss, ref = _forward_mode_case()
        transformed = {
            "jvp": lambda f: lambda x: jax.jvp(f, (x,), (w,))[1],
            "jacfwd": jax.jacfwd,
        }[transform]
        run = lambda f: jax.jit(transformed(f))(x)  # noqa: E731
        assert rel_err(run(lambda x: loss(x, False)), run(ref)) < 1e-10
        with pytest.raises(TypeError, match="pass custom_vjp=False"):
            transformed(lambda x: loss(x, True))(x)


@pytest.mark.parametrize("custom", [True, False])
def test_forward_over_reverse_hessian_and_hvp(custom):
    # jvp of the custom rule's vjp differentiates fwd and bwd: no switch needed.
    with jax.enable_x64(True):
        x, w, loss, ref = _forward_mode_case()
        f = lambda x: loss(x, custom)  # noqa: E731
        assert rel_err(jax.jit(jax.hessian(f))(x), jax.jit(jax.hessian(ref))(x)) < 1e-10
        hvp = jax.jit(lambda f: jax.jvp(jax.grad(f), (x,), (w,))[1], static_argnums=0)
        assert rel_err(hvp(f), hvp(ref)) < 1e-10


def test_bfloat16_gradients_keep_dtypes():
    x, gamma, beta, _, _ = make((32, 8), -1, jnp.float32, True)
    w = jnp.asarray(np.random.RandomState(7).randn(32, 8), jnp.float32)
    xb, gb, bb = (v.astype(jnp.bfloat16) for v in (x, gamma, beta))
    f = lambda x, g, b: jnp.sum(
        jaxbn.batch_norm(x, g, b, jaxbn.init_state(8), training=True)[0].astype(jnp.float32) * w
    )  # noqa: E731
    grads = jax.jit(jax.grad(f, (0, 1, 2)))(xb, gb, bb)
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    grads_ref = jax.grad(lambda x, g, b: jnp.sum(bn_ref(x, g, b)[0] * w), (0, 1, 2))(
        *(v.astype(jnp.float32) for v in (xb, gb, bb))
    )
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("ratio", [0.0, 3.9, 100.0, 1e4])
def test_float32_dx_accurate_on_both_sides_of_the_backward_limit(ratio, program):
    # On CPU, S2 = sum(dy * x) - mean * S1 only where |mean| <= 4 std (jaxbn._core):
    # taken everywhere it would lose 3e-5 at 100 std and 2e-3 at 1e4 std.
    rs = np.random.RandomState(8)
    std = rs.uniform(0.5, 2, 16)
    x64 = (ratio + rs.randn(4096, 16)) * std
    dy64 = rs.randn(4096, 16) + 0.5 * (x64 / std - ratio) + 3  # a mean and a correlated part
    x, dy = jnp.asarray(x64, jnp.float32), jnp.asarray(dy64, jnp.float32)
    gamma = jnp.asarray(rs.rand(16) + 0.5, jnp.float32)
    f = lambda x: jaxbn.batch_norm(x, gamma, None, jaxbn.init_state(16), training=True)[0]  # noqa: E731
    dx = vjp_jit(f, (x,), dy)[1][0]
    with jax.enable_x64(True):
        g64 = gamma.astype(jnp.float64)
        f_ref = lambda x: bn_ref(x, g64, None)[0]  # noqa: E731
        dx_ref = vjp_jit(f_ref, (x.astype(jnp.float64),), dy.astype(jnp.float64))[1][0]
    # XLA:CPU runs the clean program's variadic reduces as one sequential loop (error
    # ~ sqrt(n) ulp at n = 4096); its own program and GPUs' reductions sum in trees.
    assert rel_err(dx, dx_ref) < (2e-6 if program == "cpu" else 1e-5)


@pytest.mark.parametrize("ratio,unshifted", [(1.0, True), (3.9, True), (4.1, False), (1e4, False)])
def test_cpu_backward_takes_the_unshifted_sum_only_within_the_limit(ratio, unshifted):
    from jaxbn._cpu import sum_dy_xc

    rs = np.random.RandomState(9)
    shift = jnp.full(8, ratio, jnp.float32)
    x = shift[None] + jnp.asarray(rs.randn(256, 8), jnp.float32)
    dy = jnp.asarray(rs.randn(256, 8), jnp.float32)
    # S1 off by one tells the formulas apart: sum(dy * x) - mean * S1 moves by -mean,
    # the shifted sum (delta = 0) does not use S1.
    s1_off = jnp.sum(dy, 0) + 1
    args = (dy, x, shift, jnp.zeros(8), jnp.ones(8), s1_off)
    got = jax.jit(sum_dy_xc, static_argnums=(6,))(*args, (1,))
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    s2 = np.sum(dy64 * (x64 - ratio), 0)
    np.testing.assert_allclose(got, s2 - ratio if unshifted else s2, rtol=0, atol=ratio * 1e-3)


@pytest.mark.parametrize(
    "shape,axis,masked", [(*layout, True) for layout in LAYOUTS] + [(*LAYOUTS[1], False)]
)
def test_clean_program_vjp_matches_reference(shape, axis, masked, clean_program):
    # the clean program's rule on every layout, masked (the unmasked path once: a masked
    # rule is the unmasked one with a where; the float32 bars are those of CPU's)
    with clean_program():
        test_vjp_matches_reference(jnp.float64, shape, axis, True, masked)
        if masked and (shape, axis) in SECOND_ORDER_CLEAN:  # second order, clean rule
            test_check_grads_second_order(shape, axis)
