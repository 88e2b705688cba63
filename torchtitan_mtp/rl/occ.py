"""Optimal Coefficient Calibration (OCC_SPEC §3): each MTP head's policy-loss coefficient.

Over the valid tokens of the batch, with the main head's log-prob change
``delta = logp - old_logp`` and head k's ``delta_k = mtp_logp_k - old_logp``:

    A_k = mean(delta * delta_k)          # alignment proxy   ~ <g, g_m>
    V_k = mean(delta_k ** 2)             # penalty proxy     ~ ||g_m||^2
    lambda_k = base * A_k / (V_k + eps)  # "ratio_of_means" (paper, Eq. 13), base = c / K

The reference code's "mean_of_ratios" estimator is ``base * mean(delta delta_k /
(delta_k^2 + eps))``. The reference averages it over every position of the response
block, padding included (padding adds zeros to the sum but counts in the mean); here it
averages over VALID tokens only, so its values are larger on padded batches.

How to read lambda:
- It is a constant of the backward pass (computed under ``no_grad``).
- ``old_logp`` is the trainer's own recomputation before the updates, so on the FIRST
  mini-batch of a step the policy has not moved yet: delta = 0 and lambda = 0 (the MTP
  policy term is off). lambda is informative only on later mini-batches (the reference
  MiMo-7B script uses 4 per step); log it per mini-batch.
- Statistics are global: with ``group`` the sums and the token count are all-reduced
  before dividing, so every data-parallel rank applies the same lambda (the reference
  computes one per micro-batch per rank).

How lambda enters head k's loss (``apply_to``): "advantage" (the reference, default)
multiplies the advantages of head k's surrogate by lambda_k, so for lambda_k < 0 the clip
branch flips (the surrogate of -A is not minus the surrogate of A); "loss" multiplies head
k's surrogate loss. The two agree for lambda_k >= 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist

from .losses import PolicyLossStats, policy_loss

__all__ = [
    "ApplyTo",
    "Estimator",
    "OCCCalibrator",
    "OCCStats",
    "occ_coefficient",
    "occ_statistics",
    "scaled_head_policy_loss",
]

Estimator = Literal["ratio_of_means", "mean_of_ratios"]
ApplyTo = Literal["advantage", "loss"]


class OCCStats(NamedTuple):
    """Per-head OCC statistics, float32, shape [K] (or 0-dim for a single [B, S] head)."""

    correlation: torch.Tensor
    """A_k = mean(delta * delta_k)."""
    penalty: torch.Tensor
    """V_k = mean(delta_k ** 2)."""
    coefficient: torch.Tensor
    """lambda_k (after the calibrator's clamp, if any)."""
    gain: torch.Tensor
    """base * lambda_k * A_k - lambda_k^2 V_k / 2: the proxy of Delta(lambda_k)."""

    def metrics(self) -> dict[str, float]:
        """TensorBoard scalars (OCC_SPEC §5); heads are numbered from 1."""
        tags = {
            "occ/correlation_proxy": self.correlation,
            "occ/penalty_proxy": self.penalty,
            "occ/coefficient": self.coefficient,
            "occ/gain_proxy": self.gain,
        }
        return {
            f"{tag}/head{k + 1}": float(v)
            for tag, values in tags.items()
            for k, v in enumerate(values.reshape(-1).tolist())
        }


def _gain(
    base: float, coefficient: torch.Tensor, correlation: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """beta * lambda * A - lambda^2 V / 2 with beta = base (OCC_SPEC §5), any shape."""
    return base * coefficient * correlation - coefficient**2 * penalty / 2


@torch.no_grad()
def occ_statistics(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mtp_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    base: float,
    eps: float = 1e-8,
    estimator: Estimator = "ratio_of_means",
    group: dist.ProcessGroup | None = None,
) -> OCCStats:
    """Per-head A_k, V_k, lambda_k and gain proxy, global over ``group`` if given.

    Args:
        logp, old_logp: [B, S] main head's current and behaviour log-probs.
        mtp_logp: [K, B, S] (or [B, S] for one head) aligned MTP log-probs.
        mask: bool, same shape as ``mtp_logp``: the tokens where the head has a prediction.
        base: c / K.

    Returns:
        ``OCCStats`` of shape ``mtp_logp.shape[:-2]``. No valid token -> all zeros.
    """
    if estimator not in ("ratio_of_means", "mean_of_ratios"):
        raise ValueError(f"unknown OCC estimator {estimator!r}")
    mask = mask.bool()
    # where, not multiplication: padding may hold NaN/inf and must not leak into a sum
    delta = torch.where(mask, logp.float() - old_logp.float(), 0.0)
    delta_k = torch.where(mask, mtp_logp.float() - old_logp.float(), 0.0)
    prod, sq = delta * delta_k, delta_k**2
    sums = torch.stack(
        [
            prod.sum(dim=(-2, -1)),
            sq.sum(dim=(-2, -1)),
            (prod / (sq + eps)).sum(dim=(-2, -1)),  # padding: 0 / eps = 0
            mask.sum(dim=(-2, -1)).float(),
        ]
    )  # [4, *heads]
    if group is not None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    prod_sum, sq_sum, ratio_sum, count = sums
    count = count.clamp(min=1)  # no valid token: every sum is 0, so every mean is 0
    correlation, penalty = prod_sum / count, sq_sum / count
    if estimator == "ratio_of_means":
        coefficient = base * correlation / (penalty + eps)
    else:
        coefficient = base * ratio_sum / count
    gain = _gain(base, coefficient, correlation, penalty)
    return OCCStats(correlation, penalty, coefficient, gain)


def occ_coefficient(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mtp_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    base: float,
    eps: float = 1e-8,
    estimator: Estimator = "ratio_of_means",
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """lambda (0-dim float32, no grad) for one head: logp, old_logp, mtp_logp, mask [B, S].

    See ``occ_statistics``; all-reduced over ``group`` so every rank gets the same value.
    """
    return occ_statistics(
        logp, old_logp, mtp_logp, mask, base=base, eps=eps, estimator=estimator, group=group
    ).coefficient


def scaled_head_policy_loss(
    coefficient: float | torch.Tensor, apply_to: ApplyTo, **policy_loss_kwargs
) -> tuple[torch.Tensor, PolicyLossStats]:
    """``policy_loss`` of one head with its coefficient applied -> (loss share, stats).

    ``apply_to="advantage"`` (reference): ``policy_loss(advantages=advantages * coefficient)``,
    so for a negative coefficient the clip branch flips and the stats count the flipped
    clipping. ``apply_to="loss"``: ``coefficient * policy_loss(...)``. Equal for
    coefficient >= 0. Also serves the fixed-coefficient Policy regime (coefficient = c / K).
    """
    if apply_to == "advantage":
        kwargs = dict(policy_loss_kwargs)
        kwargs["advantages"] = kwargs["advantages"] * coefficient
        return policy_loss(**kwargs)
    if apply_to == "loss":
        loss, stats = policy_loss(**policy_loss_kwargs)
        return loss * coefficient, stats
    raise ValueError(f"unknown apply_to {apply_to!r}")


@dataclass
class OCCCalibrator:
    """Online OCC: ``stats = calibrate(...)`` per mini-batch, then ``head_loss`` per head.

    Usage in the trainer, per mini-batch (global over the data-parallel ``group``)::

        stats = calibrator.calibrate(logp, old_logp, mtp_logp, mtp_mask)   # [K] each
        for k in range(K):
            loss_k, pg_stats_k = calibrator.head_loss(
                stats.coefficient[k], logp=mtp_logp[k], old_logp=old_logp,
                advantages=advantages, mask=mtp_mask[k], global_tokens=..., global_seqs=...)
    """

    base: float
    """c / K."""
    estimator: Estimator = "ratio_of_means"
    eps: float = 1e-8
    clamp_min: float | None = None
    clamp_max: float | None = None
    apply_to: ApplyTo = "advantage"
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.estimator not in ("ratio_of_means", "mean_of_ratios"):
            raise ValueError(f"unknown OCC estimator {self.estimator!r}")
        if self.apply_to not in ("advantage", "loss"):
            raise ValueError(f"unknown apply_to {self.apply_to!r}")

    def calibrate(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        mtp_logp: torch.Tensor,
        mtp_mask: torch.Tensor,
    ) -> OCCStats:
        """logp, old_logp [B, S]; mtp_logp, mtp_mask [K, B, S] -> ``OCCStats`` of [K].

        The coefficient is clamped to [clamp_min, clamp_max] when set; the gain proxy is
        that of the clamped (applied) coefficient. Use ``logp.detach()`` or not: no grad.
        """
        stats = occ_statistics(
            logp,
            old_logp,
            mtp_logp,
            mtp_mask,
            base=self.base,
            eps=self.eps,
            estimator=self.estimator,
            group=self.group,
        )
        if self.clamp_min is None and self.clamp_max is None:
            return stats
        coefficient = stats.coefficient.clamp(min=self.clamp_min, max=self.clamp_max)
        gain = _gain(self.base, coefficient, stats.correlation, stats.penalty)
        return stats._replace(coefficient=coefficient, gain=gain)

    def head_loss(
        self, coefficient: float | torch.Tensor, **policy_loss_kwargs
    ) -> tuple[torch.Tensor, PolicyLossStats]:
        """One head's ``policy_loss`` (same kwargs) with lambda applied per ``apply_to``."""
        return scaled_head_policy_loss(coefficient, self.apply_to, **policy_loss_kwargs)
