"""``python -m jaxbn demo``: a small CNN on scikit-learn's digits, with and without batch norm.

It uses only the functional core (``jaxbn.batch_norm``), ``lax.conv_general_dilated``
and optax; scikit-learn and matplotlib are imported where they are used. The notebooks
in ``notebooks/`` carry their own copy of the data, model and training code.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxbn._batch_norm import batch_norm
from jaxbn._state import init_state
from jaxbn.cli.args import demo_parser

CONV_WIDTHS = (16, 32, 64)  # 3x3 convolutions; the last two have stride 2: 8x8 -> 4x4 -> 2x2
TARGET = 0.9  # the accuracy whose first crossing the table reports
EVAL_EVERY = 2  # steps between test-set evaluations


class Digits(NamedTuple):
    """scikit-learn's 8x8 handwritten digits, split once into train and test."""

    x_train: np.ndarray  # (N, 8, 8, 1) float32, NHWC, pixels scaled to [0, 1].
    y_train: np.ndarray  # (N,) int32, labels 0..9.
    x_test: np.ndarray  # (M, 8, 8, 1) float32.
    y_test: np.ndarray  # (M,) int32.


def load_digits_split(test_fraction: float = 0.25, split_seed: int = 0) -> Digits:
    """The 1797 digits that ship with scikit-learn (no download), stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    return Digits(x_tr, y_tr, x_te, y_te)


def init_cnn(key, use_bn: bool, widths=CONV_WIDTHS, num_classes: int = 10):
    """He-initialized conv layers and a linear head; returns ``(params, state)``.

    With batch norm a conv layer has ``gamma``/``beta`` instead of a bias (the mean
    subtraction would cancel it) and ``state`` holds one running-statistics value per
    conv layer; without it ``state`` is an empty tuple. The same key gives the same
    conv weights either way, so the two models start from the same point.
    """
    keys = jax.random.split(key, len(widths) + 1)
    params, state, c_in = [], [], 1
    for k, c in zip(keys, widths):
        w = jax.random.normal(k, (3, 3, c_in, c)) * np.sqrt(2.0 / (9 * c_in))
        if use_bn:
            params.append({"w": w, "gamma": jnp.ones(c), "beta": jnp.zeros(c)})
            state.append(init_state(c))
        else:
            params.append({"w": w, "b": jnp.zeros(c)})
        c_in = c
    w = jax.random.normal(keys[-1], (c_in, num_classes)) * np.sqrt(1.0 / c_in)
    params.append({"w": w, "b": jnp.zeros(num_classes)})
    return params, tuple(state)


def apply_cnn(params, state, x, *, training: bool, axis_name=None, bn_inputs=None):
    """Logits ``(N, 10)`` of NHWC images ``(N, 8, 8, 1)``; returns ``(logits, new_state)``.

    ``axis_name`` is passed to every batch norm: under ``shard_map`` the statistics
    are then those of the global batch. A list passed as ``bn_inputs`` receives each
    batch norm's input (for :func:`jaxbn.population_stats`).
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
            h, s = batch_norm(
                h, layer["gamma"], layer["beta"], state[i], training=training, axis_name=axis_name
            )
            new_state.append(s)
        else:
            h = h + layer["b"][None, None, None, :]
        h = jax.nn.relu(h)
    h = jnp.mean(h, axis=(1, 2))
    return h @ params[-1]["w"] + params[-1]["b"][None, :], tuple(new_state)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy of integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(optimizer, apply_fn=apply_cnn):
    """A jitted ``step(params, state, opt_state, x, y) -> (params, state, opt_state, loss)``.

    The running statistics come out of the loss as auxiliary output and go back in as
    an explicit value: nothing is mutated.
    """

    def loss_fn(params, state, x, y):
        logits, new_state = apply_fn(params, state, x, training=True)
        return cross_entropy(logits, y), new_state

    @jax.jit
    def step(params, state, opt_state, x, y):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    return step


def make_accuracy(apply_fn=apply_cnn):
    """A jitted ``accuracy(params, state, x, y)`` in evaluation mode (running statistics)."""

    @jax.jit
    def accuracy(params, state, x, y):
        logits, _ = apply_fn(params, state, x, training=False)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    return accuracy


def batches(n: int, batch_size: int, epochs: int, seed: int):
    """Index arrays of a fresh permutation each epoch; the last partial batch is dropped."""
    rs = np.random.RandomState(seed)
    for _ in range(epochs):
        perm = rs.permutation(n)
        for i in range(n // batch_size):
            yield perm[i * batch_size : (i + 1) * batch_size]


class RunResult(NamedTuple):
    """Learning curves and summary of one training run."""

    name: str
    steps: np.ndarray  # (S,) 1..S.
    loss: np.ndarray  # (S,) training loss of each step's batch.
    eval_steps: np.ndarray  # (E,) steps after which the test set was evaluated.
    test_acc: np.ndarray  # (E,) test accuracy in evaluation mode.
    steps_to_target: int | None  # first evaluated step with test accuracy >= TARGET.
    wall_s: float  # training and evaluation time, after compilation.


def train_cnn(
    data: Digits,
    *,
    use_bn: bool,
    epochs: int = 20,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    seed: int = 0,
    eval_every: int = EVAL_EVERY,
    progress: bool = True,
) -> RunResult:
    """Trains the CNN with SGD + momentum; deterministic for a fixed ``seed``.

    With ``progress`` it prints a line (epoch, step, loss, test accuracy) about every
    quarter of the run: plain lines, readable in a terminal and in a log alike.
    """
    name = "with batch norm" if use_bn else "without batch norm"
    params, state = init_cnn(jax.random.key(seed), use_bn)
    optimizer = optax.sgd(learning_rate, momentum=0.9)
    opt_state = optimizer.init(params)
    x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    # compiled ahead, so that the wall time compares training, not compilation (and
    # not JAX's one-time start-up, which would land on whichever run goes first)
    x0, y0 = data.x_train[:batch_size], data.y_train[:batch_size]
    step = make_train_step(optimizer).lower(params, state, opt_state, x0, y0).compile()
    accuracy = make_accuracy().lower(params, state, x_te, y_te).compile()
    per_epoch = len(data.x_train) // batch_size
    total = epochs * per_epoch
    report_every = max(1, epochs // 4) * per_epoch  # a few plain lines: readable in a log
    t0 = time.perf_counter()
    loss_list, eval_steps, acc_list = [], [], []
    for i, idx in enumerate(batches(len(data.x_train), batch_size, epochs, seed), start=1):
        params, state, opt_state, loss = step(
            params, state, opt_state, data.x_train[idx], data.y_train[idx]
        )
        loss_list.append(loss)
        if i % eval_every == 0 or i == total:
            eval_steps.append(i)
            acc_list.append(accuracy(params, state, x_te, y_te))
        if progress and (i % report_every == 0 or i == total):
            acc = f"{float(acc_list[-1]):.4f}" if acc_list else "-"
            print(
                f"  {name}: epoch {i // per_epoch}/{epochs}, step {i}/{total}, "
                f"loss {float(loss):.4f}, test acc {acc}",
                flush=True,
            )
    losses = np.asarray(jax.device_get(loss_list), np.float64)
    accs = np.asarray(jax.device_get(acc_list), np.float64)
    hit = np.flatnonzero(accs >= TARGET)
    first = int(eval_steps[hit[0]]) if hit.size else None
    steps, wall = np.arange(1, len(losses) + 1), time.perf_counter() - t0
    return RunResult(name, steps, losses, np.asarray(eval_steps), accs, first, wall)


def format_table(results) -> str:
    head = f"{'model':<22}{'final test acc':>16}{'steps to 90%':>14}{'wall s':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        reached = "never" if r.steps_to_target is None else str(r.steps_to_target)
        lines.append(f"{r.name:<22}{r.test_acc[-1]:>16.4f}{reached:>14}{r.wall_s:>9.1f}")
    return "\n".join(lines)


def plot_curves(results, path: str) -> None:
    """Training loss and test accuracy against step, one line per run, saved as PNG."""
    # A bare Figure renders with Agg and never touches pyplot: no display needed, and
    # no global backend switched under a notebook that calls this.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for r in results:
        ax_loss.plot(r.steps, r.loss, lw=1, label=r.name)
        ax_acc.plot(r.eval_steps, r.test_acc, lw=1.5, label=r.name)
    ax_loss.set(xlabel="step", ylabel="training loss (batch)", yscale="log")
    ax_acc.axhline(TARGET, color="gray", ls=":", lw=1)
    ax_acc.set(xlabel="step", ylabel="test accuracy (eval mode)", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("Small CNN on scikit-learn digits, same seed and optimizer")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = demo_parser()
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    data = load_digits_split()
    print(
        f"jaxbn demo: a {len(CONV_WIDTHS)}-layer CNN on {len(data.x_train)} training and "
        f"{len(data.x_test)} test digits (scikit-learn), {args.epochs} epochs of SGD "
        f"(lr {args.lr}, momentum 0.9), seed {args.seed}: same conv weights and batches for both"
    )
    results = [
        train_cnn(data, use_bn=bn, epochs=args.epochs, learning_rate=args.lr, seed=args.seed)
        for bn in (False, True)
    ]
    print("\n" + format_table(results))
    print(f"(test accuracy in eval mode every {EVAL_EVERY} steps; wall time excludes compilation)")
    plot_curves(results, args.out)
    print(f"\nlearning curves: {os.path.abspath(args.out)}")
    return 0
