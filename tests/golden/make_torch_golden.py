"""Writes torch_batchnorm.npz: real PyTorch BatchNorm outputs for tests/test_torch.py.

Run with PyTorch installed (the committed file came from torch 2.13.0, CPU):
    python tests/golden/make_torch_golden.py
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def main():
    rs = np.random.RandomState(0)
    out = {"torch_version": np.array(torch.__version__)}
    x_steps = (rs.randn(4, 6, 5, 5) * 3 + 2).astype(np.float32)[None] + np.arange(
        3, dtype=np.float32
    )[:, None, None, None, None]
    weight = (rs.rand(6) + 0.5).astype(np.float32)
    bias = rs.randn(6).astype(np.float32)
    out.update(x=x_steps, weight=weight, bias=bias)
    for name, momentum in (("ema", 0.1), ("cumulative", None)):
        bn = torch.nn.BatchNorm2d(6, momentum=momentum)
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(weight))
            bn.bias.copy_(torch.from_numpy(bias))
        bn.train()
        for i, xs in enumerate(x_steps):
            y = bn(torch.from_numpy(xs))
            out[f"{name}_y{i}"] = y.detach().numpy()
            for k, v in bn.state_dict().items():
                out[f"{name}_step{i}_{k}"] = v.numpy().copy()  # numpy() aliases the buffer
        bn.eval()
        out[f"{name}_eval_y"] = bn(torch.from_numpy(x_steps[0] * 0.5 - 1)).detach().numpy()
    # the functional form on an (N, C) input with given running statistics
    x2 = rs.randn(16, 6).astype(np.float32)
    rm, rv = rs.randn(6).astype(np.float32), (rs.rand(6) + 0.5).astype(np.float32)
    out.update(x2=x2, rm=rm, rv=rv)
    out["functional_eval_y"] = F.batch_norm(
        torch.from_numpy(x2),
        torch.from_numpy(rm),
        torch.from_numpy(rv),
        torch.from_numpy(weight),
        torch.from_numpy(bias),
        training=False,
        eps=1e-5,
    ).numpy()
    np.savez_compressed(Path(__file__).with_name("torch_batchnorm.npz"), **out)


if __name__ == "__main__":
    main()
