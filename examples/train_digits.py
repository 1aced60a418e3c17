"""Train a small CNN with ``jaxbn.linen.BatchNorm`` on scikit-learn's digits.

A complete functional training loop: the 8x8 digits that ship with scikit-learn (no
download), a ``TrainState`` that carries ``batch_stats`` next to the parameters, a
jitted training step with ``mutable=["batch_stats"]`` and an evaluation step with the
running statistics. Run it with::

    python examples/train_digits.py

It reaches 98.4% test accuracy (97.8% to 98.7% over seeds 0 to 2; ``tests/test_example.py``
checks at least 97%) in 15 epochs, in about 15 seconds on 2 CPU cores, most of it
compilation. The model is the one a
``flax.linen.BatchNorm`` user would write; only the import of ``BatchNorm`` differs.
"""

from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from jaxbn.linen import BatchNorm


class CNN(nn.Module):
    """Two Conv - BatchNorm - relu blocks, global average pooling, a linear head."""

    @nn.compact
    def __call__(self, x, train: bool):
        # the convolutions need no bias: BatchNorm's offset follows them
        x = nn.Conv(16, (3, 3), use_bias=False)(x)
        x = nn.relu(BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = nn.Conv(32, (3, 3), strides=2, use_bias=False)(x)
        x = nn.relu(BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


class TrainState(train_state.TrainState):
    """Parameters, optimizer state and the running statistics, carried together."""

    batch_stats: Any


def load(seed: int = 0):
    """Digits as NHWC float32 images in [0, 1], split 75% / 25%, stratified."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    return train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )


@jax.jit
def train_step(state: TrainState, images, labels):
    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss


@jax.jit
def accuracy(state: TrainState, images, labels):
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def main(epochs: int = 15, batch_size: int = 64, learning_rate: float = 1e-2, seed: int = 0):
    """Trains and evaluates; returns the final test accuracy."""
    x_train, x_test, y_train, y_test = load(seed)
    steps = len(x_train) // batch_size  # drop the last partial batch: one compiled shape
    model = CNN()
    variables = model.init(jax.random.key(seed), x_train[:1], train=False)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps)),
    )
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))
        losses = []
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            state, loss = train_step(state, x_train[idx], y_train[idx])
            losses.append(loss)
        acc = float(accuracy(state, x_test, y_test))
        print(
            f"epoch {epoch:2d}  train loss {float(jnp.mean(jnp.stack(losses))):.4f}  "
            f"test accuracy {acc:.4f}  ({time.perf_counter() - start:.1f} s)"
        )
    return acc


if __name__ == "__main__":
    main()
