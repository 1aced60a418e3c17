"""``python -m jaxbn COMMAND``: the command line of :mod:`jaxbn.cli`."""

import sys

from jaxbn.cli import main

if __name__ == "__main__":
    sys.exit(main())
