"""Throughput accounting: the matmul peak of this device, measured and from the datasheet, and model FLOPs
utilization (MFU) against each.

The anchors (nanoGPT, PaLM, Megatron) report MFU against the datasheet's dense bf16 peak; a measured peak is
lower, so the same run shows a higher MFU against it. The Trainer logs both: ``mfu`` (measured matmul peak)
and ``mfu_datasheet`` (when the device's datasheet peak is known or given as ``train.datasheet_tflops``).
"""

from __future__ import annotations

import os
import sys
import time

import torch

_PEAK_CACHE: dict[tuple[str, torch.dtype, bool], float] = {}


def measure_peak_tflops(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, cpu_time: bool = False
) -> float:
    """TFLOP/s of a large square matmul on ``device`` in ``dtype``, measured once per process.

    MFU is reported against what this machine's matmul kernels actually reach (on CPUs the datasheet peak is
    rarely known), so "40% MFU" means 40% of the best dense-matmul rate measured here. ``cpu_time`` (CPU, one
    thread) times with the process CPU clock: on a shared machine a wall-clock best of three still varied 2x
    between runs (0.52-1.06 TFLOP/s), because the scheduler hands a 1-thread job only part of a core.
    """
    device = torch.device(device)
    key = (str(device), dtype, cpu_time)
    clock = time.process_time if cpu_time else time.perf_counter
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)  # a fresh output would time its page faults too
    reps, trials = (10, 3) if device.type == "cuda" else (1, 30)
    torch.matmul(a, b, out=out)  # warm-up (kernel selection, AMX tile configuration)
    best = float("inf")
    # Best of many: the machine may be shared. On the 2-core CPU a best of 3 with a fresh output ranged
    # 1.5-2.6 TFLOP/s between processes, which flattered MFU; the best of 30 ranged 2.4-2.8.
    for _ in range(trials):
        _sync(device)
        t0 = clock()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        _sync(device)
        best = min(best, (clock() - t0) / reps)
    _PEAK_CACHE[key] = 2 * n**3 / best / 1e12
    return _PEAK_CACHE[key]


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets; matched by substring
# of torch.cuda.get_device_name(), most specific first. fp32 matmuls on these GPUs run as TF32 at half the rate.
DATASHEET_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
    ("V100", 125.0),
)


def datasheet_peak_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The datasheet matmul peak of a CUDA ``device`` in TFLOP/s (fp32: its TF32 rate, half the bf16 one), or
    None when unknown (CPUs: vendors publish no comparable figure)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in name:
            return tflops if dtype in (torch.bfloat16, torch.float16) else tflops / 2
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, num_devices: int = 1) -> float:
    """Fraction of ``num_devices x peak`` used by ``tokens_per_s`` tokens of ``flops_per_token`` each."""
    if peak_tflops <= 0:
        return 0.0
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * num_devices)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ALLOCATOR_TUNED = False


def retain_freed_cpu_memory() -> bool:
    """Let glibc keep freed CPU memory for reuse instead of unmapping it; returns True if it was set.

    By default glibc serves every allocation above its mmap threshold (at most 32 MiB, often far less) with a
    fresh ``mmap`` and unmaps it on free, so each large activation of every step page-faults its memory in
    again: on the ``small-14m`` step that was ~12% of the CPU time (a fresh 32 MB buffer costs ~15 ms to
    touch, the arithmetic in it ~2 ms). With a high mmap threshold and trim threshold freed blocks stay in
    the heap and the next step reuses them, as a GPU caching allocator does. The cost is that the process
    keeps its peak memory instead of returning it between steps. Process-wide, so set once, by the Trainer,
    for CPU training; a no-op off glibc or when ``LLMLAB_KEEP_MALLOC=1`` asks to leave malloc alone.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("LLMLAB_KEEP_MALLOC") == "1":
        return False
    import ctypes  # only here: glibc's mallopt, looked up at run time
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    _ALLOCATOR_TUNED = ok
    return ok
