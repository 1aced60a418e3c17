"""``python -m jaxbn check``: the hand-derived backward against autodiff on this backend."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._batch_norm import batch_norm
from jaxbn._state import init_state
from jaxbn.cli.args import check_parser

CASES = [  # (layout, shape, feature axis)
    ("(N, D)", (256, 64), -1),
    ("(N, D)", (4096, 1024), -1),
    ("NHWC", (32, 16, 16, 64), -1),
    ("NCHW", (32, 64, 16, 16), 1),
    ("(N, L, H, D)", (8, 32, 4, 16), (2, 3)),
]
DTYPES = ["float32", "bfloat16"]


def _problem(shape, axis, dtype, seed=0):
    rs = np.random.RandomState(seed)
    axes = axis if isinstance(axis, tuple) else (axis,)
    fshape = tuple(shape[a] for a in axes)
    x = rs.randn(*shape) * 2 + 1
    return x, rs.rand(*fshape) + 0.5, rs.randn(*fshape), rs.randn(*shape)


def _grads_fn(axis, custom):
    def loss(x, gamma, beta, w):
        state = init_state(gamma.shape, jnp.promote_types(x.dtype, jnp.float32))
        y, _ = batch_norm(x, gamma, beta, state, training=True, axis=axis, custom_vjp=custom)
        return jnp.sum(y.astype(w.dtype) * w)

    return jax.jit(jax.grad(loss, (0, 1, 2)))


def _time(f, args, reps):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run_check(reps: int = 20, quick: bool = False, log=None) -> list[dict]:
    """Runs every case; returns rows, each also passed to ``log`` as it is measured."""
    rows = []
    cases = CASES[:1] + CASES[2:] if quick else CASES
    for layout, shape, axis in cases:
        raw = _problem(shape, axis, "float64")
        with jax.enable_x64(True):
            ref = _grads_fn(axis, custom=False)(*(jnp.asarray(v, jnp.float64) for v in raw))
            ref = [np.asarray(r) for r in ref]
        for dtype in DTYPES:
            args = [jnp.asarray(v, dtype) for v in raw[:3]] + [jnp.asarray(raw[3], jnp.float32)]
            fns = {"custom": _grads_fn(axis, True), "autodiff": _grads_fn(axis, False)}
            row = dict(layout=layout, shape=shape, axis=axis, dtype=dtype)
            for name, f in fns.items():
                row[f"err_{name}"] = max(_rel(g, r) for g, r in zip(f(*args), ref))
            for name, f in fns.items():  # timed once both are checked
                row[f"ms_{name}"] = _time(f, args, reps)
            rows.append(row)
            if log is not None:
                log(rows[-1])
    return rows


HEAD = (
    f"{'layout':<13}{'shape':<20}{'dtype':<10}{'err custom':>12}{'err autodiff':>14}"
    f"{'ms custom':>11}{'ms autodiff':>13}{'ratio':>7}"
)


def format_row(r) -> str:
    return (
        f"{r['layout']:<13}{str(r['shape']):<20}{r['dtype']:<10}{r['err_custom']:>12.1e}"
        f"{r['err_autodiff']:>14.1e}{r['ms_custom']:>11.3f}{r['ms_autodiff']:>13.3f}"
        f"{r['ms_custom'] / r['ms_autodiff']:>7.2f}"
    )


# Relative error bounds against the float64 reference, per input dtype.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def main(argv=None) -> int:
    args = check_parser().parse_args(argv)
    dev = jax.devices()[0]
    print(f"jaxbn check on {dev.platform} ({dev.device_kind}), jax {jax.__version__}")
    print("jax.grad of sum(y * w) w.r.t. x, gamma, beta under jit, with the hand-derived rule")
    print("(custom) and with autodiff of the same forward (autodiff). err: max relative error")
    print("against float64 autodiff; ms: median time of the jitted forward + backward.\n")
    print(HEAD + "\n" + "-" * len(HEAD), flush=True)
    rows = run_check(args.reps, args.quick, log=lambda r: print(format_row(r), flush=True))
    bad = [r for r in rows if r["err_custom"] > TOLERANCE[r["dtype"]]]
    print(
        f"\n{'FAIL' if bad else 'OK'}: {len(rows) - len(bad)} of {len(rows)} cases within "
        f"tolerance ({', '.join(f'{k} {v:.0e}' for k, v in TOLERANCE.items())})."
    )
    return 1 if bad else 0
