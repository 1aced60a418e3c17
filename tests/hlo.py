"""Reading a lowered program: its StableHLO text for a platform, the reductions over
x-sized operands, and the control flow and barriers a clean program must not have."""

import re

import jax
import numpy as np


def lowered(f, *args, platform="cuda"):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def x_reductions(text, size):
    """The reduce ops of the module that read an operand with ``size`` elements."""
    found = []
    for line in text.splitlines():
        if "stablehlo.reduce" not in line or "applies" in line and "stablehlo.reduce(" not in line:
            continue
        sig = line.rsplit(":", 1)[-1]
        operands = sig.split("->")[0]
        dims = re.findall(r"tensor<([0-9x]+)x[a-z]+[0-9]*>", operands)
        if any(int(np.prod([int(d) for d in ds.split("x")])) == size for ds in dims):
            found.append(line.strip())
    return found


def assert_clean(text):
    """No control flow and no barrier, but lax.platform_dependent's switch: lowered for one
    platform, a case of constants picks the one branch kept, in a one-branch case that XLA
    inlines before compiling anything (the compiled H100 program: benchmarks/gpu_program.py)."""
    picks = re.findall(r'(%\w+) = "stablehlo.case"\(%c\w*\)', text)
    kept = sum(len(re.findall(rf'"stablehlo.case"\({p}\)', text)) for p in picks)
    assert text.count('"stablehlo.case"') == len(picks) + kept, "stablehlo.case"
    for op in ("stablehlo.if", "stablehlo.while", "optimization_barrier"):
        assert op not in text, op
