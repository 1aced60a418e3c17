"""The README's main job: ``python -m jaxbn check``."""

import subprocess
import sys

from jaxbn.__main__ import main


def test_check_prints_a_passing_table(capsys):
    assert main(["check", "--quick", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    assert "NCHW" in out and "bfloat16" in out
    assert "OK: 8 of 8 cases within tolerance" in out


def test_module_entry_point_rejects_unknown_commands():
    proc = subprocess.run([sys.executable, "-m", "jaxbn", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown command 'nope'" in proc.stderr
