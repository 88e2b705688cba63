"""Import torchtitan_mtp before any test module imports torchtitan.

On a machine without an accelerator the package must adapt TorchTitan to CPU/gloo
before TorchTitan's device probe runs at import time (``torchtitan_mtp.platform``).
"""

import pytest
import torch

import torchtitan_mtp  # noqa: F401


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is fastest and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_two_ranks(worker, tmp_path) -> list:
    """Run ``worker(rank, port, out)`` on 2 forked gloo ranks; -> what each saved at
    ``f"{out}.{rank}"`` (torch.save). Fork: the children reuse the parent's imports (a
    fresh interpreter would spend seconds importing TorchTitan); CPU tensors only."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.start_processes(worker, args=(port, out), nprocs=2, start_method="fork")
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
