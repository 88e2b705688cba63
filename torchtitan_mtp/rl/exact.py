"""Exact OCC (OCC_SPEC §3, "the exact optimum") from real gradients of one mini-batch.

    lambda*_k = beta <g, g_m^k> / ||g_m^k||^2

with ``g`` minus the gradient of the main objective (surrogate, KL, entropy) and ``g_m^k``
minus the gradient of head k's regime loss (``L_PG^k`` for policy/occ, ``CE_k`` for
detach/ce), both over the parameters the MTP loss SHARES with the main objective (trunk,
embedding, output head): J does not depend on MTP-only parameters, so g is zero there
and the penalty term lives on the shared parameters only.

Cost: K + 1 forward/backward passes over the mini-batch (one per loss term). With the
"exact" estimator these passes replace the usual one: the update's gradient is set to
``grad(main) + sum_k lambda_k grad(head k)`` (lambda scaling the loss), so exact OCC costs
K extra passes per mini-batch. Under FSDP the gradients after backward are sums over
the data-parallel ranks (losses are normalised by global counts) and every product is
reduced over the shards (``DTensor.full_tensor``), so every rank gets the same lambda.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .objective import Part, RLObjective, RolloutBatch
from .occ import exact_coefficient
from .stats import UpdateStats

__all__ = [
    "PARAMETER_GROUPS",
    "ExactProducts",
    "apply_exact_gradients",
    "exact_products",
    "grad_dot",
    "shared_parameter_ids",
    "term_gradients",
]

PARAMETER_GROUPS = ("output", "embedding", "trunk")
"""Sub-groups of the shared parameters whose products are reported separately."""

Grads = list[torch.Tensor | None]


def shared_parameter_ids(model: nn.Module, group: str | None = None) -> set[int]:
    """ids of the trainable parameters outside the MTP modules (``mtp.*``), or of one
    ``group``: "output" (the output head), "embedding", "trunk" (blocks and final norm).
    A tied output head / embedding appears once (under the embedding's name)."""
    prefixes = {"output": "output.", "embedding": "tok_embeddings."}
    ids = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith("mtp."):
            continue
        if group is None:
            ids.add(id(p))
        elif group in prefixes and name.startswith(prefixes[group]):
            ids.add(id(p))
        elif group == "trunk" and not name.startswith(tuple(prefixes.values())):
            ids.add(id(p))
    return ids


def term_gradients(
    model: nn.Module,
    objective: RLObjective,
    micro: list[RolloutBatch],
    counts: dict[str, torch.Tensor],
    part: Part,
    log: UpdateStats | None = None,
    device: torch.device | str = "cpu",
) -> Grads:
    """Gradients of one ``part`` of the objective over the mini-batch's micro-batches:
    clones of ``.grad`` in ``model.parameters()`` order (sharded DTensors under FSDP).
    The model's gradients are left zeroed (None)."""
    model.zero_grad(set_to_none=True)
    for mb in micro:
        objective(model, mb.to(device), counts, log, part=part).backward()
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def grad_dot(model: nn.Module, a: Grads, b: Grads, ids: set[int]) -> float:
    """Global <a, b> over the parameters whose id is in ``ids`` (DTensor shards reduced)."""
    total = 0.0
    for p, x, y in zip(model.parameters(), a, b, strict=True):
        if id(p) in ids and x is not None and y is not None:
            d = (x.float() * y.float()).sum()
            total += float(d.full_tensor() if hasattr(d, "full_tensor") else d)
    return total


@dataclass
class ExactProducts:
    """Gradient products of one mini-batch; tensors are [K] float64 unless stated."""

    inner: torch.Tensor
    """<g, g_m^k> over the shared parameters."""
    sq_norm: torch.Tensor
    """||g_m^k||^2 over the shared parameters."""
    main_sq_norm: float
    """||g||^2 over the shared parameters."""
    groups: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """(inner, sq_norm) over each of ``PARAMETER_GROUPS``."""
    main: Grads
    """The main objective's gradients (all parameters, incl. the draft objective's)."""
    heads: list[Grads]
    """Head k's regime-loss gradients (all parameters)."""

    def coefficient(self, beta: float, eps: float = 1e-8) -> torch.Tensor:
        """lambda*_k [K]."""
        return exact_coefficient(self.inner, self.sq_norm, beta, eps)

    @property
    def cosine(self) -> torch.Tensor:
        """cos(g, g_m^k) [K]; 0 where either gradient is 0."""
        denom = (self.sq_norm * self.main_sq_norm).sqrt()
        return torch.where(denom > 0, self.inner / denom.clamp(min=1e-300), 0.0)


def exact_products(
    model: nn.Module,
    objective: RLObjective,
    micro: list[RolloutBatch],
    counts: dict[str, torch.Tensor],
    log: UpdateStats | None = None,
    device: torch.device | str = "cpu",
) -> ExactProducts:
    """K + 1 forward/backward passes -> ``ExactProducts``; ``log`` goes to the main pass
    (metrics and OCC records, when it replaces the usual pass)."""
    heads = [
        term_gradients(model, objective, micro, counts, k, None, device)
        for k in range(1, objective.num_mtp + 1)
    ]
    main = term_gradients(model, objective, micro, counts, "main", log, device)
    shared = shared_parameter_ids(model)

    def products(ids: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
        inner = [grad_dot(model, main, h, ids) for h in heads]
        sq = [grad_dot(model, h, h, ids) for h in heads]
        return torch.tensor(inner, dtype=torch.float64), torch.tensor(sq, dtype=torch.float64)

    inner, sq = products(shared)
    return ExactProducts(
        inner=inner,
        sq_norm=sq,
        main_sq_norm=grad_dot(model, main, main, shared),
        groups={g: products(shared_parameter_ids(model, g)) for g in PARAMETER_GROUPS},
        main=main,
        heads=heads,
    )


def apply_exact_gradients(
    model: nn.Module, products: ExactProducts, coefficients: torch.Tensor
) -> None:
    """Set every parameter's ``.grad`` to ``grad(main) + sum_k lambda_k grad(head k)``."""
    for p, grad, *per_head in zip(model.parameters(), products.main, *products.heads, strict=True):
        for lam, g_k in zip(coefficients.tolist(), per_head, strict=True):
            if g_k is not None:
                grad = lam * g_k if grad is None else grad + lam * g_k
        p.grad = grad
