"""The one place where TorchTitan 0.2.2 is adapted to a machine without an accelerator.

TorchTitan assumes a GPU in three places (see PLATFORM_NOTES "TorchTitan on CPU"):

1. ``torchtitan.tools.utils`` probes the device type at import time and falls back to
   "cuda", and other modules copy that value. We make the probe answer "cpu" when no
   accelerator exists, before torchtitan is imported, so the backend resolves to gloo.
2. The metrics memory monitor calls ``torch.cpu.get_device_name``/``memory_stats``/...,
   which do not exist. We provide host-memory equivalents, only where missing.
3. FSDP2 with gloo: gloo has no PREMUL_SUM, so FSDP modules must use a plain SUM
   reduction (``enable_gloo_sum_reduction``); callers normalise losses by global token
   counts anyway.

4. ``torchtitan.distributed.utils.set_pg_timeouts`` (the shorter ``comm.train_timeout_seconds``
   after the first step) calls a device barrier that gloo rejects; ``set_pg_timeouts``
   here does the same without it.

Nothing here acts when an accelerator is present.
"""

from __future__ import annotations

import resource
import sys
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import torch
import torch._utils
import torch.distributed as dist
import torch.nn as nn

__all__ = ["HAS_ACCELERATOR", "enable_gloo_sum_reduction", "install", "set_pg_timeouts"]

HAS_ACCELERATOR: bool = torch._utils._get_available_device_type() is not None


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _install_cpu_device_module_shims() -> None:
    """Host-memory stand-ins for the ``torch.cuda`` memory API, added to ``torch.cpu``."""
    shims = {
        "get_device_name": lambda device=None: "cpu",
        "get_device_properties": lambda device=None: SimpleNamespace(
            total_memory=_host_memory_bytes() or 1
        ),
        "reset_peak_memory_stats": lambda device=None: None,
        "empty_cache": lambda: None,
        "memory_stats": lambda device=None: {
            "active_bytes.all.peak": _peak_rss_bytes(),
            "reserved_bytes.all.peak": _peak_rss_bytes(),
            "num_alloc_retries": 0,
            "num_ooms": 0,
        },
    }
    for name, fn in shims.items():
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, fn)


def install() -> None:
    """Adapt TorchTitan to CPU/gloo. Idempotent; a no-op when an accelerator exists."""
    if HAS_ACCELERATOR:
        return
    utils = sys.modules.get("torchtitan.tools.utils")
    if utils is not None and utils.device_type != "cpu":
        raise RuntimeError(
            "torchtitan was imported before torchtitan_mtp on a machine without an "
            "accelerator, so it picked device type 'cuda'. Import torchtitan_mtp first."
        )
    probe = torch._utils._get_available_device_type
    if not getattr(probe, "_torchtitan_mtp_cpu", False):

        def _probe_or_cpu() -> str:
            return probe() or "cpu"

        _probe_or_cpu._torchtitan_mtp_cpu = True  # type: ignore[attr-defined]
        torch._utils._get_available_device_type = _probe_or_cpu
    _install_cpu_device_module_shims()


def enable_gloo_sum_reduction(model: nn.Module) -> None:
    """Make every FSDP2 module reduce gradients with SUM, which gloo supports.

    TorchTitan disables FSDP's gradient division (factor 1.0), which FSDP implements with
    PREMUL_SUM; gloo rejects that op. Only needed, and only applied, without an accelerator.
    """
    if HAS_ACCELERATOR:
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


def set_pg_timeouts(timeout: timedelta, parallel_dims: Any) -> None:
    """Set every process group's collective timeout (a stuck rank fails the job after it).

    TorchTitan's ``set_pg_timeouts`` on an accelerator; on CPU the same steps (a barrier,
    then each group of the mesh and the default group) without its device barrier.
    """
    if HAS_ACCELERATOR:
        from torchtitan.distributed import utils as dist_utils

        dist_utils.set_pg_timeouts(timeout, parallel_dims)
        return
    if not dist.is_initialized():
        return
    dist.barrier()
    meshes = parallel_dims.get_all_one_dimensional_meshes().values()
    for group in [mesh.get_group() for mesh in meshes] + [None]:
        dist.distributed_c10d._set_pg_timeout(timeout, group)
