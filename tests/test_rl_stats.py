"""Typed RL step statistics (``rl/stats.py``) and their one reduction (``dp_reduce``)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_exact_occ import K, global_counts, make_batch, make_model, make_objective
from torchtitan.distributed import ParallelDims

from torchtitan_mtp.eval import EvalSums
from torchtitan_mtp.models.parallelize import dp_reduce
from torchtitan_mtp.rl.stats import StepStats, UpdateStats
from torchtitan_mtp.rollout.base import SpecDecodeStats

ONE = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)


def test_step_metrics_from_hand_sums():
    update = UpdateStats(
        entropy=1.2, kl=0.3, clipped_tokens=6.0, pg_loss=[0.4, -0.2], ce_loss=[2.0, 3.0],
        top1=[30.0, 10.0], head_tokens=[40.0, 20.0], draft_loss=[1.0, 1.5],
    )  # fmt: skip
    stats = StepStats(update, sequences=8, correct=2, reward=3.0, response_tokens=40,
                      input_tokens=100, trained_tokens=60, logprob_mismatch=0.6,
                      mismatch_tokens=30)  # fmt: skip
    m = stats.metrics(updates=2)
    assert m["rl/accuracy"] == 0.25 and m["rl/reward_mean"] == 3.0 / 8
    assert m["rl/response_length"] == 5.0 and m["rl/clip_fraction"] == 0.1
    assert m["rollout/logprob_mismatch"] == pytest.approx(0.02)
    assert m["rl/entropy"] == 0.6 and m["rl/kl"] == 0.15  # shares: / updates
    assert m["mtp/pg_loss/head2"] == -0.1 and m["mtp/ce_loss/head1"] == 1.0
    assert m["mtp/top1_agreement/head1"] == 0.75 and m["mtp/top1_agreement/head2"] == 0.5
    assert m["mtp/draft_loss/head2"] == 0.75
    no_draft = UpdateStats.zeros(2).metrics(updates=1)
    assert "mtp/draft_loss/head1" not in no_draft and no_draft["rl/kl"] == 0.0


def test_dp_reduce_without_data_parallelism_is_a_copy_with_the_same_types():
    spec = SpecDecodeStats(num_drafts=4, num_draft_tokens=8, accepted_per_pos=[3, 1])
    same = dp_reduce(spec, ONE)
    assert same == spec and same is not spec and isinstance(same.num_drafts, int)
    stats = StepStats(UpdateStats.zeros(2, draft=False), sequences=3.0)
    assert dp_reduce(stats, ONE) == stats  # a None field (no draft) stays None


# ---- two data-parallel ranks on gloo: shares of global means add up to the global value ----


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, ep=1, etp=1,
                            world_size=2)  # fmt: skip
        dims.build_mesh()
        model = make_model()
        batch = make_batch(model)
        counts = global_counts(batch)  # over both ranks' rows
        objective = make_objective("policy", estimator="ratio_of_means", draft="ce")
        log = objective.new_stats()
        with torch.no_grad():
            for row in (2 * rank, 2 * rank + 1):  # two micro-batches of one row each
                objective(model, batch.select(slice(row, row + 1)), counts, log)
        step = StepStats(log, sequences=2.0, correct=float(rank), reward=0.5 + rank)
        spec = SpecDecodeStats(2 + rank, 4 + 2 * rank, [1 + rank, rank])
        problems = EvalSums(problems=3.0 - rank, greedy_correct=1.0)
        reduced = [dp_reduce(x, dims) for x in (step, spec, problems)]
        torch.save({"mine": step, "reduced": reduced}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_reduce_to_the_one_process_statistics(tmp_path):
    from conftest import run_two_ranks

    ranks = run_two_ranks(_worker, tmp_path)
    model = make_model()
    batch = make_batch(model)
    objective = make_objective("policy", estimator="ratio_of_means", draft="ce")
    whole = objective.new_stats()
    with torch.no_grad():
        objective(model, batch, global_counts(batch), whole)
    for rank in ranks:
        step, spec, problems = rank["reduced"]
        assert step.sequences == 4.0 and step.correct == 1.0 and step.reward == 2.0
        one = StepStats(whole, sequences=4.0, correct=1.0, reward=2.0).metrics(updates=1)
        got = step.metrics(updates=1)
        assert got.keys() == one.keys() and len(step.update.pg_loss) == K
        for tag, value in one.items():
            assert got[tag] == pytest.approx(value, rel=1e-5, abs=1e-7), tag
        assert spec == SpecDecodeStats(5, 10, [3, 1])
        assert problems == EvalSums(problems=5.0, greedy_correct=2.0)
    # each rank's own share differs from the total: the reduction did the adding
    assert ranks[0]["mine"].update.ce_loss != ranks[0]["reduced"][0].update.ce_loss
