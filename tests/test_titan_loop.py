"""TorchTitan's own train loop and entry points on CPU (issue #12, item 1).

Both stages run TorchTitan's ``Trainer.train`` (``torchtitan_mtp.platform`` makes it
CPU-safe), so ``[profiling]`` and ``[validation]`` work; torchtitan may be imported before
torchtitan_mtp; TorchTitan's entry ``python -m torchtitan.train --experimental.custom_import
torchtitan_mtp --job.custom_config_module torchtitan_mtp`` builds our model and writes its
seed checkpoint, and TorchTitan's ``main`` trains with our trainer class. (That entry
cannot train: it runs TorchTitan's plain ``Trainer``, whose step computes
``loss_fn(model(inputs), labels)``; our model returns K + 1 hidden states and the MTP loss
needs the output head's chunked log-probs, ``MTPTrainer.forward_backward_step``.)
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchtitan_mtp.platform import HAS_ACCELERATOR

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "train_configs" / "debug_occ.toml"
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Two SFT steps of the debug model, no RL stage, no checkpoints.
TINY_SFT = [
    "--job.config_file", str(CONFIG), "--training.steps", "2", "--rl.steps", "0",
    "--checkpoint.no-enable", "--metrics.log_freq", "1", "--data.num_heldout", "16",
]  # fmt: skip


def _env(single_process: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    if single_process:  # what torchrun would set, for TorchTitan's entry without it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env |= {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return env


def _run(args: list[str], cwd: Path, single_process: bool = False) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=_env(single_process),
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def profiled_and_validated(tmp_path_factory) -> Path:
    """An SFT job with ``[profiling]`` (a trace at step 2) and ``[validation]`` (every step)."""
    dump = tmp_path_factory.mktemp("titan_loop") / "out"
    args = ["-m", "torchtitan_mtp.train", *TINY_SFT, "--job.dump_folder", str(dump)]
    args += ["--profiling.enable_profiling", "--profiling.profile_freq", "2"]
    args += ["--profiling.profiler_warmup", "0", "--profiling.profiler_active", "1"]
    args += ["--validation.enable", "--validation.freq", "1"]
    _run(args, cwd=ROOT)
    return dump


def test_profiling_writes_a_chrome_trace_during_sft(profiled_and_validated):
    trace = profiled_and_validated / "profile_traces" / "sft" / "iteration_2" / "rank0_trace.json"
    assert trace.is_file(), sorted(p.name for p in profiled_and_validated.rglob("*"))
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)


def test_validation_logs_the_heldout_mtp_loss_every_freq_steps(profiled_and_validated):
    scalars = _scalars(profiled_and_validated / "tb" / "sft")
    for tag in (
        "validation_metrics/loss",
        "validation_metrics/ce_loss/main",
        "validation_metrics/mtp/ce_loss/head1",
        "validation_metrics/mtp/ce_loss/head2",
    ):
        assert sorted(scalars.get(tag, {})) == [1, 2], (tag, sorted(scalars))
    loss = scalars["validation_metrics/loss"]
    main, head1, head2 = (
        scalars[f"validation_metrics/{t}"]
        for t in ("ce_loss/main", "mtp/ce_loss/head1", "mtp/ce_loss/head2")
    )
    for step in (1, 2):  # the SFT objective: CE_0 + (c / K) sum_k CE_k, c = 0.3, K = 2
        expected = main[step] + 0.15 * (head1[step] + head2[step])
        assert loss[step] == pytest.approx(expected, rel=1e-4)
    assert loss[2] < loss[1]  # the model learns from the first steps


def test_importing_torchtitan_first_still_trains_on_cpu(tmp_path):
    code = (
        "import sys, torchtitan.train, torchtitan.tools.utils as utils\n"
        "print('device type before:', utils.device_type)\n"
        "import torchtitan_mtp\n"
        "print('device type after:', utils.device_type)\n"
        "from torchtitan_mtp.train import main\n"
        "main(sys.argv[1:])\n"
    )
    out = _run(["-c", code, *TINY_SFT, "--job.dump_folder", str(tmp_path / "out")], cwd=ROOT)
    if not HAS_ACCELERATOR:  # TorchTitan picked "cuda", adapted after the fact
        assert "device type before: cuda" in out and "device type after: cpu" in out
    assert "step:  2" in out, out[-3000:]
    assert sorted(_scalars(tmp_path / "out" / "tb" / "sft")["mtp/ce_loss/head1"]) == [1, 2]


def test_titan_entry_with_custom_import_writes_a_seed_checkpoint_of_our_model(tmp_path):
    args = ["-m", "torchtitan.train", "--experimental.custom_import", "torchtitan_mtp"]
    args += ["--job.custom_config_module", "torchtitan_mtp", "--job.config_file", str(CONFIG)]
    args += ["--checkpoint.create_seed_checkpoint", "--job.dump_folder", str(tmp_path / "out")]
    out = _run(args, cwd=ROOT, single_process=True)
    assert "Created seed checkpoint" in out
    assert "Building mtp_transformer debug" in out
    assert (tmp_path / "out" / "checkpoint" / "step-0" / ".metadata").is_file()


def test_titan_main_trains_with_our_trainer_class(tmp_path):
    code = (
        "from torchtitan.train import main\n"
        "from torchtitan_mtp.train import MTPTrainer\n"
        "main(MTPTrainer)\n"
    )
    args = ["-c", code, *TINY_SFT, "--job.custom_config_module", "torchtitan_mtp"]
    _run([*args, "--job.dump_folder", str(tmp_path / "out")], cwd=ROOT, single_process=True)
    scalars = _scalars(tmp_path / "out" / "tb" / "sft")
    assert sorted(scalars["mtp/ce_loss/head2"]) == [1, 2]
