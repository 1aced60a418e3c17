"""Training memory of a ResNet-18-shaped linen model: fused batch norm + activation or not.

``python benchmarks/resnet_memory.py [--width 16] [--batch 32] [--size 32]`` compiles one
SGD training step (forward, backward, update) of a CIFAR-style ResNet-18 (3x3 stem, four
stages of two basic blocks, widths ``w, 2w, 4w, 8w``) with leaky_relu activations, three
ways, and prints XLA's ``memory_analysis()`` of each compiled step:

- ``flax``: ``flax.linen.BatchNorm`` then ``nn.leaky_relu`` (and the residual add);
- ``jaxbn``: ``jaxbn.linen.BatchNorm`` then ``nn.leaky_relu``;
- ``fused``: ``jaxbn.linen.BatchNorm(activation="leaky_relu", inplace=True)``: each
  normalization followed by an activation keeps only its output (which the next
  convolution keeps anyway); the block's second one also takes the shortcut as
  ``residual=`` and reads it in the backward (the block's input, kept anyway by its
  first convolution, or the projection's normalized output).

Temporary memory (``temp_size_in_bytes``) is what the step allocates beyond its
arguments and outputs: mostly the activations the backward keeps. Nothing is timed.
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxbn.linen

SLOPE = 0.01


def _norm(kind: str, train: bool, *, act: bool, activation: str = "leaky_relu", dtype=None):
    """``f(h, residual) -> act(bn(h) + residual)`` (no activation if ``act`` is False)."""
    if kind == "flax":
        bn = nn.BatchNorm(use_running_average=not train, dtype=dtype)
    else:
        bn = jaxbn.linen.BatchNorm(use_running_average=not train, dtype=dtype)
    if kind != "fused":
        fn = (
            functools.partial(nn.leaky_relu, negative_slope=SLOPE)
            if activation == "leaky_relu"
            else nn.relu
        )

        def f(h, residual=None):
            y = bn(h) if residual is None else bn(h) + residual
            return fn(y) if act else y

        return f
    fused = jaxbn.linen.BatchNorm(
        use_running_average=not train,
        activation=activation if act else None,
        negative_slope=SLOPE,
        # invertible: keep only the output (and the residual); relu keeps x
        inplace=act and activation != "relu",
        dtype=dtype,
    )
    return lambda h, residual=None: fused(h, residual=residual)


class Block(nn.Module):
    width: int
    stride: int
    kind: str
    activation: str = "leaky_relu"
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            _norm, self.kind, train, activation=self.activation, dtype=self.dtype
        )
        h = conv(self.width, (3, 3), self.stride)(x)
        h = norm(act=True)(h)
        h = conv(self.width, (3, 3))(h)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.width:
            shortcut = conv(self.width, (1, 1), self.stride)(x)
            shortcut = norm(act=False)(shortcut)
        return norm(act=True)(h, shortcut)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18; ``kind`` is ``flax``, ``jaxbn`` or ``fused`` (see above)."""

    width: int
    kind: str
    classes: int = 10
    activation: str = "leaky_relu"
    dtype: Any = None  # the convolutions' and normalizations' computation dtype

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
        h = _norm(self.kind, train, act=True, activation=self.activation, dtype=self.dtype)(h)
        for stage in range(4):
            for i in range(2):
                stride = 2 if stage > 0 and i == 0 else 1
                width = self.width * 2**stage
                h = Block(width, stride, self.kind, self.activation, self.dtype)(h, train)
        return nn.Dense(self.classes)(jnp.mean(h.astype(jnp.float32), (1, 2)))


def train_step(model, tx):
    """One SGD step: ``step(params, batch_stats, opt_state, x, labels)``."""

    def step(params, batch_stats, opt_state, x, labels):
        def loss(params):
            logits, upd = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd

        (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, value

    return step


def compiled_step(kind: str, width: int, batch: int, size: int):
    model = ResNet18(width, kind)
    x = jnp.ones((batch, size, size, 3))
    labels = jnp.zeros((batch,), jnp.int32)
    variables = model.init(jax.random.key(0), x, False)
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(variables["params"])
    step = train_step(model, tx)
    args = (variables["params"], variables["batch_stats"], opt_state, x, labels)
    return jax.jit(step).lower(*args).compile()


def measure(width: int = 16, batch: int = 32, size: int = 32) -> dict:
    """``{kind: temp bytes}`` and the ratios the README reports."""
    temp = {}
    for kind in ("flax", "jaxbn", "fused"):
        temp[kind] = compiled_step(kind, width, batch, size).memory_analysis().temp_size_in_bytes
    return dict(
        width=width,
        batch=batch,
        size=size,
        temp_bytes=temp,
        fused_over_flax=temp["fused"] / temp["flax"],
        fused_over_jaxbn=temp["fused"] / temp["jaxbn"],
        jaxbn_over_flax=temp["jaxbn"] / temp["flax"],
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    out = measure(args.width, args.batch, args.size)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"ResNet-18 width {args.width}, batch {args.batch}, {args.size}x{args.size}x3 (CPU)")
    for kind, nbytes in out["temp_bytes"].items():
        print(f"  {kind:<6} temp {nbytes / 2**20:8.1f} MiB")
    for key in ("fused_over_flax", "fused_over_jaxbn", "jaxbn_over_flax"):
        print(f"  {key.replace('_over_', ' / '):<14} {out[key]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
