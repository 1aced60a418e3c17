"""Every Python block of README.md runs as written, each on its own (a fresh namespace).

Blocks run in this process, so under the suite's strict mode and 8 simulated devices
(``conftest.py``). The training-step example is also run for a few steps.
"""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

README = Path(__file__).parents[1] / "README.md"


def python_blocks() -> list[tuple[str, str]]:
    """``(id, code)`` of each ```python block, the id naming the section it is in."""
    blocks, section, counts = [], "top", {}
    pattern = r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```$"  # a heading, or any fenced block
    for heading, lang, code in re.findall(pattern, README.read_text(), re.M | re.S):
        if heading:
            section = re.sub(r"\W+", "-", heading.lstrip("# ").lower()).strip("-")
        elif lang == "python":
            counts[section] = counts.get(section, 0) + 1
            blocks.append((f"{section}-{counts[section]}", code))
    return blocks


BLOCKS = python_blocks()


def run_block(code: str) -> dict:
    scope: dict = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), scope)
    return scope


def test_readme_has_the_blocks_we_expect():
    ids = [i for i, _ in BLOCKS]
    assert len(ids) >= 7 and "many-devices-1" in ids and "gradients-1" in ids, ids


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_block_runs_as_written(code):
    run_block(code)


def test_functional_training_step_example_learns():
    scope = run_block(dict(BLOCKS)["usage-1"])  # the functional training step
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(32, 784), jnp.float32)
    labels = jnp.asarray(rs.randn(32), jnp.float32)
    params, state, opt_state = scope["params"], scope["state"], scope["opt_state"]
    losses = []
    for _ in range(20):
        params, state, opt_state, loss = scope["train_step"](params, state, opt_state, x, labels)
        losses.append(float(loss))
    assert int(state.count) == 20 and losses[-1] < losses[0]


def test_shard_map_example_normalizes_with_the_global_batch():
    scope = run_block(dict(BLOCKS)["many-devices-1"])
    assert len(scope["mesh"].devices.ravel()) == 8  # conftest's simulated devices
    assert scope["y"].shape == scope["x"].shape and int(scope["state"].count) == 1
