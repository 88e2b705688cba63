"""The training entry: ``python -m torchtitan_mtp.train --job.config_file X.toml``.

The SFT/pretraining stage runs TorchTitan's Trainer (model, parallelism, optimizers, LR
schedulers, CheckpointManager, metrics all come from the ``mtp_transformer`` TrainSpec)
and its own train loop, ``Trainer.train`` (checkpoint load/save, ``[profiling]`` traces
and memory snapshots, ``[validation]``, the shorter PG timeouts after step 1; on CPU
through ``platform.install``). This subclass only replaces the loss step with next-token
CE on the trunk plus ``(c / K) * sum_k CE_k`` on the MTP heads, and logs per-head metrics.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import init_logger, logger
from torchtitan.train import Trainer

from .checkpoints.integrity import (
    CheckpointError,
    guard_checkpointer,
    resumed_checkpoint_hint,
    verify_step,
)
from .config import (
    ConfigError,
    MTPJobConfig,
    check_runs_here,
    parse_job_config,
    stage_profiling_folders,
)
from .models.logprobs import target_mask, token_logprobs
from .models.parallelize import dp_sum

__all__ = ["MTPTrainer", "main"]

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


class MTPTrainer(Trainer):
    """TorchTitan's Trainer, and its ``train`` loop, with the MTP cross-entropy step."""

    job_config: MTPJobConfig

    def __init__(self, job_config: MTPJobConfig):
        super().__init__(job_config)
        self.num_heads = job_config.mtp.num_modules + 1
        self.detach_mtp = job_config.mtp.regime == "detach"

    def forward_backward_step(
        self,
        *,
        input_dict: dict[str, torch.Tensor],
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One micro-batch -> (loss share, per-head CE sums [H], per-head top-1 hits [H])."""
        model = self.model_parts[0]
        with self.train_context(), self.maybe_enable_amp:
            hidden = model(input_dict["input"], detach_mtp_inputs=self.detach_mtp)
            stats = token_logprobs(model, hidden, labels, detach_mtp_head=self.detach_mtp)
            loss, ce_sums = self.loss_fn(stats, global_valid_tokens)
        top1 = (stats.top1 & stats.mask).sum(dim=(1, 2)).float()
        del hidden, stats
        loss.backward()
        return loss.detach(), ce_sums, top1

    def train_step(self, data_iterator: Iterator[Batch]) -> None:
        """One optimizer step. ``Trainer.train`` calls it with ``batch_generator(dataloader)``
        (micro-batches on CPU); when the data run out, ``next`` raises TorchTitan's
        ``DataloaderExhaustedError`` and its loop cancels the step."""
        self.optimizers.zero_grad()
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        microbatches = [next(data_iterator) for _ in range(self.gradient_accumulation_steps)]
        counts = torch.zeros(self.num_heads, device=self.device)
        for _, labels in microbatches:
            counts += target_mask(labels, self.num_heads, None).sum(dim=(1, 2)).to(self.device)
        counts = dp_sum(counts, self.parallel_dims)

        loss = torch.zeros((), device=self.device)
        ce_sums = torch.zeros(self.num_heads, device=self.device)
        top1 = torch.zeros(self.num_heads, device=self.device)
        for input_dict, labels in microbatches:
            input_dict = {k: v.to(self.device) for k, v in input_dict.items()}
            mb_loss, mb_ce, mb_top1 = self.forward_backward_step(
                input_dict=input_dict, labels=labels.to(self.device), global_valid_tokens=counts
            )
            loss += mb_loss
            ce_sums += mb_ce
            top1 += mb_top1

        grad_norm = dist_utils.clip_grad_norm_(
            [p for m in self.model_parts for p in m.parameters()],
            self.job_config.training.max_norm,
            foreach=True,
        )
        if not torch.isfinite(grad_norm):
            advice = resumed_checkpoint_hint(self.checkpointer, self.step) or (
                "Lower optimizer.lr or training.max_norm, or check the data."
            )
            raise FloatingPointError(
                f"step {self.step}: the gradient norm is {grad_norm.item()} (loss share "
                f"{loss.item()}); no update was applied and the last checkpoint is intact. "
                + advice
            )
        self.checkpointer.maybe_wait_for_staging()
        self.optimizers.step()
        self.lr_schedulers.step()

        totals = dp_sum(torch.cat([loss.reshape(1), ce_sums, top1]), self.parallel_dims)
        loss, ce_sums, top1 = totals[0], *totals[1:].split(self.num_heads)
        ce = ce_sums / counts.clamp(min=1)
        agreement = top1 / counts.clamp(min=1)
        metrics = {"lr": lr, "ce_loss/main": ce[0].item()}
        for k in range(1, self.num_heads):
            metrics[f"mtp/ce_loss/head{k}"] = ce[k].item()
            metrics[f"mtp/top1_agreement/head{k}"] = agreement[k].item()
        if self.metrics_processor.should_log(self.step):
            self.metrics_processor.log(
                self.step, loss.item(), loss.item(), grad_norm.item(), extra_metrics=metrics
            )
            heads = "  ".join(f"ce{k}: {ce[k].item():.4f}" for k in range(1, self.num_heads))
            logger.info(f"step: {self.step:2}  main ce: {ce[0].item():.4f}  {heads}")


def _single_process_defaults() -> None:
    """Without torchrun, run as rank 0 of 1 on a free local port (like torchrun would)."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    defaults |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def _parse_or_exit(argv: list[str] | None) -> MTPJobConfig:
    """The job config; a bad one (or bad prompt data) is logged and exits with status 2.

    Also makes ``python -m torchtitan_mtp.train`` work without torchrun (1 process), and
    checks the RL prompt rows (lengths, malformed rows) before any training.
    """
    init_logger()
    _single_process_defaults()
    try:
        config = parse_job_config(sys.argv[1:] if argv is None else argv)
        check_runs_here(config)
        if config.rl.steps > 0:
            from .data.tasks import rl_prompt_splits

            rl_prompt_splits(config)
        return config
    except ConfigError as e:
        logger.error(str(e))
        raise SystemExit(2) from None
    except (ValueError, FileNotFoundError) as e:
        logger.error(f"[data]: {e}")
        raise SystemExit(2) from None


def _final_checkpoint(config: MTPJobConfig, folder: str, step: int) -> str | None:
    """The stage's last checkpoint directory, if it is complete and intact (its manifest
    and checksums, ``checkpoints/integrity.py``). A damaged one counts as missing: the
    stage runs again and its checkpointer moves the step aside (or refuses)."""
    path = os.path.join(config.job.dump_folder, folder, f"step-{step}")
    if not os.path.isdir(path):
        return None
    if (damage := verify_step(path)) is not None:
        logger.warning(f"{path} is not a complete checkpoint: {damage}")
        return None
    return path


def _run(trainer_cls, config: MTPJobConfig):
    trainer = trainer_cls(config)
    guard_checkpointer(trainer, owner=True)  # verified loads, manifests, disk-full errors
    try:
        if config.checkpoint.create_seed_checkpoint:
            if int(os.environ.get("WORLD_SIZE", "1")) != 1 or not config.checkpoint.enable:
                raise SystemExit(
                    "checkpoint.create_seed_checkpoint needs 1 process and checkpoint.enable"
                )
            trainer.checkpointer.save(curr_step=0, last_step=True)
            logger.info("Created seed checkpoint")
            return None
        return trainer.train()
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> None:
    """SFT stage (``training.steps``), then RL stage (``rl.steps``) from the SFT weights.

    Each stage checkpoints into its own folder (``<checkpoint.folder>/sft`` and ``/rl``);
    a restarted job skips a finished SFT stage and resumes RL from its last checkpoint.
    """
    config = _parse_or_exit(argv)
    os.environ.setdefault("LOCAL_RANK", "0")
    from .rl.trainer import RLTrainer, rl_stage_config

    folder = config.checkpoint.folder
    init_path = config.checkpoint.initial_load_path
    try:
        if config.training.steps > 0:
            sft = copy.deepcopy(config)
            sft.checkpoint.folder = f"{folder}/sft"
            stage_profiling_folders(sft, "sft")
            done = _final_checkpoint(sft, sft.checkpoint.folder, config.training.steps)
            if done is None or config.checkpoint.create_seed_checkpoint:
                _run(MTPTrainer, sft)
                done = _final_checkpoint(sft, sft.checkpoint.folder, config.training.steps)
            else:
                logger.info(f"SFT stage already finished: {done}")
            rl_next = config.rl.steps > 0 and not config.checkpoint.create_seed_checkpoint
            if done is None and rl_next:  # never start RL from other weights than SFT's
                path = os.path.join(config.job.dump_folder, sft.checkpoint.folder)
                raise CheckpointError(
                    f"the SFT stage ended without a complete step-{config.training.steps} in "
                    f"{path}; the RL stage would not start from the SFT weights."
                )
            init_path = done or init_path
        if config.rl.steps > 0 and not config.checkpoint.create_seed_checkpoint:
            _run(RLTrainer, rl_stage_config(config, init_path))
    except CheckpointError as e:
        logger.error(str(e))  # one plain line in the log; the traceback follows
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
