"""Two jax.distributed processes on 127.0.0.1 (gloo), 2 CPU devices each, vs one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from multiprocess_problem import problem
from reference import rel_err

import jaxbn

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), port, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    x, gamma, beta, w = problem()

    def loss(x, gamma, beta):
        y, st = jaxbn.batch_norm(x, gamma, beta, jaxbn.init_state(5), training=True)
        return jnp.sum(y * w), (y, st)

    (_, (y, st)), (dx, dg, db) = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, gamma, beta)
    got = [np.load(tmp_path / f"process{i}.npz") for i in range(2)]
    for name in ("shard_map", "gspmd"):
        for key, ref in (("y", y), ("dx", dx)):
            assert rel_err(np.concatenate([g[f"{name}_{key}"] for g in got]), ref) < 1e-5
        for key, ref in (("mean", st.mean), ("var", st.var), ("dgamma", dg), ("dbeta", db)):
            for g in got:
                assert rel_err(g[f"{name}_{key}"], ref) < 1e-5, (name, key)
