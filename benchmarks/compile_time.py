"""Time to first step: trace, lower, compile and first run of a real model's training step.

Users wait for this at every edit of a model: a notebook cell re-run, a new shape, a new
process. Each measurement runs in a fresh Python process with JAX's persistent
compilation cache off, the two libraries alternating, and reports medians. A step is
``value_and_grad`` of the cross-entropy, an SGD update and the new running statistics,
jitted; ``jax.jit(step).trace(...)``, ``.lower()``, ``.compile()`` and the first call are
timed apart. Models (batch 8, 32x32x3 images, 10 classes):

- ``resnet18``, ``resnet50``: Flax's ImageNet example (``examples/imagenet/models.py``,
  ResNet v1.5, Apache-2.0), one device, with ``flax.linen.BatchNorm`` or
  ``jaxbn.linen.BatchNorm``;
- ``nnx_cnn``: 8 Conv-BatchNorm-relu layers in NNX (``nnx.value_and_grad``), with
  ``flax.nnx.BatchNorm`` or ``jaxbn.nnx.BatchNorm``;
- ``eqx_cnn``: the same 8 layers in Equinox, ``eqx.nn.BatchNorm`` or
  ``jaxbn.equinox.BatchNorm`` (``mode="batch"`` for both, as jaxbn's default ``ema``
  and Equinox's differ in what they store).

Besides the times, each row counts what the compiler is given: the traced jaxpr's
equations (sub-jaxprs included), the lowered StableHLO's size in characters and the
compiled program's HLO instructions. ``--platform h100`` traces the same step for a
deviceless H100 (XLA's GPU compiler, ``h100_sxm.txtpb``; run it in an environment
with ``jax-cuda12-plugin``, see ``gpu_program.py``); its first run is not timed.

    python benchmarks/compile_time.py --runs 3 --json ttfs.json --markdown ttfs.md
    python benchmarks/compile_time.py --runs 3 --platform h100     # jax-cuda12-plugin
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("resnet18", "resnet50", "nnx_cnn", "eqx_cnn")
BATCH, SIDE, CLASSES = 8, 32, 10
PHASES = ("trace", "lower", "compile", "run")


# ---------------------------------------------------------------------------
# The models: each returns (step, args) for jax.jit(step).trace(*args)


def _linen_resnet(lib: str, stages, bottleneck: bool):
    """Flax's ImageNet example's ResNet v1.5, its norm swapped (one device: no axis_name)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    if lib == "jaxbn":
        from jaxbn.linen import BatchNorm
    else:
        BatchNorm = nn.BatchNorm

    class Block(nn.Module):
        filters: int
        conv: object
        norm: object
        strides: tuple = (1, 1)

        @nn.compact
        def __call__(self, x):
            r = x
            if bottleneck:
                y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
                y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
                y = self.conv(self.filters * 4, (1, 1))(y)
            else:
                y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
                y = self.conv(self.filters, (3, 3))(y)
            y = self.norm(scale_init=nn.initializers.zeros_init())(y)
            if r.shape != y.shape:
                r = self.conv(y.shape[-1], (1, 1), self.strides, name="conv_proj")(r)
                r = self.norm(name="norm_proj")(r)
            return nn.relu(r + y)

    class ResNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            conv = partial(nn.Conv, use_bias=False)
            norm = partial(BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
            x = conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
            x = nn.relu(norm(name="bn_init")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            for i, size in enumerate(stages):
                for j in range(size):
                    strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                    x = Block(64 * 2**i, conv, norm, strides)(x)
            return nn.Dense(CLASSES)(jnp.mean(x, axis=(1, 2)))

    model = ResNet()
    x, labels = _data()
    variables = model.init(jax.random.key(0), x)

    def step(params, batch_stats, x, labels):
        def loss(p):
            out, new = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
            )
            return _cross_entropy(out, labels), new["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return _sgd(params, grads), stats, value

    return step, (variables["params"], variables["batch_stats"], x, labels)


def _nnx_cnn(lib: str):
    import jax
    from flax import nnx

    if lib == "jaxbn":
        from jaxbn.nnx import BatchNorm
    else:
        BatchNorm = nnx.BatchNorm

    class CNN(nnx.Module):
        def __init__(self, rngs):
            widths = (3, 32, 32, 64, 64, 64, 128, 128, 128)
            self.convs = nnx.List(
                [nnx.Conv(i, o, (3, 3), use_bias=False, rngs=rngs) for i, o in _pairs(widths)]
            )
            self.norms = nnx.List([BatchNorm(o, rngs=rngs) for o in widths[1:]])
            self.head = nnx.Linear(widths[-1], CLASSES, rngs=rngs)

        def __call__(self, x):
            for conv, norm in zip(self.convs, self.norms):
                x = nnx.relu(norm(conv(x)))
            return self.head(x.mean((1, 2)))

    graphdef, state = nnx.split(CNN(nnx.Rngs(0)))
    x, labels = _data()

    def step(state, x, labels):
        model = nnx.merge(graphdef, state)

        def loss(model):
            return _cross_entropy(model(x), labels)

        value, grads = nnx.value_and_grad(loss)(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, _sgd(params, grads))
        return nnx.state(model), value

    del jax
    return step, (state, x, labels)


def _eqx_cnn(lib: str):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    if lib == "jaxbn":
        from jaxbn.equinox import BatchNorm
    else:
        BatchNorm = eqx.nn.BatchNorm

    widths = (3, 32, 32, 64, 64, 64, 128, 128, 128)
    keys = jax.random.split(jax.random.key(0), len(widths))
    convs = [
        eqx.nn.Conv2d(i, o, 3, padding=1, use_bias=False, key=k)
        for (i, o), k in zip(_pairs(widths), keys)
    ]
    norms = [BatchNorm(o, axis_name="batch", mode="batch") for o in widths[1:]]
    head = eqx.nn.Linear(widths[-1], CLASSES, key=keys[-1])
    model, state = eqx.nn.make_with_state(lambda: (convs, norms, head))()
    x, labels = _data()
    x = jnp.moveaxis(x, -1, 1)  # Equinox's convolutions are channels-first, per example

    def forward(model, state, x):
        convs, norms, head = model
        for conv, norm in zip(convs, norms):
            x, state = norm(conv(x), state)
            x = jax.nn.relu(x)
        return head(x.mean((1, 2))), state

    def step(model, state, x, labels):
        def loss(model):
            out, new = jax.vmap(forward, (None, None, 0), (0, None), axis_name="batch")(
                model, state, x
            )
            return _cross_entropy(out, labels), new

        (value, new), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        return eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads)), new, value

    params, static = eqx.partition(model, eqx.is_array)

    def jit_step(params, state, x, labels):
        new, state, value = step(eqx.combine(params, static), state, x, labels)
        return eqx.filter(new, eqx.is_array), state, value

    return jit_step, (params, state, x, labels)


def _pairs(widths):
    return list(zip(widths[:-1], widths[1:]))


def _data():
    import jax

    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (BATCH, SIDE, SIDE, 3))
    return x, jax.random.randint(ky, (BATCH,), 0, CLASSES)


def _cross_entropy(logits, labels):
    import jax
    import jax.numpy as jnp

    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def _sgd(params, grads):
    import jax

    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)


def build(model: str, lib: str):
    if model == "resnet18":
        return _linen_resnet(lib, (2, 2, 2, 2), bottleneck=False)
    if model == "resnet50":
        return _linen_resnet(lib, (3, 4, 6, 3), bottleneck=True)
    if model == "nnx_cnn":
        return _nnx_cnn(lib)
    return _eqx_cnn(lib)


# ---------------------------------------------------------------------------
# One measurement, in this process


def count_equations(jaxpr) -> int:
    """Equations of a jaxpr and of every jaxpr inside it (jit, cond branches, custom rules)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += count_equations(inner)
    return total


def measure(model: str, lib: str, target: str) -> dict:
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    step, args = build(model, lib)
    if target == "h100":
        args = _on_h100(args)
    jitted = jax.jit(step)
    t0 = time.perf_counter()
    traced = jitted.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower(lowering_platforms=("cuda",)) if target == "h100" else traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    row = dict(trace=t1 - t0, lower=t2 - t1, compile=t3 - t2)
    if target == "cpu":
        jax.block_until_ready(compiled(*args))
        row["run"] = time.perf_counter() - t3
    text = compiled.as_text()
    row.update(
        equations=count_equations(traced.jaxpr.jaxpr),
        stablehlo_chars=len(lowered.as_text()),
        hlo_instructions=sum(" = " in line for line in text.splitlines()),
    )
    return row


def _on_h100(args):
    """The step's arguments as abstract values on a deviceless H100."""
    import jax
    from jax.experimental import topologies

    with open(os.path.join(HERE, "h100_sxm.txtpb")) as f:
        topo = topologies.get_topology_desc(
            platform="cuda", topology="1x1x1", target_config=f.read()
        )
    sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)


# ---------------------------------------------------------------------------
# The driver: fresh processes, alternating, medians


def _child(model: str, lib: str, target: str) -> dict:
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
    if target == "h100":
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, __file__, "--one", model, lib, "--platform", target]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{model}/{lib} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(models, runs: int, target: str) -> list[dict]:
    rows = []
    for model in models:
        peer = "equinox" if model == "eqx_cnn" else "flax"
        samples: dict[str, list[dict]] = {peer: [], "jaxbn": []}
        for i in range(runs):  # alternating, the first library alternating too
            order = (peer, "jaxbn") if i % 2 == 0 else ("jaxbn", peer)
            for lib in order:
                samples[lib].append(_child(model, lib, target))
        med = {
            lib: {k: statistics.median(s[k] for s in got) for k in got[0]}
            for lib, got in samples.items()
        }
        rows.append(dict(model=model, peer=peer, platform=target, runs=runs, **med))
        print(_markdown_row(rows[-1]), flush=True)
    return rows


def _first_step(r: dict) -> float:
    return r["trace"] + r["lower"] + r["compile"]


def _markdown_row(row: dict) -> str:
    p, j = row[row["peer"]], row["jaxbn"]
    phases = [k for k in PHASES if k in p]
    cells = [
        row["model"],
        " / ".join(f"{p[k]:.2f}" for k in phases),
        " / ".join(f"{j[k]:.2f}" for k in phases),
        f"**{_first_step(j) / _first_step(p):.2f}x** (trace {j['trace'] / p['trace']:.2f}x)",
        f"{p['equations']:.0f} / {j['equations']:.0f}",
        f"{p['stablehlo_chars'] / 1000:.0f}k / {j['stablehlo_chars'] / 1000:.0f}k",
        f"{p['hlo_instructions']:.0f} / {j['hlo_instructions']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(rows: list[dict], machine: str) -> str:
    phases = "trace / lower / compile" + (" / run" if rows and "run" in rows[0]["jaxbn"] else "")
    head = [
        f"Time to first step, {rows[0]['platform'] if rows else ''}: {machine}; medians of "
        f"{rows[0]['runs'] if rows else 0} fresh processes per library, alternating, "
        "compilation cache off (`benchmarks/compile_time.py`).",
        "",
        f"| model | peer: {phases} (s) | jaxbn: {phases} (s) | jaxbn / peer, trace + lower + "
        "compile | equations, peer / jaxbn | StableHLO | compiled HLO instructions |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join(head + [_markdown_row(r) for r in rows]) + "\n"


def machine_line() -> str:
    import flax
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{time.strftime('%Y-%m-%d')}, jax {jax.__version__}, flax {flax.__version__}, "
        f"{os.cpu_count()} CPU cores ({cpu})"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--platform", choices=("cpu", "h100"), default="cpu")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "LIB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one, args.platform)))
        return 0
    rows = run(args.models, args.runs, args.platform)
    text = markdown(rows, machine_line())
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine_line(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(HERE, ".."))
    sys.exit(main())
