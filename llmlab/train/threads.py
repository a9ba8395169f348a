"""CPU thread behaviour on a shared machine; torch-free, because it must run before ``import torch``.

PyTorch's OpenMP workers spin-wait between parallel regions. When more threads want the CPU than there are
cores (other jobs, other users), spinning workers steal the cores the busy ones need: on a 2-core machine with
a load of ~10 we measured a training step 5x slower with 2 threads than with 1. ``OMP_WAIT_POLICY=PASSIVE``
makes idle workers sleep, which recovers the 1-thread speed under load. It is read once, when the OpenMP
runtime loads with torch, so it has to be set before the first ``import torch``.
"""

from __future__ import annotations

import os
import sys


def configure_cpu_threads(verbose: bool = True) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` if the machine is oversubscribed right now; returns True if set.

    Does nothing when the user chose a policy, when torch is already imported, or when the 1-minute load
    average is below the number of cores (an idle machine keeps the faster spinning default).
    """
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules or not hasattr(os, "getloadavg"):
        return False
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load < cores:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if verbose:
        print(f"[llmlab] load average {load:.1f} on {cores} cores: OpenMP workers will sleep, not spin")
    return True
