"""examples/train_digits.py trains to its stated test accuracy."""

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("sklearn")

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "train_digits.py"


def test_train_digits_reaches_stated_accuracy(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_digits", example)  # dataclasses look it up
    spec.loader.exec_module(example)
    accuracy = example.main()
    assert accuracy >= 0.97
    assert f"test accuracy {accuracy:.4f}" in capsys.readouterr().out.splitlines()[-1]
