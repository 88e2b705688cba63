"""The one place where TorchTitan 0.2.2 is adapted to a machine without an accelerator.

TorchTitan assumes a GPU in five places (see PLATFORM_NOTES "TorchTitan on CPU"); this is
the only module of the package that touches TorchTitan's internals, and only on CPU:

1. ``torchtitan.tools.utils`` probes the device type at import time and falls back to
   "cuda", and other modules copy that value. We make the probe answer "cpu" when no
   accelerator exists, so the backend resolves to gloo. If torchtitan was imported first
   (a user script, or ``python -m torchtitan.train --experimental.custom_import
   torchtitan_mtp``), the module-level ``device_type`` / ``device_module`` values every
   loaded ``torchtitan`` module copied are set to "cpu" / ``torch.cpu`` after the fact;
   TorchTitan reads them at call time (the one value baked in at import, the default
   ``device`` argument of ``DeviceMemoryMonitor``, is unused: TorchTitan passes it).
2. The metrics memory monitor calls ``torch.cpu.get_device_name``/``memory_stats``/...,
   which do not exist. We provide host-memory equivalents, only where missing.
3. FSDP2 with gloo: gloo has no PREMUL_SUM, so FSDP modules must use a plain SUM
   reduction (``enable_gloo_sum_reduction``); callers normalise losses by global token
   counts anyway.
4. ``torchtitan.distributed.utils.set_pg_timeouts``, which TorchTitan's train loop calls
   after step 1 to apply the shorter ``comm.train_timeout_seconds``, calls
   ``barrier(device_ids=[device_module.current_device()])`` and
   ``device_module.synchronize()``, which gloo and ``torch.cpu`` reject. ``install``
   replaces that module attribute (TorchTitan's loop looks it up there, as
   ``dist_utils.set_pg_timeouts``, at call time) with :func:`set_pg_timeouts` here, which
   does the same steps without the device calls. So ``Trainer.train``, TorchTitan's own
   loop, runs unchanged on CPU.
5. ``torchtitan.tools.profiling.maybe_enable_profiling`` (``[profiling]
   enable_profiling``) passes ``activities=[CPU, None]`` when neither CUDA nor XPU
   exists, which ``torch.profiler.profile`` rejects. ``install`` makes
   ``torch.profiler.profile`` drop ``None`` activities, so TorchTitan's own profiler runs
   (same schedule, same trace files). Memory snapshots (``enable_memory_snapshot``)
   record CUDA's caching allocator: there is no CPU equivalent, so they stay GPU-only.

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

__all__ = [
    "HAS_ACCELERATOR",
    "enable_gloo_sum_reduction",
    "install",
    "set_pg_timeouts",
]

# torch's own probe (not ours, should this module be imported again after install()).
_probe = torch._utils._get_available_device_type
_ACCELERATOR_PROBE = getattr(_probe, "accelerator_probe", _probe)
HAS_ACCELERATOR: bool = _ACCELERATOR_PROBE() is not None


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


def _probe_or_cpu() -> str:
    return _ACCELERATOR_PROBE() or "cpu"


_probe_or_cpu.accelerator_probe = _ACCELERATOR_PROBE  # type: ignore[attr-defined]


def _adapt_imported_torchtitan() -> None:
    """Item 1 after the fact: torchtitan modules loaded before us copied "cuda"."""
    utils = sys.modules.get("torchtitan.tools.utils")
    if utils is None:
        return
    utils._get_available_device_type = _probe_or_cpu  # its get_device_info(), called later
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "torchtitan" or name.startswith("torchtitan.")):
            continue
        if getattr(module, "device_type", None) == "cuda":
            module.device_type = "cpu"
        if getattr(module, "device_module", None) is torch.cuda:
            module.device_module = torch.cpu


def _install_cpu_pg_timeouts() -> None:
    """Item 4: TorchTitan's train loop calls ``dist_utils.set_pg_timeouts`` after step 1."""
    from torchtitan.distributed import utils as dist_utils

    dist_utils.set_pg_timeouts = set_pg_timeouts


class _ProfileWithoutNone(torch.profiler.profile):
    """``torch.profiler.profile`` that ignores ``None`` in ``activities`` (item 5)."""

    def __init__(self, *args: Any, activities: Any = None, **kwargs: Any):
        if activities is not None:
            activities = [a for a in activities if a is not None]
        super().__init__(*args, activities=activities, **kwargs)


def _install_cpu_profiler() -> None:
    """Item 5: TorchTitan's profiler helper calls ``torch.profiler.profile`` at call time."""
    torch.profiler.profile = _ProfileWithoutNone


def install() -> None:
    """Adapt TorchTitan to CPU/gloo. Idempotent; a no-op when an accelerator exists.

    Works whether or not torchtitan was imported before (items 1, 4 and 5 of the module
    docstring); importing torchtitan_mtp calls it.
    """
    if HAS_ACCELERATOR:
        return
    torch._utils._get_available_device_type = _probe_or_cpu
    _adapt_imported_torchtitan()
    _install_cpu_device_module_shims()
    _install_cpu_pg_timeouts()
    _install_cpu_profiler()


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
    """TorchTitan's ``set_pg_timeouts`` without its device barrier and synchronize (item
    4): a barrier, then every group of the mesh and the default group get ``timeout``."""
    if not dist.is_initialized():
        return
    from torchtitan.tools.logging import logger

    logger.info(f"Synchronizing and adjusting timeout for all ProcessGroups to {timeout}")
    dist.barrier()
    meshes = parallel_dims.get_all_one_dimensional_meshes().values()
    for group in [mesh.get_group() for mesh in meshes] + [None]:
        dist.distributed_c10d._set_pg_timeout(timeout, group)
