"""jaxbn.equinox.BatchNorm against eqx.nn.BatchNorm(mode="batch") and float64 NumPy."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import bn_ref, np_stats, randn, rel_err

eqx = pytest.importorskip("equinox")
optax = pytest.importorskip("optax")

import jaxbn.equinox  # noqa: E402
from jaxbn.equinox import BatchNorm, UnboundAxisNameError  # noqa: E402

TOL = 1e-5
EPS = 1e-5


def vmapped(layer, **kwargs):
    """The per-example layer over a batch, statistics across the named axis "batch"."""
    return jax.vmap(
        lambda x, s: layer(x, s, **kwargs), axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )


@eqx.filter_jit
def run(layer, x, state, inference=None):
    """``vmapped(layer)`` under ``eqx.filter_jit``; ``inference`` overrides the layer's."""
    return vmapped(layer, inference=inference)(x, state)


def data(shape, seed=0, scale=2.0, shift=3.0):
    return randn(shape, seed=seed, scale=scale, offset=shift)


def with_affine(layer, seed=1):
    """The layer with a random weight and bias (the same for both layers from one seed)."""
    rs = np.random.RandomState(seed)
    c = layer.input_size
    w = jnp.asarray(rs.rand(c) + 0.5, jnp.float32)
    b = jnp.asarray(rs.randn(c), jnp.float32)
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (w, b))


def pair(input_size, **kwargs):
    """(ours, state), (Equinox's mode="batch", state), same weight and bias."""
    ours, s = eqx.nn.make_with_state(BatchNorm)(input_size, "batch", **kwargs, mode="batch")
    theirs, t = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        input_size, "batch", mode="batch", **kwargs
    )
    return (with_affine(ours), s), (with_affine(theirs), t)


def normalize_np(x, mean, var, w, b, axis=1):
    """Float64 NumPy ``(x - mean) / sqrt(var + eps) * w + b`` along channel ``axis``."""
    shape = [1] * x.ndim
    shape[axis] = -1
    r = lambda v: np.reshape(np.asarray(v, np.float64), shape)  # noqa: E731
    return (np.asarray(x, np.float64) - r(mean)) / np.sqrt(r(var) + EPS) * r(w) + r(b)


# (a) training against Equinox's layer ----------------------------------------------------


def test_training_matches_equinox_batch_mode_and_stores_the_same_state():
    (ours, s), (theirs, t) = pair(3)
    for step in range(3):
        x = data((8, 3, 5, 4), seed=step)
        y, s = run(ours, x, s)
        y_eqx, t = run(theirs, x, t)
        assert y.shape == x.shape and y.dtype == jnp.float32
        assert rel_err(y, y_eqx) < TOL
        # the same update from the same start: the stored values are Equinox's
        for a, b in zip(s.get(ours.batch_state_index), t.get(theirs.batch_state_index)):
            assert rel_err(a, b) < TOL
        assert int(s.get(ours.batch_counter)) == int(t.get(theirs.batch_counter)) == step + 1
    running = ours.running_state(s)
    assert isinstance(running, jaxbn.BatchNormState) and int(running.count) == 3


def test_pytree_and_state_layout_are_equinoxs_so_leaves_load_both_ways(tmp_path):
    (ours, s), (theirs, t) = pair(4)
    arrays = lambda tree: [v for v in jax.tree.leaves(tree) if eqx.is_array(v)]  # noqa: E731
    assert len(arrays((ours, s))) == len(arrays((theirs, t))) == 5
    assert ours.ema_first_time_index is None and ours.ema_state_index is None
    _, t = run(theirs, data((6, 4, 3)), t)
    eqx.tree_serialise_leaves(tmp_path / "eqx.eqx", (theirs, t))
    loaded, ls = eqx.tree_deserialise_leaves(tmp_path / "eqx.eqx", (ours, s))
    np.testing.assert_array_equal(loaded.weight, theirs.weight)
    for a, b in zip(loaded.running_state(ls), (*t.get(theirs.batch_state_index), 1)):
        np.testing.assert_array_equal(a, b)
    _, ls = run(loaded, data((6, 4, 3), seed=1), ls)  # and it trains on from there
    assert int(ls.get(loaded.batch_counter)) == 2


@pytest.mark.parametrize("momentum, unbiased", [(0.99, False), (0.99, True), (None, False)])
def test_inference_variance_is_the_running_average_where_equinoxs_is_not(momentum, unbiased):
    """After one step at true variance ~4: ours is 0.99 * 1 + 0.01 * 4; Equinox's ~103."""
    x = data((16, 2, 3, 3), scale=2.0, shift=3.0)
    ours, s = eqx.nn.make_with_state(BatchNorm)(
        2, "batch", momentum=momentum, unbiased_running_var=unbiased, mode="batch"
    )
    _, s = run(ours, x, s)
    mean_b, var_b = np_stats(np.asarray(x), axis=1)  # float64, biased
    n = x.size // 2
    if unbiased:
        var_b = var_b * n / (n - 1)
    m = 0.0 if momentum is None else momentum  # None: cumulative, one step = the batch's
    exp_mean, exp_var = (1 - m) * mean_b, m * 1.0 + (1 - m) * var_b
    mean, var = s.get(ours.batch_state_index)
    assert rel_err(mean, exp_mean) < TOL and rel_err(var, exp_var) < TOL
    y, s2 = run(eqx.nn.inference_mode(ours), x, s)
    assert rel_err(y, normalize_np(x, exp_mean, exp_var, ours.weight, ours.bias)) < TOL
    np.testing.assert_array_equal(s2.get(ours.batch_state_index)[1], var)

    if momentum is None or unbiased:
        return
    theirs, t = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        2, "batch", momentum=momentum, mode="batch"
    )
    _, t = run(theirs, x, t)
    y_eqx, _ = run(eqx.nn.inference_mode(theirs), x, t)
    # Equinox divides mean and var by 1 - momentum**1: right for the mean (from 0),
    # wrong for the variance (from 1): 103 for true variance 4 at momentum 0.99
    eqx_mean, eqx_var = exp_mean / (1 - m), exp_var / (1 - m)
    assert rel_err(y_eqx, normalize_np(x, eqx_mean, eqx_var, theirs.weight, theirs.bias)) < TOL
    assert np.all(eqx_var > 90) and np.all(np.abs(var_b - 4) < 1.5) and np.all(exp_var < 1.1)


# (b) inference ---------------------------------------------------------------------------


def test_inference_mode_uses_the_running_statistics_and_leaves_them():
    ours, s = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="batch")
    ours = with_affine(ours)
    x0 = data((4, 3, 2, 2), scale=1.0, shift=0.0)
    y0, _ = run(ours, x0, s, inference=True)  # no step yet: mean 0, var 1
    assert rel_err(y0, normalize_np(x0, np.zeros(3), np.ones(3), ours.weight, ours.bias)) < TOL
    for step in range(2):
        _, s = run(ours, data((8, 3, 2, 2), seed=step), s)
    mean, var = (np.asarray(v) for v in s.get(ours.batch_state_index))
    x = data((5, 3, 2, 2), seed=9)
    expected = normalize_np(x, mean, var, ours.weight, ours.bias)
    infer = eqx.nn.inference_mode(ours)
    assert infer.inference and not ours.inference
    y, s_after = run(infer, x, s)
    assert rel_err(y, expected) < TOL
    for a, b in zip(s_after.get(ours.batch_state_index), (mean, var)):
        np.testing.assert_array_equal(a, b)
    assert int(s_after.get(ours.batch_counter)) == 2
    # the call's inference overrides the field, both ways; inference needs no named axis
    y_call, _ = run(ours, x, s_after, inference=True)
    assert rel_err(y_call, expected) < TOL
    y_one, _ = infer(x[0], s_after)
    assert rel_err(y_one, expected[0]) < TOL
    _, s_trained = run(infer, x, s_after, inference=False)
    assert int(s_trained.get(ours.batch_counter)) == 3
    # back to training with inference_mode(..., value=False)
    again = eqx.nn.inference_mode(infer, value=False)
    assert rel_err(run(again, x, s_after)[0], run(ours, x, s_after)[0]) == 0


# (c) layouts: channel-last, whole batches, several named axes -----------------------------


def test_channel_last_axis_matches_channel_first_on_the_transposed_input():
    x_first = data((6, 3, 4, 5))
    x_last = jnp.transpose(x_first, (0, 2, 3, 1))
    first, s = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="batch")
    last, s_last = eqx.nn.make_with_state(BatchNorm)(3, "batch", axis=-1, mode="batch")
    first, last = with_affine(first), with_affine(last)
    y, s = run(first, x_first, s)
    y_last, s_last = run(last, x_last, s_last)
    assert rel_err(y_last, jnp.transpose(y, (0, 2, 3, 1))) < TOL
    for a, b in zip(first.running_state(s), last.running_state(s_last)):
        assert rel_err(a, b) < TOL
    ref, _, _ = bn_ref(x_last, last.weight, last.bias, axis=-1)
    assert rel_err(y_last, ref) < TOL
    y_inf, _ = run(eqx.nn.inference_mode(last), x_last, s_last)
    y_inf_first, _ = run(eqx.nn.inference_mode(first), x_first, s)
    assert rel_err(y_inf, jnp.transpose(y_inf_first, (0, 2, 3, 1))) < TOL


@pytest.mark.parametrize("axis, perm", [(0, (0, 1, 2, 3)), (-1, (0, 2, 3, 1)), (1, (0, 2, 1, 3))])
def test_axis_name_none_takes_the_whole_batch_without_vmap(axis, perm):
    x = jnp.transpose(data((6, 3, 4, 3)), perm)
    per_example, s = eqx.nn.make_with_state(BatchNorm)(3, "batch", axis=axis, mode="batch")
    whole, s_whole = eqx.nn.make_with_state(BatchNorm)(3, axis=axis, mode="batch")
    y, s = run(with_affine(per_example), x, s)
    y_whole, s_whole = eqx.filter_jit(lambda m, x, s: m(x, s))(with_affine(whole), x, s_whole)
    assert rel_err(y_whole, y) < TOL
    for a, b in zip(per_example.running_state(s), whole.running_state(s_whole)):
        assert rel_err(a, b) < TOL


def test_several_named_axes_and_an_unnamed_outer_vmap():
    x = data((2, 3, 4, 5))  # two named axes hold 2 * 3 examples of (4, 5)
    bn, s = eqx.nn.make_with_state(BatchNorm)(4, ["batch1", "batch2"], mode="batch")
    assert bn.axis_name == ("batch1", "batch2")
    f = lambda x, s: bn(x, s)  # noqa: E731
    for name in ("batch2", "batch1"):
        f = jax.vmap(f, axis_name=name, in_axes=(0, None), out_axes=(0, None))
    y, s = jax.jit(f)(x, s)
    ref, mean, var = bn_ref(x, None, None, axis=2)
    assert rel_err(y, ref) < TOL
    assert rel_err(s.get(bn.batch_state_index)[0], 0.01 * mean) < TOL
    # an unnamed vmap around the named one: one state per row, as Equinox's test has it
    one, s1 = eqx.nn.make_with_state(BatchNorm)(4, "batch", mode="batch")
    inner = jax.vmap(one, axis_name="batch", in_axes=(1, None), out_axes=(1, None))
    y, s1 = jax.jit(jax.vmap(inner, in_axes=(0, None)))(x[:, 0], s1)
    assert y.shape == x[:, 0].shape and s1.get(one.batch_state_index)[0].shape == (2, 4)


def test_one_value_per_channel_gives_bias_as_equinox_does():
    (ours, s), (theirs, t) = pair(3)
    x = data((1, 3))  # a batch of one example without spatial positions
    y, s = run(ours, x, s)
    y_eqx, t = run(theirs, x, t)
    assert rel_err(y, y_eqx) < TOL and rel_err(y[0], ours.bias) < TOL
    for a, b in zip(s.get(ours.batch_state_index), t.get(theirs.batch_state_index)):
        assert rel_err(a, b) < TOL


# (d) gradients ---------------------------------------------------------------------------


def ref_example(x, w, b):
    """Plain jnp per-example batch norm across the named axis "batch", channel-first."""
    red = tuple(range(1, x.ndim))
    keep = (-1,) + (1,) * (x.ndim - 1)
    mean = jax.lax.pmean(jnp.mean(x, red, keepdims=True), "batch")
    var = jax.lax.pmean(jnp.mean((x - mean) ** 2, red, keepdims=True), "batch")
    return (x - mean) / jnp.sqrt(var + EPS) * w.reshape(keep) + b.reshape(keep)


@pytest.mark.parametrize("custom_vjp", [True, False])
def test_gradients_inside_and_outside_the_named_vmap_equal_plain_jnp(custom_vjp):
    x = data((6, 3, 4, 2))
    bn, s = eqx.nn.make_with_state(BatchNorm)(3, "batch", custom_vjp=custom_vjp, mode="batch")
    bn = with_affine(bn)
    w, b = bn.weight, bn.bias
    ct = jnp.asarray(np.random.RandomState(7).randn(*x.shape), jnp.float32)

    def layer_example(x, w, b):
        fresh = jax.tree.map(lambda v: v, s)  # a copy: the layer's state.set retires its input
        return eqx.tree_at(lambda m: (m.weight, m.bias), bn, (w, b))(x, fresh)[0]

    def batched(example):
        return jax.vmap(example, in_axes=(0, None, None), axis_name="batch")

    def inside(example):
        """Each example's vjp under the named vmap; weight and bias get its share."""

        def one(x, ct):
            return jax.vjp(example, x, w, b)[1](ct)

        return jax.vmap(one, axis_name="batch")(x, ct)

    @jax.jit
    def grads():
        (y, vjp), (y_ref, vjp_ref) = (
            jax.vjp(batched(f), x, w, b) for f in (layer_example, ref_example)
        )
        outside = vjp(ct), vjp_ref(ct)  # the vjp of the whole batched function
        return (y, y_ref), outside, (inside(layer_example), inside(ref_example))

    (y, y_ref), (outside, outside_ref), (got, want) = grads()
    assert rel_err(y, y_ref) < TOL
    for g, g_ref in zip(outside, outside_ref):
        assert rel_err(g, g_ref) < 1e-4
    for g, g_ref in zip(got, want):
        assert g.shape == g_ref.shape and rel_err(g, g_ref) < 1e-4
    for g, g_out in zip(got, outside):  # the shares add up to the batch's gradient
        assert rel_err(g if g.shape == x.shape else g.sum(0), g_out) < 1e-4


# (e) a small CNN trained with either layer -------------------------------------------------


class CNN(eqx.Module):
    conv: eqx.nn.Conv2d
    norm: eqx.Module
    head: eqx.nn.Linear

    def __init__(self, bn, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 4, 3, padding=1, use_bias=False, key=k1)
        self.norm = bn(4, "batch", mode="batch")
        self.head = eqx.nn.Linear(4, 3, key=k2)

    def __call__(self, x, state):
        x, state = self.norm(self.conv(x), state)
        return self.head(jax.nn.relu(x).mean((1, 2))), state


def train_cnn(bn, steps=4):
    model, state = eqx.nn.make_with_state(CNN)(bn, jax.random.key(0))
    opt = optax.sgd(0.1)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    rs = np.random.RandomState(3)
    xs = jnp.asarray(rs.randn(steps, 16, 1, 6, 6) * 2 + 1, jnp.float32)
    labels = jnp.asarray(rs.randint(0, 3, (steps, 16)))

    def loss_fn(model, state, x, y):
        logits, state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            x, state
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

    @eqx.filter_jit
    def step(model, state, opt_state, x, y):
        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state, x, y)
        updates, opt_state = opt.update(grads, opt_state)
        return eqx.apply_updates(model, updates), state, opt_state, loss

    losses = []
    for i in range(steps):
        model, state, opt_state, loss = step(model, state, opt_state, xs[i], labels[i])
        losses.append(float(loss))
    return model, state, np.array(losses)


def test_small_cnn_trains_the_same_with_either_layer():
    m_eqx, s_eqx, losses_eqx = train_cnn(eqx.nn.BatchNorm)
    m, s, losses = train_cnn(BatchNorm)
    assert np.all(np.isfinite(losses)) and np.max(np.abs(losses - losses_eqx)) < 1e-4
    assert rel_err(m.norm.weight, m_eqx.norm.weight) < 1e-4
    assert rel_err(m.conv.weight, m_eqx.conv.weight) < 1e-4
    for a, b in zip(s.get(m.norm.batch_state_index), s_eqx.get(m_eqx.norm.batch_state_index)):
        assert rel_err(a, b) < 1e-4


# (f) errors ------------------------------------------------------------------------------


def test_bad_input_raises_before_tracing_reaches_xla():
    bn, s = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="batch")
    with pytest.raises(ValueError, match=r"has 4 channels along axis 0.*input_size=3"):
        run(bn, data((8, 4, 5)), s)
    with pytest.raises(ValueError, match=r"has 4 channels along axis 0.*input_size=3"):
        vmapped(bn, inference=True)(data((8, 4, 5)), s)
    with pytest.raises(ValueError, match=r"no channel axis 0"):
        vmapped(bn)(data((8,)), s)
    with pytest.raises(TypeError, match=r"floating-point"):
        vmapped(bn)(jnp.ones((8, 3), jnp.int32), s)
    with pytest.raises(TypeError, match=r"must be real"):
        vmapped(bn)(jnp.ones((8, 3), jnp.complex64), s)
    with pytest.raises(TypeError, match=r"inference must be a Python bool"):
        vmapped(bn, inference=jnp.array(True))(data((8, 3)), s)
    with pytest.raises(ValueError, match=r"no values along the reduced axes"):
        vmapped(bn)(jnp.ones((4, 3, 0)), s)
    whole, sw = eqx.nn.make_with_state(BatchNorm)(3, mode="batch")
    with pytest.raises(ValueError, match=r"batch axis first.*vmap the layer over a named axis"):
        whole(data((3, 5)), sw)  # one example given to a whole-batch layer


def test_unbound_axis_name_is_a_name_error_and_a_value_error():
    bn, s = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="batch")
    for err in (UnboundAxisNameError, NameError, ValueError):
        with pytest.raises(err, match=r"axis_name 'batch' is not bound"):
            jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(data((4, 3)), s)
    with pytest.raises(NameError, match=r"not bound"):
        bn(data((3, 2)), s)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(mode="average"), ValueError, r"mode must be 'ema' or 'batch'.*got 'average'"),
        (dict(mode="ema", momentum=None), ValueError, r"momentum=None .* needs mode='batch'"),
        (dict(input_size=0), ValueError, r"input_size must be positive"),
        (dict(input_size=3.0), TypeError, r"input_size must be an int"),
        (dict(eps=0.0), ValueError, r"eps must be a finite number > 0"),
        (dict(momentum=1.5), ValueError, r"momentum must be a number in \[0, 1\]"),
        (dict(axis=(0,)), TypeError, r"axis must be an int"),
        (dict(dtype=jnp.int32), TypeError, r"dtype must be a real floating dtype"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, err, match):
    kwargs = dict(dict(input_size=3, axis_name="batch", mode="batch"), **kwargs)
    with pytest.raises(err, match=match):
        BatchNorm(**kwargs)


def test_dtypes_and_sequential():
    bn, s = eqx.nn.make_with_state(BatchNorm)(3, "batch", dtype=jnp.bfloat16, mode="batch")
    assert bn.weight.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in s.get(bn.batch_state_index))
    x = data((4, 3, 2)).astype(jnp.bfloat16)
    y, s = run(bn, x, s)
    assert y.dtype == jnp.bfloat16 and s.get(bn.batch_state_index)[0].dtype == jnp.float32
    seq, s = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [BatchNorm(3, "batch", mode="batch"), eqx.nn.Lambda(jax.nn.relu)]
    )
    y, s = jax.vmap(seq, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(data((4, 3)), s)
    assert y.shape == (4, 3) and float(y.min()) >= 0


def test_missing_equinox_says_what_to_install():
    code = (
        "import sys; import jaxbn; assert 'equinox' not in sys.modules, 'equinox imported'\n"
        "sys.modules['equinox'] = None\n"
        "try:\n"
        "    import jaxbn.equinox\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (
        "jaxbn.equinox needs equinox, which is not installed; install it with "
        'pip install "jaxbn[equinox]".'
    ), out.stdout + out.stderr


# Equinox's "ema" mode, its default when mode is not given (issue 23)


def test_mode_left_out_is_equinoxs_ema_with_equinoxs_warning():
    with pytest.warns(UserWarning, match="defaults to 'ema'") as ours:
        bn = BatchNorm(3, "batch")
    with pytest.warns(UserWarning, match="defaults to 'ema'") as theirs:
        eqx.nn.BatchNorm(3, "batch")
    assert bn.mode == "ema" and str(ours[0].message) == str(theirs[0].message)


@pytest.mark.parametrize("shape", [(8, 3, 4, 4), (16, 3)])
def test_ema_mode_trains_as_equinoxs_over_several_steps(shape):
    """Outputs, states and gradients against Equinox's own "ema" layer, steps 1-3 and inference."""
    ours, s = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="ema", momentum=0.9)
    theirs, t = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="ema", momentum=0.9)
    ours, theirs = with_affine(ours), with_affine(theirs)
    assert jax.tree.structure(s) == jax.tree.structure(t)
    w = jnp.asarray(np.random.RandomState(1).randn(*shape), jnp.float32)

    def loss(model, x, state):
        y, state = run(model, x, state)
        return jnp.sum(y * w), (y, state)

    grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    for step in range(3):
        x = data(shape, scale=2.0, shift=1.0 + step, seed=step)
        (_, (y, s)), g = grad(ours, x, s)
        (_, (y_t, t)), g_t = grad(theirs, x, t)
        np.testing.assert_allclose(y, y_t, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(t)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(
            jax.tree.leaves((g.weight, g.bias)), jax.tree.leaves((g_t.weight, g_t.bias))
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    x = data(shape, seed=9)
    y, _ = run(eqx.nn.inference_mode(ours), x, s)
    y_t, _ = run(eqx.nn.inference_mode(theirs), x, t)
    np.testing.assert_allclose(y, y_t, rtol=1e-5, atol=1e-6)


def test_ema_gradient_of_x_matches_equinox():
    ours, s = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="ema")
    theirs, t = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="ema")
    x, w = data((8, 3, 2), seed=3), data((8, 3, 2), seed=4)

    def dx(model, state):
        _, state = run(model, data((8, 3, 2), seed=5), state)  # a second call blends
        # grad inside the jit: JAX 0.10 cannot differentiate a jitted vmap whose custom
        # rule has a collective of the vmapped axis (a custom_jvp of lax.pmean fails too)
        grad = eqx.filter_jit(jax.grad(lambda x: jnp.sum(vmapped(model)(x, state)[0] * w)))
        return grad(x)

    np.testing.assert_allclose(dx(ours, s), dx(theirs, t), rtol=1e-5, atol=1e-6)


def test_code_that_selects_batchnorms_by_type_finds_jaxbns():
    """Equinox's DCGAN example picks its batch norms by isinstance (issue 23)."""

    def picked(bn):
        model = eqx.nn.Sequential([eqx.nn.Linear(3, 3, key=jax.random.key(0)), bn])
        is_bn = lambda m: isinstance(m, eqx.nn.BatchNorm)  # noqa: E731
        return [m for m in jax.tree.leaves(model, is_leaf=is_bn) if is_bn(m)]

    ours = picked(BatchNorm(3, "batch", mode="batch"))
    theirs = picked(eqx.nn.BatchNorm(3, "batch", mode="batch"))
    assert len(ours) == len(theirs) == 1 and type(ours[0]) is BatchNorm


def test_ema_buffers_start_as_zeros_and_ones_so_inference_before_training_is_defined():
    # jnp.empty (uninitialized from jax 0.11) would make this read whatever memory held
    layer, state = eqx.nn.make_with_state(BatchNorm)(3, axis_name=None, mode="ema", axis=-1)
    running = layer.running_state(state)
    assert np.array_equal(running.mean, np.zeros(3)) and np.array_equal(running.var, np.ones(3))
    x = np.random.default_rng(0).normal(size=(5, 3))
    y, _ = layer(jnp.asarray(x, jnp.float32), state, inference=True)
    np.testing.assert_allclose(y, x / np.sqrt(1.0 + 1e-5), rtol=1e-6)
