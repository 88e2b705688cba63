"""The native rollout engine: batched KV-cache decoding on the training model itself.

gpt-fast style, pure PyTorch. TorchTitan's blocks have no KV-cache path, so the engine
evaluates the trunk from the model's own weights:

    h = Emb(t)
    per block:  h += wo(SDPA(rope(q_norm(wq x)), rope(k_norm(wk x)), wv x))   x = attention_norm(h)
                h += w2(silu(w1 x) * w3 x)                                    x = ffn_norm(h)
    logits = norm(h) @ output.weight^T

Prompts are left-padded into one [B, P] batch. A real token's RoPE position is its index
among its row's real tokens, so every row sees exactly the rotations of an unpadded
forward; pad keys are masked out of attention. The KV cache has one slot per column of the
padded layout ([B, n_kv_heads_local, P + max_new_tokens, head_dim] per layer), so a decode
step writes the same column for every row.

Parallelism (the model itself stays parallelism-free):

- FSDP2: every ``FSDPModule`` is ``unshard()``-ed before generation and ``reshard()``-ed
  after (the public FSDP2 API, which is not recursive, hence every module). After
  ``unshard()`` the modules hold their unsharded parameters in the mixed-precision
  ``param_dtype``: plain tensors under FSDP alone, DTensors on the TP mesh under FSDP + TP.
- TP: parameters are DTensors and the math uses their local shards. wq/wk/wv/w1/w3 are
  column-sharded (local heads / local hidden units); wo and w2 are row-sharded, so their
  local outputs are partial sums, all-reduced over the TP group; norms, the embedding and
  the output head are replicated. Sampled tokens are broadcast from the first TP rank so
  that every TP rank continues with identical tokens.

Only the trunk's main head generates. ``_forward`` evaluates any number of new tokens at
any cache column, which is what a later self-speculative mode needs to verify MTP drafts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from torchtitan.tools.logging import logger

from .base import Completion, SamplingParams

__all__ = ["NativeRolloutEngine", "sample_tokens"]

PAD_ID = 0
"""Token fed in padding columns and after a row finished; never attended to or returned."""


# ---------------------------------------------------------------------------- weights


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard of a DTensor (the whole tensor when replicated), detached."""
    if t is None:
        return None
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.detach()


def _unwrap(module: nn.Module) -> nn.Module:
    """Strip activation-checkpoint and torch.compile wrappers."""
    while True:
        if hasattr(module, "_checkpoint_wrapped_module"):
            module = module._checkpoint_wrapped_module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


@dataclass
class _Norm:
    weight: torch.Tensor | None
    eps: float | None

    @classmethod
    def of(cls, norm: nn.RMSNorm | None) -> _Norm | None:
        return None if norm is None else cls(_local(norm.weight), norm.eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


@dataclass
class _Block:
    """One block's local weights."""

    attention_norm: _Norm
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    q_norm: _Norm | None
    k_norm: _Norm | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    ffn_norm: _Norm
    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor

    @classmethod
    def of(cls, block: nn.Module) -> _Block:
        block = _unwrap(block)
        attn, ffn = block.attention, block.feed_forward
        return cls(
            attention_norm=_Norm.of(block.attention_norm),
            wq=_local(attn.wq.weight),
            bq=_local(attn.wq.bias),
            wk=_local(attn.wk.weight),
            bk=_local(attn.wk.bias),
            wv=_local(attn.wv.weight),
            bv=_local(attn.wv.bias),
            q_norm=_Norm.of(attn.q_norm),
            k_norm=_Norm.of(attn.k_norm),
            wo=_local(attn.wo.weight),
            bo=_local(attn.wo.bias),
            ffn_norm=_Norm.of(block.ffn_norm),
            w1=_local(ffn.w1.weight),
            w2=_local(ffn.w2.weight),
            w3=_local(ffn.w3.weight),
        )


@dataclass
class _Weights:
    """Local views of the trunk's (unsharded) weights, valid while the model is unsharded."""

    embedding: torch.Tensor  # [V, D], replicated
    blocks: list[_Block]
    norm: _Norm
    output: torch.Tensor  # [V, D], replicated
    rope_cache: torch.Tensor  # [max_seq_len, 2 * head_dim]
    head_dim: int
    n_heads: int  # local
    n_kv_heads: int  # local
    tp_group: dist.ProcessGroup | None  # set when the blocks are tensor-parallel

    @classmethod
    def of(cls, model: nn.Module, tp_group: dist.ProcessGroup | None) -> _Weights:
        args = model.model_args
        blocks = [_Block.of(block) for block in model.layers.values()]
        head_dim = args.head_dim
        n_heads = blocks[0].wq.shape[0] // head_dim
        n_kv_heads = blocks[0].wk.shape[0] // head_dim
        if n_heads != args.n_heads:  # column-sharded q/k/v: tensor parallel
            tp_group = tp_group or _tp_group_of(_unwrap(model.layers["0"]).attention.wq.weight)
        else:
            tp_group = None
        return cls(
            embedding=_local(model.tok_embeddings.weight),
            blocks=blocks,
            norm=_Norm.of(model.norm),
            output=_local(model.output.weight),
            rope_cache=model.rope_cache,
            head_dim=head_dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            tp_group=tp_group,
        )


def _tp_group_of(weight: torch.Tensor) -> dist.ProcessGroup:
    """The process group of the mesh dimension along which a DTensor weight is sharded."""
    if isinstance(weight, DTensor):
        mesh = weight.device_mesh
        for dim, placement in enumerate(weight.placements):
            if isinstance(placement, Shard) and mesh.size(dim) > 1:
                return mesh.get_group(dim)
    raise ValueError(
        "the attention projections hold a subset of the heads but are not a sharded "
        "DTensor; pass tp_group= to NativeRolloutEngine"
    )


@contextlib.contextmanager
def _unsharded(model: nn.Module) -> Iterator[None]:
    """eval(), no_grad and every FSDP2 module unsharded; restored on exit."""
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for module in fsdp_modules:
                module.unshard()
            yield
    finally:
        for module in reversed(fsdp_modules):
            module.reshard()
        model.train(was_training)


# ---------------------------------------------------------------------------- the math


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _KVCache:
    """Per-layer keys and values [B, n_kv_heads_local, length, head_dim], one slot per column."""

    def __init__(self, w: _Weights, batch: int, length: int, dtype: torch.dtype, device):
        shape = (batch, w.n_kv_heads, length, w.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in w.blocks]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in w.blocks]


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def _attention(
    w: _Weights,
    blk: _Block,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: int,
    mask: torch.Tensor,
) -> torch.Tensor:
    """x [B, T, D] of columns start .. start + T - 1 -> attention output [B, T, D]."""
    batch, new, _ = x.shape
    q = F.linear(x, blk.wq, blk.bq).view(batch, new, w.n_heads, w.head_dim)
    k = F.linear(x, blk.wk, blk.bk).view(batch, new, w.n_kv_heads, w.head_dim)
    v = F.linear(x, blk.wv, blk.bv).view(batch, new, w.n_kv_heads, w.head_dim)
    if blk.q_norm is not None:
        q = blk.q_norm(q)
    if blk.k_norm is not None:
        k = blk.k_norm(k)
    q = q * cos + _rotate_half(q) * sin  # TorchTitan qwen3 apply_rotary_emb
    k = k * cos + _rotate_half(k) * sin
    end = start + new
    k_cache[:, :, start:end] = k.transpose(1, 2)
    v_cache[:, :, start:end] = v.transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # [B, H, T, hd]
        k_cache[:, :, :end],  # [B, H_kv, end, hd]
        v_cache[:, :, :end],
        attn_mask=mask,  # [B, 1, T, end]
        scale=w.head_dim**-0.5,
        enable_gqa=w.n_heads != w.n_kv_heads,
    )
    out = F.linear(out.transpose(1, 2).reshape(batch, new, -1), blk.wo)
    out = _all_reduce(out, w.tp_group)  # row-parallel partial sums
    return out if blk.bo is None else out + blk.bo


def _feed_forward(w: _Weights, blk: _Block, x: torch.Tensor) -> torch.Tensor:
    out = F.linear(F.silu(F.linear(x, blk.w1)) * F.linear(x, blk.w3), blk.w2)
    return _all_reduce(out, w.tp_group)


def _forward(
    w: _Weights, tokens: torch.Tensor, start: int, pad_len: torch.Tensor, cache: _KVCache
) -> torch.Tensor:
    """Trunk hidden states (before the final norm) of new tokens, filling the KV cache.

    Args:
        tokens: [B, T] tokens of cache columns ``start .. start + T - 1``.
        pad_len: [B] left-padding width of each row; columns < pad_len[b] are padding.
        cache: KV cache holding columns ``0 .. start - 1``.

    Returns:
        [B, T, D] hidden states h^0 (the MTP modules' input, before ``norm``).
    """
    new = tokens.shape[1]
    device = tokens.device
    cols = torch.arange(start, start + new, device=device)  # [T]
    positions = (cols[None, :] - pad_len[:, None]).clamp(min=0)  # [B, T]
    rope = w.rope_cache[positions].unsqueeze(2)  # [B, T, 1, 2 * hd]
    h = F.embedding(tokens, w.embedding)
    cos = rope[..., : w.head_dim].to(h.dtype)
    sin = rope[..., w.head_dim :].to(h.dtype)
    keys = torch.arange(start + new, device=device)  # [end]
    causal = keys[None, :] <= cols[:, None]  # [T, end]
    real = keys[None, :] >= pad_len[:, None]  # [B, end]
    # A padding query attends to itself only: no all-masked rows (NaN) in the batch.
    mask = (causal[None] & real[:, None]) | (keys[None, :] == cols[:, None])[None]
    mask = mask.unsqueeze(1)  # [B, 1, T, end]
    for i, blk in enumerate(w.blocks):
        x = blk.attention_norm(h)
        h = h + _attention(w, blk, x, cos, sin, cache.k[i], cache.v[i], start, mask)
        h = h + _feed_forward(w, blk, blk.ffn_norm(h))
    return h


def _logits(w: _Weights, h: torch.Tensor) -> torch.Tensor:
    """Main-head float32 logits [..., V] of pre-norm hidden states [..., D]."""
    return F.linear(w.norm(h), w.output).float()


# ---------------------------------------------------------------------------- sampling


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Sample [B] tokens from raw float32 logits [B, V] with temperature, top-k, top-p."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= params.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    # Gumbel-style sampling without a host sync: argmax(p / E), E ~ Exp(1).
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


# ---------------------------------------------------------------------------- the engine


def _log_progress(
    t0: float, lengths: torch.Tensor, stopped: torch.Tensor, step: int, max_new: int
) -> None:
    elapsed = time.perf_counter() - t0
    tokens = int(lengths.sum())
    logger.info(
        f"rollout: {tokens} tokens in {elapsed:.1f}s ({tokens / max(elapsed, 1e-9):.1f} tok/s), "
        f"{int((~stopped).sum())}/{stopped.numel()} rows running, step {step}/{max_new}"
    )


class NativeRolloutEngine:
    """``RolloutEngine`` running batched KV-cache generation on the training model itself.

    Args:
        model: the ``MTPTransformer``: plain, FSDP2-sharded, TP-sharded or FSDP + TP.
        tokenizer: needed for ``stop_strings`` only (anything with ``decode(ids) -> str``).
        tp_group: the tensor-parallel group; found from the DTensor weights when None.
        progress_every_s: at most one progress log line per this many seconds.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer=None,
        tp_group: dist.ProcessGroup | None = None,
        progress_every_s: float = 10.0,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.tp_group = tp_group
        self.progress_every_s = progress_every_s

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need NativeRolloutEngine(tokenizer=...)")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {params.max_new_tokens} must be >= 1")
        with _unsharded(self.model):
            weights = _Weights.of(self.model, self.tp_group)
            longest = max(len(p) for p in prompts) + params.max_new_tokens
            if longest > weights.rope_cache.shape[0]:
                raise ValueError(
                    f"prompt + max_new_tokens = {longest} tokens exceed the model's "
                    f"max_seq_len = {weights.rope_cache.shape[0]}"
                )
            return self._generate(weights, prompts, params)

    def _generate(
        self, w: _Weights, prompts: list[list[int]], params: SamplingParams
    ) -> list[Completion]:
        device = w.embedding.device
        batch, max_new = len(prompts), params.max_new_tokens
        prompt_len = max(len(p) for p in prompts)
        pad_len = torch.tensor([prompt_len - len(p) for p in prompts], device=device)
        tokens = torch.full((batch, prompt_len), PAD_ID, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, prompt_len - len(prompt) :] = torch.tensor(prompt)
        tokens = tokens.to(device)

        generator = torch.Generator(device=device).manual_seed(params.seed)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        out_tokens = torch.full((batch, max_new), PAD_ID, dtype=torch.long, device=device)
        out_logp = torch.zeros(batch, max_new, dtype=torch.float32, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        texts = [[] for _ in prompts] if params.stop_strings else None

        cache = _KVCache(w, batch, prompt_len + max_new, w.embedding.dtype, device)
        t0 = last_log = time.perf_counter()
        logits = _logits(w, _forward(w, tokens, 0, pad_len, cache)[:, -1])  # prefill
        for step in range(max_new):
            running = ~stopped
            token = sample_tokens(logits, params, generator)
            if w.tp_group is not None:  # identical tokens on every TP rank
                dist.broadcast(token, group=w.tp_group, group_src=0)
            # The behaviour policy's own log-prob (temperature 1, no filtering).
            logp = logits.gather(-1, token[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)
            token = token.masked_fill(stopped, PAD_ID)
            out_tokens[:, step] = token
            out_logp[:, step] = logp.masked_fill(stopped, 0.0)
            lengths += running.long()
            stopped |= running & torch.isin(token, stop_ids)
            if texts is not None:
                stopped |= self._stop_string_hits(texts, token, running & ~stopped, params)
            if step == max_new - 1 or bool(stopped.all()):
                break
            if time.perf_counter() - last_log >= self.progress_every_s:
                last_log = time.perf_counter()
                _log_progress(t0, lengths, stopped, step + 1, max_new)
            # A self-speculative mode would draft here with the MTP modules and verify the
            # drafts with one multi-token _forward call.
            h = _forward(w, token[:, None], prompt_len + step, pad_len, cache)
            logits = _logits(w, h[:, -1])
        if time.perf_counter() - t0 >= self.progress_every_s:  # a summary of long rollouts
            _log_progress(t0, lengths, stopped, step + 1, max_new)
        return self._completions(prompts, out_tokens, out_logp, lengths, stopped)

    def _stop_string_hits(
        self,
        texts: list[list[int]],
        token: torch.Tensor,
        candidates: torch.Tensor,
        params: SamplingParams,
    ) -> torch.Tensor:
        """Rows whose decoded response now contains a stop string (a Python loop over rows)."""
        hits = torch.zeros_like(candidates)
        for row in candidates.nonzero().flatten().tolist():
            texts[row].append(int(token[row]))
            text = self.tokenizer.decode(texts[row])
            if any(s in text for s in params.stop_strings):
                hits[row] = True
        return hits

    @staticmethod
    def _completions(prompts, out_tokens, out_logp, lengths, stopped) -> list[Completion]:
        out_tokens, out_logp = out_tokens.cpu().tolist(), out_logp.cpu().tolist()
        lengths, stopped = lengths.cpu().tolist(), stopped.cpu().tolist()
        return [
            Completion(
                prompt_ids=list(prompt),
                token_ids=out_tokens[row][: lengths[row]],
                logprobs=out_logp[row][: lengths[row]],
                finish_reason="stop" if stopped[row] else "length",
            )
            for row, prompt in enumerate(prompts)
        ]
