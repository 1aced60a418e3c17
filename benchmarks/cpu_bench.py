"""The CPU benchmark: jaxbn against Flax, plain autodiff and the memory-traffic floor.

Run from the repository root, with jaxbn and flax installed::

    pip install -e ".[flax]" && python benchmarks/cpu_bench.py --runs 3

``--quick`` takes three shapes and fewer calls, ``--json PATH`` writes the results,
``--markdown`` also prints a Markdown summary (``--help`` for the rest). The allocator
and the machine are probed in ``cpu_bench_host``, the targets, tables and medians are
in ``cpu_bench_report``; ``gpu_bench.py`` runs this on a GPU.

Batch norm is memory-bound, so each time is also a multiple of its minimal traffic
("xfloor"): a jitted per-feature ``x * a + b`` (one read, one write) in the same run
gives the time of one pass over ``x``, and a mode that must move ``k`` passes is divided
by ``k`` of them: training forward 3, eval 2, backward 5, forward + backward 8 (XLA:CPU
does not fuse sibling reductions, so about 4 is the realistic training forward there).
"fb+relu" is forward + backward with a relu between the normalization and the loss, the
usual BN -> ReLU: ``dy`` is then computed, where "fwd+bwd" gets it for free, and its own
traffic narrows jaxbn's lead. "fused+relu" is the same loss with jaxbn's
:func:`jaxbn.batch_norm_act` (the relu inside the normalization's backward, no ``dy``
written) against the others' BN then relu. Competitors run interleaved in one process,
the calls of one mode adjacent, and the caches are evicted before each call (else the
order decides who finds ``x`` in a 32 MiB L3); each time is the median of ``--reps``
calls after ``--warmup`` calls, and each ratio the median of the per-round ratios.

Residuals are the buffers a ``jax.vjp`` closure keeps for the backward (deduplicated
by address), as a multiple of ``x.nbytes``: "full" counts the buffers with as many
elements as ``x``, "all" adds the per-feature vectors.

A process's memory layout moves a ratio by 5-10% between runs: ``--runs K`` repeats
the benchmark in fresh processes and reports each cell's median. Where jaxbn compiles
to flax's own program (same optimized HLO but for names), the table says so, and a
target of 1 counts as met there: the ratio is 1 but for noise.

On CPU, a fresh output of >= 32 MiB page-faults on every call under glibc's default
malloc (and jemalloc's default decay still faults freed pages back in), which can
dominate a memory-bound op. ``--allocator auto`` (the default) therefore reruns the
benchmark under jemalloc with decay off when it is installed, and otherwise tunes
glibc in process; ``both`` runs it under that jemalloc and under glibc's defaults.
The page faults per timed call are reported.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from cpu_bench_host import (
    JEMALLOC_CONF,
    _jemalloc,
    _minor_faults,
    allocator,
    flusher,
    machine,
    tune_glibc,
)
from cpu_bench_report import (
    MODES,
    TARGETS,
    compare,
    format_markdown,
    format_table,
    median_of_runs,
    summarize,
)

from jaxbn import batch_norm, batch_norm_act, init_state

SHAPES = [  # (shape, feature axis, dtype)
    ((4096, 1024), -1, "float32"),
    ((64, 32, 32, 128), -1, "float32"),
    ((64, 128, 32, 32), 1, "float32"),
    ((32, 56, 56, 64), -1, "float32"),
    ((256, 64), -1, "float32"),
    ((4096, 1024), -1, "bfloat16"),
    ((64, 32, 32, 128), -1, "bfloat16"),
]
QUICK_SHAPES = [SHAPES[0], SHAPES[2], SHAPES[5]]
COMPETITORS = ["jaxbn", "flax", "flax_stable", "autodiff"]
EPS = 1e-5


def _plain(x, gamma, beta, state, axis, training):
    """Textbook batch norm in plain jnp, differentiated by JAX's autodiff (``axis``: int or tuple)."""
    axes = {a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
    red = tuple(i for i in range(x.ndim) if i not in axes)
    keep = [1 if i in red else s for i, s in enumerate(x.shape)]
    x32 = x.astype(jnp.float32)
    if training:
        mean = jnp.mean(x32, red)
        var = jnp.mean(jnp.square(x32 - mean.reshape(keep)), red)
    else:
        mean, var = state["mean"], state["var"]
    scale = (gamma * jax.lax.rsqrt(var + EPS)).reshape(keep)
    y = ((x32 - mean.reshape(keep)) * scale + beta.reshape(keep)).astype(x.dtype)
    new = {"mean": 0.9 * state["mean"] + 0.1 * mean, "var": 0.9 * state["var"] + 0.1 * var}
    return y, new


def competitor_fns(name, axis):
    """``(train, evaluate, init)``: ``train(x, g, b, s) -> (y, new_s)``, ``init(C) -> s``."""
    if name == "jaxbn":
        train = lambda x, g, b, s: batch_norm(x, g, b, s, training=True, axis=axis, eps=EPS)
        ev = lambda x, g, b, s: batch_norm(x, g, b, s, training=False, axis=axis, eps=EPS)[0]
        return train, ev, init_state
    init = lambda c: {"mean": jnp.zeros(c), "var": jnp.ones(c)}
    if name == "autodiff":
        train = lambda x, g, b, s: _plain(x, g, b, s, axis, True)
        return train, lambda x, g, b, s: _plain(x, g, b, s, axis, False)[0], init
    import flax.linen as nn  # only the benchmark needs flax

    kw = dict(axis=axis, epsilon=EPS, momentum=0.9, use_fast_variance=name == "flax")
    bn_train, bn_eval = nn.BatchNorm(False, **kw), nn.BatchNorm(True, **kw)
    var = lambda g, b, s: {"params": {"scale": g, "bias": b}, "batch_stats": s}

    def train(x, g, b, s):
        y, upd = bn_train.apply(var(g, b, s), x, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    return train, lambda x, g, b, s: bn_eval.apply(var(g, b, s), x), init


def residual_bytes(f, *args) -> dict:
    """Bytes that ``jax.vjp(f, *args)`` keeps for the backward, under jit.

    Buffers are deduplicated by address; "full" counts those with at least as many
    elements as ``args[0]``, "all" every one. Both are also given over ``args[0].nbytes``.
    """
    _, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(*args)
    seen, full, total = set(), 0, 0
    for leaf in jax.tree.leaves(vjp):
        if not isinstance(leaf, jax.Array) or leaf.unsafe_buffer_pointer() in seen:
            continue
        seen.add(leaf.unsafe_buffer_pointer())
        total += leaf.nbytes
        full += leaf.nbytes if leaf.size >= args[0].size else 0
    nbytes = args[0].nbytes
    return dict(full=full / nbytes, all=total / nbytes, full_bytes=full, all_bytes=total)


def program(f, *args) -> list[str]:
    """The optimized HLO of ``jax.jit(f)(*args)``, its instructions without names or metadata.

    Two competitors with equal programs differ only by noise.
    """
    text = jax.jit(f).lower(*args).compile().as_text() or ""
    lines = [ln for ln in text.splitlines() if " = " in ln]
    lines = [re.sub(r", metadata=\{[^}]*\}", "", ln) for ln in lines]
    return [re.sub(r"%[\w.\-]+", "%", ln).strip() for ln in lines]


def _timed(fns: dict, reps: int, warmup: int, flush=None):
    """Seconds of each call of each ``(f, args)``, calls interleaved across ``fns``.

    Also returns the page faults per timed call, which a pooled allocator keeps near 0.
    """
    for f, args in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(f(*args))
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    gc.collect()
    gc.disable()
    start, flush_faults = _minor_faults(), 0
    try:
        for r in range(reps):
            for k in names if r % 2 == 0 else names[::-1]:
                f, args = fns[k]
                if flush is not None:
                    before = _minor_faults()
                    flush()
                    flush_faults += _minor_faults() - before
                t = time.perf_counter()
                jax.block_until_ready(f(*args))
                times[k].append(time.perf_counter() - t)
    finally:
        gc.enable()
    faults = (_minor_faults() - start - flush_faults) / max(reps * len(fns), 1)
    return {k: np.asarray(v) for k, v in times.items()}, faults


def bench_shape(
    shape, axis, dtype, competitors=COMPETITORS, reps=40, warmup=5, offset=0.0, flush=None
):
    """Times every competitor in every mode, and the floor, on one shape.

    Calls of one mode by every competitor are adjacent, and a ratio is the median of
    the per-round ratios, so a burst of load on a shared machine hits both sides.
    """
    rs = np.random.RandomState(0)
    c = shape[axis]
    keep = [c if i == axis % len(shape) else 1 for i in range(len(shape))]
    x = jnp.asarray(rs.randn(*shape) * 2 + 1 + offset, dtype)
    w = jnp.asarray(rs.randn(*shape), dtype)
    g = jnp.asarray(rs.rand(c) + 0.5, jnp.float32)
    b = jnp.asarray(rs.randn(c), jnp.float32)
    floor = jax.jit(lambda x, a, b: (x.astype(jnp.float32) * a + b).astype(x.dtype))
    fns = {("floor", "x*a+b"): (floor, (x, g.reshape(keep), b.reshape(keep)))}

    def fwd_bwd(y_of):  # sum(y * w) and its gradients; w is an argument: a constant would be folded
        loss = lambda x, g, b, w: jnp.sum(y_of(x, g, b).astype(jnp.float32) * w.astype(jnp.float32))
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2))), (x, g, b, w)

    residuals, out_dtype = {}, {}
    for name in competitors:
        train, ev, init = competitor_fns(name, axis)
        s = init(c)
        y_of = lambda x, g, b, train=train, s=s: train(x, g, b, s)[0]
        relu_y_of = lambda *a, y_of=y_of: jax.nn.relu(y_of(*a))
        fused_y_of = relu_y_of  # the others have no fused form: their BN then relu again
        if name == "jaxbn":
            fused_y_of = lambda x, g, b, s=s: batch_norm_act(
                x, g, b, s, training=True, activation="relu", axis=axis, eps=EPS
            )[0]
        y, vjp = jax.jit(lambda x, g, b, y_of=y_of: jax.vjp(y_of, x, g, b))(x, g, b)
        out_dtype[name] = str(y.dtype)
        fns[(name, "fwd")] = (jax.jit(train), (x, g, b, s))
        fns[(name, "fwd+bwd")] = fwd_bwd(y_of)
        fns[(name, "bwd")] = (jax.jit(lambda vjp, dy: vjp(dy)), (vjp, w.astype(y.dtype)))
        fns[(name, "eval")] = (jax.jit(ev), (x, g, b, s))
        fns[(name, "fb+relu")] = fwd_bwd(relu_y_of)
        fns[(name, "fused+relu")] = fwd_bwd(fused_y_of)
        residuals[name] = residual_bytes(y_of, x, g, b)
    hlo = lambda k, m: program(fns[(k, m)][0], *fns[(k, m)][1])
    same = {m: hlo("jaxbn", m) == hlo("flax", m) for m in MODES if "flax" in competitors}
    order = [("floor", "x*a+b")] + [(k, m) for m in MODES for k in competitors]
    t, faults = _timed({key: fns[key] for key in order}, reps, warmup, flush)
    pass_ms = float(np.median(t[("floor", "x*a+b")])) * 1e3 / 2
    modes = {}
    for m, p in MODES.items():
        ms = {k: float(np.median(t[(k, m)])) * 1e3 for k in competitors}
        modes[m] = {
            k: dict(ms=ms[k], ms_min=float(np.min(t[(k, m)])) * 1e3, x_floor=ms[k] / (p * pass_ms))
            for k in competitors
        }
    ratio = {}
    if "flax" in competitors:
        ratio = {
            m: {k: float(np.median(t[(k, m)] / t[("flax", m)])) for k in competitors} for m in MODES
        }
    return dict(
        shape=list(shape),
        axis=axis,
        dtype=dtype,
        nbytes=x.nbytes,
        floor_ms=2 * pass_ms,
        pass_gbps=x.nbytes / pass_ms / 1e6,
        page_faults_per_call=faults,
        modes=modes,
        ratio_vs_flax=ratio,
        residuals=residuals,
        output_dtype=out_dtype,
        same_program_as_flax=same,
    )


def run(
    shapes, competitors=COMPETITORS, reps=40, warmup=5, offset=0.0, cold=True, log=print
) -> dict:
    """Benchmarks ``shapes`` (``(shape, axis, dtype)`` triples); the JSON document."""
    flush = flusher(jax.devices()[0].platform) if cold else None
    rows = []
    for shape, axis, dtype in shapes:
        log(f"  measuring {tuple(shape)} axis {axis} {dtype} ...", flush=True)
        row = bench_shape(tuple(shape), axis, dtype, competitors, reps, warmup, offset, flush)
        rows.append(row)
    config = dict(
        reps=reps, warmup=warmup, offset=offset, cold_cache=cold, passes=MODES, targets=TARGETS
    )
    summary = summarize(rows)
    return dict(
        machine=machine(), config=config, competitors=competitors, rows=rows, summary=summary
    )


def parse_shape(text):
    """``"64x32x32x128:-1:bfloat16"`` -> ``((64, 32, 32, 128), -1, "bfloat16")``."""
    parts = text.split(":")
    try:
        shape = tuple(int(v) for v in parts[0].split("x"))
        axis = int(parts[1]) if len(parts) > 1 and parts[1] else -1
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"got {text!r}; expected sizes joined by 'x', then optionally ':AXIS' and "
            f"':DTYPE', e.g. 64x128x32x32:1:bfloat16."
        ) from None
    return shape, axis, parts[2] if len(parts) > 2 else "float32"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpu_bench.py",
        description="Benchmarks jaxbn against Flax's BatchNorm, plain autodiff and the "
        "memory-traffic floor (a jitted x * a + b), in training, backward and eval modes.",
        epilog='Needs flax: pip install "jaxbn[flax]".',
    )
    p.add_argument("--reps", type=int, help="timed calls per case (default 40, --quick 10)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 5, --quick 2)")
    p.add_argument("--quick", action="store_true", help="three shapes, fewer calls")
    p.add_argument(
        "--shape",
        action="append",
        type=parse_shape,
        metavar="AxBxC[:AXIS[:DTYPE]]",
        help="benchmark this shape instead (repeatable), e.g. 64x128x32x32:1:bfloat16",
    )
    p.add_argument(
        "--offset",
        type=float,
        default=0.0,
        help="add this to the data (randn * 2 + 1); e.g. 1e4 takes jaxbn's shifted statistics",
    )
    p.add_argument(
        "--warm-cache",
        action="store_true",
        help="do not evict the caches before each timed call (order then matters)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat in this many fresh processes and report each cell's median "
        "(a process's memory layout can move a ratio by 5-10%%)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--markdown", action="store_true", help="also print a Markdown summary")
    p.add_argument(
        "--allocator",
        choices=["auto", "current", "jemalloc", "glibc", "both"],
        default="auto",
        help="auto (default): jemalloc if installed, else glibc tuned in process; current: "
        "as started; glibc: glibc's defaults; both: jemalloc, then glibc's defaults",
    )
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if importlib.util.find_spec("flax") is None:
        need = 'flax, which is not installed; install it with pip install "jaxbn[flax]".'
        print(f"cpu_bench.py needs {need}", file=sys.stderr)
        return 1
    choice, loaded = args.allocator, allocator()
    if choice == "auto":
        choice = "jemalloc" if _jemalloc() and "jemalloc" not in loaded else "current"
        if choice == "current" and loaded.startswith("glibc"):
            tune_glibc()
    if choice == "jemalloc" and "jemalloc" in loaded:
        choice = "current"
    if choice != "current":
        return _main_children(argv, args, choice)
    reps = args.reps or (10 if args.quick else 40)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    shapes = args.shape or (QUICK_SHAPES if args.quick else SHAPES)
    mach = machine()
    where = mach["cpu"] if mach["platform"] == "cpu" else mach["device"]
    print(f"cpu_bench.py on {mach['platform']} ({where}, {mach['cpu_count']} cores)")
    print(f"jax {mach['jax']}, flax {mach['flax']}, allocator: {mach['allocator']}")
    print(f"times in ms: median of {reps} interleaved calls after {warmup} warm-up calls;")
    cache = "warm caches" if args.warm_cache else "caches evicted before each call"
    print(f"jaxbn/flax: median of the per-round ratios; {cache}")
    passes = ", ".join(f"{m} {p}" for m, p in MODES.items())
    print(f"xfloor: time / (passes ({passes}) * one pass of x*a+b); data offset {args.offset:g}\n")
    if args.runs > 1:
        runs = []
        for i in range(args.runs):
            print(f"  run {i + 1} of {args.runs} in a fresh process ...", flush=True)
            runs.append(_rerun(child_argv(argv, RUN_OWN) + ["--runs", "1"], "run", {}, quiet=True))
        result = median_of_runs(runs)
        print(f"each cell: the median of {args.runs} runs")
    else:
        result = run(shapes, COMPETITORS, reps, warmup, args.offset, not args.warm_cache)
    print(format_table(result))
    if args.markdown:
        print("\njaxbn ms / flax ms (jaxbn/flax); residuals: jaxbn / flax, in x's size\n")
        print(format_markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


RUN_OWN = ("--allocator", "--json", "--runs")  # what a child of --runs does not get


def child_argv(argv, own=("--allocator", "--json")) -> list[str]:
    """``argv`` without the options in ``own`` and their values."""
    rest, skip = [], False
    for a in argv:
        if not skip and not a.startswith(own):
            rest.append(a)
        skip = a in own
    return rest


def _rerun(argv, name, env_changes, quiet=False) -> dict:
    """Runs this benchmark in a child process (the allocator is chosen at startup)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv]
        cmd += ["--allocator", "current", "--json", path]
        env = {k: v for k, v in {**os.environ, **env_changes}.items() if v is not None}
        out = subprocess.DEVNULL if quiet else None
        if subprocess.run(cmd, env=env, stdout=out).returncode != 0:
            raise SystemExit(f"cpu_bench.py under {name} failed")
        with open(path) as f:
            return json.load(f)


def _main_children(argv, args, choice) -> int:
    """Reruns the benchmark under jemalloc and/or glibc's defaults, in child processes."""
    runs = []
    if choice in ("jemalloc", "both"):
        lib = _jemalloc()
        if lib is None:
            print("cpu_bench.py: no libjemalloc.so.2 (apt install libjemalloc2).", file=sys.stderr)
            return 2
        preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), lib]))
        env = {"LD_PRELOAD": preload, "MALLOC_CONF": os.environ.get("MALLOC_CONF", JEMALLOC_CONF)}
        runs.append(_rerun(child_argv(argv), "jemalloc", env))
    if choice in ("glibc", "both"):
        unset = {k: None for k in os.environ if k == "LD_PRELOAD" or k.startswith("MALLOC_")}
        runs.append(_rerun(child_argv(argv), "glibc", unset))
    if len(runs) > 1:
        print("\n" + compare(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs[0] if len(runs) == 1 else {"runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
