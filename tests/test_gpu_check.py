"""benchmarks/gpu_check.sh in its CPU mode, end to end: every section runs and every row
of the table is written (about 45 s on 2 cores)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_mode_writes_every_row(tmp_path):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # torchrun
        "OMP_NUM_THREADS": "1",
    }
    cmd = [str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu" and report["failures"] == []
    (default,) = report["default"]
    assert default["rl_steps"] == 2
    assert 0 <= default["heldout_before"] <= 1 and 0 <= default["heldout_after"] <= 1
    assert default["rollout_s"] > 0 and default["update_s"] > 0
    sft = {(r["model"], r["variant"]) for r in report["sft"]}
    assert sft == {(m, v) for m in ("debug", "small") for v in ("eager", "compile+AC")}
    for row in report["sft"]:
        assert row["tokens_per_s"] > 0 and row["max_active_gib"] > 0
    assert [r["rollout"] for r in report["rl"]] == ["plain", "MTP draft 1"]
    assert {r["rows"] for r in report["rl"]} == {"4 x 2"}  # the CPU sizes, 8 rollouts
    for row in report["rl"]:
        assert row["new_tokens"] > 0 and row["rollout_tokens_per_s"] > 0
        assert row["update_tokens_per_s"] > 0 and math.isfinite(row["update_mfu_pct"])
    assert 0 <= report["rl"][1]["accept_rate"] <= 1

    table = (tmp_path / "gpu_check.md").read_text()
    assert table in proc.stdout  # printed as well as written
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 3 + 1 + 4 + 2  # three headers, then the rows of each section
    assert "vLLM" in table.splitlines()[-1]
