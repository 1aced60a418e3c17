"""Population statistics (PreciseBN) against NumPy statistics of the concatenated data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import rel_err

import jaxbn


def batches(sizes, seed=0, offset=100.0):
    rs = np.random.RandomState(seed)
    return [
        (rs.randn(n, 4, 4, 3) * (1 + i) + offset + i).astype(np.float32)
        for i, n in enumerate(sizes)
    ]


@pytest.mark.parametrize("sizes", [[8, 8, 8], [1, 13, 5, 40]])
def test_exact_over_the_concatenation(sizes):
    data = batches(sizes)
    s = jaxbn.population_stats(lambda b: b, data)
    allx = np.concatenate(data).astype(np.float64)
    assert rel_err(s.mean, allx.mean((0, 1, 2))) < 1e-6
    assert rel_err(s.var, allx.var((0, 1, 2))) < 1e-5
    assert int(s.count) == len(sizes)


def test_pytree_of_layers_through_a_network_and_a_generator():
    w = jnp.asarray(np.random.RandomState(1).randn(3, 5), jnp.float32)

    @jax.jit
    def features(b):
        h = b.reshape(-1, 3)
        return {"bn1": h, "bn2": jnp.tanh(h @ w)}

    data = batches([6, 10, 3], offset=0.0)
    s = jaxbn.population_stats(features, (b for b in data), progress=False)
    allh = np.concatenate([np.asarray(features(b)["bn2"], np.float64) for b in data])
    assert rel_err(s["bn2"].var, allh.var(0)) < 1e-5
    assert rel_err(s["bn1"].mean, np.concatenate(data).reshape(-1, 3).mean(0)) < 1e-6


def test_nchw_axis_and_float64_dtype():
    data = [b.transpose(0, 3, 1, 2) for b in batches([4, 7])]
    with jax.enable_x64(True):
        s = jaxbn.population_stats(lambda b: b, data, axis=1, dtype=jnp.float64)
    assert s.var.dtype == jnp.float64
    assert rel_err(s.var, np.concatenate(data).astype(np.float64).var((0, 2, 3))) < 1e-6


def test_progress_bar_runs(capsys):
    pytest.importorskip("tqdm")
    jaxbn.population_stats(lambda b: b, batches([2, 2]), progress=True)
    assert "population statistics" in capsys.readouterr().err


def test_repeated_calls_reuse_one_compiled_program():
    # a training loop that recomputes the statistics every epoch must not recompile
    from jaxbn import _population

    data = batches([8, 8])
    _population._batch_moments.clear_cache()
    first = jaxbn.population_stats(lambda b: b, data, axis=[-1])
    again = jaxbn.population_stats(lambda b: b * 2.0, data, axis=(-1,))
    assert _population._batch_moments._cache_size() == 1
    np.testing.assert_allclose(again.mean, 2 * first.mean, rtol=1e-6)
    np.testing.assert_allclose(again.var, 4 * first.var, rtol=1e-5)


def test_population_stats_exact_at_large_offsets():
    rs = np.random.RandomState(1)
    batches = [(1e6 + rs.randn(512, 3)).astype(np.float32) for _ in range(5)]
    with jax.enable_x64(True):
        s = jaxbn.population_stats(jnp.asarray, batches, dtype=jnp.float64)
    all_x = np.concatenate(batches).astype(np.float64)
    assert np.max(np.abs(np.asarray(s.var) / all_x.var(0) - 1)) < 1e-6
    assert np.max(np.abs(np.asarray(s.mean) - all_x.mean(0))) < 1e-6
