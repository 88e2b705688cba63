"""Real multi-process runs of the SFT entry on gloo (torchrun --nproc_per_node 2).

The metrics are read back from the TensorBoard files the runs write.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "train_configs" / "debug_occ.toml"
TAGS = ("loss_metrics/global_avg_loss", "grad_norm", "mtp/ce_loss/head1", "mtp/ce_loss/head2")


def run_train(dump: Path, nproc: int, *overrides: str, expect_ok: bool = True) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "torchtitan_mtp.train",
        "--job.config_file",
        str(CONFIG),
        "--job.dump_folder",
        str(dump),
        "--metrics.log_freq",
        "1",
        "--checkpoint.interval",
        "1000",
        "--rl.steps",
        "0",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == expect_ok, output[-6000:]
    return output


def scalars(dump: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(dump / "tb" / "sft"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in TAGS}


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("seed")
    run_train(dump, 1, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint")
    return dump / "checkpoint" / "sft" / "step-0"


def test_single_process_fsdp2_and_tp2_agree_for_three_sft_steps(tmp_path, seed_checkpoint):
    common = (
        "--training.steps",
        "3",
        "--checkpoint.enable",
        "--checkpoint.last_save_model_only",
        "--checkpoint.initial_load_path",
        str(seed_checkpoint),
    )
    layouts = {
        "single": (1, "8", "1", "1"),
        "fsdp2": (2, "4", "2", "1"),
        "tp2": (2, "8", "1", "2"),
    }
    results = {}
    for name, (nproc, batch, dp, tp) in layouts.items():
        run_train(
            tmp_path / name,
            nproc,
            *common,
            "--training.local_batch_size",
            batch,
            "--parallelism.data_parallel_shard_degree",
            dp,
            "--parallelism.tensor_parallel_degree",
            tp,
        )
        results[name] = scalars(tmp_path / name)
    reference = results["single"]
    assert len(reference["grad_norm"]) == 3
    assert (
        reference["loss_metrics/global_avg_loss"][2] < reference["loss_metrics/global_avg_loss"][0]
    )
    for name in ("fsdp2", "tp2"):
        for tag in TAGS:
            assert results[name][tag] == pytest.approx(reference[tag], rel=1e-4), (name, tag)


def test_resume_from_checkpoint_reproduces_the_next_steps(tmp_path, seed_checkpoint):
    args = (
        "--training.steps",
        "4",
        "--training.local_batch_size",
        "4",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "2",
        "--checkpoint.initial_load_path",
        str(seed_checkpoint),
    )
    run_train(tmp_path / "full", 2, *args)
    sft = Path("checkpoint") / "sft"
    (tmp_path / "resumed" / sft).mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / sft / "step-2", tmp_path / "resumed" / sft / "step-2")
    # An interrupted save (no DCP .metadata yet) must be skipped, not loaded.
    (tmp_path / "resumed" / sft / "step-3").mkdir()
    (tmp_path / "resumed" / sft / "step-3" / "__0_0.distcp").write_bytes(b"partial")
    run_train(tmp_path / "resumed", 2, *args)
    full, resumed = scalars(tmp_path / "full"), scalars(tmp_path / "resumed")
    assert len(resumed["grad_norm"]) == 2  # steps 3 and 4 only
    for tag in TAGS:
        assert resumed[tag] == pytest.approx(full[tag][2:], rel=1e-6), tag


def test_non_finite_gradients_stop_training_with_an_error_naming_the_step(tmp_path):
    output = run_train(
        tmp_path,
        1,
        "--training.steps",
        "5",
        "--optimizer.lr",
        "1e30",
        "--lr_scheduler.warmup_steps",
        "0",
        "--checkpoint.no-enable",
        expect_ok=False,
    )
    assert "FloatingPointError: step 2: the gradient norm is nan" in output
