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
# # Batch norm fused with its activation: same training, less memory
#
# In a CNN batch norm is almost always followed by an activation, often after a
# residual add: `z = act(bn(x) + r)`. Written as two ops, the backward of the activation
# writes `dL/dy = dL/dz * act'(y + r)`, an array of `x`'s size, which the batch norm's
# backward then reads twice (once for its two reductions, once for `dL/dx`); and each op
# keeps its own residual for the backward: batch norm keeps `x`, the activation its
# input or a mask of its sign.
#
# `jaxbn.batch_norm_act`, and `activation=` on `jaxbn.linen.BatchNorm`, compute the
# three as one op with a hand-derived backward that does not write `dL/dy`: each pass
# over the data recomputes `dL/dz * act'` on the fly. (On CPU, keeping `x`, the op
# writes `dL/dy` once, as the two ops do: XLA:CPU runs a plain sum faster than a sum
# with a mask inside, so there the fused op buys memory, not time.)
#
# - **Default (keeps `x`).** Without a residual the activation's mask is recomputed from
#   `x` and the per-feature statistics, so the op keeps `x` alone; with a residual it
#   adds one byte per value (the sign of `y + r`).
# - **`inplace=True`** (`leaky_relu` and `identity`, which are invertible): the op keeps
#   only its output `z` (and the residual, which the block keeps anyway), and recovers
#   the normalized input from `z` in the backward, the trade of InPlace-ABN (Rota Bulò,
#   Porzi and Kontschieder, *In-Place Activated BatchNorm for Memory-Optimized Training
#   of DNNs*, CVPR 2018). The next convolution keeps `z` for its own backward anyway, so
#   the normalization then adds no activation-sized buffer of its own.
#
# The forward computation is batch norm's, so training must not change. This notebook
# trains the same small CNN on scikit-learn's digits with batch norm then
# `nn.leaky_relu`, with the fused op and with the fused in-place op (and Flax's own
# `BatchNorm` then `nn.leaky_relu` as a fourth reference), from the same initial
# weights and the same batches, and then measures what each keeps for the backward and
# how long a training step takes.

# %%
import functools
import itertools
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import scipy.stats
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxbn.linen


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


def batch_indices(seed, n, batch_size, steps):
    """(steps, batch_size) indices, a fresh permutation of range(n) each epoch."""
    return np.stack(list(itertools.islice(batches(n, batch_size, steps, seed), steps)))


def median_ms_interleaved(fns, args, reps):
    """Median ms per call of each f(*args), the calls of one round adjacent, after warm-up."""
    for name, f in fns.items():
        jax.block_until_ready(f(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args[name]))
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


data = load_digits_split()
x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
print(f"train {x_train.shape}, test {x_test.shape}")

# %% [markdown]
# ## The model and its four arms
#
# Three 3x3 convolutions without bias (16, 16 and 32 channels; the last with stride 2),
# each followed by batch norm and a leaky relu (slope 0.01), then a global average and
# a linear head. The middle block is residual: its batch norm adds the block's input
# before the activation. Only the normalization-activation step differs between the
# arms; the variables are the same (`Conv_0`, `BatchNorm_0`, ...), so one `init` serves
# all four.

# %% tags=["parameters"]
# seeds (initial weights and batch order; the first also serves the memory and timing
# measurements), batch size, steps, and how often the test set is evaluated; papermill
# can set them (-p SEEDS "[5, 6, 7, 8, 9]")
SEEDS = [0, 1, 2, 3, 4]
BATCH, STEPS, EVERY = 64, 120, 10

# %%
SLOPE = 0.01
ARMS = {
    "a": "jaxbn BatchNorm, then leaky_relu",
    "b": 'jaxbn BatchNorm(activation="leaky_relu")',
    "c": 'jaxbn BatchNorm(activation="leaky_relu", inplace=True)',
    "d": "flax BatchNorm, then leaky_relu",
}
W = max(map(len, ARMS.values()))  # width of the tables' first column


def norm_act(arm, h, residual, train):
    """leaky_relu(batch_norm(h) + residual) as arm `arm` computes it."""
    kw = dict(use_running_average=not train, momentum=0.9)
    if arm in ("a", "d"):
        bn = jaxbn.linen.BatchNorm if arm == "a" else nn.BatchNorm
        h = bn(**kw)(h)
        return nn.leaky_relu(h if residual is None else h + residual, SLOPE)
    fused = jaxbn.linen.BatchNorm(
        **kw, activation="leaky_relu", negative_slope=SLOPE, inplace=arm == "c"
    )
    return fused(h, residual=residual)


class CNN(nn.Module):
    arm: str
    widths: tuple = (16, 16, 32)
    strides: tuple = (1, 1, 2)

    @nn.compact
    def __call__(self, x, train: bool):
        h = x
        for i, (width, stride) in enumerate(zip(self.widths, self.strides)):
            shortcut = h if i == 1 else None  # the middle block is residual
            h = nn.Conv(width, (3, 3), strides=stride, use_bias=False)(h)
            h = norm_act(self.arm, h, shortcut, train)
        return nn.Dense(10)(jnp.mean(h, axis=(1, 2)))


models = {arm: CNN(arm) for arm in ARMS}
optimizer = optax.adam(3e-3)


def loss_fn(arm, params, batch_stats, x, y):
    """Mean cross-entropy of a training batch and the new batch statistics."""
    logits, updates = models[arm].apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates["batch_stats"]


def train_step(arm, carry, x, y):
    """One Adam step; returns the new (params, batch_stats, opt_state) and (loss, grads)."""
    params, batch_stats, opt_state = carry
    (loss, batch_stats), grads = jax.value_and_grad(functools.partial(loss_fn, arm), has_aux=True)(
        params, batch_stats, x, y
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), (loss, grads)


def evaluate(arm, params, batch_stats):
    """Test loss and accuracy in evaluation mode (running statistics)."""
    logits = models[arm].apply({"params": params, "batch_stats": batch_stats}, x_test, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y_test)


def init(seed):
    """(params, batch_stats, opt_state) of one seed, the same for every arm."""
    variables = models["a"].init(jax.random.key(seed), x_train[:2], train=False)
    return variables["params"], variables["batch_stats"], optimizer.init(variables["params"])


shapes = {
    arm: jax.eval_shape(
        functools.partial(m.init, train=False), jax.random.key(SEEDS[0]), x_train[:2]
    )
    for arm, m in models.items()
}
assert all(s == shapes["a"] for s in shapes.values())  # the same variables in every arm
carry0 = init(SEEDS[0])  # the first seed's start and first batch: memory and timings
idx0 = batch_indices(SEEDS[0], len(x_train), BATCH, 1)[0]
xb, yb = x_train[idx0], y_train[idx0]
steps = {
    arm: jax.jit(functools.partial(train_step, arm)).lower(carry0, xb, yb).compile() for arm in ARMS
}
evaluators = {arm: jax.jit(functools.partial(evaluate, arm)) for arm in ARMS}
print(jax.tree.map(jnp.shape, carry0[0]))

# %% [markdown]
# The same forward math, and the same backward: from the same `(params, batch_stats,
# opt_state)` and batch, the four arms' training steps give the same loss, new batch
# statistics and gradients (the fused ones from jaxbn's hand-derived backward, the
# others from batch norm's backward followed by autodiff of the activation and the
# add). Compared in float64, where rounding cannot hide a real difference: float32
# rounding differs between the arms by design (the in-place backward recovers the
# normalized input from `z` and loses bits doing so, as jaxbn's documentation derives),
# so a float32 comparison would need a bound for each arm's rounding path. Each
# quantity is measured against its own scale: the largest difference over the largest
# value of that kind (all the gradients together, all the statistics together), since
# a single leaf whose exact value is 0 holds rounding alone. Here at each seed's
# initial weights and first batch; after training, again at points along arm a's run.


# %%
def as64(tree):
    """tree with its float32 leaves as float64 NumPy arrays (the others unchanged)."""
    return jax.tree.map(
        lambda a: np.asarray(a, np.float64) if np.asarray(a).dtype == np.float32 else a, tree
    )


def scaled_diff(a, b, stored=0.0):
    """Largest |a - b| over the trees' float leaves, over the largest |b| among them;
    less `stored` times each element's own magnitude (the rounding of storing it)."""
    pairs = [
        (np.asarray(u, np.float64), np.asarray(v, np.float64))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        if np.issubdtype(np.asarray(v).dtype, np.floating)
    ]
    diff = max(
        np.maximum(np.abs(u - v) - stored * np.maximum(np.abs(u), np.abs(v)), 0).max()
        for u, v in pairs
    )
    return diff / max(np.abs(v).max() for _, v in pairs)


# jaxbn.linen stores its batch statistics in their declared dtype, float32, whatever the
# input's; Flax's BatchNorm keeps the float64 it is given. Storing rounds each element to
# within 2**-24 of its magnitude (float32's unit roundoff), which the comparison of the
# statistics allows per element; the loss and the gradients are float64 in every arm.
U32 = 2.0**-24


step64 = {arm: jax.jit(functools.partial(train_step, arm)) for arm in ARMS}


def same_step_f64(carry, x, y):
    """Per arm: (loss, batch statistics, gradients) of its float64 step vs arm a's."""
    with jax.enable_x64(True):
        x64, c64 = np.asarray(x, np.float64), as64(carry)
        out = {arm: jax.device_get(step64[arm](c64, x64, y)) for arm in ARMS}
    (_, stats_a, _), (loss_a, grads_a) = out["a"]
    return {
        arm: (
            abs(float(loss) - float(loss_a)) / abs(float(loss_a)),
            scaled_diff(stats, stats_a, stored=U32),
            scaled_diff(grads, grads_a),
        )
        for arm, ((_, stats, _), (loss, grads)) in out.items()
    }


# float64 unit roundoff 1.1e-16; a step's reductions sum at most BATCH * 8 * 8 = 4096
# terms, and reordering a sum of n terms moves it by at most n u sum|terms| (Higham,
# "Accuracy and Stability of Numerical Algorithms", 4.2): 4.5e-13 of the terms'
# magnitude. With a cancellation of 100x between terms and sum (batch norm's backward
# subtracts means), and the in-place arm's recovery of x_hat from z, which loses
# about log2(max|x_hat| / |gamma|) bits (a factor under 10 here, gamma near 1): at
# most 4.5e-10, so 1e-9. A real difference (another statistic, a wrong derivative) is
# of order one.
F64_BOUND = 1e-9
at_init = {
    seed: same_step_f64(
        init(seed),
        *(a[batch_indices(seed, len(x_train), BATCH, 1)[0]] for a in (data.x_train, data.y_train)),
    )
    for seed in SEEDS
}
print(f"at init, float64, largest over {len(SEEDS)} seeds of the difference to arm a:")
print(f"{'':{W + 3}}{'loss':>10}{'stats':>10}{'grads':>10}")
for arm in ARMS:
    worst = np.max([at_init[seed][arm] for seed in SEEDS], axis=0)
    print(f"{arm}: {ARMS[arm]:{W}}" + "".join(f"{v:10.1e}" for v in worst))
    assert worst.max() < F64_BOUND, (arm, worst)


# %% [markdown]
# ## Training: the same curves
#
# Adam (learning rate `3e-3`), batches of `BATCH`, `STEPS` steps (the epochs are
# printed), for each seed of `SEEDS`; each seed draws its own initial weights and batch
# order, shared by the four arms. Every `EVERY` steps the test loss and accuracy are
# measured in evaluation mode (running statistics), and arm a's state is kept for the
# float64 check of the steps below. The jitted step is called from a Python loop.

# %%
t0 = time.perf_counter()
runs = {arm: [] for arm in ARMS}  # per seed: training losses, test (loss, accuracy)
checkpoints = {}  # seed: arm a's (carry, x, y) before the steps EVERY, 2 EVERY, ...
for seed in SEEDS:
    start = init(seed)
    idx = batch_indices(seed, len(x_train), BATCH, STEPS)
    for arm in ARMS:
        carry, losses, tests = start, [], [evaluators[arm](*start[:2])]
        for i in range(STEPS):
            if arm == "a" and i % EVERY == 0 and i > 0:
                checkpoints.setdefault(seed, []).append(
                    (carry, data.x_train[idx[i]], data.y_train[idx[i]])
                )
            carry, (loss, _) = steps[arm](carry, data.x_train[idx[i]], data.y_train[idx[i]])
            losses.append(loss)
            if (i + 1) % EVERY == 0:
                tests.append(evaluators[arm](*carry[:2]))
        runs[arm].append((np.array(losses), np.array(tests)))
train_loss = {arm: np.stack([r[0] for r in v]) for arm, v in runs.items()}  # (seeds, STEPS)
test_loss = {arm: np.stack([r[1][:, 0] for r in v]) for arm, v in runs.items()}
test_acc = {arm: np.stack([r[1][:, 1] for r in v]) for arm, v in runs.items()}
print(
    f"{len(SEEDS)} seeds {SEEDS} x {len(ARMS)} arms x {STEPS} steps of {BATCH} "
    f"({STEPS * BATCH / len(x_train):.1f} epochs): {time.perf_counter() - t0:.1f} s"
)

# %%
eval_steps = np.arange(0, STEPS + 1, EVERY)
fig, axes = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
styles = {"a": "-", "b": "--", "c": ":", "d": "-."}
for arm in ARMS:
    for ax, steps_, v in (
        (axes[0], np.arange(1, STEPS + 1), train_loss[arm]),
        (axes[1], eval_steps, test_loss[arm]),
        (axes[2], eval_steps, test_acc[arm]),
    ):
        ax.plot(
            steps_,
            v.mean(0),
            styles[arm],
            color=f"C{'abcd'.index(arm)}",
            label=f"{arm}: {ARMS[arm]}",
        )
        ax.fill_between(steps_, v.min(0), v.max(0), color=f"C{'abcd'.index(arm)}", alpha=0.15)
axes[0].set(xlabel="step", ylabel="training loss (batch)", yscale="log")
axes[1].set(xlabel="step", ylabel="test cross-entropy", yscale="log")
axes[2].set(xlabel="step", ylabel="test accuracy", ylim=(0.5, 1.0))
axes[0].set_title("training loss")
axes[1].set_title("test loss, eval mode")
axes[2].set_title("test accuracy, eval mode")
for ax in axes:
    ax.grid(alpha=0.3)
# below the panels, where it covers no curve
fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
fig.suptitle(f"lines: mean of {len(SEEDS)} seeds; bands: their range")
plt.show()

final = {arm: test_acc[arm][:, -1] for arm in ARMS}
n = len(SEEDS)
T975 = scipy.stats.t.ppf(0.975, n - 1)  # two-sided 5%, paired over the seeds
# every evaluation after the start, with Bonferroni's correction for their number
n_evals = len(eval_steps) - 1
T_ALL = scipy.stats.t.ppf(1 - 0.025 / n_evals, n - 1)
print("final test accuracy over the seeds; minus arm a's, paired by seed: mean [95% CI]")
print(f"{'':{W + 3}}{'mean':>7}{'std':>7}{'paired diff':>13}{'95% CI':>18}{'all evals |t|':>14}")
paired = {}
for arm in ARMS:
    dv = final[arm] - final["a"]
    half = T975 * np.std(dv, ddof=1) / np.sqrt(n)
    curve = test_acc[arm][:, 1:] - test_acc["a"][:, 1:]  # (seeds, evaluations)
    se = np.std(curve, 0, ddof=1) / np.sqrt(n)
    t_max = np.max(np.abs(curve.mean(0)) / np.maximum(se, 1e-12)) if arm != "a" else 0.0
    paired[arm] = dv, half, curve, se
    print(
        f"{arm}: {ARMS[arm]:{W}}{final[arm].mean():7.3f}{final[arm].std(ddof=1):7.3f}"
        f"{dv.mean():+13.4f}   [{dv.mean() - half:+.4f}, {dv.mean() + half:+.4f}]{t_max:14.2f}"
    )
print(f"t beyond which a difference is detected: {T975:.2f} (one), {T_ALL:.2f} (all evals)")

# %%
# the float64 check of the steps, at arm a's state every EVERY steps of every seed
along = [same_step_f64(*c) for seed in SEEDS for c in checkpoints[seed]]
print(f"float64, {len(along)} states along arm a's runs, largest difference to arm a:")
for arm in ARMS:
    worst = np.max([r[arm] for r in along], axis=0)
    print(f"{arm}: {ARMS[arm]:{W}}" + "".join(f"{v:10.1e}" for v in worst))

# %% [markdown]
# The curves lie on top of each other. At arm a's state every `EVERY` steps of every
# seed, the four arms' steps agree in float64 to the bound derived above (printed): the
# arms compute the same function. In float32 their rounding differs (the in-place arm
# recovers the normalized input from `z`; Flax's autodiff orders the backward
# differently), and training amplifies such differences, as it would any change of
# summation order, so the float32 runs part over the steps. They part within the
# differences between seeds: paired by seed, no arm's final test accuracy differs
# detectably from arm a's (the 95% intervals printed above contain 0), nor does its
# test-accuracy curve at any evaluation (the largest `|t|` over the evaluations stays
# below the Bonferroni-corrected threshold). With this many seeds this is "no
# difference detected", bounded by the intervals' width, not a proof of none. The
# asserts below check exactly that.

# %%
IMAGE = 1 / len(y_test)  # the accuracy's resolution: seeds that all tie have sd 0
for arm in ARMS:
    # the same step, in float64 (bound derived above), at every state along arm a's runs
    assert max(max(r[arm]) for r in along) < F64_BOUND, arm
    # no difference detected in the final test accuracy: the paired 95% interval
    # contains 0 (widened by one test image, the resolution)
    dv, half, curve, se = paired[arm]
    assert abs(dv.mean()) <= half + IMAGE, (arm, dv)
    # nor at any evaluation: |mean| within T_ALL standard errors (Bonferroni over the
    # evaluations, so that the family of tests keeps its 5%), or one image
    assert np.all(np.abs(curve.mean(0)) <= T_ALL * se + IMAGE), (arm, curve.mean(0), se)
# and every arm learns: far above chance (0.1), near the curves' plateau
assert all(v.min() > 0.9 for v in final.values()), final

# %% [markdown]
# ## Memory: what the backward keeps
#
# Two measures for one training step at batch 64:
#
# - **residuals**: the arrays that `jax.vjp` of the loss (with respect to the
#   parameters) keeps for the backward, deduplicated by buffer address, so that an
#   array kept by two ops (the output of a normalization that the next convolution also
#   keeps) counts once. This is the memory a training step holds between its forward
#   and its backward, which grows with depth and batch size;
# - **temp**: the scratch memory XLA's compiled training step (forward, backward and
#   Adam update) allocates, from `memory_analysis()`.
#
# One activation of the first two blocks (`BATCH` x 8 x 8 x 16 float32) and one of the
# last block (`BATCH` x 4 x 4 x 32) are printed with the table, in KiB.


# %%
def residual_bytes(arm, params, batch_stats, x, y):
    """Bytes of the distinct arrays that jax.vjp of the loss keeps for the backward."""
    f = functools.partial(loss_fn, arm, batch_stats=batch_stats, x=x, y=y)
    _, vjp, _ = jax.jit(lambda p: jax.vjp(f, p, has_aux=True))(params)
    seen, total = set(), 0
    for leaf in jax.tree.leaves(vjp):
        if isinstance(leaf, jax.Array) and leaf.unsafe_buffer_pointer() not in seen:
            seen.add(leaf.unsafe_buffer_pointer())
            total += leaf.nbytes
    return total


residuals = {arm: residual_bytes(arm, *carry0[:2], xb, yb) for arm in ARMS}
temp = {arm: steps[arm].memory_analysis().temp_size_in_bytes for arm in ARMS}
activation = BATCH * 8 * 8 * 16 * 4
values = BATCH * 8 * 8 * 16, BATCH * 8 * 8 * 16, BATCH * 4 * 4 * 32  # per block
print(
    f"one activation: blocks 1-2 {4 * values[0] / 1024:.0f} KiB, block 3 {4 * values[2] / 1024:.0f} KiB"
)
print(f"{'':{W + 3}}{'residuals KiB':>14}{'/ a':>6}{'activations':>13}{'temp KiB':>10}{'/ a':>6}")
for arm in ARMS:
    print(
        f"{arm}: {ARMS[arm]:{W}}{residuals[arm] / 1024:14.0f}"
        f"{residuals[arm] / residuals['a']:6.2f}{residuals[arm] / activation:13.2f}"
        f"{temp[arm] / 1024:10.0f}{temp[arm] / temp['a']:6.2f}"
    )

# %% [markdown]
# **What the residuals show.** Batch norm then `leaky_relu` (a) keeps, per block, the
# convolution's output (batch norm's `x`), a one-byte mask of the activation's sign,
# and the block's output, which the next convolution keeps as its input anyway: over
# five activations' worth in all, with the weights and the head. The fused op (b) recomputes
# the sign from `x` and so drops the masks of the two plain blocks; the residual block
# still keeps its byte of sign (the sign of `y + r` is not a function of `x` alone).
# That is all it saves here (the `/ a` column): the fused op's gain in memory is the mask, its larger
# gain, off CPU, is the `dL/dy` it does not write, which shows in traffic, not in residuals. The
# in-place op (c) keeps only `z`, the same buffer that the next convolution keeps, so
# none of the convolution outputs and none of the masks stay alive; the only buffer it
# adds is the last block's output, which the global average alone would not keep. That
# leaves about half the residuals (the `/ a` column). Flax's `BatchNorm` (d) keeps about one more array of `x`'s size
# per layer than jaxbn's (its autodiff keeps intermediates of the normalization). The
# next cell checks this accounting, to within the per-feature vectors (under 1 KiB).
#
# **Temp memory** is another matter: it is the scratch of the whole compiled step,
# which XLA:CPU schedules and fuses as a whole, and it does not follow the residuals.
# It moves with jaxbn's CPU lowering and with the rest of the program: while this
# notebook was written (a change to how `inplace=True` sums on XLA:CPU, and to what the
# step returns) the in-place arm went from above (a) to below it. So no direction is
# asserted for it; the residuals are the measure that belongs to the op, and the one
# that grows with depth and batch size.

# %%
conv_outputs = 4 * sum(values)  # float32: what batch norm keeps as x in arms a and b
masks = sum(values)  # one byte per value: leaky_relu's sign
print(
    f"a - b: {(residuals['a'] - residuals['b']) / 1024:.0f} KiB (masks of blocks 1, 3: "
    f"{(values[0] + values[2]) / 1024:.0f} KiB)"
)
print(
    f"a - c: {(residuals['a'] - residuals['c']) / 1024:.0f} KiB (conv outputs + masks - "
    f"last output: {(conv_outputs + masks - 4 * values[2]) / 1024:.0f} KiB)"
)
print(
    f"d - a: {(residuals['d'] - residuals['a']) / 1024:.0f} KiB (conv outputs: "
    f"{conv_outputs / 1024:.0f} KiB)"
)
small = 1024  # the per-feature vectors that each arm keeps differ by less than this
assert abs(residuals["a"] - residuals["b"] - (values[0] + values[2])) < small, residuals
assert abs(residuals["a"] - residuals["c"] - (conv_outputs + masks - 4 * values[2])) < small
assert 5 < residuals["a"] / activation < 6, residuals
assert abs((residuals["d"] - residuals["a"]) / conv_outputs - 1) < 0.1, residuals

# %% [markdown]
# ## Time per training step
#
# The median of 30 calls of each arm's jitted training step (forward, backward and
# Adam update at batch 64), the calls of one round adjacent, after a warm-up call. On
# 8x8 images a step takes a few milliseconds, mostly convolutions and dispatch, and a
# shared CPU is noisy, so nothing is asserted here. The reliable numbers for the op itself are those of
# `python -m jaxbn bench`, whose mode `fused+relu` times `jaxbn.batch_norm_act` against
# batch norm then relu (jaxbn's and Flax's), forward and backward, on arrays large
# enough for memory traffic to decide, with the caches evicted before each call.

# %%
ms = median_ms_interleaved(steps, {arm: (carry0, xb, yb) for arm in ARMS}, reps=30)
print(f"{'':{W + 3}}{'ms / step':>10}{'/ a':>7}")
for arm in ARMS:
    print(f"{arm}: {ARMS[arm]:{W}}{ms[arm]:10.3f}{ms[arm] / ms['a']:7.2f}")

# %% [markdown]
# ## Summary

# %%
print(f"{'':{W + 3}}{'test acc':>9}{'+-':>6}{'residuals / a':>15}{'temp / a':>10}{'time / a':>10}")
for arm in ARMS:
    print(
        f"{arm}: {ARMS[arm]:{W}}{final[arm].mean():9.3f}{final[arm].std():6.3f}"
        f"{residuals[arm] / residuals['a']:15.2f}{temp[arm] / temp['a']:10.2f}"
        f"{ms[arm] / ms['a']:10.2f}"
    )

# %% [markdown]
# **Conclusion.** On this CNN `jaxbn.linen.BatchNorm(activation="leaky_relu")`, with or
# without `inplace=True`, trains as batch norm followed by `nn.leaky_relu` does, jaxbn's
# or Flax's: the same loss, statistics and gradients (checked in float64, at the start
# and along the runs), curves on top of each other, and no difference detected in
# test accuracy (paired by seed, printed above). What changes is what the backward keeps: the
# fused op drops the activation's masks (a few percent here, where one block of three is residual
# and keeps its byte of sign), and `inplace=True` keeps only the outputs that the next
# convolutions keep anyway, half the residual bytes of batch norm then activation.
# XLA:CPU's temp memory for the whole step does not follow the residuals, in either
# direction. The step times are printed above; at this size and on a shared CPU they
# say little about the op, whose speed `python -m jaxbn bench` measures.
#
# The in-place trade, from `jaxbn.batch_norm_act`'s documentation: it needs an
# invertible activation (`leaky_relu` or `identity`, not `relu`), and where a scale is
# exactly 0 (`|scale| <= 1e-19` in float32) the output holds no normalized input, so
# that scale gets no gradient; hence it is opt-in, and the default keeps `x`, exact
# for every scale.
