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

Measured (OCC_SPEC §3): delta_k above is head k's GAP to the main head (about 1 nat), not a
change under a small step, so both estimators put lambda_k near 0 with a random sign. The
"head_change" estimator uses head k's own change instead, ``c_k = l^k - l^k_old`` with
``l^k_old`` the head's log-prob at the step's old policy: ``A_k = mean(delta * c_k)``,
``V_k = mean(c_k^2)``, ``lambda_k = base * A_k / V_k``. Both changes come from the same
parameter step, so A_k / V_k (the least-squares slope of delta on c_k) is O(1) by
construction. The "exact" estimator is the ground truth: ``beta <g, g_m^k> /
||g_m^k||^2`` from real gradients over the shared parameters (the trainer computes the
products with K + 1 backward passes; see ``exact_coefficient``).

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

from ..losses import PolicyLossStats, policy_loss

__all__ = [
    "ApplyTo",
    "Estimator",
    "OCCCalibrator",
    "OCCStats",
    "occ_coefficient",
    "PROXY_ESTIMATORS",
    "exact_coefficient",
    "loss_token_weights",
    "output_gradient_sums",
    "occ_statistics",
    "proxy_estimate",
    "proxy_sums",
    "scaled_head_policy_loss",
]

Estimator = Literal["ratio_of_means", "mean_of_ratios", "head_change", "output_grad"]
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
    sums: dict[str, torch.Tensor] | None = None
    """The global token sums behind every proxy estimator (``proxy_sums``)."""

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


PROXY_ESTIMATORS: tuple[str, ...] = (
    "ratio_of_means",
    "mean_of_ratios",
    "head_change",
    "output_grad",
)
"""The cheap estimators (no extra backward pass); "exact" is computed by the trainer."""


@torch.no_grad()
def proxy_sums(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mtp_logp: torch.Tensor,
    mask: torch.Tensor,
    old_mtp_logp: torch.Tensor | None = None,
    eps: float = 1e-8,
    group: dist.ProcessGroup | None = None,
) -> dict[str, torch.Tensor]:
    """Token sums behind every proxy estimator, global over ``group``; float32 [*heads].

    Keys: ``count`` (valid tokens), ``gap_prod`` = sum delta * delta_k, ``gap_sq`` = sum
    delta_k^2, ``gap_ratio`` = sum delta delta_k / (delta_k^2 + eps) (delta_k = l^k - l_old,
    the head's gap to the behaviour policy), and with ``old_mtp_logp`` ``own_prod`` =
    sum delta * c_k, ``own_sq`` = sum c_k^2 with c_k = l^k - l^k_old, head k's own
    log-prob change since the step's old log-probs.
    """
    mask = mask.bool()
    # where, not multiplication: padding may hold NaN/inf and must not leak into a sum
    delta = torch.where(mask, logp.float() - old_logp.float(), 0.0)
    gap = torch.where(mask, mtp_logp.float() - old_logp.float(), 0.0)
    names = ["count", "gap_prod", "gap_sq", "gap_ratio"]
    rows = [mask.float(), delta * gap, gap**2, delta * gap / (gap**2 + eps)]
    if old_mtp_logp is not None:
        own = torch.where(mask, mtp_logp.float() - old_mtp_logp.float(), 0.0)
        names += ["own_prod", "own_sq"]
        rows += [delta * own, own**2]
    sums = torch.stack([r.sum(dim=(-2, -1)) for r in rows])  # [n, *heads]
    if group is not None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(names, sums, strict=True))


def loss_token_weights(loss_fn, logp: torch.Tensor) -> torch.Tensor:
    """-d loss / d logp per token [B, S] (the weight of each token's score function in the
    loss's ascent direction), from ``loss_fn(logp)`` on a detached copy: no model graph."""
    leaf = logp.detach().float().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return torch.zeros_like(leaf) if grad is None else -grad.detach()


@torch.no_grad()
def output_gradient_sums(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """Exact gradient products over the output head ``W``, from the forward pass alone.

    The ascent direction of a loss on ``W`` is ``G = sum_i e_i h_i^T`` with the logit-space
    direction ``e_i = w_i (onehot(y_i) - softmax(W h_i))`` at every prediction position i
    (``w_i = -d loss / d logp_i``). With G_0 for the main loss and G_k for head k's:
    ``out_inner`` [K] = <G_0, G_k>, ``out_sq`` [K] = ||G_k||^2. Global: the G are
    all-reduced over ``group`` before the products. Cost: the heads' logits once more and
    one [H, V, D] matrix (tied embeddings: the embedding's input-side gradient is not
    included).

    Args:
        weight: [V, D] the full output-head weight.
        hidden: [H, B, S, D] every head's normalised hidden state.
        targets: [H, B, S] head h's target at prediction position i (< 0: none).
        token_weights: [H, B, S] -d loss_h / d logp at prediction position i.
    """
    num_heads, _, seq, _ = hidden.shape
    w_full = weight.float()
    gram = hidden.new_zeros(num_heads, *w_full.shape, dtype=torch.float32)
    for start in range(0, seq, chunk_size):
        h = hidden[:, :, start : start + chunk_size].float()
        y = targets[:, :, start : start + chunk_size]
        w = torch.where(y >= 0, token_weights[:, :, start : start + chunk_size].float(), 0.0)
        e = -torch.softmax(h @ w_full.T, dim=-1)  # [H, B, C, V]
        e.scatter_add_(-1, y.clamp(min=0).unsqueeze(-1), torch.ones_like(e[..., :1]))
        gram += torch.einsum("hbcv,hbcd->hvd", e * w.unsqueeze(-1), h)
    if group is not None:
        dist.all_reduce(gram, group=group)
    flat = gram.flatten(1)
    return {
        "out_inner": flat[1:] @ flat[0],
        "out_sq": (flat[1:] ** 2).sum(dim=1),
    }


def proxy_estimate(
    sums: dict[str, torch.Tensor],
    estimator: str,
    base: float,
    eps: float = 1e-8,
    beta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A_k, V_k, lambda_k) of one proxy estimator from ``proxy_sums`` (and, for
    "output_grad", ``output_gradient_sums``); no token -> zeros. The log-prob estimators
    scale by ``base`` = c / K, "output_grad" (a gradient ratio like the exact one) by
    ``beta``."""
    count = sums["count"].clamp(min=1)  # no valid token: every sum is 0, so every mean is 0
    if estimator == "output_grad":
        if "out_inner" not in sums:
            raise ValueError("the output_grad estimator needs output_gradient_sums")
        inner, sq = sums["out_inner"], sums["out_sq"]
        return inner, sq, torch.where(sq > 0, beta * inner / (sq + eps), torch.zeros_like(sq))
    if estimator in ("ratio_of_means", "mean_of_ratios"):
        correlation, penalty = sums["gap_prod"] / count, sums["gap_sq"] / count
    elif estimator == "head_change":
        if "own_prod" not in sums:
            raise ValueError("the head_change estimator needs old_mtp_logp")
        correlation, penalty = sums["own_prod"] / count, sums["own_sq"] / count
    else:
        raise ValueError(f"unknown OCC proxy estimator {estimator!r}")
    if estimator == "mean_of_ratios":
        coefficient = base * sums["gap_ratio"] / count
    else:
        coefficient = base * correlation / (penalty + eps)
    return correlation, penalty, coefficient


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
    old_mtp_logp: torch.Tensor | None = None,
    output_grad: dict[str, torch.Tensor] | None = None,
    beta: float = 1.0,
) -> OCCStats:
    """Per-head A_k, V_k, lambda_k and gain proxy, global over ``group`` if given.

    Args:
        logp, old_logp: [B, S] main head's current and behaviour log-probs.
        mtp_logp: [K, B, S] (or [B, S] for one head) aligned MTP log-probs.
        mask: bool, same shape as ``mtp_logp``: the tokens where the head has a prediction.
        base: c / K.
        old_mtp_logp: like ``mtp_logp``, the heads' log-probs at the step's old policy
            (needed by "head_change").
        output_grad: ``output_gradient_sums`` (needed by "output_grad", scaled by ``beta``).

    Returns:
        ``OCCStats`` of shape ``mtp_logp.shape[:-2]``. No valid token -> all zeros.
    """
    if estimator not in PROXY_ESTIMATORS:
        raise ValueError(f"unknown OCC estimator {estimator!r}")
    sums = proxy_sums(logp, old_logp, mtp_logp, mask, old_mtp_logp, eps, group)
    sums.update(output_grad or {})
    correlation, penalty, coefficient = proxy_estimate(sums, estimator, base, eps, beta)
    gain = _gain(beta if estimator == "output_grad" else base, coefficient, correlation, penalty)
    return OCCStats(correlation, penalty, coefficient, gain, sums)


def exact_coefficient(
    inner: torch.Tensor, sq_norm: torch.Tensor, beta: float, eps: float = 1e-8
) -> torch.Tensor:
    """lambda*_k = beta <g, g_m^k> / ||g_m^k||^2 (OCC_SPEC §3, "the exact optimum").

    ``inner`` and ``sq_norm`` [K] are over the parameters the MTP loss shares with the
    main objective; a head with no gradient there (||g_m^k|| = 0) gets lambda = 0.
    """
    return torch.where(sq_norm > 0, beta * inner / (sq_norm + eps), torch.zeros_like(inner))


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
    estimator: Estimator | Literal["exact"] = "ratio_of_means"
    eps: float = 1e-8
    beta: float = 1.0
    """estimator = "exact": lambda*_k = beta <g, g_m^k> / ||g_m^k||^2."""
    clamp_min: float | None = None
    clamp_max: float | None = None
    apply_to: ApplyTo = "advantage"
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.estimator not in (*PROXY_ESTIMATORS, "exact"):
            raise ValueError(f"unknown OCC estimator {self.estimator!r}")
        if self.apply_to not in ("advantage", "loss"):
            raise ValueError(f"unknown apply_to {self.apply_to!r}")

    def calibrate(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        mtp_logp: torch.Tensor,
        mtp_mask: torch.Tensor,
        old_mtp_logp: torch.Tensor | None = None,
        exact: tuple[torch.Tensor, torch.Tensor] | None = None,
        output_grad: dict[str, torch.Tensor] | None = None,
    ) -> OCCStats:
        """logp, old_logp [B, S]; mtp_logp, mtp_mask [K, B, S] -> ``OCCStats`` of [K].

        ``old_mtp_logp`` [K, B, S]: the heads' old log-probs (for "head_change");
        ``output_grad``: ``output_gradient_sums`` (for "output_grad").
        ``exact``: (<g, g_m^k>, ||g_m^k||^2) [K] from real gradients; with the "exact"
        estimator they are A_k, V_k and give lambda_k (the proxy sums are still computed
        for comparison). The coefficient is clamped to [clamp_min, clamp_max] when set;
        the gain proxy is that of the clamped (applied) coefficient. No grad.
        """
        proxy = "ratio_of_means" if self.estimator == "exact" else self.estimator
        if proxy == "head_change" and old_mtp_logp is None:
            raise ValueError("the head_change estimator needs the heads' old log-probs")
        stats = occ_statistics(
            logp,
            old_logp,
            mtp_logp,
            mtp_mask,
            base=self.base,
            eps=self.eps,
            estimator=proxy,
            group=self.group,
            old_mtp_logp=old_mtp_logp,
            output_grad=output_grad,
            beta=self.beta,
        )
        if self.estimator == "exact":
            if exact is None:  # not known yet: the trainer fills it in after the passes
                inner = sq_norm = coefficient = torch.zeros_like(stats.coefficient)
            else:
                inner, sq_norm = (t.to(stats.coefficient) for t in exact)
                coefficient = exact_coefficient(inner, sq_norm, self.beta, self.eps)
            stats = stats._replace(correlation=inner, penalty=sq_norm, coefficient=coefficient)
        coefficient = self.clamp(stats.coefficient)
        base = self.beta if self.estimator in ("exact", "output_grad") else self.base
        gain = _gain(base, coefficient, stats.correlation, stats.penalty)
        return stats._replace(coefficient=coefficient, gain=gain)

    def clamp(self, coefficient: torch.Tensor) -> torch.Tensor:
        """The coefficient clamped to [clamp_min, clamp_max] where set."""
        if self.clamp_min is None and self.clamp_max is None:
            return coefficient
        return coefficient.clamp(min=self.clamp_min, max=self.clamp_max)

    def head_loss(
        self, coefficient: float | torch.Tensor, **policy_loss_kwargs
    ) -> tuple[torch.Tensor, PolicyLossStats]:
        """One head's ``policy_loss`` (same kwargs) with lambda applied per ``apply_to``."""
        return scaled_head_policy_loss(coefficient, self.apply_to, **policy_loss_kwargs)
