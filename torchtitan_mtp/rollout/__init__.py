"""Rollout engines: generate completions of tokenised prompts with the current policy.

``base`` defines the protocol (``RolloutEngine``, ``SamplingParams``, ``Completion``,
``SpecDecodeStats``); ``native`` is the in-process engine, batched KV-cache decoding on the
training model itself (plain, FSDP2, TP or FSDP + TP), optionally self-speculative with the
model's MTP modules; ``vllm`` drives vLLM (imported only when selected).
"""

from .base import Completion, RolloutEngine, SamplingParams, SpecDecodeStats
from .native import NativeRolloutEngine, sample_tokens

__all__ = [
    "Completion",
    "NativeRolloutEngine",
    "RolloutEngine",
    "SamplingParams",
    "SpecDecodeStats",
    "sample_tokens",
]
