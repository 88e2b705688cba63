"""Self-speculative decoding in the native engine: MTP drafts verified by the trunk.

Lossless (greedy: token for token; sampled: the same distribution), acceptance counted
right, and the speculative-sampling rule on constructed distributions.
"""

import dataclasses
import itertools
import math

import pytest
import torch

from torchtitan_mtp.models import MTPTransformer, mtp_flavors
from torchtitan_mtp.rollout import NativeRolloutEngine, SamplingParams, SpecDecodeStats
from torchtitan_mtp.rollout.native import sampling_probs, speculative_accept

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [20], [3, 3, 3]]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one intra-op thread (see conftest)."""


def build(vocab: int = 64, num_mtp: int = 3, seed: int = 0, scale: float = 0.3) -> MTPTransformer:
    """A tiny random float64 model (no argmax near-ties), perturbed away from TorchTitan's
    near-uniform init."""
    args = dataclasses.replace(
        mtp_flavors["debug"], vocab_size=vocab, max_seq_len=64, num_mtp_modules=num_mtp
    )
    torch.manual_seed(seed)
    model = MTPTransformer(args)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.double()


@torch.no_grad()
def make_bigram(model: MTPTransformer, draft_sign: float, noise: float = 0.0) -> MTPTransformer:
    """Zero every block's output projections: the trunk predicts from the last token alone
    (logits = norm(Emb(t)) W^T). With eh_proj = [sign * I, noise], MTP module k predicts
    from the embedding of its input token: the trunk's own prediction (sign +1, exact
    drafts), its reverse (sign -1, drafts that are never the argmax), or in between."""
    blocks = list(model.layers.values()) + [m.block for m in model.mtp.values()]
    for block in blocks:
        block.attention.wo.weight.zero_()
        block.feed_forward.w2.weight.zero_()
    model.norm.weight.fill_(1.0)
    dim = model.model_args.dim
    for module in model.mtp.values():
        module.enorm.weight.fill_(1.0)
        module.norm.weight.fill_(1.0)
        proj = torch.zeros(dim, 2 * dim, dtype=module.eh_proj.weight.dtype)
        proj[:, :dim] = draft_sign * torch.eye(dim)
        proj += noise * torch.randn_like(proj)
        module.eh_proj.weight.copy_(proj)
    return model


@torch.no_grad()
def make_shifted_trunk(
    scale: float = 0.3, num_mtp: int = 3, vocab: int = 64, mask_first_embedding: bool = False
) -> MTPTransformer:
    """A one-layer trunk whose MTP modules are copies of its block reading only the
    embedding: module k re-runs the trunk on the sequence shifted by k (without its first
    k tokens), so drafts are context-dependent and right about half the time."""
    args = dataclasses.replace(
        mtp_flavors["debug"],
        vocab_size=vocab,
        max_seq_len=64,
        num_mtp_modules=num_mtp,
        n_layers=1,
        mtp_mask_first_embedding=mask_first_embedding,
    )
    torch.manual_seed(0)
    model = MTPTransformer(args)
    model.init_weights()
    for p in model.parameters():
        p.add_(scale * torch.randn_like(p))
    model.copy_last_block_into_mtp()
    dim = args.dim
    for module in model.mtp.values():
        module.enorm.weight.fill_(1.0)
        module.norm.weight.copy_(model.norm.weight)
        module.eh_proj.weight.zero_()
        module.eh_proj.weight[:, :dim] = torch.eye(dim)
    return model.double()


@pytest.fixture(scope="module")
def model() -> MTPTransformer:
    return build()


@pytest.mark.parametrize("num_drafts", [1, 2, 3])
@pytest.mark.parametrize("kind", ["random", "half_right"])
def test_greedy_speculative_equals_plain_greedy_token_for_token(model, num_drafts, kind):
    """Batched rows of different lengths, a stop token, and drafts of mixed quality."""
    if kind == "half_right":
        model = make_shifted_trunk()
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=(5,))
    plain = NativeRolloutEngine(model).generate(PROMPTS, params)
    engine = NativeRolloutEngine(model, speculative_tokens=num_drafts)
    spec = engine.generate(PROMPTS, params)
    for a, b in zip(plain, spec, strict=True):
        assert b.token_ids == a.token_ids
        assert b.finish_reason == a.finish_reason
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-6)
    stats = engine.last_spec_stats
    assert len(stats.accepted_per_pos) == num_drafts and stats.num_drafts > 0
    if kind == "half_right":  # both the accept and the reject paths ran
        assert 0.2 < stats.metrics()["mtp/accept_rate"] < 0.95


@torch.no_grad()
@pytest.mark.parametrize("mask", [False, True], ids=["unmasked", "position0_masked"])
def test_drafts_are_the_mtp_modules_teacher_forced_predictions(mask):
    """Acceptance counts equal a simulation from ONE training forward of the MTP modules on
    the final sequence: draft k of a round is module k's argmax at the last fed position,
    given the accepted tokens. Stale draft entries in the modules' KV caches would change
    the counts. With and without vLLM's zero embedding at position 0 (the one-token prompt
    drafts its first round there)."""
    model, num_drafts, max_new = make_shifted_trunk(mask_first_embedding=mask), 3, 24
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0)
    engine = NativeRolloutEngine(model, speculative_tokens=num_drafts)
    engine.generate(PROMPTS, params)
    # The plain greedy continuation, K tokens longer so the last round's drafts are known.
    longer = dataclasses.replace(params, max_new_tokens=max_new + num_drafts)
    accepted_per_pos, num_rounds = [0] * num_drafts, 0
    for prompt, completion in zip(
        PROMPTS, NativeRolloutEngine(model).generate(PROMPTS, longer), strict=True
    ):
        seq = torch.tensor([prompt + completion.token_ids])
        logits = model.output(torch.stack(model(seq)))[:, 0]  # [K + 1, S, V]
        predicted = logits.argmax(dim=-1)  # head k at i predicts token i + k + 1
        fed, generated = len(prompt), 1  # after the prefill's token
        while generated < max_new:
            accepted = 0
            while accepted < num_drafts:
                k = accepted + 1
                if predicted[k, fed - 1] != seq[0, fed + k]:
                    break
                accepted += 1
            for j in range(accepted):
                accepted_per_pos[j] += 1
            num_rounds += 1
            fed, generated = fed + accepted + 1, generated + accepted + 1
    stats = engine.last_spec_stats
    assert stats.num_drafts == num_rounds
    assert stats.accepted_per_pos == accepted_per_pos
    assert 0.2 < stats.metrics()["mtp/accept_rate"] < 0.95


def test_greedy_speculative_with_stop_strings_and_max_tokens_one():
    class Chars:
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    model = make_bigram(build(), draft_sign=1.0)
    for params in (
        SamplingParams(max_new_tokens=12, temperature=0.0, stop_strings=("k", "q")),
        SamplingParams(max_new_tokens=1, temperature=0.0),
    ):
        plain = NativeRolloutEngine(model, tokenizer=Chars()).generate(PROMPTS, params)
        spec = NativeRolloutEngine(model, tokenizer=Chars(), speculative_tokens=3).generate(
            PROMPTS, params
        )
        assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
        assert [c.finish_reason for c in spec] == [c.finish_reason for c in plain]


@pytest.mark.parametrize("num_drafts", [1, 3])
def test_acceptance_is_one_for_exact_drafts_and_zero_for_wrong_drafts(num_drafts):
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    right = NativeRolloutEngine(make_bigram(build(), draft_sign=1.0), speculative_tokens=num_drafts)
    right.generate(PROMPTS, params)
    metrics = right.last_spec_stats.metrics()
    assert metrics["mtp/accept_rate"] == 1.0
    assert metrics["mtp/accept_length"] == num_drafts + 1
    assert all(metrics[f"mtp/accept_rate/pos{j}"] == 1.0 for j in range(1, num_drafts + 1))
    # Every round emits K + 1 tokens: ceil(20 / (K + 1)) rounds per row after the prefill's.
    rounds = math.ceil((params.max_new_tokens - 1) / (num_drafts + 1))
    assert right.last_spec_stats.num_drafts == len(PROMPTS) * rounds

    wrong = NativeRolloutEngine(
        make_bigram(build(), draft_sign=-1.0), speculative_tokens=num_drafts
    )
    wrong.generate(PROMPTS, params)
    stats = wrong.last_spec_stats
    assert stats.metrics()["mtp/accept_rate"] == 0.0
    assert stats.metrics()["mtp/accept_length"] == 1.0
    assert stats.num_drafts == len(PROMPTS) * (params.max_new_tokens - 1)
    assert stats.num_draft_tokens == stats.num_drafts * num_drafts


def test_sampled_exact_drafts_are_all_accepted():
    """q = p (the drafter is the trunk's bigram): min(1, p/q) = 1 for every draft."""
    engine = NativeRolloutEngine(make_bigram(build(), draft_sign=1.0), speculative_tokens=2)
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0.7, seed=3))
    assert engine.last_spec_stats.metrics()["mtp/accept_rate"] == pytest.approx(1.0)


@torch.no_grad()
def exact_distribution(model, prompt, steps, params) -> dict[tuple[int, ...], float]:
    """P(response) of every response of ``steps`` tokens under plain sampling, from the
    model's own full forward."""
    vocab = model.model_args.vocab_size
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=steps)))
    inputs = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], dim=1)
    hidden = model(inputs)[0]
    logits = model.output(hidden[None])[0].float()  # [N, S, V]
    probs = sampling_probs(logits[:, len(prompt) - 1 : -1], params)  # [N, steps, V]
    joint = probs.gather(-1, seqs[..., None]).squeeze(-1).prod(dim=1)
    return {tuple(s): float(p) for s, p in zip(seqs.tolist(), joint, strict=True)}


def chi_square(counts: dict, expected_probs: dict, total: int) -> tuple[float, int]:
    """Pearson's statistic over cells with expected count >= 5 (the rest pooled)."""
    stat, cells, pooled_obs, pooled_exp = 0.0, 0, 0.0, 0.0
    for seq, p in expected_probs.items():
        obs, exp = counts.get(seq, 0), p * total
        if exp >= 5:
            stat += (obs - exp) ** 2 / exp
            cells += 1
        else:
            pooled_obs, pooled_exp = pooled_obs + obs, pooled_exp + exp
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    return stat, cells - 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=3, temperature=1.0, seed=11),
        SamplingParams(max_new_tokens=3, temperature=2.0, top_k=4, top_p=0.9, seed=12),
    ],
    ids=["t1", "t2_topk4_topp0.9"],
)
def test_sampled_speculative_decoding_keeps_the_distribution(params):
    """20k samples of 3 tokens over a 6-token vocabulary, drafted with 2 MTP modules that
    are accepted about a third of the time, against the exact joint distribution of plain sampling.

    The threshold is df + 6 sd of chi-square(df): a correct sampler fails it with
    probability < 1e-6, and the same samples are rejected against a slightly different
    distribution (temperature +15 %), so the test has the power to catch a biased rule
    (drawing the correction from p instead of max(p - q, 0) gives chi2 = 641 and 1527
    against thresholds of 95 and 69).
    """
    model = make_shifted_trunk(num_mtp=2, vocab=6)
    prompt, total = [1, 2], 20_000
    engine = NativeRolloutEngine(model, speculative_tokens=2)
    completions = engine.generate([prompt] * total, params)
    rate = engine.last_spec_stats.metrics()["mtp/accept_rate"]
    assert 0.2 < rate < 0.95, rate  # both branches of the rule are exercised
    counts: dict[tuple[int, ...], int] = {}
    for c in completions:
        counts[tuple(c.token_ids)] = counts.get(tuple(c.token_ids), 0) + 1
    exact = exact_distribution(model, prompt, 3, params)
    stat, df = chi_square(counts, exact, total)
    threshold = df + 6 * math.sqrt(2 * df)
    print(f"chi2 {stat:.1f} df {df} threshold {threshold:.1f} accept_rate {rate:.3f}")
    assert stat < threshold, (stat, df)
    hotter = dataclasses.replace(params, temperature=params.temperature * 1.15)
    wrong_stat, wrong_df = chi_square(counts, exact_distribution(model, prompt, 3, hotter), total)
    print(f"vs temperature x1.15: chi2 {wrong_stat:.1f} df {wrong_df}")
    assert wrong_stat > wrong_df + 6 * math.sqrt(2 * wrong_df), (wrong_stat, wrong_df)


def test_accept_rule_on_constructed_distributions():
    vocab, gen = 5, torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0)
    target = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4, 1e-30]])).expand(2, 3, vocab)
    # q = p: every draft is kept, then one more token from p_K.
    drafts = torch.tensor([[3, 2], [0, 1]])
    q = sampling_probs(target[:, :2], params)
    accepted, _ = speculative_accept(target, drafts, q, params, gen)
    assert accepted.tolist() == [2, 2]
    # A draft the target never samples (p = 0) is always rejected, and the correction is
    # drawn from max(p - q, 0): q is one-hot on token 4, so the correction is p itself.
    q = torch.zeros(2, 2, vocab)
    q[..., 4] = 1.0
    drafts = torch.full((2, 2), 4)
    seen = set()
    for _ in range(50):
        accepted, token = speculative_accept(target, drafts, q, params, gen)
        assert accepted.tolist() == [0, 0]
        seen.update(token.tolist())
    assert seen == {0, 1, 2, 3}
    # Greedy: drafts kept while they equal the target argmax.
    greedy = SamplingParams(temperature=0.0)
    logits = torch.zeros(1, 4, vocab)
    logits[0, torch.arange(4), torch.tensor([2, 3, 1, 0])] = 1.0
    accepted, token = speculative_accept(logits, torch.tensor([[2, 3, 4]]), None, greedy, gen)
    assert (accepted.item(), token.item()) == (2, 1)
    accepted, token = speculative_accept(logits, torch.tensor([[2, 3, 1]]), None, greedy, gen)
    assert (accepted.item(), token.item()) == (3, 0)


def test_stats_merge_and_metrics():
    a = SpecDecodeStats(num_drafts=4, num_draft_tokens=8, accepted_per_pos=[3, 1])
    b = SpecDecodeStats(num_drafts=2, num_draft_tokens=4, accepted_per_pos=[2, 2])
    m = a.merge(b).metrics()
    assert m["mtp/accept_rate"] == pytest.approx(8 / 12)
    assert m["mtp/accept_length"] == pytest.approx(1 + 8 / 6)
    assert m["mtp/accept_rate/pos1"] == pytest.approx(5 / 6)
    assert m["mtp/accept_rate/pos2"] == pytest.approx(3 / 6)


def test_more_drafts_than_mtp_modules_is_refused(model):
    with pytest.raises(ValueError, match="speculative_tokens = 4.*3 MTP"):
        NativeRolloutEngine(model, speculative_tokens=4)
