"""torchtitan-mtp: joint training of Multi-Token-Prediction heads in RL post-training.

Importing the package adapts TorchTitan to CPU/gloo when no accelerator exists (this must
happen before torchtitan is imported) and registers the ``mtp_transformer`` train spec.
"""

from . import platform

platform.install()

from .models import register_train_specs  # noqa: E402

register_train_specs()

__version__ = "0.1.0"
