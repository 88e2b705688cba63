"""TensorBoard runs per stage, and re-run steps after a resume logged once (issue #11)."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchtitan_mtp.config import MTPJobConfig
from torchtitan_mtp.metrics import StageTensorBoard, stage_log_dir


def _read(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def test_a_resumed_run_replaces_the_steps_it_repeats(tmp_path):
    first = StageTensorBoard(str(tmp_path))
    for step in range(1, 5):
        first.log({"loss": float(step), "lr": 0.1}, step)
    first.close()  # killed after step 4; the last checkpoint was step 2
    resumed = StageTensorBoard(str(tmp_path))
    for step in (3, 4, 5):
        resumed.log({"loss": 10.0 * step}, step)
    resumed.close()
    scalars = _read(tmp_path)
    assert scalars["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    assert [s for s, _ in scalars["lr"]] == [1, 2]


def test_stages_log_into_their_own_runs():
    config = MTPJobConfig()
    config.job.dump_folder, config.metrics.save_tb_folder = "/d", "tb"
    assert stage_log_dir(config) == "/d/tb/sft"
    config.training.dataset = "rl_prompts"
    assert stage_log_dir(config) == "/d/tb/rl"


def test_the_job_writes_its_scalars_into_the_stage_run(tmp_path):
    from torchtitan.distributed import ParallelDims

    from torchtitan_mtp.metrics import build_metrics_processor

    config = MTPJobConfig()
    config.job.dump_folder = str(tmp_path)
    config.metrics.enable_tensorboard = True
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    processor = build_metrics_processor(config, dims)
    processor.logger.log({"loss": 2.0}, 1)
    processor.close()
    assert _read(tmp_path / "tb" / "sft") == {"loss": [(1, 2.0)]}
    assert [p.name for p in (tmp_path / "tb").iterdir()] == ["sft"]
