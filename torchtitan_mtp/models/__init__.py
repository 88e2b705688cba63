"""The ``mtp_transformer`` train spec, its flavors and its ``[validation]`` validator."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.components.validate import BaseValidator
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec
from torchtitan.tools import utils

from .args import MTPModelArgs, RoPEScalingArgs
from .logprobs import AlignedTokenStats, token_logprobs
from .model import MTPTransformer
from .parallelize import dp_sum, parallelize_mtp

__all__ = [
    "MODEL_NAME",
    "AlignedTokenStats",
    "MTPModelArgs",
    "MTPTransformer",
    "MTPValidator",
    "mtp_flavors",
    "register_train_specs",
    "token_logprobs",
]

MODEL_NAME = "mtp_transformer"

mtp_flavors: dict[str, MTPModelArgs] = {
    # Tiny: seconds per step on a laptop CPU; vocab covers the arithmetic tokenizer.
    "debug": MTPModelArgs(
        family="qwen3",
        vocab_size=128,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=192,
        norm_eps=1e-6,
        rope_theta=10000,
        qk_norm=True,
        max_seq_len=256,
        enable_weight_tying=False,
    ),
    # The regime study's model: about 2.5M parameters with 2 MTP modules (1.6M trunk).
    "small": MTPModelArgs(
        family="qwen3",
        vocab_size=128,
        dim=192,
        n_layers=4,
        n_heads=6,
        n_kv_heads=2,
        head_dim=32,
        hidden_dim=512,
        norm_eps=1e-6,
        rope_theta=10000,
        qk_norm=True,
        max_seq_len=256,
        enable_weight_tying=False,
    ),
    "smollm2_135m": MTPModelArgs(
        family="smollm2",
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        hidden_dim=1536,
        norm_eps=1e-5,
        rope_theta=100000,
        qk_norm=False,
        max_seq_len=8192,
        enable_weight_tying=True,
    ),
    "qwen3_0_6b": MTPModelArgs(
        family="qwen3",
        vocab_size=151936,
        dim=1024,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=3072,
        norm_eps=1e-6,
        rope_theta=1000000,
        qk_norm=True,
        max_seq_len=40960,
        enable_weight_tying=True,
    ),
    "qwen3_1_7b": MTPModelArgs(
        family="qwen3",
        vocab_size=151936,
        dim=2048,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=6144,
        norm_eps=1e-6,
        rope_theta=1000000,
        qk_norm=True,
        max_seq_len=40960,
        enable_weight_tying=True,
    ),
    "qwen3_8b": MTPModelArgs(
        family="qwen3",
        vocab_size=151936,
        dim=4096,
        n_layers=36,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=12288,
        norm_eps=1e-6,
        rope_theta=1000000,
        qk_norm=True,
        max_seq_len=40960,
        enable_weight_tying=False,
    ),
    # Xiaomi MiMo-7B: a Qwen2-style trunk (QKV bias) with one MTP layer.
    "mimo_7b": MTPModelArgs(
        family="mimo",
        vocab_size=151680,
        dim=4096,
        n_layers=36,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=11008,
        norm_eps=1e-5,
        rope_theta=640000,
        qk_norm=False,
        qkv_bias=True,
        max_seq_len=32768,
        enable_weight_tying=False,
        num_mtp_modules=1,
    ),
    # Llama-3.1-8B (Llama-3-8B shapes, with Llama-3.1 RoPE scaling).
    "llama3_8b": MTPModelArgs(
        family="llama3",
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=14336,
        norm_eps=1e-5,
        rope_theta=500000,
        qk_norm=False,
        rope_scaling=RoPEScalingArgs(),
        max_seq_len=131072,
        enable_weight_tying=False,
    ),
}


class MTPValidator(BaseValidator):
    """``[validation]``: the SFT objective (``MTPCrossEntropy``) on the ``[data]`` held-out
    split, logged by TorchTitan's ``log_validation`` as ``validation_metrics/loss``, with
    each head's CE (``validation_metrics/ce_loss/main``, ``.../mtp/ce_loss/head<k>``).

    A ``BaseValidator`` of its own rather than TorchTitan's ``Validator``, which reads a
    text dataset (``build_text_validation_dataloader``) and scores ``loss_fn(model(x), y)``:
    this model returns K + 1 hidden states and the loss needs the output head's chunked
    log-probs (``token_logprobs``), as in ``MTPTrainer.forward_backward_step``. When to
    validate is TorchTitan's (``validation.freq``, and step 1).
    """

    def __init__(
        self,
        job_config: Any,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: Any,
        parallel_dims: Any,
        loss_fn: Any,
        validation_context: Any,
        maybe_enable_amp: Any,
        metrics_processor: Any,
        **unused: Any,  # pipeline-parallel arguments: this model has no pipelining_fn
    ):
        from ..data.loader import build_validation_dataloader

        super().__init__(job_config)
        self.dataloader = build_validation_dataloader(dp_world_size, dp_rank, tokenizer, job_config)
        self.parallel_dims, self.loss_fn = parallel_dims, loss_fn
        self.validation_context, self.maybe_enable_amp = validation_context, maybe_enable_amp
        self.metrics_processor = metrics_processor

    @torch.no_grad()
    def validate(self, model_parts: list[nn.Module], step: int) -> None:
        model, device = model_parts[0], utils.device_type
        model.eval()
        heads = self.job_config.mtp.num_modules + 1
        sums = torch.zeros(2, heads, device=device)  # CE sums, valid target counts
        for batch, (input_dict, labels) in enumerate(self.dataloader):
            if batch == self.job_config.validation.steps:
                break
            labels = labels.to(device)
            self.metrics_processor.ntokens_since_last_log += labels.numel()
            with self.validation_context(), self.maybe_enable_amp:
                stats = token_logprobs(model, model(input_dict["input"].to(device)), labels)
            sums[0] -= (stats.logp * stats.mask).sum(dim=(1, 2))
            sums[1] += stats.mask.sum(dim=(1, 2))
        ce_sums, counts = dp_sum(sums, self.parallel_dims)
        loss = (ce_sums * self.loss_fn.head_weights(counts)).sum().item()
        ce = (ce_sums / counts.clamp(min=1)).tolist()
        extra = {"validation_metrics/ce_loss/main": ce[0]}
        extra |= {f"validation_metrics/mtp/ce_loss/head{k}": ce[k] for k in range(1, heads)}
        self.metrics_processor.log_validation(loss=loss, step=step, extra_metrics=extra)
        model.train()


def build_mtp_validator(**kwargs: Any) -> MTPValidator:
    """The TrainSpec's ``build_validator_fn`` (TorchTitan passes keyword arguments)."""
    return MTPValidator(**kwargs)


def register_train_specs() -> None:
    """Register ``[model] name = "mtp_transformer"`` with TorchTitan's registry."""
    from ..checkpoints.adapter import MTPStateDictAdapter
    from ..data.loader import build_dataloader
    from ..data.tokenizer import build_tokenizer
    from ..losses import build_mtp_sft_loss
    from ..metrics import build_metrics_processor

    register_train_spec(
        MODEL_NAME,
        TrainSpec(
            model_cls=MTPTransformer,
            model_args=mtp_flavors,
            parallelize_fn=parallelize_mtp,
            pipelining_fn=None,
            build_optimizers_fn=build_optimizers,
            build_lr_schedulers_fn=build_lr_schedulers,
            build_dataloader_fn=build_dataloader,
            build_tokenizer_fn=build_tokenizer,
            build_loss_fn=build_mtp_sft_loss,
            build_metrics_processor_fn=build_metrics_processor,
            build_validator_fn=build_mtp_validator,
            state_dict_adapter=MTPStateDictAdapter,
        ),
    )
