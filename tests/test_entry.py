"""The job entry points as a user launches them (issue #11): without torchrun, through
run_train.sh from another directory, and bad prompt data refused before any training."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "train_configs" / "debug_occ.toml"
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_python_m_train_runs_as_one_process_without_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torchtitan_mtp.train", "--job.config_file", str(CONFIG)]
    cmd += ["--training.steps", "4", "--rl.steps", "1", "--rl.prompts_per_step", "4"]
    cmd += ["--eval.every_steps", "0", "--data.num_heldout", "256"]
    cmd += ["--job.dump_folder", str(tmp_path / "out")]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoint" / "rl" / "step-1" / ".metadata").is_file()
    # The standalone evaluation of the same job, also without torchrun.
    cmd[2] = "torchtitan_mtp.eval"
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval step 1 | heldout" in proc.stdout + proc.stderr
    assert (tmp_path / "out" / "tb" / "eval" / "rl").is_dir()


def test_run_train_resolves_a_relative_config_against_the_callers_directory(tmp_path):
    # A config the repo does not have, with one bad value: parsing it (exit 2, naming the
    # file) proves run_train.sh found the caller's file, without training anything.
    mine = tmp_path / "mine.toml"
    mine.write_text(CONFIG.read_text().replace("max_norm = 1.0", "max_norm = -1.0"))
    script = str(ROOT / "run_train.sh")
    for cmd, env in (
        ([script, "--job.config_file", "mine.toml"], {}),
        ([script, "--job.config_file=mine.toml"], {}),
        ([script], {"CONFIG_FILE": "mine.toml"}),
    ):
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=_env() | env, capture_output=True, text=True, timeout=120
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert f"{mine}: training.max_norm = -1.0 is out of range; allowed: > 0" in out, out[-2000:]


def test_a_prompt_that_cannot_fit_stops_the_job_before_sft(tmp_path):
    rows = [{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(36)]
    rows[4]["question"] = "1" * 1_000_000 + "+1="
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "torchtitan_mtp.train", "--job.config_file", str(CONFIG)]
    cmd += ["--training.steps", "0", "--data.name", "file", "--data.path", str(data)]
    cmd += ["--data.num_heldout", "4", "--job.dump_folder", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{data}: line 5: the prompt is 1000004 tokens" in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "checkpoint").exists()
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_a_stuck_rank_fails_the_job_after_comm_train_timeout_seconds(tmp_path):
    # Rank 1 hangs in its reward function from RL step 2 on; rank 0 waits in the step's
    # all-reduce until [comm] train_timeout_seconds (set after the first step) ends it.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["-m", "torchtitan_mtp.train", "--job.config_file", str(CONFIG)]
    cmd += ["--training.steps", "0", "--rl.steps", "50", "--rl.prompts_per_step", "8"]
    cmd += ["--eval.every_steps", "0", "--reward.function", "tests._stuck_reward:score"]
    cmd += ["--comm.train_timeout_seconds", "5", "--job.dump_folder", str(tmp_path / "out")]
    env = _env() | {"PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "Timed out waiting 5000ms" in out, out[-3000:]
    assert elapsed < 120, elapsed  # not the 300 s init timeout, not forever
