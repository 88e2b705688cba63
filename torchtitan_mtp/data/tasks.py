"""RL prompt splits for ``[data] name``: (train, held-out) lists of prompt records.

Every record has ``.prompt`` (text, chat-rendered when ``data.chat_template``) and
``.answer`` (the reference the reward compares with).
"""

from __future__ import annotations

from torchtitan.config import JobConfig

from .arithmetic import Problem, arithmetic_problems
from .datasets import apply_chat_template, gsm8k_splits, load_prompt_dataset
from .tokenizer import tokenizer_dir

__all__ = ["rl_prompt_splits"]


def rl_prompt_splits(job_config: JobConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) prompt records of the job's ``[data]`` section."""
    data = job_config.data
    if data.name == "arithmetic":
        return arithmetic_problems(data.seed, data.max_digits, data.num_train, data.num_heldout)
    transform = None if data.answer_transform == "none" else data.answer_transform
    if data.name == "gsm8k":
        train, heldout = gsm8k_splits(
            num_train=1319 - data.num_heldout,
            seed=data.seed,
            prompt_template=data.prompt_template,
        )
    else:

        def load(path: str):
            return load_prompt_dataset(
                path,
                prompt_column=data.prompt_column,
                answer_column=data.answer_column,
                prompt_template=data.prompt_template,
                answer_transform=transform,
                layout=data.layout,
            )

        train = load(data.path)
        if data.heldout_path:
            heldout = load(data.heldout_path)
        else:
            train, heldout = train[: -data.num_heldout], train[-data.num_heldout :]
    if data.chat_template:
        directory = tokenizer_dir(job_config)
        train = apply_chat_template(train, directory)
        heldout = apply_chat_template(heldout, directory)
    return train, heldout
