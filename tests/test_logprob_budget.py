"""Log-probs by token budget (``vocab_stats``) against naive full logits: values and
gradients, alone and through the model's output head (alignment, Detach, entropy)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from torchtitan_mtp.models import MTPTransformer, mtp_flavors, token_logprobs
from torchtitan_mtp.models.logprobs import (
    IGNORE_INDEX,
    align_to_targets,
    head_targets,
    target_mask,
    vocab_stats,
)

N, D, V = 37, 16, 50


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one intra-op thread (see conftest)."""


def naive(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """hidden [..., D], weight [V, D], labels [...] -> logp, entropy, top1 [...], from
    every float32 logit at once."""
    logits = F.linear(hidden, weight).float()
    logp = logits.log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    top1 = logits.argmax(dim=-1) == labels
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), entropy, top1


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen)
    weight = torch.randn(V, D, generator=gen)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[:3] = F.linear(hidden[:3], weight).argmax(dim=-1)  # some top-1 hits
    return hidden, weight, labels, torch.randn(N, generator=gen), torch.randn(N, generator=gen)


@pytest.mark.parametrize("budget", [1, 7, 37, 64])
@pytest.mark.parametrize("use", ["logp", "entropy", "both"])
def test_token_budget_equals_naive_full_logits_values_and_gradients(budget, use):
    hidden, weight, labels, g_logp, g_ent = inputs()
    results = []
    for fn in (naive, lambda h, w, y: vocab_stats(h, w, y, budget, entropy=True)):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp, entropy, top1 = fn(h, w, labels)
        loss = (logp * g_logp).sum() if use != "entropy" else 0
        loss = loss + ((entropy * g_ent).sum() if use != "logp" else 0)
        loss.backward()
        results.append((logp, entropy, top1, h.grad, w.grad))
    (logp, entropy, top1, dh, dw), expected = results[1], results[0]
    assert top1.dtype == torch.bool and torch.equal(top1, expected[2]) and top1[:3].all()
    for got, want in zip((logp, entropy, dh, dw), expected[:2] + expected[3:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_without_entropy_the_weight_gradient_is_skipped_for_a_detached_weight():
    hidden, weight, labels, g_logp, _ = inputs(1)
    h = hidden.clone().requires_grad_(True)
    stats = vocab_stats(h, weight.detach(), labels, 5)
    assert stats.entropy is None
    (stats.logp * g_logp).sum().backward()
    h_ref = hidden.clone().requires_grad_(True)
    (naive(h_ref, weight, labels)[0] * g_logp).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_equals_naive_under_the_same_autocast():
    hidden, weight, labels, g_logp, g_ent = inputs(2)
    results = []
    for fn in (naive, lambda h, w, y: vocab_stats(h, w, y, 8, entropy=True)):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, entropy, _ = fn(h, w, labels)
        ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
        assert logp.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
        results.append((logp, entropy, h.grad, w.grad))
    for got, want in zip(*results[::-1], strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("detach", [False, True])
def test_model_logprobs_by_budget_equal_naive_aligned_with_the_same_gradients(detach):
    args = dataclasses.replace(
        mtp_flavors["debug"], vocab_size=V, max_seq_len=16, num_mtp_modules=2
    )
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (3, 10), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[2, 6:] = IGNORE_INDEX  # padding
    g_logp = torch.randn(3, 3, 9, generator=gen)
    g_ent = torch.randn(3, 9, generator=gen)
    grads = []
    for budget in (None, 4):
        torch.manual_seed(0)
        model = MTPTransformer(dataclasses.replace(args, logprob_chunk_tokens=budget or 512))
        model.init_weights()
        hidden = model(tokens[:, :-1], detach_mtp_inputs=detach)
        if budget is None:  # naive: full logits, head k's weight detached under Detach
            targets = head_targets(labels, 3).clamp(min=0)
            weights = [model.output.weight] + [
                model.output.weight.detach() if detach else model.output.weight
            ] * 2
            per_head = [naive(h, w, y) for h, w, y in zip(hidden, weights, targets, strict=True)]
            logp = align_to_targets(torch.stack([s[0] for s in per_head]), 0.0)
            entropy = per_head[0][1]
            mask = target_mask(labels, 3, None)
        else:
            stats = token_logprobs(model, hidden, labels, detach_mtp_head=detach, entropy=True)
            logp, entropy, mask = stats.logp, stats.entropy, stats.mask
        loss = (torch.where(mask, logp, 0.0) * g_logp).sum() + (
            torch.where(mask[0], entropy, 0.0) * g_ent
        ).sum()
        loss.backward()
        grads.append(
            (torch.where(mask, logp, 0.0).detach(), torch.where(mask[0], entropy, 0.0).detach())
            + tuple(p.grad for p in model.parameters())
        )
    for got, want in zip(grads[1], grads[0], strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
