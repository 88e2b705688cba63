"""Prompt records: what every task, dataset and the trainer pass around."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Problem", "PromptRecord"]


@dataclass(frozen=True)
class Problem:
    """A prompt and the reference answer its reward compares with."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class PromptRecord(Problem):
    """An RL prompt: ``Problem(prompt, answer)`` plus where it came from.

    ``source`` is the file, ``row`` the 1-based line (jsonl) or record number (json,
    parquet), for error messages and logs. A ``Problem`` wherever the trainer takes one.
    """

    source: str = ""
    row: int = 0
