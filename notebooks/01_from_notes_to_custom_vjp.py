# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # From the notes to `custom_vjp`
#
# jaxbn grew from a set of notes (in Chinese) on batch normalization in the style of
# the classic NumPy course assignment: a forward pass in `train` and `test` mode with
# running averages, a backward pass written twice (a staged "computational graph"
# version and a closed form), and spatial batch norm for `(N, C, H, W)` activations by
# transposing to `(N*H*W, C)`. Their ideas are jaxbn's spec; their code has bugs, listed
# in the notes' ERRATA. This notebook
#
# 1. runs the notes' forward (corrected) in both modes against `jaxbn.batch_norm`;
# 2. puts the staged backward (corrected) and the closed form side by side, in NumPy;
# 3. checks both, and jaxbn's hand-derived rule (`jaxbn.batch_norm_fwd` /
#    `jaxbn.batch_norm_bwd`), against `jax.vjp` of a plain reference in float64;
# 4. times all of them and plain autodiff under `jit`;
# 5. does NCHW with `axis=1` instead of the notes' transposes.
#
# Every correctness statement below is checked by an assertion when the notebook runs;
# timings are printed, with their spread, and not asserted: they depend on the machine
# and its load.
#
# Each function below takes the array module as `xp`: NumPy for the float64 checks,
# `jax.numpy` to trace the very same code under `jit`.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxbn

# %% tags=["parameters"]
# the seed of every random draw below (papermill can set it: -p SEED 1)
SEED = 0

# %%
rng = np.random.default_rng(SEED)

# %% [markdown]
# ## 1. Forward, train and test mode
#
# The notes' `batchnorm_forward`, with the two fixes from the ERRATA marked: the
# `momuntum` typo, and running statistics that start at zeros (an early test-mode call
# would divide by `sqrt(0.1 * var + eps)`); like every mainstream library, the running
# variance starts at ones. `momentum` is the weight on the old value, as in jaxbn.


# %%
def batchnorm_forward(x, gamma, beta, bn_param, xp=np):
    """The notes' forward: x (N, D), gamma and beta (D,); returns (out, cache)."""
    mode = bn_param["mode"]
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    N, D = x.shape
    running_mean = bn_param.get("running_mean", xp.zeros(D, dtype=x.dtype))
    running_var = bn_param.get("running_var", xp.ones(D, dtype=x.dtype))  # fix: not zeros

    if mode == "train":
        sample_mean = xp.mean(x, axis=0)
        sample_var = xp.var(x, axis=0)
        x_hat = (x - sample_mean) / xp.sqrt(sample_var + eps)
        out = gamma * x_hat + beta
        cache = (gamma, x, sample_mean, sample_var, eps, x_hat)
        running_mean = momentum * running_mean + (1 - momentum) * sample_mean  # fix: momentum
        running_var = momentum * running_var + (1 - momentum) * sample_var
    elif mode == "test":
        # the notes' folded form: one multiply-add per element
        scale = gamma / xp.sqrt(running_var + eps)
        out = x * scale + (beta - running_mean * scale)
        cache = None
    else:
        raise ValueError(f'Invalid forward batchnorm mode "{mode}"')

    bn_param["running_mean"] = running_mean
    bn_param["running_var"] = running_var
    return out, cache


# %% [markdown]
# Three training steps on different batches, then test mode on a fresh batch, both ways,
# in float64. jaxbn threads the running statistics as a value (`state` in, new `state`
# out) where the notes mutate `bn_param`.

# %%
N, D = 32, 8
batches = [rng.normal(3.0, 2.0, (N, D)) for _ in range(4)]
gamma, beta = rng.uniform(0.5, 1.5, D), rng.normal(size=D)

with jax.enable_x64(True):
    bn_param = {"mode": "train"}
    state = jaxbn.init_state(D, jnp.float64)
    rows = []
    for step, x in enumerate(batches[:3]):
        out_notes, _ = batchnorm_forward(x, gamma, beta, bn_param)
        out_jaxbn, state = jaxbn.batch_norm(x, gamma, beta, state, training=True)
        rows.append((f"train step {step}: y", out_notes, out_jaxbn))
    rows.append(("running mean", bn_param["running_mean"], state.mean))
    rows.append(("running var", bn_param["running_var"], state.var))
    bn_param["mode"] = "test"
    out_notes, _ = batchnorm_forward(batches[3], gamma, beta, bn_param)
    out_jaxbn, _ = jaxbn.batch_norm(batches[3], gamma, beta, state, training=False)
    rows.append(("test mode: y", out_notes, out_jaxbn))

print(f"{'float64, notes vs jaxbn':<26}{'max abs diff':>14}")
for name, a, b in rows:
    diff = np.max(np.abs(np.asarray(a) - np.asarray(b)))
    print(f"{name:<26}{diff:14.1e}")
    assert diff < 1e-12, (name, diff)  # the same to float64 rounding

# %% [markdown]
# An unknown mode is an error in both: the notes raise `ValueError`, and jaxbn's
# `training` is a required keyword that must be a Python bool.

# %%
raised = []
for call in (
    lambda: batchnorm_forward(batches[0], gamma, beta, {"mode": "eval"}),
    lambda: jaxbn.batch_norm(batches[0], gamma, beta, jaxbn.init_state(D), training="eval"),
):
    try:
        call()
    except (ValueError, TypeError) as err:
        raised.append(type(err))
        print(f"{type(err).__name__}: {err}")
assert raised == [ValueError, TypeError], raised

# %% [markdown]
# ## 2. Backward: the staged version and the closed form
#
# Left, the notes' staged backward: one line per node of the computational graph.
# As written, it combines the two paths from `x - mean` to the loss with a product,
# `dx_7_b = dx_6_b * dx_2_a`; they must be added, which `dx_7_a` already does, so the
# mean's gradient is `-sum(dx_7_a)` (ERRATA). Right, the closed form
# (`batchnorm_backward_alt`), which read `sample_mean` and `sample_var` without defining
# them; they are the cached batch statistics. The notes' names are kept; the comments
# say which derivative each stage is.


# %%
def batchnorm_backward(dout, cache, xp=np, as_written=False):
    """The notes' staged backward (corrected unless as_written); returns (dx, dgamma, dbeta)."""
    gamma, x, u_b, sigma_squared_b, eps, x_hat = cache
    N = x.shape[0]
    dx_1 = gamma * dout  # dL/dx_hat
    dx_2_b = xp.sum((x - u_b) * dx_1, axis=0)  # dL/d(1/std)
    dx_2_a = ((sigma_squared_b + eps) ** -0.5) * dx_1  # dL/d(x - mean), through x_hat
    dx_3_b = (-0.5) * ((sigma_squared_b + eps) ** -1.5) * dx_2_b  # dL/dvar
    dx_4_b = dx_3_b * 1
    dx_5_b = xp.ones_like(x) / N * dx_4_b  # dL/d(x - mean)**2
    dx_6_b = 2 * (x - u_b) * dx_5_b  # dL/d(x - mean), through var
    dx_7_a = dx_6_b * 1 + dx_2_a * 1  # dL/d(x - mean): the two paths add
    if as_written:
        dx_7_b = dx_6_b * 1 * dx_2_a * 1  # the bug: a product of the two paths
        dx_8_b = -1 * xp.sum(dx_7_b, axis=0)
    else:
        dx_8_b = -1 * xp.sum(dx_7_a, axis=0)  # dL/dmean
    dx_9_b = xp.ones_like(x) / N * dx_8_b  # through mean = sum(x) / N
    dx_10 = dx_9_b + dx_7_a

    dgamma = xp.sum(x_hat * dout, axis=0)
    dbeta = xp.sum(dout, axis=0)
    return dx_10, dgamma, dbeta


def batchnorm_backward_alt(dout, cache, xp=np):
    """The notes' closed form, reading the cached statistics; returns (dx, dgamma, dbeta)."""
    gamma, x, sample_mean, sample_var, eps, x_hat = cache
    N = x.shape[0]
    dx_hat = dout * gamma
    dvar = xp.sum(dx_hat * (x - sample_mean) * -0.5 * xp.power(sample_var + eps, -1.5), axis=0)
    dmean = xp.sum(dx_hat * -1 / xp.sqrt(sample_var + eps), axis=0) + dvar * xp.mean(
        -2 * (x - sample_mean), axis=0
    )
    dx = (
        1 / xp.sqrt(sample_var + eps) * dx_hat
        + dvar * 2.0 / N * (x - sample_mean)
        + 1.0 / N * dmean
    )
    dgamma = xp.sum(x_hat * dout, axis=0)
    dbeta = xp.sum(dout, axis=0)
    return dx, dgamma, dbeta


# %% [markdown]
# jaxbn's rule (derived in `jaxbn/_core.py`) is the closed form rearranged: with
# `a = gamma * rstd`, `S1 = sum(dy)` and `S2 = sum(dy * (x - mean))`,
#
# ```
# dx = a * dy - a / N * (S1 + rstd**2 * (x - mean) * S2),   dgamma = rstd * S2,   dbeta = S1
# ```
#
# Its residuals are `x` and per-feature vectors only: `x - mean` is recomputed instead of
# caching `x_hat` next to `x`, so nothing of the input's size is stored twice.

# %%
with jax.enable_x64(True):
    (y, mean, var, count), res = jaxbn.batch_norm_fwd(batches[0], gamma, beta)
    shapes = {k: None if v is None else np.shape(v) for k, v in res._asdict().items()}
    print("residuals:", shapes)
    full_size = [k for k, v in shapes.items() if v == batches[0].shape]
    print("of the input's size:", full_size)
    y_notes = batchnorm_forward(batches[0], gamma, beta, {"mode": "train"})[0]
    y_diff = float(np.max(np.abs(np.asarray(y) - y_notes)))
    print(f"y vs the notes' forward, max abs diff: {y_diff:.1e}")
assert full_size == ["x"] and y_diff < 1e-12

# %% [markdown]
# ## 3. All of them against `jax.vjp`, in float64
#
# The oracle is `jax.vjp` of a four-line batch norm in plain `jax.numpy`, which shares
# no code with anything above, pulled back with a **random** cotangent `dy`. (Never
# `.sum()`: `sum(gamma * x_hat + beta)` does not depend on `x` at all, because
# `x_hat` sums to zero over the batch, so its `dx` is identically zero and a backward
# that drops whole terms still passes; see below.) Errors are relative to the largest
# entry of the oracle's gradient.


# %%
def bn_reference(x, gamma, beta, eps=1e-5):
    mean = jnp.mean(x, axis=0)
    var = jnp.mean((x - mean) ** 2, axis=0)
    return gamma * (x - mean) / jnp.sqrt(var + eps) + beta


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def notes_rule(backward):
    def rule(x, gamma, beta, dy):
        _, cache = batchnorm_forward(x, gamma, beta, {"mode": "train"})
        return backward(dy, cache)

    return rule


@jax.jit
def oracle_grads(x, gamma, beta, dy):
    return jax.vjp(bn_reference, x, gamma, beta)[1](dy)


@jax.jit
def jaxbn_rule(x, gamma, beta, dy):
    _, res = jaxbn.batch_norm_fwd(x, gamma, beta)
    return jaxbn.batch_norm_bwd(res, dy)


@jax.jit
def jaxbn_grad(x, gamma, beta, dy):
    """jax.grad through jaxbn.batch_norm, which calls the same rule via custom_vjp."""

    def loss(x, gamma, beta):
        y, _ = jaxbn.batch_norm(
            x, gamma, beta, jaxbn.init_state(x.shape[1], x.dtype), training=True
        )
        return jnp.sum(y * dy)

    return jax.grad(loss, (0, 1, 2))(x, gamma, beta)


RULES = {
    "notes, staged, as written": notes_rule(
        lambda dy, c: batchnorm_backward(dy, c, as_written=True)
    ),
    "notes, staged, corrected": notes_rule(batchnorm_backward),
    "notes, closed form": notes_rule(batchnorm_backward_alt),
    "jaxbn.batch_norm_bwd": jaxbn_rule,
    "jax.grad of jaxbn.batch_norm": jaxbn_grad,
}

print(f"{'float64, vs jax.vjp':<30}{'shape':>10}{'dx':>10}{'dgamma':>10}{'dbeta':>10}")
errors = {}
with jax.enable_x64(True):
    for shape in [(7, 4), (256, 64)]:
        x = rng.normal(5.0, 3.0, shape)
        g, b, dy = (
            rng.uniform(0.5, 1.5, shape[1]),
            rng.normal(size=shape[1]),
            rng.normal(size=shape),
        )
        oracle = oracle_grads(x, g, b, dy)
        for name, rule in RULES.items():
            errs = [rel_err(got, want) for got, want in zip(rule(x, g, b, dy), oracle)]
            errors[name, shape] = errs
            print(f"{name:<30}{str(shape):>10}" + "".join(f"{e:10.1e}" for e in errs))

# what the text below says, checked each time the notebook runs
for (name, shape), (e_dx, e_dgamma, e_dbeta) in errors.items():
    assert max(e_dgamma, e_dbeta) < 1e-12, (name, shape)  # no version has a bug there
    assert (e_dx > 1e-3) if "as written" in name else (e_dx < 1e-12), (name, shape, e_dx)

# %% [markdown]
# The staged backward as written is wrong in `dx` (its `dgamma` and `dbeta` do not go
# through the bug); corrected, it agrees with the closed form and with jaxbn to float64
# rounding.
#
# Why the cotangent must be random: a plausible-looking backward that forgets the
# variance path, `dx = a * (dy - mean(dy))`, is exact for `dy = ones` (the gradient of
# `.sum()`), and wrong for random cotangents (five draws, the range printed).


# %%
def forgets_variance(x, gamma, dy, eps=1e-5):
    """A wrong dx: the mean path only, as if the variance did not depend on x."""
    return gamma / np.sqrt(x.var(0) + eps) * (dy - dy.mean(0))


cotangents = {"ones (the .sum() check)": [np.ones_like(batches[0])]}
cotangents["random, 5 draws"] = [rng.normal(size=batches[0].shape) for _ in range(5)]
wrong_by = {}
with jax.enable_x64(True):
    x = batches[0]
    a = np.max(np.abs(gamma / np.sqrt(x.var(0) + 1e-5)))  # the size of dx per unit of dy
    for name, dys in cotangents.items():
        want = [oracle_grads(x, gamma, beta, dy)[0] for dy in dys]
        errs = [np.max(np.abs(forgets_variance(x, gamma, dy) - w)) for dy, w in zip(dys, want)]
        wrong_by[name] = np.array(errs) / a
        values = " to ".join(
            f"{v:.1e}" for v in sorted({wrong_by[name].min(), wrong_by[name].max()})
        )
        print(f"dy = {name:<24} max |dx - oracle| / max |gamma / std|: {values}")
assert max(wrong_by["ones (the .sum() check)"]) < 1e-12
assert min(wrong_by["random, 5 draws"]) > 1e-2

# %% [markdown]
# One more property of the rule's statistics: jaxbn computes the batch variance in a
# shifted, corrected two-pass form (`jaxbn/_stats.py`), so a large offset does not
# cost it its float32 accuracy. At `|mean| = 1e6 * std`, compared with NumPy's float64 variance
# of the same float32 numbers, and with the one-pass `mean(x**2) - mean(x)**2` in
# float32, which cancels catastrophically:

# %%
x32 = (1e6 + rng.normal(size=(1024, 8))).astype(np.float32)
want = x32.astype(np.float64).var(0)
(_, _, var32, _), _ = jaxbn.batch_norm_fwd(x32, None, None)
one_pass = (x32 * x32).mean(0) - x32.mean(0) ** 2
for name, v in [("jaxbn.batch_norm_fwd", var32), ("one pass, float32", one_pass)]:
    print(f"{name:<22} max relative error of the variance: {rel_err(v, want):.1e}")
# after the shift (exact: Sterbenz's lemma for numbers this close), a two-pass variance
# of n float32 values is off by at most about 2 n u of its value (u = 2**-24; Higham,
# "Accuracy and Stability of Numerical Algorithms", 4.2 and 1.9): 1.2e-4 for n = 1024,
# a thousand times below the one-pass form's error
two_pass_bound = 2 * len(x32) * 2.0**-24
assert rel_err(var32, want) < two_pass_bound < 1e-1 < rel_err(one_pass, want)

# %% [markdown]
# ## 4. Timing under `jit`
#
# Forward and backward together, in float32, for the staged and closed forms traced
# from the NumPy code above with `xp=jnp`, jaxbn's rule, and `jax.vjp` of the plain
# reference (autodiff). Each returns `y` and the three gradients, so none can skip the
# forward. After compilation, 30 rounds in which each version is called once, in turn,
# so that a change of the machine's load hits all of them alike; the median and the
# quartiles over the rounds, and each version's time over the jaxbn rule's in the same
# round.


# %%
def interleaved_ms(calls, reps=30):
    """ms per call of each f(*args) in calls (a dict), the calls alternating round by round."""
    for f, args in calls.values():
        jax.block_until_ready(f(*args))  # compiled before timing
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, (f, args) in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t)
    return {name: np.array(t) * 1e3 for name, t in times.items()}


def quartiles(v):
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return f"{med:8.3f} [{q1:.3f}, {q3:.3f}]"


def notes_jit(backward):
    def f(x, gamma, beta, dy):
        y, cache = batchnorm_forward(x, gamma, beta, {"mode": "train"}, xp=jnp)
        return y, *backward(dy, cache, xp=jnp)

    return jax.jit(f)


@jax.jit
def jaxbn_fwd_bwd(x, gamma, beta, dy):
    (y, _, _, _), res = jaxbn.batch_norm_fwd(x, gamma, beta)
    return y, *jaxbn.batch_norm_bwd(res, dy)


@jax.jit
def autodiff(x, gamma, beta, dy):
    y, pullback = jax.vjp(bn_reference, x, gamma, beta)
    return y, *pullback(dy)


CANDIDATES = {
    "notes, staged": notes_jit(batchnorm_backward),
    "notes, closed form": notes_jit(batchnorm_backward_alt),
    "jaxbn rule": jaxbn_fwd_bwd,
    "autodiff": autodiff,
}
SHAPES = [(1024, 256), (8192, 256)]
timings = {}
print(f"backend: {jax.devices()[0].platform}")
for shape in SHAPES:
    args = [
        jnp.asarray(rng.normal(1.0, 2.0, shape), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 1.5, shape[1]), jnp.float32),
        jnp.asarray(rng.normal(size=shape[1]), jnp.float32),
        jnp.asarray(rng.normal(size=shape), jnp.float32),
    ]
    ref = autodiff(*args)
    errs = {
        name: max(rel_err(a, b) for a, b in zip(f(*args), ref)) for name, f in CANDIDATES.items()
    }
    # all compute the same (shown in float64 in section 3); here in float32, where each
    # reorders sums over the batch: n terms are off by at most n u of their magnitude
    # (u = 2**-24, Higham 4.2), through about four reductions (mean, variance, and the
    # backward's two), so 4 n u: 2.4e-4 at n = 1024, 2.0e-3 at n = 8192
    assert max(errs.values()) < 4 * shape[0] * 2.0**-24, errs
    timings[shape] = interleaved_ms({name: (f, args) for name, f in CANDIDATES.items()})
    print(
        f"\nx {shape} float32{'median ms [quartiles]':>28}{'/ jaxbn rule':>22}{'vs autodiff':>13}"
    )
    for name, t in timings[shape].items():
        ratio = t / timings[shape]["jaxbn rule"]
        print(f"  {name:<24}{quartiles(t):>26}{quartiles(ratio):>22}{errs[name]:13.1e}")

fig, axes = plt.subplots(1, len(SHAPES), figsize=(12, 3), layout="constrained")
for ax, shape in zip(axes, SHAPES):
    q1, med, q3 = np.percentile(list(timings[shape].values()), [25, 50, 75], axis=1)
    ax.barh(list(CANDIDATES), med, xerr=[med - q1, q3 - med], color="C0", capsize=3)
    ax.invert_yaxis()
    ax.set_title(f"x {shape}, float32")
    ax.set_xlabel("forward + backward under jit, ms (median, quartiles)")
    ax.grid(axis="x", alpha=0.3)
plt.show()

# %% [markdown]
# The tables are this run's measurement; they depend on the backend, the shapes and
# the load of the machine. Read a difference together with the quartiles: where a
# ratio's quartiles both lie on one side of 1, the ordering held in at least three
# rounds out of four of this run; run the cell again to see whether it holds on yours.
#
# What can make the versions differ: XLA fuses each version's elementwise chain into a
# few loops, so what counts is how many passes each makes over `x` and `dy`, and how
# many full-size intermediates it writes. When the forward and the backward are
# separate programs (as in `jax.grad` of a larger model, where the residuals wait in
# memory in between), what each keeps matters too: counted below, the arrays of the
# input's size that each version keeps from its forward for its backward.
# `python -m jaxbn check` prints the same kind of comparison, with bfloat16, on
# whatever backend you have.

# %%
x, g, b = args[:3]  # the (8192, 256) float32 arrays of the last timing; shapes suffice
kept = {
    "notes' cache": lambda: batchnorm_forward(x, g, b, {"mode": "train"}, xp=jnp)[1],
    "jaxbn residuals": lambda: jaxbn.batch_norm_fwd(x, g, b)[1],
    "autodiff (jax.vjp pullback)": lambda: jax.vjp(bn_reference, x, g, b)[1],
}
for name, forward in kept.items():
    kept[name] = sum(v.shape == x.shape for v in jax.tree.leaves(jax.eval_shape(forward)))
    print(f"{name:<28} keeps {kept[name]} of the input's size")
assert kept["jaxbn residuals"] == 1 and kept["notes' cache"] == 2  # x; x and x_hat
assert kept["autodiff (jax.vjp pullback)"] > 1

# %% [markdown]
# ## 5. NCHW: the feature axis instead of transposes
#
# The notes' spatial batch norm transposes `(N, C, H, W)` to `(N, W, H, C)`, reshapes to
# `(N*H*W, C)`, runs the 2-D version and transposes back, in both directions (and the
# forward read `temp_output` after assigning `temp_out`). jaxbn takes `axis=1`, the
# feature axis, and reduces over `(0, 2, 3)` where the data lie.


# %%
def spatial_batchnorm_forward(x, gamma, beta, bn_param, xp=np):
    N, C, H, W = x.shape
    temp_out, cache = batchnorm_forward(
        x.transpose(0, 3, 2, 1).reshape((N * H * W, C)), gamma, beta, bn_param, xp
    )
    out = temp_out.reshape(N, W, H, C).transpose(0, 3, 2, 1)  # fix: one name
    return out, cache


def spatial_batchnorm_backward(dout, cache, xp=np):
    N, C, H, W = dout.shape
    dx_temp, dgamma, dbeta = batchnorm_backward_alt(
        dout.transpose(0, 3, 2, 1).reshape((N * H * W, C)), cache, xp
    )
    dx = dx_temp.reshape(N, W, H, C).transpose(0, 3, 2, 1)
    return dx, dgamma, dbeta


shape = (16, 6, 5, 7)  # N, C, H, W: H != W, so a transpose mix-up would show
with jax.enable_x64(True):
    x = rng.normal(2.0, 3.0, shape)
    g, b, dy = rng.uniform(0.5, 1.5, 6), rng.normal(size=6), rng.normal(size=shape)
    out_n, cache = spatial_batchnorm_forward(x, g, b, {"mode": "train"})
    grads_n = spatial_batchnorm_backward(dy, cache)
    (out_j, _, _, _), res = jaxbn.batch_norm_fwd(x, g, b, axis=1)
    grads_j = jaxbn.batch_norm_bwd(res, dy, axis=1)
print("float64, notes' transposes vs jaxbn axis=1, max relative difference:")
for name, a, c in zip(("y", "dx", "dgamma", "dbeta"), (out_n, *grads_n), (out_j, *grads_j)):
    print(f"  {name:<7}{rel_err(c, a):.1e}")
    assert rel_err(c, a) < 1e-12

# %% [markdown]
# Under `jit` the transposes are real operations in the program; XLA may fuse them into
# neighbouring kernels, so whether they cost time is measured rather than assumed. The
# same activation also runs channels-last (NHWC, `axis=-1`) for comparison.


# %%
@jax.jit
def notes_nchw(x, gamma, beta, dy):
    y, cache = spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"}, xp=jnp)
    return y, *spatial_batchnorm_backward(dy, cache, xp=jnp)


def jaxbn_axis(axis):
    @jax.jit
    def f(x, gamma, beta, dy):
        (y, _, _, _), res = jaxbn.batch_norm_fwd(x, gamma, beta, axis=axis)
        return y, *jaxbn.batch_norm_bwd(res, dy, axis=axis)

    return f


n, c, h, w = 32, 64, 16, 16
x = jnp.asarray(rng.normal(1.0, 2.0, (n, c, h, w)), jnp.float32)
dy = jnp.asarray(rng.normal(size=(n, c, h, w)), jnp.float32)
g, b = jnp.ones(c), jnp.zeros(c)
to_nhwc = lambda a: jnp.transpose(a, (0, 2, 3, 1))  # noqa: E731
layouts = {
    "notes: NCHW via transposes": (notes_nchw, (x, g, b, dy)),
    "jaxbn: NCHW, axis=1": (jaxbn_axis(1), (x, g, b, dy)),
    "jaxbn: NHWC, axis=-1": (jaxbn_axis(-1), (to_nhwc(x), g, b, to_nhwc(dy))),
}
transposes = {
    name: str(jax.make_jaxpr(f)(*a)).count("transpose[") for name, (f, a) in layouts.items()
}
layout_ms = interleaved_ms(layouts)
print(f"x {(n, c, h, w)} float32{'transposes in jaxpr':>27}{'median ms [quartiles]':>26}")
for name, t in layout_ms.items():
    print(f"  {name:<30}{transposes[name]:>14}{quartiles(t):>26}")
# the notes' version: two transposes each way; jaxbn's: none in either layout
assert list(transposes.values()) == [4, 0, 0], transposes

fig, ax = plt.subplots(figsize=(8, 2.5), layout="constrained")
q1, med, q3 = np.percentile(list(layout_ms.values()), [25, 50, 75], axis=1)
ax.barh(list(layout_ms), med, xerr=[med - q1, q3 - med], color=["C3", "C0", "C0"], capsize=3)
ax.invert_yaxis()
ax.set_xlabel("forward + backward under jit, ms (median, quartiles)")
ax.set_title(f"batch norm of a {(n, c, h, w)} activation, float32")
ax.grid(axis="x", alpha=0.3)
plt.show()

# %% [markdown]
# Same numbers, no transposes: with `axis=1` the program reduces over `(0, 2, 3)` where
# the data lie, while the notes' version moves the whole activation through transposes
# (four of them in the program, two each way; asserted above). What that costs, and how
# `axis=1` compares with the same activation stored channels-last (NHWC, where the
# features are the minor dimension and the reductions can vectorize across them), the
# printed medians and quartiles say for this machine; timings are noisy on a shared
# CPU, so run the cell again to see how stable the ordering is.
