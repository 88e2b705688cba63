"""The TrainSpec's data loaders: SFT samples of the arithmetic task, RL prompt batches of
the ``[data]`` section, and the ``[validation]`` samples of the held-out split."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import DataLoader, IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig

from ..models.logprobs import IGNORE_INDEX
from .arithmetic import arithmetic_problems, noisy_teacher
from .records import Problem
from .tasks import rl_prompt_splits
from .tokenizer import pad_id

__all__ = ["ProblemStream", "SFTDataset", "build_dataloader", "build_validation_dataloader"]


class ProblemStream(IterableDataset, Stateful):
    """Endless, rank-sharded stream of problems; each epoch in a new seeded order.

    Rank r of w yields global items r, r + w, r + 2w, ..., so the ranks together see the
    single-process stream. The position is checkpointed (``state_dict``).
    """

    def __init__(
        self, problems: list[Problem], seed: int, dp_rank: int = 0, dp_world_size: int = 1
    ):
        self.problems, self.seed = problems, seed
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self._index = 0  # items this rank has produced
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, permutation) cache

    def _problem(self, global_index: int) -> Problem:
        epoch, offset = divmod(global_index, len(self.problems))
        if self._order[0] != epoch:
            order = list(range(len(self.problems)))
            random.Random(self.seed + epoch).shuffle(order)
            self._order = (epoch, order)
        return self.problems[self._order[1][offset]]

    def __iter__(self):
        while True:
            global_index = self._index * self.dp_world_size + self.dp_rank
            self._index += 1
            yield self._problem(global_index)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self._index}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._index = state_dict["index"]


class SFTDataset(ProblemStream):
    """The problem stream as (input [S], labels [S]) SFT samples.

    A sample is ``<bos> prompt answer <eos>``, right-padded to ``seq_len + 1`` tokens;
    labels are the next tokens, with the prompt and the padding set to ``IGNORE_INDEX``
    (the loss covers the answer and <eos>).
    """

    def __init__(
        self,
        problems: list[Problem],
        tokenizer: BaseTokenizer,
        seq_len: int,
        seed: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
    ):
        super().__init__(problems, seed, dp_rank, dp_world_size)
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.pad_id = pad_id(tokenizer)

    def encode(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input ids [seq_len], labels [seq_len]."""
        prompt = self.tokenizer.encode(problem.prompt, add_bos=True, add_eos=False)
        answer = self.tokenizer.encode(problem.answer, add_bos=False, add_eos=True)
        ids = prompt + answer
        if len(ids) > self.seq_len + 1:
            raise ValueError(
                f"problem {problem.prompt}{problem.answer!r} has {len(ids)} tokens, more than "
                f"training.seq_len + 1 = {self.seq_len + 1}; raise training.seq_len"
            )
        tokens = torch.full((self.seq_len + 1,), self.pad_id, dtype=torch.long)
        tokens[: len(ids)] = torch.tensor(ids)
        labels = tokens[1:].clone()
        labels[: len(prompt) - 1] = IGNORE_INDEX
        labels[len(ids) - 1 :] = IGNORE_INDEX
        return tokens[:-1], labels

    def __iter__(self):
        for problem in super().__iter__():
            yield self.encode(problem)


def _collate(samples: list[tuple[torch.Tensor, torch.Tensor]]):
    inputs, labels = zip(*samples, strict=True)
    return {"input": torch.stack(inputs)}, torch.stack(labels)


def build_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer: BaseTokenizer, job_config: JobConfig, **kwargs
) -> ParallelAwareDataloader:
    """The TrainSpec dataloader builder; ``[training] dataset`` selects what it yields.

    - ``"arithmetic"``: SFT samples ({"input": [B, S]}, labels [B, S]) of the train split;
    - ``"rl_prompts"``: RL prompt batches (lists of records) of the ``[data]`` train split.

    ``training.local_batch_size`` is the batch per data-parallel rank.
    """
    data, training = job_config.data, job_config.training
    if training.dataset == "arithmetic":
        train, _ = arithmetic_problems(data.seed, data.max_digits, data.num_train, data.num_heldout)
        targets = noisy_teacher(train, data.sft_carry_error_rate, data.seed)
        dataset = SFTDataset(
            targets, tokenizer, training.seq_len, data.seed, dp_rank, dp_world_size
        )
        collate = _collate
    elif training.dataset == "rl_prompts":
        records, _ = rl_prompt_splits(job_config)
        dataset, collate = ProblemStream(records, data.seed, dp_rank, dp_world_size), list
    else:
        raise ValueError(
            f"training.dataset = {training.dataset!r} is unknown; "
            "available: 'arithmetic' (SFT samples), 'rl_prompts' (RL prompts)"
        )
    return ParallelAwareDataloader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        batch_size=training.local_batch_size,
        collate_fn=collate,
    )


def build_validation_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer: BaseTokenizer, job_config: JobConfig
) -> DataLoader:
    """``[validation]``: the ``[data]`` held-out split as SFT samples, one pass.

    Every rank gets the same number of problems (the split is cut to a multiple of the
    data-parallel degree), so the ranks run the same number of batches of
    ``validation.local_batch_size``. Samples are padded to ``training.seq_len`` like the
    training samples (``validation.seq_len`` sizes TorchTitan's text datasets only).
    """
    data = job_config.data
    if data.name != "arithmetic":
        raise ValueError(
            f"[validation] computes the SFT loss on the held-out split of the arithmetic "
            f"task; data.name = {data.name!r} has none. Set validation.enable = false"
        )
    _, heldout = arithmetic_problems(data.seed, data.max_digits, data.num_train, data.num_heldout)
    heldout = heldout[: len(heldout) - len(heldout) % dp_world_size]
    encoder = SFTDataset([], tokenizer, job_config.training.seq_len, data.seed)
    samples = [encoder.encode(p) for p in heldout[dp_rank::dp_world_size]]
    return DataLoader(
        samples, batch_size=job_config.validation.local_batch_size, collate_fn=_collate
    )
