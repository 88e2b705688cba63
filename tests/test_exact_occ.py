"""Exact OCC, the draft objective and the gradient estimators against hand computations,
on a tiny real model: one process, and two FSDP ranks on gloo."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from conftest import run_two_ranks

from torchtitan_mtp.config import RL
from torchtitan_mtp.losses import policy_loss
from torchtitan_mtp.models import MTPTransformer, mtp_flavors, token_logprobs
from torchtitan_mtp.models.logprobs import IGNORE_INDEX, target_mask
from torchtitan_mtp.rl.exact import (
    apply_exact_gradients,
    exact_products,
    shared_parameter_ids,
)
from torchtitan_mtp.rl.objective import RLObjective, RolloutBatch
from torchtitan_mtp.rl.occ import OCCCalibrator

K, ROWS, BETA = 2, 4, 0.7


def make_model(seed: int = 0) -> MTPTransformer:
    torch.manual_seed(seed)
    args = dataclasses.replace(mtp_flavors["debug"], vocab_size=64, num_mtp_modules=K)
    model = MTPTransformer(args)
    model.init_weights()
    return model


def make_batch(model: MTPTransformer) -> RolloutBatch:
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 64, (ROWS, 10), generator=gen)
    labels = torch.full((ROWS, 10), IGNORE_INDEX)
    labels[:, 3:] = torch.randint(0, 64, (ROWS, 7), generator=gen)
    labels[1, 8:] = IGNORE_INDEX
    with torch.no_grad():
        logp = token_logprobs(model, model(inputs), labels).logp
    old = logp[0] + 0.3 * torch.randn(ROWS, 10, generator=gen)  # the policy has moved
    adv = torch.tensor([1.0, -0.5, 0.8, -1.3])[:, None].expand(ROWS, 10)
    adv = (adv * (labels != IGNORE_INDEX)).float()
    return RolloutBatch(inputs, labels, adv, old.clone(), old_logp=old,
                        old_mtp_logp=logp[1:].transpose(0, 1) - 0.05)  # fmt: skip


def global_counts(batch: RolloutBatch) -> dict[str, torch.Tensor]:
    mask = target_mask(batch.labels, K + 1, None)
    return {"tokens": mask.sum(dim=(1, 2)).float(), "seqs": mask.any(dim=2).sum(dim=1).float()}


def make_objective(regime="occ", estimator="exact", draft="none", lam=None) -> RLObjective:
    calibrator = OCCCalibrator(base=0.15, estimator=estimator, beta=BETA, apply_to="loss",
                               clamp_min=lam, clamp_max=lam)  # fmt: skip
    return RLObjective(RL(), regime, K, 0.15, calibrator, draft_loss=draft)


def hand_lambda(model: MTPTransformer, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """beta <g, g_k> / ||g_k||^2 and <g, g_k> over non-MTP parameters, by autograd.grad."""
    shared = [p for n, p in model.named_parameters() if not n.startswith("mtp.")]
    stats = token_logprobs(model, model(batch.inputs), batch.labels)
    counts = global_counts(batch)

    def surrogate(k):
        tokens, seqs = counts["tokens"][k], counts["seqs"][k]
        return policy_loss(stats.logp[k], batch.old_logp, batch.advantages, stats.mask[k],
                           global_tokens=tokens, global_seqs=seqs)[0]  # fmt: skip

    g = torch.autograd.grad(surrogate(0), shared, retain_graph=True, allow_unused=True)
    lams, inners = [], []
    for k in range(1, K + 1):
        g_k = torch.autograd.grad(surrogate(k), shared, retain_graph=True, allow_unused=True)
        pairs = [(a, b) for a, b in zip(g, g_k, strict=True) if a is not None and b is not None]
        inner = sum(float((a.double() * b.double()).sum()) for a, b in pairs)
        sq = sum(float((b.double() ** 2).sum()) for b in g_k if b is not None)
        lams.append(BETA * inner / sq)
        inners.append(inner)
    return torch.tensor(lams, dtype=torch.float64), torch.tensor(inners, dtype=torch.float64)


def micro_batches(batch: RolloutBatch, rows) -> list[RolloutBatch]:
    return [batch.select(slice(lo, hi)) for lo, hi in rows]


def test_exact_lambda_equals_a_hand_computation_over_shared_parameters():
    model = make_model()
    batch = make_batch(model)
    want, inner = hand_lambda(model, batch)
    # two micro-batches: the passes accumulate over them like an update does
    products = exact_products(model, make_objective(), micro_batches(batch, [(0, 1), (1, 4)]),
                              global_counts(batch))  # fmt: skip
    torch.testing.assert_close(products.inner, inner, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(products.coefficient(BETA), want, rtol=1e-4, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())  # left zeroed
    # the groups partition the shared parameters
    total = sum(products.groups[g][0] for g in ("output", "embedding", "trunk"))
    torch.testing.assert_close(total, products.inner, rtol=1e-6, atol=1e-12)
    assert (products.cosine.abs() <= 1).all()


def test_exact_gradients_equal_the_loss_with_lambda_applied_to_it():
    model = make_model()
    batch = make_batch(model)
    counts = global_counts(batch)
    products = exact_products(model, make_objective(), [batch], counts)
    lam = products.coefficient(BETA).float()
    apply_exact_gradients(model, products, lam)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # the same update as the OCC loss with lambda_k fixed (one clamp per head)
    model.zero_grad(set_to_none=True)
    for k in range(K):
        obj = make_objective(estimator="ratio_of_means", lam=float(lam[k]))
        head = obj(model, batch, counts, part=k + 1)
        (lam[k] * head).backward()
    make_objective(estimator="ratio_of_means")(model, batch, counts, part="main").backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-8, msg=name)


def test_the_draft_objective_puts_no_gradient_on_shared_parameters():
    model = make_model()
    batch = make_batch(model)
    counts = global_counts(batch)
    grads = {}
    for draft in ("none", "ce"):
        model.zero_grad(set_to_none=True)
        objective = make_objective("policy", draft=draft)
        log = objective.new_stats()
        objective(model, batch, counts, log).backward()
        grads[draft] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert log.draft_loss[0] > 0 and log.draft_loss[1] > 0
    for name in grads["ce"]:
        if name.startswith("mtp."):
            continue
        torch.testing.assert_close(grads["ce"][name], grads["none"][name], msg=name)
    changed = [n for n in grads["ce"] if not torch.equal(grads["ce"][n], grads["none"][n])]
    assert changed and all(n.startswith("mtp.") for n in changed)
    assert any(".block." in n for n in changed) and any("eh_proj" in n for n in changed)


def test_output_grad_estimator_is_the_exact_product_over_the_output_head():
    model = make_model()
    batch = make_batch(model)
    counts = global_counts(batch)
    objective = make_objective("occ", estimator="output_grad")
    objective.output_grad = True
    with torch.no_grad():
        objective(model, batch, counts, objective.new_stats())
    sums = objective.records[-1]["sums"]
    products = exact_products(model, make_objective(), [batch], counts)
    inner, sq = products.groups["output"]
    torch.testing.assert_close(sums["out_inner"].double(), inner, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(sums["out_sq"].double(), sq, rtol=1e-4, atol=1e-10)
    want = (BETA * inner / sq).float()
    torch.testing.assert_close(objective.records[-1]["applied"], want, rtol=1e-4, atol=1e-8)


def test_shared_parameters_are_everything_outside_the_mtp_modules():
    model = make_model()
    names = {id(p): n for n, p in model.named_parameters()}
    shared = {names[i] for i in shared_parameter_ids(model)}
    assert "output.weight" in shared and "tok_embeddings.weight" in shared
    assert "layers.0.attention.wq.weight" in shared and "norm.weight" in shared
    assert not any(n.startswith("mtp.") for n in shared)


# ---- two FSDP ranks on gloo: global products, the same lambda on every rank ----


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan_mtp.models.parallelize import apply_fsdp

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = make_model()
        batch = make_batch(model)
        counts = global_counts(batch)  # global: over both ranks' rows
        mine = batch.select(slice(2 * rank, 2 * rank + 2))
        apply_fsdp(model, init_device_mesh("cpu", (2,)), torch.float32, torch.float32)
        objective = make_objective(draft="ce")
        objective.calibrator.group = dist.group.WORLD
        products = exact_products(model, objective, [mine], counts)
        lam = products.coefficient(BETA)
        apply_exact_gradients(model, products, lam.float())
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        estimator = make_objective(estimator="output_grad")
        estimator.calibrator.group, estimator.output_grad = dist.group.WORLD, True
        with torch.no_grad():
            estimator(model, mine, counts, estimator.new_stats())
        torch.save({"lambda": lam, "inner": products.inner, "grads": grads,
                    "output_grad": estimator.records[-1]}, f"{out}.{rank}")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_exact_lambda_and_update_are_the_same_on_two_fsdp_ranks_as_on_one_process(tmp_path):
    ranks = run_two_ranks(_fsdp_worker, tmp_path)

    model = make_model()
    batch = make_batch(model)
    products = exact_products(model, make_objective(draft="ce"), [batch], global_counts(batch))
    lam = products.coefficient(BETA)
    apply_exact_gradients(model, products, lam.float())
    for rank in ranks:
        torch.testing.assert_close(rank["lambda"], lam, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(rank["inner"], products.inner, rtol=1e-4, atol=1e-10)
        for name, p in model.named_parameters():  # incl. the draft pass through FSDP units
            torch.testing.assert_close(rank["grads"][name], p.grad, rtol=1e-4, atol=1e-7,
                                       msg=name)  # fmt: skip
    assert torch.equal(ranks[0]["lambda"], ranks[1]["lambda"])
    # the output_grad estimator: G all-reduced before the products, same lambda everywhere
    inner, sq = products.groups["output"]
    for rank in ranks:
        record = rank["output_grad"]["sums"]
        torch.testing.assert_close(record["out_inner"].double(), inner, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(record["out_sq"].double(), sq, rtol=1e-4, atol=1e-10)
    assert torch.equal(ranks[0]["output_grad"]["applied"], ranks[1]["output_grad"]["applied"])


@pytest.mark.parametrize("estimator", ["exact", "output_grad"])
def test_gradient_estimators_scale_by_beta_not_by_c(estimator):
    model = make_model()
    batch = make_batch(model)
    counts = global_counts(batch)
    lams = []
    for beta in (1.0, 2.0):
        objective = make_objective(estimator="output_grad")
        objective.calibrator.beta = beta
        objective.output_grad = True
        if estimator == "exact":
            lams.append(exact_products(model, objective, [batch], counts).coefficient(beta))
        else:
            with torch.no_grad():
                objective(model, batch, counts, objective.new_stats())
            lams.append(objective.records[-1]["applied"].double())
    torch.testing.assert_close(lams[1], 2 * lams[0])
