"""PyTorch parity against golden outputs of real torch (tests/golden/make_torch_golden.py):
jaxbn.batch_norm, the state-dict conversions, and the Flax modules with torch's momentum.

The golden file was produced by torch 2.13.0 (CPU); its version is stored in the file.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import rel_err

import jaxbn
import jaxbn.linen
import jaxbn.nnx

GOLDEN = np.load(Path(__file__).parent / "golden" / "torch_batchnorm.npz")


def test_golden_file_names_its_torch_version():
    assert str(GOLDEN["torch_version"]).startswith("2.13.0")


@pytest.mark.parametrize("name,torch_momentum", [("ema", 0.1), ("cumulative", None)])
def test_training_steps_match_torch(name, torch_momentum):
    g = GOLDEN
    gamma, beta, state = jnp.asarray(g["weight"]), jnp.asarray(g["bias"]), jaxbn.init_state(6)
    momentum = jaxbn.momentum_from_torch(torch_momentum)
    for i, x in enumerate(g["x"]):
        y, state = jaxbn.batch_norm(
            x,
            gamma,
            beta,
            state,
            training=True,
            axis=1,
            momentum=momentum,
            unbiased_running_var=True,
        )
        assert rel_err(y, g[f"{name}_y{i}"]) < 1e-5
        torch_state = {
            k: g[f"{name}_step{i}_{k}"]
            for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        }
        _, _, expected = jaxbn.from_torch(torch_state)
        assert rel_err(state.mean, expected.mean) < 1e-5
        assert rel_err(state.var, expected.var) < 1e-5
        assert int(state.count) == int(expected.count) == i + 1
    y_eval, _ = jaxbn.batch_norm(g["x"][0] * 0.5 - 1, gamma, beta, state, training=False, axis=1)
    assert rel_err(y_eval, g[f"{name}_eval_y"]) < 1e-5


def test_eval_matches_torch_functional_batch_norm():
    g = GOLDEN
    state = jaxbn.BatchNormState(
        jnp.asarray(g["rm"]), jnp.asarray(g["rv"]), jnp.asarray(0, jnp.int32)
    )
    y, _ = jaxbn.batch_norm(
        g["x2"], jnp.asarray(g["weight"]), jnp.asarray(g["bias"]), state, training=False
    )
    assert rel_err(y, g["functional_eval_y"]) < 1e-6


def test_round_trips():
    g = GOLDEN
    sd = {
        k: g[f"ema_step2_{k}"]
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    back = jaxbn.to_torch(*jaxbn.from_torch(sd))
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k])
    prefixed = {"bn1." + k: v for k, v in sd.items()}
    variables = jaxbn.flax_variables_from_torch(prefixed, prefix="bn1.")
    assert sorted(variables["params"]) == ["bias", "scale"] and sorted(
        variables["batch_stats"]
    ) == ["mean", "var"]
    again = jaxbn.flax_variables_to_torch(variables, num_batches_tracked=3, prefix="bn1.")
    for k in prefixed:
        assert np.array_equal(again[k], prefixed[k])


def test_affine_false_state_dict():
    sd = {"running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32)}
    gamma, beta, state = jaxbn.from_torch(sd)
    assert gamma is None and beta is None and int(state.count) == 0
    assert set(jaxbn.to_torch(gamma, beta, state)) == {
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }


def test_momentum_conversion():
    assert jaxbn.momentum_from_torch(0.1) == pytest.approx(0.9)
    assert jaxbn.momentum_to_torch(0.9) == pytest.approx(0.1)
    assert jaxbn.momentum_from_torch(None) is None and jaxbn.momentum_to_torch(None) is None
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\].*got 1.5"):
        jaxbn.momentum_from_torch(1.5)


def test_to_torch_arrays_are_writable_copies_for_torch_from_numpy():
    # torch.from_numpy warns on read-only arrays (a view of a jax buffer is one), and
    # load_state_dict then writes into the tensors it copies from: each array must own
    # its data, writable and independent of the jax state.
    g = GOLDEN
    gamma, beta, state = jnp.asarray(g["weight"]), jnp.asarray(g["bias"]), jaxbn.init_state(6)
    for sd in (
        jaxbn.to_torch(gamma, beta, state),
        jaxbn.flax_variables_to_torch(
            {"params": {"scale": gamma}, "batch_stats": {"mean": state.mean, "var": state.var}}
        ),
    ):
        for k, v in sd.items():
            assert type(v) is np.ndarray and v.flags.writeable and v.flags.owndata, k
        sd["running_mean"][0] = 7.0
    assert float(state.mean[0]) == 0.0


# --- the Flax modules with torch's momentum and unbiased running variance ---------------


def test_linen_torch_parity_through_momentum_and_unbiased_options():
    g = GOLDEN
    bn = jaxbn.linen.BatchNorm(
        use_running_average=False,
        axis=1,
        momentum=jaxbn.momentum_from_torch(0.1),
        unbiased_running_var=True,
    )
    variables = jax.jit(bn.init)(jax.random.key(0), g["x"][0])
    variables = {
        "params": {"scale": jnp.asarray(g["weight"]), "bias": jnp.asarray(g["bias"])},
        "batch_stats": variables["batch_stats"],
    }
    apply = jax.jit(functools.partial(bn.apply, mutable=["batch_stats"]))
    for i, x in enumerate(g["x"]):
        y, upd = apply(variables, x)
        variables = {**variables, **upd}
        assert rel_err(y, g[f"ema_y{i}"]) < 1e-5
        assert rel_err(upd["batch_stats"]["var"], g[f"ema_step{i}_running_var"]) < 1e-5


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_momentum_none_keeps_a_cumulative_average_with_a_count(kind):
    g = GOLDEN
    if kind == "linen":
        bn = jaxbn.linen.BatchNorm(
            use_running_average=False, axis=1, momentum=None, unbiased_running_var=True
        )
        variables = jax.jit(bn.init)(jax.random.key(0), g["x"][0])
        assert sorted(variables["batch_stats"]) == ["count", "mean", "var"]
        variables = {
            "params": {"scale": jnp.asarray(g["weight"]), "bias": jnp.asarray(g["bias"])},
            "batch_stats": variables["batch_stats"],
        }
        apply = jax.jit(functools.partial(bn.apply, mutable=["batch_stats"]))
        for x in g["x"]:
            _, upd = apply(variables, x)
            variables = {**variables, **upd}
        stats = variables["batch_stats"]
    else:
        bn = jaxbn.nnx.BatchNorm(
            6, axis=1, momentum=None, unbiased_running_var=True, rngs=nnx.Rngs(0)
        )
        bn.scale[...], bn.bias[...] = jnp.asarray(g["weight"]), jnp.asarray(g["bias"])
        for x in g["x"]:
            bn(jnp.asarray(x))
        stats = {"mean": bn.mean[...], "var": bn.var[...], "count": bn.count[...]}
    assert int(stats["count"]) == 3
    assert rel_err(stats["mean"], g["cumulative_step2_running_mean"]) < 1e-5
    assert rel_err(stats["var"], g["cumulative_step2_running_var"]) < 1e-5


def _aligned(values):
    """A float32 copy of ``values`` in a 64-byte aligned buffer, as torch's ``.numpy()``
    buffers are: XLA:CPU adopts such a buffer without a copy."""
    values = np.asarray(values, np.float32)
    buf = np.empty(values.nbytes + 64, np.uint8)
    start = -buf.ctypes.data % 64
    out = buf[start : start + values.nbytes].view(np.float32).reshape(values.shape)
    out[...] = values
    return out


def test_from_torch_returns_arrays_independent_of_the_callers_buffers():
    sd = {k: _aligned(np.arange(4.0) + i) for i, k in enumerate(_TORCH_FLOATS)}
    expected = {k: v.copy() for k, v in sd.items()}
    gamma, beta, state = jaxbn.from_torch(sd)
    variables = jaxbn.flax_variables_from_torch(sd)
    for v in sd.values():
        v += 100.0  # in place, as torch's training and optimizers write
    got = {"weight": gamma, "bias": beta, "running_mean": state.mean, "running_var": state.var}
    flax = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
    for k in _TORCH_FLOATS:
        collection = "params" if k in ("weight", "bias") else "batch_stats"
        assert np.array_equal(got[k], expected[k]), k
        assert np.array_equal(variables[collection][flax[k]], expected[k]), k


def test_from_torch_is_independent_of_the_torch_module_that_goes_on_training():
    torch = pytest.importorskip("torch")
    bn = torch.nn.BatchNorm1d(4)
    sd = {k: v.numpy() for k, v in bn.state_dict().items()}
    expected = {k: v.copy() for k, v in sd.items()}
    gamma, beta, state = jaxbn.from_torch(sd)
    bn.train()
    bn(torch.randn(8, 4) * 3 + 2)
    with torch.no_grad():
        bn.weight.mul_(2.0)
        bn.bias.add_(1.0)
    assert not np.array_equal(bn.running_mean.numpy(), expected["running_mean"])
    for k, v in (("weight", gamma), ("bias", beta), ("running_mean", state.mean)):
        assert np.array_equal(v, expected[k]), k
    assert np.array_equal(state.var, expected["running_var"])


_TORCH_FLOATS = ("weight", "bias", "running_mean", "running_var")
