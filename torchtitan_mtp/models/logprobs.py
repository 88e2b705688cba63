"""Per-token log-probs of every head, aligned to the main head's target positions.

OCC_SPEC §1 "Alignment": head k predicts target ``y_j`` (the label at position j, i.e.
token ``t_{j+1}``) from position ``i = j - k``. ``token_logprobs`` evaluates every head on
its own targets, then shifts head k right by k so that entry [k, b, j] of every output is
about the same token ``labels[b, j]``. Entries where head k has no prediction (j < k, an
ignored label, or a prediction across a packed-document boundary) are masked.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .model import TokenStats

__all__ = [
    "IGNORE_INDEX",
    "AlignedTokenStats",
    "align_to_targets",
    "draft_logprobs",
    "head_targets",
    "target_mask",
    "token_logprobs",
]

IGNORE_INDEX = -100


class AlignedTokenStats(NamedTuple):
    """All [H, B, S], H = K + 1; index 0 is the main head, k the k-th MTP head."""

    logp: torch.Tensor
    entropy: torch.Tensor
    top1: torch.Tensor
    mask: torch.Tensor
    """bool: head k has a prediction for labels[b, j]."""


def head_targets(labels: torch.Tensor, num_heads: int) -> torch.Tensor:
    """labels [B, S] -> [H, B, S]: head k's target at position i is labels[:, i + k]."""
    seq = labels.shape[1]
    out = labels.new_full((num_heads, *labels.shape), IGNORE_INDEX)
    for k in range(num_heads):
        out[k, :, : seq - k] = labels[:, k:]
    return out


def align_to_targets(values: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
    """[H, B, S] indexed by prediction position -> [H, B, S] indexed by target position.

    out[k, :, j] = values[k, :, j - k]; the first k positions of head k get ``fill``.
    """
    out = torch.full_like(values, fill)
    seq = values.shape[-1]
    out[0] = values[0]
    for k in range(1, values.shape[0]):
        out[k, :, k:] = values[k, :, : seq - k]
    return out


def target_mask(
    labels: torch.Tensor, num_heads: int, segment_ids: torch.Tensor | None
) -> torch.Tensor:
    """labels [B, S], segment_ids [B, S] | None -> bool [H, B, S] by target position."""
    seq = labels.shape[1]
    mask = torch.zeros((num_heads, *labels.shape), dtype=torch.bool, device=labels.device)
    valid = labels != IGNORE_INDEX
    for k in range(num_heads):
        m = valid[:, k:].clone()
        if segment_ids is not None and k > 0:
            m &= segment_ids[:, : seq - k] == segment_ids[:, k:]
        mask[k, :, k:] = m
    return mask


def token_logprobs(
    model: nn.Module,
    hidden: list[torch.Tensor],
    labels: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    detach_mtp_head: bool = False,
) -> AlignedTokenStats:
    """Aligned log-probs, entropies and top-1 hits of the main head and every MTP head.

    Args:
        model: the ``MTPTransformer`` (possibly parallelised) whose ``output`` head to use.
        hidden: K + 1 tensors [B, S, D] from ``model(tokens)``.
        labels: [B, S] main-head targets (``labels[:, j]`` is the token after position j);
            ``IGNORE_INDEX`` marks positions without a target.
        segment_ids: optional [B, S] packed-document ids; no head predicts across them.
        detach_mtp_head: MTP heads use a detached output-head weight (Detach regime).

    Returns:
        ``AlignedTokenStats`` with [K + 1, B, S] tensors indexed by target position.
    """
    num_heads = len(hidden)
    targets = head_targets(labels, num_heads)
    stats: TokenStats = model.output(torch.stack(hidden), targets, 1 if detach_mtp_head else None)
    return AlignedTokenStats(
        logp=align_to_targets(stats.logp, 0.0),
        entropy=align_to_targets(stats.entropy, 0.0),
        top1=align_to_targets(stats.top1, False),
        mask=target_mask(labels, num_heads, segment_ids),
    )


def draft_logprobs(
    model: nn.Module, draft_hidden: list[torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """Aligned log-probs [K, B, S] of the draft pass (``model(..., draft_pass=True)[K+1:]``).

    The output head's weight is detached, so with the pass's detached inputs the result's
    gradient reaches MTP-only parameters only. Entry [k-1, b, j] is head k's log-prob of
    ``labels[b, j]``; mask it with ``target_mask(labels, K + 1, None)[1:]``.
    """
    num_heads = len(draft_hidden) + 1
    targets = head_targets(labels, num_heads)[1:]
    stats: TokenStats = model.output(torch.stack(draft_hidden), targets, 0)
    logp = torch.cat([torch.zeros_like(stats.logp[:1]), stats.logp])
    return align_to_targets(logp, 0.0)[1:]
