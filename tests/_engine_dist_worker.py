"""Worker of tests/test_native_engine.py: the native engine on FSDP2 and TP layouts (gloo).

Run with ``torchrun --nproc_per_node 2 tests/_engine_dist_worker.py OUT.json``. Every rank
builds the same tiny model from a fixed seed, generates with it unparallelised, then
loads the same weights into an FSDP (dp_shard=2) and a TP (tp=2) copy and generates again.
Rank 0 writes the tokens and log-probs of every layout, plus checks of the parallel
model's state after generation, to OUT.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torchtitan_mtp  # noqa: F401  (first: adapts TorchTitan to CPU before its import)

# isort: split
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor
from torchtitan.distributed import ParallelDims

from torchtitan_mtp.checkpoints.adapter import MTPStateDictAdapter
from torchtitan_mtp.config import MTPJobConfig
from torchtitan_mtp.models import MTPTransformer, mtp_flavors, token_logprobs
from torchtitan_mtp.models.logprobs import IGNORE_INDEX
from torchtitan_mtp.models.parallelize import parallelize_mtp
from torchtitan_mtp.rollout import NativeRolloutEngine, SamplingParams
from torchtitan_mtp.rollout.weight_sync import BucketStats, hf_weight_buckets

ARGS = dataclasses.replace(
    mtp_flavors["debug"], vocab_size=64, max_seq_len=32, num_mtp_modules=1, qkv_bias=True
)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [20]]
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
BUCKET_BYTES = 60_000  # several buckets; the largest tensor (w1) is 48 KiB


def full_state_dict() -> dict[str, torch.Tensor]:
    """The same weights on every rank, with a non-degenerate random perturbation."""
    torch.manual_seed(0)
    model = MTPTransformer(ARGS)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.state_dict()


def parallel_model(sd: dict, dp_shard: int, tp: int) -> MTPTransformer:
    world = dist.get_world_size()
    dims = ParallelDims(
        dp_shard=dp_shard, dp_replicate=1, cp=1, tp=tp, pp=1, ep=1, etp=1, world_size=world
    )
    dims.build_mesh()
    config = MTPJobConfig()
    config.training.seq_len = 16
    config.training.mixed_precision_param = "float32"
    config.activation_checkpoint.mode = "full"  # blocks wrapped: the engine unwraps them
    with torch.device("meta"):
        model = MTPTransformer(ARGS)
    model = parallelize_mtp(model, dims, config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))  # the RoPE cache
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    # set_model_state_dict replaces the values of the dict it is given: pass a copy.
    set_model_state_dict(model, dict(sd), options=options)
    return model


def bucket_digest(model: MTPTransformer) -> dict:
    """The vLLM weight-sync buckets: names, shapes and checksums of the gathered tensors."""
    adapter = MTPStateDictAdapter(ARGS, mtp_layout="mimo")
    stats = BucketStats()
    buckets = [
        [
            (name, list(t.shape), float(t.double().sum()), float(t.double().abs().sum()))
            for name, t in b
        ]
        for b in hf_weight_buckets(model, adapter, BUCKET_BYTES, stats=stats)
    ]
    return {"buckets": buckets, "largest": stats.largest_bucket_bytes, "bytes": stats.bytes}


def run(model: MTPTransformer) -> dict:
    engine = NativeRolloutEngine(model)
    model.train()
    greedy = engine.generate(PROMPTS, GREEDY)
    sampled = engine.generate(PROMPTS, SAMPLED)
    spec = NativeRolloutEngine(model, speculative_tokens=1)
    spec_greedy = spec.generate(PROMPTS, GREEDY)
    spec_sampled = spec.generate(PROMPTS, SAMPLED)
    # The compiled round (traced, run without code generation); refused under TP.
    compiled = NativeRolloutEngine(
        model, speculative_tokens=1, compile_decode="compile", compile_backend="eager"
    )
    try:
        compiled_greedy = [c.token_ids for c in compiled.generate(PROMPTS, GREEDY)]
    except ValueError as e:
        compiled_greedy = str(e)
    result = {
        "greedy": [c.token_ids for c in greedy],
        "greedy_logprobs": [c.logprobs for c in greedy],
        "sampled": [c.token_ids for c in sampled],
        "spec_greedy": [c.token_ids for c in spec_greedy],
        "spec_sampled": [c.token_ids for c in spec_sampled],
        "spec_stats": vars(spec.last_spec_stats),
        "compiled_spec_greedy": compiled_greedy,
        "training_restored": model.training,
        "sync": bucket_digest(model),
    }
    # The model still trains after generation, and its own forward recomputes the
    # engine's log-probs (right-padded prompt + response).
    seqs = [c.prompt_ids + c.token_ids for c in sampled]
    width = max(len(s) for s in seqs)
    width += (width - 1) % 2  # the model's input, width - 1 tokens, splits over 2 TP ranks
    inputs = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width - 1), IGNORE_INDEX, dtype=torch.long)
    for i, (s, c) in enumerate(zip(seqs, sampled, strict=True)):
        inputs[i, : len(s)] = torch.tensor(s)
        start = len(c.prompt_ids) - 1
        labels[i, start : start + len(c.token_ids)] = torch.tensor(c.token_ids)
    stats = token_logprobs(model, model(inputs[:, :-1]), labels)
    stats.logp[0][labels != IGNORE_INDEX].sum().backward()
    engine_logp = torch.zeros_like(stats.logp[0])
    for i, c in enumerate(sampled):
        start = len(c.prompt_ids) - 1
        engine_logp[i, start : start + len(c.token_ids)] = torch.tensor(c.logprobs)
    diff = (stats.logp[0].detach() - engine_logp)[labels != IGNORE_INDEX]
    result["max_logprob_diff"] = float(diff.abs().max())
    result["has_grads"] = all(p.grad is not None for p in model.output.parameters())
    return result


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    sd = full_state_dict()
    single = MTPTransformer(ARGS)
    single.load_state_dict(sd, strict=False)
    results = {"single": run(single)}

    fsdp = parallel_model(sd, dp_shard=dist.get_world_size(), tp=1)
    results["fsdp"] = run(fsdp)
    # Resharded after generation: FSDP-managed parameters are sharded DTensors again.
    results["fsdp"]["resharded"] = all(
        isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in fsdp.parameters()
    )

    tp = parallel_model(sd, dp_shard=1, tp=dist.get_world_size())
    results["tp"] = run(tp)

    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
