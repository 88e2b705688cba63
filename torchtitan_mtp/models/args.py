"""Model arguments of the MTP transformer: TorchTitan's Qwen3 arguments plus MTP fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torchtitan.config import JobConfig
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.models.qwen3.model.args import Qwen3ModelArgs

__all__ = ["MTPModelArgs", "RoPEScalingArgs"]

Family = Literal["llama3", "qwen2", "qwen3", "smollm2", "mimo"]


@dataclass
class MTPModelArgs(Qwen3ModelArgs):
    """A dense decoder (Llama-3, Qwen2/MiMo, Qwen3, SmolLM2) with K MTP modules.

    Inherits TorchTitan's Qwen3 fields (dim, n_layers, n_heads, n_kv_heads, head_dim,
    hidden_dim, vocab_size, norm_eps, rope_theta, qk_norm, enable_weight_tying, ...), so the
    trunk blocks are TorchTitan's own Qwen3 blocks; MoE is never enabled here.
    """

    family: Family = "qwen3"
    """Checkpoint family; decides HF names, not the computation."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2, MiMo)."""
    rope_scaling: RoPEScalingArgs | None = None
    """Llama-3.1-style RoPE frequency scaling; None for plain RoPE."""
    num_mtp_modules: int = 0
    """K, the number of DeepSeek-V3-style MTP modules."""
    mtp_init: Literal["random", "last_block"] = "random"
    """Fresh MTP blocks: TorchTitan's random init, or a copy of the last trunk block."""
    logprob_chunk_size: int = 1024
    """Sequence chunk of the log-prob computation (bounds the [B, chunk, vocab] logits)."""

    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        mtp = getattr(job_config, "mtp", None)
        if mtp is not None:
            self.num_mtp_modules = mtp.num_modules
            self.mtp_init = mtp.init
            self.logprob_chunk_size = mtp.logprob_chunk_size
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        tp = job_config.parallelism.tensor_parallel_degree
        if tp > 1 and (self.n_heads % tp or self.n_kv_heads % tp):
            raise ValueError(
                f"parallelism.tensor_parallel_degree = {tp} must divide n_heads "
                f"({self.n_heads}) and n_kv_heads ({self.n_kv_heads}) of this flavor"
            )
