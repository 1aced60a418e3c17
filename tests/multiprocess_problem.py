"""The batch that test_multiprocess.py splits across two processes."""

import numpy as np


def problem():
    rs = np.random.RandomState(0)
    x = (rs.randn(16, 3, 3, 5) * 2 + 1).astype(np.float32)
    w = rs.randn(*x.shape).astype(np.float32)
    return x, (rs.rand(5) + 0.5).astype(np.float32), rs.randn(5).astype(np.float32), w
