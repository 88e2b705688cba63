"""HF safetensors checkpoints of the MTP transformer: load one into a model, export one.

* :func:`load_hf_checkpoint` reads ``model.safetensors`` or a sharded
  ``model.safetensors.index.json`` checkpoint (either MTP layout) into a plain, unsharded
  :class:`~torchtitan_mtp.models.MTPTransformer`, strictly: every weight of the model must
  come from the checkpoint, except whole MTP modules the checkpoint does not have (they
  keep their initialisation and are reported).
* :func:`export_hf` writes ``config.json``, sharded safetensors (+ index) and the tokenizer
  files into a directory, atomically (a temporary directory renamed into place).

FSDP/TP-sharded models load HF weights through TorchTitan's CheckpointManager instead
(``checkpoint.initial_load_in_hf`` with the :class:`MTPStateDictAdapter` of the TrainSpec).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.tools.logging import logger

from ..models.args import MTPModelArgs
from .adapter import MTP_LAYOUTS, MTPLayout, MTPStateDictAdapter, detect_mtp_layout

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "TOKENIZER_FILES",
    "HFLoadInfo",
    "NamedTensors",
    "bucket_nbytes",
    "export_hf",
    "hf_config",
    "load_hf_checkpoint",
    "read_hf_state_dict",
    "size_buckets",
    "write_hf_metadata",
]

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)

# Trunk architecture per family, for the DeepSeek layout (MiMo layout: MiMoForCausalLM).
_TRUNK_ARCH = {
    "llama3": ("LlamaForCausalLM", "llama"),
    "smollm2": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "mimo": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

# XiaomiMiMo's checkpoints carry this config class as remote code (auto_map); the export
# writes the same few lines so that `model_type: "mimo"` loads with trust_remote_code.
_MIMO_CONFIG_PY = '''\
"""MiMo config: a Qwen2 config with MTP layers (written by torchtitan_mtp's HF export)."""

from transformers.models.qwen2.configuration_qwen2 import Qwen2Config


class MiMoConfig(Qwen2Config):
    model_type = "mimo"

    def __init__(self, *args, num_nextn_predict_layers=0, qk_norm=False, **kwargs):
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.qk_norm = qk_norm
        super().__init__(*args, **kwargs)
'''


@dataclass(frozen=True)
class HFLoadInfo:
    """What :func:`load_hf_checkpoint` found."""

    path: Path
    mtp_layout: MTPLayout | None
    """Layout of the checkpoint's MTP weights (None: it has none)."""
    found_mtp_modules: list[int]
    """0-based MTP modules loaded from the checkpoint."""
    missing_mtp_modules: list[int]
    """0-based MTP modules of the model absent from the checkpoint (kept their init)."""


# ---------------------------------------------------------------------------- reading
def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {absent}")
        return files
    if (path / SAFETENSORS_FILE).is_file():
        return [path / SAFETENSORS_FILE]
    raise FileNotFoundError(
        f"no HF checkpoint at {path}: expected {path / SAFETENSORS_FILE} or "
        f"{path / SAFETENSORS_INDEX} (+ shards)"
    )


def read_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF safetensors checkpoint (directory or single file), on CPU."""
    state: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(Path(path)):
        state.update(load_file(str(file), device="cpu"))
    return state


def load_hf_checkpoint(
    model: nn.Module, path: str | Path, *, mtp_layout: MTPLayout | None = None
) -> HFLoadInfo:
    """Load an HF checkpoint into a plain (unsharded) MTPTransformer, strictly.

    Args:
        model: the model; its ``model_args`` decide the expected names and shapes.
        path: HF directory with ``model.safetensors`` or ``model.safetensors.index.json``.
        mtp_layout: require this MTP layout ("mimo" / "deepseek"); None accepts either.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: unexpected keys, missing weights (other than whole MTP modules),
            shape mismatches, non-zero biases for a bias-free model, or a different layout.
    """
    path = Path(path)
    args: MTPModelArgs = model.model_args
    hf = read_hf_state_dict(path)
    layout = detect_mtp_layout(hf, args.n_layers)
    if mtp_layout is not None and layout not in (None, mtp_layout):
        raise ValueError(f"{path}: MTP weights are in the {layout!r} layout, not {mtp_layout!r}")
    adapter = MTPStateDictAdapter(args, mtp_layout=layout or mtp_layout)
    state, source = adapter.convert_from_hf(hf)
    found = adapter.found_mtp_modules(hf)
    fresh = adapter.missing_mtp_modules(hf)

    target = model.state_dict()
    fresh_prefixes = tuple(f"mtp.{k}." for k in fresh)
    missing = [k for k in target if k not in state and not k.startswith(fresh_prefixes)]
    if missing:
        names = [f"{adapter.hf_name(k)} (-> {k})" for k in missing]
        raise ValueError(
            f"{path}: {len(missing)} weight(s) of the model are not in the checkpoint: "
            + ", ".join(names[:8])
            + (", ..." if len(names) > 8 else "")
        )
    extra = [k for k in state if k not in target]
    if extra:
        raise ValueError(f"{path}: weights the model does not have: {extra[:8]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(
                f"{path}: shape mismatch for {source[key]} (-> {key}): checkpoint "
                f"{tuple(value.shape)}, model {tuple(target[key].shape)}"
            )
    with torch.no_grad():
        for key, value in state.items():
            target[key].copy_(value)
    if fresh:
        logger.info(
            f"Loaded {path}: MTP modules {found} from the checkpoint; modules {fresh} "
            "are not in it and keep their initialisation"
        )
    return HFLoadInfo(path, layout, found, fresh)


# ---------------------------------------------------------------------------- writing
def hf_config(
    model_args: MTPModelArgs,
    mtp_layout: MTPLayout = "mimo",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """``config.json`` of an export: MiMoForCausalLM (MiMo layout) or the trunk's own
    architecture plus ``num_nextn_predict_layers`` (DeepSeek layout)."""
    a = model_args
    if mtp_layout not in MTP_LAYOUTS:
        raise ValueError(f"mtp_layout must be one of {MTP_LAYOUTS}, got {mtp_layout!r}")
    arch, model_type = ("MiMoForCausalLM", "mimo")
    if mtp_layout == "deepseek":
        arch, model_type = _TRUNK_ARCH[a.family]
    rope_scaling = None
    if a.rope_scaling is not None:
        rs = a.rope_scaling
        rope_scaling = {
            "rope_type": "llama3",
            "factor": float(rs.scaling_factor),
            "low_freq_factor": float(rs.low_freq_factor),
            "high_freq_factor": float(rs.high_freq_factor),
            "original_max_position_embeddings": int(rs.original_max_position_embeddings),
        }
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": a.dim,
        "intermediate_size": a.hidden_dim,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.head_dim,
        "num_hidden_layers": a.n_layers,
        "vocab_size": a.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": a.norm_eps,
        "rope_theta": float(a.rope_theta),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": a.max_seq_len,
        "tie_word_embeddings": a.enable_weight_tying,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "num_nextn_predict_layers": a.num_mtp_modules,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if model_type in ("mimo", "qwen2"):
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=a.n_layers)
    if model_type == "mimo":
        cfg["qk_norm"] = a.qk_norm
        cfg["auto_map"] = {"AutoConfig": "configuration_mimo.MiMoConfig"}
    if model_type in ("llama", "qwen3"):
        cfg["attention_bias"] = False
    if model_type == "llama":
        cfg["mlp_bias"] = False
    return cfg


def _warn_unservable(a: MTPModelArgs, mtp_layout: MTPLayout) -> None:
    if mtp_layout == "mimo" and (reason := a.vllm_unservable_reason()):
        logger.warning(f"MiMo export: vLLM 0.33 cannot serve this checkpoint: {reason}")
    if mtp_layout == "mimo" and a.num_mtp_modules and not a.mtp_mask_first_embedding:
        logger.warning(
            "MiMo export of a model trained with mtp_mask_first_embedding = False: vLLM's "
            "MiMo drafter zeroes the token embedding at position 0, so the draft it serves "
            "differs from the trained one there and, through attention, after it"
        )
    if mtp_layout == "deepseek":
        arch, model_type = _TRUNK_ARCH[a.family]
        if a.num_mtp_modules:
            logger.warning(
                f"DeepSeek-layout export: vLLM 0.33 binds DeepSeek MTP names to DeepSeek-V3 "
                f"(MLA/MoE) and its {arch} loader rejects model.layers.>={a.n_layers}; "
                "use mtp_layout='mimo' to serve the MTP heads"
            )
        if a.qk_norm and model_type != "qwen3":
            logger.warning(f"{arch} has no q/k norm; this model's q_norm/k_norm are extra")
        if a.qkv_bias and model_type != "qwen2":
            logger.warning(f"{arch} has no q/k/v-only bias; this model's biases are extra")


def _to_cpu_state_dict(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
    else:
        state = dict(model_or_state_dict)
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
        for k, v in state.items()
    }


NamedTensors = list[tuple[str, torch.Tensor]]


def bucket_nbytes(bucket: NamedTensors) -> int:
    """Bytes of a bucket's distinct tensors (a tensor under two names, tied, counts once)."""
    unique = {id(t): t for _, t in bucket}
    return sum(t.numel() * t.element_size() for t in unique.values())


def size_buckets(groups: Iterable[NamedTensors], max_bytes: int) -> Iterator[NamedTensors]:
    """Pack groups of named tensors, in order, into buckets of at most ``max_bytes``.

    Greedy: a bucket closes before the next group would take it over ``max_bytes``. A group
    is never split, so tensors that must travel together (a tied pair: one tensor under two
    names, which counts once) share a bucket; a group larger than ``max_bytes`` is a bucket of
    its own. Groups are drawn lazily: at most one bucket and the next group are alive. The
    one definition of size bucketing: the export's safetensors shards and the rollout
    engine's weight-sync buckets.
    """
    if max_bytes <= 0:
        raise ValueError(f"the bucket size must be positive, got {max_bytes}")
    bucket: NamedTensors = []
    size = 0
    for group in groups:
        nbytes = bucket_nbytes(group)
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket += group
        size += nbytes
    if bucket:
        yield bucket


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True")
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
        return
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def _tokenizer_files(tokenizer_dir: str | Path | None) -> list[Path]:
    if tokenizer_dir is None:
        return []
    files = [Path(tokenizer_dir, n) for n in TOKENIZER_FILES]
    files = [f for f in files if f.is_file()]
    if not files:
        raise FileNotFoundError(
            f"tokenizer_dir {tokenizer_dir}: none of {', '.join(TOKENIZER_FILES[:3])} there"
        )
    return files


def _write_metadata(
    directory: Path,
    model_args: MTPModelArgs,
    mtp_layout: MTPLayout,
    dtype: torch.dtype,
    tok_files: list[Path],
) -> None:
    config = hf_config(model_args, mtp_layout, dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if config["model_type"] == "mimo":
        (directory / "configuration_mimo.py").write_text(_MIMO_CONFIG_PY)
    for f in tok_files:
        shutil.copy2(f, directory / f.name)


def write_hf_metadata(
    model_args: MTPModelArgs,
    out_dir: str | Path,
    *,
    mtp_layout: MTPLayout = "mimo",
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """An HF model directory without weights: ``config.json`` (plus ``configuration_mimo.py``)
    and the tokenizer files, replacing ``out_dir`` atomically. What a vLLM engine needs to
    start from dummy weights that a weight sync then fills."""
    out = Path(out_dir)
    tok_files = _tokenizer_files(tokenizer_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _write_metadata(tmp, model_args, mtp_layout, dtype, tok_files)
        _move_into_place(tmp, out, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_hf(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    model_args: MTPModelArgs,
    out_dir: str | Path,
    *,
    mtp_layout: MTPLayout = "mimo",
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an HF checkpoint directory of the model.

    Args:
        model_or_state_dict: an MTPTransformer or its state dict (our names; DTensors are
            gathered).
        model_args: the model's arguments (config.json, MTP count, tying).
        out_dir: output directory; written as a temporary sibling and renamed into place.
        mtp_layout: "mimo" (vLLM-servable MiMoForCausalLM) or "deepseek".
        tokenizer_dir: directory whose tokenizer files (TOKENIZER_FILES) are copied.
        max_shard_bytes: largest shard; more than one shard adds the index json.
        dtype: cast floating-point tensors to this dtype (None: keep).
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    if mtp_layout not in MTP_LAYOUTS:
        raise ValueError(f"mtp_layout must be one of {MTP_LAYOUTS}, got {mtp_layout!r}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    tok_files = _tokenizer_files(tokenizer_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True")
    _warn_unservable(model_args, mtp_layout)

    state = _to_cpu_state_dict(model_or_state_dict)
    adapter = MTPStateDictAdapter(model_args, mtp_layout=mtp_layout)
    hf = adapter.to_hf(state)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in hf.items():
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # safetensors refuses shared storage (tied / duplicated heads)
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    out_dtype = max(set(floats), key=floats.count) if floats else torch.float32

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        items = ([item] for item in tensors.items())
        shards = [dict(shard) for shard in size_buckets(items, max_shard_bytes)]
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFETENSORS_FILE), metadata=meta)
        else:
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _write_metadata(tmp, model_args, mtp_layout, out_dtype, tok_files)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        f"Exported {len(tensors)} tensors ({mtp_layout} MTP layout, "
        f"{model_args.num_mtp_modules} MTP modules, {len(shards)} shard(s)) to {out}"
    )
    return out
