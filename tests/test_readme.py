"""README.md: short, and every Python block in it runs as written.

The README is the front page: what jaxbn is, the quickstart, a training step, the three
conventions that surprise people, the one-import swaps and links into the docs site.
Everything else is on the site (``docs/``, tested by ``test_docs.py``). Each Python
block runs on its own (a fresh namespace), in this process, so under the suite's strict
mode and 8 simulated devices (``conftest.py``); the training step is also run for a few
steps.
"""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
MAX_LINES = 200
QUICKSTART = [  # .ci/run runs these two, as written; each is complete in itself
    'python3 -m venv .venv && .venv/bin/pip install -e ".[examples]" && .venv/bin/python -m jaxbn demo',
    '.venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest -q',
]


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


def test_readme_is_short():
    lines = README.read_text("utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; the rest goes in docs/"


def test_quickstart_is_the_two_commands_ci_runs():
    # the same extraction as .ci/run's awk: the first ```bash block after the marker
    text = README.read_text("utf-8")
    after = text[text.index("<!-- quickstart") :]
    block = re.search(r"^```bash\n(.*?)^```$", after, re.M | re.S).group(1)
    assert block.splitlines() == QUICKSTART


def test_readme_has_the_blocks_we_expect():
    ids = [i for i, _ in BLOCKS]
    assert "a-training-step-1" in ids and "three-conventions-that-surprise-people-1" in ids, ids
    code = "\n".join(c for _, c in BLOCKS)
    for swap in (
        "from jaxbn.linen import BatchNorm",
        "from jaxbn.nnx import BatchNorm",
        "from jaxbn.equinox import BatchNorm",
        "from jaxbn.linen import BatchRenorm",
        "# from sbx.common.jax_layers import BatchRenorm",
    ):
        assert swap in code, f"the README lost its one-import swap: {swap}"


def test_readme_states_the_three_conventions():
    text = README.read_text("utf-8")
    for convention in (
        "**`axis` names the feature axes, which are kept**",
        "**`momentum` weighs the old value**",
        "**`training` is required**",
    ):
        assert convention in text


def test_readme_links_resolve():
    """Each relative link names a file in the tree; those in docs/ are pages of the site."""
    text = README.read_text("utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links into the docs"
    for target in local:
        assert (ROOT / target).is_file(), f"README.md links to {target}, which does not exist"
    pages = {t.removeprefix("docs/") for t in local if t.startswith("docs/")}
    nav = (ROOT / "mkdocs.yml").read_text("utf-8")
    for page in pages:
        assert re.search(rf"^\s*- (.+: )?{re.escape(page)}\s*$", nav, re.M), (
            f"{page} not in the nav"
        )
    for wanted in ("getting-started.md", "api/index.md", "integrations/flax.md"):
        assert wanted in pages


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_block_runs_as_written(code):
    run_block(code)


def test_functional_training_step_example_learns():
    scope = run_block(dict(BLOCKS)["a-training-step-1"])
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(32, 784), jnp.float32)
    labels = jnp.asarray(rs.randn(32), jnp.float32)
    params, state, opt_state = scope["params"], scope["state"], scope["opt_state"]
    losses = []
    for _ in range(20):
        params, state, opt_state, loss = scope["train_step"](params, state, opt_state, x, labels)
        losses.append(float(loss))
    assert int(state.count) == 20 and losses[-1] < losses[0]


def test_conventions_example_keeps_the_feature_axis():
    scope = run_block(dict(BLOCKS)["three-conventions-that-surprise-people-1"])
    assert scope["state"].mean.shape == (64,) and int(scope["state"].count) == 1
    assert scope["y_eval"].shape == scope["x"].shape
