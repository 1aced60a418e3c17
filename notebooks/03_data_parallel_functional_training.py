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
# # Data-parallel, functional training
#
# jaxbn keeps batch norm's running statistics as a value: `batch_norm` takes `state` and
# returns a new one. A training step is then an ordinary pure function of
# `(params, state, opt_state, batch)`, and spreading it over devices changes one
# argument: `axis_name`, which makes every device normalize with the statistics of the
# whole batch.
#
# This notebook trains a small CNN on scikit-learn's digits four ways, from the same
# initial values and the same batches (`STEPS` steps of `BATCH` images, set in the
# `parameters` cell below and printed):
#
# 1. on one device;
# 2. with the step sharded over 8 devices by `jax.shard_map`, statistics synchronized
#    with `axis_name="batch"`;
# 3. with the one-device step under `jit` and a batch-sharded input (no `shard_map`);
# 4. sharded, but each device normalizing with its own 8 examples (no `axis_name`).
#
# It checks two things, for each seed of `SEEDS` (initial weights and batch order):
# whether the steps are the *same function* (each variant takes every step of the
# one-device run again, from the same inputs, and its outputs are compared, in float64
# so that rounding cannot hide a real difference), and what becomes of independent
# training runs. The first three are the same function; the fourth is a different
# algorithm.
#
# The 8 devices are simulated on the CPU; that must be set before JAX creates its
# backend, so it happens in the first cell, right after the imports (which create no
# arrays).

# %%
import types

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import scipy.stats
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxbn

jax.config.update("jax_num_cpu_devices", 8)
print(jax.devices())

# %% tags=["parameters"]
# seeds (initial weights and batch order), steps per run and the global batch; papermill
# can set them (-p SEEDS "[5, 6, 7, 8, 9]")
SEEDS = [0, 1, 2, 3, 4]
STEPS, BATCH = 40, 64

# %% [markdown]
# ## The data and the model
#
# The data of `python -m jaxbn demo`, written out: the 1797 digits as NHWC images in
# `[0, 1]`, split 3:1. The model is the demo's CNN at half its width, to keep this
# notebook quick: three 3x3 convolutions with 8, 16 and 32 channels (the last two with
# stride 2), each followed by `jaxbn.batch_norm` (which replaces the convolution's bias)
# and a relu, then a global average and a linear head. `axis_name` goes to every batch
# norm; it is what `shard_map` below needs.


# %%
def load_digits_split():
    """The 1797 digits as NHWC images in [0, 1], split 3:1 and stratified as in the demo."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return types.SimpleNamespace(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)


def batch_indices(n, batch_size, steps, seed):
    """(steps, batch_size) indices: a fresh permutation each epoch, the last partial dropped."""
    rs, out = np.random.RandomState(seed), []
    while len(out) < steps:
        perm = rs.permutation(n)
        out += [perm[i * batch_size : (i + 1) * batch_size] for i in range(n // batch_size)]
    return np.stack(out[:steps])


def init_cnn(key, widths=(8, 16, 32), num_classes=10):
    """He-initialized 3x3 convolutions and a linear head; batch norm replaces the biases."""
    keys = jax.random.split(key, len(widths) + 1)
    params, state, c_in = [], [], 1
    for k, c in zip(keys, widths):
        # drawn flat, then reshaped: XLA:CPU compiles a 4-D draw many times slower
        w = jax.random.normal(k, (9 * c_in * c,)).reshape(3, 3, c_in, c) * np.sqrt(2 / (9 * c_in))
        params.append({"w": w, "gamma": jnp.ones(c), "beta": jnp.zeros(c)})
        state.append(jaxbn.init_state(c))
        c_in = c
    w = jax.random.normal(keys[-1], (c_in, num_classes)) * np.sqrt(1.0 / c_in)
    params.append({"w": w, "b": jnp.zeros(num_classes)})
    return params, tuple(state)


def apply_cnn(params, state, x, *, training, axis_name=None):
    """Logits of NHWC images (N, 8, 8, 1) and the new running statistics."""
    new_state, h = [], x
    for i, layer in enumerate(params[:-1]):
        stride = 1 if i == 0 else 2
        h = lax.conv_general_dilated(
            h, layer["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h, s = jaxbn.batch_norm(
            h, layer["gamma"], layer["beta"], state[i], training=training, axis_name=axis_name
        )
        new_state.append(s)
        h = jax.nn.relu(h)
    h = jnp.mean(h, axis=(1, 2))
    return h @ params[-1]["w"] + params[-1]["b"][None, :], tuple(new_state)


# %% [markdown]
# ## One device: the functional loop
#
# Everything that changes during training is an explicit value: the parameters
# (convolution weights, `gamma`, `beta`, the linear head), the batch-norm `state` (one
# `BatchNormState(mean, var, count)` per convolution) and the optimizer's state. The
# loss returns the new running statistics as auxiliary output; nothing is mutated.
#
# Because the step is a pure function, a whole run is one `lax.scan` over the batches,
# compiled once: `make_run(step)` below. Each variant is such a run with a different
# `step`. A run can also *follow* another one: with `follow=True`, step `t` starts
# from the other run's carry before its step `t` (`given[t]`) instead of from its own.
# That applies the variant's step function to exactly the inputs the one-device run
# saw, step after step, with no accumulation of differences: the test of whether two
# step functions are the same.

# %%
digits = load_digits_split()
optimizer = optax.sgd(0.05, momentum=0.9)  # as in the demo


def loss_fn(params, state, x, y):
    logits, new_state = apply_cnn(params, state, x, training=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state


def train_step(params, state, opt_state, x, y):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss


def make_run(step):
    """run(carry, xs, ys, given, follow) -> (carries, losses), jitted, by lax.scan.

    carries[t] is the (params, state, opt_state) after step t, losses[t] its loss.
    Step t starts from the carry of step t - 1, or from given[t] where follow is True.
    """

    def run(carry, xs, ys, given, follow):
        def body(own, inputs):
            given_t, x, y = inputs
            start = jax.tree.map(lambda g, o: jnp.where(follow, g, o), given_t, own)
            params, state, opt_state, loss = step(*start, x, y)
            return (params, state, opt_state), ((params, state, opt_state), loss)

        return lax.scan(body, carry, (given, xs, ys))[1]

    return jax.jit(run)


starts, data = {}, {}
for seed in SEEDS:
    params0, state0 = init_cnn(jax.random.key(seed))
    starts[seed] = (params0, state0, optimizer.init(params0))
    idx = batch_indices(len(digits.x_train), BATCH, STEPS, seed)
    data[seed] = (digits.x_train[idx], digits.y_train[idx])  # (STEPS, BATCH, ...) each


def train(run, seed, put=lambda v: v, start=None):
    """A free run over seed's batches, from seed's start unless another start is given."""
    start = starts[seed] if start is None else start
    ignored = jax.tree.map(lambda a: np.broadcast_to(a, (STEPS, *np.shape(a))), start)
    return run(start, *map(put, data[seed]), ignored, False)


def follow(run, seed, ref_carries, put=lambda v: v):
    """Every step of seed's run that returned ref_carries, taken again with run's step."""
    given = jax.tree.map(
        lambda c0, c: np.concatenate([np.asarray(c0)[None], np.asarray(c)[:-1]]),
        starts[seed],
        ref_carries,
    )  # given[t]: the carry before step t
    return run(starts[seed], *map(put, data[seed]), given, True)


one_device = make_run(train_step)
free = {"one device": {seed: train(one_device, seed) for seed in SEEDS}}
print("BatchNormState per layer:", jax.tree.map(jnp.shape, starts[SEEDS[0]][1][0]))
final_losses = [f"{free['one device'][s][1][-1]:.3f}" for s in SEEDS]
print(f"{len(SEEDS)} seeds {SEEDS}, {STEPS} steps of {BATCH} images each")
print("one device, final training loss per seed:", *final_losses)

# %% [markdown]
# ## Eight devices with `shard_map`
#
# Each device gets 8 of the 64 examples (`P("batch")`) and a replicated copy of
# everything else (`P()`). Inside, the model is the same function with
# `axis_name="batch"`: batch norm sums its statistics over the devices, weighted by
# their counts, so every device normalizes with the mean and variance of all 64
# examples, and the running statistics come out the same everywhere.
#
# The loss is written as this device's share of the global mean (its sum over 64), and
# `lax.psum` adds the shares. The gradient needs no explicit collective: the parameters
# enter `shard_map` replicated, and JAX's autodiff sums the cotangents of a replicated
# input over the devices, which is exactly the gradient of the global loss. The
# optimizer update then runs identically on every device.
#
# The batches are stored with the batch axis split over the 8 devices (`put_sharded`),
# so each device reads only its own examples.

# %%
mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))


def put_sharded(v):
    """(STEPS, BATCH, ...) with the batch axis split over the devices."""
    return jax.device_put(v, NamedSharding(mesh, P(None, "batch")))


def sharded_step_fn(axis_name):
    def local_step(params, state, opt_state, x, y):
        def local_loss(params, state):
            logits, new_state = apply_cnn(params, state, x, training=True, axis_name=axis_name)
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return per_example.sum() / BATCH, new_state

        (loss, state), grads = jax.value_and_grad(local_loss, has_aux=True)(params, state)
        if axis_name is None:  # each device has its own statistics: average them
            state = tuple(
                s._replace(mean=lax.pmean(s.mean, "batch"), var=lax.pmean(s.var, "batch"))
                for s in state
            )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, lax.psum(loss, "batch")

    return jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(P(), P(), P(), P("batch"), P("batch")),
        out_specs=(P(), P(), P(), P()),
    )


runs = {
    "8 devices, shard_map, axis_name": make_run(sharded_step_fn("batch")),
    # the one-device run itself, unchanged: only its input is sharded
    "8 devices, jit, sharded input": one_device,
    "8 devices, local statistics": make_run(sharded_step_fn(None)),
}

# %% [markdown]
# ## Eight devices with `jit` alone, and unsynchronized statistics
#
# The second entry of `runs` above is the one-device run with no change at all: given
# a batch-sharded input, the statistics under `jit` are global reductions, and XLA
# inserts the cross-device sums itself (`jit` compiles it anew for the new input
# sharding). `shard_map` is for when you write the
# per-device program by hand.
#
# The third is the `shard_map` step without `axis_name`: each device normalizes its 8
# examples with their own mean and variance ("ghost" batch norm), and the running
# statistics are averaged afterwards. Gradients are still summed over all 64 examples;
# only the normalization differs.
#
# Each variant first follows the one-device run of every seed (the one-step check),
# then trains on its own from the same start. The synchronized variants follow it in
# float64 (next section); the local-statistics variant, whose difference is of order
# one, in float32. For the plot only, the one-device run is also repeated from initial
# weights perturbed by `1e-7` relative, the size of float32 rounding: it shows how far
# rounding alone carries a free run, but it takes another rounding path than the
# variants do, so it bounds nothing and no assertion uses it.


# %%
def as64(tree):
    """tree with its float32 leaves as float64 NumPy arrays (the others unchanged)."""
    return jax.tree.map(
        lambda a: np.asarray(a, np.float64) if np.asarray(a).dtype == np.float32 else a, tree
    )


def follow64(run, seed, ref_carries, put):
    """follow, in float64: every step from the same inputs, cast up from float32."""
    given = jax.tree.map(
        lambda c0, c: np.concatenate([np.asarray(c0)[None], np.asarray(c)[:-1]]),
        starts[seed],
        ref_carries,
    )
    xs, ys = data[seed]
    out = run(as64(starts[seed]), put(xs.astype(np.float64)), put(ys), as64(given), True)
    return jax.device_get(jax.block_until_ready(out))


SYNCED = ["8 devices, shard_map, axis_name", "8 devices, jit, sharded input"]
followed = {name: {} for name in runs}  # float32; the local-statistics variant only
followed64 = {name: {} for name in ["one device", *SYNCED]}  # float64
with jax.enable_x64(True):
    for s in SEEDS:
        ref = free["one device"][s][0]
        followed64["one device"][s] = follow64(one_device, s, ref, lambda v: v)
        for name in SYNCED:
            # one sharded program at a time: with 8 devices simulated on 2 CPU cores, two
            # in flight at once can deadlock XLA's in-process all-reduce (seen, jax 0.10.2)
            followed64[name][s] = follow64(runs[name], s, ref, put_sharded)
for name, run in runs.items():
    if name not in SYNCED:
        for s in SEEDS:
            followed[name][s] = jax.block_until_ready(
                follow(run, s, free["one device"][s][0], put_sharded)
            )
    free[name] = {s: jax.block_until_ready(train(run, s, put_sharded)) for s in SEEDS}


def perturbed(start, seed, rel=1e-7):
    """start with every weight multiplied by 1 + rel * (a standard normal draw)."""
    params, state, opt_state = start
    rng = np.random.default_rng(1000 + seed)
    noise = lambda w: rel * rng.standard_normal(w.shape, np.float32)
    params = jax.tree.map(lambda w: w * (1 + noise(w)), params)
    return params, state, opt_state


CONTROL = "one device, weights perturbed 1e-7"
free[CONTROL] = {s: train(one_device, s, start=perturbed(starts[s], s)) for s in SEEDS}

# %% [markdown]
# ## The one-step check
#
# At every step of the one-device run, each variant took the same
# `(params, state, opt_state)` and batch. Compared with the one-device step's from
# those inputs: the loss, the new optimizer state (SGD's momentum buffer, a running
# sum of gradients, so this compares the gradients) and the new running statistics.
# Each is measured against its own scale: the largest difference over the largest
# value *of that kind* (all the momentum buffers of a step together, all the running
# statistics together). A leaf of its own is no scale: a leaf whose exact value is 0
# (a gradient that batch norm cancels) holds rounding alone, and its difference over
# its own largest value is of order one in any precision. The synchronized variants
# are compared in float64, with the one-device step also taken in float64 from the
# same inputs; the local-statistics variant in float32. The table summarizes all steps
# of all seeds.


# %%
def rel_diff(a, b):
    """Per step (the leading axis): the largest difference over the trees' float leaves,
    over the largest |value| of b's float leaves at that step (the kind's scale)."""
    pairs = [
        (
            np.asarray(u, np.float64).reshape(len(u), -1),
            np.asarray(v, np.float64).reshape(len(v), -1),
        )
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        if np.issubdtype(np.asarray(v).dtype, np.floating)
    ]
    diff = np.max([np.abs(u - v).max(1) for u, v in pairs], axis=0)
    scale = np.max([np.abs(v).max(1) for _, v in pairs], axis=0)
    return diff / np.maximum(scale, 1e-300)


def compare(by_seed, ref_by_seed):
    """(seeds, STEPS, 3): loss, momentum and running statistics, as rel_diff."""
    rows = []
    for s in SEEDS:
        (carries, step_losses), (ref_carries, ref_losses) = by_seed[s], ref_by_seed[s]
        rows.append(
            [
                rel_diff(step_losses, ref_losses),
                rel_diff(carries[2], ref_carries[2]),
                rel_diff(carries[1], ref_carries[1]),
            ]
        )
    return np.transpose(rows, (0, 2, 1))


# per_step[name]: (seeds, STEPS, 3) relative differences of loss, momentum, running stats
per_step = {name: compare(followed64[name], followed64["one device"]) for name in SYNCED}
per_step |= {n: compare(followed[n], free["one device"]) for n in runs if n not in SYNCED}

print(f"One step from the same inputs, {len(SEEDS)} seeds x {STEPS} steps, relative difference:")
print(f"{'':42}{'loss':>9}{'momentum':>10}{'running stats':>15}")
for name, d in per_step.items():
    for label, f in [("max", np.max), ("median", np.median), ("min", np.min)]:
        v = f(d, axis=(0, 1))
        label = f"{label}, {'f64' if name in SYNCED else 'f32'}"
        print(f"{name if 'max' in label else '':34}{label:>8}{v[0]:9.1e}{v[1]:10.1e}{v[2]:15.1e}")

# what the text below says, checked each time the notebook runs
# The same function, in float64: the two steps differ only in the order of their sums
# (across devices, or in XLA's schedule). Reordering a sum of n terms moves it by at
# most about n u sum|terms| (u = 1.1e-16 in float64; Higham, "Accuracy and Stability
# of Numerical Algorithms", 4.2); n <= 64 * 8 * 8 = 4096 terms per reduction gives
# 4.5e-13 of the terms' magnitude, and a cancellation of 100x between the terms and
# their sum (the backward of batch norm subtracts means) makes 4.5e-11 of the scale:
# the bound 1e-10. A real difference (the local statistics below) is 1e-2 or more.
F64_BOUND = 1e-10
for name in SYNCED:
    assert per_step[name].max() < F64_BOUND, (name, per_step[name].max((0, 1)))
# A different function, in float32, whose rounding is ~1e-6 of the scale: its
# gradients differ at every step by more than 1e-2 (10^4 times float32 rounding), and
# at the median step by more than 5% in the loss and the gradients
d = per_step["8 devices, local statistics"]
assert d[..., 1].min() > 1e-2, d.min((0, 1))
assert np.median(d[..., :2], axis=(0, 1)).min() > 0.05, np.median(d, (0, 1))

# %% [markdown]
# With `axis_name="batch"`, the sharded step *is* the one-device step: from the same
# inputs, at every step of every seed, the loss, the gradients (through the momentum
# buffer) and the new running statistics agree in float64 to the rounding of summing
# in another order (the largest relative difference is printed above; the assertion
# allows `1e-10`, derived beside it). `jit` with a batch-sharded input gets there with
# no code change at all. Without `axis_name`, each device normalizes with 8 examples and the step is a
# different function: its gradients differ at every step (the printed minimum), by
# order one at the median, and so does its loss at most steps.
#
# ## Independent runs
#
# Now each variant trains on its own. Below: the final training loss and the test
# accuracy (evaluation mode, running statistics) as mean ± standard deviation over
# the seeds and per seed, and how far each run's training loss drifts from the
# one-device run of the same seed (relative difference, the largest over all steps and
# over the first 10).


# %%
@jax.jit
def test_accuracy(params, state):
    logits, _ = apply_cnn(params, state, digits.x_test, training=False)
    return jnp.mean(jnp.argmax(logits, -1) == digits.y_test)


def final(carries):
    """The (params, state) after the last step, fetched to the host."""
    return jax.device_get(jax.tree.map(lambda a: a[-1], carries[:2]))


acc = {n: np.array([float(test_accuracy(*final(free[n][s][0]))) for s in SEEDS]) for n in free}
losses = {n: np.stack([np.asarray(free[n][s][1]) for s in SEEDS]) for n in free}
drift = {n: np.abs(losses[n] - losses["one device"]) / losses["one device"] for n in free}


def mean_std(v):
    return f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}"


print(f"Independent runs of {STEPS} steps, seeds {SEEDS} (mean ± std over seeds):")
print(f"{'':36}{'final loss':>17}{'test accuracy':>17}{'loss drift: max':>17}{'first 10':>10}")
for n in free:
    print(
        f"{n:36}{mean_std(losses[n][:, -1]):>17}{mean_std(acc[n]):>17}"
        f"{drift[n].max():17.1e}{drift[n][:, :10].max():10.1e}"
    )
print(f"\ntest accuracy per seed ({len(digits.y_test)} test images):")
for n in free:
    print(f"  {n:36}" + "".join(f"{a:8.4f}" for a in acc[n]))

# paired by seed (every variant shares the one-device run's start and batches)
T975 = scipy.stats.t.ppf(0.975, len(SEEDS) - 1)  # two-sided 5%, n - 1 degrees of freedom
late = {n: losses[n][:, -10:].mean(1) for n in free}  # the last 10 steps' mean loss
print(f"\npaired by seed, minus the one-device run: mean [95% CI, t with {len(SEEDS) - 1} df]")
for n in runs:
    for what, v in (("test accuracy", acc), ("loss, last 10 steps", late)):
        dv = v[n] - v["one device"]
        half = T975 * np.std(dv, ddof=1) / np.sqrt(len(dv))
        print(
            f"  {n:36}{what:22}{dv.mean():+.4f} [{dv.mean() - half:+.4f}, {dv.mean() + half:+.4f}]"
        )
dv = acc["8 devices, local statistics"] - acc["one device"]
upper = dv.mean() + T975 * np.std(dv, ddof=1) / np.sqrt(len(dv))
print(
    "local statistics, test accuracy cost:",
    "detected (the interval excludes 0)" if upper < 0 else "not detected with these seeds",
)

# %% [markdown]
# Left, the training loss (mean over the seeds, band: min to max). Middle, the
# one-step check above as curves (median over the seeds, band: min to max). Right,
# each free run's largest drift from the one-device run so far, seed by seed, with the
# one-device run restarted from perturbed weights (an illustration of how far float32
# rounding carries a free run, not a bound).

# %%
style = {
    "one device": ("C0", "-"),
    "8 devices, shard_map, axis_name": ("C1", "--"),
    "8 devices, jit, sharded input": ("C2", ":"),
    "8 devices, local statistics": ("C3", "-"),
    CONTROL: ("C7", "-."),
}
steps = np.arange(1, STEPS + 1)
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
for n in ["one device", *runs]:
    c, ls = style[n]
    axes[0].plot(steps, losses[n].mean(0), ls, color=c, lw=1.5, label=n)
    axes[0].fill_between(steps, losses[n].min(0), losses[n].max(0), color=c, alpha=0.15)
axes[0].set(xlabel="step", ylabel="training loss", yscale="log")
axes[0].set_title(f"free runs: mean of {len(SEEDS)} seeds, min-max band")
for n, d in per_step.items():
    c, ls = style[n]
    grad_diff = np.maximum(d[..., 1], 1e-18)  # float64 differences reach 1e-16
    axes[1].plot(steps, np.median(grad_diff, 0), ls, color=c, lw=1.5, label=n)
    axes[1].fill_between(steps, grad_diff.min(0), grad_diff.max(0), color=c, alpha=0.15)
axes[1].set(xlabel="step", ylabel="relative difference of the momentum", yscale="log")
axes[1].set_title("one step from the one-device run's inputs")
for n in [*runs, CONTROL]:
    c, ls = style[n]
    for i in range(len(SEEDS)):
        worst = np.maximum.accumulate(np.maximum(drift[n][i], 1e-9))
        axes[2].plot(steps, worst, ls, color=c, lw=1.2, label=n if i == 0 else None)
axes[2].set(xlabel="step", ylabel="largest relative loss difference so far", yscale="log")
axes[2].set_title("free runs vs the one-device run, each seed")
for ax in axes:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# **What it shows.** Run independently, the synchronized variants' loss curves lie on
# the one-device run's: their drift from it (printed, right panel) is float32 rounding
# carried through training, of the size the perturbed restart shows, and each seed ends
# far closer to its own one-device run than the seeds are to each other (the assertion
# below: within a quarter of the seeds' standard deviation, in loss and in test
# accuracy, or one test image). Training can amplify rounding differences over longer
# runs, so the one-step check above is the test of equality, and the free runs only
# show that nothing else parts them.
#
# Unsynchronized ("ghost") batch norm is a different algorithm, whose statistics
# depend on how many devices share the batch. Its training loss, measured with its own
# noisier 8-example statistics, is higher than the one-device run's in every seed
# (over the last 10 steps). Its test accuracy, paired by seed with the one-device
# run's, is lower on average on this seed set (the printed mean difference); whether
# that cost is *detected* with this many seeds, the printed 95% interval says (where it
# contains 0, the seeds lack the power to tell; it is not evidence of no cost). What
# is asserted is that it is not higher. Under
# `shard_map` it needs nothing special: with `axis_name=None` and replicated
# `gamma`/`beta`, jaxbn marks them as varying like `x` before its hand-derived rule,
# so the per-device gradients are summed as plain autodiff would sum them.

# %%
# what the text above says, checked each time the notebook runs
n_test = len(digits.y_test)
for n in SYNCED:
    # an outcome claim, against the seeds' spread: each seed's free run ends within a
    # quarter of the seed-to-seed standard deviation of the one-device run's final
    # loss (last 10 steps) and test accuracy (or one test image, the resolution of the
    # accuracy): far closer to its own one-device run than to another seed's
    for what, v, floor in (("loss", late, 0.0), ("accuracy", acc, 1 / n_test)):
        gap = np.abs(v[n] - v["one device"]).max()
        bound = max(0.25 * np.std(v["one device"], ddof=1), floor)
        print(f"{n}, {what}: largest per-seed gap {gap:.2e} (bound {bound:.2e})")
        assert gap <= bound + 1e-9, (n, what, gap, bound)  # 1e-9: the float32 accuracy
local = "8 devices, local statistics"
# the last 10 steps' mean, per seed: one batch's loss alone is noisier than the gap
assert np.all(late[local] > late["one device"]), late
# no accuracy gain: the paired mean difference is below one test image (whether a
# cost is detected is printed above)
dv = acc[local] - acc["one device"]
assert dv.mean() < 1 / n_test, dv
