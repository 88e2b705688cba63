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
    mtp_mask_first_embedding: bool = False
    """MTP modules read a zero token embedding at sequence position 0, as vLLM's MiMo and
    DeepSeek MTP drafters do, so that vLLM serves the draft we train. False: the unmasked
    input of the training codebases (Megatron-LM's MTP, TorchTitan 0.3.0's DeepSeek-V3 MTP,
    the DeepSeek-V3 paper). The native engine drafts exactly as training does either way.
    From a job config: ``[mtp] mask_first_embedding``, or when unset, on exactly when
    ``[rollout] engine = "vllm"``."""
    logprob_chunk_tokens: int = 512
    """Token budget of the log-prob computation (bounds the [tokens, vocab] logits)."""

    def vllm_unservable_reason(self) -> str | None:
        """Why vLLM 0.33 cannot serve this model as ``MiMoForCausalLM`` (None: it can).

        vLLM's MiMo is its Qwen2 model, whose attention derives the head size as
        ``hidden_size // num_attention_heads`` (vllm/model_executor/models/qwen2.py,
        ``Qwen2Attention.__init__``) and ignores ``head_dim``.
        """
        if self.head_dim * self.n_heads != self.dim:
            return (
                f"head_dim x n_heads = {self.head_dim} x {self.n_heads} != dim = {self.dim}: "
                f"vLLM's MiMo/Qwen2 attention uses head_dim = dim // n_heads = "
                f"{self.dim // self.n_heads}"
            )
        return None

    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        mtp = getattr(job_config, "mtp", None)
        if mtp is not None:
            self.num_mtp_modules = mtp.num_modules
            self.mtp_init = mtp.init
            mask = mtp.mask_first_embedding
            if mask is None:  # follow the engine that will serve the drafts
                mask = getattr(getattr(job_config, "rollout", None), "engine", None) == "vllm"
            self.mtp_mask_first_embedding = mask
            self.logprob_chunk_tokens = mtp.logprob_chunk_tokens
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
