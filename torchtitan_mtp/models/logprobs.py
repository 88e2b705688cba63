"""Per-token log-probs of every head, aligned to the main head's target positions.

OCC_SPEC §1 "Alignment": head k predicts target ``y_j`` (the label at position j, i.e.
token ``t_{j+1}``) from position ``i = j - k``. ``token_logprobs`` evaluates every head on
its own targets, then shifts head k right by k so that entry [k, b, j] of every output is
about the same token ``labels[b, j]``. Entries where head k has no prediction (j < k, an
ignored label, or a prediction across a packed-document boundary) are masked.

``vocab_stats`` is the output head's computation: one pass over each chunk of at most
``chunk_tokens`` logit rows gives log-prob, top-1 and (where asked) entropy, and backward
recomputes the chunk's logits once, so the live float32 [tokens, V] block is bounded by
the token budget whatever the micro-batch size, the sequence length or the head count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .model import TokenStats

__all__ = [
    "IGNORE_INDEX",
    "AlignedTokenStats",
    "VocabStats",
    "align_to_targets",
    "draft_logprobs",
    "head_targets",
    "target_mask",
    "token_logprobs",
    "vocab_stats",
]

IGNORE_INDEX = -100


class AlignedTokenStats(NamedTuple):
    """[H, B, S], H = K + 1; index 0 is the main head, k the k-th MTP head."""

    logp: torch.Tensor
    entropy: torch.Tensor | None
    """[B, S] the main head's entropy, or None when not asked (``entropy=False``)."""
    top1: torch.Tensor
    mask: torch.Tensor
    """bool: head k has a prediction for labels[b, j]."""


class VocabStats(NamedTuple):
    """Per-token statistics of one head, all [N] (N tokens)."""

    logp: torch.Tensor
    """float32 log-prob of the label."""
    entropy: torch.Tensor | None
    """float32 entropy of the distribution; None when not asked."""
    top1: torch.Tensor
    """bool: the argmax (the first, on ties) equals the label."""


def _chunk_forward(
    h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, entropy: bool
) -> tuple[torch.Tensor, ...]:
    """h [C, D], weight [V, D], y [C, 1] -> logp, lse, top1, entropy (or None), each [C, 1].

    One [C, V] float32 block, two with ``entropy``; they die when this returns.
    """
    z = F.linear(h, weight).float()  # [C, V], a copy when the logits are low precision
    m, argmax = z.max(dim=-1, keepdim=True)  # one pass: the shift and the top-1
    z_y = z.gather(1, y) - m
    z.sub_(m)
    if entropy:
        e = z.exp()
        s = e.sum(dim=-1, keepdim=True)
        ez = z.mul_(e).sum(dim=-1, keepdim=True)
    else:
        s = z.exp_().sum(dim=-1, keepdim=True)
    log_s = s.log()
    ent = log_s - ez / s if entropy else None
    return z_y - log_s, m + log_s, argmax == y, ent


def _chunk_logit_grad(
    z: torch.Tensor,
    y: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
) -> torch.Tensor:
    """Recomputed logits z [C, V] (overwritten) -> their float32 gradient [C, V].

    y, lse, ent, g_logp, g_ent: [C, 1]. d logp_y / dz = onehot(y) - p and
    d H / dz = -p (log p + H), so dz = onehot(y) g_logp - p (g_logp + g_ent (log p + H)).
    """
    z.sub_(lse)  # log p
    if g_ent is None:
        grad = z.exp_().mul_(-g_logp)
    else:
        p = z.exp()
        z.add_(ent).mul_(g_ent)
        if g_logp is not None:
            z.add_(g_logp)
        grad = p.mul_(z).neg_()
    if g_logp is not None:
        grad.scatter_add_(1, y, g_logp)
    return grad


class _VocabStats(torch.autograd.Function):
    """``vocab_stats`` as one autograd node: saves [N] statistics, not [N, V] logits.

    Forward, per chunk of C tokens: z = h W^T (float32 [C, V]); m, argmax = max(z);
    s = sum exp(z - m); log-prob = z_y - m - log s, lse = m + log s, entropy =
    log s - sum(exp(z - m) (z - m)) / s. Backward recomputes z and forms the logit gradient
    in place (``_chunk_logit_grad``), then the two matmuls.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, entropy):
        ctx.set_materialize_grads(False)
        parts = []
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        if torch.is_autocast_enabled(hidden.device.type):
            compute_dtype = torch.get_autocast_dtype(hidden.device.type)
        for start in range(0, max(hidden.shape[0], 1), chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            parts.append(_chunk_forward(hidden[rows], weight, labels[rows, None], entropy))
        logp, lse, top1, ent = (
            torch.cat(p).squeeze(1) if p[0] is not None else None for p in zip(*parts, strict=True)
        )
        ent = lse.new_empty(0) if ent is None else ent
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.chunk_tokens, ctx.compute_dtype = chunk_tokens, compute_dtype
        ctx.mark_non_differentiable(top1)
        if not entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent, top1

    @staticmethod
    def backward(ctx, g_logp, g_ent, _):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if (g_logp is None and g_ent is None) or not (need_hidden or need_weight):
            return None, None, None, None, None
        chunk, dtype = ctx.chunk_tokens, ctx.compute_dtype
        w = weight.to(dtype)
        grad_hidden = []
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for start in range(0, max(hidden.shape[0], 1), chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows].to(dtype)
            grad_z = _chunk_logit_grad(
                F.linear(h, w).float(),
                labels[rows, None],
                lse[rows, None],
                ent[rows, None] if g_ent is not None else None,
                None if g_logp is None else g_logp[rows, None],
                None if g_ent is None else g_ent[rows, None],
            ).to(dtype)
            if need_hidden:
                grad_hidden.append(grad_z @ w)  # [C, D]
            if need_weight and grad_weight.dtype == dtype:
                grad_weight.addmm_(grad_z.T, h)  # [V, D]
            elif need_weight:
                grad_weight.add_(grad_z.T @ h)
            del grad_z  # before the next chunk's logits
        dh = torch.cat(grad_hidden).to(hidden.dtype) if need_hidden else None
        return dh, grad_weight, None, None, None


def vocab_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    entropy: bool = False,
) -> VocabStats:
    """Log-probs of ``labels``, top-1 hits and (``entropy``) entropies under ``weight``.

    Args:
        hidden: [N, D] normalised hidden states (any leading shape flattened by the caller).
        weight: [V, D] output projection; detach it for a head whose loss must not reach it.
        labels: [N] target ids in [0, V) (callers clamp ignored ids and mask them).
        chunk_tokens: token budget: at most this many rows of float32 [rows, V] logits are
            alive at a time (about two such blocks at the peak, in forward and backward).
        entropy: also return the entropies (one more pass over each chunk, both ways).

    Returns:
        ``VocabStats`` of [N] tensors; logp and entropy are differentiable in ``hidden``
        and ``weight`` (their logits are recomputed in backward, chunk by chunk).
    """
    logp, ent, top1 = _VocabStats.apply(hidden, weight, labels, chunk_tokens, entropy)
    return VocabStats(logp, ent if entropy else None, top1)


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
    entropy: bool = False,
) -> AlignedTokenStats:
    """Aligned log-probs and top-1 hits of every head, and the main head's entropy.

    Args:
        model: the ``MTPTransformer`` (possibly parallelised) whose ``output`` head to use.
        hidden: K + 1 tensors [B, S, D] from ``model(tokens)``.
        labels: [B, S] main-head targets (``labels[:, j]`` is the token after position j);
            ``IGNORE_INDEX`` marks positions without a target.
        segment_ids: optional [B, S] packed-document ids; no head predicts across them.
        detach_mtp_head: MTP heads use a detached output-head weight (Detach regime).
        entropy: compute the main head's entropy (an entropy bonus or metric); no loss
            or metric uses an MTP head's, so none is computed.

    Returns:
        ``AlignedTokenStats`` with [K + 1, B, S] tensors indexed by target position (the
        entropy [B, S], or None).
    """
    num_heads = len(hidden)
    targets = head_targets(labels, num_heads)
    stats: TokenStats = model.output(
        torch.stack(hidden), targets, 1 if detach_mtp_head else None, entropy=entropy
    )
    return AlignedTokenStats(
        logp=align_to_targets(stats.logp, 0.0),
        entropy=stats.entropy,  # head 0 is aligned already
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
