"""KV-cache decoding through the model's own modules: the native rollout engine's forward.

``Decoder`` runs ``MTPTransformer``'s own module classes (``TransformerBlock`` and its
``Attention``, ``MTPModule``, ``TokenEmbedding``, the norms) with the training forward's
code, step by step. The only decode-only code is the KV-cache branch of
``Attention.forward``, so a change to the model is a change to generation.

    trunk step:   h^0 = blocks(Emb(t)) at positions p, each block writing its cache at p;
                  logits = output(norm(h^0))
    MTP module k: h^k = mtp[k](h^{k-1}, Emb(t_{i+k}), zero at position 0 when the model
                  masks it); logits^k = output(norm_k(h^k))

Why a copy of the module tree: the training model may be wrapped for training. FSDP2
gathers and reshards around every call, tensor parallelism turns block inputs into
sequence-sharded DTensors, and activation checkpointing and torch.compile wrap the
blocks; none of that suits a step of a few tokens. So the decoder builds the same module
tree once, on the meta device and without wrappers, and for one generation binds it to
the model's weights: the parameters themselves (plain model), the unsharded parameters
(FSDP2, between ``unshard()`` and ``reshard()``), or this rank's shards (TP: its heads
and hidden units; norms, embedding, ``eh_proj`` and head are replicated). Parallelism is
applied from outside, as in training: under TP the row-parallel projections
(``attention.wo``, ``feed_forward.w2``) all-reduce their partial sums. The copy differs
from the model only where torch's own math is kept: its linear layers, and the head's
``F.linear``, are ``FewRowsLinear`` (weight-stationary for a few rows on CPU, and the TP
all-reduce), and having no hooks, its modules are called without ``nn.Module``'s call
machinery (``_direct_calls``).

The KV cache is static: ``KVCache`` preallocates [B, n_kv_heads_local, L, head_dim] per
layer, indexed by token position per row. A step writes its T tokens at their positions
[B, T] (a scatter, so rows may advance by different numbers of tokens) and attends to
cache positions 0 .. end - 1 under a mask: query at position p sees keys 0 .. p of its
row, so stale entries (prompt padding, rejected drafts) are never read before they are
overwritten. ``end`` = L gives every step of a kind the same shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from .args import MTPModelArgs
from .model import MTPTransformer, rope_at

__all__ = ["Decoder", "FewRowsLinear", "KVCache"]

SMALL_ROWS = 4
"""Up to this many rows, block linear layers run weight-stationary (``FewRowsLinear``)."""

HEAD_SMALL_ROWS = 64
"""Up to this many rows, the [V, D] output head runs weight-stationary."""


class FewRowsLinear(nn.Module):
    """A linear layer of the decode copy: x [..., in] -> [..., out] with the bound ``weight``
    [out, in] and ``bias`` [out] | None.

    Decode steps and verification multiply a few rows. On CPU BLAS (MKL), for up to
    ``max_rows`` rows, ``weight @ x^T`` (weight-stationary: the weight is streamed once,
    not packed) is faster than ``F.linear``'s ``x @ weight^T``: 20-45% for 2-4 rows at
    SmolLM2's block shapes (equal for 1 row, slower from about 8), and 2-3x for 2-8 rows of
    the 49152 x 576 head (up to 64 rows). This keeps the marginal cost of a verified draft
    low. With ``reduce_group`` set the layer is row-parallel (bias-free): its output, a
    partial sum, is all-reduced over the group.
    """

    def __init__(self, max_rows: int):
        super().__init__()
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.max_rows = max_rows
        self.reduce_group: dist.ProcessGroup | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.numel() > self.max_rows * shape[-1] or not x.is_cpu:
            out = F.linear(x, self.weight, self.bias)
        else:
            out = torch.mm(self.weight, x.reshape(-1, shape[-1]).t()).t().reshape(*shape[:-1], -1)
            if self.bias is not None:
                out = out + self.bias
        if self.reduce_group is not None:
            out = out.contiguous()
            dist.all_reduce(out, group=self.reduce_group)
        return out


class KVCache:
    """Keys and values of one attention layer, preallocated: [B, n_kv_heads, L, head_dim]
    each, indexed by token position per row."""

    def __init__(self, batch: int, n_kv_heads: int, length: int, head_dim: int, dtype, device):
        shape = (batch, n_kv_heads, length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.rows = torch.arange(batch, device=device)[:, None]  # [B, 1]

    def update(
        self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, T, n_kv_heads, head_dim] at positions [B, T]; the whole cache.

        An ``index_put_`` (cache[b, :, positions[b, t]] = k[b, t]), which inductor updates in
        place; a ``scatter_`` into the transposed cache would be compiled as copies of the
        whole cache, and is slower in eager mode too (CPU, 1 to 64 rows)."""
        self.k[self.rows, :, positions] = k
        self.v[self.rows, :, positions] = v
        return self.k, self.v


class Decoder:
    """The model's modules without wrappers, for KV-cache decoding (see the module docstring).

    Args:
        args: the model's arguments.
        num_mtp: the MTP modules to decode with (the first ``num_mtp`` of the model's).
        tp_group: the tensor-parallel group; found from the DTensor weights when None.
    """

    def __init__(self, args: MTPModelArgs, num_mtp: int, tp_group: dist.ProcessGroup | None = None):
        args = dataclasses.replace(args, num_mtp_modules=num_mtp)
        with torch.device("meta"):
            model = MTPTransformer(args)
        names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear:
                model.set_submodule(name, FewRowsLinear(SMALL_ROWS))
        # The head's logits path is F.linear (OutputHead with labels=None).
        model.output = FewRowsLinear(HEAD_SMALL_ROWS)
        # Every parameter becomes a plain attribute, bound per generation: (module,
        # attribute, name in the training model).
        self._slots = []
        for name in names:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            delattr(module, attr)
            setattr(module, attr, None)
            self._slots.append((module, attr, name))
        _direct_calls(model)
        self.model, self.args = model, args
        self._blocks = [*model.layers.values(), *(m.block for m in model.mtp.values())]
        self._tp_group = tp_group
        self.tp_group: dist.ProcessGroup | None = None
        """The tensor-parallel group while bound to a TP model; None otherwise."""
        self._rope: torch.Tensor | None = None
        self.trunk_caches: list[KVCache] = []
        self.mtp_caches: list[KVCache] = []

    @contextlib.contextmanager
    def bound(self, model: nn.Module, batch: int, length: int) -> Iterator[Decoder]:
        """Bind to ``model``'s weights under no_grad, with KV caches for ``batch`` rows of
        ``length`` positions; every FSDP2 module is unsharded meanwhile and resharded on
        exit (the public FSDP2 API, which is not recursive, hence every module)."""
        fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        try:
            with torch.no_grad():
                for module in fsdp_modules:
                    module.unshard()
                self._bind(model)
                self._allocate(batch, length)
                yield self
        finally:
            self._release()
            for module in reversed(fsdp_modules):
                module.reshard()

    @property
    def embedding(self) -> torch.Tensor:
        """The bound embedding [V, D]: its dtype and device are the decoder's."""
        return self.model.tok_embeddings.weight

    def trunk(
        self, tokens: torch.Tensor, positions: torch.Tensor, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] at positions [B, T] (all < ``end``) -> (h^0 [B, T, D] before the
        final norm, norm(h^0)), writing the trunk's KV cache."""
        rope, mask = self._rope_and_mask(positions, end)
        h = self.model.tok_embeddings(tokens)
        for layer, cache in zip(self.model.layers.values(), self.trunk_caches, strict=True):
            h = layer(h, rope, mask, positions, kv_cache=cache)
        return h, self.model.norm(h)

    def mtp(
        self, k: int, h_prev: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module k (1-based) at positions i [B, T]: h^{k-1} [B, T, D] and the tokens
        t_{i+k} [B, T] -> (h^k [B, T, D], norm_k(h^k)), writing the module's KV cache."""
        rope, mask = self._rope_and_mask(positions, end)
        emb = self.model.tok_embeddings(tokens, self.model.mtp_embedding_zeros(tokens, positions))
        return self.model.mtp[str(k - 1)](
            h_prev, emb, rope, positions, attention_masks=mask, kv_cache=self.mtp_caches[k - 1]
        )

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """float32 logits [..., V] of normalised hidden states [..., D]."""
        return self.model.output(normed).float()

    def _rope_and_mask(
        self, positions: torch.Tensor, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE at positions [B, T] (``rope_at``) and the additive attention mask [B, 1, T,
        end]: the query at position p attends to cache positions 0..p. Both once per step
        for all blocks (a bool mask would be converted in every block)."""
        dtype, (batch, new) = self.embedding.dtype, positions.shape
        # Drafts past max_seq_len are never emitted: they reuse the last rotation.
        rope_positions = positions.clamp(max=self._rope.shape[0] - 1)
        rope = rope_at(self._rope, rope_positions, new).to(dtype)
        keys = torch.arange(end, device=positions.device)
        mask = torch.zeros(batch, 1, new, end, dtype=dtype, device=positions.device)
        return rope, mask.masked_fill_(keys > positions[:, None, :, None], float("-inf"))

    def mark_length_dynamic(self) -> None:
        """Compile the caches' length dimension as a symbol (``torch.compile``): one graph
        serves every cache length."""
        for cache in (*self.trunk_caches, *self.mtp_caches):
            torch._dynamo.maybe_mark_dynamic(cache.k, 2)
            torch._dynamo.maybe_mark_dynamic(cache.v, 2)

    def _bind(self, model: nn.Module) -> None:
        for module, attr, name in self._slots:
            # getattr, not get_submodule: checkpoint and compile wrappers forward attributes.
            weight = functools.reduce(getattr, name.split("."), model)
            if isinstance(weight, DTensor):
                weight = weight.to_local()
            setattr(module, attr, weight.detach())
        self._rope = model.rope_cache
        self.tp_group = None
        local_q = self.model.layers["0"].attention.wq.weight.shape[0]
        if local_q != self.args.n_heads * self.args.head_dim:  # column-sharded: TP
            wq = model.layers["0"].attention.wq.weight
            self.tp_group = self._tp_group or _tp_group_of(wq)
        for block in self._blocks:  # row-parallel under TP: partial sums
            block.attention.wo.reduce_group = self.tp_group
            block.feed_forward.w2.reduce_group = self.tp_group

    def _allocate(self, batch: int, length: int) -> None:
        attn = self.model.layers["0"].attention
        n_kv_heads = attn.wk.weight.shape[0] // attn.head_dim  # local under TP
        weight = self.embedding

        def cache() -> KVCache:
            return KVCache(batch, n_kv_heads, length, attn.head_dim, weight.dtype, weight.device)

        self.trunk_caches = [cache() for _ in self.model.layers]
        self.mtp_caches = [cache() for _ in self.model.mtp]

    def _release(self) -> None:
        for module, attr, _ in self._slots:
            setattr(module, attr, None)
        self._rope, self.trunk_caches, self.mtp_caches = None, [], []


@functools.cache
def _direct_call_class(cls: type[nn.Module]) -> type[nn.Module]:
    return type(cls.__name__, (cls,), {"__call__": cls.forward})


def _direct_calls(model: nn.Module) -> None:
    """Strip ``nn.Module``'s call and lookup machinery from the hook-free decode copy: each
    module's call is its ``forward`` (a subclass, as FSDP2 swaps classes) and submodules
    are plain attributes too. On CPU these cost about 1 and 0.5 us a time, 20 times per
    block and step; the model itself is never touched."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            object.__setattr__(module, name, child)
        module.__class__ = _direct_call_class(type(module))


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
