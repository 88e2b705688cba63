"""Verifiable rewards: a function of the decoded response and the reference answer.

``RewardFunction(response, answer) -> float``. ``[reward] function`` names one of
``REWARD_FUNCTIONS``; other rewards (math-verify) plug in with the same signature.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["REWARD_FUNCTIONS", "RewardFunction", "exact_match", "get_reward_function"]

RewardFunction = Callable[[str, str], float]


def exact_match(response: str, answer: str) -> float:
    """1.0 when the response, stripped of surrounding whitespace, equals the answer."""
    return 1.0 if response.strip() == answer.strip() else 0.0


REWARD_FUNCTIONS: dict[str, RewardFunction] = {"exact_match": exact_match}


def get_reward_function(name: str) -> RewardFunction:
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"reward.function = {name!r} is unknown; available: {sorted(REWARD_FUNCTIONS)}"
        ) from None
