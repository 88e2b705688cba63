"""The RL objective of one micro-batch: the main surrogate plus the regime's MTP term.

OCC_SPEC §2 and §4. ``RLObjective(model, batch, counts, log)`` returns this rank's share
of the loss (normalised by GLOBAL counts, so summing gradients over data-parallel ranks
gives the gradient of the global objective) and adds metrics to ``log``:

- main head: clipped surrogate (clip-higher, optional dual-clip, GSPO), optional k3 KL to
  the frozen reference and entropy bonus;
- ``detach``: ``(c/K) sum_k CE_k`` with the MTP modules on detached trunk inputs;
- ``ce``: the same without detach; ``policy``: ``(c/K) sum_k L_PG(l^k, l_old, A)``;
- ``occ``: ``sum_k L_PG`` with head k's coefficient lambda_k from the OCC calibrator.

The OCC proxies are computed (and logged) under every regime, so curves compare.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from ..config import RL
from ..models.logprobs import AlignedTokenStats, token_logprobs
from .losses import aggregate, kl_k3, policy_loss
from .occ import OCCCalibrator

__all__ = ["RLObjective", "RolloutBatch"]


@dataclass
class RolloutBatch:
    """This rank's rollouts as right-padded training tensors ([N, T], T >= longest - 1)."""

    inputs: torch.Tensor  # [N, T] prompt + response tokens (all but the last)
    labels: torch.Tensor  # [N, T] next tokens; IGNORE_INDEX outside the response
    advantages: torch.Tensor  # [N, T] float32, the sequence advantage on every token
    rollout_logp: torch.Tensor  # [N, T] float32, the engine's sampling log-probs
    old_logp: torch.Tensor | None = None  # [N, T] recomputed by the trainer
    ref_logp: torch.Tensor | None = None  # [N, T] frozen initial policy (KL)

    def select(self, rows: slice) -> RolloutBatch:
        return RolloutBatch(**{k: None if v is None else v[rows] for k, v in vars(self).items()})

    def to(self, device: torch.device) -> RolloutBatch:
        return RolloutBatch(
            **{k: None if v is None else v.to(device) for k, v in vars(self).items()}
        )


@dataclass
class RLObjective:
    """The loss of one micro-batch under ``regime`` (see the module docstring)."""

    rl: RL
    regime: str
    num_mtp: int
    base: float
    """c / K."""
    calibrator: OCCCalibrator

    def _policy_kwargs(self, logp, batch, mask, tokens, seqs) -> dict:
        rl = self.rl
        return dict(
            logp=logp,
            old_logp=batch.old_logp,
            advantages=batch.advantages,
            mask=mask,
            clip_low=rl.clip_ratio_low,
            clip_high=rl.clip_ratio_high,
            dual_clip=rl.dual_clip,
            agg=rl.loss_agg_mode,
            gspo=rl.gspo,
            global_tokens=tokens,
            global_seqs=seqs,
        )

    def mtp_term(
        self,
        stats: AlignedTokenStats,
        batch: RolloutBatch,
        counts: dict[str, torch.Tensor],
        log: dict[str, float],
    ) -> torch.Tensor:
        """The regime's MTP loss term over heads 1..K; per-head metrics go to ``log``."""
        occ = self.calibrator.calibrate(
            stats.logp[0], batch.old_logp, stats.logp[1:], stats.mask[1:]
        )
        total = torch.zeros((), device=stats.logp.device)
        for k in range(1, self.num_mtp + 1):
            mask, tokens, seqs = stats.mask[k], counts["tokens"][k], counts["seqs"][k]
            ce = aggregate(
                -stats.logp[k], mask, "token-mean", global_tokens=tokens, global_seqs=seqs
            )
            pg_kwargs = self._policy_kwargs(stats.logp[k], batch, mask, tokens, seqs)
            pg = policy_loss(**pg_kwargs)[0]
            if self.regime in ("detach", "ce"):
                coefficient, term = self.base, self.base * ce
            elif self.regime == "policy":
                coefficient, term = self.base, self.base * pg
            else:
                coefficient = occ.coefficient[k - 1].item()
                term = self.calibrator.head_loss(occ.coefficient[k - 1], **pg_kwargs)[0]
            total = total + term
            log[f"mtp/pg_loss/head{k}"] += pg.detach().item()
            log[f"mtp/ce_loss/head{k}"] += ce.detach().item()
            log[f"_top1/head{k}"] += (stats.top1[k] & mask).sum().item()
            log[f"_tokens/head{k}"] += mask.sum().item()
            log[f"occ/correlation_proxy/head{k}"] += occ.correlation[k - 1].item()
            log[f"occ/penalty_proxy/head{k}"] += occ.penalty[k - 1].item()
            log[f"occ/gain_proxy/head{k}"] += occ.gain[k - 1].item()
            log[f"occ/coefficient/head{k}"] += coefficient
        return total

    def diagnostic_losses(
        self, model: nn.Module, batch: RolloutBatch, counts: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """[main surrogate, MTP loss of head 1, ..., head K], unscaled (loss shares).

        The head losses are the regime's: CE_k for detach/ce, L_PG(l^k) for policy/occ.
        Minus their gradients are the directions g and g_m of OCC_SPEC §3.
        """
        detach = self.regime == "detach"
        hidden = model(batch.inputs, detach_mtp_inputs=detach)
        stats = token_logprobs(model, hidden, batch.labels, detach_mtp_head=detach)
        losses = []
        for k in range(self.num_mtp + 1):
            mask, tokens, seqs = stats.mask[k], counts["tokens"][k], counts["seqs"][k]
            if k > 0 and self.regime in ("detach", "ce"):
                losses.append(
                    aggregate(
                        -stats.logp[k], mask, "token-mean", global_tokens=tokens, global_seqs=seqs
                    )
                )
            else:
                kwargs = self._policy_kwargs(stats.logp[k], batch, mask, tokens, seqs)
                losses.append(policy_loss(**kwargs)[0])
        return losses

    def __call__(
        self,
        model: nn.Module,
        batch: RolloutBatch,
        counts: dict[str, torch.Tensor],
        log: dict[str, float] | None = None,
    ) -> torch.Tensor:
        """-> this rank's loss share (0-dim). ``counts``: global "tokens"/"seqs" per head [H]."""
        log = defaultdict(float) if log is None else log
        rl, detach = self.rl, self.regime == "detach"
        hidden = model(batch.inputs, detach_mtp_inputs=detach)
        stats = token_logprobs(model, hidden, batch.labels, detach_mtp_head=detach)
        mask, tokens, seqs = stats.mask[0], counts["tokens"][0], counts["seqs"][0]
        norm = {"global_tokens": tokens, "global_seqs": seqs}
        loss, pg_stats = policy_loss(
            **self._policy_kwargs(stats.logp[0], batch, mask, tokens, seqs)
        )
        log["_clipped"] += float(pg_stats.clipped_tokens)
        log["rl/entropy"] += aggregate(stats.entropy[0], mask, "token-mean", **norm).item()
        if rl.entropy_coef:
            loss = loss - rl.entropy_coef * aggregate(
                stats.entropy[0], mask, rl.loss_agg_mode, **norm
            )
        if batch.ref_logp is not None:
            kl = kl_k3(stats.logp[0], batch.ref_logp)
            loss = loss + rl.kl_coef * aggregate(kl, mask, rl.loss_agg_mode, **norm)
            log["rl/kl"] += aggregate(kl.detach(), mask, "token-mean", **norm).item()
        if self.num_mtp:
            loss = loss + self.mtp_term(stats, batch, counts, log)
        return loss
