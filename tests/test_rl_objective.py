"""The RL objective under the four MTP regimes (OCC_SPEC §2), on a tiny real model."""

import dataclasses

import pytest
import torch

from torchtitan_mtp.config import RL
from torchtitan_mtp.models import MTPTransformer, mtp_flavors, token_logprobs
from torchtitan_mtp.models.logprobs import IGNORE_INDEX, target_mask
from torchtitan_mtp.rl.objective import RLObjective, RolloutBatch
from torchtitan_mtp.rl.occ import OCCCalibrator

K = 2


def model_and_batch(seed: int = 0) -> tuple[MTPTransformer, RolloutBatch, dict]:
    torch.manual_seed(seed)
    args = dataclasses.replace(mtp_flavors["debug"], vocab_size=64, num_mtp_modules=K)
    model = MTPTransformer(args)
    model.init_weights()
    inputs = torch.randint(0, 64, (4, 10))
    labels = torch.full((4, 10), IGNORE_INDEX)
    labels[:, 3:] = torch.randint(0, 64, (4, 7))  # the response
    labels[1, 8:] = IGNORE_INDEX  # a shorter response
    with torch.no_grad():
        logp = token_logprobs(model, model(inputs), labels).logp[0]
    # The policy moved since the rollout: old log-probs differ from the current ones.
    old = logp + 0.3 * torch.randn(4, 10)
    adv = torch.tensor([1.0, -0.5, 0.8, -1.3])[:, None].expand(4, 10) * (labels != IGNORE_INDEX)
    batch = RolloutBatch(inputs, labels, adv.float(), old.clone(), old_logp=old)
    mask = target_mask(labels, K + 1, None)
    counts = {"tokens": mask.sum(dim=(1, 2)).float(), "seqs": mask.any(dim=2).sum(dim=1).float()}
    return model, batch, counts


def objective(regime: str, base: float = 0.1, clamp: float | None = None) -> RLObjective:
    calibrator = OCCCalibrator(base=base, clamp_min=clamp, clamp_max=clamp)
    return RLObjective(RL(), regime, K, base, calibrator)


def mtp_term_grads(regime: str) -> dict[str, torch.Tensor | None]:
    model, batch, counts = model_and_batch()
    obj = objective(regime)
    detach = regime == "detach"
    stats = token_logprobs(
        model,
        model(batch.inputs, detach_mtp_inputs=detach),
        batch.labels,
        detach_mtp_head=detach,
    )
    obj.mtp_term(stats, batch, counts, obj.new_stats()).backward()
    return {name: p.grad for name, p in model.named_parameters()}


# (The trunk's final norm is not on the MTP path: module 1 reads h^0 before it.)
TRUNK = ("tok_embeddings.weight", "layers.0.attention.wq.weight", "output.weight")


def test_detach_mtp_term_puts_no_gradient_on_the_trunk():
    grads = mtp_term_grads("detach")
    for name, grad in grads.items():
        if name.startswith("mtp."):
            assert grad is not None and grad.abs().sum() > 0, name
        else:
            assert grad is None or grad.abs().sum() == 0, name


@pytest.mark.parametrize("regime", ["ce", "policy", "occ"])
def test_joint_regimes_mtp_term_reaches_the_trunk(regime):
    grads = mtp_term_grads(regime)
    for name in TRUNK:
        assert grads[name] is not None and grads[name].abs().sum() > 0, (regime, name)


def test_occ_with_lambda_fixed_by_hand_equals_policy_with_c_equal_lambda():
    lam = 0.37
    results = []
    for obj in (objective("occ", base=0.05, clamp=lam), objective("policy", base=lam)):
        model, batch, counts = model_and_batch()
        loss = obj(model, batch, counts)
        loss.backward()
        results.append((loss.detach(), model.layers["1"].attention.wq.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_occ_lambda_is_nonzero_once_the_policy_has_moved_and_is_logged():
    model, batch, counts = model_and_batch()
    obj = objective("occ")
    log = obj.new_stats()
    obj(model, batch, counts, log)
    (record,) = obj.records  # one per call with a log: the trainer's per-mini-batch rows
    assert (record["applied"] != 0.0).all() and (record["sums"]["gap_sq"] > 0.0).all()
    assert (record["sums"]["count"] > 0).all() and "gap_ratio" in record["sums"]
    assert len(log.ce_loss) == len(log.pg_loss) == K and log.draft_loss is None
    assert all(x > 0 for x in log.ce_loss) and all(x != 0 for x in log.pg_loss)
    assert all(0 <= log.top1[k] <= log.head_tokens[k] and log.head_tokens[k] > 0 for k in range(K))
    obj(model, batch, counts)  # without a log: nothing recorded
    assert len(obj.records) == 1


def test_fixed_regimes_log_their_coefficient_c_over_k():
    model, batch, counts = model_and_batch()
    for regime in ("detach", "ce", "policy"):
        obj = objective(regime, base=0.05)
        obj(model, batch, counts, obj.new_stats())
        torch.testing.assert_close(obj.records[-1]["applied"], torch.full((K,), 0.05))


def test_regimes_share_the_main_surrogate_and_differ_only_in_the_mtp_term():
    losses = {}
    for regime in ("detach", "ce", "policy", "occ"):
        model, batch, counts = model_and_batch()
        losses[regime] = objective(regime)(model, batch, counts).item()
    assert losses["detach"] == pytest.approx(losses["ce"])  # same value, different graph
    assert losses["policy"] != pytest.approx(losses["ce"])


def test_diagnostic_losses_are_the_main_surrogate_and_each_heads_mtp_loss():
    model, batch, counts = model_and_batch()
    main, *heads = objective("policy").diagnostic_losses(model, batch, counts)
    assert len(heads) == K
    full = objective("policy", base=1.0)(model, batch, counts)
    torch.testing.assert_close(full, main + sum(heads))


@pytest.mark.parametrize("regime", ["detach", "ce", "policy"])
def test_fixed_regimes_record_the_output_grad_estimator_beside_their_coefficient(regime):
    # the proxies are computed under every regime, also the default output_grad one
    model, batch, counts = model_and_batch()
    obj = RLObjective(RL(), regime, K, 0.05, OCCCalibrator(base=0.05, estimator="output_grad"))
    obj(model, batch, counts, obj.new_stats()).backward()
    record = obj.records[-1]
    assert (record["sums"]["out_sq"] > 0).all()
    torch.testing.assert_close(record["applied"], torch.full((K,), 0.05))
