"""torchtitan-mtp: joint training of Multi-Token-Prediction heads in RL post-training.

Importing the package adapts TorchTitan to CPU/gloo when no accelerator exists (before or
after torchtitan is imported: ``platform``) and registers the ``mtp_transformer`` train
spec. ``torchtitan_mtp.JobConfig`` is :class:`~torchtitan_mtp.config.MTPJobConfig`, for
TorchTitan's ``--job.custom_config_module torchtitan_mtp``.
"""

from . import platform

platform.install()

from .models import register_train_specs  # noqa: E402

register_train_specs()

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "JobConfig":  # TorchTitan's ConfigManager reads <custom_config_module>.JobConfig
        from .config import MTPJobConfig

        return MTPJobConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
