"""One of two jax.distributed processes (2 CPU devices each) for test_multiprocess.py.

Usage: python multiprocess_worker.py PROCESS_ID PORT OUT_DIR
"""

import sys

import jax

pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from multiprocess_problem import problem  # noqa: E402

import jaxbn  # noqa: E402


def main():
    assert jax.process_count() == 2 and jax.device_count() == 4
    x, gamma, beta, w = problem()
    mesh = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Auto,))
    sh = NamedSharding(mesh, P("batch"))
    half = x.shape[0] // 2
    local = slice(pid * half, (pid + 1) * half)
    xs = jax.make_array_from_process_local_data(sh, x[local])
    ws = jax.make_array_from_process_local_data(sh, w[local])

    def body(x, gamma, beta):
        return jaxbn.batch_norm(
            x, gamma, beta, jaxbn.init_state(5), training=True, axis_name="batch"
        )

    variants = {
        "shard_map": jax.shard_map(
            body, mesh=mesh, in_specs=(P("batch"), P(), P()), out_specs=(P("batch"), P())
        ),
        "gspmd": lambda x, g, b: jaxbn.batch_norm(x, g, b, jaxbn.init_state(5), training=True),
    }
    results = {}
    for name, f in variants.items():

        def loss(x, gamma, beta, w, f=f):
            y, st = f(x, gamma, beta)
            return jnp.sum(y * w), (y, st)

        step = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
        (_, (y, st)), (dx, dg, db) = step(xs, gamma, beta, ws)
        local_rows = lambda a: np.concatenate(  # noqa: E731
            [
                np.asarray(s.data)
                for s in sorted(a.addressable_shards, key=lambda s: s.index[0].start)
            ]
        )
        rep = lambda a: np.asarray(a.addressable_data(0))  # noqa: E731
        results.update(
            {
                f"{name}_y": local_rows(y),
                f"{name}_dx": local_rows(dx),
                f"{name}_mean": rep(st.mean),
                f"{name}_var": rep(st.var),
                f"{name}_dgamma": rep(dg),
                f"{name}_dbeta": rep(db),
            }
        )
    np.savez(f"{out}/process{pid}.npz", **results)


main()
jax.distributed.shutdown()
