"""The README's first usage example runs as written."""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

README = Path(__file__).parents[1] / "README.md"


def test_functional_training_step_example_runs_and_learns():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    scope: dict = {}
    exec(blocks[0], scope)  # the functional training step
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(32, 784), jnp.float32)
    labels = jnp.asarray(rs.randn(32), jnp.float32)
    params, state, opt_state = scope["params"], scope["state"], scope["opt_state"]
    losses = []
    for _ in range(20):
        params, state, opt_state, loss = scope["train_step"](params, state, opt_state, x, labels)
        losses.append(float(loss))
    assert int(state.count) == 20 and losses[-1] < losses[0]
