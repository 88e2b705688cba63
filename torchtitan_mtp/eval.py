"""Held-out evaluation (greedy accuracy, avg@k and pass@k through a rollout engine), and
its entry ``python -m torchtitan_mtp.eval --job.config_file X``.

``evaluate_set`` scores one prompt set on this rank's share of the problems and returns
SUMS, so that callers can all-reduce them over data-parallel ranks before dividing
(``EvalSums.metrics``). With ``k`` samples per problem, avg@k is the mean fraction of
correct samples and pass@k the fraction of problems with at least one correct sample
(n = k, where the unbiased pass@k estimator is exactly that indicator).

``main`` evaluates a job's latest weights, also under torchrun (data-parallel).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .rewards import RewardFunction, score_batch
from .rollout.base import Completion, RolloutEngine, SamplingParams

__all__ = ["EvalSums", "evaluate_set", "format_table", "main"]


@dataclass
class EvalSums:
    """Counts over problems: [problems, greedy correct, sum of c/k, problems with c >= 1]."""

    problems: float = 0.0
    greedy_correct: float = 0.0
    avg_sum: float = 0.0
    pass_count: float = 0.0

    def metrics(self, k: int) -> dict[str, float]:
        n = max(self.problems, 1.0)
        out = {"greedy": self.greedy_correct / n}
        if k:
            out[f"avg@{k}"] = self.avg_sum / n
            out[f"pass@{k}"] = self.pass_count / n
        return out


def evaluate_set(
    engine: RolloutEngine,
    prompts: Sequence[list[int]],
    answers: Sequence[str],
    reward_fn: RewardFunction,
    response_text: Callable[[Completion], str],
    *,
    greedy: SamplingParams,
    sampled: SamplingParams | None = None,
    k: int = 0,
) -> EvalSums:
    """Score prompts [P] against answers [P]: one greedy pass, then k samples each."""
    sums = EvalSums(problems=float(len(prompts)))
    if not prompts:
        return sums
    texts = [response_text(c) for c in engine.generate(list(prompts), greedy)]
    sums.greedy_correct = float(sum(score_batch(reward_fn, texts, answers)))
    if k and sampled is not None:
        repeated = [p for p in prompts for _ in range(k)]
        texts = [response_text(c) for c in engine.generate(repeated, sampled)]
        scores = torch.tensor(
            score_batch(reward_fn, texts, [a for a in answers for _ in range(k)])
        ).view(len(prompts), k)
        correct = (scores > 0.5).float()
        sums.avg_sum = float(correct.mean(dim=1).sum())
        sums.pass_count = float((correct.sum(dim=1) > 0).sum())
    return sums


def format_table(step: int, rows: dict[str, tuple[int, dict[str, float]]]) -> str:
    """A printable table: one row per set with n and its metrics."""
    columns = sorted({c for _, m in rows.values() for c in m}, key=lambda c: (c != "greedy", c))
    header = f"eval step {step} | {'set':<10} | {'n':>5} | " + " | ".join(
        f"{c:>8}" for c in columns
    )
    lines = [header, "-" * len(header)]
    for name, (n, m) in rows.items():
        cells = " | ".join(f"{m[c]:8.3f}" if c in m else f"{'':>8}" for c in columns)
        lines.append(f"eval step {step} | {name:<10} | {n:>5} | {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m torchtitan_mtp.eval --job.config_file X``: evaluate the job's latest
    weights (RL checkpoint, else the finished SFT stage, else model.gguf_file) on
    ``[eval] sets`` with ``[eval] samples``, print the table, log to TensorBoard."""
    from .train import _final_checkpoint, _parse_or_exit

    config = _parse_or_exit(argv)
    # Its own TensorBoard run (<tb>/eval/rl): never purges the RL stage's steps.
    config.metrics.save_tb_folder = os.path.join(config.metrics.save_tb_folder, "eval")
    from .rl.trainer import RLTrainer, rl_stage_config

    sft_folder = f"{config.checkpoint.folder}/sft"
    init_path = _final_checkpoint(config, sft_folder, config.training.steps)
    config.rl.steps = max(config.rl.steps, 1)
    trainer = RLTrainer(rl_stage_config(config, init_path or config.checkpoint.initial_load_path))
    try:
        trainer.load()
        trainer.evaluate()
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
