"""``VLLMRolloutEngine``: vLLM inside the torchrun ranks, with every-step weight sync of the
trunk and its MTP draft, MTP speculative decoding, and sleep/wake memory hand-off.

Design (vLLM 0.33; see the README's "Rollouts with vLLM"):

- Colocated: each torchrun rank builds its own ``vllm.LLM`` with
  ``distributed_executor_backend="external_launcher"`` and ``tensor_parallel_size=1``, on
  ``cuda:LOCAL_RANK``, generating its own data-parallel share of the prompts. The engine runs
  in-process, so the weight sync is a call on the worker (``collective_rpc`` with a
  callable), with tensors passed by reference: no NCCL group or IPC handles between a
  trainer and a separate server, and no second copy of the GPUs. A separate vLLM server
  would need vLLM's NCCL weight-transfer engine and dedicated GPUs; at our scale (one
  trainer, 1-8 GPUs) colocation keeps every GPU busy in both phases.
- Memory: ``enable_sleep_mode``; after each rollout the engine sleeps (level 1 offloads
  weights to host memory, level 2 discards them, the KV cache is dropped in both), and the
  next sync wakes the weights, loads the new ones and then wakes the KV cache.
- Sync (``sync_weights``): HF MiMo-layout names, gathered from FSDP/TP DTensors in buckets
  (``weight_sync.hf_weight_buckets``). The trunk goes to the target model's
  ``load_weights`` (which skips ``mtp_layers``) and the MTP modules to the speculative
  draft model's ``load_weights``: pushing only the target leaves a stale draft (users report
  acceptance falling to ~0 %). A tied embedding and ``lm_head`` travel in one bucket: the
  engine loads dummy weights, so vLLM keeps them tied and its loader skips ``lm_head.weight``
  as an alias that must load with ``model.embed_tokens.weight`` in the same call; the MTP
  draft shares the target's embedding and head (``SpecDecodeBaseProposer.load_model``).
  ``weight_version`` counts syncs.
- The draft: vLLM's MiMo MTP layer zeroes its token embedding at position 0, as our model
  does with ``mtp_mask_first_embedding`` (tests/test_mtp_fidelity.py); without it the
  served draft differs from the trained one.
- Log-probs: vLLM's default ``logprobs_mode="raw_logprobs"``, the sampled token's log-prob
  under the unmodified model distribution, as the native engine reports.
- Acceptance: vLLM's spec-decode counters (``LLM.get_metrics``) differenced per call.

vLLM is imported only when this engine is built (``[rollout] engine = "vllm"``).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchtitan.tools.logging import logger

from ..checkpoints.adapter import MTPStateDictAdapter
from ..checkpoints.hf import write_hf_metadata
from .base import Completion, SamplingParams, SpecDecodeStats
from .weight_sync import BucketStats, hf_weight_buckets, is_draft_weight

__all__ = [
    "VLLMRolloutEngine",
    "import_vllm",
    "spec_stats_between",
    "to_completion",
    "vllm_sampling_kwargs",
]

INSTALL_HINT = (
    'pip install -e ".[vllm]" (vllm==0.33.0, which pins torch==2.14.0 and needs an NVIDIA '
    'GPU); or set [rollout] engine = "native"'
)

SPEC_COUNTERS = (
    "vllm:spec_decode_num_drafts",
    "vllm:spec_decode_num_draft_tokens",
)
SPEC_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def import_vllm():
    """The ``vllm`` module, or an ImportError/RuntimeError that says what to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f'[rollout] engine = "vllm" needs vLLM: {INSTALL_HINT} ({e})') from e
    if not torch.cuda.is_available():
        raise RuntimeError(
            f'[rollout] engine = "vllm" needs a CUDA GPU; none is visible. {INSTALL_HINT}'
        )
    return vllm


def vllm_sampling_kwargs(params: SamplingParams, seed: int) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for our ``SamplingParams``.

    ``logprobs=0`` returns the sampled token's log-prob only; EOS and stop tokens stay in
    the output; ``seed`` is per request (prompt index added) so results are reproducible.
    """
    if params.temperature > 2.0:
        raise ValueError(f"vLLM accepts temperature <= 2, got {params.temperature}")
    return dict(
        n=1,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0,
        max_tokens=params.max_new_tokens,
        stop_token_ids=list(params.stop_token_ids),
        stop=list(params.stop_strings) or None,
        include_stop_str_in_output=True,
        seed=seed,
        logprobs=0,
    )


def to_completion(prompt: list[int], output: Any) -> Completion:
    """Our ``Completion`` from a vLLM ``CompletionOutput`` (token_ids, logprobs as a list of
    {token id: Logprob}, finish_reason)."""
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(
            f"vLLM finished a request with {output.finish_reason!r} (prompt of "
            f"{len(prompt)} tokens); the rollout cannot be used"
        )
    token_ids = list(output.token_ids)
    if output.logprobs is None or len(output.logprobs) != len(token_ids):
        raise RuntimeError("vLLM returned no log-prob per sampled token (logprobs=0 expected)")
    logprobs = [float(lp[tok].logprob) for tok, lp in zip(token_ids, output.logprobs, strict=True)]
    return Completion(list(prompt), token_ids, logprobs, output.finish_reason)


def _spec_counts(metrics: list[Any]) -> tuple[int, int, list[int]]:
    by_name = {m.name: m for m in metrics}
    drafts, draft_tokens = (int(getattr(by_name.get(n), "value", 0) or 0) for n in SPEC_COUNTERS)
    per_pos = getattr(by_name.get(SPEC_PER_POS), "values", None) or []
    return drafts, draft_tokens, [int(v) for v in per_pos]


def spec_stats_between(before: list[Any], after: list[Any]) -> SpecDecodeStats:
    """Speculative-decoding counts between two ``LLM.get_metrics()`` snapshots (vLLM's
    counters are process-wide and cumulative)."""
    d0, t0, p0 = _spec_counts(before)
    d1, t1, p1 = _spec_counts(after)
    p0 = p0 + [0] * (len(p1) - len(p0))
    return SpecDecodeStats(d1 - d0, t1 - t0, [b - a for a, b in zip(p0, p1, strict=True)])


def _load_bucket(worker, bucket: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside the vLLM worker: trunk names to the target, MTP names to the draft."""
    with torch.no_grad():
        worker.get_model().load_weights(bucket)
        draft_names = [(n, t) for n, t in bucket if is_draft_weight(n)]
        draft = worker.get_draft_model() if draft_names else None
        if draft is not None:
            draft.load_weights(draft_names)


class VLLMRolloutEngine:
    """``RolloutEngine`` on a colocated vLLM engine (one per torchrun rank).

    Args:
        model: the training ``MTPTransformer`` (any FSDP/TP layout); read by ``sync_weights``.
        model_dir: this rank's directory for the engine's ``config.json`` and tokenizer
            (weights are never written: the engine starts from dummy weights and
            ``sync_weights`` fills them).
        tokenizer_dir: where ``tokenizer.json`` lives (copied into ``model_dir``).
        speculative_tokens: 0 = off; N >= 1 = ``speculative_config={"method": "mtp", ...}``.
        max_model_len: the longest prompt + response.
        seed: the base seed; rank ``r`` seeds its engine with ``seed + r``.
        gpu_memory_utilization, sleep_level, enforce_eager, bucket_bytes: see ``[rollout]``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        model_dir: str | Path,
        tokenizer_dir: str | Path,
        speculative_tokens: int = 0,
        max_model_len: int,
        seed: int = 0,
        gpu_memory_utilization: float = 0.4,
        sleep_level: int = 1,
        enforce_eager: bool = False,
        bucket_bytes: int = 512 << 20,
        dtype: torch.dtype = torch.bfloat16,
    ):
        vllm = import_vllm()
        args = model.model_args
        if speculative_tokens > 1 and args.num_mtp_modules > 1:
            raise ValueError(
                "vLLM 0.33 drafts MiMo-style MTP with one module (MiMoMTP asserts "
                "spec_step_idx == 0); use speculative_tokens <= 1"
            )
        if speculative_tokens and not args.num_mtp_modules:
            raise ValueError("speculative_tokens > 0 needs MTP modules (mtp.num_modules >= 1)")
        if reason := args.vllm_unservable_reason():
            raise ValueError(f"vLLM 0.33 cannot serve this model as MiMoForCausalLM: {reason}")
        if speculative_tokens and not args.mtp_mask_first_embedding:
            logger.warning(
                "mtp_mask_first_embedding = False: vLLM's MiMo drafter zeroes the token "
                "embedding at position 0, so its drafts differ from the trained MTP module's"
            )
        self.model = model
        self.adapter = MTPStateDictAdapter(args, mtp_layout="mimo")
        self.speculative_tokens = speculative_tokens
        self.sleep_level = sleep_level
        self.bucket_bytes = bucket_bytes
        self.dtype = dtype
        self.weight_version = 0
        self.last_spec_stats: SpecDecodeStats | None = None
        self.last_sync: BucketStats | None = None
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        write_hf_metadata(args, model_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            trust_remote_code=True,  # model_type "mimo": configuration_mimo.py
            dtype=str(dtype).removeprefix("torch."),
            load_format="dummy",  # the first sync_weights loads the real weights
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=1,
            seed=seed + self.rank,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=sleep_level > 0,
            enforce_eager=enforce_eager,
            disable_log_stats=False,  # get_metrics() for the acceptance counters
            enable_prefix_caching=False,  # every step has new weights
        )
        if speculative_tokens:
            kwargs["speculative_config"] = {
                "method": "mtp",
                "num_speculative_tokens": speculative_tokens,
            }
        # vLLM reseeds the process's RNGs while it starts; the trainer's stay as they were.
        rng = (random.getstate(), torch.get_rng_state(), torch.cuda.get_rng_state_all())
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        random.setstate(rng[0])
        torch.set_rng_state(rng[1])
        torch.cuda.set_rng_state_all(rng[2])
        self._vllm = vllm
        self.asleep = False
        logger.info(f"vLLM engine ready in {time.perf_counter() - t0:.1f}s ({kwargs})")
        if sleep_level:
            self.llm.sleep(level=sleep_level)
            self.asleep = True

    def sync_weights(self, version: int | None = None) -> BucketStats:
        """Push the current trunk and MTP weights into the engine (collective over ranks)."""
        t0 = time.perf_counter()
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        stats = BucketStats()
        for bucket in hf_weight_buckets(
            self.model,
            self.adapter,
            self.bucket_bytes,
            dtype=self.dtype,
            device=self.device,
            stats=stats,
        ):
            self.llm.collective_rpc(_load_bucket, args=(bucket,))
            del bucket
        torch.cuda.synchronize(self.device)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        else:
            self.llm.reset_prefix_cache()
        self.weight_version = self.weight_version + 1 if version is None else version
        self.last_sync = stats
        logger.info(
            f"vLLM weight sync v{self.weight_version}: {stats.tensors} tensors, "
            f"{stats.bytes / 2**20:.0f} MiB in {stats.buckets} bucket(s) "
            f"(largest {stats.largest_bucket_bytes / 2**20:.0f} MiB), "
            f"{time.perf_counter() - t0:.1f}s"
        )
        return stats

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        self.last_spec_stats = None
        if not prompts:
            return []
        if self.asleep:
            raise RuntimeError("VLLMRolloutEngine.generate before sync_weights: call it first")
        vllm = self._vllm
        requests = [vllm.TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        sampling = [
            vllm.SamplingParams(**vllm_sampling_kwargs(params, params.seed * 1_000_003 + i))
            for i in range(len(prompts))
        ]
        before = self.llm.get_metrics() if self.speculative_tokens else None
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        completions = [
            to_completion(p, out.outputs[0]) for p, out in zip(prompts, outputs, strict=True)
        ]
        if self.speculative_tokens:
            self.last_spec_stats = spec_stats_between(before, self.llm.get_metrics())
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True
        return completions
