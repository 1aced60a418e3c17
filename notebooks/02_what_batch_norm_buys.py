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
#
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
# This notebook tests them on small networks (§2, §5, §3), and what the literature
# since the original paper (Ioffe and Szegedy 2015, "Batch Normalization: Accelerating
# Deep Network Training by Reducing Internal Covariate Shift") found batch norm buys
# or costs: a wider range of learning rates that train (§1), exploding gradients in
# deep plain networks (§3b), a smoother loss landscape (§4), the paper's own Figure 1
# (§6), and what small batches do (§7). The verdicts, with the conditions under which
# each claim holds and fails, close the notebook.
#
# **Method.** Every number below is printed by the cell that computed it, from the
# seeds of the `parameters` cell below; figures show the mean with the spread over seeds
# (bands or bars: the range, min to max, unless said otherwise). A seed fixes the
# initial weights (NumPy standard-normal draws, the same for the networks with and
# without batch norm) and the batch order. The data are scikit-learn's 1797
# handwritten 8x8 digits, which ship with the package: 1347 for training and 450 held
# out (the split of `python -m jaxbn demo`). The pixels are standardized with the
# training set's per-pixel mean and standard deviation (floored at 0.1, a tenth of
# the pixel range, so that the few nearly constant border pixels do not blow up), so
# that the network without batch norm starts from the inputs it is usually given.
# Where a hyperparameter is *chosen* (§1-3), the held-out digits are halved: the
# choice is made on 225 (validation) and the accuracy reported on the other 225
# (test). Where a network has batch norm it sits between each hidden linear layer and
# its nonlinearity and replaces that layer's bias; the output layer is never
# normalized. Each experiment is one compiled program vectorized over seeds and
# settings with `jax.vmap`; the last cell asserts what the prose concludes, each claim
# with a margin taken from the spread between seeds (the rule is stated there), and
# holds as well with other seeds (set `SEEDS` below, e.g. `[5, 6, 7, 8, 9]`).

# %%
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import scipy.stats
from jax import lax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxbn

# %% tags=["parameters"]
# the seeds of every experiment, and the training lengths that set the run time;
# papermill can set them (papermill ... -p SEEDS "[5, 6, 7, 8, 9]")
SEEDS = [0, 1, 2, 3, 4]
SWEEP_STEPS = 100  # §1-2: each run of the learning-rate sweeps
DEPTH_STEPS = 60  # §3b: the depth-40 runs
OVERFIT_STEPS = 400  # §5: the runs on a small training set
SMALL_EPOCHS = 2  # §7: epochs at every batch size

# %%
plt.rcParams.update({"font.size": 10, "legend.fontsize": 9})  # ticks and legends >= 9 pt
T_START = time.perf_counter()
SEEDS = np.asarray(SEEDS)
d = load_digits()
x_all = (d.images / 16.0).astype(np.float32).reshape(len(d.images), -1)
x_tr, x_ho, y_tr, y_ho = train_test_split(
    x_all, d.target.astype(np.int32), test_size=0.25, random_state=0, stratify=d.target
)
pixel_mean, pixel_sd = x_tr.mean(0), np.maximum(x_tr.std(0), 0.1)
x_tr, x_ho = (x_tr - pixel_mean) / pixel_sd, (x_ho - pixel_mean) / pixel_sd
X_train, Y_train = jnp.asarray(x_tr), jnp.asarray(y_tr)
X_held, Y_held = jnp.asarray(x_ho), jnp.asarray(y_ho)  # 450 held out
X_val, Y_val, X_test, Y_test = X_held[::2], Y_held[::2], X_held[1::2], Y_held[1::2]
print(f"train {X_train.shape}, validation {X_val.shape}, test {X_test.shape}")


def batch_indices(seed, n, batch, steps):
    """(steps, batch) indices into range(n): a fresh permutation each epoch."""
    rs = np.random.RandomState(seed)
    per_epoch = n // batch
    epochs = [rs.permutation(n)[: per_epoch * batch] for _ in range(-(-steps // per_epoch))]
    return np.concatenate(epochs).reshape(-1, batch)[:steps]


def seed_indices(n, batch, steps, seeds=SEEDS):
    return jnp.asarray(np.stack([batch_indices(s, n, batch, steps) for s in seeds]))


def init_mlp(seed, sizes, scale, bn):
    """Weights scale * N(0, 1); scale None: He's sqrt(2 / fan_in); ("He", g): g * He's."""
    rng = np.random.default_rng(seed)
    params, states = [], []
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        he = np.sqrt(2.0 / m)
        s = he if scale is None else he * scale[1] if isinstance(scale, tuple) else scale
        layer = {"w": np.float32(s) * rng.standard_normal((m, n), np.float32)}
        if bn and i < len(sizes) - 2:
            layer |= {"gamma": np.ones(n, np.float32), "beta": np.zeros(n, np.float32)}
            states.append(jaxbn.init_state(n))
        else:
            layer["b"] = np.zeros(n, np.float32)
        params.append(layer)
    return params, tuple(states)


def stack(trees):
    """One pytree with a leading axis, from a list of pytrees (for jax.vmap)."""
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def mlp(
    params,
    states,
    x,
    *,
    training,
    act=jax.nn.relu,
    bn_options=None,
    bn_inputs=None,
    perturb=None,
    bn=None,
):
    """Returns (logits, new_states, pre-activations of the hidden layers).

    A list passed as `bn_inputs` receives what each batch norm normalizes;
    `perturb(i, z)` changes hidden layer i's pre-activation (after batch norm or bias):
    the noise of noisy batch norm, or dropout (for ReLU, dropping the pre-activation
    drops the activation). `bn` False (a traced flag) skips batch norm and adds `beta`
    as the bias: a network without batch norm, with the parameters of one with it, so
    that one compiled program trains both.
    """
    new_states, pre, h = [], [], x
    for i, layer in enumerate(params[:-1]):
        z = h @ layer["w"]
        if "gamma" in layer:
            if bn_inputs is not None:
                bn_inputs.append(z)
            zn, s = jaxbn.batch_norm(
                z, layer["gamma"], layer["beta"], states[i], training=training, **(bn_options or {})
            )
            z = zn if bn is None else jnp.where(bn, zn, z + layer["beta"])
            new_states.append(s)
        else:
            z = z + layer["b"]
        if perturb is not None:
            z = perturb(i, z)
        pre.append(z)
        h = act(z)
    return h @ params[-1]["w"] + params[-1]["b"], tuple(new_states), pre


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(params, states, x, y, act=jax.nn.relu, bn=None):
    """Accuracy in evaluation mode (running statistics)."""
    logits, _, _ = mlp(params, states, x, training=False, act=act, bn=bn)
    return jnp.mean(jnp.argmax(logits, -1) == y)


# accuracy of a stack of networks (a leading axis on params and states), compiled once
stacked_accuracy = jax.jit(jax.vmap(accuracy, in_axes=(0, 0, None, None)))


def noisy_bn(t, hp, i, z):
    """Santurkar et al.'s noisy batch norm: after batch norm, every unit's values are
    scaled by s ~ U(1 - a, 1 + 2a) and shifted by m ~ U(-a, a), drawn anew at every step
    and layer (a = hp["noise"]; 0 is plain batch norm), so that the distribution each
    nonlinearity sees moves at every step."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(hp["seed"]), t), i)
    ks, km = jax.random.split(key)
    a = hp["noise"]
    s = 1 + a * jax.random.uniform(ks, z.shape[-1:], minval=-1.0, maxval=2.0)
    return z * s + a * jax.random.uniform(km, z.shape[-1:], minval=-1.0, maxval=1.0)


def dropout(t, hp, i, z):
    """Inverted dropout of rate hp["drop"] (0: none) on the hidden units, in training."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(hp["seed"]), t), i)
    keep = jax.random.bernoulli(key, 1 - hp["drop"], z.shape)
    return jnp.where(keep, z / (1 - hp["drop"]), 0.0)


def make_train(
    optimizer,
    *,
    act=jax.nn.relu,
    x=X_train,
    y=Y_train,
    bn_options=None,
    perturb=None,
    full_stats=False,
    monitor=None,
    every=0,
    padded=False,
):
    """A jitted train(params, states, hp, idx), vmapped over a leading axis of all four.

    Runs len(idx) steps of `optimizer(hp)` on batches x[idx[t]]; returns the final
    (params, states), the training loss of every step, and `monitor(params, states,
    batch, t, hp)` every `every` steps (None without a monitor). `bn_options(t, hp)` gives
    batch_norm's keyword arguments at step t (for schedules); `perturb(t, hp, i, z)`
    changes the hidden pre-activations in training; hp["bn"], where given, is mlp's `bn`
    flag. With `full_stats`, every step runs
    all of x through the network, so that batch norm normalizes with the statistics of
    the whole training set, and takes the loss on the batch's rows only. With `padded`,
    only the first hp["rows"] columns of idx are a batch (the rest are masked out of the
    loss and of batch norm's statistics) and only the first hp["steps"] rows are run (the
    same for every network of a call), so that one compiled program serves every batch
    size and run length; it returns no losses.
    """

    def run(params, states, hp, idx):
        opt = optimizer(hp)

        def loss_fn(p, s, i, t):
            kw = bn_options(t, hp) if bn_options else {}
            if padded:
                valid = jnp.arange(i.shape[-1]) < hp["rows"]
                kw = kw | {"mask": valid[:, None]}
            pert = functools.partial(perturb, t, hp) if perturb else None
            xb = x if full_stats else x[i]
            logits, s, _ = mlp(
                p, s, xb, training=True, act=act, bn_options=kw, perturb=pert, bn=hp.get("bn")
            )
            if padded:
                losses = optax.softmax_cross_entropy_with_integer_labels(logits, y[i])
                return jnp.sum(jnp.where(valid, losses, 0.0)) / hp["rows"], s
            return cross_entropy(logits[i] if full_stats else logits, y[i]), s

        def step(carry, ti):
            p, s, o = carry
            t, i = ti
            (loss, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, i, t)
            updates, o = opt.update(g, o, p)
            return (optax.apply_updates(p, updates), s, o), loss

        ts = jnp.arange(len(idx))
        carry = (params, states, opt.init(params))
        if padded:

            def body(c):
                carry, t = c
                return step(carry, (t, idx[t]))[0], t + 1

            (p, s, _), _ = lax.while_loop(lambda c: c[1] < hp["steps"], body, (carry, 0))
            return (p, s), None, None
        if monitor is None:
            (p, s, _), losses = lax.scan(step, carry, (ts, idx))
            return (p, s), losses, None

        def chunk(carry, tsi):
            carry, losses = lax.scan(step, carry, tsi)
            return carry, (losses, monitor(carry[0], carry[1], tsi[1][-1], tsi[0][-1], hp))

        chunks = jax.tree.map(lambda a: a.reshape(-1, every, *a.shape[1:]), (ts, idx))
        (p, s, _), (losses, mons) = lax.scan(chunk, carry, chunks)
        return (p, s), losses.reshape(-1), mons

    return jax.jit(jax.vmap(run))


def sgd(hp):
    return optax.sgd(hp["lr"])


def adam(hp):
    return optax.adam(hp["lr"])


def hparams(n, **values):
    """hp for n runs: each value broadcast to n (seeds are taken from `seeds`)."""
    return {k: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,)) for k, v in values.items()}


def mean_sd(a, axis=0):
    return f"{np.mean(a, axis):.3f} ± {np.std(a, axis, ddof=1):.3f}"


def n_of(mask):
    """'k of n' for a boolean array, the count printed rather than written."""
    return f"{int(np.sum(mask))} of {np.size(mask)}"


# Paired comparisons: every arm of an experiment shares each seed's initial weights and
# batch order, so arms are compared seed by seed. T975 is Student's t for a two-sided
# test at 5% with n - 1 degrees of freedom (2.78 for 5 seeds), not 2.
T975 = scipy.stats.t.ppf(0.975, len(SEEDS) - 1)


def paired(a, b):
    """Mean and standard error of a - b, paired by seed."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return d.mean(), np.std(d, ddof=1) / np.sqrt(len(d))


def higher(a, b):
    """a above b: the paired mean beyond T975 standard errors (two-sided 5%)."""
    m, se = paired(a, b)
    return m > 0 and m > T975 * se


def agree(a, b, digit):
    """No difference detected: |paired mean| within T975 standard errors, or under one
    evaluation digit (the resolution: seeds that all tie have no spread)."""
    m, se = paired(a, b)
    return abs(m) <= max(T975 * se, digit)


def paired_text(a, b):
    """'mean [95% CI], t, verdict' of a - b, paired by seed."""
    m, se = paired(a, b)
    t = m / se if se > 0 else np.inf * np.sign(m)
    verdict = "detected" if abs(t) > T975 else "not detected"
    return f"{m:+.4f} [{m - T975 * se:+.4f}, {m + T975 * se:+.4f}], t {t:+.1f}: {verdict}"


# %% [markdown]
# ## 1. Learning rate: what batch norm buys most
#
# Bjorck, Gomes, Selman and Weinberger (2018, "Understanding Batch Normalization")
# found that batch norm's main effect is to let training use larger learning rates,
# which then converge faster and generalize better. Test it against the strongest
# plain baseline at hand: a ReLU MLP with three hidden layers of 100, He
# initialization, standardized inputs; plain SGD (no momentum) for `SWEEP_STEPS`
# steps of 64 digits, learning rates from `1e-3` to `10` in steps of `sqrt(10)`
# (wide enough that the plain network's best rate lies inside the grid), the seeds of
# `SEEDS`.
# The same run covers three initialization scales for §2: every weight is drawn from
# He's `N(0, 2 / fan_in)` times a gain of `0.01`, `1` or `10`. The figure
# shows gain 1 (He's scale). The best rate is chosen on the validation half, its
# accuracy reported on the test half.

# %%
SIZES = [64, 100, 100, 100, 10]
LRS = 10.0 ** np.arange(-3, 1.1, 0.5)  # 1e-3 ... 10
LRS_ADAM = 10.0 ** np.arange(-4.0, 0.1, 1.0)  # 1e-4 ... 1
GAINS = np.array([0.01, 1.0, 10.0])
J_HE = list(GAINS).index(1.0)


def lr_sweep(optimizer, lrs):
    """Test and validation accuracy, divergence and losses of every (seed, gain, lr)."""
    grid = list(itertools.product(SEEDS, GAINS, lrs))
    idx = seed_indices(len(X_train), 64, SWEEP_STEPS, [s for s, _, _ in grid])
    hp = {"lr": jnp.asarray([lr for _, _, lr in grid], jnp.float32)}
    train = make_train(optimizer)
    shape = (len(SEEDS), len(GAINS), len(lrs))
    out = {}
    for bn in (False, True):
        params, states = stack([init_mlp(s, SIZES, ("He", g), bn) for s, g, _ in grid])
        (p, s), losses, _ = train(params, states, hp, idx)
        losses = np.asarray(losses)
        out[bn] = dict(
            val=np.asarray(stacked_accuracy(p, s, X_val, Y_val)).reshape(shape),
            test=np.asarray(stacked_accuracy(p, s, X_test, Y_test)).reshape(shape),
            diverged=~np.isfinite(losses).all(-1).reshape(shape),
            loss=losses.reshape(*shape, -1),
        )
    return out


def chosen(sweep, bn, j):
    """The learning rate chosen on validation (mean over seeds), and its test accuracy."""
    k = int(np.argmax(sweep[bn]["val"][:, j].mean(0)))
    return k, sweep[bn]["test"][:, j, k]


def lr_range(sweep, bn, j, level=0.9):
    """Indices of the learning rates at which every seed reaches `level` on validation."""
    return np.flatnonzero((sweep[bn]["val"][:, j] >= level).all(0))


sweep = lr_sweep(sgd, LRS)
print(f"He init, test accuracy after {SWEEP_STEPS} SGD steps (mean ± sd over {len(SEEDS)} seeds):")
print(f"{'lr':>6} | {'no BN':>22} | {'BN':>22}")
for k, lr in enumerate(LRS):
    cells = []
    for bn in (False, True):
        div = sweep[bn]["diverged"][:, J_HE, k]
        nan = f" ({n_of(div)} NaN)" if div.any() else ""
        cells.append(mean_sd(sweep[bn]["test"][:, J_HE, k]) + nan)
    print(f"{lr:6.3g} | {cells[0]:>22} | {cells[1]:>22}")
for bn in (False, True):
    k, acc = chosen(sweep, bn, J_HE)
    ok = lr_range(sweep, bn, J_HE)
    print(
        f"{'with' if bn else 'without'} BN: rate chosen on validation {LRS[k]:.3g} "
        f"(test {mean_sd(acc)}); every seed >= 0.9 on validation at {len(ok)} of {len(LRS)} "
        f"rates, {LRS[ok].min():.3g} to {LRS[ok].max():.3g}"
    )
(_, a_pl), (_, a_bn) = chosen(sweep, False, J_HE), chosen(sweep, True, J_HE)
print(
    "at their chosen rates, BN minus no BN, paired by seed: "
    + paired_text(a_bn, a_pl)
    + f"; BN higher on {n_of(a_bn > a_pl)} seeds, lower on {n_of(a_bn < a_pl)}"
)

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), layout="constrained")
for bn, color in ((False, "C0"), (True, "C1")):
    r = sweep[bn]
    a, div = r["test"][:, J_HE], r["diverged"][:, J_HE]  # (seed, lr)
    label = "with BN" if bn else "without BN"
    ok = ~div.all(0)  # a diverged seed is drawn once, as a cross, not in the bars
    a = np.where(div, np.nan, a)[:, ok]
    m = np.nanmean(a, 0)
    err = np.clip([m - np.nanmin(a, 0), np.nanmax(a, 0) - m], 0, None)  # float32 rounding
    axes[0].errorbar(LRS[ok], m, err, fmt="o-", color=color, capsize=3, label=label)
    for k in np.flatnonzero(div.any(0)):
        axes[0].plot(LRS[k], 0.02, "x", color=color, ms=10, mew=2)
        axes[0].annotate(f"{div[:, k].sum()}/{len(SEEDS)}", (LRS[k], 0.06), ha="center")
    for k, style in ((list(LRS).index(0.1), "-"), (len(LRS) - 4, "--")):
        curve = r["loss"][:, J_HE, k]
        axes[1].plot(np.nanmedian(curve, 0), style, color=color, label=f"{label}, lr {LRS[k]:.2g}")
axes[0].plot([], [], "kx", ms=10, mew=2, label="seeds diverged (NaN loss): k/n")
axes[0].set(xscale="log", xlabel="learning rate (plain SGD)", ylabel="test accuracy")
axes[0].set_ylim(0, 1.02)
axes[0].set_title(f"He init: final test accuracy (bars: range over {len(SEEDS)} seeds)")
axes[1].set(yscale="log", xlabel="step", ylabel=f"training loss (median of {len(SEEDS)} seeds)")
axes[1].set_title("training loss at two rates")
for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# **What it shows** (numbers printed above). Against a He-initialized network on
# standardized inputs, batch norm widens the range of learning rates that train
# *upward only*.
#
# - *Upward.* Without batch norm the good range ends near its best rate, and above it
#   every seed diverges to NaN (the table). With batch norm the network trains at rates
#   at least one grid step (`sqrt(10)`) above the plain network's range, including
#   rates where every plain seed diverges, and fails only at the largest, without a
#   NaN: the normalized layers cannot blow up, but the unnormalized
#   output layer no longer learns.
# - *Downward: no gain.* At small rates the plain network trains as fast or faster.
#   (An earlier version of this notebook found batch norm faster there too; that was
#   against a plain network on raw pixels with too small weights.)
# - *At their chosen rates*, paired by seed, batch norm is higher on most seeds and
#   rarely lower, by the printed difference, a small gain whose detection with this
#   many seeds the printed interval decides (it is not asserted either way; only that
#   the plain network is not higher). What batch norm buys most here is not a better
#   optimum but a wider target above it for the learning rate, Bjorck et al.'s (2018)
#   result, on a small scale and on one side.

# %% [markdown]
# ## 2. Robustness to poor initialization, with the learning rate tuned
#
# The notes' first claim. With one fixed learning rate for every scale, "robust to
# initialization" and "changes the effective learning rate" are confounded: with batch
# norm a layer's output does not depend on its weights' scale, so a weight `c` times
# larger gets gradients `c` times smaller, and an SGD step changes it `c**2` times less
# in relative terms (van Laarhoven 2017, "L2 Regularization versus Batch and Weight
# Normalization"; Arora, Li and Lyu 2019, "Theoretical Analysis of Auto Rate-Tuning by
# Batch Normalization"). So the same sweep, read per gain: accuracy at each arm's
# best learning rate for that gain (chosen on validation, reported on test). And
# again with Adam (rates `1e-4` to `1`, by factors of 10), whose steps do not scale with the gradient:
# a claim about initialization should not hang on one optimizer.

# %%
sweep_adam = lr_sweep(adam, LRS_ADAM)
best = {}  # (optimizer, bn, gain): (chosen rate, test accuracy per seed)
print(f"test accuracy at the rate chosen on validation (mean ± sd over {len(SEEDS)} seeds)")
print(f"{'':5}{'gain':>6} | {'no BN: lr':>10} {'test':>14} | {'BN: lr':>10} {'test':>14}")
for opt_name, sw, lrs in (("SGD", sweep, LRS), ("Adam", sweep_adam, LRS_ADAM)):
    for j, g in enumerate(GAINS):
        line = f"{opt_name:5}{g:6g} |"
        for bn in (False, True):
            k, acc = chosen(sw, bn, j)
            best[opt_name, bn, g] = (lrs[k], acc)
            edge = "*" if k in (0, len(lrs) - 1) else " "
            line += f" {lrs[k]:9.3g}{edge} {mean_sd(acc):>14} |"
        print(line[:-2])
print("* the chosen rate is at an end of the grid")
for label, x, y in (
    ("SGD, BN: gain 0.01 minus gain 1", best["SGD", True, 0.01][1], best["SGD", True, 1.0][1]),
    ("Adam, gain 0.01: BN minus no BN", best["Adam", True, 0.01][1], best["Adam", False, 0.01][1]),
    ("SGD, gain 10: BN minus no BN", best["SGD", True, 10.0][1], best["SGD", False, 10.0][1]),
    ("Adam, gain 10: BN minus no BN", best["Adam", True, 10.0][1], best["Adam", False, 10.0][1]),
    ("SGD, no BN: gain 1 minus gain 10", best["SGD", False, 1.0][1], best["SGD", False, 10.0][1]),
    ("SGD, BN: gain 1 minus gain 10", best["SGD", True, 1.0][1], best["SGD", True, 10.0][1]),
):
    print(f"{label:34} paired: {paired_text(x, y)}")
print("Adam, no BN, gain 0.01, test accuracy per seed:", np.round(best["Adam", False, 0.01][1], 3))
for b in (False, True):
    r1, r10 = best["SGD", b, 1.0][0], best["SGD", b, 10.0][0]
    print(f"SGD, {'BN' if b else 'no BN'}: chosen rate at gain 10 / at gain 1 = {r10 / r1:.3g}")

# %%
fig, axes = plt.subplots(2, 3, figsize=(16, 8), layout="constrained")
for row, (opt_name, sw, lrs) in enumerate((("SGD", sweep, LRS), ("Adam", sweep_adam, LRS_ADAM))):
    for ax, bn in zip(axes[row, :2], (False, True)):
        m = sw[bn]["test"].mean(0)  # (gain, lr)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for (a, b), v in np.ndenumerate(m):
            mark = "NaN" if sw[bn]["diverged"][:, a, b].any() else f"{v:.2f}"
            ax.text(b, a, mark, ha="center", va="center", fontsize=9, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(lrs)), [f"{v:.2g}" for v in lrs])
        ax.set_yticks(range(len(GAINS)), [f"{v:g}" for v in GAINS])
        ax.set(xlabel=f"learning rate ({opt_name})", ylabel="init gain (x He)")
        ax.set_title(f"{opt_name}: test accuracy {'with' if bn else 'without'} BN (seed mean)")
    for bn, color in ((False, "C0"), (True, "C1")):
        tuned = np.stack([best[opt_name, bn, g][1] for g in GAINS], 1)
        axes[row, 2].plot(
            GAINS, tuned.mean(0), "o-", color=color, label="with BN" if bn else "without BN"
        )
        axes[row, 2].fill_between(GAINS, tuned.min(0), tuned.max(0), color=color, alpha=0.15)
    axes[row, 2].set(
        xscale="log", xlabel="init gain (x He)", ylabel="test accuracy", ylim=(0, 1.02)
    )
    axes[row, 2].set_title(f"{opt_name}, rate tuned per gain (band: range over seeds)")
    axes[row, 2].legend()
    axes[row, 2].grid(alpha=0.3)
fig.colorbar(im, ax=axes[:, :2], shrink=0.6, label="test accuracy")
plt.show()

# %% [markdown]
# **What it shows.** The claim holds for one optimizer and one direction (paired
# comparisons printed below the table).
#
# - *Weights too small* (gain `0.01`) *with SGD*: a genuine robustness. Without batch
#   norm the signal dies out across the layers and no learning rate leaves chance;
#   with batch norm no difference from He's scale is detected (the interval printed
#   bounds it). *With Adam the gap narrows*: Adam's steps do not shrink with the
#   vanishing gradients, and the plain network trains from tiny weights, far above
#   chance on every seed, below batch norm on average (printed; detected on some seed
#   sets, not on others, where the plain network's spread is large). How far it gets varies
#   with the seeds: its good rates form a narrow peak that the factor-10 grid may hit
#   or straddle, so its accuracy per seed (printed) is not claimed beyond that.
# - *Weights too large* (gain `10`): tuned, both networks lose accuracy against He's
#   scale with SGD (detected); the plain network's chosen rate falls (printed), and it
#   ends below batch norm on average (detected on some seed sets). Batch norm's chosen
#   SGD rate rises by at most one grid step with the gain (printed), although under
#   batch norm a weight 10 times larger takes a step 100 times smaller relative to
#   itself (van Laarhoven 2017): the rates that would call for lie above the grid's
#   good range, where the unnormalized output layer stops learning (§1). With Adam
#   batch norm also keeps more at gain 10 on average (printed; not always detected).
# - Read this way, batch norm's robustness to initialization is real where SGD meets
#   a plain network whose forward pass collapses, and elsewhere it is largely the
#   learning-rate robustness of §1. The theory that the initial scale acts on a
#   batch-norm network as an inverse learning rate is not what this sweep shows:
#   batch norm's chosen rate moves with the gain by a grid step at most here. With an adaptive
#   optimizer much of the robustness is not needed.

# %% [markdown]
# ## 3. Vanishing and exploding gradients
#
# ### 3a. A 12-layer saturating network at initialization
#
# 11 hidden layers of 64 units and the output layer, with `tanh` or `sigmoid`, weights
# at three scales (`0.01`, LeCun's `1/sqrt(64)`, and `1`). For each layer, on a batch
# of 512 training digits at initialization: the gradient norm `||dL/dW_l||`, and the
# *spread* of the layer's output across inputs (the standard deviation over the batch,
# averaged over units): when it falls to nothing, every digit produces the same
# activations and no gradient can tell them apart. Lines are the geometric mean over
# the seeds, bands the range.

# %%
DEEP = [64] + [64] * 11 + [10]
x_g, y_g = X_train[:512], Y_train[:512]
ACTS = ("tanh", "sigmoid")  # one program: is_tanh is a traced flag
INIT_SCALES = {"0.01": 0.01, "1/sqrt(64)": 1 / 8, "1": 1.0}


@jax.jit
@jax.vmap
def grads_and_spread(params, states, is_tanh):
    def act(z):
        return jnp.where(is_tanh, jnp.tanh(z), jax.nn.sigmoid(z))

    def loss_fn(params):
        logits, _, pre = mlp(params, states, x_g, training=True, act=act)
        return cross_entropy(logits, y_g), pre

    grads, pre = jax.grad(loss_fn, has_aux=True)(params)
    spread = jnp.stack([jnp.std(act(z), axis=0).mean() for z in pre])
    return jnp.stack([jnp.linalg.norm(g["w"]) for g in grads]), spread


at_init = {}
for bn in (False, True):
    configs = list(itertools.product(ACTS, INIT_SCALES.values(), SEEDS))
    params, states = stack([init_mlp(s, DEEP, sc, bn) for _, sc, s in configs])
    g, sp = grads_and_spread(params, states, jnp.asarray([a == "tanh" for a, _, _ in configs]))
    g, sp = (np.asarray(v).reshape(len(ACTS), len(INIT_SCALES), len(SEEDS), -1) for v in (g, sp))
    for (a, act_name), (i, scale_name) in itertools.product(
        enumerate(ACTS), enumerate(INIT_SCALES)
    ):
        at_init[act_name, scale_name, bn] = dict(g=g[a, i], spread=sp[a, i])

TINY = 1e-30  # float32 underflows to exactly 0 in the sigmoid net's first layers
fig, axes = plt.subplots(2, 4, figsize=(17, 7), layout="constrained")
layers = np.arange(1, len(DEEP))
for (r, act_name), (c, scale_name) in itertools.product(
    enumerate(ACTS), enumerate(["0.01", "1/sqrt(64)", "1"])
):
    ax = axes[r, c]
    for bn, color in ((False, "C0"), (True, "C1")):
        g = np.maximum(at_init[act_name, scale_name, bn]["g"], TINY)
        gm = np.exp(np.log(g).mean(0))
        ax.semilogy(layers, gm, "o-", color=color, label="with BN" if bn else "without BN")
        ax.fill_between(layers, g.min(0), g.max(0), color=color, alpha=0.2)
    ax.set_title(f"{act_name}, init {scale_name}: ||dL/dW||")
    ax.grid(alpha=0.3)
    ax.set_xlabel("layer (1 = input side)")
axes[0, 0].legend()
for r, act_name in enumerate(ACTS):
    ax = axes[r, 3]
    for bn, color in ((False, "C0"), (True, "C1")):
        sp = np.maximum(at_init[act_name, "1/sqrt(64)", bn]["spread"], TINY)
        ax.semilogy(layers[:-1], np.exp(np.log(sp).mean(0)), "s-", color=color)
        ax.fill_between(layers[:-1], sp.min(0), sp.max(0), color=color, alpha=0.2)
    ax.set_title(f"{act_name}, init 1/sqrt(64): spread across inputs")
    ax.set_xlabel("hidden layer")
    ax.grid(alpha=0.3)
plt.show()


def ratio(key):
    """max / min layer gradient norm over the hidden layers, per seed."""
    g = at_init[key]["g"][:, :-1]
    return g.max(1) / np.maximum(g.min(1), TINY)


print(f"hidden layers' largest / smallest gradient norm at init ({len(SEEDS)} seeds), spread:")
for key in at_init:
    r, sp = ratio(key), at_init[key]["spread"]
    print(
        f"  {key[0]:8}{key[1]:>11} {'BN' if key[2] else '  '}  ratio {r.min():8.1e} to "
        f"{r.max():8.1e}   spread layer 1 {sp[:, 0].mean():8.1e}, layer 11 {sp[:, -1].mean():8.1e}"
    )

# %% [markdown]
# **What it shows.** At this depth the claim holds, with two corrections.
#
# - *Without batch norm* the gradients follow the initialization: at `0.01` they are
#   tiny everywhere; `tanh` at scale 1 explodes toward the input; `sigmoid` vanishes
#   toward the input at every scale below 1, even at LeCun's (its slope is at most
#   1/4), and at `0.01` its first layers' gradients underflow to exactly 0 in float32
#   (drawn at the `1e-30` floor). *With batch norm* the hidden layers' gradients lie
#   within a small factor of each other for both nonlinearities and all scales.
# - *Correction 1: the sigmoid net fails forward first.* The right column shows its
#   output spread across inputs falling by orders of magnitude layer after layer
#   (printed above): by the last hidden layer every digit gives nearly the same
#   activations. That is a collapse of the forward signal, not only a vanishing
#   gradient, and batch norm fixes it by re-standardizing every layer's input.
# - *Correction 2: a good initialization is enough for `tanh`.* At LeCun's scale the
#   plain `tanh` net's gradients are flat too (ratio printed above); batch norm
#   removes the need to get the scale right.
#
# ### 3b. Deeper: batch norm *causes* exploding gradients in plain networks
#
# Yang, Pennington, Rao, Sohl-Dickstein and Schoenholz (2019, "A Mean Field Theory of
# Batch Normalization") proved that a deep plain (no skip connection) network with
# batch norm has gradients that explode at initialization, by a fixed factor per layer
# (about `sqrt(pi / (pi - 1)) = 1.21` for ReLU), whatever the weights' scale. The test:
# networks of width 64 and depth 5 to 80 (hidden layers), ReLU (He init) or `tanh`
# (LeCun init), with and without batch norm, with and without skip connections
# (`h <- h + act(BN(h W))` after the first layer). The measure is the ratio of the
# first to the last hidden layer's gradient norm at initialization, on 128 digits.
# Then the depth-40 ReLU networks (where the explosion is fastest) are trained for `DEPTH_STEPS` steps of SGD with momentum
# 0.9 (batches of 32) at learning rates `1e-3` to `0.1` by factors of 10, each arm at its
# own best rate (chosen on validation, reported on test; networks with batch norm are
# evaluated with the evaluation set's own statistics). One program covers every configuration: depth, nonlinearity, batch norm
# and skip are traced flags, so the 80-layer stack is a `lax.scan`.

# %%
WIDTH, MAX_DEPTH = 64, 80
DEPTHS = np.array([5, 10, 20, 40, 80])


def init_deep(seed, relu):
    rng = np.random.default_rng(seed)
    gain = 2.0 if relu else 1.0
    w = lambda *shape: (np.sqrt(gain / shape[-2]) * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    return {
        "w_in": w(64, WIDTH),
        "w": w(MAX_DEPTH - 1, WIDTH, WIDTH),
        "w_out": w(WIDTH, 10) / np.sqrt(gain),
        "b_out": np.zeros(10, np.float32),
    }


def deep_net(p, x, relu, bn, skip, depth):
    """Logits of a `depth`-hidden-layer net; layers past `depth` pass h through
    (p["w"] may hold fewer than MAX_DEPTH - 1 layers: those past it are not run)."""

    def block(z):
        z = jnp.where(
            bn, jaxbn.batch_norm(z, None, None, jaxbn.init_state(WIDTH), training=True)[0], z
        )
        return jnp.where(relu, jax.nn.relu(z), jnp.tanh(z))

    def layer(h, wl):
        w, l = wl
        new = block(h @ w) + jnp.where(skip, h, 0.0)
        return jnp.where(l < depth - 1, new, h), None

    h, _ = lax.scan(layer, block(x @ p["w_in"]), (p["w"], jnp.arange(len(p["w"]))))
    return h @ p["w_out"] + p["b_out"]


@jax.jit
@jax.vmap
def gradient_ratio(p, relu, bn, skip, depth):
    loss = lambda p: cross_entropy(deep_net(p, X_train[:128], relu, bn, skip, depth), Y_train[:128])  # noqa: E731
    g = jax.grad(loss)(p)
    return jnp.linalg.norm(g["w_in"]) / jnp.linalg.norm(g["w"][depth - 2])


ARMS = list(itertools.product((True, False), (False, True), (False, True)))  # relu, bn, skip


def arm_name(relu, bn, skip):
    return f"{'ReLU' if relu else 'tanh'}{', BN' if bn else ''}{', skip' if skip else ''}"


configs = list(itertools.product(ARMS, DEPTHS, SEEDS))
flags = [jnp.asarray([a[k] for a, _, _ in configs]) for k in range(3)]
ratios = gradient_ratio(
    stack([init_deep(s, a[0]) for a, _, s in configs]),
    *flags,
    jnp.asarray([d for _, d, _ in configs]),
)
ratios = np.asarray(ratios).reshape(len(ARMS), len(DEPTHS), len(SEEDS))
print(f"first / last hidden layer gradient norm at init (geometric mean of {len(SEEDS)} seeds):")
print(f"{'':18}" + "".join(f"{'depth ' + str(d):>12}" for d in DEPTHS))
for a, arm in enumerate(ARMS):
    print(f"{arm_name(*arm):18}" + "".join(f"{np.exp(np.log(r).mean()):12.3g}" for r in ratios[a]))
per_layer = np.exp(np.log(ratios[ARMS.index((True, True, False)), -1]).mean() / (DEPTHS[-1] - 1))
print(
    f"ReLU + BN, plain, depth 80: {per_layer:.3f}x per layer (theory {np.sqrt(np.pi / (np.pi - 1)):.3f})"
)

# %%
TRAIN_DEPTH = 40
DEEP_LRS = 10.0 ** np.arange(-3, -0.9)  # 1e-3 ... 0.1
DEEP_ARMS = [arm for arm in ARMS if arm[0]]  # ReLU: the explosion of 1.21 per layer


@jax.jit
@jax.vmap
def train_deep(p, relu, bn, skip, lr, idx):
    p = p | {"w": p["w"][: TRAIN_DEPTH - 1]}  # the layers past TRAIN_DEPTH are not run
    opt = optax.sgd(lr, momentum=0.9)

    def loss(p, i):
        return cross_entropy(deep_net(p, X_train[i], relu, bn, skip, TRAIN_DEPTH), Y_train[i])

    def step(carry, i):
        p, o = carry
        value, g = jax.value_and_grad(loss)(p, i)
        updates, o = opt.update(g, o, p)
        return (optax.apply_updates(p, updates), o), value

    (p, _), losses = lax.scan(step, (p, opt.init(p)), idx)

    def acc(x, y):
        return jnp.mean(jnp.argmax(deep_net(p, x, relu, bn, skip, TRAIN_DEPTH), -1) == y)

    return losses, acc(X_val, Y_val), acc(X_test, Y_test)


configs = list(itertools.product(DEEP_ARMS, DEEP_LRS, SEEDS))
flags = [jnp.asarray([a[k] for a, _, _ in configs]) for k in range(3)]
lr_flags = jnp.asarray([lr for _, lr, _ in configs], jnp.float32)
idx32 = seed_indices(len(X_train), 32, DEPTH_STEPS, [s for _, _, s in configs])
deep_losses, deep_val, deep_test = train_deep(
    stack([init_deep(s, a[0]) for a, _, s in configs]), *flags, lr_flags, idx32
)
shape = (len(DEEP_ARMS), len(DEEP_LRS), len(SEEDS))
deep_val, deep_test = (np.asarray(v).reshape(shape) for v in (deep_val, deep_test))
deep_nan = ~np.isfinite(np.asarray(deep_losses)).all(-1).reshape(shape)
deep_k = deep_val.mean(2).argmax(1)  # each arm's rate, chosen on validation
deep_acc = deep_test[np.arange(len(DEEP_ARMS)), deep_k]  # (arm, seed)
print(f"depth {TRAIN_DEPTH}, test accuracy after {DEPTH_STEPS} steps at each arm's chosen rate")
print(f"(mean ± sd over {len(SEEDS)} seeds); the seed mean at every rate; * diverged seeds")
print(f"{'':18}{'rate':>7}{'test':>16}   " + "".join(f"{lr:>9.0e}" for lr in DEEP_LRS))
for a, arm in enumerate(DEEP_ARMS):
    row = "".join(
        f"{deep_test[a, k].mean():8.2f}{'*' if deep_nan[a, k].any() else ' '}"
        for k in range(len(DEEP_LRS))
    )
    print(f"{arm_name(*arm):18}{DEEP_LRS[deep_k[a]]:7.0e}{mean_sd(deep_acc[a]):>16}   {row}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
for ax, relu in zip(axes[:2], (True, False)):
    for a, arm in enumerate(ARMS):
        if arm[0] != relu:
            continue
        r = ratios[a]
        color = "C1" if arm[1] else "C0"
        ax.loglog(
            DEPTHS,
            np.exp(np.log(r).mean(1)),
            "o-" if arm[2] else "s--",
            color=color,
            label=arm_name(*arm),
        )
        ax.fill_between(DEPTHS, r.min(1), r.max(1), color=color, alpha=0.15)
    if relu:
        theory = np.sqrt(np.pi / (np.pi - 1)) ** (DEPTHS - 1.0)
        ax.loglog(DEPTHS, theory, "k:", label="$1.21^{\\mathrm{depth}-1}$ (mean field)")
    ax.axhline(1, color="gray", lw=1)
    ax.set_xticks(DEPTHS, [str(d) for d in DEPTHS])
    ax.minorticks_off()
    ax.set(xlabel="depth (hidden layers)", ylabel="||dL/dW_first|| / ||dL/dW_last||")
    ax.set_title(f"{'ReLU' if relu else 'tanh'}: gradient ratio at init")
    ax.legend()
    ax.grid(alpha=0.3)
for a, arm in enumerate(DEEP_ARMS):  # test accuracy against the learning rate
    style = dict(color="C1" if arm[1] else "C0", ls="-" if arm[2] else "--", marker="o")
    axes[2].plot(DEEP_LRS, deep_test[a].mean(1), label=arm_name(*arm), **style)
    band = deep_test[a].min(1), deep_test[a].max(1)
    axes[2].fill_between(DEEP_LRS, *band, alpha=0.12, color=style["color"])
axes[2].axhline(0.1, color="gray", lw=1, ls=":", label="chance")
axes[2].set(xscale="log", xlabel="learning rate (SGD, momentum 0.9)", ylabel="test accuracy")
axes[2].set_ylim(0, 1)
axes[2].set_title(f"ReLU, depth {TRAIN_DEPTH}: accuracy vs rate (band: seeds)")
axes[2].legend()
axes[2].grid(alpha=0.3)
plt.show()

# %% [markdown]
# **What it shows.** The notes' third claim fails in deep plain networks, but batch
# norm's explosion is not what stops them training.
#
# - *Plain networks with batch norm explode*, geometrically with depth: for ReLU at
#   the mean-field rate (printed above), for `tanh` more slowly. Without batch norm,
#   with He or LeCun initialization, the ratio stays near 1 at every depth: at
#   initialization, batch norm is the *cause* of the exploding gradient here, not its
#   cure.
# - *Skip connections tame it*: with batch norm and skips the ratio grows only slowly.
#   Each block adds a normalized branch to a growing sum, so deep blocks stay close to
#   the identity (De and Smith 2020, "Batch Normalization Biases Residual Blocks
#   Towards the Identity Function in Deep Networks"). Without batch norm, skips add up
#   unnormalized ReLU branches and the forward signal itself grows with depth: those
#   networks diverge at every rate tried, and need a scaled initialization instead
#   (Zhang, Dauphin and Ma 2019, "Fixup Initialization: Residual Learning Without
#   Normalization").
# - *Training, each arm at its own rate* (the table and the right panel): at depth 40
#   the plain ReLU network stays far from trained *with and without* batch norm, at
#   every rate tried, while its gradients explode only with batch norm. So the
#   explosion is not shown to be why the batch-norm network fails here: a 40-layer
#   plain ReLU network is hard to train in this budget either way. What trains is
#   batch norm *with* skip connections.

# %% [markdown]
# ## 4. The optimization landscape
#
# Santurkar, Tsipras, Ilyas and Madry (2018, "How Does Batch Normalization Help
# Optimization?") argued that batch norm helps because it makes the loss landscape
# smoother, not because it fixes "internal covariate shift". Their measurement,
# repeated here: every 15th step of training, on the current batch, step along the
# gradient `g` by `eta` from 0.25 to 4 times the learning rate `lr`, and record
#
# - the gradient norm `|g|`;
# - the *first-order error* `max_eta |(L(w - eta g) - L(w)) / (eta |g|**2) + 1|`: the
#   loss change over the decrease the gradient promises to first order, `eta |g|**2`,
#   is -1 where the loss is linear along `-g`, so this is how far the loss departs from
#   the gradient's prediction over those steps, per unit of promised decrease (0: the
#   loss is perfectly predictable along the step). Santurkar et al. plot the range of
#   the loss over the steps instead; divided by `lr |g|**2` that range is not monotone
#   in smoothness (a loss that is linear along `-g`, the smoothest, gives
#   `4 - 0.25 = 3.75`), so it is printed no more;
# - the gradient change per unit step, `max ||grad L(w - eta g) - g|| / (eta |g|)`, a
#   local estimate of the gradient's Lipschitz constant (how *predictive* the gradient
#   is).
#
# And Santurkar's control, *noisy batch norm*: after each batch norm, every unit is
# scaled and shifted by random amounts drawn anew at every step (scale in `[0.5, 2]`,
# shift in `[-0.5, 0.5]`), so that the distributions the nonlinearities see move all
# the time; the landscape is measured on the network without the noise. The 3x100
# ReLU MLP of §1, He initialization, SGD at learning rate 0.1 (where all train, §1),
# 150 steps.

# %%
LR_LAND, ETAS = 0.1, 0.1 * np.array([0.25, 0.5, 1.0, 2.0, 4.0])
NOISE = 0.5


def landscape(params, states, i, t, hp):
    """|g|, the first-order error along -g, the gradient change per unit step, and
    whether the loss along -g is lowest at the largest step."""

    def loss_fn(p):
        logits = mlp(p, states, X_train[i], training=True, bn=hp["bn"])[0]
        return cross_entropy(logits, Y_train[i])

    def norm(tree):
        return jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(tree)))

    value0, g = jax.value_and_grad(loss_fn)(params)
    g_norm = norm(g)

    def at(eta):
        p = jax.tree.map(lambda w, gw: w - eta * gw, params, g)
        value, g2 = jax.value_and_grad(loss_fn)(p)
        return value, norm(jax.tree.map(jnp.subtract, g2, g)) / (eta * g_norm)

    etas = jnp.asarray(ETAS, jnp.float32)
    values, change = jax.vmap(at)(etas)
    # the loss change over the decrease the gradient promises, -eta |g|^2: -1 where the
    # loss is linear along -g, so |ratio + 1| is the first-order model's relative error
    first_order = jnp.max(jnp.abs((values - value0) / (etas * g_norm**2) + 1))
    return g_norm, first_order, change.max(), jnp.argmin(values) == len(ETAS) - 1


LAND_ARMS = {"without BN": (False, 0.0), "with BN": (True, 0.0), "noisy BN": (True, NOISE)}
idx5 = seed_indices(len(X_train), 64, 150)
train_land = make_train(sgd, perturb=noisy_bn, monitor=landscape, every=15)
params, states = stack([init_mlp(s, SIZES, None, True) for _ in LAND_ARMS for s in SEEDS])
hp = {  # one program for the three arms: bn False is no BN, noise 0 plain batch norm
    "lr": jnp.full(len(LAND_ARMS) * len(SEEDS), LR_LAND),
    "bn": jnp.repeat(jnp.asarray([bn for bn, _ in LAND_ARMS.values()]), len(SEEDS)),
    "noise": jnp.repeat(jnp.asarray([a for _, a in LAND_ARMS.values()]), len(SEEDS)),
    "seed": jnp.asarray(np.tile(SEEDS, len(LAND_ARMS))),
}
_, losses, mons = train_land(params, states, hp, jnp.tile(idx5, (len(LAND_ARMS), 1, 1)))
split = [np.asarray(v).reshape(len(LAND_ARMS), len(SEEDS), -1) for v in (losses, *mons)]
LAND_KEYS = ("loss", "grad_norm", "first_order", "change", "lowest_at_largest")
land = {n: dict(zip(LAND_KEYS, (v[k] for v in split))) for k, n in enumerate(LAND_ARMS)}
land_steps = np.arange(15, 151, 15)

PANELS = {
    "loss": "training loss",
    "grad_norm": "gradient norm |g|",
    "first_order": "first-order error along -g",
    "change": "gradient change per unit step",
}
fig, axes = plt.subplots(1, 4, figsize=(19, 4), layout="constrained")
for (name, r), color in zip(land.items(), ("C0", "C1", "C2")):
    for ax, (key, title) in zip(axes, PANELS.items()):
        v = r[key]
        x = np.arange(1, v.shape[1] + 1) if key == "loss" else land_steps
        ax.plot(x, np.median(v, 0), color=color, label=name)
        ax.fill_between(x, v.min(0), v.max(0), color=color, alpha=0.2)
        ax.set(yscale="log", xlabel="step", title=title)
axes[0].set_ylabel(f"median of {len(SEEDS)} seeds; band: range")
for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
plt.show()
lower = {key: land["with BN"][key] < land["without BN"][key] for key in PANELS if key != "loss"}
for name, r in land.items():
    print(
        f"{name:10}: median over steps and seeds: |g| {np.median(r['grad_norm']):.3f}, "
        f"first-order error {np.median(r['first_order']):.3f}, gradient change per unit step "
        f"{np.median(r['change']):.2f}; final loss (mean of last 20 steps) "
        f"{mean_sd(r['loss'][:, -20:].mean(1))}; loss along -g lowest at the largest step in "
        f"{n_of(r['lowest_at_largest'])} (seed, step) pairs"
    )
print(
    "with BN lower than without, in (seed, step) pairs: "
    + ", ".join(f"{key} {n_of(v)}" for key, v in lower.items())
)
# per seed (the median over its steps), paired: on how many seeds BN is lower
lower_seeds = {
    key: np.median(land["with BN"][key], 1) < np.median(land["without BN"][key], 1) for key in lower
}
print(
    "with BN lower than without, per seed (median over steps): "
    + ", ".join(f"{key} {n_of(v)}" for key, v in lower_seeds.items())
)
for key in lower:  # paired over the seeds, on the log of each seed's median
    print(
        f"  {key}, log(with BN / without BN): "
        + paired_text(
            np.log(np.median(land["with BN"][key], 1)),
            np.log(np.median(land["without BN"][key], 1)),
        )
    )
print(
    "  change, log(noisy BN / with BN): "
    + paired_text(
        np.log(np.median(land["noisy BN"]["change"], 1)),
        np.log(np.median(land["with BN"]["change"], 1)),
    )
)

# %% [markdown]
# **What it shows.** On this problem, against a plain network on standardized inputs
# with He initialization (numbers printed above; "detected" is a paired t over the
# seeds, each seed's median over its steps, two-sided 5%):
#
# - batch norm's gradients are not smaller but larger, in nearly every (seed, step)
#   pair;
# - per unit of promised decrease, the loss along the step departs *less* from the
#   gradient's first-order prediction with batch norm, in most pairs, and the
#   difference is detected over the seeds: in this sense batch norm's landscape is more predictable, Santurkar et al.'s
#   direction. (Along `-g` the loss is lowest at the largest step tried in nearly every
#   pair, for every arm: over these steps the loss is close to linear, and a range of
#   the loss would reward departures from that.)
# - the gradient change per unit step, a local estimate of the gradient's Lipschitz
#   constant, is lower with batch norm on most seeds, but the difference is not
#   detected with this many seeds (its paired t is printed).
#
# An earlier version of this notebook, against a plain network on raw pixels, found
# batch norm's landscape smoother too. Noisy batch norm, whose nonlinearities see
# distributions that move at every step, still trains (to a higher loss, as its noise
# stays on), and its gradient change per unit step is not detectably higher than
# batch norm's: moving distributions do not make this landscape measurably rougher.
# The local measures thus agree with Santurkar et al. on predictability, weakly, and
# cannot say whether that is what lets batch norm take the larger rates of §1.

# %% [markdown]
# ## 5. Overfitting
#
# To give overfitting a chance, a wide ReLU MLP (two hidden layers of 256, He
# initialization) sees only the first 200 training digits, for `OVERFIT_STEPS` steps
# of Adam (learning rate `1e-3`, batches of 32; the epochs are printed). Accuracy and
# cross-entropy on the 450 held-out digits every 50 steps. Beside batch norm, the
# controls a reader expects and one that separates batch norm's mechanisms:
#
# - *weight decay*: the plain network with AdamW (decoupled weight decay 1, i.e. the
#   weights shrink by `lr * 1 = 1e-3` of themselves per step);
# - *dropout*: the plain network with dropout 0.5 on the hidden units;
# - *batch norm with noise-free statistics*: every step runs all 200 digits through
#   the network, so batch norm normalizes with the statistics of the whole training
#   set (no sampling noise), while the loss and its gradient are taken on the batch of
#   32 as before. If the noise of batch statistics is what regularizes (Luo, Wang, Shao
#   and Peng 2019, "Towards Understanding Regularization in Batch Normalization"), this
#   arm loses batch norm's benefit.

# %%
N_SMALL, WIDE = 200, [64, 256, 256, 10]
x_small, y_small = X_train[:N_SMALL], Y_train[:N_SMALL]


def overfit_monitor(p, s, i, t, hp):
    logits, _, _ = mlp(p, s, X_held, training=False, bn=hp.get("bn"))
    return (
        accuracy(p, s, x_small, y_small, bn=hp.get("bn")),
        jnp.mean(jnp.argmax(logits, -1) == Y_held),
        cross_entropy(logits, Y_held),
    )


def adamw(hp):
    return optax.adamw(hp["lr"], weight_decay=hp["wd"])


OVERFIT_ARMS = {  # name: (batch norm, noise-free statistics, weight decay, dropout)
    "without BN": (False, False, 0.0, 0.0),
    "weight decay": (False, False, 1.0, 0.0),
    "dropout": (False, False, 0.0, 0.5),
    "with BN": (True, False, 0.0, 0.0),
    "BN, noise-free statistics": (True, True, 0.0, 0.0),
}
idx_small = seed_indices(N_SMALL, 32, OVERFIT_STEPS)
overfit = {}
for full in (False, True):  # one program per kind of statistics; bn False is no BN
    names = [n for n, a in OVERFIT_ARMS.items() if a[1] == full]
    train_small = make_train(
        adamw,
        x=x_small,
        y=y_small,
        perturb=None if full else dropout,
        full_stats=full,
        monitor=overfit_monitor,
        every=50,
    )
    params, states = stack([init_mlp(s, WIDE, None, True) for _ in names for s in SEEDS])
    hp = {
        "lr": jnp.full(len(names) * len(SEEDS), 1e-3),
        "bn": jnp.repeat(jnp.asarray([OVERFIT_ARMS[n][0] for n in names]), len(SEEDS)),
        "wd": jnp.repeat(jnp.asarray([OVERFIT_ARMS[n][2] for n in names]), len(SEEDS)),
        "drop": jnp.repeat(jnp.asarray([OVERFIT_ARMS[n][3] for n in names]), len(SEEDS)),
        "seed": jnp.asarray(np.tile(SEEDS, len(names))),
    }
    _, _, mons = train_small(params, states, hp, jnp.tile(idx_small, (len(names), 1, 1)))
    for k, n in enumerate(names):  # train acc, held acc, held loss: (seed, time)
        overfit[n] = [np.asarray(v).reshape(len(names), len(SEEDS), -1)[k] for v in mons]
overfit = {n: overfit[n] for n in OVERFIT_ARMS}
of_steps = np.arange(50, OVERFIT_STEPS + 1, 50)

fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), layout="constrained")
for (name, (_, va, vl)), color in zip(overfit.items(), ("C0", "C4", "C2", "C1", "C3")):
    axes[0].plot(of_steps, va.mean(0), color=color, label=name)
    axes[0].fill_between(of_steps, va.min(0), va.max(0), color=color, alpha=0.15)
    axes[1].plot(of_steps, vl.mean(0), color=color, label=name)
    axes[1].fill_between(of_steps, vl.min(0), vl.max(0), color=color, alpha=0.15)
axes[0].set(xlabel="step", ylabel="held-out accuracy", ylim=(0.85, 1.0))
axes[0].set_title(f"held out ({len(X_held)} digits); mean, band: range over seeds")
axes[1].set(xlabel="step", ylabel="held-out cross-entropy", yscale="log")
axes[1].set_title(f"trained on {N_SMALL} digits")
for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
plt.show()
rise = {n: vl[:, -1] - vl.min(1) for n, (_, _, vl) in overfit.items()}
print(f"{OVERFIT_STEPS} steps of 32 on {N_SMALL} digits: {OVERFIT_STEPS * 32 / N_SMALL:.0f} epochs")
print(f"final values, mean ± sd over {len(SEEDS)} seeds:")
print(f"{'':26}{'train acc':>15}{'held-out acc':>15}{'held-out loss':>15}{'loss rise':>15}")
for n, (tr, va, vl) in overfit.items():
    cols = (tr[:, -1], va[:, -1], vl[:, -1], rise[n])
    print(f"{n:26}" + "".join(f"{mean_sd(c):>15}" for c in cols))
print(f"paired by seed, mean [95% CI], t (|t| > {T975:.2f}: detected at 5%):")
final_of = {n: (tr[:, -1], va[:, -1], vl[:, -1]) for n, (tr, va, vl) in overfit.items()}
for label, (a, b, k) in {
    "held-out accuracy, BN - no BN": ("with BN", "without BN", 1),
    "held-out loss, no BN - BN": ("without BN", "with BN", 2),
    "held-out loss, no BN - weight decay": ("without BN", "weight decay", 2),
    "held-out loss, no BN - dropout": ("without BN", "dropout", 2),
    "held-out loss, no BN - noise-free BN": ("without BN", "BN, noise-free statistics", 2),
    "held-out loss, noise-free BN - BN": ("BN, noise-free statistics", "with BN", 2),
    "held-out loss, weight decay - BN": ("weight decay", "with BN", 2),
}.items():
    print(f"  {label:38}{paired_text(final_of[a][k], final_of[b][k])}")
kept = paired(final_of["without BN"][2], final_of["BN, noise-free statistics"][2])[0]
print(
    f"share of BN's held-out loss reduction that noise-free statistics keep: "
    f"{kept / paired(final_of['without BN'][2], final_of['with BN'][2])[0]:.0%}"
)

# %% [markdown]
# **What it shows.** Every network fits all of its training digits: batch norm does not
# stop a network from memorizing its training set. On standardized inputs none of the
# arms' held-out loss climbs much in this run (the rise column), so the test is the
# held-out loss and accuracy at the end, paired by seed (printed above):
#
# - *Accuracy*: batch norm's held-out accuracy is higher than the plain network's on
#   average, by the printed difference, small; with this many seeds it is detected on
#   some seed sets and not on others, so only "not lower" is asserted.
# - *Held-out loss*: batch norm ends lower than the plain network (detected), by as
#   much as weight decay lowers it or more (batch norm's loss is not detectably above
#   weight decay's); no reduction from dropout is detected.
# - *Mechanism*: batch norm with noise-free statistics also ends below the plain
#   network (detected), keeping most of batch norm's reduction (the printed share).
#   So the noise of batch statistics (Luo et al.'s mechanism) is not what produces
#   most of it here: it is something batch norm shares with weight decay, such as
#   keeping the logits' scale in check. Whether the noise adds the rest is not
#   resolved: noise-free minus noisy batch norm is not detected, but its interval is
#   not narrow compared with the effect (printed), so a contribution of the noise is
#   not excluded. The original paper claims only that batch norm "reduces the need for
#   Dropout"; on this evidence it regularizes at least as much as a weight decay of 1,
#   mostly not through noise.

# %% [markdown]
# ## 6. What a hidden unit sees (the paper's Figure 1), and noisy batch norm
#
# Ioffe and Szegedy's Figure 1 follows the input of one sigmoid unit through training:
# its 15th, 50th and 85th percentiles over held-out data. Their setup, shrunk: three
# hidden layers of 100 sigmoid units, small Gaussian weights (`N(0, 0.1**2)`), SGD with
# learning rate 0.5 and batches of 60, for 400 steps. With batch norm the unit's input
# is `gamma * x_hat + beta` computed with the held-out digits' statistics (what the
# unit sees in training mode). By itself this shows stable inputs and fast training
# together, not that one causes the other; so, as Santurkar et al. did, a third arm
# trains with §4's noisy batch norm, whose unit inputs move at every step by
# construction (here they include the noise of the step at which they are measured).

# %%
SMALL3 = [64, 100, 100, 100, 10]
sig = jax.nn.sigmoid


def unit_monitor(p, s, i, t, hp):
    perturb = functools.partial(noisy_bn, t, hp)
    _, _, pre = mlp(p, s, X_held, training=True, act=sig, perturb=perturb, bn=hp["bn"])
    q = jnp.percentile(pre[-1], jnp.array([15.0, 50.0, 85.0]), axis=0)  # (3, units)
    return q, accuracy(p, s, X_held, Y_held, act=sig, bn=hp["bn"])


FIG1_ARMS = {"without BN": (False, 0.0), "with BN": (True, 0.0), "noisy BN": (True, NOISE)}
idx60 = seed_indices(len(X_train), 60, 400)
hp = {  # one program for the three arms: bn False is no BN, noise 0 plain batch norm
    "lr": jnp.full(len(FIG1_ARMS) * len(SEEDS), 0.5),
    "bn": jnp.repeat(jnp.asarray([bn for bn, _ in FIG1_ARMS.values()]), len(SEEDS)),
    "noise": jnp.repeat(jnp.asarray([a for _, a in FIG1_ARMS.values()]), len(SEEDS)),
    "seed": jnp.asarray(np.tile(SEEDS, len(FIG1_ARMS))),
}
train_sig = make_train(sgd, act=sig, perturb=noisy_bn, monitor=unit_monitor, every=20)
params, states = stack([init_mlp(s, SMALL3, 0.1, True) for _ in FIG1_ARMS for s in SEEDS])
monitor_at_start = jax.jit(jax.vmap(unit_monitor, in_axes=(0, 0, None, None, 0)))
q0, _ = monitor_at_start(params, states, 0, 0, hp)
_, _, (q, acc) = train_sig(params, states, hp, jnp.tile(idx60, (len(FIG1_ARMS), 1, 1)))
q = np.concatenate([np.asarray(q0)[:, None], np.asarray(q)], 1)
q, acc = (np.reshape(v, (len(FIG1_ARMS), len(SEEDS), *np.shape(v)[1:])) for v in (q, acc))
fig1 = {n: dict(q=q[k], acc=acc[k]) for k, n in enumerate(FIG1_ARMS)}
u_steps = np.arange(0, 401, 20)

fig, axes = plt.subplots(1, 4, figsize=(19, 4), layout="constrained")
for (name, r), color in zip(fig1.items(), ("C0", "C1", "C2")):
    a = r["acc"]
    axes[0].plot(u_steps[1:], a.mean(0), color=color, label=name)
    axes[0].fill_between(u_steps[1:], a.min(0), a.max(0), color=color, alpha=0.2)
axes[0].set(xlabel="step", ylabel="held-out accuracy", ylim=(0, 1))
axes[0].set_title(f"(a) held-out accuracy ({len(SEEDS)} seeds)")
axes[0].legend()
for ax, (name, r), letter, color in zip(axes[1:], fig1.items(), "bcd", ("C0", "C1", "C2")):
    q = r["q"][0, :, :, 0]  # the first seed, unit 0: (time, percentile)
    ax.fill_between(u_steps, q[:, 0], q[:, 2], alpha=0.25, color=color)
    for k, pct in enumerate((15, 50, 85)):
        ax.plot(u_steps, q[:, k], "k", lw=1.5 if pct == 50 else 0.8, label=f"{pct}th percentile")
    ax.set(xlabel="step", ylabel="input to the sigmoid")
    ax.set_title(f"({letter}) {name}: one unit, seed {SEEDS[0]}")
    ax.legend()
axes[3].sharey(axes[1])
for ax in axes:
    ax.grid(alpha=0.3)
plt.show()

moved, first_09 = {}, {}
for name, r in fig1.items():
    q = r["q"]  # (seed, time, percentile, unit)
    half = q.shape[1] // 2
    moved[name] = (
        np.median(np.abs(q[:, -1, 1] - q[:, 0, 1]), -1),
        np.median(np.abs(q[:, -1, 1] - q[:, half, 1]), -1),
    )
    print(
        f"{name:10}: median over the units of how far the median input moved: whole run "
        f"{mean_sd(moved[name][0])}, second half {mean_sd(moved[name][1])}"
    )
for name, r in fig1.items():
    reached = r["acc"] >= 0.9
    first_09[name] = np.where(reached.any(1), u_steps[1:][np.argmax(reached, 1)], np.inf)
    print(f"{name:10}: first step at >= 0.9 held-out accuracy per seed: {first_09[name]}")

# %% [markdown]
# **What it shows.** The paper's picture comes back, on every seed (printed above):
# without batch norm the unit's input distribution wanders and is still moving in the
# second half; with batch norm it stays near where it started while `gamma` and `beta`
# learn, and held-out accuracy passes 0.9 within the first few tens of steps instead
# of hundreds. The noisy arm separates the two: its unit inputs move about as much as
# the plain network's, in the second half too, yet it reaches 0.9 about as soon as
# batch norm. Stable input distributions are not what makes batch norm fast here
# (Santurkar et al. 2018's result, reproduced); the paper's "internal covariate
# shift" explanation is not supported.

# %% [markdown]
# ## 7. Small batches, and the remedies
#
# Batch norm trains on each batch's statistics and evaluates with running averages of
# them, and a small batch makes both worse: its statistics are noisy, and the batch
# variance is biased low by `(n - 1) / n` (half the true variance at a batch of 2). Wu
# and Johnson (2021, "Rethinking 'Batch' in BatchNorm") trace much of the small-batch
# loss to this train/test mismatch, and try to mend it at evaluation. The 3x100 ReLU
# MLP (He initialization), Adam at `1e-3`, batches of 2, 4, 8, 16 and 32, each for
# `SMALL_EPOCHS` epochs (so every batch size sees the same digits as often), each
# way:
#
# - without batch norm;
# - plain batch norm, evaluated with its running statistics;
# - the same weights with the running variance times `n / (n - 1)`, what
#   `unbiased_running_var=True` stores (as PyTorch does; the running statistics do
#   not feed back into training, so this is the same run);
# - the same weights evaluated with *population statistics* (`jaxbn.population_stats`
#   over the training set: PreciseBN);
# - the same weights evaluated with *batch statistics*, in held-out batches of the
#   training batch size (what the network saw in training);
# - `renorm=(rmax, dmax)`: batch renormalization (Ioffe 2017, "Batch Renormalization:
#   Towards Reducing Minibatch Dependence in Batch-Normalized Models"), which corrects
#   each batch's statistics toward the running ones in training; its limits follow
#   the paper's schedule, `rmax` 1 to 3 and `dmax` 0 to 5, ramped from a sixth to
#   two thirds of the run (traced scalars, so one compiled program serves every step).
#
# Every batch is padded to 32 rows, and the padding masked out of the loss and of batch
# norm's statistics (`batch_norm(..., mask=)`), so that one compiled program trains
# every batch size. And at a large batch (128, 200 steps), Hoffer, Hubara and Soudry's (2017, "Train
# Longer, Generalize Better") ghost batch norm: `virtual_batch_size=16` normalizes
# groups of 16 within each batch of 128.


# %%
def renorm_schedule(t, hp):
    """Batch renorm's limits at step t; hp["renorm"] = 0 keeps them at (1, 0), which
    is plain batch norm (r = 1, d = 0), so one program trains both arms."""
    ramp = hp["renorm"] * jnp.clip((t - hp["t0"]) / (hp["t1"] - hp["t0"]), 0.0, 1.0)
    return {"renorm": (1.0 + 2.0 * ramp, 5.0 * ramp)}


def held_accuracy(p, s):
    return stacked_accuracy(p, s, X_held, Y_held)


def bn_inputs(params, states, xb):
    """What each batch norm normalizes, in a training-mode forward pass (as PyTorch's
    `update_bn` and PreciseBN do)."""
    inputs = []
    mlp(params, states, xb, training=True, bn_inputs=inputs)
    return inputs


stacked_bn_inputs = jax.jit(jax.vmap(bn_inputs, in_axes=(0, 0, None)))


def population(params, states):
    """Per network: the running statistics replaced by population statistics. The
    networks' axis is one more feature axis (`axis=(0, -1)`), so one pass over the
    training set gives every network's statistics."""
    chunks = [X_train[k : k + 512] for k in range(0, len(X_train), 512)]
    inputs = lambda b: stacked_bn_inputs(params, states, b)  # noqa: E731
    pop = jaxbn.population_stats(inputs, chunks, axis=(0, -1))
    nets = len(jax.tree.leaves(params)[0])
    return tuple(st._replace(count=jnp.full(nets, st.count)) for st in pop)


BATCHES = (2, 4, 8, 16, 32)
PAD = max(BATCHES)  # every batch is padded to PAD rows and masked: one program for all


def pad(rows):
    """Row indices (..., batch) padded to (..., PAD) with index 0, and the mask of the
    real ones."""
    out = np.zeros((*rows.shape[:-1], PAD), np.int32)
    out[..., : rows.shape[-1]] = rows
    return jnp.asarray(out), jnp.asarray(np.arange(PAD) < rows.shape[-1])


@jax.jit
def batch_mode_accuracy(params, states, rows, valid):
    """Held-out accuracy in training mode, in groups of the training batch size (as the
    net trained): rows (groups, PAD) index X_held, `valid` marks the group members."""
    xb, yb = X_held[rows], Y_held[rows]

    def one(p, s):
        def group(x, v):
            return mlp(p, s, x, training=True, bn_options={"mask": v[:, None]})[0]

        correct = (jnp.argmax(jax.vmap(group)(xb, valid), -1) == yb) & valid
        return correct.sum() / valid.sum()

    return jax.vmap(one)(params, states)


n_seeds, max_steps = len(SEEDS), SMALL_EPOCHS * (len(X_train) // BATCHES[0])
train_small_plain = make_train(adam, padded=True)
train_small_bn = make_train(adam, bn_options=renorm_schedule, padded=True)  # BN and renorm
small = {}
for batch in BATCHES:
    steps = SMALL_EPOCHS * (len(X_train) // batch)
    idx_b, _ = pad(np.asarray(seed_indices(len(X_train), batch, steps)))
    idx_b = jnp.pad(idx_b, ((0, 0), (0, max_steps - steps), (0, 0)))  # (seed, step, PAD)
    params, states = stack([init_mlp(s, SIZES, None, False) for s in SEEDS])
    hp = hparams(n_seeds, lr=1e-3, rows=batch, steps=steps)
    (p, s), _, _ = train_small_plain(params, states, hp, idx_b)
    small[batch, "no BN"] = np.asarray(held_accuracy(p, s))
    # plain BN and batch renorm: the same program, seeds twice
    params, states = stack([init_mlp(s, SIZES, None, True) for s in [*SEEDS, *SEEDS]])
    hp = hparams(2 * n_seeds, lr=1e-3, t0=steps / 6, t1=2 * steps / 3, rows=batch, steps=steps)
    hp["renorm"] = jnp.repeat(jnp.array([0.0, 1.0]), n_seeds)
    (p, s), _, _ = train_small_bn(params, states, hp, jnp.concatenate([idx_b, idx_b]))
    acc = np.asarray(held_accuracy(p, s))
    small[batch, "BN"], small[batch, "BN, renorm"] = acc[:n_seeds], acc[n_seeds:]
    p, s = jax.tree.map(lambda a: a[:n_seeds], (p, s))  # plain BN's weights
    unbiased = tuple(st._replace(var=st.var * batch / (batch - 1)) for st in s)
    small[batch, "BN, unbiased running var"] = np.asarray(held_accuracy(p, unbiased))
    small[batch, "BN, population stats"] = np.asarray(held_accuracy(p, population(p, s)))
    groups = np.arange(len(X_held) // batch * batch).reshape(-1, batch)
    groups = np.concatenate([groups, np.zeros((len(X_held) // 2 - len(groups), batch), int)])
    rows, valid = pad(groups)
    valid = valid & (jnp.arange(len(groups)) < len(X_held) // batch)[:, None]
    small[batch, "BN, batch statistics"] = np.asarray(batch_mode_accuracy(p, s, rows, valid))

idx128 = seed_indices(len(X_train), 128, 200)
for name, options in (("BN", None), ("ghost BN (16)", lambda t, hp: {"virtual_batch_size": 16})):
    params, states = stack([init_mlp(s, SIZES, None, True) for s in SEEDS])
    train_128 = make_train(adam, bn_options=options)
    (p, s), _, _ = train_128(params, states, hparams(n_seeds, lr=1e-3), idx128)
    small[128, name] = np.asarray(held_accuracy(p, s))
SMALL_ARMS = ["no BN", "BN", "BN, unbiased running var", "BN, population stats"]
SMALL_ARMS += ["BN, batch statistics", "BN, renorm"]

print(f"held-out accuracy (mean ± sd over {n_seeds} seeds), {SMALL_EPOCHS} epochs per batch size:")
print(f"{'':26}" + "".join(f"{'batch ' + str(b):>15}" for b in BATCHES))
for name in SMALL_ARMS:
    print(f"{name:26}" + "".join(f"{mean_sd(small[b, name]):>15}" for b in BATCHES))
for name in ("BN", "ghost BN (16)"):
    print(f"batch 128, {len(idx128[0])} steps, {name:14} {mean_sd(small[128, name])}")
print(f"\npaired by seed: mean difference (t; |t| > {T975:.2f} is detected at 5%)")
SMALL_PAIRS = {
    "no BN - BN": ("no BN", "BN"),
    "population - BN": ("BN, population stats", "BN"),
    "unbiased - BN": ("BN, unbiased running var", "BN"),
    "BN - batch stats": ("BN", "BN, batch statistics"),
    "renorm - BN": ("BN, renorm", "BN"),
}
print(f"{'':18}" + "".join(f"{'batch ' + str(b):>17}" for b in BATCHES))
for label, (a, b) in SMALL_PAIRS.items():
    cells = []
    for batch in BATCHES:
        m, se_ = paired(small[batch, a], small[batch, b])
        cells.append(f"{m:+.3f} ({m / se_ if se_ > 0 else np.inf * np.sign(m):+.1f})")
    print(f"{label:18}" + "".join(f"{c:>17}" for c in cells))
print("batch 128, ghost BN - BN: " + paired_text(small[128, "ghost BN (16)"], small[128, "BN"]))

# %%
fig, axes = plt.subplots(1, 2, figsize=(15, 4.5), layout="constrained", width_ratios=(3, 1))
for name, color, marker in zip(SMALL_ARMS, ("C0", "C1", "C4", "C2", "C3", "C5"), "osv^Dx"):
    v = np.stack([small[b, name] for b in BATCHES], 1)
    axes[0].plot(BATCHES, v.mean(0), marker=marker, color=color, label=name)
    axes[0].fill_between(BATCHES, v.min(0), v.max(0), color=color, alpha=0.12)
axes[0].set_xscale("log", base=2)
axes[0].set_xticks(BATCHES, [str(b) for b in BATCHES])
axes[0].minorticks_off()
axes[0].set(xlabel="batch size", ylabel="held-out accuracy", ylim=(0, 1))
axes[0].set_title(f"small batches, {SMALL_EPOCHS} epochs each (mean, band: range over seeds)")
axes[0].legend(loc="lower right")
names128 = ["BN", "ghost BN (16)"]
for k, name in enumerate(names128):
    v = small[128, name]
    axes[1].bar(k, v.mean(), color="C1" if k == 0 else "C2", alpha=0.6)
    axes[1].plot(np.full(len(v), k), v, "k.", ms=6)
axes[1].set_xticks(range(2), names128)
axes[1].set(ylabel="held-out accuracy (bar: mean; dots: seeds)", ylim=(0.8, 1.0))
axes[1].set_title("batch 128: ghost batch norm")
for ax in axes:
    ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# **What it shows** (the numbers are printed above; "detected" is the paired t over
# the seeds beyond the printed threshold, two-sided 5%).
#
# - *Where batch norm starts to fail*: at a batch of 16 no difference from the plain
#   network is detected; at 32 and at 8 batch norm is lower on average, detected on
#   some seed sets and not on others (the table); at 4 it is lower, detected (by the
#   printed amount); and at 2 it breaks training, not only evaluation. Normalizing over two
#   values maps every feature to about -1 or +1, so the network learns from the sign
#   of each feature relative to its batch partner.
# - *Wu and Johnson's evaluation remedies* mend little: population statistics
#   (PreciseBN) are never detectably worse than the running ones and gain a little on
#   average (the table; detected at some batch sizes on some seed sets), far from mending a batch of 2; the unbiased running variance gains
#   nothing detected (at 2 it is worse on some seed sets); and evaluating with batch
#   statistics of the training size, as in training, is worse at every size below 32
#   (the statistics of a few held-out digits are as noisy as the training batches').
#   The damage at 2 is in the weights, not the statistics.
# - *Batch renormalization*, which changes training, recovers part of the loss at a
#   batch of 2, and from 4 up gains nothing detected (it is slightly lower at some
#   sizes, printed).
# - *At a large batch*, ghost batches of 16 are not worse than plain batch norm on
#   this small problem (slightly better on average; detected on some seed sets).
#
# So from a batch of about 8 down the remedy is more data per normalization, not a
# correction: normalize over the global batch across devices (`axis_name`, notebook
# 03), or use a normalization that does not depend on the batch.

# %% [markdown]
# ## Verdicts
#
# | claim in the notes | verdict | holds when | fails when | literature |
# | --- | --- | --- | --- | --- |
# | 1. robust to poor initialization | partly, mostly with SGD | weights too small, trained with SGD: the plain net's forward pass dies and no learning rate saves it (§2) | with Adam the plain net trains from tiny weights too, far above chance though below batch norm on average and unreliably across seeds; weights too large: both lose against He's scale, tuned; batch norm's chosen rate barely moves with the gain, so the sweep does not show the initial scale acting as an inverse learning rate (§2) | van Laarhoven 2017; Arora, Li and Lyu 2019 |
# | 2. less overfitting | weakly, and mostly not through noise | the held-out loss ends lower, by as much as weight decay lowers it or more, and batch norm with noise-free statistics keeps most of that reduction (§5) | accuracy: every net memorizes the training set, and batch norm's held-out accuracy gain is small, detected on some seed sets only (§5); whether noise adds to the reduction is not resolved | Ioffe and Szegedy 2015; Luo et al. 2019 |
# | 3. no vanishing/exploding gradients | at moderate depth, or with skips | 12 layers: flat gradients at any scale, and the sigmoid net's forward collapse undone (§3a) | deep plain nets: batch norm makes gradients explode at init, about 1.21x per layer for ReLU; a 40-layer plain ReLU net does not train in this budget at any rate tried, with or without batch norm (§3b) | Yang et al. 2019; De and Smith 2020 |
#
# And what the notes do not claim:
#
# - *What batch norm buys most, on this evidence*: learning rates larger than a
#   He-initialized plain network on standardized inputs tolerates (§1; Bjorck et al.
#   2018); not a wider range below it, and at the optimum a small gain at most
#   (paired, detected on some seed sets only).
# - *A more predictable landscape* (Santurkar et al. 2018), weakly (§4): per unit of
#   promised decrease, batch norm's loss departs less from the gradient's first-order
#   prediction along the step (detected); its gradient change per unit step is lower
#   on average, detected on some seed sets only.
# - *The paper's Figure 1 reproduces* (§6): stable input distributions and faster
#   training come together; but noisy batch norm, whose inputs move at every step,
#   trains as fast, so the stability is not the cause (Santurkar et al. 2018).
# - *Small batches* (§7): no difference from the plain net is detected at 16; at 32
#   and 8 batch norm is lower on average (detected on some seed sets), at 4 lower
#   (detected), and at 2 it breaks; renormalization (Ioffe 2017) mends part of that at
#   2, the evaluation remedies (population or unbiased statistics, batch statistics;
#   Wu and Johnson 2021) little or nothing.
#
# References: Ioffe and Szegedy 2015, "Batch Normalization: Accelerating Deep Network
# Training by Reducing Internal Covariate Shift"; Ioffe 2017, "Batch Renormalization";
# van Laarhoven 2017, "L2 Regularization versus Batch and Weight Normalization"; Hoffer,
# Hubara and Soudry 2017, "Train Longer, Generalize Better"; Bjorck, Gomes, Selman and
# Weinberger 2018, "Understanding Batch Normalization"; Santurkar, Tsipras, Ilyas and
# Madry 2018, "How Does Batch Normalization Help Optimization?"; Arora, Li and Lyu 2019,
# "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization"; Luo, Wang, Shao and
# Peng 2019, "Towards Understanding Regularization in Batch Normalization"; Yang,
# Pennington, Rao, Sohl-Dickstein and Schoenholz 2019, "A Mean Field Theory of Batch
# Normalization"; Zhang, Dauphin and Ma 2019, "Fixup Initialization"; De and Smith 2020,
# "Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep
# Networks"; Wu and Johnson 2021, "Rethinking 'Batch' in BatchNorm".

# %% [markdown]
# The statements above, checked each time the notebook runs, with these margins. Every
# arm of an experiment shares each seed's initial weights and batch order, so arms are
# compared seed by seed: "A is higher than B" (*detected*) means the mean of the paired
# differences exceeds `T975` standard errors, Student's t for a two-sided test at 5%
# with `n - 1` degrees of freedom (printed with the first table that uses it; 2.78 for
# 5 seeds, not 2); "no difference detected" means it is within `T975` standard errors
# or one evaluation digit (the resolution, for seeds that all tie), which says that
# the seeds lack the power to tell, not that the difference is 0; "on every seed"
# compares seeds one by one. Where a difference is detected on some seed sets and not
# on others, only its direction ("not lower") is asserted, and the prose says so.
# They were checked with `SEEDS` shifted by 0, 1000, 2000 and 3000.


# %%
TEST_DIGIT, HELD_DIGIT = 1 / len(X_test), 1 / len(X_held)
# §1: upward, BN trains at least one grid step (sqrt(10)) beyond the plain net, and
# where every plain seed diverges; it fails at the largest rate without a NaN
pl, bn = lr_range(sweep, False, J_HE), lr_range(sweep, True, J_HE)
assert bn.max() >= pl.max() + 1, (LRS[pl], LRS[bn])
both = sweep[False]["diverged"][:, J_HE].all(0) & (sweep[True]["val"][:, J_HE] >= 0.9).all(0)
assert both.any()
assert not sweep[True]["diverged"][:, J_HE].any() and (sweep[True]["val"][:, J_HE, -1] < 0.5).all()
# ... downward, no gain: BN's range starts no lower, and it is not higher at the lowest rate
assert bn.min() >= pl.min()
assert not higher(sweep[True]["test"][:, J_HE, 0], sweep[False]["test"][:, J_HE, 0])
# ... at their chosen rates the plain net is not higher (BN's small gain is detected
# on some seed sets only); the plain net's chosen rate is inside the grid
(k_pl, a_pl), (k_bn, a_bn) = chosen(sweep, False, J_HE), chosen(sweep, True, J_HE)
assert not higher(a_pl, a_bn) and 0 < k_pl < len(LRS) - 1, (a_bn, a_pl, k_pl)
# §2: SGD from tiny weights: the plain net stays near chance (0.1: every seed under
# 0.2), and BN's accuracy shows no difference detected from its He accuracy
assert (best["SGD", False, 0.01][1] < 0.2).all()
assert agree(best["SGD", True, 0.01][1], best["SGD", True, 1.0][1], TEST_DIGIT)
# ... with Adam the plain net trains from tiny weights, far above chance on every seed
# (above 0.3, three times chance: its narrow optimum makes some seeds end near 0.5),
# and is not higher than BN there
assert (best["Adam", False, 0.01][1] > 0.3).all(), best["Adam", False, 0.01]
assert not higher(best["Adam", False, 0.01][1], best["Adam", True, 0.01][1])
# ... large weights: both lose against He's scale with SGD (detected); the plain net is
# not higher than BN at gain 10 with either optimizer; BN's chosen SGD rate does not
# fall with the gain (it rises by at most a grid step, printed)
for b in (False, True):
    assert higher(best["SGD", b, 1.0][1], best["SGD", b, 10.0][1]), b
for opt_name in ("SGD", "Adam"):
    assert not higher(best[opt_name, False, 10.0][1], best[opt_name, True, 10.0][1]), opt_name
assert best["SGD", True, 10.0][0] >= best["SGD", True, 1.0][0]
k10 = int(np.argmax(sweep[False]["val"][:, list(GAINS).index(10.0)].mean(0)))
assert 0 < k10 < len(LRS) - 1, LRS[k10]  # the plain net's optimum inside the grid
# §3a: without BN the sigmoid net vanishes and its forward spread collapses; BN is flat
assert (ratio(("sigmoid", "1/sqrt(64)", False)) > 1e5).all()
assert (ratio(("tanh", "1", False)) > 1e2).all()
assert (ratio(("tanh", "1/sqrt(64)", False)) < 5).all()
assert all((ratio(key) < 5).all() for key in at_init if key[2])
spread = at_init["sigmoid", "1/sqrt(64)", False]["spread"]
assert (spread[:, -1] < 1e-3 * spread[:, 0]).all()
# §3b: BN explodes in plain nets at the mean-field rate (within the seeds' range of
# per-layer rates, widened by 1%); skips tame it; no BN is flat
relu_bn = ratios[ARMS.index((True, True, False))]
theory = np.sqrt(np.pi / (np.pi - 1))
per_seed = np.exp(np.log(relu_bn[-1]) / (DEPTHS[-1] - 1))
assert (relu_bn[-1] > 1e4).all() and 0.99 * per_seed.min() < theory < 1.01 * per_seed.max()
assert (ratios[ARMS.index((True, True, True)), -1] < 1e-2 * relu_bn[-1]).all()
assert (ratios[ARMS.index((True, False, False))] < 10).all()
assert (ratios[ARMS.index((False, True, False)), -1] > 1e2).all()
# ... training at depth 40: plain ReLU fails with and without BN at every rate tried;
# BN with skips trains far better than either; skips without BN diverge at every rate
acc_of = {arm: deep_acc[a] for a, arm in enumerate(DEEP_ARMS)}
for arm in ((True, False, False), (True, True, False)):
    assert deep_test[DEEP_ARMS.index(arm)].mean(1).max() < 0.5, arm
    assert higher(acc_of[True, True, True], acc_of[arm]), arm
assert deep_nan[DEEP_ARMS.index((True, False, True))].all()
# §4: with BN the gradient is larger (BN lower in under half the (seed, step) pairs);
# the first-order error is lower with BN in most pairs and detected lower, paired over
# the seeds on the log of each seed's median; the gradient change per unit step is not
# detectably higher with BN
med = {n: {k: np.log(np.median(r[k], 1)) for k in lower} for n, r in land.items()}
assert lower["grad_norm"].mean() < 0.5, lower["grad_norm"].mean()
assert lower["first_order"].mean() > 0.5, lower["first_order"].mean()
assert higher(med["without BN"]["first_order"], med["with BN"]["first_order"])
assert not higher(med["with BN"]["change"], med["without BN"]["change"])
# ... noisy BN trains (its loss falls tenfold) and its gradient is not detectably
# less predictive than BN's
noisy = land["noisy BN"]
assert (noisy["loss"][:, -20:].mean(1) < 0.1 * noisy["loss"][:, :5].mean(1)).all()
assert not higher(med["noisy BN"]["change"], med["with BN"]["change"])
# §5: every net memorizes; BN's held-out accuracy is not lower; BN's held-out loss is
# lower (detected), not detectably above weight decay's, and noise-free statistics
# also end lower than no BN (detected) and not detectably below BN; no reduction from
# dropout is detected
final = {n: (tr[:, -1], va[:, -1], vl[:, -1]) for n, (tr, va, vl) in overfit.items()}
assert all((v[0] > 0.999).all() for v in final.values())
assert not higher(final["without BN"][1], final["with BN"][1])
assert higher(final["without BN"][2], final["with BN"][2])
assert higher(final["without BN"][2], final["weight decay"][2])
assert not higher(final["with BN"][2], final["weight decay"][2])
assert higher(final["without BN"][2], final["BN, noise-free statistics"][2])
assert not higher(final["with BN"][2], final["BN, noise-free statistics"][2])
# ... "most" of the reduction: the share kept, a point estimate of the paired means
share = (
    paired(final["without BN"][2], final["BN, noise-free statistics"][2])[0]
    / paired(final["without BN"][2], final["with BN"][2])[0]
)
assert share > 0.5, share
assert not higher(final["without BN"][2], final["dropout"][2])
# §6: with BN the unit's input moves less, on every seed, and accuracy comes sooner;
# noisy BN's moves more than BN's, on every seed, and its accuracy comes as soon
assert moved["with BN"][0].max() < moved["without BN"][0].min()
assert moved["with BN"][1].max() < moved["without BN"][1].min()
assert moved["noisy BN"][1].min() > moved["with BN"][1].max()
assert first_09["with BN"].max() < first_09["without BN"].min()
assert first_09["noisy BN"].max() < first_09["without BN"].min()
# §7: at batch 2 BN breaks training, and no evaluation remedy mends it; at 4 no BN is
# higher (detected); at 8 and 32 BN is not higher; at 16 no difference is detected
for name in SMALL_ARMS[1:]:
    assert higher(small[2, "no BN"], small[2, name]), name
assert higher(small[4, "no BN"], small[4, "BN"])
for b in (8, 32):
    assert not higher(small[b, "BN"], small[b, "no BN"]), b
assert agree(small[16, "BN"], small[16, "no BN"], HELD_DIGIT)
# ... population statistics never detectably worse than the running ones; batch
# statistics worse below 32; renorm gains at 2 and not from 4 up; ghost BN not worse
for b in BATCHES:
    assert not higher(small[b, "BN"], small[b, "BN, population stats"]), b
for b in BATCHES[:-1]:
    assert higher(small[b, "BN"], small[b, "BN, batch statistics"]), b
assert higher(small[2, "BN, renorm"], small[2, "BN"])
assert not any(higher(small[b, "BN, renorm"], small[b, "BN"]) for b in BATCHES[1:])
assert not higher(small[128, "BN"], small[128, "ghost BN (16)"])
print(f"all checks passed; the notebook ran in {time.perf_counter() - T_START:.0f} s")
