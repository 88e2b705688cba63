"""The decoder runs the model's own modules: its KV-cache steps equal the training forward."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from torchtitan_mtp.models import MTPTransformer, mtp_flavors
from torchtitan_mtp.models.decode import Decoder, FewRowsLinear
from torchtitan_mtp.rollout import NativeRolloutEngine, SamplingParams

VOCAB, SEQ, NUM_MTP = 64, 10, 2
# Positions fed per call, per row (T tokens a call; rows advance differently and re-feed
# a position, as the engine's rows do): prefill, one-token steps, verification steps.
SCHEDULE = [
    [[0, 1, 2, 3], [0, 1, 2, 3]],
    [[4], [3]],
    [[5, 6, 7], [4, 5, 6]],
    [[8, 9], [7, 8]],
    [[9], [9]],
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one intra-op thread (see conftest)."""


def build(**overrides) -> MTPTransformer:
    """A tiny random float64 model, perturbed away from TorchTitan's near-uniform init."""
    args = dataclasses.replace(
        mtp_flavors["debug"], vocab_size=VOCAB, max_seq_len=32, num_mtp_modules=NUM_MTP
    )
    torch.manual_seed(0)
    model = MTPTransformer(dataclasses.replace(args, **overrides))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.double()


@torch.no_grad()
@pytest.mark.parametrize(
    "overrides",
    [{}, {"mtp_mask_first_embedding": True}, {"qk_norm": False, "qkv_bias": True}],
    ids=["qk_norm", "position0_masked", "qkv_bias"],
)
@pytest.mark.parametrize("static", [False, True], ids=["end_after_last", "end_at_length"])
def test_kv_cache_steps_equal_the_training_forward(overrides, static):
    """Trunk steps of 1 to 4 tokens at per-row positions, then MTP modules 1..K in two
    chunks: norm(h^k) equals the training forward's output k at every position. With
    ``static`` every step attends over the whole cache (the shapes a compiled step needs)."""
    model = build(**overrides)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    reference = model(tokens)  # K + 1 normalised hidden states [2, SEQ, D]
    decoder = Decoder(model.model_args, NUM_MTP)
    with decoder.bound(model, batch=2, length=SEQ) as dec:
        h = torch.zeros(2, SEQ, model.model_args.dim, dtype=torch.float64)
        for step in SCHEDULE:
            positions = torch.tensor(step)
            end = SEQ if static else int(positions.max()) + 1
            h_new, normed = dec.trunk(tokens.gather(1, positions), positions, end)
            rows = torch.arange(2)[:, None]
            torch.testing.assert_close(normed, reference[0][rows, positions])
            h[rows, positions] = h_new
        for k in range(1, NUM_MTP + 1):
            shifted = torch.cat([tokens[:, k:], tokens.new_zeros(2, k)], dim=1)  # t_{i+k}
            outputs = []
            for chunk in (slice(0, 6), slice(6, SEQ)):
                positions = torch.arange(SEQ)[chunk].expand(2, -1)
                end = SEQ if static else chunk.stop
                h_k, normed = dec.mtp(k, h[:, chunk], shifted[:, chunk], positions, end)
                outputs.append((h_k, normed))
            h = torch.cat([o[0] for o in outputs], dim=1)
            torch.testing.assert_close(torch.cat([o[1] for o in outputs], dim=1), reference[k])
        torch.testing.assert_close(dec.logits(reference[1]), model.output(reference[1]).float())


def test_engine_holds_no_weights_or_kv_cache_between_generations():
    model = build()
    engine = NativeRolloutEngine(model, speculative_tokens=1)
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert engine.decoder.embedding is None
    assert engine.decoder.trunk_caches == [] and engine.decoder.mtp_caches == []


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 2), (1, 4), (1, 5), (3, 3)])
def test_weight_stationary_few_row_linear_equals_f_linear(shape):
    """Up to max_rows rows the decoder computes weight @ x^T; same values as F.linear,
    on both sides of the block threshold (4) and under the head's (64)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    x = torch.randn(*shape, 32)
    for max_rows in (4, 64):
        linear = FewRowsLinear(max_rows)
        linear.weight = weight
        torch.testing.assert_close(linear(x), F.linear(x, weight))
        linear.bias = bias
        got = linear(x)
        torch.testing.assert_close(got, F.linear(x, weight, bias))
        assert got.shape == (*shape, 48)
