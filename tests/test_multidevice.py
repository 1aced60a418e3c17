"""Data parallel on 8 simulated CPU devices: the global batch's statistics and gradients."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from reference import problem, rel_err

import jaxbn

ND = 8
TOL = 1e-5


@jax.jit  # one program per shape (and per program: use_clean_program is in jit's cache key)
def single(x, gamma, beta, w, mask=None):
    """Reference: one device holding the whole batch."""

    def loss(x, gamma, beta):
        y, st = jaxbn.batch_norm(
            x, gamma, beta, jaxbn.init_state(x.shape[-1]), training=True, mask=mask
        )
        return jnp.sum(y * w), (y, st)

    (_, (y, st)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, gamma, beta)
    return y, st, grads


def assert_same(y, st, grads, ref):
    y_r, st_r, grads_r = ref
    assert rel_err(y, y_r) < TOL
    assert rel_err(st.mean, st_r.mean) < TOL and rel_err(st.var, st_r.var) < TOL
    assert int(st.count) == int(st_r.count)
    for a, b in zip(grads, grads_r):
        assert rel_err(a, b) < TOL


def mesh():
    assert jax.device_count() >= ND, "tests/conftest.py sets 8 simulated CPU devices"
    return jax.make_mesh((ND,), ("batch",), axis_types=(AxisType.Auto,))


# the plain case and the masked spatial one: the split across devices depends on neither
@pytest.mark.parametrize("spatial,masked", [(False, False), (True, True)])
def test_shard_map_equals_one_device(spatial, masked, program):
    x, gamma, beta, w = problem((32, 3, 3, 6) if spatial else (32, 6))
    mask = None
    if masked:
        # unequal counts per device: device 0 keeps one row of its four, device 1 all
        m = np.ones((x.shape[0],) + (1,) * (x.ndim - 1), bool)
        m[1:4] = False
        m[9:11] = False
        mask = jnp.asarray(m)
    msh = mesh()
    spec = P("batch")

    def local(x, gamma, beta, mask):
        return jaxbn.batch_norm(
            x,
            gamma,
            beta,
            jaxbn.init_state(x.shape[-1]),
            training=True,
            axis_name="batch",
            mask=mask,
        )

    f = jax.shard_map(
        local,
        mesh=msh,
        in_specs=(spec, P(), P(), None if mask is None else spec),
        out_specs=(spec, P()),
    )
    put = lambda v: jax.device_put(v, NamedSharding(msh, spec))  # noqa: E731
    xs, ws, ms = put(x), put(w), None if mask is None else put(mask)

    def loss(x, gamma, beta):
        y, st = f(x, gamma, beta, ms)
        return jnp.sum(y * ws), (y, st)

    (_, (y, st)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
        xs, gamma, beta
    )
    assert_same(y, st, grads, single(x, gamma, beta, w, mask))


def test_grad_inside_shard_map_sums_replicated_parameters():
    x, gamma, beta, w = problem((32, 6))
    msh = mesh()

    def step(x, w, gamma, beta):
        def loss(x, gamma, beta):
            y, _ = jaxbn.batch_norm(
                x, gamma, beta, jaxbn.init_state(6), training=True, axis_name="batch"
            )
            return jnp.sum(y * w)

        return jax.grad(loss, (0, 1, 2))(x, gamma, beta)

    f = jax.shard_map(
        step,
        mesh=msh,
        in_specs=(P("batch"), P("batch"), P(), P()),
        out_specs=(P("batch"), P(), P()),
    )
    put = lambda v: jax.device_put(v, NamedSharding(msh, P("batch")))  # noqa: E731
    grads = jax.jit(f)(put(x), put(w), gamma, beta)
    for a, b in zip(grads, single(x, gamma, beta, w)[2]):
        assert rel_err(a, b) < TOL


def test_pmap_equals_one_device():
    x, gamma, beta, w = problem((32, 6))
    split = lambda v: v.reshape(ND, -1, *v.shape[1:])  # noqa: E731

    def step(x, w, gamma, beta):
        def loss(x, gamma, beta):
            y, st = jaxbn.batch_norm(
                x, gamma, beta, jaxbn.init_state(6), training=True, axis_name="batch"
            )
            return jnp.sum(y * w), (y, st)

        (_, (y, st)), (dx, dg, db) = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
            x, gamma, beta
        )
        return y, st, (dx, jax.lax.psum(dg, "batch"), jax.lax.psum(db, "batch"))

    y, st, (dx, dg, db) = jax.pmap(step, axis_name="batch", in_axes=(0, 0, None, None))(
        split(x), split(w), gamma, beta
    )
    st = jax.tree.map(lambda v: v[0], st)
    assert_same(
        y.reshape(x.shape), st, (dx.reshape(x.shape), dg[0], db[0]), single(x, gamma, beta, w)
    )


def test_pmap_axis_index_groups():
    x, gamma, beta, _ = problem((32, 6))
    split = x.reshape(ND, -1, 6)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    f = lambda x: jaxbn.batch_norm(  # noqa: E731
        x,
        gamma,
        beta,
        jaxbn.init_state(6),
        training=True,
        axis_name="batch",
        axis_index_groups=groups,
    )
    y, st = jax.pmap(f, axis_name="batch")(split)
    ref = jax.jit(lambda x: jaxbn.batch_norm(x, gamma, beta, jaxbn.init_state(6), training=True))
    for g in groups:
        xg = x.reshape(ND, -1, 6)[np.array(g)].reshape(-1, 6)
        y_r, st_r = ref(xg)
        assert rel_err(y[np.array(g)].reshape(-1, 6), y_r) < TOL
        assert rel_err(st.var[g[0]], st_r.var) < TOL


def test_pmap_axis_index_groups_of_unequal_sizes_have_each_groups_statistics():
    # JAX's psum takes groups of unequal sizes under pmap (issue 23: jaxbn refused them)
    x, gamma, beta, w = problem((48, 6))
    split = x.reshape(ND, -1, 6)
    groups = [[0, 1, 2], [3, 4, 5, 6, 7]]

    def f(x, w):
        def loss(x):
            y, st = jaxbn.batch_norm(
                x,
                gamma,
                beta,
                jaxbn.init_state(6),
                training=True,
                momentum=0.0,
                axis_name="batch",
                axis_index_groups=groups,
            )
            return jnp.sum(y * w), (y, st)

        (_, (y, st)), dx = jax.value_and_grad(loss, has_aux=True)(x)
        return y, st, dx

    y, st, dx = jax.pmap(f, axis_name="batch")(split, w.reshape(ND, -1, 6))
    for g in groups:
        xg = np.asarray(split, np.float64)[np.array(g)].reshape(-1, 6)
        mean, var = xg.mean(0), xg.var(0)
        y_ref = (xg - mean) / np.sqrt(var + 1e-5) * np.asarray(gamma) + np.asarray(beta)
        for i in g:
            assert rel_err(st.mean[i], mean) < TOL and rel_err(st.var[i], var) < TOL
        assert rel_err(np.asarray(y)[np.array(g)].reshape(-1, 6), y_ref) < TOL
        rows = lambda a, g=g: jnp.asarray(a).reshape(ND, -1, 6)[np.array(g)].reshape(-1, 6)  # noqa: E731
        dx_one = single(rows(x), gamma, beta, rows(w))[2][0]  # the group alone on one device
        assert rel_err(rows(dx), dx_one) < TOL


def test_jit_with_batch_sharded_input_needs_no_axis_name():
    x, gamma, beta, w = problem((32, 3, 3, 6))
    msh = mesh()
    put = lambda v: jax.device_put(v, NamedSharding(msh, P("batch")))  # noqa: E731

    def loss(x, gamma, beta):
        y, st = jaxbn.batch_norm(x, gamma, beta, jaxbn.init_state(6), training=True)
        return jnp.sum(y * put(w)), (y, st)

    (_, (y, st)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
        put(x), gamma, beta
    )
    assert y.sharding.spec[0] == "batch"
    assert_same(y, st, grads, single(x, gamma, beta, w))


def test_named_vmap_equals_one_batch_and_grad_inside_works(program):
    x, gamma, beta, w = problem((32, 6))
    split = lambda v: v.reshape(ND, -1, *v.shape[1:])  # noqa: E731

    def per_member(x, w):
        def loss(x, gamma, beta):
            y, _ = jaxbn.batch_norm(
                x, gamma, beta, jaxbn.init_state(6), training=True, axis_name="b"
            )
            return jnp.sum(y * w), y

        (_, y), (dx, dg, db) = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, gamma, beta)
        return y, dx, dg, db

    y, dx, dg, db = jax.jit(jax.vmap(per_member, axis_name="b"))(split(x), split(w))
    y_r, _, (dx_r, dg_r, db_r) = single(x, gamma, beta, w)
    assert rel_err(y.reshape(x.shape), y_r) < TOL
    assert rel_err(dx.reshape(x.shape), dx_r) < TOL
    assert rel_err(dg.sum(0), dg_r) < TOL and rel_err(db.sum(0), db_r) < TOL


@pytest.mark.parametrize("custom", [True, False])
def test_grad_outside_named_vmap(custom, program):
    x, gamma, beta, w = problem((32, 6))
    split = lambda v: v.reshape(ND, -1, *v.shape[1:])  # noqa: E731

    def loss(x, gamma):
        f = lambda x: jaxbn.batch_norm(  # noqa: E731
            x, gamma, beta, jaxbn.init_state(6), training=True, axis_name="b", custom_vjp=custom
        )[0]
        return jnp.sum(jax.vmap(f, axis_name="b")(x) * split(w))

    dx, dg = jax.jit(jax.grad(loss, (0, 1)))(split(x), gamma)
    _, _, (dx_r, dg_r, _) = single(x, gamma, beta, w)
    assert rel_err(dx.reshape(x.shape), dx_r) < TOL and rel_err(dg, dg_r) < TOL


def test_shard_map_without_axis_name_gives_per_device_statistics():
    # replicated gamma/beta with a sharded x: each device normalizes its own shard
    x, gamma, beta, w = problem((32, 6))
    msh = mesh()

    def local(x, gamma, beta):
        return jaxbn.batch_norm(x, gamma, beta, jaxbn.init_state(6), training=True)[0]

    f = jax.shard_map(local, mesh=msh, in_specs=(P("batch"), P(), P()), out_specs=P("batch"))
    put = lambda v: jax.device_put(v, NamedSharding(msh, P("batch")))  # noqa: E731
    ws = put(w)
    loss = lambda x, gamma, beta: jnp.sum(f(x, gamma, beta) * ws)  # noqa: E731
    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(put(x), gamma, beta)
    per_device = [
        single(x[i * 4 : (i + 1) * 4], gamma, beta, w[i * 4 : (i + 1) * 4]) for i in range(ND)
    ]
    assert rel_err(grads[0], jnp.concatenate([r[2][0] for r in per_device])) < TOL
    assert rel_err(grads[1], sum(r[2][1] for r in per_device)) < TOL
    assert rel_err(grads[2], sum(r[2][2] for r in per_device)) < TOL


# the plain case and the masked spatial one: the split across devices depends on neither
@pytest.mark.parametrize("spatial,masked", [(False, False), (True, True)])
def test_batch_sharded_jit_on_the_default_mesh_needs_no_mesh_context(spatial, masked, program):
    # JAX's default mesh axes are Explicit, and jit takes arrays sharded on such a mesh
    # without jax.set_mesh (issue 23: jaxbn's shift asked for a mesh context)
    explicit = jax.make_mesh((ND,), ("batch",), axis_types=(AxisType.Explicit,))
    x, gamma, beta, w = problem((32, 3, 3, 6) if spatial else (32, 6))
    mask = None
    if masked:
        mask = jnp.asarray(np.arange(x.shape[0]) % 3 > 0).reshape((-1,) + (1,) * (x.ndim - 1))
    shard = lambda a: jax.device_put(a, NamedSharding(explicit, P("batch")))  # noqa: E731
    args = [shard(x), gamma, beta, shard(w)] + ([] if mask is None else [shard(mask)])
    y, st, grads = single(*args)
    assert_same(y, st, grads, single(x, gamma, beta, w, mask))


def test_one_row_per_device_normalizes_across_two_devices():
    # one value per feature and device is enough when the named axis has two devices
    # (one device alone is refused: test_errors.py)
    f = lambda r: jaxbn.batch_norm(r, None, None, jaxbn.init_state(3), training=True, axis_name="b")  # noqa: E731
    y, _ = jax.jit(jax.vmap(f, axis_name="b"))(jnp.arange(6.0).reshape(2, 1, 3))
    np.testing.assert_allclose(np.asarray(y)[:, 0, 0], [-1, 1], atol=1e-3)


EXPLICIT_LAYOUTS = {  # mesh shape and names, x's spec (N, H, C), the mask's spec by its shape
    "1d": ((ND,), ("batch",), P("batch")),
    "2d": ((4, 2), ("batch", "model"), P("batch")),
    "2d_features_sharded": ((4, 2), ("batch", "model"), P("batch", None, "model")),
}
MASK_SHAPES = [(32, 3, 6), (32, 1, 1), (32, 3, 1), (32, 1, 6), (1, 3, 6)]


@pytest.mark.parametrize("layout", EXPLICIT_LAYOUTS)
@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("in_context", [False, True])
def test_masks_of_every_broadcast_shape_on_explicit_meshes(layout, mask_shape, in_context):
    # issue 37: features sharded and a mask broadcast along them crashed in a select
    # whose operands had different shardings (the count replicated, the state meshless)
    shape, names, spec = EXPLICIT_LAYOUTS[layout]
    explicit = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(shape))
    x, gamma, beta, w = problem((32, 3, 6))
    keep = np.random.RandomState(1).rand(*mask_shape) > 0.3
    keep.flat[0] = False  # the first row excluded
    mask = jnp.asarray(keep)
    mask_spec = P(*(p if mask_shape[i] > 1 else None for i, p in enumerate(spec)))
    put = lambda a, s: jax.device_put(a, NamedSharding(explicit, s))  # noqa: E731
    args = (put(x, spec), gamma, beta, put(w, spec), put(mask, mask_spec))
    with jax.set_mesh(explicit) if in_context else contextlib.nullcontext():
        y, st, grads = single(*args)
    assert_same(y, st, grads, single(x, gamma, beta, w, mask))


@pytest.mark.parametrize(
    "mask_shape", [(32, 1, 1), (32, 1, 6)], ids=lambda s: "x".join(map(str, s))
)
def test_linen_batch_norm_with_a_broadcast_mask_on_a_features_sharded_mesh(mask_shape):
    import flax.linen as nn

    import jaxbn.linen

    _, names, spec = EXPLICIT_LAYOUTS["2d_features_sharded"]
    explicit = jax.make_mesh((4, 2), names, axis_types=(AxisType.Explicit,) * 2)
    x = problem((32, 3, 6))[0]
    mask = jnp.asarray(np.random.RandomState(2).rand(*mask_shape) > 0.3)
    mask_spec = P(*(p if mask_shape[i] > 1 else None for i, p in enumerate(spec)))
    put = lambda a, s: jax.device_put(a, NamedSharding(explicit, s))  # noqa: E731
    outs = []
    for bn in (nn.BatchNorm(use_running_average=False), jaxbn.linen.BatchNorm(False)):
        v = bn.init(jax.random.key(0), x)
        run = jax.jit(lambda v, x, m: bn.apply(v, x, mask=m, mutable=["batch_stats"]))  # noqa: B023
        outs.append(run(v, put(x, spec), put(mask, mask_spec)))
    (y_flax, s_flax), (y, s) = outs
    assert rel_err(y, y_flax) < 1e-4
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s_flax)):
        assert rel_err(a, b) < 1e-4
