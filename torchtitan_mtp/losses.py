"""Losses on aligned token statistics.

``MTPCrossEntropy`` is the pretraining/SFT objective: next-token CE on the trunk plus the
DeepSeek-style MTP term ``(c / K) * sum_k CE_k``. Each head's CE is a token mean over the
GLOBAL number of its valid tokens, so that summing gradients over data-parallel ranks (as
FSDP does here) gives the gradient of the global mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchtitan.config import JobConfig

from .models.logprobs import AlignedTokenStats

__all__ = ["MTPCrossEntropy", "build_mtp_sft_loss"]


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
