"""``python -m jaxbn demo``: the table, the PNG, determinism and import hygiene."""

import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from jaxbn.cli import demo as _demo
from jaxbn.cli import main

ROW = re.compile(r"^(without|with) batch norm\s+([01]\.\d{4})\s+(\d+|never)\s+(\d+\.\d)$", re.M)


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_demo_prints_the_table_and_saves_the_curves(tmp_path, user_env):
    out = tmp_path / "curves" / "demo.png"  # a folder that does not exist yet
    # as a user runs it: a fresh process, XLA's default optimization (the suite's
    # level 0, tests/conftest.py, doubled the run's CPU time)
    argv = ["demo", "--epochs", "3", "--seed", "1", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "jaxbn", *argv], capture_output=True, text=True, env=user_env
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    rows = {m[0]: m for m in ROW.findall(text)}
    assert set(rows) == {"without", "with"}, text
    for _, acc, steps, wall in rows.values():
        # 3 epochs (63 steps) are enough for both to pass 90% on these digits
        assert 0.9 <= float(acc) <= 1.0, text
        assert steps != "never" and 1 <= int(steps) <= 63, text
        assert float(wall) > 0
    assert f"learning curves: {out}" in text
    assert png_size(out) == (1000, 400)  # figsize (10, 4) at dpi 100
    assert out.stat().st_size > 20_000  # two panels with curves, not an empty canvas


def test_training_is_deterministic_for_a_seed():
    data = _demo.load_digits_split()
    data = data._replace(x_train=data.x_train[:192], y_train=data.y_train[:192])  # 3 steps
    run = lambda seed: _demo.train_cnn(  # noqa: E731
        data, use_bn=True, epochs=1, seed=seed, progress=False
    )
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a.loss, b.loss)
    np.testing.assert_array_equal(a.test_acc, b.test_acc)
    assert a.steps_to_target == b.steps_to_target
    assert not np.array_equal(a.loss, c.loss)  # the seed does reach init and shuffling


def test_same_seed_gives_both_models_the_same_conv_weights():
    import jax

    plain, _ = _demo.init_cnn(jax.random.key(3), use_bn=False)
    normed, state = _demo.init_cnn(jax.random.key(3), use_bn=True)
    for p, q in zip(plain, normed):
        np.testing.assert_array_equal(p["w"], q["w"])
    assert len(state) == len(_demo.CONV_WIDTHS) and "b" not in normed[0]


def test_rejects_zero_epochs(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--epochs", "0"])
    assert exc.value.code == 2
    assert "--epochs must be at least 1, got 0" in capsys.readouterr().err


def test_import_jaxbn_needs_none_of_the_demo_dependencies():
    code = (
        "import sys; names = ('matplotlib', 'tqdm', 'sklearn', 'optax', 'flax'); "
        "loaded = lambda: [m for m in names if m in sys.modules]; "
        "import jaxbn; print(loaded()); import jaxbn.cli.demo; print(loaded())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # optax is the demo's training library; data, progress bar and plotting load
    # only when the demo runs
    assert proc.stdout.split("\n")[:2] == ["[]", "['optax']"]
