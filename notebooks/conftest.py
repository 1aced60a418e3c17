"""Keeps pytest from importing the notebooks' jupytext pairs.

With ``--doctest-modules`` (pyproject's addopts) every ``.py`` file under a collected
directory is imported to look for doctests, which would run a whole notebook.
The notebooks are executed by ``tests/test_notebooks.py`` instead.
"""

collect_ignore_glob = ["[0-9][0-9]_*.py"]
