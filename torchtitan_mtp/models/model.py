"""A dense decoder with K DeepSeek-V3-style Multi-Token-Prediction modules (OCC_SPEC §1).

Plain ``nn.Module`` code: parallelism is applied from outside (``parallelize.py``). The
trunk and MTP blocks are TorchTitan's own Qwen3 blocks (GQA, RoPE, optional QK-norm), with
an optional QKV bias added for Qwen2/MiMo. Llama-3 and SmolLM2 trunks use the same blocks
without QK-norm; their RoPE uses the rotate-half convention of HF checkpoints, and
Llama-3.1 frequency scaling comes from TorchTitan's llama3 code.

Shapes: B batch, S sequence, D dim, V vocab, K MTP modules, H = K + 1 heads.

Position 0 (``mtp_mask_first_embedding``, off by default as in the training codebases):
every MTP module reads a zero token embedding where the sequence position is 0, as vLLM's
MTP drafters do (vLLM 0.33: vllm/model_executor/models/mimo_mtp.py
``MiMoMultiTokenPredictorLayer.forward`` and deepseek_mtp.py
``DeepSeekMultiTokenPredictorLayer.forward`` zero ``inputs_embeds`` where ``positions == 0``).
vLLM's proposer gives the draft at position i the target's h_i and the embedding of token
i + 1, i.e. our module 1's inputs at index i, so vLLM's position 0 is index 0 here (or
wherever ``positions`` restarts at 0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchtitan.models.llama3.model.model import precompute_freqs_cis
from torchtitan.models.qwen3.model.model import TransformerBlock as Qwen3Block
from torchtitan.models.qwen3.model.model import precompute_rope_cache
from torchtitan.models.utils import trunc_normal_
from torchtitan.protocols.model import AttentionMasksType
from torchtitan.protocols.train_spec import ModelProtocol

from .args import MTPModelArgs

__all__ = [
    "MTPModule",
    "MTPTransformer",
    "OutputHead",
    "TokenEmbedding",
    "TokenStats",
    "TransformerBlock",
]


def build_rope_cache(args: MTPModelArgs) -> torch.Tensor:
    """RoPE cos/sin cache in TorchTitan's Qwen3 layout: [max_seq_len, 2 * head_dim]."""
    if args.rope_scaling is None:
        return precompute_rope_cache(args.head_dim, args.max_seq_len, args.rope_theta)
    # Llama-3.1 scaled frequencies (TorchTitan's llama3 code), in rotate-half layout.
    freqs_cis = precompute_freqs_cis(
        args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling
    )  # [S, head_dim / 2] complex
    cos, sin = freqs_cis.real, freqs_cis.imag
    return torch.cat([cos, cos, sin, sin], dim=-1)


class TransformerBlock(Qwen3Block):
    """TorchTitan's Qwen3 block, with an optional bias on the q/k/v projections."""

    def __init__(self, layer_id: int, args: MTPModelArgs):
        super().__init__(layer_id, args)
        if args.qkv_bias:
            attn = self.attention
            for name in ("wq", "wk", "wv"):
                old = getattr(attn, name)
                setattr(attn, name, nn.Linear(old.in_features, old.out_features, bias=True))

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        super().init_weights(buffer_device)
        for name in ("wq", "wk", "wv"):
            bias = getattr(self.attention, name).bias
            if bias is not None:
                nn.init.zeros_(bias)


class TokenEmbedding(nn.Embedding):
    """The token embedding; rows of ``zero`` read a zero vector instead of their token's.

    The zeroing happens inside the embedding call, on the full sequence, so it is right
    whatever layout a parallelism plan gives the output (e.g. sequence-sharded under TP).
    """

    def forward(self, tokens: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [N, S], zero: bool [N, S] | None -> embeddings [N, S, D]."""
        emb = super().forward(tokens)
        return emb if zero is None else emb.masked_fill(zero.unsqueeze(-1), 0.0)


class MTPModule(nn.Module):
    """MTP module k: ``h^k = TRM_k(eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1})]))``.

    The embedding half comes first (DeepSeek order). ``norm`` is the module's own final
    norm in front of the shared output head. ``emb`` arrives as the module should read it:
    ``MTPTransformer`` zeroes it at position 0 (``mtp_mask_first_embedding``).
    """

    def __init__(self, layer_id: int, args: MTPModelArgs):
        super().__init__()
        self.enorm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.hnorm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = TransformerBlock(layer_id, args)
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        h_prev: torch.Tensor,
        emb: torch.Tensor,
        rope_cache: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h_prev, emb: [B, S, D] -> (h^k [B, S, D] before the norm, norm(h^k) [B, S, D])."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        h = self.block(x, rope_cache, None, positions)
        return h, self.norm(h)

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        for norm in (self.enorm, self.hnorm, self.norm):
            norm.reset_parameters()
        trunc_normal_(self.eh_proj.weight, mean=0.0, std=0.02)
        self.block.init_weights(buffer_device)


class TokenStats(NamedTuple):
    """Per-position statistics of one or more heads, all [H, B, S]."""

    logp: torch.Tensor
    """float32 log-prob of the label."""
    entropy: torch.Tensor
    """float32 entropy of the head's distribution."""
    top1: torch.Tensor
    """bool: the head's argmax equals the label."""


def _chunk_stats(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [B, C, D], weight [V, D], labels [B, C] -> logp, entropy, top1, each [B, C]."""
    logits = F.linear(h, weight).float()  # [B, C, V]
    lse = logits.logsumexp(dim=-1)
    logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
    entropy = lse - (logits.softmax(dim=-1) * logits).sum(dim=-1)
    top1 = logits.argmax(dim=-1) == labels
    return logp, entropy, top1


class OutputHead(nn.Module):
    """The shared output projection ``weight`` [V, D], evaluated in sequence chunks.

    Each chunk's logits are recomputed in backward (activation checkpointing), so at most
    one [B, chunk, V] float32 block is alive at a time, whatever the number of heads.
    """

    def __init__(self, dim: int, vocab_size: int, chunk_size: int = 1024):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        detach_weight_from: int | None = None,
    ) -> torch.Tensor | TokenStats:
        """Logits, or token statistics of given labels.

        Args:
            hidden: [H, B, S, D] normalised hidden states of H heads.
            labels: [H, B, S] target ids per head and position; ignored ids (< 0) are
                clamped to 0, callers mask them. None returns logits [H, B, S, V] instead
                (for decoding short sequences).
            detach_weight_from: heads h >= this index see a detached weight (Detach regime).
        """
        if labels is None:
            return F.linear(hidden, self.weight)
        labels = labels.clamp(min=0)
        n_heads, _, seq, _ = hidden.shape
        stats = []
        for head in range(n_heads):
            detach = detach_weight_from is not None and head >= detach_weight_from
            weight = self.weight.detach() if detach else self.weight
            parts = []
            for start in range(0, seq, self.chunk_size):
                h = hidden[head, :, start : start + self.chunk_size]
                y = labels[head, :, start : start + self.chunk_size]
                if torch.is_grad_enabled():
                    parts.append(checkpoint(_chunk_stats, h, weight, y, use_reentrant=False))
                else:
                    parts.append(_chunk_stats(h, weight, y))
            stats.append([torch.cat(p, dim=1) for p in zip(*parts, strict=True)])
        return TokenStats(*(torch.stack(s) for s in zip(*stats, strict=True)))


class MTPTransformer(ModelProtocol):
    """Trunk (embedding, N blocks, final norm, output head) plus K MTP modules.

    Parameter names follow TorchTitan (``tok_embeddings``, ``layers.{i}``, ``norm``,
    ``output``); MTP module k is ``mtp.{k-1}`` and its block is layer ``N + k - 1``.
    """

    def __init__(self, model_args: MTPModelArgs):
        super().__init__(model_args)
        args = model_args
        self.model_args = args
        self.tok_embeddings = TokenEmbedding(args.vocab_size, args.dim)
        self.register_buffer("rope_cache", build_rope_cache(args), persistent=False)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args) for i in range(args.n_layers)}
        )
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.mtp = nn.ModuleDict(
            {str(k): MTPModule(args.n_layers + k, args) for k in range(args.num_mtp_modules)}
        )
        self.output = OutputHead(args.dim, args.vocab_size, args.logprob_chunk_size)
        if args.enable_weight_tying:
            self.output.weight = self.tok_embeddings.weight

    @property
    def num_mtp_modules(self) -> int:
        return len(self.mtp)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """TorchTitan's init conventions; MTP blocks random or copied from the last block."""
        buffer_device = buffer_device or self.rope_cache.device
        with torch.device(buffer_device):
            self.rope_cache = build_rope_cache(self.model_args)
        nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            layer.init_weights(buffer_device)
        self.norm.reset_parameters()
        if self.model_args.enable_weight_tying:
            self.output.weight = self.tok_embeddings.weight
        std = self.model_args.dim**-0.5
        trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        for module in self.mtp.values():
            module.init_weights(buffer_device)
        if self.model_args.mtp_init == "last_block":
            self.copy_last_block_into_mtp()

    @torch.no_grad()
    def copy_last_block_into_mtp(self, modules: list[int] | None = None) -> None:
        """Make MTP blocks (all, or the 0-based ``modules``) copies of the last trunk block."""
        last = self.layers[str(self.model_args.n_layers - 1)].state_dict()
        for k, module in enumerate(self.mtp.values()):
            if modules is not None and k not in modules:
                continue
            for name, tensor in module.block.state_dict().items():
                tensor.copy_(last[name])

    def get_attention_masks(self, *args, **kwargs) -> AttentionMasksType:
        raise NotImplementedError("MTPTransformer uses causal SDPA attention only")

    def forward(
        self,
        tokens: torch.Tensor,
        attention_masks: AttentionMasksType | None = None,
        positions: torch.Tensor | None = None,
        detach_mtp_inputs: bool = False,
        draft_pass: bool = False,
    ) -> list[torch.Tensor]:
        """tokens [B, S] -> K + 1 normalised hidden states, each [B, S, D].

        Entry 0 is the trunk's ``norm(h^0)``; entry k is MTP module k's ``norm_k(h^k)``.
        Position i of entry k predicts token ``t_{i+k+1}``; module k reads ``Emb(t_{i+k})``,
        so its last k positions see padding and have no valid prediction. With
        ``mtp_mask_first_embedding`` module k reads a zero embedding where the position is 0
        (index 0 when ``positions`` is None), as vLLM's drafter does.
        ``detach_mtp_inputs`` (Detach regime) feeds the MTP modules ``h^0.detach()`` and
        detached embeddings, so MTP losses put no gradient on the trunk or the embedding.
        ``draft_pass`` appends K more entries: a second pass of the MTP modules on detached
        inputs (the draft objective: gradients reach MTP-only parameters only).
        """
        if attention_masks is not None:
            raise NotImplementedError("MTPTransformer uses causal SDPA attention only")
        num_mtp = self.num_mtp_modules
        batch = tokens.shape[0]
        # One embedding call for the trunk and all K shifted inputs (one FSDP/TP unit call).
        shifted = [tokens] + [_roll_left(tokens, k) for k in range(1, num_mtp + 1)]
        ids = torch.cat(shifted, dim=0)
        if num_mtp and self.model_args.mtp_mask_first_embedding:
            first = _first_positions(tokens, positions)
            zero = torch.cat([torch.zeros_like(first)] + [first] * num_mtp, dim=0)
            embs = self.tok_embeddings(ids, zero)
        else:
            embs = self.tok_embeddings(ids)
        embs = embs.split(batch, dim=0)
        h = embs[0]
        for layer in self.layers.values():
            h = layer(h, self.rope_cache, None, positions)
        hidden = [self.norm(h)]
        trunk = h
        for detach in [detach_mtp_inputs] + ([True] if draft_pass else []):
            h = trunk.detach() if detach else trunk
            for k, module in enumerate(self.mtp.values(), start=1):
                emb = embs[k].detach() if detach else embs[k]
                h, normed = module(h, emb, self.rope_cache, positions)
                hidden.append(normed)
        return hidden


def _first_positions(tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """bool [B, S]: where the sequence position is 0 (``positions`` [B | 1, S] or None)."""
    if positions is None:
        first = torch.zeros_like(tokens, dtype=torch.bool)
        first[:, 0] = True
        return first
    return (positions == 0).expand_as(tokens)


def _roll_left(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """[B, S] -> [B, S] with out[:, i] = tokens[:, i + k], and 0 in the last k positions."""
    pad = tokens.new_zeros(tokens.shape[0], min(k, tokens.shape[1]))
    return torch.cat([tokens[:, k:], pad], dim=1)
