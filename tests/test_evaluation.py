"""Held-out evaluation (greedy accuracy, avg@k, pass@k) with the real native engine."""

import dataclasses

import pytest
import torch

from torchtitan_mtp.eval import EvalSums, evaluate_set, format_table
from torchtitan_mtp.models import MTPTransformer, mtp_flavors
from torchtitan_mtp.rewards import exact_match
from torchtitan_mtp.rollout import NativeRolloutEngine, SamplingParams


def tiny_engine() -> NativeRolloutEngine:
    torch.manual_seed(0)
    args = dataclasses.replace(mtp_flavors["debug"], vocab_size=64, max_seq_len=32)
    model = MTPTransformer(args)
    model.init_weights()
    return NativeRolloutEngine(model)


def text(completion) -> str:  # responses as digit strings of their token ids
    return ",".join(map(str, completion.token_ids))


PROMPTS = [[1, 5, 6], [1, 7], [1, 9, 9, 4], [1, 12]]
GREEDY = SamplingParams(max_new_tokens=3, temperature=0.0)


def test_greedy_accuracy_counts_exactly_the_known_answers():
    engine = tiny_engine()
    known = [text(c) for c in engine.generate(PROMPTS, GREEDY)]
    answers = [known[0], "wrong", known[2], "wrong"]  # the model answers 2 of 4 right
    sums = evaluate_set(engine, PROMPTS, answers, exact_match, text, greedy=GREEDY)
    assert sums.metrics(0) == {"greedy": 0.5}


def test_avg_and_pass_at_k_match_a_direct_count_of_the_samples():
    engine = tiny_engine()
    sampled = SamplingParams(max_new_tokens=1, temperature=1.0, seed=3)
    k = 6
    # The answer of each problem: a token the model sampled for it (so some hits, not all).
    samples = engine.generate([p for p in PROMPTS for _ in range(k)], sampled)
    answers = [text(samples[i * k]) for i in range(len(PROMPTS))]
    hits = torch.tensor([text(c) == answers[i // k] for i, c in enumerate(samples)]).view(-1, k)
    sums = evaluate_set(
        engine, PROMPTS, answers, exact_match, text, greedy=GREEDY, sampled=sampled, k=k
    )
    metrics = sums.metrics(k)
    assert metrics[f"avg@{k}"] == pytest.approx(hits.double().mean().item())
    assert metrics[f"pass@{k}"] == 1.0  # the first sample of every problem is its answer
    assert 0 < metrics[f"avg@{k}"] < 1


def test_eval_metrics_are_rates_of_the_summed_counts():
    # (summed over ranks by dp_reduce: tests/test_rl_stats.py)
    total = EvalSums(problems=4, greedy_correct=2, avg_sum=1.75, pass_count=3)
    assert total.metrics(4) == {"greedy": 0.5, "avg@4": 1.75 / 4, "pass@4": 0.75}
    assert total.metrics(0) == {"greedy": 0.5}


def test_table_has_a_row_per_set_and_a_column_per_metric():
    table = format_table(7, {"heldout": (319, {"greedy": 0.5, "pass@4": 0.75}),
                             "aime2025": (30, {"greedy": 0.1})})  # fmt: skip
    lines = table.splitlines()
    assert "greedy" in lines[0] and "pass@4" in lines[0]
    assert "heldout" in lines[2] and "0.750" in lines[2] and "aime2025" in lines[3]
