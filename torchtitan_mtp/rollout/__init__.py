"""Rollout engines: generate completions of tokenised prompts with the current policy.

``base`` defines the protocol (``RolloutEngine``, ``SamplingParams``, ``Completion``);
``native`` is the in-process engine, batched KV-cache decoding on the training model
itself (plain, FSDP2, TP or FSDP + TP).
"""

from .base import Completion, RolloutEngine, SamplingParams
from .native import NativeRolloutEngine, sample_tokens

__all__ = [
    "Completion",
    "NativeRolloutEngine",
    "RolloutEngine",
    "SamplingParams",
    "sample_tokens",
]
