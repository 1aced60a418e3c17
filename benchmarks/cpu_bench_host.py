"""Where ``benchmarks/cpu_bench.py`` runs: allocator, caches, page faults and the machine it reports.

On CPU, a fresh output of >= 32 MiB page-faults on every call under glibc's default
malloc, and jemalloc's default decay still faults freed pages back in; the benchmark
reruns itself under a chosen allocator (the allocator is fixed at process start) and
reports what ran.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

JEMALLOC = [
    f"{d}/libjemalloc.so.2"
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
]
# With its default decay, jemalloc still took ~500 page faults per 16 MiB output here.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def _minor_faults() -> int:
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cache_bytes() -> int:
    """The last-level CPU cache, from sysfs (32 MiB when unknown)."""
    sizes = []
    for i in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{i}/size") as f:
                text = f.read().strip()
        except OSError:
            break
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 << 20)


def flusher(platform: str):
    """A function that evicts the caches, so each timed call reads its inputs from memory.

    Without it the order of the calls decides which one finds ``x`` in the cache:
    (4096, 1024) float32 is 16 MiB and fits a 32 MiB L3.
    """
    if platform == "cpu":
        buf = np.ones(2 * _cache_bytes() // 8)
        return lambda: np.multiply(buf, 1.0, out=buf)
    big = jnp.ones(256 << 18, jnp.float32)  # 256 MiB: more than any GPU's L2
    touch = jax.jit(lambda v: v + 1)
    return lambda: touch(big).block_until_ready()


_GLIBC_TUNED = False


def allocator() -> str:
    """The malloc this process runs under (read from its memory map) and its tuning."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        maps = ""
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in maps:
            conf = os.environ.get("MALLOC_CONF") if name == "jemalloc" else None
            return name + (f" (MALLOC_CONF={conf})" if conf else " (default)")
    if platform.system() != "Linux":
        return "system"
    tuned = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    tuned += ["mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)"] if _GLIBC_TUNED else []
    return "glibc" + (f" ({', '.join(tuned)})" if tuned else " (default)")


def tune_glibc() -> bool:
    """Serves every block from glibc's heap and keeps it there: no mmap per call.

    ``M_MMAP_THRESHOLD`` cannot exceed 32 MiB, so large blocks need ``M_MMAP_MAX=0``.
    """
    global _GLIBC_TUNED
    try:
        libc = ctypes.CDLL("libc.so.6")
        _GLIBC_TUNED = libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2**31 - 1) == 1
    except (OSError, AttributeError):
        _GLIBC_TUNED = False
    return _GLIBC_TUNED


def _jemalloc():
    return next((p for p in JEMALLOC if os.path.exists(p)), None)


def machine() -> dict:
    dev = jax.devices()[0]
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    try:
        import flax

        flax_version = flax.__version__
    except ImportError:
        flax_version = None
    return dict(
        platform=dev.platform,
        device=dev.device_kind,
        cpu=cpu,
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        flax=flax_version,
        allocator=allocator(),
        python=platform.python_version(),
    )
