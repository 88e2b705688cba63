"""The rollout-engine protocol: the native PyTorch engine and the vLLM engine plug in here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = ["Completion", "RolloutEngine", "SamplingParams"]


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


class RolloutEngine(Protocol):
    """Generates completions for a batch of tokenised prompts with the current policy."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One completion per prompt, in order; callers repeat prompts for n samples."""
        ...
