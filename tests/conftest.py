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
