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
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Deploying a batch-norm CNN: population statistics and folding
#
# Two things happen to a batch-norm network between training and serving:
#
# 1. **Its running statistics may be recomputed** over the training set with the final
#    weights: the *population statistics* that Ioffe & Szegedy (2015, "Batch
#    Normalization", section 3.1) prescribe for inference, as averages over many
#    mini-batches, and that PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in
#    BatchNorm") and PyTorch's `torch.optim.swa_utils.update_bn` compute after
#    training. `jaxbn.population_stats` computes the mean and variance of all inputs
#    exactly, merging every batch's count, mean and variance in float64. The running averages
#    that training leaves behind are an exponential moving average (EMA) instead, and
#    they differ from the population statistics for two separate reasons: the EMA
#    *starts* at the values of `jaxbn.init_state` (mean 0, variance 1), and it averages
#    statistics of *older weights*.
# 2. **Each batch norm is folded into the convolution before it**: in evaluation it is
#    a fixed per-channel affine map, so `conv(x, w) -> BN` equals one convolution with
#    the kernel scaled per output channel and a bias. `jaxbn.fold_batch_norm` returns
#    them; the network then runs without batch norm at all.
#
# The first part measures how much each of the two reasons costs, over the seeds of
# `SEEDS` (the `parameters` cell below). We
# use the CNN of `python -m jaxbn demo` at half its width (to keep the notebook quick)
# on scikit-learn's digits, written out in the next cell: three 3x3 convolutions with
# 8, 16 and 32 channels, each followed by `jaxbn.batch_norm` and a relu, then a global
# average and a linear head. A list passed as `bn_inputs` receives each batch norm's
# input, for `jaxbn.population_stats`.

# %%
import time
import types

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
    w = jax.random.normal(keys[-1], (c_in * num_classes,)).reshape(c_in, num_classes)
    params.append({"w": w * np.sqrt(1 / c_in), "b": jnp.zeros(num_classes)})
    return params, tuple(state)


def apply_cnn(params, state, x, *, training, bn_inputs=None):
    """Logits of NHWC images (N, 8, 8, 1) and the new running statistics.

    Layers with {"w", "b"} are plain convolutions with a bias (the folded network).
    """
    new_state, h = [], x
    for i, layer in enumerate(params[:-1]):
        stride = 1 if i == 0 else 2
        h = lax.conv_general_dilated(
            h, layer["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        if "gamma" in layer:
            if bn_inputs is not None:
                bn_inputs.append(h)
            h, s = jaxbn.batch_norm(
                h, layer["gamma"], layer["beta"], state[i], training=training, momentum=MOMENTUM
            )
            new_state.append(s)
        else:
            h = h + layer["b"]
        h = jax.nn.relu(h)
    h = jnp.mean(h, axis=(1, 2))
    return h @ params[-1]["w"] + params[-1]["b"][None, :], tuple(new_state)


data = load_digits_split()
x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
print(f"train {x_train.shape}, test {x_test.shape}")

# %% [markdown]
# ## Running, corrected and population statistics during training
#
# Each seed (initial weights and batch order) trains with SGD and a large learning
# rate, batches of `BATCH`, for `STEPS` steps, all seeds at once (`jax.vmap` over the seeds of a `lax.scan` over the
# steps). At a few checkpoints we keep the weights and the running statistics, and
# evaluate the test accuracy in evaluation mode with four sets of statistics:
#
# 1. **EMA**: the running statistics as training left them (`momentum=MOMENTUM`, the
#    weight on the old value, so `m_t = MOMENTUM m_(t-1) + (1 - MOMENTUM) batch_t`;
#    `MOMENTUM` is set in the `parameters` cell, 0.9 by default, and reaches every
#    `jaxbn.batch_norm` of the network and the correction below).
# 2. **EMA, bias-corrected**: after `t = state.count` updates from `m_0 = 0`, the EMA's
#    weights on the batches sum to `1 - MOMENTUM**t`, and `MOMENTUM**t` is left on the
#    start. As Adam does for its moment estimates (Kingma & Ba 2015, "Adam: A Method
#    for Stochastic Optimization", section 3), divide it out:
#    `mean_hat = m_t / (1 - MOMENTUM**t)` and, since the variance starts at 1,
#    `var_hat = (v_t - MOMENTUM**t) / (1 - MOMENTUM**t)`. This removes the start-up bias and
#    nothing else: it still averages the statistics of the weights of earlier steps.
# 3. **EMA replayed with the current weights**: the same batches, the same EMA and the
#    same correction, but every batch's statistics computed with the checkpoint's
#    weights. It differs from 2 only in the weights, so 2 vs 3 is the *lag* behind
#    moving weights; 3 vs 4 is what remains: the noise of an average of few batches
#    (and the spread of the batch means, which per-batch variances leave out).
# 4. **Population**: `jaxbn.population_stats` over the whole training set with the
#    checkpoint's weights.
#
# The features each batch norm sees are collected in training mode
# (`apply_cnn(..., bn_inputs=list)`), the convention of PreciseBN: later layers see
# earlier layers normalized with batch statistics, as during training. The replay
# (3) does the same through `jaxbn.batch_norm` itself.

# %% tags=["parameters"]
# seeds (initial weights and batch order), steps, batch size and the EMA's momentum;
# papermill can set them (-p SEEDS "[5, 6, 7, 8, 9]")
SEEDS = [0, 1, 2, 3, 4]
STEPS, BATCH, MOMENTUM = 160, 32, 0.9

# %%
CHECKPOINTS = np.array([t for t in (1, 2, 3, 5, 10, 20, 40, 80, 160) if t < STEPS] + [STEPS])
optimizer = optax.sgd(0.1, momentum=0.9)
order = np.stack([batch_indices(len(x_train), BATCH, STEPS, s) for s in SEEDS])


def loss_fn(params, state, x, y):
    logits, new_state = apply_cnn(params, state, x, training=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state


def train(key, idx):
    """The (params, state) after each step in CHECKPOINTS of a run over batches idx."""

    def step(carry, batch):
        params, state, opt_state = carry
        (_, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, x_train[batch], y_train[batch]
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, state, opt_state), (params, state)

    params, state = init_cnn(key)
    _, after_each_step = lax.scan(step, (params, state, optimizer.init(params)), idx)
    return jax.tree.map(lambda a: a[CHECKPOINTS - 1], after_each_step)


keys = jnp.stack([jax.random.key(s) for s in SEEDS])
trained = jax.jit(jax.vmap(train))(keys, order)  # leaves (seed, checkpoint, ...)
# from here on, the seeds x checkpoints networks are stacked on one axis: network k is
# seed k // len(CHECKPOINTS) at step CHECKPOINTS[k % len(CHECKPOINTS)]
params_k, ema_k = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), trained)
order_k = np.repeat(order, len(CHECKPOINTS), axis=0)  # the batches of network k's run
t_k = np.tile(CHECKPOINTS, len(SEEDS))
print("state.count of the first seed's checkpoints:", ema_k[0].count[: len(CHECKPOINTS)])

# %% [markdown]
# The four sets of statistics, for all the networks at once. `jaxbn.population_stats`
# takes the feature axes of what `fn` returns: with the networks stacked on axis 0,
# `axis=(0, -1)` gives each network its own statistics, in one pass over the
# training set (in chunks, merged exactly; their sizes are printed).


# %%
def fresh_state(params):
    """init_state for each batch norm of a network (what training starts from)."""
    return tuple(jaxbn.init_state(len(layer["gamma"])) for layer in params[:-1])


def bias_corrected(s, momentum=MOMENTUM):
    """BatchNormState s without its EMA's start at init_state (mean 0, var 1)."""
    start = (momentum ** s.count.astype(jnp.float32))[..., None]  # the weight left on it
    return s._replace(mean=s.mean / (1 - start), var=(s.var - start) / (1 - start))


@jax.jit
def replayed(params_k, order_k, t_k):
    """Each network's EMA over the first t batches of its run, computed with its weights."""

    def one(args):
        params, idx, t = args

        def update(state, i):  # the batch-norm update of training step i, weights fixed
            _, new = apply_cnn(params, state, x_train[idx[i]], training=True)
            return jax.tree.map(lambda n, o: jnp.where(i < t, n, o), new, state), None

        return lax.scan(update, fresh_state(params), jnp.arange(STEPS))[0]

    return lax.map(one, (params_k, order_k, t_k))


def bn_inputs(params, x):
    """Each batch norm's input, in training mode."""
    captured = []
    apply_cnn(params, fresh_state(params), x, training=True, bn_inputs=captured)
    return captured


bn_inputs_k = jax.jit(lambda params_k, x: lax.map(lambda p: bn_inputs(p, x), params_k))
chunks = np.split(np.asarray(x_train), 3)
print(
    f"{len(SEEDS)} seeds {SEEDS}, {STEPS} steps of {BATCH}, momentum {MOMENTUM}; chunks",
    [len(c) for c in chunks],
)
population_k = jaxbn.population_stats(lambda b: bn_inputs_k(params_k, b), chunks, axis=(0, -1))

STATS = {
    "EMA": ema_k,
    "EMA, bias-corrected": tuple(bias_corrected(s) for s in ema_k),
    "EMA replayed, current weights": tuple(
        bias_corrected(s) for s in replayed(params_k, order_k, t_k)
    ),
    # count: the number of chunks merged, one per network like the other fields
    "population": tuple(
        p._replace(count=jnp.broadcast_to(p.count, len(t_k))) for p in population_k
    ),
}


@jax.jit
def accuracy_k(params_k, state_k):
    """Test accuracy in evaluation mode of each network, with its statistics."""

    def one(args):
        params, state = args
        logits, _ = apply_cnn(params, state, x_test, training=False)
        return jnp.mean(jnp.argmax(logits, -1) == y_test)

    return lax.map(one, (params_k, state_k))


def distance(stats, ref):
    """Per network: |log(var / ref.var)|, averaged over the channels of all layers."""
    d = [np.abs(np.log(np.asarray(s.var) / np.asarray(r.var))) for s, r in zip(stats, ref)]
    return np.concatenate(d, axis=1).mean(1)


def per_seed(v):
    return np.asarray(v).reshape(len(SEEDS), len(CHECKPOINTS))


acc = {n: per_seed(accuracy_k(params_k, s)) for n, s in STATS.items()}
dist = {n: per_seed(distance(s, STATS["population"])) for n, s in STATS.items()}

print(f"test accuracy, mean ± std over {len(SEEDS)} seeds")
print(f"{'step':>5}" + "".join(f"{n:>31}" for n in STATS))
for j, t in enumerate(CHECKPOINTS):
    row = [f"{a[:, j].mean():.3f} ± {a[:, j].std(ddof=1):.3f}" for a in acc.values()]
    print(f"{t:>5}" + "".join(f"{c:>31}" for c in row))

# %% [markdown]
# Each arm differs from the next in one thing, so paired differences (same seed,
# same step) measure one effect each: the start-up bias (2 minus 1), the lag behind
# moving weights (3 minus 2) and the noise of averaging few batches (4 minus 3). Below,
# as mean ± std over the seeds, with the range; then the statistics themselves: how
# far each arm's variances are from the population's (`|log(var / var_pop)|`,
# averaged over all channels; 0.1 is about 10 percent).

# %%
EFFECTS = {
    "start-up bias (bias-corrected - EMA)": ("EMA, bias-corrected", "EMA"),
    "lag (replayed - bias-corrected)": ("EMA replayed, current weights", "EMA, bias-corrected"),
    "noise (population - replayed)": ("population", "EMA replayed, current weights"),
}
effect = {e: acc[a] - acc[b] for e, (a, b) in EFFECTS.items()}


def spread(v):
    return f"{v.mean():+.3f} ± {v.std(ddof=1):.3f} [{v.min():+.3f}, {v.max():+.3f}]"


print("test accuracy gained, mean ± std over seeds [min, max]")
print(f"{'step':>5}" + "".join(f"{e:>40}" for e in EFFECTS))
for j, t in enumerate(CHECKPOINTS):
    print(f"{t:>5}" + "".join(f"{spread(d[:, j]):>40}" for d in effect.values()))
ratio = dist["EMA, bias-corrected"] / dist["EMA replayed, current weights"]
print("\ncorrected EMA's distance / replayed EMA's, per checkpoint: min over seeds, mean")
print(f"{'step':>5}{'min':>8}{'mean':>8}")
for j, t in enumerate(CHECKPOINTS):
    print(f"{t:>5}{ratio[:, j].min():8.2f}{ratio[:, j].mean():8.2f}")
print("\n|log(var / var_pop)|, mean over seeds")
print(f"{'step':>5}" + "".join(f"{n:>31}" for n in list(STATS)[:3]))
for j, t in enumerate(CHECKPOINTS):
    print(f"{t:>5}" + "".join(f"{dist[n][:, j].mean():31.3f}" for n in list(STATS)[:3]))

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
for n, a in acc.items():
    axes[0].plot(CHECKPOINTS, a.mean(0), "o-", ms=3, label=n)
    axes[0].fill_between(CHECKPOINTS, a.min(0), a.max(0), alpha=0.15)
axes[0].set(
    ylabel="test accuracy, eval mode", title=f"accuracy: mean of {len(SEEDS)} seeds, min-max band"
)
for e, d in effect.items():
    m, sd = d.mean(0), d.std(0, ddof=1)
    axes[1].plot(CHECKPOINTS, m, "o-", ms=3, label=e)
    axes[1].fill_between(CHECKPOINTS, m - sd, m + sd, alpha=0.2)
axes[1].axhline(0, color="k", lw=0.8)
axes[1].set(ylabel="test accuracy gained", title="paired differences: mean ± std over seeds")
for n in list(STATS)[:3]:
    axes[2].plot(CHECKPOINTS, dist[n].mean(0), "o-", ms=3, label=n)
    axes[2].fill_between(CHECKPOINTS, dist[n].min(0), dist[n].max(0), alpha=0.15)
axes[2].set(
    yscale="log",
    ylabel="|log(var / var_pop)|, mean over channels",
    title="distance from the population variances",
)
for ax in axes:
    ax.set(xscale="log", xlabel="training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# **What the run shows.** The measurements separate the two reasons the EMA differs
# from the population statistics.
#
# - *Start-up bias.* After `t` updates the EMA still puts a weight `MOMENTUM**t` on the
#   `init_state` values, and in the first steps that is most of it: at the first
#   checkpoints the EMA's variances are several times farther from the population's
#   than the bias-corrected ones (right panel). In accuracy, the correction recovers
#   most of what recomputing the statistics gains at steps 3 to 10, on average over the
#   seeds (the first column of paired differences; its spread across seeds is large,
#   and whether the gain is detected with this many seeds is printed below).
#   In the very first steps no set of statistics helps: the network is still near
#   chance. From a few tens of steps on, `MOMENTUM**t` is negligible (at 0.9) and the correction
#   changes nothing.
# - *Lag behind moving weights.* What remains after the correction is lag: the EMA
#   replayed with the current weights (same batches, same averaging) is more accurate
#   than the corrected EMA from step 5 on, in every seed on average over those
#   checkpoints (the second column of paired differences; where it is largest moves
#   with the seeds, so it is not claimed).
#   In the statistics it lasts to the end of this run at a constant, large learning
#   rate: once the start is forgotten, the corrected EMA's variances are as far from
#   the population's as the uncorrected ones, and farther than the replayed EMA's at
#   every checkpoint from step 5 on, in every seed; by how much (the ratio printed
#   above) moves with the seeds, most at the checkpoints where the weights move
#   fastest.
# - *Noise.* The replayed EMA and the population statistics give the same accuracy
#   within test-set noise: paired by seed, no difference is detected at any
#   checkpoint (with Bonferroni's correction for their number), although the replayed
#   variances, an average over few batches, stay a little off (their distance stops
#   falling). With this many seeds that bounds the difference by the printed spread,
#   it does not show it to be zero.
#
# So the large early gap between the running statistics and `jaxbn.population_stats`
# is mostly the EMA's start, which a bias correction from the public state
# (`state.count` and the momentum) removes at no cost; population statistics
# (Ioffe & Szegedy 2015; PreciseBN) also remove the lag, which is what matters later.
# With Flax's default `momentum=0.99` both effects would last longer, by arithmetic
# alone: the start decays as `0.99**t`, and the EMA averages over about
# `1 / (1 - momentum)` steps of weights (both printed below, next to this run's
# `MOMENTUM`). That is not measured here; to measure it, set `MOMENTUM = 0.99` in the
# `parameters` cell, which reaches every batch norm and the correction (the
# assertions below were written for this run's momentum, 0.9). The bias correction
# assumes that the state started at `init_state` and was updated with one constant
# momentum, as here.
#
# The assertions keep this text honest; each margin is derived beside it, paired by
# seed where the arms share one (they all do: the same networks, other statistics).

# %%
BIAS, LAG, NOISE = EFFECTS
n = len(SEEDS)
T975 = scipy.stats.t.ppf(0.975, n - 1)  # paired t over the seeds, two-sided 5%
IMAGE = 1 / len(y_test)  # one test image: the accuracy's resolution
early, later = np.isin(CHECKPOINTS, [3, 5, 10]), CHECKPOINTS >= 5
# start-up bias (that the corrected variances are far closer at the first checkpoints,
# and that the correction changes nothing once MOMENTUM**t is negligible, follow from
# the arithmetic of MOMENTUM**t and are not asserted): in the first two steps the
# network is near chance (0.1) with any statistics: every mean accuracy below 0.25
assert max(a[:, CHECKPOINTS <= 2].mean(0).max() for a in acc.values()) < 0.25
# ... and the correction gains accuracy at steps 3 to 10 on average over the seeds
# (per seed, the mean gain over those checkpoints), most (more than half) of what the
# population statistics gain over the EMA there: a point estimate, whose paired t is
# printed (its spread across seeds is large, and with this many seeds it is detected
# on some seed sets only)
bias_early = effect[BIAS][:, early].mean(1)
t_bias = bias_early.mean() / (np.std(bias_early, ddof=1) / np.sqrt(n))
gain = acc["population"] - acc["EMA"]
print(
    f"bias correction, steps 3-10: gain {bias_early.mean():+.3f} (paired t {t_bias:.1f}: "
    f"{'detected' if t_bias > T975 else 'not detected'} at threshold {T975:.2f}), "
    f"{bias_early.mean() / gain[:, early].mean():.0%} of population's"
)
assert bias_early.mean() > 0.5 * gain[:, early].mean() > 0, (bias_early, gain[:, early])
# lag: with the current weights, better from step 5 on in every seed (the mean over
# those checkpoints above 2 test images, 0.0044, so that no tie counts)
assert effect[LAG][:, later].mean(1).min() > 2 * IMAGE, effect[LAG][:, later].mean(1)
# ... and in the statistics: the corrected EMA's variances farther from the
# population's than the replayed EMA's at every checkpoint from step 5, in every seed
assert ratio[:, later].min() > 1, ratio
# noise: no difference detected between population and replayed EMA at any
# checkpoint: |mean| within T_ALL paired standard errors (Bonferroni over the
# checkpoints, so that the family keeps its 5%), or one test image
T_ALL = scipy.stats.t.ppf(1 - 0.025 / len(CHECKPOINTS), n - 1)
noise_se = np.std(effect[NOISE], 0, ddof=1) / np.sqrt(n)
print(
    f"noise: largest |mean| / (T_ALL se + one image) over the checkpoints "
    f"{np.max(np.abs(effect[NOISE].mean(0)) / (T_ALL * noise_se + IMAGE)):.2f} (must be < 1)"
)
assert np.all(np.abs(effect[NOISE].mean(0)) <= T_ALL * noise_se + IMAGE), effect[NOISE].mean(0)
for m in sorted({MOMENTUM, 0.99}):
    print(f"momentum {m}: weight on the start after 100 updates {m**100:.1e},", end=" ")
    print(f"averaging window 1 / (1 - momentum) = {1 / (1 - m):.0f} steps")

# %% [markdown]
# The population statistics are exact: for the first batch norm they equal NumPy's
# float64 statistics of all its inputs at once. Checked in float64 (the network, its
# features and `population_stats(..., dtype=jnp.float64)`), where rounding cannot hide
# a difference: in float32 the features themselves round differently inside and
# outside `population_stats`'s program, by about 1e-7, which is no test of the merge.
# Here for the network of the first seed after the last step, which the rest of the
# notebook deploys.

# %%
k = len(CHECKPOINTS) - 1  # the first seed, last step
params = jax.tree.map(lambda a: a[k], params_k)
population = tuple(jaxbn.BatchNormState(p.mean[k], p.var[k], p.count) for p in population_k)
as64 = lambda t: jax.tree.map(
    lambda a: np.asarray(a, np.float64) if a.dtype == np.float32 else a, t
)  # noqa: E731
with jax.enable_x64(True):
    first_inputs = jax.jit(lambda b: bn_inputs(as64(params), b)[0])
    chunks64 = [np.asarray(c, np.float64) for c in chunks]
    first = np.concatenate([np.asarray(first_inputs(c)) for c in chunks64])
    got = jaxbn.population_stats(first_inputs, chunks64, dtype=jnp.float64)
    got_mean, got_var = np.asarray(got.mean), np.asarray(got.var)
want_mean, want_var = first.mean((0, 1, 2)), first.var((0, 1, 2))
err = max(
    np.abs(got_var - want_var).max() / want_var.max(),
    np.abs(got_mean - want_mean).max() / np.abs(want_mean).max(),
)
print(f"float64: largest relative error of the first layer's mean and variance vs NumPy: {err:.1e}")
# float64 unit roundoff 1.1e-16; merging 3 chunks' (count, mean, M2) exactly in
# arithmetic, each a sum of 449 x 8 x 8 = 28736 values: a sum of n terms is off by at
# most n u sum|terms| (Higham 4.2), 3.2e-12 of the terms' magnitude, and the variance's
# cancellation (mean^2 against E[x^2], under 10x for these features) makes 3e-11
assert err < 1e-10, err

# %% [markdown]
# ## Folding batch norm into the convolutions
#
# With the final weights and the population statistics, each `conv -> BN` becomes one
# convolution. The folded parameters have the layout of the demo's network *without*
# batch norm (`{"w", "b"}` per layer), so `apply_cnn` runs them with an empty state.


# %%
def fold(params, state):
    folded = []
    for layer, s in zip(params[:-1], state):
        w, b = jaxbn.fold_batch_norm(layer["w"], None, layer["gamma"], layer["beta"], s)
        folded.append({"w": w, "b": b})
    return folded + [params[-1]]


folded = fold(params, population)
eval_bn = jax.jit(lambda p, s, x: apply_cnn(p, s, x, training=False)[0])
logits = eval_bn(params, population, x_test)
logits_folded = eval_bn(folded, (), x_test)
diff = float(jnp.max(jnp.abs(logits - logits_folded)) / jnp.max(jnp.abs(logits)))
same = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(logits_folded, -1)))
print(f"float32: max relative difference of the logits {diff:.1e}; same predictions {same:.0%}")
# the same function? checked in float64, where rounding cannot hide a difference
as64 = lambda t: jax.tree.map(
    lambda a: np.asarray(a, np.float64) if a.dtype == np.float32 else a, t
)  # noqa: E731
with jax.enable_x64(True):
    params64, population64, x64 = as64(params), as64(population), np.asarray(x_test, np.float64)
    logits64 = np.asarray(eval_bn(params64, population64, x64))
    folded64 = np.asarray(eval_bn(fold(params64, population64), (), x64))
diff64 = np.abs(logits64 - folded64).max() / np.abs(logits64).max()
same64 = np.mean(logits64.argmax(-1) == folded64.argmax(-1))
print(f"float64: max relative difference of the logits {diff64:.1e}; same predictions {same64:.0%}")
# no batch norm left in the folded program: eval-mode batch norm has one rsqrt per layer
rsqrts = [
    str(jax.make_jaxpr(eval_bn)(p, s, x_test)).count("rsqrt")
    for p, s in [(params, population), (folded, ())]
]
print(f"rsqrt in the program: conv -> BN {rsqrts[0]}, folded {rsqrts[1]}")
# float64 unit roundoff 1.1e-16; each logit is a chain of three convolutions of at most
# 3 * 3 * 32 = 288 terms, a mean over 64 positions and a head of 32: reordered and
# refactored sums move it by at most about (288 + 64 + 32) u sum|terms| per layer,
# 4e-14 of the terms' magnitude, and a cancellation of 100x gives 1e-11: bound 1e-10
assert diff64 < 1e-10 and same64 == 1.0 and rsqrts == [3, 0], (diff64, same64, rsqrts)


# %%
def interleaved_ms(calls, reps=100):
    """ms per call of each (f, args), the calls alternating so that load drifts hit all."""
    for f, args in calls:
        jax.block_until_ready(f(*args))  # compiled before timing
    times = np.zeros((len(calls), reps))
    for r in range(reps):
        for i, (f, args) in enumerate(calls):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[i, r] = time.perf_counter() - t
    return times * 1e3


names = ["conv -> BN", "folded conv"]
times = interleaved_ms([(eval_bn, (params, population, x_test)), (eval_bn, (folded, (), x_test))])
for n, t in zip(names, times):
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    print(f"{n:<12} median {med:.3f} ms (quartiles {q1:.3f} to {q3:.3f}) over {len(t)} calls")
fig, ax = plt.subplots(figsize=(6, 2.5), layout="constrained")
ax.boxplot(list(times), orientation="horizontal", showfliers=False)
ax.set_yticks([1, 2], names)
ax.set_xlabel(
    f"ms per evaluation of {len(x_test)} test images (CPU; box: quartiles, whiskers: 1.5 IQR)"
)
plt.show()

# %% [markdown]
# The folded network gives the same predictions with no batch norm left: per layer,
# a bias add replaces batch norm's subtract, multiply and add. Whether that is faster
# here, the printed medians and quartiles say; on these tiny 8x8 images the
# convolutions themselves and the dispatch of the call are most of the time, so expect
# a small difference, to be judged against the quartiles on a shared CPU. On large
# activations, where batch norm's extra pass over memory matters, folding removes
# that pass.
#
# The same works for Flax models: `jaxbn.fold_linen(variables, [("Conv_0",
# "BatchNorm_0"), ...])` for a linen variables tree and `jaxbn.fold_nnx(conv, bn)` for
# NNX layers (strided and grouped convolutions included).
