"""Batch renormalization: jaxbn.batch_norm(renorm=) against a float64 reference of Ioffe
(2017), Algorithm 1, and jaxbn.batch_renorm / the BatchRenorm modules against sbx's class.

The modules' oracle is sbx-rl 0.28.0's own ``BatchRenorm`` (``sbx/common/jax_layers.py``),
run by ``tests/golden/make_sbx_golden.py`` on the cases of ``tests/renorm_cases.py``:
outputs, running statistics and gradients over a run that crosses the warm-up, under
``jit``; with ``axis_name`` under ``pmap``; and two updates of a CrossQ-style critic.
sbx takes Flax's fast variance, so the data keep ``|mean| / std`` below 4, where it is
accurate to about ``(mean / std)**2 * 6e-8``; jaxbn's values agree to 1e-5 relative.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import renorm_cases
from reference import bn_ref, problem, rel_err, vjp_jit

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

import jaxbn  # noqa: E402
import jaxbn.linen  # noqa: E402
import jaxbn.nnx  # noqa: E402

# --- jaxbn.batch_norm(renorm=): Ioffe (2017), Algorithm 1, in float64 ---------------------


def renorm_ref(x, gamma, beta, run_mean, run_var, rmax, dmax, eps=1e-5):
    row = lambda v: v[None, :]  # noqa: E731
    mu = jnp.mean(x, 0, keepdims=True)
    sigma = jnp.sqrt(jnp.mean((x - mu) ** 2, 0, keepdims=True) + eps)
    run_sigma = row(jnp.sqrt(run_var + eps))
    r = jax.lax.stop_gradient(jnp.clip(sigma / run_sigma, 1 / rmax, rmax))
    d = jax.lax.stop_gradient(jnp.clip((mu - row(run_mean)) / run_sigma, -dmax, dmax))
    return row(gamma) * ((x - mu) / sigma * r + d) + row(beta)


@pytest.mark.parametrize("custom", [True, False])
@pytest.mark.parametrize("limits", [(1.5, 0.5), (100.0, 100.0), (1.0, 0.0)])
def test_renorm_matches_the_paper(custom, limits):
    with jax.enable_x64(True):
        x, gamma, beta, ct = problem((24, 5), dtype=jnp.float64)
        state = jaxbn.BatchNormState(
            jnp.asarray(np.linspace(-1, 3, 5)),
            jnp.asarray(np.linspace(0.3, 9, 5)),
            jnp.asarray(0, jnp.int32),
        )
        f = lambda x, g, b: jaxbn.batch_norm(  # noqa: E731
            x, g, b, state, training=True, renorm=limits, custom_vjp=custom
        )[0]
        ref = lambda x, g, b: renorm_ref(x, g, b, state.mean, state.var, *limits)  # noqa: E731
        y, grads = vjp_jit(f, (x, gamma, beta), ct)
        y_ref, grads_ref = vjp_jit(ref, (x, gamma, beta), ct)
        assert rel_err(y, y_ref) < 1e-10
        for a, b in zip(grads, grads_ref):
            assert rel_err(a, b) < 1e-10
        if limits == (1.0, 0.0):  # r = 1, d = 0: plain batch norm
            assert rel_err(y, jax.jit(bn_ref)(x, gamma, beta)[0]) < 1e-10


def test_renorm_limits_can_be_traced_for_a_schedule():
    x, gamma, beta, _ = problem((24, 5))
    f = jax.jit(
        lambda rmax, dmax: jaxbn.batch_norm(
            x, gamma, beta, jaxbn.init_state(5), training=True, renorm=(rmax, dmax)
        )[0]
    )
    y_static = jaxbn.batch_norm(
        x, gamma, beta, jaxbn.init_state(5), training=True, renorm=(2.0, 1.0)
    )[0]
    assert rel_err(f(2.0, 1.0), y_static) < 1e-6


def test_renorm_only_in_training_and_state_updates_as_usual():
    x, gamma, beta, _ = problem((24, 5))
    s = jaxbn.init_state(5)
    y_e, _ = jaxbn.batch_norm(x, gamma, beta, s, training=False, renorm=(3.0, 5.0))
    assert rel_err(y_e, jaxbn.batch_norm(x, gamma, beta, s, training=False)[0]) == 0
    _, s_r = jaxbn.batch_norm(x, gamma, beta, s, training=True, renorm=(3.0, 5.0))
    _, s_p = jaxbn.batch_norm(x, gamma, beta, s, training=True)
    assert rel_err(s_r.var, s_p.var) == 0 and rel_err(s_r.mean, s_p.mean) == 0


# --- jaxbn.batch_renorm and the BatchRenorm modules against sbx's ----------------------


GOLDEN = dict(np.load(Path(__file__).parent / "golden" / "sbx_batchrenorm.npz"))
DATA = {k: GOLDEN[k] for k in renorm_cases.inputs()}


def assert_matches_golden(out: dict):
    assert out.keys() <= GOLDEN.keys(), sorted(out.keys() - GOLDEN.keys())
    for key, value in out.items():
        ref = GOLDEN[key]
        scale = max(1.0, float(np.max(np.abs(ref))))
        np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=key)


@pytest.mark.parametrize("case", renorm_cases.CASES, ids=lambda c: c.__name__)
def test_linen_batchrenorm_computes_sbxs_function(case):
    out = case(jaxbn.linen.BatchRenorm, DATA)
    assert_matches_golden(out)
    if case is renorm_cases.crossq_case:  # the same variables, so checkpoints load both ways
        assert out.keys() == {k for k in GOLDEN if k.startswith("crossq/") and k not in DATA}


def test_warmup_boundary_is_where_sbx_puts_it():
    # steps 0-2 are batch norm (steps < warmup_steps = 3); from step 3 on, the output
    # depends on the running statistics
    x = DATA["steps/x"]
    for i in range(6):
        mean, var = x[i].astype(np.float64).mean(0), x[i].astype(np.float64).var(0)
        plain = (x[i] - mean) / np.sqrt(var + 1e-3) * DATA["steps/scale"] + DATA["steps/bias"]
        differs = np.max(np.abs(GOLDEN[f"steps/{i}/y"] - plain)) > 1e-3
        assert differs == (i >= 3), i


def test_older_copies_spelling_and_fields_are_accepted():
    x = jnp.asarray(DATA["steps/x"][0])
    a = jaxbn.linen.BatchRenorm(False, warmup_steps=0)
    b = jaxbn.linen.BatchRenorm(False, warm_up_steps=0, use_fast_variance=False)
    variables = a.init(jax.random.key(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(b.init(jax.random.key(0), x))
    stats = dict(variables["batch_stats"], mean=jnp.ones(5), var=jnp.full(5, 4.0))
    ya, _ = a.apply(dict(variables, batch_stats=stats), x, mutable=["batch_stats"])
    yb, _ = b.apply(dict(variables, batch_stats=stats), x, mutable=["batch_stats"])
    np.testing.assert_array_equal(ya, yb)


def test_init_with_one_example_as_sbx_initializes_its_models():
    # sbx initializes its critics with one sampled observation: one value per feature
    x = jnp.asarray(DATA["steps/x"][0, :1])
    bn = jaxbn.linen.BatchRenorm(use_running_average=False)
    y, variables = bn.init_with_output(jax.random.key(0), x)
    np.testing.assert_array_equal(y, jnp.zeros_like(x))  # x - mean = 0: y = bias = 0
    assert int(variables["batch_stats"]["steps"]) == 0


def test_init_leaves_the_statistics_and_training_needs_mutable_batch_stats():
    x = jnp.asarray(DATA["steps/x"][0])
    bn = jaxbn.linen.BatchRenorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)
    stats = variables["batch_stats"]
    assert np.all(np.asarray(stats["mean"]) == 0) and np.all(np.asarray(stats["var"]) == 1)
    assert (int(stats["steps"]), int(stats["r_max"]), int(stats["d_max"])) == (0, 3, 5)
    with pytest.raises(Exception, match=r'pass mutable=\["batch_stats"\]'):
        bn.apply(variables, x)


def test_nnx_twin_has_the_same_state_names_and_behaviour():
    x, w = DATA["steps/x"], DATA["steps/w"]
    linen_bn = jaxbn.linen.BatchRenorm(warmup_steps=2, momentum=0.9)
    variables = linen_bn.init(jax.random.key(0), x[0], use_running_average=False)
    model = jaxbn.nnx.BatchRenorm(5, warmup_steps=2, momentum=0.9, rngs=nnx.Rngs(0))
    names = set(nnx.to_pure_dict(nnx.state(model)))
    assert names == set(variables["params"]) | set(variables["batch_stats"])
    stats = variables["batch_stats"]
    for i in range(4):  # across the warm-up: outputs, gradients and statistics agree
        y, upd = linen_bn.apply(
            {"params": variables["params"], "batch_stats": stats},
            x[i],
            use_running_average=False,
            mutable=["batch_stats"],
        )
        stats = upd["batch_stats"]

        def evaluated(x, stats=stats, wi=w[i]):
            v = {"params": variables["params"], "batch_stats": stats}
            return jnp.sum(linen_bn.apply(v, x, use_running_average=True) * wi)

        dx = jax.grad(evaluated)(x[i])
        y_nnx = model(x[i])
        np.testing.assert_allclose(y_nnx, y, rtol=1e-6, atol=1e-6)
        for k in ("mean", "var", "steps"):
            np.testing.assert_allclose(getattr(model, k)[...], stats[k], rtol=1e-6)
        model.eval()
        dx_nnx = jax.grad(lambda x, wi=w[i]: jnp.sum(model(x) * wi))(x[i])
        model.train()
        np.testing.assert_allclose(dx_nnx, dx, rtol=1e-5, atol=1e-6)


def test_constant_feature_after_warmup_gives_finite_gradients():
    # sbx's sqrt(var) has an infinite derivative at var = 0 (its gradients are NaN)
    x = np.asarray(DATA["steps/x"][0]).copy()
    x[:, 2] = 1.5
    state = jaxbn.BatchNormState(jnp.zeros(5), jnp.ones(5), jnp.asarray(10, jnp.int32))

    def loss(x, gamma):
        y, _ = jaxbn.batch_renorm(x, gamma, None, state, training=True, warmup_steps=3)
        return jnp.sum(y * DATA["steps/w"][0])

    grads = jax.grad(loss, (0, 1))(jnp.asarray(x), jnp.ones(5))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"r_max": float("nan")}, r"r_max must be a finite number >= 1, got nan"),
        ({"r_max": 0.5}, r"r_max must be a finite number >= 1, got 0.5 \(r is clipped"),
        ({"d_max": -1.0}, r"d_max must be a finite number >= 0, got -1.0"),
        ({"d_max": float("inf")}, r"d_max must be a finite number >= 0, got inf"),
        ({"momentum": 1.5}, r"momentum must be a number in \[0, 1\].*got 1.5"),
    ],
)
def test_batch_renorm_refuses_what_batch_norm_refuses_in_both_modes(training, kw, match):
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=match):
        jaxbn.batch_renorm(x, None, None, jaxbn.init_state(3), training=training, **kw)


def test_batch_renorm_refuses_complex_x_in_training():
    x = jnp.ones((4, 3), jnp.complex64)
    with pytest.raises(TypeError, match=r"batch_renorm needs real x .*got dtype complex64"):
        jaxbn.batch_renorm(x, None, None, jaxbn.init_state(3), training=True)
