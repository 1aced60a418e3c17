"""The command-line tools, apart from the library: ``jaxbn COMMAND`` (``python -m jaxbn``).

``check`` (``jaxbn.cli.check``) and ``demo`` (``jaxbn.cli.demo``) each have their own
``main(argv) -> int``, imported only when the command runs. Its arguments are parsed
first (``jaxbn.cli.args``) and its extra's packages looked up without importing them,
so ``--help``, ``--version``, a wrong option and a missing extra are answered without
importing jax. Nothing here is part of the library's API (``jaxbn.__all__``); the
benchmarks are scripts in the repository (``benchmarks/cpu_bench.py``), not in the package.
"""

from __future__ import annotations

import importlib
import sys

from jaxbn import __version__
from jaxbn.cli.args import COMMANDS, missing_message


def usage() -> str:
    head = "usage: jaxbn COMMAND [options]   (jaxbn COMMAND --help for a command's options)"
    lines = [head, "       jaxbn --version", ""]
    lines += [f"  {name:<7}{help_}" for name, (help_, *_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"jaxbn {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"jaxbn: unknown command {name!r}; expected one of {', '.join(COMMANDS)}.\n",
            file=sys.stderr,
        )
        print(usage(), file=sys.stderr)
        return 2
    _, parser, _, _ = COMMANDS[name]
    parser().parse_args(rest)  # exits here on --help or a wrong option
    message = missing_message(name)
    if message is not None:
        print(message, file=sys.stderr)
        return 1
    return importlib.import_module(f"jaxbn.cli.{name}").main(rest)
