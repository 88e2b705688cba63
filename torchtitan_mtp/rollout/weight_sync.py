"""Trainer -> rollout-engine weight sync: HF-named tensors of the trunk AND the MTP modules,
gathered from sharded DTensors one bucket at a time.

No vLLM import here: the names are the MiMo layout that vLLM's ``MiMoForCausalLM`` (trunk)
and ``MiMoMTP`` (draft) loaders read (``checkpoints.adapter``), and the buckets bound the
memory that full (unsharded) copies take on each rank: at most one bucket of gathered
tensors (and the next parameter's) is alive at a time, never a full copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..checkpoints.adapter import MTPStateDictAdapter
from ..checkpoints.hf import NamedTensors, bucket_nbytes, size_buckets

__all__ = ["BucketStats", "hf_weight_buckets", "is_draft_weight"]

Bucket = NamedTensors


def is_draft_weight(hf_name: str) -> bool:
    """True for the MTP (speculative draft) weights of the MiMo layout."""
    return ".mtp_layers." in hf_name


@dataclass
class BucketStats:
    """What one sync moved: for logs and for the memory bound the tests check."""

    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    largest_bucket_bytes: int = 0


def _hf_weight_groups(
    model: nn.Module,
    adapter: MTPStateDictAdapter,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> Iterator[Bucket]:
    """Per parameter, in state-dict order: its gathered, converted (HF name, tensor) pairs.

    A tied parameter (the embedding and the output head) is one group holding both of its
    names and ONE converted tensor: vLLM's loader skips ``lm_head.weight`` as an alias of
    ``model.embed_tokens.weight`` and raises unless the latter arrives in the same
    ``load_weights`` call (``AutoWeightsLoader._check_skipped_aliases``).
    """
    state = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}
    for key, value in state.items():
        names.setdefault(id(value), []).append(key)
    for keys in names.values():
        value = state[keys[0]].detach()
        full = value.full_tensor() if isinstance(value, DTensor) else value
        converted: dict[int, torch.Tensor] = {}  # one copy per source tensor
        group: Bucket = []
        for name, tensor in adapter.to_hf(dict.fromkeys(keys, full)).items():
            if id(tensor) not in converted:
                out = tensor
                if dtype is not None and out.is_floating_point():
                    out = out.to(dtype)
                if device is not None:
                    out = out.to(device)
                converted[id(tensor)] = out
            group.append((name, converted[id(tensor)]))
        del full, value
        yield group


def hf_weight_buckets(
    model: nn.Module,
    adapter: MTPStateDictAdapter,
    bucket_bytes: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    stats: BucketStats | None = None,
) -> Iterator[Bucket]:
    """Yield the model's weights as buckets of (HF name, full tensor), in state-dict order.

    Every rank of the model's meshes must iterate in lockstep: gathering a sharded DTensor
    (``full_tensor()``) is a collective. Buckets are packed by ``checkpoints.hf.size_buckets``:
    a bucket closes before it would exceed ``bucket_bytes``, the tensors of one parameter
    travel together (a tied embedding/``lm_head`` pair is one tensor under both names, so
    its bytes count once), and a larger parameter travels alone. The caller should drop a
    bucket before asking for the next one.

    Args:
        model: the (possibly FSDP2 / TP sharded) ``MTPTransformer``.
        adapter: names (MiMo layout for vLLM) and the conversions of ``to_hf`` (swapped
            ``input_proj`` halves, zero q/k/v biases, the tied ``lm_head`` name).
        bucket_bytes: the largest bucket, in bytes of the converted tensors.
        dtype: cast floating-point tensors (e.g. the engine's bfloat16).
        device: move the gathered tensors here (e.g. the engine's GPU).
        stats: filled with counts and the largest bucket actually yielded.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    stats = stats if stats is not None else BucketStats()
    groups = _hf_weight_groups(model, adapter, dtype, device)
    for bucket in size_buckets(groups, bucket_bytes):
        size = bucket_nbytes(bucket)
        stats.buckets += 1
        stats.tensors += len(bucket)
        stats.bytes += size
        stats.largest_bucket_bytes = max(stats.largest_bucket_bytes, size)
        yield bucket
