"""The rollout-engine protocol: the native PyTorch engine and the vLLM engine plug in here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "SpecDecodeStats"]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a sequence ends after emitting one of these (e.g. EOS); it is kept."""
    stop_strings: tuple[str, ...] = ()
    """Generation ends once the decoded response contains one of these; it is kept."""
    seed: int = 0
    """Seed of the sampling generator: the same seed, prompts and weights give the same tokens."""


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    """The response tokens, including a final stop token when there is one."""
    logprobs: list[float]
    """Log-probability of each response token under the sampling distribution of the
    behaviour policy before temperature/top-p/top-k (the model's own distribution)."""
    finish_reason: Literal["stop", "length"]
    extra: dict = field(default_factory=dict)


@dataclass
class SpecDecodeStats:
    """Speculative-decoding counts of one or more ``generate`` calls (vLLM's definitions).

    A *draft* is one proposal of up to K tokens for one running sequence, verified by one
    target forward. ``accepted_per_pos[j]`` counts drafts whose first j + 1 tokens were all
    accepted, so the per-position rates fall with j.
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    @property
    def num_accepted_tokens(self) -> int:
        return sum(self.accepted_per_pos)

    def merge(self, other: SpecDecodeStats) -> SpecDecodeStats:
        """The counts of both (e.g. of several calls or ranks)."""
        width = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        pad = [0] * width
        a = (self.accepted_per_pos + pad)[:width]
        b = (other.accepted_per_pos + pad)[:width]
        return SpecDecodeStats(
            self.num_drafts + other.num_drafts,
            self.num_draft_tokens + other.num_draft_tokens,
            [x + y for x, y in zip(a, b, strict=True)],
        )

    def metrics(self) -> dict[str, float]:
        """``mtp/accept_rate`` (accepted / drafted tokens), ``mtp/accept_length`` (tokens
        emitted per target forward, 1 + accepted / drafts) and ``mtp/accept_rate/pos{j}``
        (1-based draft position j: drafts whose first j tokens were all accepted)."""
        drafts = max(self.num_drafts, 1)
        out = {
            "mtp/accept_rate": self.num_accepted_tokens / max(self.num_draft_tokens, 1),
            "mtp/accept_length": 1.0 + self.num_accepted_tokens / drafts,
        }
        for j, accepted in enumerate(self.accepted_per_pos, start=1):
            out[f"mtp/accept_rate/pos{j}"] = accepted / drafts
        return out


class RolloutEngine(Protocol):
    """Generates completions for a batch of tokenised prompts with the current policy.

    ``last_spec_stats`` holds the speculative-decoding counts of the last ``generate``
    call, or None when it did not decode speculatively.
    """

    last_spec_stats: SpecDecodeStats | None

    def sync_weights(self, version: int | None = None) -> object:
        """Make the next ``generate`` use the policy's current weights (trunk and MTP
        draft); called once per RL step, on every rank together."""
        ...

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One completion per prompt, in order; callers repeat prompts for n samples."""
        ...
