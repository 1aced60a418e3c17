"""The commands' argument parsers and what each needs installed, importing neither jax nor numpy.

``jaxbn COMMAND --help`` and a missing extra are answered from here, before the
command's own module (which imports jax) loads.
"""

from __future__ import annotations

import argparse
import importlib.util


def check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxbn check",
        description="Checks the hand-derived backward against float64 autodiff on this "
        "backend (CPU or GPU) and times it against autodiff of the same forward.",
    )
    p.add_argument("--reps", type=int, default=20, help="timing repetitions (default 20)")
    p.add_argument("--quick", action="store_true", help="skip the largest shape")
    return p


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxbn demo",
        description="Trains a small CNN on scikit-learn's 8x8 digits twice, without and with "
        "batch norm, from the same weights and batches; prints a table and saves the "
        "learning curves.",
        epilog='Needs optax, scikit-learn and matplotlib: pip install "jaxbn[examples]".',
    )
    p.add_argument("--epochs", type=int, default=20, help="epochs per run (default 20)")
    p.add_argument("--seed", type=int, default=0, help="init and shuffling seed (default 0)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    p.add_argument(
        "--out", default="jaxbn-demo.png", help="learning-curve PNG (default ./jaxbn-demo.png)"
    )
    return p


# name (module jaxbn.cli.NAME): (one-line help, parser, (import name, distribution) it needs, extra)
COMMANDS = {
    "check": ("hand-derived backward vs float64 autodiff on this backend", check_parser, (), None),
    "demo": (
        "train a small CNN on sklearn's digits with and without batch norm",
        demo_parser,
        (("optax", "optax"), ("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")),
        "examples",
    ),
}


def _join(words) -> str:
    words = list(words)
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


def missing_message(name: str) -> str | None:
    """What to install for command ``name``, or None when nothing is missing."""
    _, _, needs, extra = COMMANDS[name]
    missing = [dist for module, dist in needs if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    if len(missing) == len(needs):
        what = f"{_join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed"
    else:
        verb = "is" if len(missing) == 1 else "are"
        what = f"{_join(dist for _, dist in needs)} ({_join(missing)} {verb} not installed)"
    it = "it" if len(needs) == 1 else "them"
    return f'jaxbn {name} needs {what}; install {it} with pip install "jaxbn[{extra}]".'
