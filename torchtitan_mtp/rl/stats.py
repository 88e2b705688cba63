"""Typed statistics of an RL step: what each micro-batch adds, and the logged metrics.

``UpdateStats`` is filled by ``RLObjective`` on every micro-batch of the step's updates;
``StepStats`` adds the rollout sums. Both hold this rank's sums only. One function,
``models.parallelize.dp_reduce``, sums them over the data-parallel ranks, and
``StepStats.metrics`` turns the global sums into the step's TensorBoard tags.

Two kinds of fields:

- *shares* (``entropy``, ``kl``, ``pg_loss``, ``ce_loss``, ``draft_loss``): each
  micro-batch adds its share of its mini-batch's GLOBAL token mean (normalised by the
  global counts), so the sum over micro-batches and ranks is the sum over optimizer
  updates of each update's mean; divided by the number of updates, the mean per update;
- *counts* (``clipped_tokens``, ``top1``, ``head_tokens`` and every ``StepStats`` field):
  plain sums, turned into rates by dividing by another count.

Per-head lists have K entries, entry k - 1 for MTP head k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["StepStats", "UpdateStats"]


@dataclass
class UpdateStats:
    """Sums over the micro-batches of the step's updates on this rank (see module doc)."""

    entropy: float = 0.0
    """Share of the main head's token-mean entropy."""
    kl: float = 0.0
    """Share of the token-mean k3 KL to the reference (0 without a reference model)."""
    clipped_tokens: float = 0.0
    """Main-head tokens whose surrogate took the clipped branch."""
    pg_loss: list[float] = field(default_factory=list)
    """[K] share of head k's policy surrogate L_PG(l^k, l_old, A) (unscaled)."""
    ce_loss: list[float] = field(default_factory=list)
    """[K] share of head k's cross-entropy on the sampled tokens."""
    top1: list[float] = field(default_factory=list)
    """[K] tokens where head k's argmax is the sampled token."""
    head_tokens: list[float] = field(default_factory=list)
    """[K] tokens head k is trained on."""
    draft_loss: list[float] | None = None
    """[K] share of the draft objective's CE per head; None without a draft objective."""

    @classmethod
    def zeros(cls, num_mtp: int, draft: bool = False) -> UpdateStats:
        def z() -> list[float]:
            return [0.0] * num_mtp

        return cls(
            pg_loss=z(), ce_loss=z(), top1=z(), head_tokens=z(), draft_loss=z() if draft else None
        )

    def metrics(self, updates: int) -> dict[str, float]:
        """``rl/entropy``, ``rl/kl`` and ``mtp/*/head{k}`` over ``updates`` optimizer steps."""
        n = max(updates, 1)
        out = {"rl/entropy": self.entropy / n, "rl/kl": self.kl / n}
        for k in range(1, len(self.pg_loss) + 1):
            out[f"mtp/pg_loss/head{k}"] = self.pg_loss[k - 1] / n
            out[f"mtp/ce_loss/head{k}"] = self.ce_loss[k - 1] / n
            out[f"mtp/top1_agreement/head{k}"] = self.top1[k - 1] / max(self.head_tokens[k - 1], 1)
            if self.draft_loss is not None:
                out[f"mtp/draft_loss/head{k}"] = self.draft_loss[k - 1] / n
        return out


@dataclass
class StepStats:
    """One RL step's sums on this rank: its rollouts and its updates."""

    update: UpdateStats
    sequences: float = 0.0
    """Rollouts (prompts x samples) of this rank."""
    correct: float = 0.0
    """Rollouts the verifier scored correct."""
    reward: float = 0.0
    """Sum of the rollouts' rewards (with any length penalty)."""
    response_tokens: float = 0.0
    """Generated tokens, up to and with the stop token."""
    input_tokens: float = 0.0
    """Non-padding tokens of the training inputs (prompt + response)."""
    trained_tokens: float = 0.0
    """Main-head loss tokens x ppo_epochs: the denominator of the clip fraction."""
    logprob_mismatch: float = 0.0
    """Sum over loss tokens of |rollout log-prob - trainer's old log-prob|."""
    mismatch_tokens: float = 0.0

    def metrics(self, updates: int) -> dict[str, float]:
        """The step's ``rl/*``, ``rollout/logprob_mismatch`` and ``mtp/*`` tags (global when
        the sums are, see ``dp_reduce``); ``updates``: optimizer steps of the step."""
        n = max(self.sequences, 1)
        return {
            "rl/accuracy": self.correct / n,
            "rl/reward_mean": self.reward / n,
            "rl/response_length": self.response_tokens / n,
            "rl/clip_fraction": self.update.clipped_tokens / max(self.trained_tokens, 1),
            "rollout/logprob_mismatch": self.logprob_mismatch / max(self.mismatch_tokens, 1),
            **self.update.metrics(updates),
        }
