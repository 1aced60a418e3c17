"""``benchmarks/cpu_bench.py`` on tiny shapes: the table, the JSON and the residual count.

Structure only: speed lives in the benchmark, never in a test. The scripts in
``benchmarks/`` are imported as modules (pyproject's pytest ``pythonpath``).
"""

import contextlib
import copy
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import cpu_bench as bench
import gpu_bench
import jax
import jax.numpy as jnp
import pytest

import jaxbn


@pytest.fixture(scope="session")  # not "module": xdist may run another file's tests between
def quick_run(tmp_path_factory):
    """One quick run on a tiny (N, C) shape, features last: its printed table and its JSON
    result (a bench run compiles every mode of every competitor; the tests below share
    one). Caches are left warm here: the gpu script's test below runs the evicting path,
    on an NCHW shape."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--quick", "--reps", "2", "--warmup", "1", "--shape", "32x8", "--warm-cache"]
    argv += ["--allocator", "current", "--json", str(path)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main(argv) == 0
    return out.getvalue(), json.loads(path.read_text())


def test_quick_run_prints_the_table_and_writes_the_json(quick_run):
    out, result = quick_run
    texts = ("jaxbn/flax", "xfloor", "floor: x*a+b", "residuals / x bytes", "allocator: ")
    for text in texts + ("warm caches",):
        assert text in out
    assert result["competitors"] == ["jaxbn", "flax", "flax_stable", "autodiff"]
    assert [r["shape"] for r in result["rows"]] == [[32, 8]]
    assert not result["config"]["cold_cache"]
    for row in result["rows"]:
        assert set(row["modes"]) == {"fwd", "fwd+bwd", "bwd", "eval", "fb+relu", "fused+relu"}
        for mode in row["modes"].values():
            assert set(mode) == set(result["competitors"])
            assert all(v["ms"] > 0 and v["x_floor"] > 0 for v in mode.values())
        assert row["ratio_vs_flax"]["bwd"]["flax"] == 1.0
        assert row["residuals"]["jaxbn"]["full"] == 1.0
        # eval compiles to flax's program; training does not (other statistics, custom rule)
        assert row["same_program_as_flax"] == {
            "fwd": False,
            "fwd+bwd": False,
            "bwd": False,
            "eval": True,
            "fb+relu": False,
            "fused+relu": False,
        }
    # tiny shapes are dispatch-bound: only the residuals are held to a target
    assert set(result["summary"]) == {"residuals"} and result["summary"]["residuals"]["met"]
    assert result["machine"]["allocator"] == bench.allocator()


def test_residual_bytes_counts_each_buffer_once():
    x, g = jnp.ones((32, 8)), jnp.ones(8)  # x is 1024 bytes, g 32

    @jax.custom_vjp
    def twice(x):
        return 2 * x

    twice.defvjp(lambda x: (2 * x, (x, x, x[0])), lambda res, ct: (2 * ct,))
    assert bench.residual_bytes(twice, x) == dict(
        full=1.0, all=1056 / 1024, full_bytes=1024, all_bytes=1056
    )
    assert bench.residual_bytes(lambda x, g: x * g[None], x, g)["all"] == 1056 / 1024
    assert bench.residual_bytes(lambda x, y: jnp.sin(x) * y, x, x + 1)["full"] == 3.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jaxbn_keeps_only_x_for_the_backward(dtype):
    x = jnp.ones((64, 8, 4, 4), dtype)
    gamma, beta, state = jnp.ones(8), jnp.zeros(8), jaxbn.init_state(8)

    def y_of(x, gamma, beta):
        return jaxbn.batch_norm(x, gamma, beta, state, training=True, axis=1)[0]

    res = bench.residual_bytes(y_of, x, gamma, beta)
    assert res["full"] == 1.0
    assert res["all"] < 1.05  # and a few per-feature vectors


def test_program_ignores_names_but_not_operations():
    x, a = jnp.ones((16, 4)), jnp.ones((1, 4))
    assert bench.program(lambda x, a: x * a, x, a) == bench.program(lambda y, b: y * b, x, a)
    assert bench.program(lambda x, a: x * a, x, a) != bench.program(lambda x, a: x + a, x, a)


def test_parity_meets_a_target_of_one_but_not_below():
    row = dict(nbytes=1 << 20, residuals={})
    row["ratio_vs_flax"] = {m: {"jaxbn": 1.03} for m in bench.MODES}
    row["same_program_as_flax"] = {m: m == "eval" for m in bench.MODES}
    summary = bench.summarize([row])
    assert summary["eval"]["met"] and summary["eval"]["parity"]
    assert not summary["fwd+bwd"]["met"]  # same program would not meet 0.75 either
    row["same_program_as_flax"]["eval"] = False
    assert not bench.summarize([row])["eval"]["met"]


def test_bad_shape_option_says_what_it_expected(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--shape", "64xC", "--allocator", "current"])
    assert "expected sizes joined by 'x'" in capsys.readouterr().err


def test_without_flax_it_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "flax", None)  # find_spec then reports it missing
    assert bench.main(["--quick", "--allocator", "current"]) == 1
    assert capsys.readouterr().err == (
        'cpu_bench.py needs flax, which is not installed; install it with pip install "jaxbn[flax]".\n'
    )


def test_runs_as_a_script_from_any_directory(tmp_path):
    # the modules beside it are found from the script's own folder
    script = Path(__file__).parents[1] / "benchmarks" / "cpu_bench.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: cpu_bench.py") and "--allocator" in proc.stdout


def test_child_processes_get_every_option_but_allocator_and_json():
    argv = ["--quick", "--allocator", "both", "--json", "a.json", "--reps=3", "--json=b"]
    assert bench.child_argv(argv + ["--runs", "3"]) == ["--quick", "--reps=3", "--runs", "3"]
    assert bench.child_argv(argv + ["--runs", "3"], bench.RUN_OWN) == ["--quick", "--reps=3"]


def test_median_of_runs_takes_each_cells_median_and_resummarizes(quick_run):
    one = copy.deepcopy(quick_run[1])
    one["rows"][0]["nbytes"] = 1 << 20  # a shape the summary holds to the targets
    runs = []
    for ratio in (0.5, 2.0, 0.9):
        r = copy.deepcopy(one)
        r["rows"][0]["ratio_vs_flax"]["fwd"]["jaxbn"] = ratio
        r["rows"][0]["modes"]["bwd"]["flax"]["ms"] = 10 * ratio
        runs.append(r)
    merged = bench.median_of_runs(runs)
    assert merged["rows"][0]["ratio_vs_flax"]["fwd"]["jaxbn"] == 0.9
    assert merged["rows"][0]["modes"]["bwd"]["flax"]["ms"] == 9.0
    assert merged["summary"]["fwd"]["max"] == 0.9 and merged["summary"]["fwd"]["met"]
    assert (
        merged["config"]["runs"] == 3 and runs[0]["rows"][0]["ratio_vs_flax"]["fwd"]["jaxbn"] == 0.5
    )


def test_gpu_script_runs_on_cpu_when_asked(tmp_path, capsys):
    # the one prepared command a GPU session runs: checked here, torch or not
    has_torch = importlib.util.find_spec("torch") is not None
    out, md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    argv = ["--allow-cpu", "--shape", "4x8x3x3:1", "--reps", "1", "--warmup", "0"]
    argv += ["--kernelbench-shape", "2x4x3x3"]
    assert gpu_bench.main(argv + ["--json", str(out), "--markdown", str(md)]) == 0
    assert "jaxbn/torch" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["config"]["cold_cache"]  # caches evicted before each call, as on the GPU
    row = result["rows"][0]
    expected = {f"{f}/{m}" for f in ("NCHW", "channels_last") for m in bench.MODES}
    assert set(row["torch"]) == (expected if has_torch else set())
    assert {"min_copy_fraction", "max_vs_torch", "max_vs_flax", "met"} <= set(result["gpu_targets"])
    table = md.read_text().splitlines()
    assert table[0].startswith("| shape, feature axis | dtype | fwd |") and len(table) == 3
    # KernelBench level1/33 beside the copy of its bytes (and PyTorch's eager forward)
    kb = result["kernelbench"]
    layouts = {
        f"jaxbn {lay} {m}" for lay in ("NCHW", "channels-last") for m in ("fwd", "bwd", "fwd+bwd")
    }
    assert layouts | {"jax copy of 3 S"} <= set(kb["ms"]) and kb["shape"] == [2, 4, 3, 3]
    assert ("torch eager NCHW fwd" in kb["ms"]) == has_torch
    assert all(ms > 0 for ms in kb["ms"].values())
