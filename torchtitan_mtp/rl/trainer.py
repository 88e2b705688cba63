"""The RL stage: GRPO/DAPO with jointly trained MTP heads under one of four regimes.

One step (OCC_SPEC §4) reads top to bottom in ``train_step``:

    prompts -> rollout -> reward -> GRPO advantages -> old log-probs (recomputed here)
            -> ppo_epochs x mini_batches optimizer updates (micro-batch accumulation)
            -> metrics -> periodic held-out eval

and TorchTitan's own loop, ``Trainer.train``, runs the steps: checkpoint load and save,
``[profiling]``, ``[validation]``, the shorter PG timeouts after step 1.

The MTP term of the loss depends on ``[mtp] regime`` (OCC_SPEC §2): ``detach`` and ``ce``
add ``(c/K) sum_k CE_k`` (with detached inputs for ``detach``), ``policy`` adds
``(c/K) sum_k L_PG(l^k, l_old, A)``, ``occ`` replaces ``c/K`` by the calibrated lambda_k.

TorchTitan's Trainer builds everything (model, parallelism, optimizers, LR schedulers,
CheckpointManager, metrics) from the ``mtp_transformer`` TrainSpec; its dataloader here
yields prompt batches (``training.dataset = "rl_prompts"``), which ``batch_generator``
hands to ``train_step`` as they are.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torchtitan.components.dataloader import DataloaderExhaustedError
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from ..checkpoints.integrity import guard_checkpointer, resumed_checkpoint_hint
from ..config import MTPJobConfig, stage_profiling_folders
from ..data.datasets import aime2025, apply_chat_template
from ..data.records import Problem
from ..data.tasks import rl_prompt_splits
from ..data.tokenizer import pad_id, tokenizer_dir
from ..eval import evaluate_set, format_table
from ..losses import (
    dynamic_sampling_keep,
    grpo_advantages,
    overlong_reward_penalty,
    truncated_is_weights,
    valid_counts,
)
from ..models.logprobs import IGNORE_INDEX, target_mask, token_logprobs
from ..models.parallelize import dp_reduce, dp_sum
from ..rewards import get_reward_function, score_batch
from ..rollout.base import Completion, RolloutEngine, SamplingParams, SpecDecodeStats
from ..rollout.native import NativeRolloutEngine
from .exact import apply_exact_gradients, exact_products
from .objective import RLObjective, RolloutBatch
from .occ import PROXY_ESTIMATORS, OCCCalibrator, proxy_estimate
from .stats import StepStats, UpdateStats

# Estimators informative on a step's first mini-batch too (no log-prob change needed).
_GRADIENT_ESTIMATORS = ("exact", "output_grad")
__all__ = ["RLTrainer", "rl_stage_config"]


def rl_stage_config(config: MTPJobConfig, init_load_path: str | None) -> MTPJobConfig:
    """The job config TorchTitan's Trainer sees in the RL stage.

    Steps, LR, warmup and batch come from ``[rl]``; checkpoints go to ``<folder>/rl`` and
    the first run starts from ``init_load_path`` (the SFT stage's last checkpoint).
    """
    rl = copy.deepcopy(config)
    p = config.parallelism
    dp = p.data_parallel_shard_degree
    if dp == -1:
        others = p.tensor_parallel_degree * p.data_parallel_replicate_degree
        dp = int(os.environ.get("WORLD_SIZE", "1")) // others
    dp *= p.data_parallel_replicate_degree
    if config.rl.prompts_per_step % dp:
        raise ValueError(
            f"rl.prompts_per_step = {config.rl.prompts_per_step} must be divisible by the "
            f"data-parallel degree {dp}"
        )
    rl.training.steps = config.rl.steps
    rl.training.dataset = "rl_prompts"
    rl.training.local_batch_size = config.rl.prompts_per_step // dp  # prompts per rank
    rl.training.global_batch_size = -1
    rl.optimizer.lr = config.rl.lr
    rl.lr_scheduler.warmup_steps = config.rl.warmup_steps
    rl.lr_scheduler.decay_ratio = 0.0  # constant after warmup
    rl.checkpoint.folder = f"{config.checkpoint.folder}/rl"
    stage_profiling_folders(rl, "rl")
    if init_load_path is not None:
        rl.checkpoint.initial_load_path = init_load_path
        rl.checkpoint.initial_load_model_only = True
    return rl


class RLTrainer(Trainer):
    """TorchTitan's Trainer running the RL step of OCC_SPEC §4."""

    job_config: MTPJobConfig

    def __init__(self, job_config: MTPJobConfig):
        rl = job_config.rl
        self.ref_model = None  # set below; Stateful methods may run before
        super().__init__(job_config)
        self.dp_degree, self.dp_rank = self._dp()
        self.model = self.model_parts[0]
        self.num_mtp = job_config.mtp.num_modules
        self.regime = job_config.mtp.regime
        self.base = job_config.mtp.coefficient / max(self.num_mtp, 1)
        self.dp_group = (
            self.parallel_dims.get_mesh("batch").get_group()
            if self.parallel_dims.dp_enabled
            else None
        )
        tp_group = (
            self.parallel_dims.get_mesh("tp").get_group() if self.parallel_dims.tp_enabled else None
        )
        self.engine = self._build_engine(tp_group)
        self._synced_version: int | None = None  # RL steps applied to the engine's weights
        reward = job_config.reward
        options = (
            {
                "workers": reward.workers,
                "timeout_s": reward.timeout_s,
                "batch_timeout_s": reward.batch_timeout_s,
            }
            if reward.function == "math_verify"
            else {}
        )
        self.reward_fn = get_reward_function(reward.function, **options)
        if hasattr(self.reward_fn, "start"):
            self.reward_fn.start()  # the worker pool starts now, not inside step 1
        occ = job_config.occ
        calibrator = OCCCalibrator(
            base=self.base,
            estimator=occ.estimator,
            eps=occ.eps,
            beta=occ.beta,
            clamp_min=occ.clamp_min,
            clamp_max=occ.clamp_max,
            apply_to=occ.apply_to,
            group=self.dp_group,
        )
        mtp = job_config.mtp
        self.objective = RLObjective(
            rl,
            self.regime,
            self.num_mtp,
            self.base,
            calibrator,
            draft_loss=mtp.draft_loss,
            draft_coefficient=mtp.draft_coefficient,
        )
        self.exact_occ = self.regime == "occ" and occ.estimator == "exact"
        # The output-head gradient products: for the estimator, or to compare with exact.
        # The output-head products beside exact ones (for comparison); with diagnostics
        # only on their steps (train_step). The output_grad estimator computes its own.
        self.objective.output_grad = self.exact_occ
        self.minibatch_log = os.path.join(job_config.job.dump_folder, "occ_minibatches.jsonl")
        _, self.heldout = rl_prompt_splits(job_config)
        # Chat-rendered prompts carry their own special tokens; plain ones get <bos>.
        self.add_bos = not job_config.data.chat_template
        self.pad_id = pad_id(self.tokenizer)
        self.ref_model = self._build_reference_model() if rl.kl_coef > 0 else None
        self._started = False  # ``_start`` ran (the first train_step of this run)
        self.accuracies: dict[int, dict[str, dict[str, float]]] = {}  # eval results by step

    # ---------------------------------------------------------------- setup helpers

    def _build_engine(self, tp_group: dist.ProcessGroup | None) -> RolloutEngine:
        """The native engine on the training model, or vLLM (imported only here)."""
        r = self.job_config.rollout
        if r.engine == "native":
            return NativeRolloutEngine(
                self.model,
                tokenizer=self.tokenizer,
                tp_group=tp_group,
                speculative_tokens=r.speculative_tokens,
                compile_decode=r.compile_decode,
            )
        from ..rollout.vllm_engine import VLLMRolloutEngine

        rank = dist.get_rank() if dist.is_initialized() else 0
        rl = self.job_config.rl
        dtype = r.vllm_dtype
        if dtype == "auto":
            dtype = self.job_config.training.mixed_precision_param
        return VLLMRolloutEngine(
            self.model,
            model_dir=os.path.join(self.job_config.job.dump_folder, "vllm_model", f"rank{rank}"),
            tokenizer_dir=tokenizer_dir(self.job_config),
            speculative_tokens=r.speculative_tokens,
            max_model_len=self.model.model_args.max_seq_len,
            max_num_seqs=max(rl.prompts_per_step // self.dp_degree, 1) * rl.samples_per_prompt,
            seed=self.job_config.debug.seed or 0,
            kv_cache_gib=r.vllm_kv_cache_gib,
            gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            sleep_level=r.vllm_sleep_level,
            enforce_eager=r.vllm_enforce_eager,
            bucket_bytes=r.weight_sync_bucket_mb << 20,
            dtype=TORCH_DTYPE_MAP[dtype],
        )

    def _dp(self) -> tuple[int, int]:
        if not self.parallel_dims.dp_enabled:
            return 1, 0
        mesh = self.parallel_dims.get_mesh("batch")
        return mesh.size(), mesh.get_local_rank()

    def _build_reference_model(self) -> torch.nn.Module:
        """A frozen copy of the initial policy, parallelised like the policy."""
        with torch.device("meta"):
            ref = self.train_spec.model_cls(self.model_args)
        ref = self.train_spec.parallelize_fn(ref, self.parallel_dims, self.job_config)
        ref.to_empty(device=self.device)
        with torch.no_grad():
            ref.init_weights()
        ref.requires_grad_(False)
        ref.eval()
        return ref

    def _load_pretrained(self) -> None:
        """Initial weights from ``model.hf_checkpoint`` or ``model.gguf_file``.

        Rank 0 loads them into a plain CPU copy of the model (strict name and shape
        checks); MTP modules the file lacks keep their init, or, with ``mtp.init =
        "last_block"``, become copies of the loaded last trunk block. The result is
        broadcast into the (possibly sharded) policy.
        """
        from ..checkpoints.gguf_loader import load_gguf, resolve_gguf
        from ..checkpoints.hf import load_hf_checkpoint

        source = self.job_config.model
        state: dict[str, torch.Tensor] = {}
        if dist.get_rank() == 0:
            with torch.device("meta"):
                plain = self.train_spec.model_cls(self.model_args)
            plain.to_empty(device="cpu")
            plain.init_weights()
            if source.hf_checkpoint:
                fresh = load_hf_checkpoint(plain, source.hf_checkpoint).missing_mtp_modules
                origin = source.hf_checkpoint
            else:
                origin = str(resolve_gguf(source.gguf_file))
                load_gguf(plain, origin)
                fresh = list(range(plain.num_mtp_modules))
            if self.model_args.mtp_init == "last_block":
                plain.copy_last_block_into_mtp(fresh)
            state = plain.state_dict()
            logger.info(f"Initial weights from {origin}; fresh MTP modules: {fresh}")
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.model, state, options=options)

    def _sync_reference_model(self) -> None:
        """Copy the policy's current (= initial, at RL start) weights into the reference."""
        with torch.no_grad():
            for p_ref, p in zip(self.ref_model.parameters(), self.model.parameters(), strict=True):
                p_ref.copy_(p)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.ref_model is not None:
            state["reference_model"] = get_model_state_dict(self.ref_model)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.ref_model is not None:
            set_model_state_dict(self.ref_model, state_dict["reference_model"])

    # ---------------------------------------------------------------- rollout

    def _step_seed(self, step: int, salt: int = 0) -> int:
        """Sampling seed: same on TP ranks, different per DP rank, step and purpose."""
        return (
            (self.job_config.debug.seed or 0) * 1_000_003 + step * 7919 + self.dp_rank * 31 + salt
        )

    def _sampling_params(self, seed: int, greedy: bool = False) -> SamplingParams:
        r = self.job_config.rollout
        return SamplingParams(
            max_new_tokens=r.max_new_tokens,
            temperature=0.0 if greedy else r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            stop_token_ids=(self.tokenizer.eos_id,),
            stop_strings=tuple(r.stop_strings),
            seed=seed,
        )

    def _prompt_ids(self, problems: list[Problem]) -> list[list[int]]:
        return [
            self.tokenizer.encode(p.prompt, add_bos=self.add_bos, add_eos=False) for p in problems
        ]

    def _response_text(self, completion: Completion) -> str:
        ids = [t for t in completion.token_ids if t != self.tokenizer.eos_id]
        return self.tokenizer.decode(ids)

    def _to_batch(self, completions: list[Completion], advantages: torch.Tensor) -> RolloutBatch:
        """Right-pad prompt + response; labels and advantages cover response tokens only."""
        tp = self.parallel_dims.tp
        longest = max(len(c.prompt_ids) + len(c.token_ids) for c in completions) - 1
        width = -(-longest // tp) * tp
        n = len(completions)
        inputs = torch.full((n, width + 1), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        rollout_logp = torch.zeros(n, width)
        for i, c in enumerate(completions):
            seq = c.prompt_ids + c.token_ids
            inputs[i, : len(seq)] = torch.tensor(seq)
            start = len(c.prompt_ids) - 1  # label position of the first response token
            labels[i, start : start + len(c.token_ids)] = torch.tensor(c.token_ids)
            rollout_logp[i, start : start + len(c.token_ids)] = torch.tensor(c.logprobs)
        adv = advantages[:, None].expand(n, width) * (labels != IGNORE_INDEX)
        return RolloutBatch(inputs[:, :-1], labels, adv.float(), rollout_logp)

    @torch.no_grad()
    def _recompute_logp(
        self, model: torch.nn.Module, batch: RolloutBatch, heads: int = 1
    ) -> torch.Tensor:
        """Aligned log-probs [N, T] of the main head (``heads = 1``), or [N, heads, T] of
        the first ``heads`` heads, of the batch's labels under ``model``, micro-batched."""
        out = []
        mb = self.job_config.rl.micro_batch_size
        for start in range(0, batch.inputs.shape[0], mb):
            inputs = batch.inputs[start : start + mb].to(self.device)
            labels = batch.labels[start : start + mb].to(self.device)
            hidden = model(inputs)[:heads]
            logp = token_logprobs(model, hidden, labels).logp  # [heads, B, T]
            out.append((logp[0] if heads == 1 else logp.transpose(0, 1)).cpu())
        return torch.cat(out)

    def _counts(self, micro_batches: list[RolloutBatch]) -> dict[str, torch.Tensor]:
        """Global valid tokens and sequences per head [H] over one mini-batch."""
        heads = self.num_mtp + 1
        local = sum(valid_counts(target_mask(mb.labels, heads, None)) for mb in micro_batches)
        both = dp_sum(local.to(self.device), self.parallel_dims)  # [H, 2]
        return {"tokens": both[:, 0], "seqs": both[:, 1]}

    # ---------------------------------------------------------------- the step

    def train_step(self, data_iterator: Iterator[list[Problem]]) -> None:
        rl, step = self.job_config.rl, self.step
        n = rl.samples_per_prompt
        if not self._started:  # the first step of this run: Trainer.train has loaded
            self._start()
        t0 = time.perf_counter()

        # 1. Rollout: n samples of each of this rank's prompts from the current policy.
        problems: list[Problem] = next(data_iterator)
        prompts = [ids for ids in self._prompt_ids(problems) for _ in range(n)]
        self._sync_rollout_weights(step - 1)  # the policy after step - 1 updates
        t_sync = time.perf_counter() - t0
        completions = self.engine.generate(prompts, self._sampling_params(self._step_seed(step)))
        t_rollout = time.perf_counter() - t0
        spec_metrics = self._spec_metrics(self.engine.last_spec_stats)

        # 2. Reward, 3. GRPO advantages (groups of n consecutive samples).
        answers = [p.answer for p in problems for _ in range(n)]
        texts = [self._response_text(c) for c in completions]
        correct = torch.tensor(score_batch(self.reward_fn, texts, answers))
        rewards = correct.clone()
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
        if rl.overlong_buffer:
            rewards += overlong_reward_penalty(
                lengths,
                self.job_config.rollout.max_new_tokens,
                rl.overlong_buffer,
                rl.overlong_penalty,
            )
        advantages = grpo_advantages(rewards, n, norm_by_std=rl.norm_adv_by_std)
        batch = self._to_batch(completions, advantages)
        if rl.dynamic_sampling:  # DAPO: groups with equal rewards leave the loss
            keep = dynamic_sampling_keep(rewards, n).repeat_interleave(n)
            batch.labels[~keep] = IGNORE_INDEX

        # 4. Old log-probs recomputed by the trainer (and the frozen reference's).
        if self.num_mtp:  # the heads' old log-probs serve the head_change estimator
            old = self._recompute_logp(self.model, batch, heads=self.num_mtp + 1)
            batch.old_logp, batch.old_mtp_logp = old[:, 0].contiguous(), old[:, 1:]
        else:
            batch.old_logp = self._recompute_logp(self.model, batch)
        if self.ref_model is not None:
            batch.ref_logp = self._recompute_logp(self.ref_model, batch)
        if rl.tis_imp_ratio_cap:  # truncated importance sampling (rollout != trainer)
            spec_metrics.update(self._truncated_importance_sampling(batch))

        # 5. ppo_epochs x mini_batches optimizer updates, micro-batch accumulation.
        self.checkpointer.maybe_wait_for_staging()  # an async save's copy of the weights
        t1 = time.perf_counter()
        log = self.objective.new_stats()
        num_rows, grad_norms, records = batch.inputs.shape[0], [], []
        bounds = torch.linspace(0, num_rows, rl.mini_batches + 1).round().long().tolist()
        diagnose = bool(rl.diagnostics_every) and step % rl.diagnostics_every == 0
        self.objective.output_grad = self.exact_occ or diagnose
        t_exact = 0.0
        for epoch in range(rl.ppo_epochs):
            for index, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                micro = [
                    batch.select(slice(s, min(s + rl.micro_batch_size, hi)))
                    for s in range(lo, hi, rl.micro_batch_size)
                ]
                counts = self._counts(micro)
                exact = None
                if self.num_mtp and (self.exact_occ or diagnose):
                    t = time.perf_counter()
                    exact = self._exact_update(micro, counts, log)
                    t_exact += time.perf_counter() - t
                if not self.exact_occ:  # (exact OCC has set the gradients already)
                    self.optimizers.zero_grad()
                    for mb in micro:
                        self.objective(self.model, mb.to(self.device), counts, log).backward()
                records.append(self._minibatch_record(step, epoch, index, exact))
                grad_norm = dist_utils.clip_grad_norm_(
                    list(self.model.parameters()), self.job_config.training.max_norm, foreach=True
                )
                if not torch.isfinite(grad_norm):
                    advice = resumed_checkpoint_hint(self.checkpointer, step) or "Lower rl.lr."
                    raise FloatingPointError(
                        f"RL step {step}: the gradient norm is {grad_norm.item()}; no update "
                        f"was applied and the last checkpoint is intact. {advice}"
                    )
                grad_norms.append(grad_norm.item())
                self.optimizers.step()
        self.lr_schedulers.step()
        t_update = time.perf_counter() - t1
        if self.num_mtp and (self.exact_occ or diagnose):
            spec_metrics["perf/exact_occ_seconds"] = t_exact
        self._write_minibatch_records(records)

        # 6. Metrics (global over data-parallel ranks).
        times = (t_rollout, t_update, time.perf_counter() - t0)
        spec_metrics["perf/weight_sync_seconds"] = t_sync
        spec_metrics.update(self._occ_metrics(records))
        mask = batch.labels != IGNORE_INDEX
        mismatch = (batch.rollout_logp - batch.old_logp).abs()[mask]
        stats = StepStats(
            update=log,
            sequences=float(len(correct)),
            correct=float(correct.sum()),
            reward=float(rewards.sum()),
            response_tokens=float(lengths.sum()),
            input_tokens=float((batch.inputs != self.pad_id).sum()),
            trained_tokens=float(mask.sum()) * rl.ppo_epochs,
            logprob_mismatch=float(mismatch.sum()),
            mismatch_tokens=float(mismatch.numel()),
        )
        self._log_step(stats, grad_norms, times, spec_metrics)

        # 7. Held-out eval every eval.every_steps steps and after the last.
        every = self.job_config.eval.every_steps
        if every and (step % every == 0 or step == self.job_config.training.steps):
            self.accuracies[step] = self.evaluate()

    def _sync_rollout_weights(self, version: int) -> None:
        """Push the policy (trunk and MTP draft) into the rollout engine once per version;
        a no-op for the native engine, which decodes with the live weights."""
        if self._synced_version != version:
            self.engine.sync_weights(version)
            self._synced_version = version

    def _spec_metrics(self, stats: SpecDecodeStats | None) -> dict[str, float]:
        """``mtp/accept_*`` of this step's rollouts over all data-parallel ranks."""
        if not self.job_config.rollout.speculative_tokens:
            return {}
        stats = stats or SpecDecodeStats()
        width = self.job_config.rollout.speculative_tokens
        per_pos = (stats.accepted_per_pos + [0] * width)[:width]  # the same layout on all ranks
        mine = SpecDecodeStats(stats.num_drafts, stats.num_draft_tokens, per_pos)
        return dp_reduce(mine, self.parallel_dims, self.device).metrics()

    def _truncated_importance_sampling(self, batch: RolloutBatch) -> dict[str, float]:
        """Scale every response token's advantage by min(pi_trainer / pi_rollout, cap).

        The policy loss is linear in the advantage per token, so this equals weighting
        each token's surrogate (verl's TIS), for the main and the MTP heads alike.
        """
        cap = self.job_config.rl.tis_imp_ratio_cap
        mask = batch.labels != IGNORE_INDEX
        weight = truncated_is_weights(batch.old_logp, batch.rollout_logp, mask, cap)
        batch.advantages = batch.advantages * weight
        sums = torch.tensor(
            [float(weight[mask].sum()), float((weight[mask] >= cap).sum()), float(mask.sum())]
        )
        w_sum, truncated, tokens = dp_sum(sums.to(self.device), self.parallel_dims).cpu().tolist()
        return {
            "rollout/tis_weight_mean": w_sum / max(tokens, 1),
            "rollout/tis_truncated_fraction": truncated / max(tokens, 1),
        }

    # ---------------------------------------------------------------- exact OCC

    def _exact_update(
        self, micro: list[RolloutBatch], counts: dict[str, torch.Tensor], log: UpdateStats
    ) -> dict[str, torch.Tensor]:
        """Exact products of one mini-batch (``rl/exact.py``); with the "exact" estimator
        the main pass logs the step's metrics and the update's gradients are set here."""
        products = exact_products(
            self.model, self.objective, micro, counts, log if self.exact_occ else None,
            self.device,
        )  # fmt: skip
        calibrator = self.objective.calibrator
        lam = products.coefficient(calibrator.beta, calibrator.eps)
        out = {
            "inner": products.inner,
            "sq_norm": products.sq_norm,
            "lambda": lam,
            "cosine": products.cosine,
            **{f"inner_{g}": v[0] for g, v in products.groups.items()},
            **{f"sq_{g}": v[1] for g, v in products.groups.items()},
        }
        if self.exact_occ:
            applied = calibrator.clamp(lam.float())
            for record in self.objective.records:  # the main pass did not know lambda yet
                record["applied"] = applied
            apply_exact_gradients(self.model, products, applied)
        return out

    def _minibatch_record(
        self, step: int, epoch: int, index: int, exact: dict[str, torch.Tensor] | None
    ) -> dict[str, float]:
        """One row of ``occ_minibatches.jsonl``: every estimator's lambda_k (and A_k, V_k)
        on this mini-batch, the applied coefficient, and the exact products when computed.
        Sums over the mini-batch's micro-batches (all global over data-parallel ranks)."""
        calls = self.objective.records
        self.objective.records = []
        row: dict[str, float] = {"step": step, "epoch": epoch, "minibatch": index}
        if not calls or not self.num_mtp:
            return row
        sums = {key: sum(c["sums"][key] for c in calls) for key in calls[0]["sums"]}
        applied = sum(c["applied"] for c in calls) / len(calls)
        base, eps = self.base, self.objective.calibrator.eps
        for k in range(self.num_mtp):
            head = f"head{k + 1}"
            row[f"applied/{head}"] = float(applied[k])
            beta = self.objective.calibrator.beta
            for est in PROXY_ESTIMATORS:
                if (est == "head_change" and "own_prod" not in sums) or (
                    est == "output_grad" and "out_inner" not in sums
                ):
                    continue
                head_sums = {n: t[k] for n, t in sums.items()}
                a, v, lam = proxy_estimate(head_sums, est, base, eps, beta)
                row[f"lambda/{est}/{head}"] = float(lam)
                row[f"A/{est}/{head}"] = float(a)
                row[f"V/{est}/{head}"] = float(v)
            for name, total in sums.items():
                row[f"sum/{name}/{head}"] = float(total[k])
            if exact is not None:
                row[f"lambda/exact/{head}"] = float(exact["lambda"][k])
                row[f"A/exact/{head}"] = float(exact["inner"][k])
                row[f"V/exact/{head}"] = float(exact["sq_norm"][k])
                row[f"cosine/exact/{head}"] = float(exact["cosine"][k])
                for group in ("output", "embedding", "trunk"):
                    row[f"A/exact_{group}/{head}"] = float(exact[f"inner_{group}"][k])
                    row[f"V/exact_{group}/{head}"] = float(exact[f"sq_{group}"][k])
        return row

    def _write_minibatch_records(self, records: list[dict[str, float]]) -> None:
        """Append the step's rows to ``<dump_folder>/occ_minibatches.jsonl`` (rank 0).

        A resumed job may repeat rows of steps after its checkpoint; readers keep the last
        row per (step, epoch, minibatch) (``torchtitan_mtp.study.read_minibatches``)."""
        if not self.num_mtp or (dist.is_initialized() and dist.get_rank() != 0):
            return
        os.makedirs(os.path.dirname(self.minibatch_log) or ".", exist_ok=True)
        with open(self.minibatch_log, "a") as f:
            for row in records:
                f.write(json.dumps(row) + "\n")

    def _occ_metrics(self, records: list[dict[str, float]]) -> dict[str, float]:
        """occ/* TensorBoard scalars of the step: means over the mini-batches after the
        policy moved (the first mini-batch of a step has delta = 0 for every proxy), or
        over all when there is one; diag/* (exact) over the same mini-batches."""
        if not self.num_mtp:
            return {}
        moved = [r for r in records if (r["epoch"], r["minibatch"]) != (0, 0)] or records
        estimator = self.job_config.occ.estimator if self.regime == "occ" else None
        proxy = estimator if estimator in PROXY_ESTIMATORS else "ratio_of_means"

        def mean(key: str, rows=moved) -> float | None:
            values = [r[key] for r in rows if key in r]
            return sum(values) / len(values) if values else None

        out: dict[str, float] = {}
        for k in range(1, self.num_mtp + 1):
            head = f"head{k}"
            source = "exact" if estimator == "exact" else proxy
            rows = records if source in _GRADIENT_ESTIMATORS else moved
            a, v = mean(f"A/{source}/{head}", rows), mean(f"V/{source}/{head}", rows)
            lam = mean(f"applied/{head}", rows)
            pairs = {
                "occ/correlation_proxy": a,
                "occ/penalty_proxy": v,
                "occ/coefficient": lam,
                # lambda / (c/K): a collapse shows (undefined when c = 0, a frozen draft)
                "occ/relative_coefficient": lam / self.base
                if lam is not None and self.base
                else None,
            }
            if None not in (a, v, lam):
                weight = (
                    self.objective.calibrator.beta if source in _GRADIENT_ESTIMATORS else self.base
                )
                pairs["occ/gain_proxy"] = weight * lam * a - lam * lam * v / 2
            for est in (*PROXY_ESTIMATORS, "exact"):
                est_rows = records if est in _GRADIENT_ESTIMATORS else moved
                pairs[f"occ/lambda/{est}"] = mean(f"lambda/{est}/{head}", est_rows)
            pairs["diag/inner_product"] = mean(f"A/exact/{head}", records)
            pairs["diag/mtp_grad_sq_norm"] = mean(f"V/exact/{head}", records)
            pairs["diag/cosine"] = mean(f"cosine/exact/{head}", records)
            out.update({f"{tag}/{head}": x for tag, x in pairs.items() if x is not None})
        return out

    def _log_step(
        self,
        stats: StepStats,
        grad_norms: list[float],
        times: tuple[float, float, float],
        extra: dict[str, float],
    ) -> None:
        """Reduce the step's statistics over data-parallel ranks, log them, print one line.

        ``grad_norms``: one per optimizer update; ``extra``: metrics already global
        (acceptance, TIS, OCC, sync time)."""
        t_rollout, t_update, t_step = times
        stats = dp_reduce(stats, self.parallel_dims, self.device)
        metrics = stats.metrics(updates=len(grad_norms))
        metrics.update(
            {
                "rl/grad_norm": sum(grad_norms) / len(grad_norms),
                "rl/lr": self.lr_schedulers.schedulers[0].get_last_lr()[0],
                "perf/rollout_seconds": t_rollout,
                "perf/update_seconds": t_update,
                "perf/tokens_per_second": (stats.input_tokens + stats.response_tokens) / t_step,
            }
        )
        if hasattr(self.reward_fn, "stats"):  # outcome counts of the reward workers
            stats = self.reward_fn.stats(reset=True)
            metrics.update({f"reward/{reason}": float(n) for reason, n in stats.items()})
        metrics.update(extra)
        self.metrics_processor.logger.log(metrics, self.step)
        lambdas = " ".join(
            f"{metrics.get(f'occ/coefficient/head{k}', 0.0):+.3f}"
            for k in range(1, self.num_mtp + 1)
        )
        logger.info(
            f"rl step {self.step:3d} | reward {metrics['rl/reward_mean']:.3f} "
            f"acc {metrics['rl/accuracy']:.3f} | lambda [{lambdas}] | "
            f"clip {metrics['rl/clip_fraction']:.3f} | "
            + (
                f"accept {metrics['mtp/accept_rate']:.2f} len {metrics['mtp/accept_length']:.2f} | "
                if "mtp/accept_rate" in metrics
                else ""
            )
            + f"{metrics['perf/tokens_per_second']:.0f} tok/s"
            f" | rollout {t_rollout:.1f}s update {t_update:.1f}s"
        )

    # ---------------------------------------------------------------- eval and loop

    def _eval_sets(self) -> dict[str, list[Problem]]:
        sets = {}
        for name in self.job_config.eval.sets:
            if name == "heldout":
                sets[name] = self.heldout
            else:  # aime2025, evaluation only
                records = aime2025(self.job_config.data.prompt_template)
                if self.job_config.data.chat_template:
                    records = apply_chat_template(records, tokenizer_dir(self.job_config))
                sets[name] = records
        return sets

    def evaluate(self, step: int | None = None) -> dict[str, dict[str, float]]:
        """Greedy accuracy (and avg@k, pass@k) per eval set, split over data-parallel ranks,
        of the policy after ``step`` RL steps (default: ``self.step``).

        Logged as ``eval/<set>/<metric>`` and printed as a table; returns the metrics.
        """
        step = self.step if step is None else step
        k = self.job_config.eval.samples
        results, rows = {}, {}
        self._sync_rollout_weights(step)
        for name, records in self._eval_sets().items():
            mine = records[self.dp_rank :: self.dp_degree]
            sums = evaluate_set(
                self.engine,
                self._prompt_ids(mine),
                [p.answer for p in mine],
                self.reward_fn,
                self._response_text,
                greedy=self._sampling_params(0, greedy=True),
                sampled=self._sampling_params(self._step_seed(step, salt=1)),
                k=k,
            )
            sums = dp_reduce(sums, self.parallel_dims, self.device)
            metrics = sums.metrics(k)
            results[name] = metrics
            rows[name] = (int(sums.problems), metrics)
            self.metrics_processor.logger.log(
                {f"eval/{name}/{m}": v for m, v in metrics.items()}, step
            )
        logger.info("\n" + format_table(step, rows))
        return results

    def load(self) -> None:
        """Resume the RL stage, or warm-start (SFT checkpoint, or model.gguf_file).

        Through :class:`CheckpointGuard`: the step is verified first; a damaged one is
        moved aside (or refused), and a warm start that cannot be read stops the job."""
        guard_checkpointer(self).load(step=self.job_config.checkpoint.load_step)
        self._warm_start()

    def _warm_start(self) -> None:
        """After the checkpoint load: without a checkpoint, the initial weights of
        model.hf_checkpoint / gguf_file; the reference policy at the stage's start."""
        config = self.job_config
        loaded = getattr(self.checkpointer, "loaded", None) is not None
        if not loaded and (config.model.hf_checkpoint or config.model.gguf_file):
            self._load_pretrained()
        if self.ref_model is not None and self.step == 0:
            self._sync_reference_model()  # the warm-start policy; a resume restores its own

    def _start(self) -> None:
        """The stage's start, in the first ``train_step`` of a run (``Trainer.train`` has
        loaded the checkpoint and counted the step): warm start, then the held-out eval of
        the policy before that step."""
        self._started = True
        self._warm_start()
        if self.job_config.eval.every_steps:
            self.accuracies[self.step - 1] = self.evaluate(self.step - 1)

    def batch_generator(self, data_iterable: Iterable[list[Problem]]) -> Iterator[list[Problem]]:
        """Step inputs for ``Trainer.train``: the prompt batches as they are (TorchTitan's
        generator unpacks ``(inputs, labels)`` tensors and counts their tokens)."""
        yield from data_iterable
        raise DataloaderExhaustedError()

    def close(self) -> None:
        """TorchTitan's close, then the rollout engine's: vLLM's shutdown also tears down
        the process groups, so it must come after everything that still communicates."""
        super().close()
        engine = getattr(self, "engine", None)
        if engine is not None and hasattr(engine, "close"):
            engine.close()

    def train(self) -> dict[int, dict[str, dict[str, float]]]:
        """TorchTitan's loop, ``Trainer.train``, over the RL steps; -> eval results by step.

        Its checkpoint load goes through the :class:`CheckpointGuard` (installed here if
        the entry has not); the rest of the stage's start is ``_start``."""
        guard_checkpointer(self)
        super().train()
        return self.accuracies
