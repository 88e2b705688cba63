"""TensorBoard runs per training stage: the TrainSpec's ``build_metrics_processor_fn``.

TorchTitan writes every process start to ``<dump>/<metrics.save_tb_folder>/<YYYYmmdd-HHMM>``,
so an SFT stage and the RL stage started in the same minute share one run (and its
``mtp/*`` tags, with overlapping steps), and a resumed job starts a new run that repeats
the steps after its checkpoint. Here each stage has one fixed run,
``<dump>/<save_tb_folder>/sft`` or ``.../rl`` (``rank_N`` below it with
``metrics.save_for_all_ranks``), and its writer opens at the first logged
step with TensorBoard's ``purge_step``: whatever an interrupted run had logged from that
step on is dropped, so a re-run step appears once. Everything else is TorchTitan's
``MetricsProcessor`` (stdout, memory, WandB).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from torchtitan.components.metrics import BaseLogger, LoggerContainer, MetricsProcessor
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

__all__ = ["StageTensorBoard", "build_metrics_processor", "stage_log_dir"]

STAGES = {"arithmetic": "sft", "rl_prompts": "rl"}


def stage_log_dir(job_config: JobConfig) -> str:
    """``<dump>/<metrics.save_tb_folder>/<sft|rl>``: the stage's one TensorBoard run."""
    stage = STAGES.get(job_config.training.dataset, job_config.training.dataset)
    path = os.path.join(job_config.job.dump_folder, job_config.metrics.save_tb_folder, stage)
    if job_config.metrics.save_for_all_ranks and dist.is_initialized():
        path = os.path.join(path, f"rank_{dist.get_rank()}")
    return path


class StageTensorBoard(BaseLogger):
    """Scalars of one stage into a fixed run; opened with ``purge_step`` = first step."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.writer: SummaryWriter | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.writer is None:
            self.writer = SummaryWriter(self.log_dir, max_queue=1000, purge_step=step)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def build_metrics_processor(
    job_config: JobConfig,
    parallel_dims: ParallelDims,
    model_args: Any = None,
    tag: str | None = None,
) -> MetricsProcessor:
    """TorchTitan's MetricsProcessor with :class:`StageTensorBoard` as its TensorBoard."""
    tensorboard = job_config.metrics.enable_tensorboard
    without = copy.copy(job_config)
    without.metrics = copy.copy(job_config.metrics)
    without.metrics.enable_tensorboard = False
    processor = MetricsProcessor(without, parallel_dims, tag)
    processor.job_config = job_config
    # TorchTitan's logging rank: rank 0 (the last pipeline stage's, but there is no PP).
    rank = dist.get_rank() if dist.is_initialized() else 0
    if tensorboard and (job_config.metrics.save_for_all_ranks or rank == 0):
        container = processor.logger
        if not isinstance(container, LoggerContainer):
            container = LoggerContainer()
        container.add_logger(StageTensorBoard(stage_log_dir(job_config)))
        processor.logger = container
    return processor
