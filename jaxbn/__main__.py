"""Command line: ``python -m jaxbn check`` (and the ``jaxbn`` console script)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxbn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="hand-derived backward vs autodiff on this backend")
    check.add_argument("--reps", type=int, default=20, help="timing repetitions (default 20)")
    check.add_argument("--quick", action="store_true", help="skip the largest shape")
    args = parser.parse_args(argv)
    if args.command == "check":
        from jaxbn._check import main as check_main

        return check_main(args.reps, args.quick)
    return 2


if __name__ == "__main__":
    sys.exit(main())
