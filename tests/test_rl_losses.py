"""RL losses (OCC_SPEC §4) against hand computations."""

import math

import pytest
import torch

from torchtitan_mtp.losses import (
    aggregate,
    dynamic_sampling_keep,
    grpo_advantages,
    kl_k3,
    overlong_reward_penalty,
    policy_loss,
    truncated_is_weights,
    valid_counts,
)

NAN = float("nan")
INF = float("inf")


def surrogate_batch():
    """Five valid tokens covering every clip case, plus a masked token full of garbage.

    ratio / advantage: inside the range; above 1 + 0.28 with A > 0 (clipped); below
    1 - 0.2 with A < 0 (clipped); below 1 - 0.2 with A > 0 (not clipped); ratio 5 with
    A = -2 (dual-clip territory).
    """
    ratios = torch.tensor([[1.1, 1.5, 0.5], [0.5, 5.0, 1.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0], [1.0, -2.0, INF]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -1.0]])
    logp = (old + ratios.log()).clone()
    logp[1, 2] = NAN
    return logp.requires_grad_(), old, adv, mask


def test_surrogate_value_and_gradient_match_hand_computation_without_dual_clip():
    logp, old, adv, mask = surrogate_batch()
    loss, stats = policy_loss(logp, old, adv, mask, global_tokens=5, global_seqs=2)
    # -min(rA, clip(r)A) per token: -1.1, -1.28, 0.8, -0.5, 10
    assert loss.item() == pytest.approx((-1.1 - 1.28 + 0.8 - 0.5 + 10.0) / 5, rel=1e-5)
    loss.backward()
    # d/dlogp of -A r is -A r where unclipped, 0 where clipped, 0 where masked
    expected = torch.tensor([[-1.1, 0.0, 0.0], [-0.5, 10.0, 0.0]]) / 5
    torch.testing.assert_close(logp.grad, expected)


def test_surrogate_with_dual_clip_bounds_negative_advantage_tokens():
    logp, old, adv, mask = surrogate_batch()
    loss, stats = policy_loss(logp, old, adv, mask, dual_clip=3.0, global_tokens=5, global_seqs=2)
    # token with A = -2, r = 5: min(10, -c A = 6) = 6, gradient cut
    assert loss.item() == pytest.approx((-1.1 - 1.28 + 0.8 - 0.5 + 6.0) / 5, rel=1e-5)
    loss.backward()
    expected = torch.tensor([[-1.1, 0.0, 0.0], [-0.5, 0.0, 0.0]]) / 5
    torch.testing.assert_close(logp.grad, expected)
    assert stats.dual_clipped_tokens.item() == 1


def test_policy_loss_stats_count_clipped_tokens_and_local_sums():
    logp, old, adv, mask = surrogate_batch()
    _, stats = policy_loss(logp, old, adv, mask, global_tokens=5, global_seqs=2)
    assert stats.tokens.item() == 5
    assert stats.clipped_tokens.item() == 2  # r=1.5 with A>0 and r=0.5 with A<0
    assert stats.dual_clipped_tokens.item() == 0
    log_r = [math.log(r) for r in (1.1, 1.5, 0.5, 0.5, 5.0)]
    assert stats.approx_kl.item() == pytest.approx(-sum(log_r), rel=1e-5)
    assert stats.ratio.item() == pytest.approx(1.1 + 1.5 + 0.5 + 0.5 + 5.0, rel=1e-5)
    assert not any(s.requires_grad for s in stats)


VALUES = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, INF, 0.0, 0.0], [5.0, 6.0, 0.0, 0.0]])
MASK = torch.tensor(
    [[True, True, True, False], [True, False, False, False], [False, False, False, False]]
)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),
        ("seq-mean-token-mean", (2.0 + 4.0) / 2),  # the empty third sequence counts nowhere
        ("seq-mean-token-sum", (6.0 + 4.0) / 2),
    ],
)
def test_aggregate_matches_hand_computation(mode, expected):
    tokens, seqs = valid_counts(MASK).tolist()
    assert (tokens, seqs) == (4, 2)
    out = aggregate(VALUES, MASK, mode, global_tokens=tokens, global_seqs=seqs)
    assert out.item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregate_shares_of_two_ranks_sum_to_the_single_batch_value(mode):
    torch.manual_seed(0)
    values = torch.randn(6, 5)
    mask = torch.rand(6, 5) > 0.4
    mask[4] = False  # an empty sequence on one rank
    tokens, seqs = valid_counts(mask).unbind()
    whole = aggregate(values, mask, mode, global_tokens=tokens, global_seqs=seqs)
    shares = [
        aggregate(values[rows], mask[rows], mode, global_tokens=tokens, global_seqs=seqs)
        for rows in (slice(0, 2), slice(2, 6))  # uneven halves: per-rank means would differ
    ]
    torch.testing.assert_close(shares[0] + shares[1], whole)


def test_valid_counts_of_stacked_head_masks():
    masks = torch.stack([MASK, torch.zeros_like(MASK)])
    torch.testing.assert_close(valid_counts(masks), torch.tensor([[4.0, 2.0], [0.0, 0.0]]))


def test_grpo_advantages_normalise_by_unbiased_group_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    adv = grpo_advantages(rewards, 4)
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    # group 2: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 1 / sqrt(3)
    s = math.sqrt(3) / 2
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, s, s, -s, -s])
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)


def test_grpo_advantages_without_std_are_centred_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo_advantages(rewards, 4, norm_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]))


def test_grpo_advantages_of_equal_rewards_are_zero():
    adv = grpo_advantages(torch.ones(4), 2)
    torch.testing.assert_close(adv, torch.zeros(4))


def test_dynamic_sampling_keeps_groups_with_different_rewards():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0])
    keep = dynamic_sampling_keep(rewards, 2)
    assert keep.tolist() == [False, True, False, True]


def test_overlong_penalty_is_linear_inside_the_buffer():
    lengths = torch.tensor([50, 80, 90, 100, 120])
    penalty = overlong_reward_penalty(lengths, 100, 20)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    scaled = overlong_reward_penalty(lengths, 100, 20, penalty_factor=0.5)
    torch.testing.assert_close(scaled, torch.tensor([0.0, 0.0, -0.25, -0.5, -0.5]))


def test_kl_k3_is_zero_for_equal_policies_and_matches_the_formula():
    logp = torch.tensor([[-1.0, -0.5, -3.0]])
    torch.testing.assert_close(kl_k3(logp, logp), torch.zeros(1, 3))
    ref = torch.tensor([[-2.0, -0.5, -1.0]])
    d = ref - logp  # -1, 0, 2
    expected = torch.exp(d) - d - 1  # e^-1, 0, e^2 - 3
    torch.testing.assert_close(kl_k3(logp, ref), expected)
    assert expected[0, 0].item() == pytest.approx(math.exp(-1))


def test_gspo_ratio_is_one_when_the_policy_has_not_moved():
    logp = torch.tensor([[-1.0, -2.0, -0.3], [-0.7, -1.1, -5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    _, stats = policy_loss(
        logp, logp, torch.ones(2, 3), mask, gspo=True, global_tokens=5, global_seqs=2
    )
    assert stats.ratio.item() == pytest.approx(5.0)
    assert stats.clipped_tokens.item() == 0


def test_gspo_value_and_gradient_match_the_gspo_token_form():
    old = torch.tensor([[-1.0, -2.0, -0.3], [-0.7, -1.1, -5.0]])
    delta = torch.tensor([[0.05, -0.02, 0.09], [0.10, -0.04, NAN]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([[1.0, -0.5, 2.0], [-1.0, 0.5, 3.0]])
    logp = (old + delta).requires_grad_()
    loss, _ = policy_loss(logp, old, adv, mask, gspo=True, global_tokens=5, global_seqs=2)
    # s_b = exp(mean of the valid deltas); all inside [0.8, 1.28], so no clipping:
    # loss = -sum_t A_t s_b / 5 and d loss / d logp_t = -A_t s_b / 5 (s_b is a constant)
    s = torch.tensor([math.exp(0.12 / 3), math.exp(0.06 / 2)])
    valid_adv = torch.where(mask, adv, 0.0)
    assert loss.item() == pytest.approx(-(valid_adv * s[:, None]).sum().item() / 5, rel=1e-5)
    loss.backward()
    torch.testing.assert_close(logp.grad, -valid_adv * s[:, None] / 5)


def test_truncated_is_weights_cap_the_trainer_over_rollout_ratio_on_valid_tokens():
    old = torch.log(torch.tensor([[0.5, 0.9, 0.2], [0.3, 0.3, NAN]]))
    rollout = torch.log(torch.tensor([[0.5, 0.3, 0.4], [0.6, 0.01, 0.2]]))
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w = truncated_is_weights(old, rollout, mask, cap=2.0)
    expected = torch.tensor([[1.0, 2.0, 0.5], [0.5, 2.0, 1.0]])  # 3 and 30 are capped
    torch.testing.assert_close(w, expected)


def test_scaling_advantages_by_tis_weights_weights_each_tokens_loss_and_gradient():
    """With dual clip on, per token: loss(w A) = w loss(A) for w > 0."""
    logp, old, adv, mask = surrogate_batch()
    w = torch.tensor([[0.5, 2.0, 1.5], [0.25, 1.0, 3.0]])
    kwargs = dict(global_tokens=1, global_seqs=1, agg="token-mean", dual_clip=3.0)
    for i in range(2):
        for j in range(3):
            one = torch.zeros_like(mask)
            one[i, j] = mask[i, j]
            x = logp.detach().clone().requires_grad_(True)
            loss = policy_loss(x, old, adv * w, one, **kwargs)[0]
            ref = policy_loss(x, old, adv, one, **kwargs)[0] * w[i, j]
            assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)
