"""Train-step cost of MTP heads, and log-prob memory by token budget, in one run.

Two tables, every figure a ratio measured side by side in this process:

1. **Throughput**: one SFT micro-batch and one RL micro-batch, forward + backward (the
   optimizer step, once per mini-batch, is left out), with K = 0, 1, 2 MTP modules on the
   same trunk. The variants are interleaved (K = 0, 1, 2, K = 0, 1, 2, ...) and each
   time is the median of ``--repeats``. Printed next to each time ratio: the FLOP ratio of
   what the step executes (``step_flops``: matmuls and attention, TorchTitan's
   convention; the output head's logits recomputed in backward included) and the model
   FLOP ratio without that recompute.
2. **Log-prob memory**: ``vocab_stats`` under the ``[mtp] logprob_chunk_tokens`` budget
   against naive full logits, for ``--memory-heads`` heads x ``--memory-tokens`` tokens at
   vocabulary ``--memory-vocab`` (defaults: 2 x 2048 at 151,936, Qwen3's), forward +
   backward of every head's log-probs and the main head's entropy. Peak bytes above what
   was allocated before: on CUDA the caching allocator's ``max_memory_allocated``; on CPU
   ``PeakTensorBytes``, which counts every tensor storage an op creates from its creation
   until it is freed (a weak reference's callback), so it is the peak of the tensors
   alive at once (not the allocator's cache, nor kernels' private scratch space). Both
   paths' values and gradients are checked equal.

    python benchmarks/train_step.py                  # CPU: dim 256, 4 layers, vocab 8192
    python benchmarks/train_step.py --device cuda    # the same on a GPU
    python benchmarks/train_step.py --tiny           # seconds (the test's mode)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import weakref
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import torchtitan_mtp  # noqa: F401  (first: adapts TorchTitan to CPU before its import)
from torchtitan_mtp.config import MTP, RL
from torchtitan_mtp.losses import MTPCrossEntropy
from torchtitan_mtp.models import MTPTransformer, mtp_flavors, token_logprobs
from torchtitan_mtp.models.args import MTPModelArgs
from torchtitan_mtp.models.logprobs import IGNORE_INDEX, target_mask, vocab_stats
from torchtitan_mtp.rl.objective import RLObjective, RolloutBatch
from torchtitan_mtp.rl.occ import OCCCalibrator

MiB = 2**20


# ---------------------------------------------------------------- FLOPs


def _linear_params(module: torch.nn.Module) -> int:
    """Weights of the matmuls in ``module`` (2-D parameters: projections, not norms)."""
    return sum(p.numel() for p in module.parameters() if p.dim() == 2)


def step_flops(model: MTPTransformer, seq: int, regime: str, estimator: str, recompute: bool):
    """FLOPs per token of one forward + backward of ``model`` on [*, seq] tokens.

    Matmuls cost 2 per weight forward and 4 backward (input and weight gradients);
    attention 4 * seq * heads * head_dim forward (full matrix, TorchTitan's convention).
    The output head runs once per head: 2 D V forward, backward 4 D V, or 2 D V for an MTP
    head whose weight is detached (``detach``), plus 2 D V recomputed (``recompute``).
    With K > 0 the "output_grad" OCC estimator evaluates every head's logits once more and
    one [V, D] product per head (4 D V, no backward).
    """
    args, heads = model.model_args, model.num_mtp_modules + 1
    attention = 4 * seq * args.n_heads * args.head_dim
    blocks = [model.layers[str(i)] for i in range(args.n_layers)] + list(model.mtp.values())
    body = sum(2 * _linear_params(b) + attention for b in blocks)
    head = 2 * args.dim * args.vocab_size
    head_backward = 2 * head + (heads - 1) * (head if regime == "detach" else 2 * head)
    flops = 3 * body + heads * head + head_backward + (heads * head if recompute else 0)
    if heads > 1 and estimator == "output_grad":
        flops += heads * 2 * head
    return flops


# ---------------------------------------------------------------- throughput


def bench_model(args: MTPModelArgs, k: int, device: torch.device) -> MTPTransformer:
    """The same trunk for every K (the trunk is initialised before the MTP modules)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = MTPTransformer(dataclasses.replace(args, num_mtp_modules=k))
    model.init_weights()
    return model


def sft_step(model: MTPTransformer, tokens: torch.Tensor, regime: str, coefficient: float):
    """One SFT micro-batch as ``MTPTrainer.forward_backward_step``: tokens [B, S + 1]."""
    detach, heads = regime == "detach", model.num_mtp_modules + 1
    labels = tokens[:, 1:]
    counts = target_mask(labels, heads, None).sum(dim=(1, 2))
    hidden = model(tokens[:, :-1], detach_mtp_inputs=detach)
    stats = token_logprobs(model, hidden, labels, detach_mtp_head=detach)
    loss, _ = MTPCrossEntropy(coefficient, heads - 1)(stats, counts)
    (stats.top1 & stats.mask).sum(dim=(1, 2)).tolist()
    loss.backward()


def rl_batch(model: MTPTransformer, tokens: torch.Tensor, prompt: int) -> RolloutBatch:
    """A rollout micro-batch: tokens [B, S + 1], labels on the response (after ``prompt``),
    advantages +-1, behaviour log-probs the model's own plus noise (so ratios clip)."""
    gen = torch.Generator().manual_seed(1)
    labels = tokens[:, 1:].clone()
    labels[:, : prompt - 1] = IGNORE_INDEX
    rows = tokens.shape[0]
    sign = torch.where(torch.arange(rows) % 2 == 0, 1.0, -1.0)[:, None].to(tokens.device)
    adv = (sign * (labels != IGNORE_INDEX)).float()
    with torch.no_grad():
        logp = token_logprobs(model, model(tokens[:, :-1])[:1], labels).logp[0]
    old = logp + 0.3 * torch.randn(logp.shape, generator=gen).to(logp.device)
    return RolloutBatch(tokens[:, :-1], labels, adv, old.clone(), old_logp=old)


def rl_step(objective: RLObjective, model: MTPTransformer, batch: RolloutBatch) -> None:
    """One RL micro-batch as ``RLTrainer``'s update: ``RLObjective`` forward, backward."""
    mask = target_mask(batch.labels, model.num_mtp_modules + 1, None)
    counts = {"tokens": mask.sum(dim=(1, 2)).float(), "seqs": mask.any(dim=2).sum(dim=1).float()}
    objective(model, batch, counts, objective.new_stats()).backward()
    objective.records.clear()


def throughput_rows(opts, device: torch.device) -> list[dict]:
    args = dataclasses.replace(
        mtp_flavors["debug"],
        vocab_size=opts.vocab,
        dim=opts.dim,
        n_layers=opts.layers,
        n_heads=opts.dim // 64,
        n_kv_heads=max(1, opts.dim // 128),
        head_dim=64,
        hidden_dim=3 * opts.dim,
        max_seq_len=opts.seq + 1,
        logprob_chunk_tokens=opts.chunk_tokens,
    )
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, opts.vocab, (opts.batch, opts.seq + 1), generator=gen).to(device)
    mtp = MTP()
    variants = []
    for k in opts.ks:
        model = bench_model(args, k, device)
        base = mtp.coefficient / max(k, 1)
        calibrator = OCCCalibrator(base=base, estimator=opts.estimator)
        objective = RLObjective(RL(), opts.regime, k, base, calibrator)
        batch = rl_batch(model, tokens, opts.prompt)
        steps = {
            "sft": lambda m=model: sft_step(m, tokens, opts.regime, mtp.coefficient),
            "rl": lambda m=model, o=objective, b=batch: rl_step(o, m, b),
        }
        variants.append((k, model, steps))
    times: dict[tuple[int, str], list[float]] = defaultdict(list)
    for repeat in range(opts.warmup + opts.repeats):
        for k, model, steps in variants:
            for kind, step in steps.items():
                seconds = timed(step, device, opts.clock, opts.bf16)
                model.zero_grad(set_to_none=True)
                if repeat >= opts.warmup:
                    times[k, kind].append(seconds)
    rows = []
    for k, model, _ in variants:
        row = {"k": k}
        for kind in ("sft", "rl"):
            row[kind] = statistics.median(times[k, kind])
        for recompute in (True, False):
            row[f"flops_{recompute}"] = step_flops(
                model, opts.seq, opts.regime, opts.estimator, recompute
            )
        rows.append(row)
    return rows


def timed(step: Callable[[], None], device: torch.device, clock: str, bf16: bool) -> float:
    """Seconds of ``step``: wall clock (CUDA synchronised), or this process's CPU time;
    ``bf16``: under bfloat16 autocast, TorchTitan's mixed precision without FSDP."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    now = time.process_time if clock == "cpu" else time.perf_counter
    sync()
    t0 = now()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        step()
    sync()
    return now() - t0


# ---------------------------------------------------------------- memory


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages allocated inside the mode and alive at the same time.

    Every op's output storages that are not one of its inputs' (views and in-place
    results share their input's) are new allocations: each is counted from then on and
    uncounted when it is freed (a weak reference's callback: PyTorch keeps a storage's
    Python object alive as long as the storage). Tensors that existed before the mode are
    not counted, nor memory a kernel uses internally.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.bytes = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _ptr(t) not in inputs:
                self._count(t.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:
            return

        def freed(_, key=key, size=size) -> None:
            self.bytes -= size
            self.live.pop(key, None)

        self.live[key] = weakref.ref(storage, freed)
        self.bytes += size
        self.peak = max(self.peak, self.bytes)


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def naive_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """hidden [H, N, D], weight [V, D], labels [H, N] -> (logp [H, N], main entropy [N]),
    every head's float32 [N, V] logits alive at once."""
    logp = F.linear(hidden, weight).float().log_softmax(dim=-1)  # [H, N, V]
    entropy = -(logp[0].exp() * logp[0]).sum(dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), entropy


def budget_stats(hidden, weight, labels, chunk_tokens: int):
    """The same through ``vocab_stats`` (the output head's path), per head."""
    logp = [
        vocab_stats(h, weight, y, chunk_tokens, entropy=i == 0)
        for i, (h, y) in enumerate(zip(hidden, labels, strict=True))
    ]
    return torch.stack([s.logp for s in logp]), logp[0].entropy


def memory_row(opts, device: torch.device) -> dict:
    """Peak bytes of forward + backward of both paths on the same inputs."""
    gen = torch.Generator().manual_seed(2)
    heads, n, vocab, dim = opts.memory_heads, opts.memory_tokens, opts.memory_vocab, opts.memory_dim
    hidden = torch.randn(heads, n, dim, generator=gen).to(device)
    weight = (torch.randn(vocab, dim, generator=gen) * dim**-0.5).to(device)
    labels = torch.randint(0, vocab, (heads, n), generator=gen).to(device)
    g_logp = torch.randn(heads, n, generator=gen).to(device)
    g_ent = torch.randn(n, generator=gen).to(device)
    row = {}
    for name, fn in (("naive", naive_stats), ("budget", budget_stats)):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        args = (h, w, labels) if name == "naive" else (h, w, labels, opts.chunk_tokens)

        def run(fn=fn, args=args) -> torch.Tensor:
            logp, entropy = fn(*args)
            ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
            return logp.detach()

        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            logp = run()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            with PeakTensorBytes() as meter:
                logp = run()
            peak = meter.peak
        row[name] = {"peak": peak, "s": time.perf_counter() - t0, "grads": (logp, h.grad, w.grad)}
        del h, w, logp
    for a, b in zip(row["naive"].pop("grads"), row["budget"].pop("grads"), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    return row


# ---------------------------------------------------------------- main


def print_tables(opts, rows: list[dict], memory: dict, device: torch.device) -> None:
    tokens = opts.batch * opts.seq
    print(
        f"\nthroughput: dim {opts.dim}, {opts.layers} layers, vocab {opts.vocab}, "
        f"{opts.batch} x {opts.seq} tokens per micro-batch (RL: labels after a {opts.prompt}-"
        f"token prompt), regime {opts.regime}, OCC estimator {opts.estimator}, "
        f"logprob_chunk_tokens {opts.chunk_tokens}, {device.type}"
        f"{' bf16 autocast' if opts.bf16 else ' float32'}, "
        f"{torch.get_num_threads()} threads, {opts.clock} clock, median of {opts.repeats} "
        "interleaved repeats"
    )
    header = (
        "| K | SFT tokens/s | SFT time / K=0 | RL tokens/s | RL time / K=0 "
        "| FLOP ratio (executed) | FLOP ratio (model) |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    first = rows[0]
    for r in rows:
        print(
            f"| {r['k']} | {tokens / r['sft']:12.0f} | {r['sft'] / first['sft']:13.3f}x "
            f"| {tokens / r['rl']:11.0f} | {r['rl'] / first['rl']:12.3f}x "
            f"| {r['flops_True'] / first['flops_True']:20.3f}x "
            f"| {r['flops_False'] / first['flops_False']:17.3f}x |"
        )
    naive, budget = memory["naive"], memory["budget"]
    print(
        f"\nlog-prob memory: {opts.memory_heads} heads x {opts.memory_tokens} tokens, vocab "
        f"{opts.memory_vocab}, dim {opts.memory_dim}, forward + backward (log-probs of every "
        f"head, the main head's entropy), peak bytes above the start "
        f"({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'PeakTensorBytes'})"
    )
    print("| path | peak MiB | seconds |")
    print("|------|----------|---------|")
    print(f"| naive full logits | {naive['peak'] / MiB:.1f} | {naive['s']:.2f} |")
    print(f"| token budget {opts.chunk_tokens} | {budget['peak'] / MiB:.1f} | {budget['s']:.2f} |")
    print(f"memory ratio (token budget / naive): {budget['peak'] / naive['peak']:.3f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, one repeat: seconds")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt", type=int, default=64, help="RL: prompt tokens (no labels)")
    p.add_argument("--ks", default="0,1,2", help="comma-separated MTP module counts")
    p.add_argument("--regime", default="occ", choices=["detach", "ce", "policy", "occ"])
    p.add_argument("--estimator", default="ratio_of_means", help="OCC estimator (flagship's)")
    p.add_argument("--chunk-tokens", type=int, default=MTP.logprob_chunk_tokens)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time, steadier on a shared CPU machine (use one thread)",
    )
    p.add_argument("--bf16", action="store_true", help="throughput under bfloat16 autocast")
    p.add_argument("--memory-heads", type=int, default=2)
    p.add_argument("--memory-tokens", type=int, default=2048)
    p.add_argument("--memory-vocab", type=int, default=151936)
    p.add_argument("--memory-dim", type=int, default=64)
    opts = p.parse_args(argv)
    if opts.tiny:
        opts.dim, opts.layers, opts.vocab, opts.batch, opts.seq, opts.prompt = 64, 2, 512, 2, 32, 8
        opts.repeats, opts.warmup, opts.chunk_tokens = 1, 0, 16
        opts.memory_tokens, opts.memory_vocab, opts.memory_dim = 64, 1024, 16
    opts.ks = [int(k) for k in opts.ks.split(",")]
    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    memory = memory_row(opts, device)
    rows = throughput_rows(opts, device)
    print_tables(opts, rows, memory, device)


if __name__ == "__main__":
    main()
