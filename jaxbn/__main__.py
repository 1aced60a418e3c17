"""Command line: ``python -m jaxbn COMMAND`` (also the ``jaxbn`` console script).

Each command lives in its own module with its own ``main(argv) -> int`` and argument
parser, imported only when it runs (``import jaxbn`` needs only jax).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "check": ("jaxbn._check", "hand-derived backward vs float64 autodiff on this backend"),
    "demo": ("jaxbn._demo", "train a small CNN on sklearn's digits with and without batch norm"),
    "bench": ("jaxbn._bench", "benchmark against Flax and the memory-traffic floor"),
}


def usage() -> str:
    lines = ["usage: jaxbn COMMAND [options]   (jaxbn COMMAND --help for a command's options)", ""]
    lines += [f"  {name:<7}{help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"jaxbn: unknown command {name!r}; expected one of {', '.join(COMMANDS)}.\n",
            file=sys.stderr,
        )
        print(usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
