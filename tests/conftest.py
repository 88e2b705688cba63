"""Import torchtitan_mtp before any test module imports torchtitan.

On a machine without an accelerator the package must adapt TorchTitan to CPU/gloo
before TorchTitan's device probe runs at import time (``torchtitan_mtp.platform``).
"""

import torchtitan_mtp  # noqa: F401
