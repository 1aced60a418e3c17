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
# # What batch norm buys, measured
#
# The notes that jaxbn grew from (`batchnorm-notes.md`) end with three claims: batch
# norm makes training
#
# 1. robust to poor weight initialization,
# 2. less prone to overfitting, and
# 3. free of vanishing and exploding gradients, because the forward pass keeps values
#    in a good range.
#
# Each claim gets one experiment here, run with and without batch norm from the same
# seed (same initial weights, same batch order), plus two views the notes do not
# mention: what one hidden unit sees during training (the original paper's Figure 1)
# and what happens as the batch shrinks.
#
# The data are scikit-learn's 1797 handwritten 8x8 digits, which ship with the
# package: 1347 for training and 450 held out (the same split as `python -m jaxbn demo`).
# The networks are small MLPs on the 64 pixels; the batch-size
# experiment uses the demo's CNN. Where a network has batch norm it sits between each
# hidden linear layer and its nonlinearity, and replaces that layer's bias (the mean
# subtraction would cancel it); the output layer is never normalized. The whole
# notebook runs in about a minute and a half on 2 CPU cores.

# %%
import functools
import itertools
import types

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from jax import lax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxbn


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


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


digits = load_digits_split()
X_train = jnp.asarray(digits.x_train.reshape(len(digits.x_train), -1))
Y_train = jnp.asarray(digits.y_train)
X_val = jnp.asarray(digits.x_test.reshape(len(digits.x_test), -1))
Y_val = jnp.asarray(digits.y_test)
print(f"train {X_train.shape}, validation {X_val.shape}, pixels in [0, 1]")

# %% [markdown]
# ## The model and the training loop
#
# `init_mlp` draws every weight from `N(0, scale**2)`, so one number sets the
# initialization. `mlp` returns the logits, the new running statistics and each
# hidden layer's pre-activation (the input to its nonlinearity: after batch norm when
# there is one). `make_train` compiles a whole run into one `lax.scan` of
# `lax.scan`s: `every` steps, then a `monitor` of the parameters, repeated; that keeps
# Python out of the loop. Each network is compiled once and reused across
# initialization scales and seeds, which are traced arguments. (On 2 CPU cores a Python
# loop over them is as fast as `jax.vmap` and compiles faster.)


# %%
def init_mlp(key, sizes, scale, bn):
    """Weights ~ N(0, scale**2); batch norm (gamma, beta, running stats) on hidden layers."""
    keys = jax.random.split(key, len(sizes) - 1)
    params, states = [], []
    for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        layer = {"w": scale * jax.random.normal(k, (m, n))}
        if bn and i < len(sizes) - 2:
            layer |= {"gamma": jnp.ones(n), "beta": jnp.zeros(n)}
            states.append(jaxbn.init_state(n))
        else:
            layer["b"] = jnp.zeros(n)
        params.append(layer)
    return params, tuple(states)


def mlp(params, states, x, *, training, act):
    """Returns (logits, new_states, pre-activations of the hidden layers)."""
    new_states, pre, h = [], [], x
    for i, layer in enumerate(params[:-1]):
        z = h @ layer["w"]
        if "gamma" in layer:
            z, s = jaxbn.batch_norm(z, layer["gamma"], layer["beta"], states[i], training=training)
            new_states.append(s)
        else:
            z = z + layer["b"]
        pre.append(z)
        h = act(z)
    return h @ params[-1]["w"] + params[-1]["b"], tuple(new_states), pre


def accuracy(params, states, x, y, act):
    """Accuracy in evaluation mode (running statistics)."""
    logits, _, _ = mlp(params, states, x, training=False, act=act)
    return jnp.mean(jnp.argmax(logits, -1) == y)


def batch_indices(seed, n, batch, steps):
    """(steps, batch) indices: a fresh permutation of range(n) each epoch."""
    return np.stack(list(itertools.islice(batches(n, batch, steps, seed), steps)))


def make_train(act, optimizer, every, monitor):
    """train(params, states, x, y, idx) -> (params, states, losses, monitor at 0, monitors)."""

    def loss_fn(params, states, xb, yb):
        logits, states, _ = mlp(params, states, xb, training=True, act=act)
        return cross_entropy(logits, yb), states

    def train(params, states, x, y, idx):
        def step(carry, i):
            params, states, opt_state = carry
            (loss, states), g = jax.value_and_grad(loss_fn, has_aux=True)(
                params, states, x[i], y[i]
            )
            updates, opt_state = optimizer.update(g, opt_state, params)
            return (optax.apply_updates(params, updates), states, opt_state), loss

        def chunk(carry, idx_chunk):
            carry, losses = lax.scan(step, carry, idx_chunk)
            return carry, (losses, monitor(carry[0], carry[1]))

        carry = (params, states, optimizer.init(params))
        idx = idx.reshape(-1, every, idx.shape[-1])
        (params, states, _), (losses, mons) = lax.scan(chunk, carry, idx)
        return params, states, losses.reshape(-1), monitor(*carry[:2]), mons

    return train


# %% [markdown]
# ## 1. Robustness to poor initialization
#
# A ReLU MLP with 6 hidden layers of 100 units, every weight drawn from
# `N(0, scale**2)` with `scale` from `1e-4` to `1e1`, trained for 600 steps of Adam
# (learning rate `1e-3`, batches of 64). The same key draws the same standard-normal
# weights for both networks at every scale.

# %%
SCALES = np.logspace(-4, 1, 11)
SIZES = [64] + [100] * 6 + [10]
idx = jnp.asarray(batch_indices(0, len(X_train), 64, 600))
relu = jax.nn.relu
sweep, out_fixed = {}, {}
for bn in (False, True):

    def monitor(p, s):
        return accuracy(p, s, X_train, Y_train, relu), accuracy(p, s, X_val, Y_val, relu)

    train = make_train(relu, optax.adam(1e-3), 50, monitor)

    @jax.jit
    def run(scale, out_scale, bn=bn, train=train):
        params, states = init_mlp(jax.random.key(0), SIZES, scale, bn)
        params[-1]["w"] = params[-1]["w"] * (out_scale / scale)
        final, _, losses, _, (acc_tr, acc_val) = train(params, states, X_train, Y_train, idx)
        # how far training moved the hidden weights, relative to where they started
        moved = jnp.mean(
            jnp.stack(
                [
                    jnp.linalg.norm(p1["w"] - p0["w"]) / jnp.linalg.norm(p0["w"])
                    for p0, p1 in zip(params[:-1], final[:-1])
                ]
            )
        )
        return losses, acc_tr, acc_val, moved

    sweep[bn] = [run(jnp.float32(s), jnp.float32(s)) for s in SCALES]
    # the large scales again, with the (never normalized) output layer at scale 0.1
    out_fixed[bn] = [run(jnp.float32(s), jnp.float32(0.1)) for s in SCALES[SCALES > 0.2]]

head = f"{'scale':>8} | {'loss of the first batch':>23} | {'final val acc':>15} | "
print(head + "hidden weights moved")
print(f"{'':>8} | {'no BN':>11} {'BN':>11} | {'no BN':>7} {'BN':>7} | {'no BN':>9} {'BN':>9}")


def row(s, a, b):
    (la, _, va, ma), (lb, _, vb, mb) = a, b
    return (
        f"{s:8.0e} | {la[0]:11.3g} {lb[0]:11.3g} | {va[-1]:7.3f} {vb[-1]:7.3f} | "
        f"{ma:9.1e} {mb:9.1e}"
    )


for i, s in enumerate(SCALES):
    print(row(s, sweep[False][i], sweep[True][i]))
print("\nthe same with the output layer's weights at scale 0.1:")
for j, s in enumerate(SCALES[SCALES > 0.2]):
    print(row(s, out_fixed[False][j], out_fixed[True][j]))

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
for bn, color in ((False, "C0"), (True, "C1")):
    label = "with BN" if bn else "without BN"
    final_val = [acc_val[-1] for _, _, acc_val, _ in sweep[bn]]
    final_train = [acc_tr[-1] for _, acc_tr, _, _ in sweep[bn]]
    axes[0].semilogx(SCALES, final_val, "o-", color=color, label=f"{label}, val")
    axes[0].semilogx(SCALES, final_train, "x--", color=color, label=f"{label}, train")
axes[0].set(xlabel="weight init scale (std)", ylabel="final accuracy", ylim=(0, 1.02))
axes[0].set_title("final accuracy after 600 steps")
axes[0].legend()
colors = plt.cm.viridis(np.linspace(0, 1, len(SCALES)))
for ax, bn in zip(axes[1:], (False, True)):
    for i, s in enumerate(SCALES):
        smooth = np.convolve(sweep[bn][i][0], np.ones(10) / 10, mode="valid")
        ax.semilogy(smooth, color=colors[i], label=f"{s:.0e}")
    ax.set(xlabel="step", ylabel="training loss (10-step mean)")
    ax.set_title("with batch norm" if bn else "without batch norm")
axes[2].sharey(axes[1])
axes[2].legend(title="init scale", ncol=2, fontsize=7)
for ax in axes:
    ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# **What it shows.** The claim holds for weights that start too small, and only in part
# for weights that start too large.
#
# - *Without batch norm* only a narrow band trains well: `0.1` reaches 0.97 validation
#   accuracy (He's scale for these layers is `sqrt(2/100) = 0.14`). At `3e-3` and below
#   the signal dies out across six layers, the loss never leaves `log(10) = 2.30` and
#   the network stays at chance (0.10); `1e-2` and `3e-2` get to 0.63-0.65. From `0.3`
#   up the first loss is `5e2` to `2e13`, and 600 steps recover only 0.40 to 0.82.
# - *With batch norm* every scale from `1e-4` to `1e-1` trains to 0.97-0.98, with
#   nearly the same loss curve: three orders of magnitude where the plain network has
#   one good point. (Differences among those 0.97-0.98 are noise: they move by about
#   0.01 when the compiled program changes slightly.)
# - *Too large* is another story: 0.95, 0.85, 0.71 and 0.59 at `0.3`, `1`, `3`, `10`,
#   at `3` no better than without. Two causes, both visible in the tables. The output
#   layer is not normalized, so its large weights give huge logits (a first loss of 123
#   at scale 10); with the output layer at `0.1` the first loss is 2.57 at every scale,
#   the hidden layers' scale normalized away completely, and accuracy rises to
#   0.97, 0.96, 0.91, 0.86. What is left is scale invariance working against you:
#   batch norm makes a layer's output independent of its weights' scale, and Adam's
#   steps are about the learning rate in size whatever the weights, so large weights
#   hardly move: at scale 10 they changed by 1.4% of their norm in 600 steps, at 0.3 by
#   12%, at `1e-4` by a factor of 200. With batch norm, the initial scale acts as an
#   inverse learning rate rather than a cliff.

# %% [markdown]
# ## 2. Vanishing and exploding gradients
#
# A deeper, saturating network: 11 hidden layers of 64 units and the output layer,
# 12 weight matrices in all, with `tanh` or `sigmoid`. The norm of each layer's weight
# gradient `||dL/dW_l||` on a fixed batch of 512 training digits, at initialization,
# for three weight scales: `0.01`, `1/sqrt(64)` (LeCun's, the usual choice for `tanh`)
# and `1`.

# %%
DEEP = [64] + [64] * 11 + [10]
x_g, y_g = X_train[:512], Y_train[:512]


@functools.partial(jax.jit, static_argnums=2)
def grad_norms(params, states, act):
    def loss_fn(params):
        logits, _, _ = mlp(params, states, x_g, training=True, act=act)
        return cross_entropy(logits, y_g)

    grads = jax.grad(loss_fn)(params)
    return jnp.stack([jnp.linalg.norm(g["w"]) for g in grads])


ACTS = {"tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}
INIT_SCALES = {"0.01": 0.01, "1/sqrt(64)": 1 / 8, "1": 1.0}
at_init = {}
for (act_name, act), (scale_name, scale), bn in itertools.product(
    ACTS.items(), INIT_SCALES.items(), (False, True)
):
    params, states = init_mlp(jax.random.key(0), DEEP, scale, bn)
    at_init[act_name, scale_name, bn] = np.asarray(grad_norms(params, states, act))

TINY = 1e-30  # float32 underflows to exactly 0 in the sigmoid net's first layers
fig, axes = plt.subplots(2, 3, figsize=(15, 7), sharex=True, layout="constrained")
layers = np.arange(1, len(DEEP))
for (r, act_name), (c, scale_name) in itertools.product(enumerate(ACTS), enumerate(INIT_SCALES)):
    ax = axes[r, c]
    for bn, color in ((False, "C0"), (True, "C1")):
        g = np.maximum(at_init[act_name, scale_name, bn], TINY)
        ax.semilogy(layers, g, "o-", color=color, label="with BN" if bn else "without BN")
    ax.set_title(f"{act_name}, init scale {scale_name}")
    ax.grid(alpha=0.3)
    if c == 0:
        ax.set_ylabel("||dL/dW|| at init")
    if r == 1:
        ax.set_xlabel("layer (1 = input side)")
axes[0, 0].legend()
plt.show()
print("smallest / largest layer gradient norm at init:")
for key, g in at_init.items():
    print(f"  {key[0]:8}{key[1]:>11} {'BN' if key[2] else '  '}  {g.min():9.1e} {g.max():9.1e}")

# %% [markdown]
# The same question during training: the sigmoid net at LeCun's scale, trained for
# 600 steps of SGD with momentum (learning rate 0.05, batches of 64), since plain SGD
# is where a vanishing gradient bites (Adam divides it away). The gradient norms are
# measured on the same fixed batch every 25 steps.

# %%
EVERY = 25
idx = jnp.asarray(batch_indices(0, len(X_train), 64, 600))
sig = jax.nn.sigmoid
during = {}
for bn in (False, True):

    def monitor(p, s):
        return grad_norms(p, s, sig), accuracy(p, s, X_val, Y_val, sig)

    train = make_train(sig, optax.sgd(0.05, momentum=0.9), EVERY, monitor)
    params, states = init_mlp(jax.random.key(0), DEEP, 1 / 8, bn)
    _, _, losses, (g0, acc0), (g, acc) = jax.jit(train)(params, states, X_train, Y_train, idx)
    during[bn] = dict(
        g=np.concatenate([np.asarray(g0)[None], np.asarray(g)]),
        acc=np.concatenate([[acc0], np.asarray(acc)]),
        losses=np.asarray(losses),
    )
steps = np.arange(0, 601, EVERY)

fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
shown = [0, 4, 12, 24]  # steps 0, 100, 300, 600
shades = plt.cm.plasma(np.linspace(0, 0.85, len(shown)))
for ax, bn in zip(axes[:2], (False, True)):
    for k, color in zip(shown, shades):
        ax.semilogy(layers, np.maximum(during[bn]["g"][k], TINY), "o-", color=color)
        ax.plot([], [], "o-", color=color, label=f"step {steps[k]}")
    ax.set(xlabel="layer (1 = input side)", ylabel="||dL/dW||")
    ax.set_title(("with" if bn else "without") + " batch norm: sigmoid, LeCun init, SGD")
    ax.legend()
axes[1].sharey(axes[0])
for bn, color in ((False, "C0"), (True, "C1")):
    axes[2].plot(steps, during[bn]["acc"], color=color, label="with BN" if bn else "without BN")
axes[2].set(xlabel="step", ylabel="validation accuracy", ylim=(0, 1))
axes[2].legend()
for ax in axes:
    ax.grid(alpha=0.3)
plt.show()
for bn in (False, True):
    g = during[bn]["g"][-1]
    print(
        f"{'with' if bn else 'without'} BN at step 600: layer 1 {g[0]:.1e}, layer 12 "
        f"{g[-1]:.1e}; validation accuracy {during[bn]['acc'][-1]:.3f}"
    )

# %% [markdown]
# **What it shows.** The claim holds, and the plots show where it matters.
#
# - *Without batch norm* the gradient norms follow the initialization: `tanh` with
#   weights of `0.01` has about `4e-13` in every layer; `tanh` with weights of `1`
#   explodes toward the input (`1e3` at layer 1, `0.9` at layer 12); `sigmoid` vanishes
#   toward the input at every scale below 1, even at LeCun's (`6.5e-8` at layer 1 against
#   `0.45` at layer 12: the sigmoid's slope is at most 1/4), and at `0.01` the first two
#   layers' gradients underflow to exactly 0 in float32 (drawn at the `1e-30` floor).
# - *With batch norm* all hidden layers' gradients lie within a factor of 2 of each other
#   (0.3 to 1.2), for both nonlinearities and all three scales; the one outlier is the
#   output layer, which is not normalized.
# - *Where it is not needed*: `tanh` at LeCun's scale has healthy gradients without batch
#   norm (0.19 to 0.26 in all 12 layers). A good initialization already prevents
#   vanishing and exploding gradients at this depth for `tanh`; batch norm removes the
#   need to get it right, and makes `sigmoid` usable at all.
# - *During training* the picture stays put. Without batch norm the profile remains a
#   straight line on the log scale, `1e-8` to `1e-7` at layer 1 and `1e-1` at layer 12, and SGD
#   never leaves chance in 600 steps. With batch norm the profile stays flat and sinks
#   uniformly as the loss falls, and validation accuracy passes 0.9 within 50 steps and
#   ends at 0.98.

# %% [markdown]
# ## 3. Overfitting
#
# To give overfitting a chance, a wide ReLU MLP (two hidden layers of 256, He
# initialization) sees only the first 300 training digits, for 1500 steps of Adam
# (batches of 32: 160 epochs). Three seeds; each seed draws its own weights and batch
# order, shared by the two networks. Lines are the
# mean over seeds, bands the range.

# %%
N_SMALL, WIDE, SEEDS = 300, [64, 256, 256, 10], np.arange(3)
x_small, y_small = X_train[:N_SMALL], Y_train[:N_SMALL]
idx_seeds = [jnp.asarray(batch_indices(s, N_SMALL, 32, 1500)) for s in SEEDS]
overfit = {}
for bn in (False, True):

    def monitor(p, s):
        val_logits, _, _ = mlp(p, s, X_val, training=False, act=relu)
        return (
            accuracy(p, s, x_small, y_small, relu),
            accuracy(p, s, X_val, Y_val, relu),
            cross_entropy(val_logits, Y_val),
        )

    train = make_train(relu, optax.adam(1e-3), 50, monitor)

    @jax.jit
    def run(seed, idx, bn=bn, train=train):
        params, states = init_mlp(jax.random.key(seed), WIDE, 1.0, bn)
        # He initialization: std sqrt(2 / fan_in) for every layer
        params = [dict(p, w=p["w"] * jnp.sqrt(2 / p["w"].shape[0])) for p in params]
        return train(params, states, x_small, y_small, idx)[-1]

    runs = [run(seed, idx_seeds[seed]) for seed in SEEDS]
    overfit[bn] = [np.stack(v) for v in zip(*runs)]  # train acc, val acc, val loss
steps = np.arange(50, 1501, 50)

fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
for bn, color in ((False, "C0"), (True, "C1")):
    name = "with BN" if bn else "without BN"
    for ax, v, style, what in (
        (axes[0], overfit[bn][0], "--", "train"),
        (axes[0], overfit[bn][1], "-", "val"),
        (axes[1], overfit[bn][2], "-", "val"),
    ):
        ax.plot(steps, v.mean(0), style, color=color, label=f"{name}, {what}")
        ax.fill_between(steps, v.min(0), v.max(0), color=color, alpha=0.2)
axes[0].set(xlabel="step", ylabel="accuracy", ylim=(0.85, 1.005))
axes[0].set_title(f"train ({N_SMALL} digits) vs validation ({len(X_val)} digits)")
axes[1].set(xlabel="step", ylabel="validation cross-entropy")
axes[1].set_title("validation loss")
for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
plt.show()
print(f"{'':12}{'train acc':>10}{'val acc':>9}{'gap':>7}{'best val loss':>15}{'final':>7}")
for bn in (False, True):
    tr, va, vl = (v.mean(0) for v in overfit[bn])
    print(
        f"{'with BN' if bn else 'without BN':12}{tr[-1]:10.3f}{va[-1]:9.3f}{tr[-1] - va[-1]:7.3f}"
        f"{vl.min():15.3f}{vl[-1]:7.3f}"
    )

# %% [markdown]
# **What it shows.** On this data the claim mostly does not hold. Both networks fit all
# 300 training digits (100% training accuracy within about 100 steps) and stay there:
# batch norm does not stop the network from memorizing its training set. Final
# validation accuracy is 0.958 with batch norm and 0.954 without (means over 3 seeds),
# inside the spread between seeds. What does differ is the validation loss: without
# batch norm it bottoms out at 0.19 around step 200 and then climbs to 0.25 as the
# network grows more confident in its mistakes, the usual sign of overfitting; with
# batch norm it stays at 0.16-0.17. Here batch norm tempers the network's confidence,
# not its accuracy: a mild regularizer (the paper's own claim is that it "reduces the
# need for Dropout"), not a cure for too little data.

# %% [markdown]
# ## 4. What a hidden unit sees (the paper's Figure 1)
#
# Ioffe and Szegedy's Figure 1 follows the input of one sigmoid unit through training:
# its 15th, 50th and 85th percentiles over held-out data. Their setup, shrunk: three
# hidden layers of 100 sigmoid units, small Gaussian weights (`N(0, 0.1**2)`), SGD with
# learning rate 0.5 and batches of 60, here for 2000 steps. The unit is the first one
# of the last hidden layer. With batch norm its input is `gamma * x_hat + beta`,
# computed with the statistics of the 450 validation digits as one batch (what the
# unit sees in training mode); the running statistics are not used.

# %%
SMALL3 = [64, 100, 100, 100, 10]
EVERY = 20
idx = jnp.asarray(batch_indices(0, len(X_train), 60, 2000))
fig1 = {}
for bn in (False, True):

    def monitor(p, s):
        _, _, pre = mlp(p, s, X_val, training=True, act=sig)
        q = jnp.percentile(pre[-1], jnp.array([15.0, 50.0, 85.0]), axis=0)  # (3, units)
        return q, accuracy(p, s, X_val, Y_val, sig)

    train = make_train(sig, optax.sgd(0.5), EVERY, monitor)
    params, states = init_mlp(jax.random.key(0), SMALL3, 0.1, bn)
    _, _, _, (q0, a0), (q, acc) = jax.jit(train)(params, states, X_train, Y_train, idx)
    fig1[bn] = dict(
        q=np.concatenate([np.asarray(q0)[None], np.asarray(q)]),  # (time, 3, units)
        acc=np.concatenate([[a0], np.asarray(acc)]),
    )
steps = np.arange(0, 2001, EVERY)

fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
for bn, color in ((False, "C0"), (True, "C1")):
    axes[0].plot(steps, fig1[bn]["acc"], color=color, label="with BN" if bn else "without BN")
axes[0].set(xlabel="step", ylabel="validation accuracy", ylim=(0, 1))
axes[0].set_title("(a) validation accuracy")
axes[0].legend()
for ax, bn, letter in ((axes[1], False, "b"), (axes[2], True, "c")):
    q = fig1[bn]["q"][:, :, 0]
    ax.fill_between(steps, q[:, 0], q[:, 2], alpha=0.25, color="C1" if bn else "C0")
    for j, p in enumerate((15, 50, 85)):
        ax.plot(steps, q[:, j], "k", lw=1.5 if p == 50 else 0.8, label=f"{p}th percentile")
    ax.set(xlabel="step", ylabel="input to the sigmoid")
    ax.set_title(f"({letter}) {'with' if bn else 'without'} batch norm")
    ax.legend()
axes[2].sharey(axes[1])
for ax in axes:
    ax.grid(alpha=0.3)
plt.show()

print("Over all 100 units of the last hidden layer (not only the one plotted):")
for bn in (False, True):
    q = fig1[bn]["q"]
    half = len(steps) // 2
    move_all = np.abs(q[-1, 1] - q[0, 1])
    move_late = np.abs(q[-1, 1] - q[half, 1])
    spread = q[-1, 2] - q[-1, 0]
    print(
        f"  {'with' if bn else 'without'} BN: median moved {np.median(move_all):.2f} over "
        f"training, {np.median(move_late):.2f} in the second half; final 15-85 spread "
        f"{np.median(spread):.2f} (medians over units)"
    )

# %% [markdown]
# **What it shows.** The paper's picture comes back. Without batch norm the unit's input
# wanders: its median drifts to -1.3 in the first 250 steps, then climbs to about 1.7
# while the 15-85 range opens from nearly nothing to about 4, and it is still moving at
# the end. With batch norm the median stays between 0 and 0.25 and the range widens
# smoothly from +-1.1 to about +-1.7 as `gamma` and `beta` learn, with almost no movement
# in the second half. Over all 100 units the median moved 0.67 without batch norm and
# 0.14 with it (0.36 against 0.04 in the second half). Panel (a) is the other half of
# Figure 1: with batch norm, validation accuracy passes 0.9 within about 50 steps;
# without, it takes about 1300 and ends at 0.94.
#
# That the stable distribution is *why* batch norm trains faster is the paper's
# hypothesis ("internal covariate shift"), disputed since (Santurkar et al., 2018,
# "How does batch normalization help optimization?"). This experiment shows the two
# together, not that one causes the other.

# %% [markdown]
# ## 5. Batch size: the train/eval gap
#
# Batch norm trains on the statistics of each batch and evaluates with running
# averages of them. The smaller the batch, the noisier its statistics, and the more the
# two modes differ. The demo's CNN (three 3x3 convolutions, defined below as in
# `python -m jaxbn demo`), with and without batch norm, trained for 500 steps of Adam
# (learning rate `1e-3`) at each batch size; small batches therefore see fewer digits.
# The validation digits are then classified twice by the batch-norm network: in
# evaluation mode (running statistics), and in training mode in batches of the training
# batch size (each batch normalized with its own statistics, as in training).


# %%
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


def apply_cnn(params, state, x, *, training):
    """Logits of NHWC images (N, 8, 8, 1) and the new running statistics."""
    new_state, h = [], x
    for i, layer in enumerate(params[:-1]):
        stride = 1 if i == 0 else 2
        h = lax.conv_general_dilated(
            h, layer["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        if "gamma" in layer:
            h, s = jaxbn.batch_norm(h, layer["gamma"], layer["beta"], state[i], training=training)
            new_state.append(s)
        else:
            h = h + layer["b"][None, None, None, :]
        h = jax.nn.relu(h)
    h = jnp.mean(h, axis=(1, 2))
    return h @ params[-1]["w"] + params[-1]["b"][None, :], tuple(new_state)


def make_cnn_step(optimizer):
    """A jitted step(params, state, opt_state, x, y) -> (params, state, opt_state, loss)."""

    def loss_fn(params, state, x, y):
        logits, new_state = apply_cnn(params, state, x, training=True)
        return cross_entropy(logits, y), new_state

    @jax.jit
    def step(params, state, opt_state, x, y):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    return step


# %%
BATCH_SIZES = [2, 4, 8, 16, 32, 64]
images_tr, labels_tr = digits.x_train, digits.y_train
images_val, labels_val = jnp.asarray(digits.x_test), jnp.asarray(digits.y_test)


@functools.partial(jax.jit, static_argnums=2)
def evaluate(params, state, batch_size):
    """(eval-mode accuracy, batch-statistics accuracy, eval loss, batch-statistics loss)."""
    logits_eval, _ = apply_cnn(params, state, images_val, training=False)
    n = len(images_val) // batch_size * batch_size
    chunks = images_val[:n].reshape(-1, batch_size, *images_val.shape[1:])
    logits_batch = jax.vmap(lambda xb: apply_cnn(params, state, xb, training=True)[0])(chunks)
    logits_batch = logits_batch.reshape(n, -1)
    acc = lambda lg, y: jnp.mean(jnp.argmax(lg, -1) == y)  # noqa: E731
    return (
        acc(logits_eval, labels_val),
        acc(logits_batch, labels_val[:n]),
        cross_entropy(logits_eval, labels_val),
        cross_entropy(logits_batch, labels_val[:n]),
    )


by_batch = {}
for batch_size, bn in itertools.product(BATCH_SIZES, (False, True)):
    optimizer = optax.adam(1e-3)
    step = make_cnn_step(optimizer)
    params, state = init_cnn(jax.random.key(0), bn)
    opt_state = optimizer.init(params)
    for i in itertools.islice(batches(len(images_tr), batch_size, 10_000, seed=0), 500):
        params, state, opt_state, _ = step(params, state, opt_state, images_tr[i], labels_tr[i])
    by_batch[batch_size, bn] = [float(v) for v in evaluate(params, state, batch_size)]

print(f"{'batch':>5} | {'validation accuracy':^28} | {'cross-entropy, BN':^21}")
print(f"{'':>5} | {'no BN':>7} {'BN eval':>9} {'BN batch':>10} | {'eval':>9} {'batch':>11}")
for b in BATCH_SIZES:
    plain, (ev, bt, lev, lbt) = by_batch[b, False][0], by_batch[b, True]
    print(f"{b:5d} | {plain:7.3f} {ev:9.3f} {bt:10.3f} | {lev:9.3f} {lbt:11.3f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
col = lambda j, bn: np.array([by_batch[b, bn][j] for b in BATCH_SIZES])  # noqa: E731
axes[0].plot(BATCH_SIZES, col(0, False), "o-", color="C0", label="without BN")
axes[0].plot(BATCH_SIZES, col(0, True), "o-", color="C1", label="with BN, eval mode")
axes[0].plot(BATCH_SIZES, col(1, True), "s--", color="C1", label="with BN, batch statistics")
axes[0].set(xlabel="training batch size", ylabel="validation accuracy")
axes[0].set_title("validation accuracy after 500 steps")
axes[1].plot(BATCH_SIZES, col(0, True) - col(1, True), "o-", color="C2", label="accuracy")
axes[1].plot(BATCH_SIZES, col(3, True) - col(2, True), "s-", color="C3", label="cross-entropy")
axes[1].axhline(0, color="gray", lw=1)
axes[1].set(xlabel="training batch size", ylabel="how much worse batch statistics do")
axes[1].set_title("train/eval gap: batch statistics vs running statistics")
for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xticks(BATCH_SIZES, [str(b) for b in BATCH_SIZES])
    ax.minorticks_off()
    ax.legend()
    ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# **What it shows.** The gap grows as the batch shrinks, and here it is the
# batch-statistics side that suffers. From 16 up the two modes agree (within 0.006 in
# accuracy and 0.03 in cross-entropy). At 8 batch statistics cost 1 point of accuracy,
# at 4 about 4.5, at 2 twelve (0.80 against 0.92), and the cross-entropy doubles.
# A batch of 2 normalizes every feature to exactly -1 and +1, so what the network sees
# in training says as much about the batch partner as about the digit; the running
# averages smooth that noise out, which is why evaluation mode is the better of the two
# at small batches on this data. Two things also change with the batch size that are
# not the gap: at 500 steps a batch of 2 sees 1000 digits, less than one epoch, so
# every network is weaker there (see the line without batch norm); and at a batch of 2
# the biased batch variance is on average half the population's, so the running
# variance that evaluation mode uses is too small by the same factor. At a batch of 2
# batch norm's advantage is gone: evaluation-mode accuracy equals the plain network's
# (0.92), against 0.98 and 0.96-0.97 from a batch of 8 up. Across devices the remedy is to
# normalize over the global batch (`axis_name`, notebook 03).
#
# ## Summary
#
# | claim in the notes | on scikit-learn's digits |
# | --- | --- |
# | robust to poor initialization | yes for weights too small (`1e-4` to `1e-1` all train); in part for weights too large (unnormalized output layer; large weights learn slowly) |
# | prevents vanishing/exploding gradients | yes: flat per-layer gradients for any scale, `tanh` or `sigmoid`; a good init does the same for `tanh` |
# | less overfitting | not in accuracy (both memorize; +0.4 points, within noise); validation loss grows less |
#
# And beyond the notes: the hidden unit's input distribution stays put with batch norm
# (the paper's Figure 1), and the train/eval gap is negligible from a batch of 16 and
# large at 2-4.

# %% [markdown]
# The statements above, checked each time the notebook runs (margins are wide: they
# catch a changed result, not run-to-run noise).

# %%
final_val = {bn: np.array([r[2][-1] for r in sweep[bn]]) for bn in (False, True)}
assert np.all(final_val[True][SCALES <= 0.1] > 0.9)  # BN trains at every small scale
assert np.all(final_val[False][SCALES < 5e-3] < 0.2)  # plain net stuck at chance
assert all(vb[-1] > va[-1] for (_, _, va, _), (_, _, vb, _) in zip(*out_fixed.values()))


def spread(g):
    return g.max() / g.min()


assert spread(at_init["sigmoid", "1/sqrt(64)", False]) > 1e5  # vanishes toward the input
assert spread(at_init["tanh", "1", False]) > 1e2  # explodes toward the input
assert spread(at_init["tanh", "1/sqrt(64)", False]) < 3  # a good init is enough for tanh
assert all(spread(g[:-1]) < 5 for (_, _, bn), g in at_init.items() if bn)  # flat with BN
assert during[False]["acc"][-1] < 0.2 and during[True]["acc"][-1] > 0.9

train_acc, val_acc, val_loss = ({bn: overfit[bn][k].mean(0) for bn in overfit} for k in range(3))
assert train_acc[False][-1] > 0.999 and train_acc[True][-1] > 0.999  # both memorize
assert abs(val_acc[True][-1] - val_acc[False][-1]) < 0.02  # accuracy: no real difference
assert val_loss[False][-1] - val_loss[False].min() > 2 * (val_loss[True][-1] - val_loss[True].min())

median_moved = {bn: np.median(np.abs(fig1[bn]["q"][-1, 1] - fig1[bn]["q"][0, 1])) for bn in fig1}
assert median_moved[True] < median_moved[False] / 2

acc_gap = {b: by_batch[b, True][0] - by_batch[b, True][1] for b in BATCH_SIZES}
assert acc_gap[2] > 0.05 and all(abs(acc_gap[b]) < 0.02 for b in BATCH_SIZES if b >= 16)
print("all checks passed")
