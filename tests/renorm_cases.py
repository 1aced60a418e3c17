"""The runs that compare a ``BatchRenorm`` class with sbx's: one function per case.

Each takes the class (sbx's, or ``jaxbn.linen.BatchRenorm``) and the inputs, and
returns a dict of arrays. ``tests/golden/make_sbx_golden.py`` runs them with sbx-rl
0.28.0's class and stores inputs and results in ``tests/golden/sbx_batchrenorm.npz``;
``tests/test_renorm.py`` runs them with jaxbn's and compares.
"""

import jax
import jax.numpy as jnp
import numpy as np

N_DEVICES = 4


def inputs(seed=0) -> dict:
    """The inputs of every case (stored with the results, so no RNG is shared)."""
    rs = np.random.RandomState(seed)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return {
        "steps/x": f32(rs.randn(6, 32, 5) * rs.uniform(0.5, 2.0, 5) + rs.uniform(-2, 2, 5)),
        "steps/w": f32(rs.randn(6, 32, 5)),
        "steps/scale": f32(rs.rand(5) + 0.5),
        "steps/bias": f32(rs.randn(5)),
        "steps/x_eval": f32(rs.randn(16, 5) * 1.5 + 0.5),
        "pmap/x": f32(rs.randn(3, N_DEVICES, 8, 5) * 1.5 + 1.0),
        "pmap/w": f32(rs.randn(3, N_DEVICES, 8, 5)),
        "crossq/obs": f32(rs.randn(2, 16, 6)),
        "crossq/act": f32(rs.uniform(-1, 1, (2, 16, 2))),
        "crossq/next_obs": f32(rs.randn(2, 16, 6)),
        "crossq/next_act": f32(rs.uniform(-1, 1, (2, 16, 2))),
        "crossq/reward": f32(rs.randn(2, 16)),
    }


def _stats(batch_stats) -> dict:
    return {k: np.asarray(batch_stats[k], np.float64) for k in ("mean", "var", "steps")}


def steps_case(cls, data: dict) -> dict:
    """Six jitted training steps across a warm-up of 3, then evaluation."""
    bn = cls(use_running_average=False, warmup_steps=3, momentum=0.9)
    variables = bn.init(jax.random.key(0), data["steps/x"][0])
    params = {"scale": jnp.asarray(data["steps/scale"]), "bias": jnp.asarray(data["steps/bias"])}
    stats = variables["batch_stats"]

    @jax.jit
    def step(params, stats, x, w):
        def loss(params, x):
            y, upd = bn.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            return jnp.sum(y * w), (y, upd["batch_stats"])

        (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
        return y, stats, grads

    out = {}
    for i in range(6):
        y, stats, (g_params, g_x) = step(params, stats, data["steps/x"][i], data["steps/w"][i])
        out.update({f"steps/{i}/y": y, f"steps/{i}/dx": g_x})
        out.update({f"steps/{i}/dscale": g_params["scale"], f"steps/{i}/dbias": g_params["bias"]})
        out.update({f"steps/{i}/{k}": v for k, v in _stats(stats).items()})
    ev = cls(use_running_average=True, warmup_steps=3, momentum=0.9)
    y = ev.apply({"params": params, "batch_stats": stats}, data["steps/x_eval"])
    out["steps/eval_y"] = y
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def pmap_case(cls, data: dict) -> dict:
    """Three steps under ``jax.pmap`` with ``axis_name``, warm-up 1: statistics over devices."""
    bn = cls(use_running_average=False, warmup_steps=1, momentum=0.9, axis_name="batch")
    variables = bn.init(jax.random.key(0), data["pmap/x"][0, 0])
    rep = lambda t: jax.tree.map(lambda a: jnp.stack([jnp.asarray(a)] * N_DEVICES), t)  # noqa: E731
    params, stats = rep(variables["params"]), rep(variables["batch_stats"])

    def step(params, stats, x, w):
        def loss(x):
            y, upd = bn.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            return jnp.sum(y * w), (y, upd["batch_stats"])

        (_, (y, stats)), dx = jax.value_and_grad(loss, has_aux=True)(x)
        return y, stats, dx

    pstep = jax.pmap(step, axis_name="batch")
    out = {}
    for i in range(3):
        y, stats, dx = pstep(params, stats, data["pmap/x"][i], data["pmap/w"][i])
        out.update({f"pmap/{i}/y": y, f"pmap/{i}/dx": dx})
        out.update({f"pmap/{i}/{k}": v for k, v in _stats(stats).items()})
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def crossq_case(cls, data: dict) -> dict:
    """Two SGD updates of a CrossQ-style critic: ``(s, a)`` and ``(s', a')`` in one batch.

    (CrossQ uses Adam, whose first steps are ``lr * sign(g)``: a gradient that rounding
    moves across 0 moves its weight by ``2 lr``, so the comparison would test rounding.)
    """
    import flax.linen as nn
    import optax

    class Critic(nn.Module):
        @nn.compact
        def __call__(self, obs, act, train: bool):
            h = jnp.concatenate([obs, act], -1)
            for width in (16, 16):
                h = nn.Dense(width)(h)
                h = cls(use_running_average=not train, warmup_steps=1, momentum=0.99)(h)
                h = nn.relu(h)
            return nn.Dense(1)(h)[..., 0]

    critic = Critic()
    variables = critic.init(jax.random.key(1), data["crossq/obs"][0], data["crossq/act"][0], False)
    tx = optax.sgd(0.05)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def update(params, stats, opt_state, obs, act, next_obs, next_act, reward):
        def loss(params):
            both_obs = jnp.concatenate([obs, next_obs])  # CrossQ: one forward for both
            both_act = jnp.concatenate([act, next_act])
            q, upd = critic.apply(
                {"params": params, "batch_stats": stats},
                both_obs,
                both_act,
                True,
                mutable=["batch_stats"],
            )
            q, q_next = jnp.split(q, 2)
            target = jax.lax.stop_gradient(reward + 0.99 * q_next)
            return jnp.mean((q - target) ** 2), upd["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, value

    out = {}
    for i in range(2):
        args = [data[f"crossq/{k}"][i] for k in ("obs", "act", "next_obs", "next_act", "reward")]
        params, stats, opt_state, value = update(params, stats, opt_state, *args)
        out[f"crossq/{i}/loss"] = value
    for path, leaf in jax.tree_util.tree_flatten_with_path((params, stats))[0]:
        out["crossq/final/" + jax.tree_util.keystr(path)] = leaf
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


CASES = (steps_case, pmap_case, crossq_case)
