"""Writes ``sbx_batchrenorm.npz``: sbx-rl 0.28.0's ``BatchRenorm`` on the cases of
``tests/renorm_cases.py``, with their inputs.

sbx's package imports stable-baselines3 and gymnasium; its layer needs only jax and
flax, so it is loaded from its file::

    pip download --no-deps sbx-rl==0.28.0 && unzip -o sbx_rl-0.28.0-py3-none-any.whl \\
        sbx/common/jax_layers.py
    python tests/golden/make_sbx_golden.py sbx/common/jax_layers.py

Made with jax 0.10.2, flax 0.12.8 on CPU (4 simulated devices for the pmap case).
"""

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv) -> int:
    (layers_file,) = argv
    sbx = load("sbx_jax_layers", Path(layers_file))
    cases = load("renorm_cases", HERE.parent / "renorm_cases.py")
    data = cases.inputs()
    out = dict(data)
    for case in cases.CASES:
        out.update(case(sbx.BatchRenorm, data))
    np.savez_compressed(HERE / "sbx_batchrenorm.npz", **out)
    print(f"wrote {HERE / 'sbx_batchrenorm.npz'}: {len(out)} arrays")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
