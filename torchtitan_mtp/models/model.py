"""A dense decoder with K DeepSeek-V3-style Multi-Token-Prediction modules (OCC_SPEC §1).

Plain ``nn.Module`` code: parallelism is applied from outside (``parallelize.py``). The
trunk and MTP blocks are TorchTitan's own Qwen3 blocks (GQA, RoPE, optional QK-norm), with
an optional QKV bias added for Qwen2/MiMo. Llama-3 and SmolLM2 trunks use the same blocks
without QK-norm; their RoPE uses the rotate-half convention of HF checkpoints, and
Llama-3.1 frequency scaling comes from TorchTitan's llama3 code.

Generation runs this same forward code: the attention's forward, TorchTitan's Qwen3 math
written here, takes an optional KV cache (``kv_cache=``, a ``decode.KVCache``), and
``decode.Decoder`` calls these modules step by step. Only the cache branch of
``Attention.forward`` is decode-only.

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

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchtitan.models.llama3.model.model import precompute_freqs_cis
from torchtitan.models.qwen3.model.model import Attention as Qwen3Attention
from torchtitan.models.qwen3.model.model import TransformerBlock as Qwen3Block
from torchtitan.models.qwen3.model.model import precompute_rope_cache
from torchtitan.models.utils import trunc_normal_
from torchtitan.protocols.model import AttentionMasksType
from torchtitan.protocols.train_spec import ModelProtocol

from .args import MTPModelArgs
from .logprobs import vocab_stats

if TYPE_CHECKING:
    from .decode import KVCache

__all__ = [
    "Attention",
    "MTPModule",
    "MTPTransformer",
    "OutputHead",
    "TokenEmbedding",
    "TokenStats",
    "TransformerBlock",
    "rope_at",
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


def rope_at(rope_cache: torch.Tensor, positions: torch.Tensor | None, seqlen: int) -> torch.Tensor:
    """RoPE cos and sin at T = ``seqlen`` positions: [1 | B, T, 1, 2 * head_dim].

    rope_cache [max_seq_len, 2 * head_dim]; positions [1 | B, T], or None for 0 .. T - 1.
    """
    rope = rope_cache[:seqlen] if positions is None else rope_cache[positions]
    return rope.view(-1, seqlen, 1, rope.shape[-1])


def apply_rope(
    xq: torch.Tensor, xk: torch.Tensor, rope: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, T, H, hd] and k [B, T, H_kv, hd] by ``rope_at``'s [1 | B, T, 1, 2 * hd]
    (TorchTitan's Qwen3 rotate-half convention)."""
    if rope.dtype != xq.dtype:
        rope = rope.to(xq.dtype)
    cos, sin = rope.chunk(2, dim=-1)
    return xq * cos + _rotate_half(xq) * sin, xk * cos + _rotate_half(xk) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(Qwen3Attention):
    """TorchTitan's Qwen3 attention (GQA, RoPE, optional QK-norm), attending causally over
    its input (training) or over a KV cache (decoding). ``TransformerBlock`` gives the q/k/v
    projections a bias when ``qkv_bias``."""

    def __init__(self, args: MTPModelArgs):
        super().__init__(args)
        if args.attn_type != "sdpa":
            raise ValueError(f"attn_type = {args.attn_type!r}: MTPTransformer uses SDPA only")

    def init_weights(self, init_std: float) -> None:
        super().init_weights(init_std)
        for linear in (self.wq, self.wk, self.wv):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(
        self,
        x: torch.Tensor,
        rope_cache: torch.Tensor,
        attention_masks: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D].

        Args:
            rope_cache: [max_seq_len, 2 * head_dim] RoPE cos and sin by position, or
                already at the T positions (``rope_at``: [1 | B, T, 1, 2 * head_dim]).
            attention_masks: None without ``kv_cache`` (causal over the T positions); with
                it, SDPA's ``attn_mask`` [B, 1, T, L'] over cache positions 0 .. L' - 1
                (additive, or bool: True attends).
            positions: [1 | B, T] sequence positions, or None for 0 .. T - 1. With
                ``kv_cache``, [B, T], also where the keys and values are written.
            kv_cache: this layer's ``decode.KVCache`` (decoding).
        """
        bs, seqlen, _ = x.shape
        # -1 heads: under tensor parallelism the projections hold this rank's heads.
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        if self.q_norm is not None:
            xq = self.q_norm(xq)
        if self.k_norm is not None:
            xk = self.k_norm(xk)
        if rope_cache.dim() == 2:
            rope_cache = rope_at(rope_cache, positions, seqlen)
        xq, xk = apply_rope(xq, xk, rope_cache)
        xq = xq.transpose(1, 2)  # [B, H, T, head_dim]
        if kv_cache is None:
            if attention_masks is not None:
                raise NotImplementedError("MTPTransformer uses causal SDPA attention only")
            keys, values = xk.transpose(1, 2), xv.transpose(1, 2)  # [B, H_kv, T, head_dim]
            out = self.inner_attention(
                xq, keys, values, scale=self.scaling, enable_gqa=self.enable_gqa
            )
        else:
            keys, values = kv_cache.update(positions, xk, xv)  # [B, H_kv, L, head_dim]
            end = attention_masks.shape[-1]
            out = F.scaled_dot_product_attention(
                xq,
                keys[:, :, :end],
                values[:, :, :end],
                attn_mask=attention_masks,
                scale=self.scaling,
                enable_gqa=self.enable_gqa,
            )
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))


class TransformerBlock(Qwen3Block):
    """TorchTitan's Qwen3 block (dense feed-forward) with this module's ``Attention`` and an
    optional bias on the q/k/v projections."""

    def __init__(self, layer_id: int, args: MTPModelArgs):
        super().__init__(layer_id, args)
        # Ours replaces TorchTitan's attention. init_weights overwrites every weight, and
        # the forked RNG keeps a seeded model built on CPU what it was with TorchTitan's.
        with torch.random.fork_rng(devices=[]):
            self.attention = Attention(args)
        if args.qkv_bias:
            for name in ("wq", "wk", "wv"):
                old = getattr(self.attention, name)
                bias = nn.Linear(old.in_features, old.out_features, bias=True)
                setattr(self.attention, name, bias)

    def forward(
        self,
        x: torch.Tensor,
        rope_cache: torch.Tensor,
        attention_masks: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; the other arguments as in ``Attention.forward``."""
        h = x + self.attention(
            self.attention_norm(x), rope_cache, attention_masks, positions, kv_cache=kv_cache
        )
        return h + self.feed_forward(self.ffn_norm(h))


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
        *,
        attention_masks: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h_prev, emb: [B, S, D] -> (h^k [B, S, D] before the norm, norm(h^k) [B, S, D]);
        the other arguments as in ``Attention.forward``."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        h = self.block(x, rope_cache, attention_masks, positions, kv_cache=kv_cache)
        return h, self.norm(h)

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        for norm in (self.enorm, self.hnorm, self.norm):
            norm.reset_parameters()
        trunc_normal_(self.eh_proj.weight, mean=0.0, std=0.02)
        self.block.init_weights(buffer_device)


class TokenStats(NamedTuple):
    """Per-position statistics of one or more heads, [H, B, S]."""

    logp: torch.Tensor
    """float32 log-prob of the label."""
    entropy: torch.Tensor | None
    """float32 [B, S] entropy of head 0's distribution; None unless asked."""
    top1: torch.Tensor
    """bool: the head's argmax equals the label."""


class OutputHead(nn.Module):
    """The shared output projection ``weight`` [V, D], evaluated by token budget.

    ``vocab_stats`` keeps at most ``chunk_tokens`` rows of float32 logits alive at a
    time (recomputed in backward), whatever the batch size, sequence length and heads.
    """

    def __init__(self, dim: int, vocab_size: int, chunk_tokens: int = 512):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.chunk_tokens = chunk_tokens

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        detach_weight_from: int | None = None,
        entropy: bool = False,
    ) -> torch.Tensor | TokenStats:
        """Logits, or token statistics of given labels.

        Args:
            hidden: [H, B, S, D] normalised hidden states of H heads.
            labels: [H, B, S] target ids per head and position; ignored ids (< 0) are
                clamped to 0, callers mask them. None returns logits [H, B, S, V] instead
                (for decoding short sequences).
            detach_weight_from: heads h >= this index see a detached weight (Detach regime).
            entropy: also compute head 0's entropy (no loss uses an MTP head's).
        """
        if labels is None:
            return F.linear(hidden, self.weight)
        labels = labels.clamp(min=0)
        n_heads, batch, seq, dim = hidden.shape
        logp, top1, ent = [], [], None
        for head in range(n_heads):
            detach = detach_weight_from is not None and head >= detach_weight_from
            weight = self.weight.detach() if detach else self.weight
            stats = vocab_stats(
                hidden[head].reshape(batch * seq, dim),
                weight,
                labels[head].reshape(batch * seq),
                self.chunk_tokens,
                entropy=entropy and head == 0,
            )
            logp.append(stats.logp.view(batch, seq))
            top1.append(stats.top1.view(batch, seq))
            if stats.entropy is not None:
                ent = stats.entropy.view(batch, seq)
        return TokenStats(torch.stack(logp), ent, torch.stack(top1))


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
        self.output = OutputHead(args.dim, args.vocab_size, args.logprob_chunk_tokens)
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

    def mtp_embedding_zeros(
        self, tokens: torch.Tensor, positions: torch.Tensor | None
    ) -> torch.Tensor | None:
        """bool [B, S]: where the MTP modules read a zero embedding instead of that of their
        input token (the sequence position 0 under ``mtp_mask_first_embedding``; None:
        nowhere). tokens [B, S]; positions [1 | B, S], or None for 0 .. S - 1."""
        if not self.model_args.mtp_mask_first_embedding:
            return None
        return _first_positions(tokens, positions)

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
        first = self.mtp_embedding_zeros(tokens, positions) if num_mtp else None
        if first is not None:
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
