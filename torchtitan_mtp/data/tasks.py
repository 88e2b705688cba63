"""RL prompt splits for ``[data] name``: (train, held-out) lists of prompt records.

Every record has ``.prompt`` (text, chat-rendered when ``data.chat_template``) and
``.answer`` (the reference the reward compares with).
"""

from __future__ import annotations

import copy

from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger

from .arithmetic import arithmetic_problems
from .datasets import apply_chat_template, gsm8k_splits, load_prompt_dataset
from .records import Problem, PromptRecord
from .tokenizer import build_tokenizer, tokenizer_dir

__all__ = ["prompt_token_limit", "rl_prompt_splits"]


_SPLITS: dict[tuple, tuple[list[Problem], list[Problem]]] = {}


def rl_prompt_splits(job_config: JobConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) prompt records of the job's ``[data]`` section.

    Every prompt must leave ``rollout.max_new_tokens`` of the model's ``max_seq_len``
    (``training.seq_len``); a row that does not, or (``data.name = "file"``) is malformed,
    raises ``ValueError`` naming the file and row, or with ``[data] skip_invalid_rows`` is
    left out and counted in a warning.

    Loaded and checked once per process: the job's start-up check, the trainer (held-out
    set) and its dataloader (train set) share the result.
    """
    model, max_new = job_config.model, job_config.rollout.max_new_tokens
    key = (repr(job_config.data), model.flavor, model.hf_assets_path,
           getattr(model, "gguf_file", ""), job_config.training.seq_len, max_new)  # fmt: skip
    if key not in _SPLITS:
        _SPLITS[key] = _load_splits(job_config)
    train, heldout = _SPLITS[key]
    return list(train), list(heldout)


def _load_splits(job_config: JobConfig) -> tuple[list[Problem], list[Problem]]:
    data = job_config.data
    skipped: list[str] | None = [] if data.skip_invalid_rows else None
    transform = None if data.answer_transform == "none" else data.answer_transform
    if data.name == "arithmetic":
        train, heldout = arithmetic_problems(
            data.seed, data.max_digits, data.num_train, data.num_heldout
        )
    elif data.name == "gsm8k":
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
                skipped=skipped,
            )

        train = load(data.path)
        if data.heldout_path:
            heldout = load(data.heldout_path)
        elif data.num_heldout >= len(train):
            raise ValueError(
                f"data.path {data.path!r} has {len(train)} usable rows, and data.num_heldout "
                f"= {data.num_heldout} holds out all of them: lower num_heldout or set "
                "data.heldout_path"
            )
        else:
            train, heldout = train[: -data.num_heldout], train[-data.num_heldout :]
    if data.chat_template:
        directory = tokenizer_dir(job_config)
        train = apply_chat_template(train, directory)
        heldout = apply_chat_template(heldout, directory)
    train = _fitting(job_config, train, "train", skipped)
    heldout = _fitting(job_config, heldout, "held-out", skipped)
    if skipped:
        logger.warning(
            f"[data] skip_invalid_rows: skipped {len(skipped)} rows; the first: "
            + " | ".join(skipped[:3])
        )
    if not train or not heldout:
        raise ValueError(
            f"no usable {'training' if not train else 'held-out'} prompts in [data] "
            f"(name = {data.name!r}, path = {data.path!r}) after skipping invalid rows"
        )
    return train, heldout


def prompt_token_limit(job_config: JobConfig) -> int:
    """Longest prompt, in tokens, that leaves room for ``rollout.max_new_tokens``."""
    from ..models import mtp_flavors

    args = copy.deepcopy(mtp_flavors[job_config.model.flavor])
    args.update_from_config(job_config)
    return args.max_seq_len - job_config.rollout.max_new_tokens


def _fitting(
    job_config: JobConfig, records: list[Problem], split: str, skipped: list[str] | None
) -> list[Problem]:
    """``records`` whose prompts fit :func:`prompt_token_limit`; see rl_prompt_splits."""
    limit = prompt_token_limit(job_config)
    tokenizer = build_tokenizer(job_config)
    add_bos = not job_config.data.chat_template  # as the trainer encodes prompts
    kept = []
    for i, record in enumerate(records):
        n = len(tokenizer.encode(record.prompt, add_bos=add_bos, add_eos=False))
        if n <= limit:
            kept.append(record)
            continue
        where = ""
        if isinstance(record, PromptRecord):
            unit = "line" if record.source.lower().endswith(".jsonl") else "row"
            where = f"{record.source}: {unit} {record.row}"
        message = (
            f"{where or f'{split} prompt {i}'}: the prompt is {n} tokens; with "
            f"rollout.max_new_tokens = {job_config.rollout.max_new_tokens} it exceeds "
            f"training.seq_len = {limit + job_config.rollout.max_new_tokens} (the model's "
            "max_seq_len). Shorten it, raise training.seq_len, or set [data] "
            "skip_invalid_rows = true"
        )
        if skipped is None:
            raise ValueError(message)
        skipped.append(message)
    return kept
