"""HF checkpoints of the MTP transformer: name adapter, loading and export.

* :class:`MTPStateDictAdapter`: TorchTitan ``StateDictAdapter`` (``to_hf`` / ``from_hf``),
  MTP modules in MiMo (``model.mtp_layers.{k}``, vLLM-servable) or DeepSeek
  (``model.layers.{N+k}``) names.
* :func:`load_hf_checkpoint`: strict load of an HF directory into an unsharded model.
* :func:`export_hf`: ``config.json`` + sharded safetensors + tokenizer files.
* ``python -m torchtitan_mtp.checkpoints.export``: DCP checkpoint -> HF directory.
"""

from .adapter import (
    MTP_LAYOUTS,
    MTPLayout,
    MTPStateDictAdapter,
    checkpoint_keys,
    detect_mtp_layout,
)
from .hf import (
    DEFAULT_MAX_SHARD_BYTES,
    TOKENIZER_FILES,
    HFLoadInfo,
    export_hf,
    hf_config,
    load_hf_checkpoint,
    read_hf_state_dict,
)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "MTP_LAYOUTS",
    "TOKENIZER_FILES",
    "HFLoadInfo",
    "MTPLayout",
    "MTPStateDictAdapter",
    "checkpoint_keys",
    "detect_mtp_layout",
    "export_hf",
    "hf_config",
    "load_hf_checkpoint",
    "read_hf_state_dict",
]
