"""The native rollout engine: exact greedy decoding, trainer-consistent log-probs, sampling
controls, stopping, and equal results on FSDP2 and TP layouts (gloo, torchrun)."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchtitan_mtp.models import MTPTransformer, mtp_flavors, token_logprobs
from torchtitan_mtp.models.logprobs import IGNORE_INDEX
from torchtitan_mtp.rollout import NativeRolloutEngine, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 64
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [20]]
VARIANTS = {
    "qk_norm": {"qk_norm": True},
    "qkv_bias": {"qk_norm": False, "qkv_bias": True},
    "mha": {"n_kv_heads": 4},
}


def tiny_args(**overrides):
    base = dataclasses.replace(
        mtp_flavors["debug"], vocab_size=VOCAB, max_seq_len=32, num_mtp_modules=1
    )
    return dataclasses.replace(base, **overrides)


def build(args, seed: int = 0) -> MTPTransformer:
    """A tiny random model, perturbed so that its outputs are far from degenerate
    (TorchTitan's init gives near-uniform, repetitive predictions and zero biases)."""
    torch.manual_seed(seed)
    model = MTPTransformer(args)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one intra-op thread (see conftest)."""


@pytest.fixture(scope="module")
def model() -> MTPTransformer:
    return build(tiny_args())


@torch.no_grad()
def full_forward_greedy(model: MTPTransformer, prompt: list[int], steps: int) -> list[int]:
    """Reference: re-run the model's own full forward on the unpadded sequence every step."""
    seq = torch.tensor([prompt])
    for _ in range(steps):
        hidden = model(seq)
        logits = model.output(torch.stack(hidden))[0][:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt) :].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_greedy_equals_step_by_step_full_forward_argmax(variant):
    model = build(tiny_args(**VARIANTS[variant]))
    out = NativeRolloutEngine(model).generate(
        PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0)
    )
    for prompt, completion in zip(PROMPTS, out, strict=True):
        assert completion.prompt_ids == prompt
        assert completion.token_ids == full_forward_greedy(model, prompt, 8)
        assert completion.finish_reason == "length"
        assert len(completion.logprobs) == 8


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=10, temperature=1.0, seed=1),
        SamplingParams(max_new_tokens=10, temperature=0.7, top_k=8, top_p=0.9, seed=2),
    ],
)
def test_sampling_logprobs_equal_the_trainers_recomputed_logprobs(model, params):
    out = NativeRolloutEngine(model).generate(PROMPTS, params)
    seqs = [c.prompt_ids + c.token_ids for c in out]
    width = max(len(s) for s in seqs)
    inputs = torch.zeros(len(seqs), width, dtype=torch.long)  # right-padded
    labels = torch.full((len(seqs), width - 1), IGNORE_INDEX, dtype=torch.long)
    engine_logp = torch.zeros(len(seqs), width - 1)
    for i, (seq, c) in enumerate(zip(seqs, out, strict=True)):
        inputs[i, : len(seq)] = torch.tensor(seq)
        start = len(c.prompt_ids) - 1  # label position of the first response token
        labels[i, start : start + len(c.token_ids)] = torch.tensor(c.token_ids)
        engine_logp[i, start : start + len(c.token_ids)] = torch.tensor(c.logprobs)
    with torch.no_grad():
        stats = token_logprobs(model, model(inputs[:, :-1]), labels)
    response = labels != IGNORE_INDEX
    assert int(response.sum()) == 10 * len(PROMPTS)
    torch.testing.assert_close(engine_logp[response], stats.logp[0][response], atol=1e-4, rtol=0)


def test_sampling_is_reproducible_with_a_seed_and_differs_with_another(model):
    engine = NativeRolloutEngine(model)

    def tokens(seed: int) -> list[list[int]]:
        params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=seed)
        return [c.token_ids for c in engine.generate(PROMPTS, params)]

    assert tokens(5) == tokens(5)
    assert tokens(5) != tokens(6)


def test_temperature_zero_and_top_k_one_equal_greedy(model):
    engine = NativeRolloutEngine(model)
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0))
    top1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, top_k=1, seed=3))
    expected = [full_forward_greedy(model, p, 8) for p in PROMPTS]
    assert [c.token_ids for c in greedy] == expected
    assert [c.token_ids for c in top1] == expected
    for a, b in zip(greedy, top1, strict=True):  # raw log-probs, whatever the filtering
        torch.testing.assert_close(a.logprobs, b.logprobs)


def test_stop_token_ends_a_row_keeps_the_token_and_leaves_other_rows_unchanged(model):
    engine = NativeRolloutEngine(model)
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0))
    stop = free[0].token_ids[2]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=(stop, 63))
    out = engine.generate(PROMPTS, params)
    assert out[0].finish_reason == "stop"
    assert out[0].token_ids[-1] == stop
    for f, c in zip(free, out, strict=True):
        hits = [i for i, t in enumerate(f.token_ids) if t in (stop, 63)]
        if hits:
            assert c.finish_reason == "stop"
            assert c.token_ids == f.token_ids[: hits[0] + 1]
            assert c.logprobs == pytest.approx(f.logprobs[: hits[0] + 1], abs=1e-6)
        else:
            assert c.finish_reason == "length"
            assert c.token_ids == f.token_ids


class CharTokenizer:
    """decode() is all the engine needs: token i becomes ``<i>``."""

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def test_stop_string_ends_a_row_and_keeps_the_string(model):
    engine = NativeRolloutEngine(model, tokenizer=CharTokenizer())
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0))
    target = free[2].token_ids
    string = f"{target[3]}><{target[4]}"  # spans two tokens, ends inside the second
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_strings=(string,))
    out = engine.generate(PROMPTS, params)
    decode = CharTokenizer().decode
    for f, c in zip(free, out, strict=True):
        ends = [n for n in range(1, 9) if string in decode(f.token_ids[:n])]
        if ends:
            assert c.finish_reason == "stop"
            assert c.token_ids == f.token_ids[: ends[0]]
            assert string in decode(c.token_ids)
        else:
            assert (c.finish_reason, c.token_ids) == ("length", f.token_ids)
    assert out[2].finish_reason == "stop" and len(out[2].token_ids) <= 5


def test_leaves_train_mode_weights_and_grads_alone_and_logs_progress(model, caplog):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    engine = NativeRolloutEngine(model, progress_every_s=0.0)
    with caplog.at_level(logging.INFO):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, seed=0))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any("rollout:" in r.getMessage() and "tok/s" in r.getMessage() for r in caplog.records)


def test_invalid_requests_are_rejected(model):
    engine = NativeRolloutEngine(model)
    assert engine.generate([], SamplingParams()) == []
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate([[1] * 30], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate([[1]], SamplingParams(stop_strings=("x",)))
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[1], []], SamplingParams())


def test_fsdp2_and_tp2_generate_like_a_single_process(tmp_path):
    """Two gloo processes: FSDP (dp_shard=2), then TP (tp=2), against the plain model:
    plain, self-speculative and compiled generation (refused under TP), and the vLLM
    weight-sync buckets."""
    out = tmp_path / "engine.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "_engine_dist_worker.py"),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    results = json.loads(out.read_text())
    single = results["single"]
    assert single["max_logprob_diff"] < 1e-4
    assert single["spec_greedy"] == single["greedy"]
    assert single["compiled_spec_greedy"] == single["greedy"]
    assert results["fsdp"]["compiled_spec_greedy"] == single["greedy"]  # unsharded weights
    assert "under tensor parallelism: not supported" in results["tp"]["compiled_spec_greedy"]
    for layout in ("fsdp", "tp"):
        r = results[layout]
        assert r["greedy"] == single["greedy"], layout
        assert r["sampled"] == single["sampled"], layout
        # Self-speculative decoding: the same drafts, decisions and tokens on every layout.
        assert r["spec_greedy"] == single["greedy"], layout
        assert r["spec_sampled"] == single["spec_sampled"], layout
        assert r["spec_stats"] == single["spec_stats"], layout
        # vLLM weight sync: the same buckets, gathered from the shards.
        assert [[e[:2] for e in b] for b in r["sync"]["buckets"]] == [
            [e[:2] for e in b] for b in single["sync"]["buckets"]
        ], layout
        for rb, sb in zip(r["sync"]["buckets"], single["sync"]["buckets"], strict=True):
            for re_, se in zip(rb, sb, strict=True):
                assert re_[2:] == pytest.approx(se[2:], rel=1e-6, abs=1e-6), (layout, re_[0])
        assert r["sync"]["largest"] <= 60_000 and r["sync"]["bytes"] == single["sync"]["bytes"]
        for a, b in zip(r["greedy_logprobs"], single["greedy_logprobs"], strict=True):
            assert a == pytest.approx(b, abs=1e-4), layout
        assert r["max_logprob_diff"] < 1e-4, layout  # the parallel forward agrees
        assert r["training_restored"] and r["has_grads"], layout
    assert results["fsdp"]["resharded"]
