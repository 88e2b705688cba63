"""The ``mtp_transformer`` train spec and its flavors."""

from __future__ import annotations

from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec

from .args import MTPModelArgs, RoPEScalingArgs
from .logprobs import AlignedTokenStats, token_logprobs
from .model import MTPTransformer
from .parallelize import parallelize_mtp

__all__ = [
    "MODEL_NAME",
    "AlignedTokenStats",
    "MTPModelArgs",
    "MTPTransformer",
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


def register_train_specs() -> None:
    """Register ``[model] name = "mtp_transformer"`` with TorchTitan's registry."""
    from ..checkpoints.adapter import MTPStateDictAdapter
    from ..data.arithmetic import build_dataloader
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
            state_dict_adapter=MTPStateDictAdapter,
        ),
    )
