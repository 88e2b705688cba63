"""The docs a user follows (issue #12): the SLURM script, the generated config reference and
the metrics glossary, each checked against what the code does."""

import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

from torchtitan_mtp import config
from torchtitan_mtp.reference import COMMAND, field_docs, render

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
GLOSSARY = ROOT / "docs" / "metrics.md"
REFERENCE = ROOT / "docs" / "config_reference.md"
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_VARS = ("NGPU", "NNODES", "RDZV_HOST", "RDZV_PORT", "CONFIG_FILE", "LOG_RANK", "REPO")


def _env(drop: tuple[str, ...] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


# ---------------------------------------------------------------- scripts/slurm/train.sbatch


def test_sbatch_script_is_valid_bash_with_one_task_per_node():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in header


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "$FAKE_LOG"\n{body}\n')
    path.chmod(0o755)


def test_sbatch_script_runs_torchrun_with_the_rendezvous_of_the_slurm_job(tmp_path):
    # sbatch runs a spool copy of the script in the submission directory; srun runs the
    # command on each node (here once), and run_train.sh then execs torchrun.
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    _fake(bin_dir, "scontrol", r"printf 'gpu-07\ngpu-08\n'")
    _fake(bin_dir, "srun", 'while [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"')
    _fake(bin_dir, "torchrun", "")
    spool = tmp_path / "spool" / "slurm_script"
    spool.parent.mkdir()
    shutil.copy(SBATCH, spool)
    env = _env(drop=DIST_VARS + LAUNCH_VARS) | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-[07-08]",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "32",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
    args = ["--job.config_file", "train_configs/occ.toml", "--rl.steps", "3"]
    proc = subprocess.run(
        ["bash", str(spool), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "scontrol show hostnames gpu-[07-08]"
    assert calls[1].startswith("srun --nodes=2 --ntasks-per-node=1 ")
    assert "--cpus-per-task=32" in calls[1]
    torchrun = calls[2]
    rdzv = "--nnodes 2 --rdzv_backend c10d --rdzv_endpoint gpu-07:29500 --rdzv_id 4242"
    assert torchrun.startswith(f"torchrun {rdzv} --nproc_per_node 8 "), torchrun
    config_file = ROOT / "train_configs" / "occ.toml"
    assert torchrun.endswith(
        f"-m torchtitan_mtp.train --job.config_file {config_file} --rl.steps 3"
    )


# ---------------------------------------------------------------- docs/config_reference.md


def test_config_reference_is_up_to_date():
    checked_in = REFERENCE.read_text() if REFERENCE.exists() else ""
    assert checked_in == render(), f"{REFERENCE} is stale; regenerate it: {COMMAND}"


def test_config_reference_takes_subclass_docstrings_and_lists_limits():
    docs = field_docs(config.Model)
    assert docs["name"].startswith("The TrainSpec")  # ours over TorchTitan's "Which model"
    assert docs["converters"].startswith("Comma separated list of converters")  # TorchTitan's
    text = render()
    assert "- **`max_norm`** (`float | int`, default `1.0`, allowed: > 0):" in text
    assert '- **`name`** (`str`, default `"AdamW"`, allowed: one of "Adam", "AdamW"):' in text
    assert "- **`clip_ratio_low`** (`float`, default `0.2`, allowed: >= 0, < 1):" in text


# ---------------------------------------------------------------- docs/metrics.md

# Glossary entries the tiny job below cannot log, and the setting each needs.
NEEDS_OTHER_SETTINGS = {
    ("sft", "validation_metrics/loss"): "[validation] enable",
    ("sft", "validation_metrics/ce_loss/main"): "[validation] enable",
    ("sft", "validation_metrics/mtp/ce_loss/head{k}"): "[validation] enable",
    ("sft", "validation_metrics/throughput(tps)"): "[validation] enable",
    ("sft", "validation_metrics/memory/max_active(GiB)"): "[validation] enable",
    ("sft", "validation_metrics/memory/max_active(%)"): "[validation] enable",
    ("sft", "validation_metrics/memory/max_reserved(GiB)"): "[validation] enable",
    ("sft", "validation_metrics/memory/max_reserved(%)"): "[validation] enable",
    ("rl", "rollout/tis_weight_mean"): "[rl] tis_imp_ratio_cap",
    ("rl", "rollout/tis_truncated_fraction"): "[rl] tis_imp_ratio_cap",
    ("rl", "mtp/draft_loss/head{k}"): '[mtp] draft_loss = "ce"',
    ("rl", "reward/<reason>"): '[reward] function = "math_verify"',
    ("rl", "eval/<set>/avg@{n}"): "[eval] samples",
    ("rl", "eval/<set>/pass@{n}"): "[eval] samples",
}


def _placeholder_values() -> dict[str, str]:
    from torchtitan_mtp.rewards import REASONS

    estimators = typing.get_args(typing.get_type_hints(config.OCC)["estimator"])
    return {
        "<estimator>": "|".join(estimators),
        "<reason>": "|".join(REASONS),
        "<set>": "heldout|aime2025",  # the sets [eval] sets accepts
    }


def _glossary() -> dict[str, dict[str, re.Pattern]]:
    """{run: {glossary tag: its regex}} from the tables under "## ...: `tb/<run>`"."""
    values = _placeholder_values()
    out: dict[str, dict[str, re.Pattern]] = {}
    run = None
    for line in GLOSSARY.read_text().splitlines():
        if line.startswith("## "):
            found = re.search(r"`tb/(\w+)`$", line)
            run = found.group(1) if found else None
            out.setdefault(run, {})
        elif run and (row := re.match(r"\| `([^`]+)` \|", line)):
            tag = row.group(1)
            parts = re.split(r"(\{[a-z]\}|<[a-z]+>)", tag)
            pattern = "".join(
                ("[1-9][0-9]*" if p.startswith("{") else f"(?:{values[p]})")
                if i % 2
                else re.escape(p)
                for i, p in enumerate(parts)
            )
            out[run][tag] = re.compile(pattern)
    return out


def _logged_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return set(events.Tags()["scalars"])


def test_metrics_glossary_matches_the_tags_a_tiny_job_logs(tmp_path):
    glossary = _glossary()
    assert set(glossary) >= {"sft", "rl"}
    for run, tag in NEEDS_OTHER_SETTINGS:
        assert tag in glossary[run], f"NEEDS_OTHER_SETTINGS lists {tag}, not in {GLOSSARY}"
    # SFT logs every step; RL: MTP heads, speculative rollouts, OCC, eval and exact products.
    cmd = [sys.executable, "-m", "torchtitan_mtp.train"]
    cmd += ["--job.config_file", str(ROOT / "train_configs" / "debug_occ.toml")]
    cmd += ["--training.steps", "4", "--rl.steps", "2", "--rl.prompts_per_step", "4"]
    cmd += ["--eval.every_steps", "2", "--rl.diagnostics_every", "2", "--metrics.log_freq", "1"]
    cmd += ["--data.num_heldout", "256"]
    cmd += ["--job.dump_folder", str(tmp_path / "out")]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=_env(drop=DIST_VARS), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in ("sft", "rl"):
        logged = _logged_tags(tmp_path / "out" / "tb" / run)
        entries = glossary[run]
        missing = sorted(t for t in logged if not any(p.fullmatch(t) for p in entries.values()))
        assert not missing, f"tb/{run} logs tags {GLOSSARY} does not list: {missing}"
        silent = sorted(
            tag
            for tag, pattern in entries.items()
            if (run, tag) not in NEEDS_OTHER_SETTINGS and not any(map(pattern.fullmatch, logged))
        )
        assert not silent, f"{GLOSSARY} lists tags tb/{run} did not log: {silent}"
