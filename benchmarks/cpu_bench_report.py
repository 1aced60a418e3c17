"""The benchmark's report: targets, summaries, tables, and the median of several runs.

A result is the JSON document of ``cpu_bench.run``: ``rows`` (one per shape, with
per-mode times, floors and jaxbn/flax ratios), ``summary`` (this module's
``summarize``), ``machine`` and ``config``.
"""

from __future__ import annotations

import copy
import math

import numpy as np

# minimal passes over x
MODES = {"fwd": 3, "fwd+bwd": 8, "bwd": 5, "eval": 2, "fb+relu": 8, "fused+relu": 8}
TARGETS = {"fwd": 1.10, "fwd+bwd": 0.75, "bwd": 0.75, "eval": 1.00, "fused+relu": 0.70}
SMALL_BYTES = 1 << 20  # dispatch-bound below this: reported, not held to the targets


def summarize(rows) -> dict:
    """Per mode, the worst and geometric-mean jaxbn/flax ratio over shapes >= 1 MiB.

    A target of at least 1 also counts as met on a shape where jaxbn compiles to the
    same program as flax (``parity``): its ratio is then 1 but for noise.
    """
    held = [r for r in rows if r["nbytes"] >= SMALL_BYTES and r["ratio_vs_flax"]]
    out = {}
    for m, target in TARGETS.items():
        rs = [r["ratio_vs_flax"][m]["jaxbn"] for r in held]
        if rs:
            worst, geo = max(rs), math.exp(sum(map(math.log, rs)) / len(rs))
            same = [r.get("same_program_as_flax", {}).get(m, False) for r in held]
            parity = target >= 1 and any(same)
            met = all(v <= target or (s and target >= 1) for v, s in zip(rs, same))
            out[m] = dict(target=target, max=worst, geomean=geo, met=met, parity=parity)
    res = [r["residuals"]["jaxbn"]["full"] for r in rows if "jaxbn" in r["residuals"]]
    if res:
        out["residuals"] = dict(target=1.0, max=max(res), met=max(res) <= 1.0)
    return out


def median_of_runs(runs) -> dict:
    """One result whose times, floors and ratios are the medians over ``runs``."""
    out = copy.deepcopy(runs[0])
    med = lambda values: float(np.median(list(values)))  # noqa: E731
    for i, row in enumerate(out["rows"]):
        rows = [r["rows"][i] for r in runs]
        for key in ("floor_ms", "pass_gbps", "page_faults_per_call"):
            row[key] = med(r[key] for r in rows)
        for m, per in row["modes"].items():
            for k, v in per.items():
                for field in ("ms", "ms_min", "x_floor"):
                    v[field] = med(r["modes"][m][k][field] for r in rows)
        for m, per in row["ratio_vs_flax"].items():
            for k in per:
                per[k] = med(r["ratio_vs_flax"][m][k] for r in rows)
        for m in row["same_program_as_flax"]:
            row["same_program_as_flax"][m] = all(r["same_program_as_flax"][m] for r in rows)
    out["summary"] = summarize(out["rows"])
    out["config"]["runs"] = len(runs)
    return out


def format_table(result) -> str:
    """The results as text: times, ratios and floors; residuals; targets."""
    comps, nan = result["competitors"], float("nan")
    head = f"{'shape':<23}{'dtype':<9}{'mode':<8}" + "".join(f"{c:>12}" for c in comps)
    head += f"{'jaxbn/flax':>11}{'jaxbn xfloor':>13}{'flax xfloor':>12}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        shape = f"{tuple(r['shape'])} ax{r['axis']}"
        for m, v in r["modes"].items():
            line = f"{shape:<23}{r['dtype']:<9}{m:<8}"
            line += "".join(f"{v[c]['ms']:>12.3f}" for c in comps)
            ratio = r["ratio_vs_flax"].get(m, {}).get("jaxbn", nan)
            floors = [v.get(c, {}).get("x_floor", nan) for c in ("jaxbn", "flax")]
            lines.append(line + f"{ratio:>11.2f}{floors[0]:>13.2f}{floors[1]:>12.2f}")
            shape = ""
        lines.append(
            f"{'':<32}floor: x*a+b {r['floor_ms']:.3f} ms, {r['pass_gbps']:.1f} GB/s per pass,"
            f" {r['page_faults_per_call']:.0f} page faults per call"
        )
    lines += ["", "residuals / x bytes: full-size buffers (all buffers)"]
    lines.append(f"{'shape':<23}{'dtype':<9}" + "".join(f"{c:>15}" for c in comps))
    for r in result["rows"]:
        res = [r["residuals"][c] for c in comps]
        cells = "".join(f"{v['full']:>7.2f} ({v['all']:.3f})" for v in res)
        lines.append(f"{str(tuple(r['shape'])):<23}{r['dtype']:<9}{cells}")
    odd = {(c, d) for r in result["rows"] for c, d in r["output_dtype"].items() if d != r["dtype"]}
    for c, d in sorted(odd):
        lines.append(f"note: {c} returns {d} for a lower-precision input (float32 parameters)")
    lines += ["", f"targets, jaxbn / flax default (shapes >= {SMALL_BYTES >> 20} MiB):"]
    for m, s in result["summary"].items():
        geo = f", geomean {s['geomean']:.2f}" if "geomean" in s else ""
        met = "met" if s["met"] else "NOT met"
        if s.get("parity"):
            met += " (the same compiled program as flax's on some shapes: their ratio is noise)"
        lines.append(f"  {m:<10}<= {s['target']:.2f}: worst {s['max']:.2f}{geo}  {met}")
    return "\n".join(lines)


def format_markdown(result) -> str:
    """One row per shape: jaxbn ms / flax ms (ratio) per mode, and the residuals."""
    head = "| shape, feature axis | dtype | " + " | ".join(MODES) + " | residuals |"
    lines = [head, "|" + " --- |" * (len(MODES) + 3)]
    for r in result["rows"]:
        cells = [
            f"{v['jaxbn']['ms']:.3g} / {v['flax']['ms']:.3g} ({r['ratio_vs_flax'][m]['jaxbn']:.2f})"
            for m, v in r["modes"].items()
        ]
        res = f"{r['residuals']['jaxbn']['full']:.1f} / {r['residuals']['flax']['full']:.1f}"
        lines.append(
            f"| {tuple(r['shape'])}, {r['axis']} | {r['dtype']} | {' | '.join(cells)} | {res} |"
        )
    return "\n".join(lines)


def compare(runs) -> str:
    """jaxbn/flax ratios side by side for runs under different allocators."""
    lines = ["jaxbn/flax by allocator: " + " | ".join(r["machine"]["allocator"] for r in runs)]
    for rows in zip(*(r["rows"] for r in runs)):
        cells = [
            f"{m} " + "|".join(f"{r['ratio_vs_flax'][m]['jaxbn']:.2f}" for r in rows) for m in MODES
        ]
        lines.append(f"  {str(tuple(rows[0]['shape'])):<20}{rows[0]['dtype']:<9}{'  '.join(cells)}")
    return "\n".join(lines)
