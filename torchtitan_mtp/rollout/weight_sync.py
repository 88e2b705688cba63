"""Trainer -> rollout-engine weight sync: HF-named tensors of the trunk AND the MTP modules,
gathered from sharded DTensors one bucket at a time.

No vLLM import here: the names are the MiMo layout that vLLM's ``MiMoForCausalLM`` (trunk)
and ``MiMoMTP`` (draft) loaders read (``checkpoints.adapter``), and the buckets bound the
memory that full (unsharded) copies take on each rank: at most one bucket of gathered
tensors is alive at a time, never a full copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..checkpoints.adapter import MTPStateDictAdapter

__all__ = ["BucketStats", "hf_weight_buckets", "is_draft_weight"]

Bucket = list[tuple[str, torch.Tensor]]


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


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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
    (``full_tensor()``) is a collective. A bucket closes before it would exceed
    ``bucket_bytes`` (a single larger tensor travels alone), and the caller should drop it
    before asking for the next one.

    Args:
        model: the (possibly FSDP2 / TP sharded) ``MTPTransformer``.
        adapter: names (MiMo layout for vLLM) and the conversions of ``to_hf`` (swapped
            ``input_proj`` halves, zero q/k/v biases, the tied ``lm_head`` copy).
        bucket_bytes: the largest bucket, in bytes of the converted tensors.
        dtype: cast floating-point tensors (e.g. the engine's bfloat16).
        device: move the gathered tensors here (e.g. the engine's GPU).
        stats: filled with counts and the largest bucket actually yielded.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    stats = stats if stats is not None else BucketStats()
    bucket: Bucket = []
    size = 0
    for key, value in model.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        converted = []
        for name, tensor in adapter.to_hf({key: full.detach()}).items():
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if device is not None:
                tensor = tensor.to(device)
            converted.append((name, tensor))
        del full
        nbytes = sum(_nbytes(t) for _, t in converted)
        if bucket and size + nbytes > bucket_bytes:
            stats.buckets += 1
            stats.largest_bucket_bytes = max(stats.largest_bucket_bytes, size)
            yield bucket
            bucket, size = [], 0
        bucket.extend(converted)
        size += nbytes
        stats.tensors += len(converted)
        stats.bytes += nbytes
    if bucket:
        stats.buckets += 1
        stats.largest_bucket_bytes = max(stats.largest_bucket_bytes, size)
        yield bucket
