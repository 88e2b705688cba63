"""Export a TorchTitan DCP checkpoint of the MTP transformer as an HF checkpoint.

    python -m torchtitan_mtp.checkpoints.export --checkpoint <DCP step dir> \\
        --job.config_file <toml> --out <dir> [--mtp-layout mimo|deepseek] \\
        [--tokenizer-dir DIR] [--dtype bfloat16] [--max-shard-bytes N] [--overwrite]

The model is built from the job config exactly as training builds it (``[model] name`` /
``flavor`` TrainSpec, ``update_from_config``, ``[mtp] num_modules``); any other
``--section.key value`` override is passed to the job-config parser. TorchTitan's
CheckpointManager stores the model's parameters at the top level of the DCP state dict
(``tok_embeddings.weight``, ...) in both full and model-only checkpoints; checkpoints that
nest them under ``model.`` are read too.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.protocols.train_spec import get_train_spec
from torchtitan.tools.logging import init_logger, logger

from ..config import MTPJobConfig, parse_job_config
from ..data.tokenizer import tokenizer_dir
from ..models.args import MTPModelArgs
from .adapter import MTP_LAYOUTS
from .hf import DEFAULT_MAX_SHARD_BYTES, export_hf

__all__ = ["build_model", "load_dcp_model_state", "main"]


def build_model(config: MTPJobConfig) -> tuple[nn.Module, MTPModelArgs]:
    """The job's model (uninitialised storage on CPU) and its arguments.

    ``max_seq_len`` is kept at the flavor's value when the training ``seq_len`` is shorter
    (it becomes ``max_position_embeddings`` of the export).
    """
    spec = get_train_spec(config.model.name)
    flavor = spec.model_args[config.model.flavor]
    args = copy.deepcopy(flavor)
    args.update_from_config(config)
    args.max_seq_len = max(args.max_seq_len, flavor.max_seq_len)
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to_empty(device="cpu")
    return model, args


def load_dcp_model_state(model: nn.Module, checkpoint: str | Path) -> None:
    """Load the model parameters of a DCP checkpoint (full or model-only) into ``model``."""
    path = Path(checkpoint)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"no DCP checkpoint at {path} (no .metadata file)")
    stored = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    state = model.state_dict()
    prefix = ""
    if not any(k in stored for k in state) and any(f"model.{k}" in stored for k in state):
        prefix = "model."
    # A tied weight may be stored under one of its names only.
    present = {t.untyped_storage().data_ptr() for k, t in state.items() if prefix + k in stored}
    missing = [
        k
        for k, t in state.items()
        if prefix + k not in stored and t.untyped_storage().data_ptr() not in present
    ]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} model weight(s) not in the DCP checkpoint (does the job "
            f"config match the one it was trained with?): {missing[:8]}"
        )
    to_load = {k: t for k, t in state.items() if prefix + k in stored}
    dcp.load({"model": to_load} if prefix else to_load, checkpoint_id=str(path))


def _tokenizer_dir(config: MTPJobConfig) -> Path | None:
    """The job's tokenizer directory (``data.tokenizer.tokenizer_dir``: builtin, from_gguf,
    or a path), or None when it has none to copy."""
    try:
        return Path(tokenizer_dir(config))
    except (FileNotFoundError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchtitan_mtp.checkpoints.export",
        description="Export a DCP checkpoint of the MTP transformer as an HF checkpoint. "
        "Other --section.key options (e.g. --job.config_file) go to the job config.",
        allow_abbrev=False,
    )
    parser.add_argument("--checkpoint", required=True, help="DCP step directory")
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument("--mtp-layout", choices=MTP_LAYOUTS, default="mimo")
    parser.add_argument(
        "--tokenizer-dir", default=None, help="default: the job's [model] hf_assets_path"
    )
    dtypes = sorted(TORCH_DTYPE_MAP)
    parser.add_argument("--dtype", choices=dtypes, default=None, help="default: keep")
    parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    parser.add_argument("--overwrite", action="store_true")
    opts, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    init_logger()
    config = parse_job_config(rest)
    model, args = build_model(config)
    load_dcp_model_state(model, opts.checkpoint)
    tokenizer_dir = opts.tokenizer_dir or _tokenizer_dir(config)
    if tokenizer_dir is None:
        logger.warning("no tokenizer files found; pass --tokenizer-dir to include them")
    out = export_hf(
        model,
        args,
        opts.out,
        mtp_layout=opts.mtp_layout,
        tokenizer_dir=tokenizer_dir,
        max_shard_bytes=opts.max_shard_bytes,
        dtype=TORCH_DTYPE_MAP[opts.dtype] if opts.dtype else None,
        overwrite=opts.overwrite,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
