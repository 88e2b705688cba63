"""The RL objective of one micro-batch: the main surrogate plus the regime's MTP term.

OCC_SPEC §2 and §4. ``RLObjective(model, batch, counts, stats)`` returns this rank's
share of the loss (normalised by GLOBAL counts, so summing gradients over data-parallel
ranks gives the gradient of the global objective) and adds its statistics to ``stats``
(an ``UpdateStats``):

- main head: clipped surrogate (clip-higher, optional dual-clip, GSPO), optional k3 KL to
  the frozen reference and entropy bonus;
- ``detach``: ``(c/K) sum_k CE_k`` with the MTP modules on detached trunk inputs;
- ``ce``: the same without detach; ``policy``: ``(c/K) sum_k L_PG(l^k, l_old, A)``;
- ``occ``: ``sum_k L_PG`` with head k's coefficient lambda_k from the OCC calibrator;
- optional draft objective (``[mtp] draft_loss = "ce"``), beside any regime:
  ``draft_coefficient * sum_k CE_k`` of a second MTP pass on detached inputs and a
  detached output head, so the draft keeps training while the regime decides how much
  MTP gradient reaches the trunk.

The OCC proxies are computed (and logged) under every regime, so curves compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..config import RL
from ..losses import aggregate, kl_k3, policy_loss
from ..models.logprobs import (
    AlignedTokenStats,
    draft_logprobs,
    head_targets,
    target_mask,
    token_logprobs,
)
from .occ import OCCCalibrator, loss_token_weights, output_gradient_sums
from .stats import UpdateStats

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
    old_mtp_logp: torch.Tensor | None = None  # [N, K, T] MTP heads at the old policy

    def select(self, rows: slice) -> RolloutBatch:
        return RolloutBatch(**{k: None if v is None else v[rows] for k, v in vars(self).items()})

    def to(self, device: torch.device) -> RolloutBatch:
        return RolloutBatch(
            **{k: None if v is None else v.to(device) for k, v in vars(self).items()}
        )


Part = Literal["all", "main"] | int
"""What ``RLObjective`` returns: "all" the whole loss; "main" everything but the regime's
MTP term (main surrogate, KL, entropy, draft objective); k >= 1 head k's raw MTP loss."""


@dataclass
class RLObjective:
    """The loss of one micro-batch under ``regime`` (see the module docstring)."""

    rl: RL
    regime: str
    num_mtp: int
    base: float
    """c / K."""
    calibrator: OCCCalibrator
    draft_loss: str = "none"
    """"ce": cross-entropy of a detached second pass of the MTP modules (MTP-only grads)."""
    draft_coefficient: float = 1.0
    output_grad: bool = False
    """Compute ``occ.output_gradient_sums`` (the "output_grad" estimator's statistics) even
    when the calibrator's estimator does not need them (exact OCC, diagnostics)."""
    records: list[dict] = field(default_factory=list)
    """Per call with ``stats``: {"sums": the global proxy sums (``occ.proxy_sums``, plus
    ``output_gradient_sums``), "applied": the applied coefficients [K]}; the trainer
    collects them per mini-batch and clears the list."""

    def new_stats(self) -> UpdateStats:
        """Zeroed statistics with this objective's layout (K heads, the draft objective)."""
        return UpdateStats.zeros(self.num_mtp, draft=self.draft_loss == "ce" and self.num_mtp > 0)

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

    def _head_loss(self, stats, batch, counts, k) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(CE_k, L_PG^k, policy kwargs) of head k, unscaled loss shares."""
        mask, tokens, seqs = stats.mask[k], counts["tokens"][k], counts["seqs"][k]
        ce = aggregate(-stats.logp[k], mask, "token-mean", global_tokens=tokens, global_seqs=seqs)
        pg_kwargs = self._policy_kwargs(stats.logp[k], batch, mask, tokens, seqs)
        return ce, policy_loss(**pg_kwargs)[0], pg_kwargs

    def _output_grad_sums(
        self,
        model: nn.Module,
        hidden: list[torch.Tensor],
        stats: AlignedTokenStats,
        batch: RolloutBatch,
        counts: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """``output_gradient_sums`` of the main surrogate and every head's regime loss."""
        weights = []
        for k in range(self.num_mtp + 1):
            mask, tokens, seqs = stats.mask[k], counts["tokens"][k], counts["seqs"][k]
            if k == 0 or self.regime in ("policy", "occ"):

                def loss_fn(lp, mask=mask, tokens=tokens, seqs=seqs):
                    return policy_loss(**self._policy_kwargs(lp, batch, mask, tokens, seqs))[0]

            else:

                def loss_fn(lp, mask=mask, tokens=tokens, seqs=seqs):
                    return aggregate(
                        -lp, mask, "token-mean", global_tokens=tokens, global_seqs=seqs
                    )

            aligned = loss_token_weights(loss_fn, stats.logp[k])
            weights.append(torch.cat([aligned[:, k:], torch.zeros_like(aligned[:, :k])], 1))
        weight = model.output.weight
        weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        heads, rows = self.num_mtp + 1, batch.labels.shape[0]
        return output_gradient_sums(
            weight.detach(),
            torch.stack([h.detach() for h in hidden]),
            head_targets(batch.labels, heads),
            torch.stack(weights),
            self.calibrator.group,
            max(1, model.output.chunk_tokens // (heads * rows)),  # [H, B, chunk, V] in budget
        )

    def mtp_term(
        self,
        stats: AlignedTokenStats,
        batch: RolloutBatch,
        counts: dict[str, torch.Tensor],
        log: UpdateStats,
        exact: tuple[torch.Tensor, torch.Tensor] | None = None,
        output_grad: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The regime's MTP loss term over heads 1..K; per-head statistics go to ``log``.

        ``exact``: (<g, g_m^k>, ||g_m^k||^2) [K] for the "exact" OCC estimator.
        ``output_grad``: ``output_gradient_sums`` for the "output_grad" estimator.
        """
        old_mtp = None if batch.old_mtp_logp is None else batch.old_mtp_logp.transpose(0, 1)
        occ = self.calibrator.calibrate(
            stats.logp[0],
            batch.old_logp,
            stats.logp[1:],
            stats.mask[1:],
            old_mtp,
            exact,
            output_grad=output_grad,
        )
        total = torch.zeros((), device=stats.logp.device)
        applied = torch.zeros(self.num_mtp)
        for k in range(1, self.num_mtp + 1):
            ce, pg, pg_kwargs = self._head_loss(stats, batch, counts, k)
            if self.regime in ("detach", "ce"):
                coefficient, term = self.base, self.base * ce
            elif self.regime == "policy":
                coefficient, term = self.base, self.base * pg
            else:
                coefficient = occ.coefficient[k - 1].item()
                term = self.calibrator.head_loss(occ.coefficient[k - 1], **pg_kwargs)[0]
            applied[k - 1] = coefficient
            total = total + term
            mask = stats.mask[k]
            log.pg_loss[k - 1] += pg.detach().item()
            log.ce_loss[k - 1] += ce.detach().item()
            log.top1[k - 1] += (stats.top1[k] & mask).sum().item()
            log.head_tokens[k - 1] += mask.sum().item()
        self.records.append({"sums": {n: v.cpu() for n, v in occ.sums.items()}, "applied": applied})
        return total

    def draft_term(
        self,
        model: nn.Module,
        draft_hidden: list[torch.Tensor],
        batch: RolloutBatch,
        counts: dict[str, torch.Tensor],
        log: UpdateStats,
    ) -> torch.Tensor:
        """``draft_coefficient * sum_k CE_k`` of the detached draft pass (MTP-only grads)."""
        logp = draft_logprobs(model, draft_hidden, batch.labels)
        mask = target_mask(batch.labels, self.num_mtp + 1, None)[1:]
        total = torch.zeros((), device=logp.device)
        for k in range(1, self.num_mtp + 1):
            ce = aggregate(
                -logp[k - 1],
                mask[k - 1],
                "token-mean",
                global_tokens=counts["tokens"][k],
                global_seqs=counts["seqs"][k],
            )
            log.draft_loss[k - 1] += ce.detach().item()
            total = total + ce
        return self.draft_coefficient * total

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
            if k > 0:
                ce, pg, _ = self._head_loss(stats, batch, counts, k)
                losses.append(ce if self.regime in ("detach", "ce") else pg)
            else:
                mask, tokens, seqs = stats.mask[0], counts["tokens"][0], counts["seqs"][0]
                kwargs = self._policy_kwargs(stats.logp[0], batch, mask, tokens, seqs)
                losses.append(policy_loss(**kwargs)[0])
        return losses

    def __call__(
        self,
        model: nn.Module,
        batch: RolloutBatch,
        counts: dict[str, torch.Tensor],
        log: UpdateStats | None = None,
        *,
        part: Part = "all",
        exact: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """-> this rank's loss share (0-dim). ``counts``: global "tokens"/"seqs" per head [H].

        ``part`` (see ``Part``) serves the exact OCC estimator, which needs the gradients
        of the main objective and of every head's MTP loss separately; ``exact`` carries
        its gradient products into the logged statistics. Statistics go to ``log`` (and
        the OCC sums to ``records``) only when ``log`` is given (``new_stats()``).
        """
        if isinstance(part, int) and not isinstance(part, bool):
            return self.diagnostic_losses(model, batch, counts)[part]
        record = log is not None
        log = self.new_stats() if log is None else log
        rl, detach = self.rl, self.regime == "detach"
        draft = self.draft_loss == "ce" and self.num_mtp > 0
        hidden = model(batch.inputs, detach_mtp_inputs=detach, draft_pass=draft)
        draft_hidden = hidden[self.num_mtp + 1 :]
        hidden = hidden[: self.num_mtp + 1]
        stats = token_logprobs(model, hidden, batch.labels, detach_mtp_head=detach, entropy=True)
        mask, tokens, seqs = stats.mask[0], counts["tokens"][0], counts["seqs"][0]
        norm = {"global_tokens": tokens, "global_seqs": seqs}
        loss, pg_stats = policy_loss(
            **self._policy_kwargs(stats.logp[0], batch, mask, tokens, seqs)
        )
        log.clipped_tokens += float(pg_stats.clipped_tokens)
        log.entropy += aggregate(stats.entropy.detach(), mask, "token-mean", **norm).item()
        if rl.entropy_coef:
            loss = loss - rl.entropy_coef * aggregate(stats.entropy, mask, rl.loss_agg_mode, **norm)
        if batch.ref_logp is not None:
            kl = kl_k3(stats.logp[0], batch.ref_logp)
            loss = loss + rl.kl_coef * aggregate(kl, mask, rl.loss_agg_mode, **norm)
            log.kl += aggregate(kl.detach(), mask, "token-mean", **norm).item()
        if self.num_mtp:
            records = len(self.records)
            out = None
            if self.output_grad or self.calibrator.estimator == "output_grad":
                out = self._output_grad_sums(model, hidden, stats, batch, counts)
            term = self.mtp_term(stats, batch, counts, log, exact, out)
            if not record:
                del self.records[records:]
            if part == "all":
                loss = loss + term
        if draft:
            loss = loss + self.draft_term(model, draft_hidden, batch, counts, log)
        return loss
