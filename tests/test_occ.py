"""Optimal Coefficient Calibration (OCC_SPEC §3) against hand computations."""

import math

import pytest
import torch
import torch.distributed as dist
from conftest import run_two_ranks

from torchtitan_mtp.losses import policy_loss
from torchtitan_mtp.rl.occ import (
    OCCCalibrator,
    occ_coefficient,
    occ_statistics,
    scaled_head_policy_loss,
)

NAN = float("nan")

# Four valid tokens, two masked ones holding garbage that must count nowhere.
#   delta   = logp - old = 0.2, -0.1, 0.3, 0.1
#   delta_k = mtp - old  = 0.1,  0.2, 0.3, -0.2
#   delta * delta_k = 0.02, -0.02, 0.09, -0.02  -> A = 0.07 / 4 = 0.0175
#   delta_k^2       = 0.01,  0.04, 0.09,  0.04  -> V = 0.18 / 4 = 0.045
#   ratios          = 2, -0.5, 1, -0.5          -> mean 0.5
OLD = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -1.0]])
LOGP = torch.tensor([[-0.8, -2.1, -0.7], [-0.9, NAN, 1e30]])
MTP = torch.tensor([[-0.9, -1.8, -0.7], [-1.2, 1e30, NAN]])
MASK = torch.tensor([[True, True, True], [True, False, False]])
A, V, BASE = 0.0175, 0.045, 0.1


def test_ratio_of_means_matches_hand_computation_and_ignores_masked_tokens():
    lam = occ_coefficient(LOGP, OLD, MTP, MASK, base=BASE)
    assert lam.dim() == 0 and lam.dtype == torch.float32
    assert lam.item() == pytest.approx(BASE * A / V, rel=1e-5)  # 0.1 * 0.38889


def test_mean_of_ratios_matches_hand_computation_and_ignores_masked_tokens():
    lam = occ_coefficient(LOGP, OLD, MTP, MASK, base=BASE, estimator="mean_of_ratios")
    assert lam.item() == pytest.approx(BASE * 0.5, rel=1e-5)


def test_statistics_report_correlation_penalty_and_gain_proxy():
    stats = occ_statistics(LOGP, OLD, MTP, MASK, base=BASE)
    lam = BASE * A / V
    assert stats.correlation.item() == pytest.approx(A, rel=1e-5)
    assert stats.penalty.item() == pytest.approx(V, rel=1e-5)
    # beta * lambda * A - lambda^2 V / 2, beta = base; at lambda* it is base^2 A^2 / (2 V)
    assert stats.gain.item() == pytest.approx(BASE * lam * A - lam**2 * V / 2, rel=1e-5)
    assert stats.gain.item() == pytest.approx(BASE**2 * A**2 / (2 * V), rel=1e-5)


@pytest.mark.parametrize("estimator", ["ratio_of_means", "mean_of_ratios"])
def test_coefficient_is_zero_when_the_policy_has_not_moved(estimator):
    # the first mini-batch of a step: logp == old_logp
    lam = occ_coefficient(OLD, OLD, MTP, MASK, base=BASE, estimator=estimator)
    assert lam.item() == 0.0


@pytest.mark.parametrize("estimator", ["ratio_of_means", "mean_of_ratios"])
def test_coefficient_is_zero_without_valid_tokens(estimator):
    lam = occ_coefficient(LOGP, OLD, MTP, torch.zeros_like(MASK), base=BASE, estimator=estimator)
    assert lam.item() == 0.0


def test_head_change_regresses_the_main_change_on_the_heads_own_change():
    # c_k = mtp - old_mtp = 0.05, -0.1, 0.2, 0.1 on the valid tokens
    old_mtp = MTP - torch.tensor([[0.05, -0.1, 0.2], [0.1, 0.0, 0.0]])
    stats = occ_statistics(LOGP, OLD, MTP, MASK, base=BASE, estimator="head_change",
                           old_mtp_logp=old_mtp)  # fmt: skip
    a = (0.2 * 0.05 + -0.1 * -0.1 + 0.3 * 0.2 + 0.1 * 0.1) / 4  # 0.0225
    v = (0.05**2 + 0.1**2 + 0.2**2 + 0.1**2) / 4  # 0.015625
    assert stats.correlation.item() == pytest.approx(a, rel=1e-5)
    assert stats.penalty.item() == pytest.approx(v, rel=1e-5)
    assert stats.coefficient.item() == pytest.approx(BASE * a / v, rel=1e-5)
    with pytest.raises(ValueError, match="old_mtp_logp"):
        occ_statistics(LOGP, OLD, MTP, MASK, base=BASE, estimator="head_change")


def test_coefficient_never_requires_grad():
    logp = torch.randn(2, 3, requires_grad=True)
    mtp = torch.randn(2, 3, requires_grad=True)
    lam = occ_coefficient(logp, torch.zeros(2, 3), mtp, torch.ones(2, 3, dtype=torch.bool), base=1)
    assert not lam.requires_grad


def two_heads():
    """Head 1 as the hand example, head 2 with delta_k negated: lambda_2 = -lambda_1."""
    mtp = torch.stack([MTP, 2 * OLD - MTP])
    return mtp, torch.stack([MASK, MASK])


def test_calibrator_returns_per_head_statistics():
    mtp, mask = two_heads()
    stats = OCCCalibrator(base=BASE).calibrate(LOGP, OLD, mtp, mask)
    lam = BASE * A / V
    torch.testing.assert_close(stats.coefficient, torch.tensor([lam, -lam]))
    torch.testing.assert_close(stats.correlation, torch.tensor([A, -A]))
    torch.testing.assert_close(stats.penalty, torch.tensor([V, V]))
    assert set(stats.metrics()) >= {"occ/coefficient/head1", "occ/gain_proxy/head2"}


def test_calibrator_clamps_the_coefficient_and_reports_the_gain_of_the_clamped_value():
    mtp, mask = two_heads()
    stats = OCCCalibrator(base=BASE, clamp_min=0.0, clamp_max=0.01).calibrate(LOGP, OLD, mtp, mask)
    torch.testing.assert_close(stats.coefficient, torch.tensor([0.01, 0.0]))
    gain = BASE * 0.01 * A - 0.01**2 * V / 2
    torch.testing.assert_close(stats.gain, torch.tensor([gain, 0.0]))


# ---- apply_to: "advantage" (reference) vs "loss" ----


def random_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(4, 6, generator=gen) * 3
    logp = (old + torch.randn(4, 6, generator=gen) * 0.4).requires_grad_()
    adv = torch.randn(4, 1, generator=gen).expand(4, 6)
    mask = torch.rand(4, 6, generator=gen) > 0.3
    tokens, seqs = int(mask.sum()), 4
    return dict(
        logp=logp,
        old_logp=old,
        advantages=adv,
        mask=mask,
        dual_clip=3.0,
        global_tokens=tokens,
        global_seqs=seqs,
    )


@pytest.mark.parametrize("lam", [0.0, 0.3, 2.0])
def test_apply_to_advantage_and_loss_agree_for_nonnegative_coefficients(lam):
    results = []
    for apply_to in ("advantage", "loss"):
        batch = random_batch(0)
        loss, _ = scaled_head_policy_loss(torch.tensor(lam), apply_to, **batch)
        loss.backward()
        results.append((loss.detach(), batch["logp"].grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_apply_to_differ_for_a_negative_coefficient_as_computed_by_hand():
    # A = (1, -1), ratio = (1.5, 0.5): both tokens outside [0.8, 1.28], lambda = -1
    old = torch.tensor([[-1.0, -1.0]])
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)

    def run(apply_to):
        logp = (old + torch.tensor([[1.5, 0.5]]).log()).requires_grad_()
        kwargs = dict(advantages=adv, mask=mask, global_tokens=2, global_seqs=1)
        loss, _ = scaled_head_policy_loss(-1.0, apply_to, logp=logp, old_logp=old, **kwargs)
        loss.backward()
        return loss.item(), logp.grad

    # "loss": -1 * mean(-min(rA, clip(r)A)) = -1 * mean(-1.28, 0.8); both clipped: no grad
    loss, grad = run("loss")
    assert loss == pytest.approx(0.24, rel=1e-5)
    torch.testing.assert_close(grad, torch.zeros(1, 2))
    # "advantage": A' = (-1, 1), mean(-min(-1.5, -1.28), -min(0.5, 0.8)) = mean(1.5, -0.5);
    # the clip flips, neither token is clipped: grad = -A' r / 2 = (0.75, -0.25)
    loss, grad = run("advantage")
    assert loss == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(grad, torch.tensor([[0.75, -0.25]]))


def test_occ_with_coefficient_fixed_by_hand_equals_policy_regime_with_c_equal_lambda():
    lam, num_heads = 0.05, 2
    batch = random_batch(1)
    mtp = torch.stack([batch["logp"].detach() + 0.1 * k for k in range(num_heads)])
    mtp_mask = torch.stack([batch["mask"]] * num_heads)
    common = {k: batch[k] for k in ("old_logp", "advantages", "global_tokens", "global_seqs")}

    # OCC path: the calibrator's clamp pins lambda_k to lam, applied to the advantages
    calibrator = OCCCalibrator(base=1.0, clamp_min=lam, clamp_max=lam)
    occ_mtp = mtp.clone().requires_grad_()
    stats = calibrator.calibrate(batch["logp"], batch["old_logp"], occ_mtp, mtp_mask)
    occ_loss = sum(
        calibrator.head_loss(stats.coefficient[k], logp=occ_mtp[k], mask=mtp_mask[k], **common)[0]
        for k in range(num_heads)
    )
    occ_loss.backward()

    # Policy regime: (c / K) * sum_k L_PG(l^k, l_old, A) with c / K = lam
    pol_mtp = mtp.clone().requires_grad_()
    pol_loss = lam * sum(
        policy_loss(pol_mtp[k], mask=mtp_mask[k], **common)[0] for k in range(num_heads)
    )
    pol_loss.backward()

    torch.testing.assert_close(occ_loss, pol_loss)
    torch.testing.assert_close(occ_mtp.grad, pol_mtp.grad)


# ---- global statistics over a real 2-process gloo group ----


def distributed_batch():
    """K = 2 heads; the rows are split unevenly-masked between two ranks."""
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 8, generator=gen) * 3
    logp = old + torch.randn(4, 8, generator=gen) * 0.3
    mtp = old + torch.randn(2, 4, 8, generator=gen) * 0.3 + 0.5 * (logp - old)
    mask = torch.rand(2, 4, 8, generator=gen) > 0.3
    mask[:, 2:, 5:] = False  # rank 1 has fewer tokens: per-rank means would differ
    return logp, old, mtp, mask


def _rank_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        logp, old, mtp, mask = (t[..., 2 * rank : 2 * rank + 2, :] for t in distributed_batch())
        group = dist.group.WORLD
        result = {
            est: OCCCalibrator(base=BASE, estimator=est, group=group).calibrate(
                logp, old, mtp, mask, old_mtp_logp=mtp - 0.1 * (logp - old)
            )
            for est in ("ratio_of_means", "mean_of_ratios", "head_change")
        }
        result["single"] = occ_coefficient(logp, old, mtp[0], mask[0], base=BASE, group=group)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_group_gives_every_rank_the_single_process_value_over_the_whole_batch(tmp_path):
    ranks = run_two_ranks(_rank_worker, tmp_path)

    logp, old, mtp, mask = distributed_batch()
    for est in ("ratio_of_means", "mean_of_ratios", "head_change"):
        whole = OCCCalibrator(base=BASE, estimator=est).calibrate(
            logp, old, mtp, mask, old_mtp_logp=mtp - 0.1 * (logp - old)
        )
        for rank in ranks:
            for got, want in zip(rank[est][:4], whole[:4], strict=True):
                torch.testing.assert_close(got, want)
    single = occ_coefficient(logp, old, mtp[0], mask[0], base=BASE)
    assert all(math.isclose(r["single"].item(), single.item(), rel_tol=1e-6) for r in ranks)
    # the group actually mattered: a rank alone gets a different lambda
    alone = occ_coefficient(logp[:2], old[:2], mtp[0, :2], mask[0, :2], base=BASE)
    assert not math.isclose(alone.item(), single.item(), rel_tol=1e-3)
