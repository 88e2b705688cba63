"""benchmarks/train_step.py: its tiny mode runs and prints both tables, its CPU memory
meter counts what is allocated, and by that meter the output head's live logits stay
within the token budget whatever the number of tokens."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from torchtitan_mtp.config import RL
from torchtitan_mtp.models import mtp_flavors
from torchtitan_mtp.models.model import OutputHead
from torchtitan_mtp.rl.objective import RLObjective
from torchtitan_mtp.rl.occ import OCCCalibrator

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import train_step  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one intra-op thread (see conftest)."""


def test_tiny_mode_prints_k0_k1_k2_rows_and_a_memory_ratio_below_one(capsys):
    train_step.main(["--tiny", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x |" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["0", "1", "2"], out
    flop_ratios = [float(row.split("|")[-3].strip().rstrip("x")) for row in rows]
    assert flop_ratios[0] == 1.0 and 1.0 < flop_ratios[1] < flop_ratios[2], out
    ratio = float(out.split("memory ratio (token budget / naive):")[1].split()[0])
    assert 0 < ratio < 1, out


def test_peak_tensor_bytes_counts_new_storages_until_freed_not_views():
    before = torch.zeros(1000, dtype=torch.uint8)
    with train_step.PeakTensorBytes() as meter:
        before.add_(1).view(10, 100)  # in place and a view: nothing new
        a = torch.empty(1000, dtype=torch.uint8)
        b = a.view(10, 100)
        c = torch.empty(500, dtype=torch.uint8)
        del a, b
        d = torch.empty(200, dtype=torch.uint8)
    assert meter.peak == 1500 and meter.bytes == 700
    del c, d


@pytest.mark.parametrize("batch", [2, 16])
def test_live_logits_stay_within_the_token_budget_whatever_the_batch(batch):
    heads, seq, dim, vocab, budget = 2, 32, 8, 512, 16
    head = OutputHead(dim, vocab, chunk_tokens=budget)
    torch.nn.init.normal_(head.weight)
    hidden = torch.randn(heads, batch, seq, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (heads, batch, seq))
    with train_step.PeakTensorBytes() as meter:
        stats = head(hidden, labels, entropy=True)
        (stats.logp.sum() + stats.entropy.sum()).backward()
    tokens = heads * batch * seq
    # Two [budget, V] float32 blocks (logits and their exp, for the entropy), the weight's
    # gradient [V, D], and per token only statistics and a few copies of hidden's gradient
    # (select and cat backward): 8 D + 16 floats, a sixth of one float32 row of logits.
    per_token = 4 * (8 * dim + 16)
    bound = 2 * budget * vocab * 4 + vocab * dim * 4 + tokens * per_token
    assert meter.peak <= bound, (meter.peak, bound)


@pytest.mark.parametrize("regime", ["detach", "occ"])
def test_step_flops_equal_the_matmuls_torch_counts_in_an_rl_step(regime):
    seq, dim, vocab, layers = 32, 64, 512, 2
    args = dataclasses.replace(
        mtp_flavors["debug"], vocab_size=vocab, dim=dim, n_layers=layers, n_heads=1,
        n_kv_heads=1, head_dim=64, max_seq_len=seq + 1, logprob_chunk_tokens=16,
    )  # fmt: skip
    tokens = torch.randint(0, vocab, (2, seq + 1), generator=torch.Generator().manual_seed(0))
    for k in (0, 2):
        model = train_step.bench_model(args, k, torch.device("cpu"))
        calibrator = OCCCalibrator(base=0.1, estimator="ratio_of_means")
        objective = RLObjective(RL(), regime, k, 0.1, calibrator)
        batch = train_step.rl_batch(model, tokens, 8)
        with FlopCounterMode(display=False) as counter:
            train_step.rl_step(objective, model, batch)
        # On CPU the counter has no formula for the flash-attention kernel nor for the
        # in-place addmm_ of the head's weight gradient: add them by hand.
        attention = 3 * 4 * seq * 64 * (layers + k)
        weight_grads = 1 if regime == "detach" else k + 1
        counted = counter.get_total_flops() / tokens[:, 1:].numel()
        counted += attention + weight_grads * 2 * dim * vocab
        assert counted == train_step.step_flops(model, seq, regime, "ratio_of_means", True)
