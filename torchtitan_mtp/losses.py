"""Every loss of the project: the SFT objective and the RLVR algorithm around OCC.

**SFT.** ``MTPCrossEntropy`` is the pretraining/SFT objective: next-token CE on the trunk
plus the DeepSeek-style MTP term ``(c / K) * sum_k CE_k``. Each head's CE is a token mean over the
GLOBAL number of its valid tokens, so that summing gradients over data-parallel ranks (as
FSDP does here) gives the gradient of the global mean.

**RL** (OCC_SPEC §4). Conventions: token tensors are [B, S], masks bool [B, S],
statistics float32. Masked positions contribute nothing (values there are replaced with
``torch.where``, so NaN/inf left in padding cannot leak into a loss or a gradient).

Global normalisation: data-parallel gradients are SUMMED over ranks, so ``aggregate`` and
``policy_loss`` return THIS RANK's SHARE of the global value, dividing by global counts
the caller passes in (``valid_counts`` gives the local counts to all-reduce). Summed over
ranks (and over micro-batches) the shares give the global loss.

The same ``policy_loss`` serves the main head and every MTP head (OCC_SPEC §2 "Policy"):
head k's ratio uses the MAIN head's behaviour log-probs, i.e.
``policy_loss(mtp_logp[k], old_logp, advantages, mtp_mask[k], ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torchtitan.config import JobConfig

from .models.logprobs import AlignedTokenStats

__all__ = [
    "AggMode",
    "MTPCrossEntropy",
    "PolicyLossStats",
    "aggregate",
    "build_mtp_sft_loss",
    "dynamic_sampling_keep",
    "grpo_advantages",
    "kl_k3",
    "overlong_reward_penalty",
    "policy_loss",
    "truncated_is_weights",
    "valid_counts",
]


@dataclass
class MTPCrossEntropy:
    """``CE_0 + (c / K) * sum_k CE_k`` with global per-head token counts."""

    coefficient: float
    num_mtp_modules: int

    def head_weights(self, global_counts: torch.Tensor) -> torch.Tensor:
        """global_counts [H] valid tokens per head -> [H] weight of each head's CE sum."""
        scale = torch.ones_like(global_counts, dtype=torch.float32)
        if self.num_mtp_modules:
            scale[1:] = self.coefficient / self.num_mtp_modules
        return scale / global_counts.clamp(min=1).float()

    def __call__(
        self, stats: AlignedTokenStats, global_counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (this rank's share of the loss (0-dim), per-head local CE sums [H], detached).

        Summed over ranks, the loss share is the global objective.
        """
        ce_sums = -(stats.logp * stats.mask).sum(dim=(1, 2))  # [H]
        loss = (ce_sums * self.head_weights(global_counts)).sum()
        return loss, ce_sums.detach()


def build_mtp_sft_loss(job_config: JobConfig, **kwargs) -> MTPCrossEntropy:
    """The TrainSpec loss builder."""
    return MTPCrossEntropy(job_config.mtp.coefficient, job_config.mtp.num_modules)


# ---------------------------------------------------------------- RL

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
Count = int | float | torch.Tensor

# exp() of a log-ratio beyond this is an overflow hazard, not information (as verl).
_MAX_LOG_RATIO = 20.0


def _count(n: Count) -> torch.Tensor | float:
    """A global count as a divisor; a count of 0 means every summand is 0, so 1 is safe."""
    if isinstance(n, torch.Tensor):
        return n.float().clamp(min=1)
    return max(float(n), 1.0)


def valid_counts(mask: torch.Tensor) -> torch.Tensor:
    """mask bool [..., B, S] -> float32 [..., 2]: (valid tokens, sequences with >= 1 valid token).

    These are the LOCAL counts; sum them over micro-batches and all-reduce over ranks to
    get ``global_tokens`` / ``global_seqs`` for ``aggregate`` and ``policy_loss``.
    """
    tokens = mask.sum(dim=(-2, -1))
    seqs = mask.any(dim=-1).sum(dim=-1)
    return torch.stack([tokens, seqs], dim=-1).float()


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, *, eps: float = 1e-6, norm_by_std: bool = True
) -> torch.Tensor:
    """rewards [N] -> advantages [N], float32, normalised within groups of ``group_size``.

    Groups are consecutive blocks of ``group_size`` samples (the samples of one prompt):
    ``(r - mean_group) / (std_group + eps)``, or ``r - mean_group`` with
    ``norm_by_std=False``. As verl's GRPO, std is ``torch.std`` (UNBIASED, N - 1), and a
    group of one sample gets mean 0 and std 1. Broadcast to tokens with ``adv[:, None]``.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    if group_size == 1:  # verl: no group to compare with
        mean, std = torch.zeros_like(r), torch.ones_like(r)
    else:
        mean, std = r.mean(dim=1, keepdim=True), r.std(dim=1, keepdim=True)
    adv = r - mean
    if norm_by_std:
        adv = adv / (std + eps)
    return adv.flatten()


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards [N] -> bool [N // group_size]: DAPO dynamic sampling, keep informative groups.

    A group whose rewards are all equal has zero advantages everywhere, so it only dilutes
    the batch. As DAPO (which keeps groups with std > 0 or a single sample), groups of one
    sample are kept.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size)
    if group_size == 1:
        return torch.ones(r.shape[0], dtype=torch.bool, device=r.device)
    return (r != r[:, :1]).any(dim=1)


def overlong_reward_penalty(
    response_lengths: torch.Tensor,
    max_response_length: int,
    overlong_buffer: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """response_lengths [N] -> reward penalty [N] (float32, in [-penalty_factor, 0]).

    DAPO overlong reward shaping: 0 up to ``max_response_length - overlong_buffer``, then
    linear in the excess length over the buffer, reaching ``-penalty_factor`` at the limit.
    """
    if overlong_buffer <= 0:
        raise ValueError(f"overlong_buffer must be positive, got {overlong_buffer}")
    expected = max_response_length - overlong_buffer
    excess = (response_lengths.float() - expected).clamp(min=0)
    return -(excess / overlong_buffer * penalty_factor).clamp(max=penalty_factor)


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: AggMode,
    *,
    global_tokens: Count,
    global_seqs: Count,
) -> torch.Tensor:
    """values [B, S], mask bool [B, S] -> 0-dim: this rank's share of the aggregated value.

    - "token-mean": sum over valid tokens / ``global_tokens``.
    - "seq-mean-token-mean": each sequence's mean over its valid tokens, summed over the
      sequences with >= 1 valid token, / ``global_seqs``.
    - "seq-mean-token-sum": each sequence's sum over its valid tokens, / ``global_seqs``.

    ``global_seqs`` should count sequences with >= 1 valid token (as ``valid_counts``).
    """
    values = torch.where(mask, values.float(), 0.0)
    if mode == "token-mean":
        return values.sum() / _count(global_tokens)
    seq_sums = values.sum(dim=-1)
    if mode == "seq-mean-token-sum":
        return seq_sums.sum() / _count(global_seqs)
    if mode == "seq-mean-token-mean":
        # empty sequences have a zero sum, so clamping their count to 1 drops them
        return (seq_sums / mask.sum(dim=-1).clamp(min=1)).sum() / _count(global_seqs)
    raise ValueError(f"unknown aggregation mode {mode!r}")


class PolicyLossStats(NamedTuple):
    """Detached 0-dim float32 LOCAL sums over this rank's valid tokens.

    All-reduce them (e.g. ``torch.stack(tuple(stats))``) and divide by ``tokens``:
    clip fraction = clipped_tokens / tokens, KL = approx_kl / tokens, etc.
    """

    tokens: torch.Tensor
    clipped_tokens: torch.Tensor
    """tokens where the PPO clip is active (the clipped branch is the larger loss)."""
    dual_clipped_tokens: torch.Tensor
    """tokens with A < 0 where the dual-clip bound is active."""
    approx_kl: torch.Tensor
    """sum of old_logp - logp (k1 estimate of KL(old || new))."""
    ratio: torch.Tensor
    """sum of the importance ratios used (the sequence ratio for GSPO)."""


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    agg: AggMode = "token-mean",
    global_tokens: Count,
    global_seqs: Count,
    gspo: bool = False,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Clipped policy surrogate (PPO/GRPO/DAPO) -> (this rank's loss share (0-dim), stats).

    Args:
        logp: [B, S] current log-probs of the sampled tokens (requires grad).
        old_logp: [B, S] behaviour-policy log-probs (the MAIN head's, also for MTP heads).
        advantages: [B, S] per-token advantages (already broadcast over the response).
        mask: bool [B, S] valid tokens.
        clip_low, clip_high: ratio clipped to [1 - clip_low, 1 + clip_high] (clip-higher).
        dual_clip: constant c > 1; for A < 0 the token loss is min(loss, -c A) (verl).
        agg, global_tokens, global_seqs: see ``aggregate``.
        gspo: sequence-level ratio s = exp(mean over valid tokens of logp - old_logp) in the
            GSPO-token form r_t = sg(s) exp(logp_t - sg(logp_t)): value s, d r_t/d logp_t = s.
            GSPO's own (much smaller) clip ranges and agg are the caller's choice.

    The per-token loss is -min(r A, clip(r) A); the objective J is maximised, so the loss
    is minimised.
    """
    mask = mask.bool()
    # where, not multiplication: padding may hold garbage (even NaN) in logp or advantages
    log_ratio = torch.where(mask, logp.float() - old_logp.float(), 0.0)
    adv = torch.where(mask, advantages.float(), 0.0)
    if gspo:
        seq_log_ratio = log_ratio.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
        cur = logp.float()
        token_log_ratio = torch.where(mask, cur - cur.detach(), 0.0)  # value 0, gradient 1
        ratio_log = seq_log_ratio.detach()[:, None] + token_log_ratio
    else:
        ratio_log = log_ratio
    ratio = torch.exp(ratio_log.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))

    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    token_loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = (loss_clipped > loss_unclipped) & mask
    dual = torch.zeros_like(mask)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = -adv * dual_clip
        dual = (adv < 0) & (token_loss > bound) & mask
        token_loss = torch.where(adv < 0, torch.minimum(token_loss, bound), token_loss)

    loss = aggregate(token_loss, mask, agg, global_tokens=global_tokens, global_seqs=global_seqs)
    with torch.no_grad():
        stats = PolicyLossStats(
            tokens=mask.sum().float(),
            clipped_tokens=clipped.sum().float(),
            dual_clipped_tokens=dual.sum().float(),
            approx_kl=-log_ratio.sum(),
            ratio=torch.where(mask, ratio, 0.0).sum(),
        )
    return loss, stats


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """logp, ref_logp [B, S] -> float32 [B, S]: k3 estimate of KL(pi || ref) per token.

    ``exp(ref - logp) - (ref - logp) - 1`` (>= 0), as verl's ``low_var_kl``: the log-ratio
    is clamped to [-20, 20] and the result to [-10, 10] for stability. Not masked: reduce
    it with ``aggregate``.
    """
    log_ratio = (ref_logp.float() - logp.float()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-10, 10)


def truncated_is_weights(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance-sampling weights [B, S]: min(pi_trainer / pi_rollout, cap) on
    valid tokens, 1 elsewhere (verl's TIS).

    Corrects for the rollout engine sampling from a slightly different distribution than
    the trainer's (kernels, precision, a lagging weight version). The clipped surrogate is
    linear in each token's advantage, so scaling the advantages by these weights weights
    every token's loss, for the main and the MTP heads alike.
    """
    ratio = torch.exp(old_logp.float() - rollout_logp.float())
    return torch.where(mask.bool(), ratio.clamp(max=cap), 1.0)
