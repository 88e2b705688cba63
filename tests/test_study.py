"""The regime study: its quick preset end to end (real SFT + RL runs), resumability, and
the variant grammar."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from torchtitan_mtp.config import ConfigError, parse_job_config
from torchtitan_mtp.study import read_minibatches, spearman, variant_overrides

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "train_configs" / "study_quick.toml"


def run_study(dump: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torchtitan_mtp.study", "--job.config_file", str(QUICK),
           "--job.dump_folder", str(dump), *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_quick_preset_runs_end_to_end_writes_plots_and_table_and_never_redoes_a_run(tmp_path):
    proc = run_study(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = tmp_path / "report"
    for name in ("accuracy_reward.png", "occ_proxies.png", "proxy_vs_exact.png",
                 "acceptance.png"):  # fmt: skip
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (report / "study.md").read_text()
    for variant in ("detach", "frozen", "occ:ratio_of_means", "occ:exact+draft"):
        assert f"| {variant} |" in table
    assert "| output_grad | 1 |" in table and "Spearman" in table
    assert "Δ vs detach (last 10)" in table
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["acceptance_last10"]["frozen"]) == {"0", "1"}  # per seed, for pairing
    assert {row["estimator"] for row in summary["spearman"]} >= {"ratio_of_means", "output_grad"}
    # every run is from the one SFT checkpoint, and exact runs logged exact lambda*
    runs = sorted((tmp_path / "runs").glob("*/seed*"))
    assert len(runs) == 8 and all((r / "done.json").is_file() for r in runs)
    assert len(list((tmp_path / "sft" / "checkpoint" / "sft").glob("step-*"))) == 1
    rows = read_minibatches(
        tmp_path / "runs" / "occ:exact+draft" / "seed0" / "occ_minibatches.jsonl"
    )
    assert len(rows) == 3 * 2 and all("lambda/exact/head1" in r for r in rows)
    # resumable: a finished run is never redone, a missing one is run
    done = (runs[0] / "done.json").read_text()
    (runs[1] / "done.json").unlink()
    proc = run_study(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "7 runs finished before, 1 to run" in proc.stdout
    assert "SFT stage already finished" in proc.stdout
    assert (runs[0] / "done.json").read_text() == done


def test_variants_map_to_overrides_and_bad_ones_are_config_errors():
    assert variant_overrides("frozen") == ["--mtp.regime", "detach", "--mtp.coefficient", "0",
                                           "--mtp.draft_loss", "none"]  # fmt: skip
    assert variant_overrides("occ:exact+draft") == [
        "--mtp.regime", "occ", "--occ.estimator", "exact", "--occ.apply_to", "loss",
        "--mtp.draft_loss", "ce"]  # fmt: skip
    for bad, words in (("occ:nosuch", "estimator 'nosuch'"), ("policy:exact", "only occ"),
                       ("sgd", "regime 'sgd'"), ("ce+drift", "'+draft'")):  # fmt: skip
        with pytest.raises(ConfigError, match="study.variants") as err:
            parse_job_config(["--job.config_file", str(QUICK), "--study.variants", bad])
        assert words in str(err.value)


def test_minibatch_reader_keeps_the_last_copy_and_skips_a_cut_line(tmp_path):
    path = tmp_path / "occ_minibatches.jsonl"
    rows = [{"step": 1, "epoch": 0, "minibatch": 0, "x": 1},
            {"step": 1, "epoch": 0, "minibatch": 1, "x": 2},
            {"step": 1, "epoch": 0, "minibatch": 0, "x": 3}]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 2, "ep')
    assert [r["x"] for r in read_minibatches(path)] == [3, 2]


def test_spearman_is_a_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) != spearman([1, 2], [1, 2])  # nan below 3 points
