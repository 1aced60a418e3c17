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
    for op in ("stablehlo.case", "stablehlo.if", "stablehlo.while", "optimization_barrier"):
        assert op not in text, op
