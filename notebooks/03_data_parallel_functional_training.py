# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
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
# This notebook trains the small CNN of `python -m jaxbn demo` on scikit-learn's digits
# four ways, from the same initial values and the same batches:
#
# 1. on one device, with a jitted step;
# 2. with the step sharded over 8 devices by `jax.shard_map`, statistics synchronized
#    with `axis_name="batch"`;
# 3. with the one-device step under `jit` and a batch-sharded input (no `shard_map`);
# 4. sharded, but each device normalizing with its own 8 examples (no `axis_name`).
#
# The first three give the same results to float32 rounding; the fourth does not.
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
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxbn

jax.config.update("jax_num_cpu_devices", 8)
print(jax.devices())

# %% [markdown]
# ## The data and the model
#
# The demo's data and CNN, written out: the 1797 digits as NHWC images in `[0, 1]`,
# split 3:1; three 3x3 convolutions (the last two with stride 2), each followed by
# `jaxbn.batch_norm` (which replaces the convolution's bias) and a relu, then a global
# average and a linear head. `axis_name` goes to every batch norm; it is what
# `shard_map` below needs.


# %%
def load_digits_split():
    """The 1797 digits as NHWC images in [0, 1], split 3:1 and stratified as in the demo."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return types.SimpleNamespace(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)


def batches(n, batch_size, epochs, seed):
    """Index arrays of a fresh permutation each epoch; the last partial batch is dropped."""
    rs = np.random.RandomState(seed)
    for _ in range(epochs):
        perm = rs.permutation(n)
        for i in range(n // batch_size):
            yield perm[i * batch_size : (i + 1) * batch_size]


def init_cnn(key, use_bn, widths=(16, 32, 64), num_classes=10):
    """He-initialized 3x3 convolutions and a linear head; batch norm replaces the biases."""
    keys = jax.random.split(key, len(widths) + 1)
    params, state, c_in = [], [], 1
    for k, c in zip(keys, widths):
        w = jax.random.normal(k, (3, 3, c_in, c)) * np.sqrt(2.0 / (9 * c_in))
        if use_bn:
            params.append({"w": w, "gamma": jnp.ones(c), "beta": jnp.zeros(c)})
            state.append(jaxbn.init_state(c))
        else:
            params.append({"w": w, "b": jnp.zeros(c)})
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
        if "gamma" in layer:
            h, s = jaxbn.batch_norm(
                h, layer["gamma"], layer["beta"], state[i], training=training, axis_name=axis_name
            )
            new_state.append(s)
        else:
            h = h + layer["b"][None, None, None, :]
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

# %%
digits = load_digits_split()
optimizer = optax.sgd(0.05, momentum=0.9)  # as in the demo
params0, state0 = init_cnn(jax.random.key(0), use_bn=True)
opt_state0 = optimizer.init(params0)
print(jax.tree.map(jnp.shape, state0[0]))


def loss_fn(params, state, x, y):
    logits, new_state = apply_cnn(params, state, x, training=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state


@jax.jit
def train_step(params, state, opt_state, x, y):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss


@jax.jit
def test_accuracy(params, state):
    logits, _ = apply_cnn(params, state, digits.x_test, training=False)
    return jnp.mean(jnp.argmax(logits, -1) == digits.y_test)


STEPS, BATCH = 150, 64
order = list(batches(len(digits.x_train), BATCH, epochs=8, seed=0))[:STEPS]


def fit(step, put=lambda v: v):
    """Runs STEPS steps from the same start over the same batches; returns the carry and losses."""
    params, state, opt_state, losses = params0, state0, opt_state0, []
    for idx in order:
        x, y = put(digits.x_train[idx]), put(digits.y_train[idx])
        params, state, opt_state, loss = step(params, state, opt_state, x, y)
        # Wait for each step: with 8 devices simulated on 2 CPU cores, two steps in
        # flight at once can deadlock XLA's in-process all-reduce (seen with jax 0.10.2).
        losses.append(jax.block_until_ready(loss))
    return (params, state, opt_state), np.asarray(losses)


results = {"one device": fit(train_step)}
print(f"one device: final loss {results['one device'][1][-1]:.4f}")

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

# %%
mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
batch_sharding = NamedSharding(mesh, P("batch"))


def put_sharded(v):
    return jax.device_put(v, batch_sharding)


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

    return jax.jit(
        jax.shard_map(
            local_step,
            mesh=mesh,
            in_specs=(P(), P(), P(), P("batch"), P("batch")),
            out_specs=(P(), P(), P(), P()),
        )
    )


results["8 devices, shard_map, axis_name"] = fit(sharded_step_fn("batch"), put_sharded)

# %% [markdown]
# ## Eight devices with `jit` alone
#
# With a batch-sharded input, the one-device `train_step` needs no change at all: under
# `jit` the statistics are global reductions, and XLA inserts the cross-device sums
# itself. `shard_map` is for when you write the per-device program by hand.

# %%
results["8 devices, jit, sharded input"] = fit(train_step, put_sharded)

# %% [markdown]
# ## Eight devices, unsynchronized statistics
#
# The same `shard_map` step without `axis_name`: each device normalizes its 8 examples
# with their own mean and variance ("ghost" batch norm), and the running statistics are
# averaged afterwards. Gradients are still summed over all 64 examples; only the
# normalization differs.

# %%
results["8 devices, local statistics"] = fit(sharded_step_fn(None), put_sharded)

# %% [markdown]
# ## Same results?
#
# Two checks. First, one step at a time: at every step of the one-device run, each
# variant takes the same `(params, state, opt_state)` and batch, and its loss, new
# optimizer state (SGD's momentum buffer: a running sum of gradients, so this compares
# the gradients) and new running statistics are compared with the one-device step's.
# This tests the step function itself, with no accumulation. Second, the four independent
# runs of 150 steps above: their loss curves and final test accuracy.


# %%
def rel_diff(a, b):
    """Largest relative difference over the leaves of two pytrees (each leaf scaled by b's max)."""
    diffs = jax.tree.map(
        lambda u, v: jnp.max(jnp.abs(u - v)) / jnp.maximum(jnp.max(jnp.abs(v)), 1e-30), a, b
    )
    return float(max(jax.tree.leaves(diffs)))


variants = {
    "8 devices, shard_map, axis_name": (sharded_step_fn("batch"), put_sharded),
    "8 devices, jit, sharded input": (train_step, put_sharded),
    "8 devices, local statistics": (sharded_step_fn(None), put_sharded),
}
per_step = {name: [] for name in variants}
params, state, opt_state = params0, state0, opt_state0
for idx in order:
    x, y = digits.x_train[idx], digits.y_train[idx]
    ref = train_step(params, state, opt_state, x, y)
    for name, (step, put) in variants.items():
        new = jax.block_until_ready(step(params, state, opt_state, put(x), put(y)))
        per_step[name].append(
            (rel_diff(new[3], ref[3]), rel_diff(new[2], ref[2]), rel_diff(new[1], ref[1]))
        )
    params, state, opt_state = ref[:3]

print("One step from the same inputs, worst case over the 150 steps (relative difference):")
print(f"{'':34}{'loss':>9}{'momentum':>10}{'running stats':>15}")
for name, diffs in per_step.items():
    worst = np.max(np.asarray(diffs), axis=0)
    print(f"{name:34}{worst[0]:9.1e}{worst[1]:10.1e}{worst[2]:15.1e}")
    # what the text below says, checked each time the notebook runs
    assert (worst[0] > 1e-2) if "local" in name else (worst.max() < 1e-4), (name, worst)

print("\nIndependent runs of 150 steps:")
ref_carry, ref_losses = results["one device"]
print(f"{'':34}{'final loss':>11}{'max loss diff':>15}{'params diff':>13}{'test acc':>10}")
for name, (carry, losses) in results.items():
    d_loss = np.max(np.abs(losses - ref_losses) / ref_losses)
    d_params = rel_diff(carry[0], ref_carry[0])
    acc = float(test_accuracy(*carry[:2]))
    print(f"{name:34}{losses[-1]:11.4f}{d_loss:15.1e}{d_params:13.1e}{acc:10.4f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
styles = dict(zip(results, [("C0", "-"), ("C1", "--"), ("C2", ":"), ("C3", "-")]))
for name, (_, losses) in results.items():
    axes[0].plot(losses, styles[name][1], color=styles[name][0], lw=1.5, label=name)
axes[0].set(xlabel="step", ylabel="training loss", yscale="log")
axes[0].set_title("independent runs: same start, same batches")
for name, diffs in per_step.items():
    grad_diff = np.maximum(np.asarray(diffs)[:, 1], 1e-9)
    axes[1].semilogy(grad_diff, styles[name][1], color=styles[name][0], lw=1.2, label=name)
axes[1].set(xlabel="step", ylabel="relative difference of the momentum")
axes[1].set_title("one step from the one-device run's inputs (floor 1e-9)")
for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# **What it shows.** With `axis_name="batch"`, the sharded step *is* the one-device
# step: from the same inputs, at every one of the 150 steps, the loss, the gradients
# (through the momentum buffer) and the new running statistics agree to about `1e-6`
# relative, the size of summing float32 numbers in another order. `jit` with a
# batch-sharded input gets there with no code change at all. Without `axis_name`,
# each device normalizes with 8 examples and the step is a different function: the
# loss differs by tens of percent or more and the gradients by order one.
#
# Run independently, the synchronized variants' loss curves overlap and they end at
# the same test accuracy. Their relative difference to the one-device run starts at
# float32 rounding and can grow later: training amplifies rounding differences. (In
# the run we looked at, the `jit` variant parted from the one-device run by about
# `1e-2` after step 70 while the `shard_map` one stayed near `1e-6`; perturbing the
# one-device run's initial weights by `1e-7` relative did the same in one of three
# tries.) The one-step check above is the test of equality; the long runs show that
# it holds up in training.
#
# Unsynchronized ("ghost") batch norm is not worse as such (here it even ended with a
# slightly higher test accuracy); it is a different algorithm, whose statistics depend
# on how many devices share the batch. Under `shard_map` it needs nothing special:
# with `axis_name=None` and replicated `gamma`/`beta`, jaxbn marks them as varying like
# `x` before its hand-derived rule, so the per-device gradients are summed as plain
# autodiff would sum them.
