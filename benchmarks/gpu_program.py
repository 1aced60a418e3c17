"""The programs XLA compiles for an H100, measured without one.

Batch norm is bandwidth-bound: the bytes its kernels move decide its speed. XLA's GPU
compiler runs on a CPU-only machine when JAX is given the device's description
(``h100_sxm.txtpb`` beside this file, XLA's own H100 SXM description), and returns the
optimized program a GPU would run: the kernels it launches and the buffers each reads
and writes. This script compiles every case for jaxbn and its competitors and counts,
per program:

- ``kernels``: the instructions of the ``ENTRY`` computation that launch work
  (``fusion``, ``custom-call``, ``copy``, collectives...; not ``parameter``,
  ``constant``, ``tuple``, ``get-tuple-element``, ``bitcast``);
- ``S``: the bytes of each kernel's operands and results with ``x``'s number of
  elements, over ``sizeof(x)``. An operand a fusion reads only through a
  ``gather``/``slice`` (the shift's three values) or a loop fusion with small outputs
  and no reduction reads is not counted;
- ``all S``: every operand and result, per-feature vectors included;
- ``us``: all bytes at the H100's 3.35 TB/s, a bandwidth time, not a measured one;
- ``control``: any ``conditional``, ``while`` or ``opt-barrier`` left in ``ENTRY``.

Floors, in S, for a case that reads ``x`` (and ``w = dL/dy``) and writes its outputs
no more than the computation needs: training forward 3 (read ``x`` for the statistics,
read it again and write ``y``), eval 2, backward alone 5 (read ``x`` and ``dy`` for the
two sums, again for ``dx``, write ``dx``), forward + backward of ``sum(y * w)`` 6 (the
loss's value and the backward's sums share one pass over ``x`` and ``w``), the same
through relu or fused relu 6 (the activation's derivative is recomputed, never
written). With a residual ``r`` (``z = act(y + r)``), ``r`` is read in the two passes
after the statistics and ``dr`` written: 9.

Run it where ``jax-cuda12-plugin`` of the same version as jax is installed (no GPU,
no driver needed)::

    python benchmarks/gpu_program.py --markdown gpu_program.md --json gpu_program.json
    python benchmarks/gpu_program.py --check        # exit 1 if a jaxbn case is over

``--check`` fails where a jaxbn case is over its floor, over Flax's default on the same
function, has control flow, or launches more than twice Flax's kernels plus two.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BANDWIDTH = {"cuda": 3.352e12}  # bytes/s: H100 SXM (its txtpb)
EPS = 1e-5

# ---------------------------------------------------------------------------
# Reading a compiled program


_TYPE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128)\[([0-9,]*)\]")
_BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, f16=2, bf16=2, s32=4, u32=4, f32=4)
_BYTES.update(s64=8, u64=8, f64=8, c64=8, c128=16)
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
_INDEXING = {"gather", "slice", "dynamic-slice"}
_INSTR = re.compile(r"^(?:ROOT )?(%[\w.\-]+) = (.*?) ([a-z][a-z\-]*)\((.*?)\)(, .*)?$")


def _types(text: str) -> list[tuple[int, int]]:
    """``(elements, bytes per element)`` of each array type in ``text``."""
    return [
        (math.prod(int(d) for d in dims.split(",") if d), _BYTES[dtype])
        for dtype, dims in _TYPE.findall(text)
    ]


def _computations(text: str) -> dict[str, str]:
    comps = {}
    for m in re.finditer(r"\n(%[\w.\-]+) \([^\n]*?\) -> [^\n]*\{\n(.*?)\n\}", text, re.S):
        comps[m.group(1)] = m.group(2)
    return comps


def _reads_whole(body: str, index: int) -> bool:
    """Whether a fused computation's parameter ``index`` is read other than by indexing."""
    m = re.search(r"(%[\w.\-]+) = [^\n]*? parameter\(" + str(index) + r"\)", body)
    if not m:
        return True
    for line in body.split("\n"):
        if "parameter(" in line or not re.search(re.escape(m.group(1)) + r"\b", line):
            continue
        op = re.search(r"= .*? ([a-z][a-z\-]*)\(", line)
        if not op or op.group(1) not in _INDEXING:
            return True
    return False


def traffic(text: str, nelem: int, nbytes: int, skip=None) -> dict:
    """Kernels and bytes of a compiled program's ``ENTRY`` (see the module docstring).

    ``skip(line)``: instructions left out (e.g. the convolutions of a network).
    """
    comps = _computations(text)
    entry = re.search(r"\nENTRY [^\n]*\{\n(.*?)\n\}", text, re.S).group(1)
    shapes: dict[str, list] = {}
    kernels, x_bytes, all_bytes, control = [], 0, 0, []
    for line in entry.split("\n"):
        m = _INSTR.match(line.strip())
        if not m:
            continue
        name, rtype, op, operands, attrs = m.groups()
        attrs = attrs or ""
        result = _types(rtype)
        if op == "get-tuple-element":
            src, i = operands.strip(), int(re.search(r"index=(\d+)", attrs).group(1))
            shapes[name] = [shapes[src][i]] if len(shapes.get(src, [])) > i else result
        else:
            shapes[name] = result
        if op in ("conditional", "while", "opt-barrier"):
            control.append(op)
        if op in _FREE or (skip is not None and skip(line)):
            continue

        calls = re.search(r"calls=(%[\w.\-]+)", attrs)
        body = comps.get(calls.group(1), "") if calls else ""
        partial = "kind=kLoop" in attrs and not any(n == nelem for n, _ in result)
        partial = partial and " reduce(" not in body
        io = list(result)
        for i, o in enumerate(re.findall(r"%[\w.\-]+", operands)):
            if partial or (body and not _reads_whole(body, i)):
                continue
            io += shapes.get(o, [])
        xb = sum(n * b for n, b in io if n == nelem)
        ab = sum(n * b for n, b in io)
        kernels.append((name, op, xb / nbytes))
        x_bytes, all_bytes = x_bytes + xb, all_bytes + ab
    return dict(
        kernels=len(kernels),
        S=x_bytes / nbytes,
        all_S=all_bytes / nbytes,
        bytes=all_bytes,
        control=sorted(set(control)),
        detail=kernels,
    )


# ---------------------------------------------------------------------------
# The target


@functools.cache
def target(platform: str = "cuda"):
    """The device of a deviceless topology: XLA's H100 SXM description."""
    from jax.experimental import topologies

    with open(os.path.join(HERE, "h100_sxm.txtpb")) as f:
        topo = topologies.get_topology_desc(
            platform=platform, topology="1x1x1", target_config=f.read()
        )
    return topo.devices[0]


def spec(shape, dtype, platform):
    sharding = jax.sharding.SingleDeviceSharding(target(platform))
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)


def compiled_text(f, args, platform: str) -> str:
    lowered = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,))
    return lowered.compile().as_text()


# ---------------------------------------------------------------------------
# The functions compared


def normalizer(name: str, axis: tuple[int, ...], fshape, *, training=True, act=None, **kw):
    """``f(x, g, b, r=None) -> y``: one competitor's training (or eval) normalization.

    ``act`` (``"relu"``, ``"leaky_relu"``) is applied to ``y + r``: fused for jaxbn
    (``batch_norm_act``; ``kw`` may hold ``inplace=True``), after the normalization
    for the others. ``name`` is ``jaxbn``, ``jaxbn_unfused`` (``batch_norm`` then
    ``act``), ``flax`` (Flax's default, fast variance), ``flax_stable``
    (``use_fast_variance=False``) or ``autodiff``.
    """
    import jaxbn

    mask = kw.pop("mask", None)

    def activate(y, r):
        y = y if r is None else y + r
        if act == "relu":
            return jax.nn.relu(y)
        return jax.nn.leaky_relu(y, 0.01) if act == "leaky_relu" else y

    if name == "jaxbn" and act is not None:

        def f(x, g, b, r=None):
            st = jaxbn.init_state(fshape)
            return jaxbn.batch_norm_act(
                x,
                g,
                b,
                st,
                training=training,
                activation=act,
                residual=r,
                axis=axis,
                eps=EPS,
                mask=mask,
                **kw,
            )[0]

        return f
    if name in ("jaxbn", "jaxbn_unfused"):

        def f(x, g, b, r=None):
            st = jaxbn.init_state(fshape)
            y = jaxbn.batch_norm(
                x, g, b, st, training=training, axis=axis, eps=EPS, mask=mask, **kw
            )[0]
            return activate(y, r)

        return f
    if name == "autodiff":
        assert training and mask is None
        from cpu_bench import _plain  # the textbook forward of the CPU benchmark

        state = {"mean": jnp.zeros(fshape), "var": jnp.ones(fshape)}
        return lambda x, g, b, r=None: activate(_plain(x, g, b, state, axis, True)[0], r)
    import flax.linen as nn

    bn = nn.BatchNorm(
        use_running_average=not training, axis=axis, epsilon=EPS, use_fast_variance=name == "flax"
    )

    def f(x, g, b, r=None):
        stats = {"mean": jnp.zeros(fshape), "var": jnp.ones(fshape)}
        variables = {"params": {"scale": g, "bias": b}, "batch_stats": stats}
        if training:
            y, _ = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
        else:
            y = bn.apply(variables, x, mask=mask)
        return activate(y, r)

    return f


# ---------------------------------------------------------------------------
# The cases

LAYOUTS = {  # name: (shape, feature axes)
    "NHWC": ((64, 32, 32, 128), (3,)),
    "NCHW": ((64, 128, 32, 32), (1,)),
    "(N, D)": ((4096, 1024), (1,)),
    "two axes": ((64, 32, 32, 128), (2, 3)),
}
CORE_MODES = ("fwd", "eval", "bwd", "fb")
NHWC_MODES = (
    "fb relu",
    "fused relu",
    "fused leaky+res",
    "fused inplace",
    "masked fwd",
    "masked fb",
    "shard_map fb",
    "linen step",
    "nnx step",
)
FLOORS = {"fwd": 3, "eval": 2, "bwd": 5, "fb": 6, "fb relu": 6, "fused relu": 6}
FLOORS.update({"fused leaky+res": 9, "fused inplace": 6, "masked fwd": 3, "masked fb": 6})
FLOORS.update({"shard_map fb": 6, "linen step": 6, "nnx step": 6})
COMPETITORS = ("jaxbn", "flax", "flax_stable", "autodiff")
# Where XLA:GPU (jax 0.10.2) keeps jaxbn above its floor, and why; --check holds these to the
# figure given (a regression still fails). In bfloat16 it writes the relu's mask (fused) or
# the relu's dy (batch_norm then jax.nn.relu) once and reads it in the backward's two
# passes, where in float32 it recomputes it in each; the same happens in Flax's program.
KNOWN = {
    ("fb relu", "NHWC", "bfloat16"): 10.0,
    ("fused relu", "NHWC", "bfloat16"): 8.5,
    ("fused leaky+res", "NHWC", "bfloat16"): 11.5,
    ("fused inplace", "NHWC", "bfloat16"): 8.0,
}


def _loss_grad(f, argnums):
    """``value_and_grad`` of ``sum(f(...) * w)``, ``w`` the last argument."""

    def fb(*args):
        *inputs, w = args
        loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w.astype(jnp.float32))  # noqa: E731
        return jax.value_and_grad(loss, argnums)(*inputs)

    return fb


def _module_step(kind: str, name: str, axis, fshape, platform):
    """A linen or nnx training step of a batch-norm-only model: loss, grads, new statistics."""
    import flax.linen as nn
    from flax import nnx

    import jaxbn.linen
    import jaxbn.nnx

    if kind == "linen":
        cls = jaxbn.linen.BatchNorm if name == "jaxbn" else nn.BatchNorm
        kw = {} if name == "jaxbn" else {"use_fast_variance": name == "flax"}
        bn = cls(use_running_average=False, axis=axis, epsilon=EPS, **kw)

        def step(params, stats, x, w):
            def loss(params, x):
                y, upd = bn.apply(
                    {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
                )
                return jnp.sum(y.astype(jnp.float32) * w.astype(jnp.float32)), upd

            (value, upd), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
            return value, grads, upd["batch_stats"]

        vec = lambda: spec(fshape, "float32", platform)  # noqa: E731
        return step, ({"scale": vec(), "bias": vec()}, {"mean": vec(), "var": vec()})
    cls = jaxbn.nnx.BatchNorm if name == "jaxbn" else nnx.BatchNorm
    kw = {} if name == "jaxbn" else {"use_fast_variance": name == "flax"}
    feats = fshape[0] if len(fshape) == 1 else fshape
    model = cls(feats, axis=axis, epsilon=EPS, rngs=nnx.Rngs(0), **kw)
    graphdef, state = nnx.split(model)

    def step(state, x, w):
        model = nnx.merge(graphdef, state)

        def loss(model, x):
            return jnp.sum(model(x).astype(jnp.float32) * w.astype(jnp.float32))

        value, grads = nnx.value_and_grad(loss, argnums=(0, 1))(model, x)
        return value, grads, nnx.state(model)

    state_spec = jax.tree.map(lambda a: spec(a.shape, a.dtype, platform), state)
    return step, (state_spec,)


def program_of(mode, name, layout, dtype, platform):
    """``(function, argument specs)`` of one case, or None where ``name`` has no such case."""
    shape, axis = LAYOUTS[layout]
    fshape = tuple(shape[a] for a in axis)
    x, w = spec(shape, dtype, platform), spec(shape, dtype, platform)
    g, b = spec(fshape, "float32", platform), spec(fshape, "float32", platform)
    plain = name == "autodiff"
    if plain and mode not in ("fwd", "fb", "bwd", "fb relu"):
        return None
    if mode in ("fwd", "eval"):
        return normalizer(name, axis, fshape, training=mode == "fwd"), (x, g, b)
    if mode == "fb":
        return _loss_grad(normalizer(name, axis, fshape), (0, 1, 2)), (x, g, b, w)
    if mode == "bwd":
        f = normalizer(name, axis, fshape)
        vjp_shape = jax.eval_shape(lambda x, g, b: jax.vjp(f, x, g, b)[1], x, g, b)
        leaves, tree = jax.tree.flatten(vjp_shape)
        res = [spec(a.shape, a.dtype, platform) for a in leaves]

        def bwd(res, dy):
            return jax.tree.unflatten(tree, res)(dy)

        out = jax.eval_shape(f, x, g, b)  # Flax returns float32 for bfloat16 x
        return bwd, (res, spec(out.shape, out.dtype, platform))
    if mode == "fb relu":
        unfused = "jaxbn_unfused" if name == "jaxbn" else name
        return _loss_grad(normalizer(unfused, axis, fshape, act="relu"), (0, 1, 2)), (x, g, b, w)
    if mode == "fused relu":
        return _loss_grad(normalizer(name, axis, fshape, act="relu"), (0, 1, 2)), (x, g, b, w)
    if mode == "fused leaky+res":
        f = normalizer(name, axis, fshape, act="leaky_relu")
        return _loss_grad(f, (0, 1, 2, 3)), (x, g, b, spec(shape, dtype, platform), w)
    if mode == "fused inplace":
        kw = {"inplace": True} if name == "jaxbn" else {}
        f = normalizer(name, axis, fshape, act="leaky_relu", **kw)
        return _loss_grad(f, (0, 1, 2)), (x, g, b, w)
    if mode.startswith("masked"):
        mshape = (shape[0],) + (1,) * (len(shape) - 1)

        def masked(x, g, b, m, *rest):
            f = normalizer(name, axis, fshape, mask=m)
            if mode == "masked fwd":
                return f(x, g, b)
            return _loss_grad(f, (0, 1, 2))(x, g, b, *rest)

        m = spec(mshape, "bool", platform)
        return masked, (x, g, b, m) if mode == "masked fwd" else (x, g, b, m, w)
    if mode == "shard_map fb":
        return _shard_map_fb(name, axis, fshape, platform), (x, g, b, w)
    kind = mode.split()[0]
    step, state = _module_step(kind, name, axis, fshape, platform)
    return step, (*state, x, w)


def _shard_map_fb(name, axis, fshape, platform):
    """``fb`` inside ``shard_map`` with ``axis_name`` (a one-device mesh: the collective stays)."""
    from jax.sharding import PartitionSpec as P

    import jaxbn

    mesh = jax.sharding.Mesh([target(platform)], ("batch",))

    if name == "jaxbn":

        def f(x, g, b):
            st = jaxbn.init_state(fshape)
            return jaxbn.batch_norm(
                x, g, b, st, training=True, axis=axis, eps=EPS, axis_name="batch"
            )[0]
    else:
        import flax.linen as nn

        bn = nn.BatchNorm(
            False, axis=axis, epsilon=EPS, axis_name="batch", use_fast_variance=name == "flax"
        )

        def f(x, g, b):
            v = {
                "params": {"scale": g, "bias": b},
                "batch_stats": {"mean": jnp.zeros(fshape), "var": jnp.ones(fshape)},
            }
            return bn.apply(v, x, mutable=["batch_stats"])[0]

    fb = _loss_grad(f, (0, 1, 2))
    return jax.shard_map(
        fb,
        mesh=mesh,
        in_specs=(P("batch"), P(), P(), P("batch")),
        out_specs=(P(), (P("batch"), P(), P())),
        check_vma=False,
    )


def cases(quick: bool = False):
    """``(mode, layout, dtype)`` in report order."""
    out = []
    for dtype in ("float32", "bfloat16"):
        for layout in LAYOUTS:
            if quick and layout not in ("NHWC", "(N, D)"):
                continue
            out += [(mode, layout, dtype) for mode in CORE_MODES]
        out += [(mode, "NHWC", dtype) for mode in NHWC_MODES]
    return out


def measure(platform: str = "cuda", quick: bool = False, competitors=COMPETITORS, log=print):
    rows = []
    for mode, layout, dtype in cases(quick):
        shape, _ = LAYOUTS[layout]
        nelem = math.prod(shape)
        nbytes = nelem * jnp.dtype(dtype).itemsize
        row = dict(mode=mode, layout=layout, shape=list(shape), dtype=dtype, floor=FLOORS[mode])
        t0 = time.perf_counter()
        for name in competitors:
            case = program_of(mode, name, layout, dtype, platform)
            if case is None:
                continue
            text = compiled_text(case[0], case[1], platform)
            t = traffic(text, nelem, nbytes)
            t["us"] = t.pop("bytes") / BANDWIDTH[platform] * 1e6
            t.pop("detail")
            row[name] = t
        rows.append(row)
        log(format_row(row) + f"   [{time.perf_counter() - t0:.1f} s]")
    return rows


def resnet_step(kind: str, dtype: str, platform: str, batch: int = 128, width: int = 64):
    """A CIFAR ResNet-18 SGD step (``benchmarks/resnet_memory.py``'s model), relu."""
    import optax

    sys.path.insert(0, HERE)
    from resnet_memory import ResNet18, train_step

    dt = None if dtype == "float32" else jnp.dtype(dtype)
    model = ResNet18(width, kind, activation="relu", dtype=dt)
    x = jnp.zeros((batch, 32, 32, 3), dtype)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, False))
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = jax.eval_shape(tx.init, variables["params"])
    as_spec = lambda t: jax.tree.map(lambda a: spec(a.shape, a.dtype, platform), t)  # noqa: E731
    args = (
        as_spec(variables["params"]),
        as_spec(variables["batch_stats"]),
        as_spec(opt_state),
        spec(x.shape, x.dtype, platform),
        spec((batch,), "int32", platform),
    )
    return train_step(model, tx), args


def _is_convolution(line: str) -> bool:
    return "custom-call(" in line and "$conv" in line


def measure_resnet(platform: str = "cuda", log=print):
    """Bytes a ResNet-18 step moves outside its convolutions: Flax, jaxbn, jaxbn fused."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        row = dict(dtype=dtype)
        for kind in ("flax", "jaxbn", "fused"):
            text = compiled_text(*resnet_step(kind, dtype, platform), platform)
            t = traffic(text, -1, 1, skip=_is_convolution)
            row[kind] = dict(kernels=t["kernels"], GB=t["bytes"] / 1e9)
            row[kind]["ms"] = t["bytes"] / BANDWIDTH[platform] * 1e3
        rows.append(row)
        cells = "  ".join(
            f"{k}: {row[k]['GB']:.2f} GB, {row[k]['kernels']} k" for k in ("flax", "jaxbn", "fused")
        )
        log(f"ResNet-18 step {dtype:<9} outside convolutions  {cells}")
    return rows


# ---------------------------------------------------------------------------
# Report and check


def _cell(t) -> str:
    if t is None:
        return "-"
    flag = " control!" if t["control"] else ""
    return f"{t['S']:g} S / {t['kernels']} k{flag}"


def format_row(row) -> str:
    cells = "  ".join(f"{n}: {_cell(row.get(n)):<14}" for n in COMPETITORS)
    return (
        f"{row['mode']:<16} {row['layout']:<9} {row['dtype']:<9} floor {row['floor']:>2}  {cells}"
    )


def format_markdown(rows, platform: str) -> str:
    device = "H100 SXM"
    head = (
        f"| case | layout | dtype | floor | jaxbn | Flax default | Flax stable | autodiff | "
        f"jaxbn us at {device} bandwidth |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for r in rows:
        us = r["jaxbn"]["us"]
        lines.append(
            f"| {r['mode']} | {r['layout']} | {r['dtype']} | {r['floor']} S | "
            + " | ".join(_cell(r.get(n)) for n in COMPETITORS)
            + f" | {us:.1f} |"
        )
    return "\n".join(lines) + "\n"


def format_resnet_markdown(rows) -> str:
    lines = [
        "| ResNet-18 step, outside convolutions | Flax BN + relu | jaxbn BN + relu | jaxbn fused relu |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = []
        for k in ("flax", "jaxbn", "fused"):
            ratio = "" if k == "flax" else f" ({r[k]['GB'] / r['flax']['GB']:.2f}x)"
            cells.append(f"{r[k]['GB']:.2f} GB, {r[k]['ms']:.2f} ms{ratio}")
        lines.append(f"| {r['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check(rows, resnet=()) -> list[str]:
    """The jaxbn cases over their floor, over Flax's default, with control flow or many kernels."""
    bad = []
    for r in resnet:
        for k in ("jaxbn", "fused"):
            if r[k]["GB"] > r["flax"]["GB"]:
                bad.append(
                    f"ResNet-18 {r['dtype']} {k}: {r[k]['GB']:.2f} GB, Flax {r['flax']['GB']:.2f}"
                )
    for r in rows:
        ours, flax = r["jaxbn"], r.get("flax")
        where = f"{r['mode']} {r['layout']} {r['dtype']}"
        known = KNOWN.get((r["mode"], r["layout"], r["dtype"]))
        if known is not None:
            if ours["S"] > known + 1e-9:
                bad.append(f"{where}: {ours['S']:g} S, over the known {known:g} S")
        elif ours["S"] > r["floor"] + 1e-9:
            bad.append(f"{where}: {ours['S']:g} S, over its floor of {r['floor']} S")
        if known is None and flax is not None and ours["S"] > flax["S"] + 1e-9:
            bad.append(f"{where}: {ours['S']:g} S, over Flax's {flax['S']:g} S")
        if ours["control"]:
            bad.append(f"{where}: control flow {ours['control']}")
        if flax is not None and ours["kernels"] > 2 * flax["kernels"] + 2:
            bad.append(f"{where}: {ours['kernels']} kernels, Flax {flax['kernels']}")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", choices=("cuda",), default="cuda")
    parser.add_argument("--quick", action="store_true", help="NHWC and (N, D) only")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    parser.add_argument("--check", action="store_true", help="exit 1 if a jaxbn case is over")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, compiled for {args.platform} without a device")
    rows = measure(args.platform, args.quick)
    resnet = [] if args.quick else measure_resnet(args.platform)
    if args.json:
        with open(args.json, "w") as f:
            out = dict(platform=args.platform, jax=jax.__version__, rows=rows, resnet=resnet)
            json.dump(out, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(rows, args.platform) + "\n" + format_resnet_markdown(resnet))
    bad = check(rows, resnet)
    for line in bad:
        print("OVER:", line)
    if not bad:
        print(f"every jaxbn case at its floor and not over Flax's ({len(rows)} cases)")
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
