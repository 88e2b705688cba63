"""The regime study: ``python -m torchtitan_mtp.study --job.config_file train_configs/study.toml``.

One command runs the job's SFT stage once, then every ``[study] variants`` x ``seeds`` RL
run from that same SFT checkpoint, then writes plots and a markdown table:

    <dump_folder>/sft/                      the shared SFT stage (a normal job folder)
    <dump_folder>/runs/<variant>/seed<s>/   one RL run each (TensorBoard, checkpoints,
                                            occ_minibatches.jsonl, train.log, done.json)
    <dump_folder>/report/                   study.md, accuracy_reward.png, occ_proxies.png,
                                            proxy_vs_exact.png, acceptance.png

Resumable: a run with ``done.json`` is never redone; an interrupted run resumes from its
own last RL checkpoint; a finished SFT stage is reused. Extra command-line arguments go to
every run (``--rl.steps 200``); ``--study.seeds 0 1`` (spaces) and ``--study.variants
detach,occ:exact`` (commas, TorchTitan's list-of-strings syntax) change the matrix. Runs go
``[study] parallel`` at a time, one process and one thread each. ``--report-only``
rewrites the report from the runs on disk.

A variant is "REGIME[:ESTIMATOR][+draft]": REGIME in detach, ce, policy, occ, or "frozen"
(detach with c = 0, so the MTP draft does not train during RL); ESTIMATOR an ``[occ]
estimator`` value; "+draft" adds the draft objective (``[mtp] draft_loss = "ce"``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, MTPJobConfig, parse_job_config

__all__ = [
    "RunResult",
    "load_run",
    "main",
    "read_minibatches",
    "spearman",
    "variant_overrides",
    "write_report",
]

ROOT = Path(__file__).resolve().parent.parent


def variant_overrides(variant: str) -> list[str]:
    """The command-line overrides of one study variant (validated by the config)."""
    name, _, extra = variant.partition("+")
    regime, _, estimator = name.partition(":")
    args = ["--mtp.regime", "detach" if regime == "frozen" else regime]
    if regime == "frozen":
        args += ["--mtp.coefficient", "0"]
    if estimator:
        args += ["--occ.estimator", estimator]
    if estimator == "exact":
        args += ["--occ.apply_to", "loss"]
    args += ["--mtp.draft_loss", "ce" if extra == "draft" else "none"]
    return args


def _train_command(args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc_per_node", "1", "-m", "torchtitan_mtp.train", *args,
    ]  # fmt: skip


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _sft_checkpoint(sft_dir: Path, steps: int) -> Path:
    return sft_dir / "checkpoint" / "sft" / f"step-{steps}"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # atomic: a run is done only once this file exists


def _run_sft(config: MTPJobConfig, user_args: list[str], root: Path) -> Path | None:
    """The shared SFT stage (skipped when its last checkpoint exists) -> its path."""
    steps = config.training.steps
    if steps == 0:
        return None
    sft_dir = root / "sft"
    final = _sft_checkpoint(sft_dir, steps)
    if (final / ".metadata").is_file():
        print(f"[study] SFT stage already finished: {final}", flush=True)
        return final
    sft_dir.mkdir(parents=True, exist_ok=True)
    print(f"[study] SFT stage ({steps} steps) -> {sft_dir}", flush=True)
    cmd = _train_command([*user_args, "--rl.steps", "0", "--job.dump_folder", str(sft_dir)])
    with open(sft_dir / "train.log", "a") as log:
        code = subprocess.call(cmd, cwd=ROOT, env=_environment(), stdout=log, stderr=log)
    if code != 0 or not (final / ".metadata").is_file():
        raise SystemExit(f"[study] the SFT stage failed (exit {code}); see {sft_dir}/train.log")
    return final


def _run_matrix(
    config: MTPJobConfig, user_args: list[str], root: Path, init: Path | None
) -> list[str]:
    """Every unfinished (variant, seed) run, ``parallel`` at a time -> failures."""
    pending = []
    for seed in config.study.seeds:  # seed-major: a stopped study has whole seeds to pair
        for variant in config.study.variants:
            run = root / "runs" / variant / f"seed{seed}"
            if finished_steps(run) < config.rl.steps:
                pending.append((variant, seed, run))
    done = len(config.study.variants) * len(config.study.seeds) - len(pending)
    print(f"[study] {done} runs finished before, {len(pending)} to run", flush=True)
    running: list[tuple[subprocess.Popen, str, int, Path, float, object]] = []
    failures = []
    while pending or running:
        while pending and len(running) < config.study.parallel:
            variant, seed, run = pending.pop(0)
            run.mkdir(parents=True, exist_ok=True)
            args = [*user_args, *variant_overrides(variant), "--debug.seed", str(seed),
                    "--job.dump_folder", str(run)]  # fmt: skip
            if init is not None:
                args += ["--training.steps", "0", "--checkpoint.initial_load_path", str(init)]
            log = open(run / "train.log", "a")  # noqa: SIM115 (closed when the run ends)
            proc = subprocess.Popen(
                _train_command(args), cwd=ROOT, env=_environment(), stdout=log, stderr=log
            )
            running.append((proc, variant, seed, run, time.time(), log))
            print(f"[study] start {variant} seed {seed}", flush=True)
        time.sleep(0.5)
        for item in list(running):
            proc, variant, seed, run, start, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            seconds = time.time() - start
            if proc.returncode == 0:
                _write_json(run / "done.json", {"variant": variant, "seed": seed,
                                                "seconds": seconds,
                                                "rl_steps": config.rl.steps})  # fmt: skip
                print(f"[study] done {variant} seed {seed} ({seconds:.0f}s)", flush=True)
            else:
                failures.append(f"{variant} seed {seed} (exit {proc.returncode}): {run}/train.log")
                print(f"[study] FAILED {failures[-1]}", flush=True)
    return failures


# ---------------------------------------------------------------- reading the runs


def finished_steps(run: Path) -> int:
    """RL steps a run has finished: 0 without ``done.json``; its ``rl_steps``, or (older
    runs) the last RL checkpoint. A study with more ``rl.steps`` extends such a run from
    that checkpoint (the RL LR is constant after warmup, so this equals a longer run)."""
    done = run / "done.json"
    if not done.is_file():
        return 0
    recorded = json.loads(done.read_text()).get("rl_steps")
    if recorded is not None:
        return int(recorded)
    steps = [int(p.name[5:]) for p in (run / "checkpoint" / "rl").glob("step-*")
             if p.name[5:].isdigit()]  # fmt: skip
    return max(steps, default=0)


def read_minibatches(path: Path) -> list[dict]:
    """Rows of an ``occ_minibatches.jsonl``; a resumed run's repeated rows keep the last
    copy per (step, epoch, minibatch), and a truncated last line is skipped."""
    rows: dict[tuple, dict] = {}
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        rows[(row["step"], row["epoch"], row["minibatch"])] = row
    return [rows[key] for key in sorted(rows)]


@dataclass
class RunResult:
    variant: str
    seed: int
    scalars: dict[str, dict[int, float]]
    minibatches: list[dict]


def load_run(run: Path, variant: str, seed: int, max_step: int | None = None) -> RunResult:
    """TensorBoard scalars (tag -> step -> value) and mini-batch rows of one run, up to
    ``max_step`` (a run extended past the report's ``rl.steps`` is cut there)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for log_dir in sorted({p.parent for p in (run / "tb").rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    rows = read_minibatches(run / "occ_minibatches.jsonl")
    if max_step is not None:
        scalars = {t: {k: v for k, v in s.items() if k <= max_step} for t, s in scalars.items()}
        rows = [r for r in rows if r["step"] <= max_step]
    return RunResult(variant, seed, scalars, rows)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan below 3 points."""
    import pandas as pd

    if len(x) < 3:
        return math.nan
    return float(pd.Series(x).rank().corr(pd.Series(y).rank()))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def _fmt(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _last(series: dict[int, float]) -> float:
    return series[max(series)] if series else math.nan


def _tail_mean(series: dict[int, float], n: int, head: bool = False) -> float:
    """Mean of the last ``n`` steps' values (the first ``n`` with ``head``)."""
    steps = sorted(series)[:n] if head else sorted(series)[-n:]
    return sum(series[s] for s in steps) / len(steps) if steps else math.nan


# ---------------------------------------------------------------- the report


def _band(
    ax, runs: list[RunResult], tag: str, label: str, smooth: int = 1, median: bool = False
) -> None:
    """Mean over seeds with a +-1 sd band of one tag, on the steps every seed has, after a
    trailing moving mean (or, with ``median``, moving median) over ``smooth`` steps."""
    series = [r.scalars.get(tag, {}) for r in runs]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not steps:
        return
    values = [[s[t] for t in steps] for s in series]
    if smooth > 1:

        def window(v: list[float], i: int) -> float:
            w = sorted(v[max(0, i - smooth + 1) : i + 1])
            return w[len(w) // 2] if median else sum(w) / len(w)

        values = [[window(v, i) for i in range(len(v))] for v in values]
    stats = [_mean_sd([v[i] for v in values]) for i in range(len(steps))]
    mean = [m for m, _ in stats]
    sd = [s for _, s in stats]
    (line,) = ax.plot(steps, mean, label=label)
    ax.fill_between(steps, [m - s for m, s in zip(mean, sd, strict=True)],
                    [m + s for m, s in zip(mean, sd, strict=True)],
                    color=line.get_color(), alpha=0.15)  # fmt: skip


def _spearman_rows(results: list[RunResult], num_heads: int) -> list[dict]:
    """Each proxy estimator's lambda against exact lambda* on the SAME mini-batches, pooled
    over every run that computed the exact products, and per run (min, max). Also the
    exact products restricted to one parameter group, ``exact[group]``."""
    rows = []
    estimators = ("ratio_of_means", "mean_of_ratios", "head_change", "output_grad")
    groups = ("output", "embedding", "trunk")

    def value(r: dict, est: str, head: int) -> float | None:
        if est.startswith("exact["):
            group = est[6:-1]
            a, v = r.get(f"A/exact_{group}/head{head}"), r.get(f"V/exact_{group}/head{head}")
            return None if a is None or v is None else (a / v if v > 0 else 0.0)
        return r.get(f"lambda/{est}/head{head}")

    for head in range(1, num_heads + 1):
        exact_key = f"lambda/exact/head{head}"
        for est in (*estimators, *(f"exact[{g}]" for g in groups)):
            # log-prob estimators are 0 by construction before the policy moved
            moved_only = est in ("ratio_of_means", "mean_of_ratios", "head_change")
            per_run = []
            for res in results:
                pairs = []
                for r in res.minibatches:
                    x = value(r, est, head)
                    if x is None or exact_key not in r:
                        continue
                    if moved_only and (r["epoch"], r["minibatch"]) == (0, 0):
                        continue
                    pairs.append((x, r[exact_key]))
                if pairs:
                    per_run.append(pairs)
            pairs = [p for run in per_run for p in run]
            if pairs:
                x, y = zip(*pairs, strict=True)
                runs = [spearman([p[0] for p in run], [p[1] for p in run]) for run in per_run]
                rows.append({"estimator": est, "head": head, "n": len(pairs),
                             "spearman": spearman(list(x), list(y)),
                             "per_run": (min(runs), max(runs)), "runs": len(runs),
                             "x": list(x), "y": list(y)})  # fmt: skip
    return rows


def write_report(config: MTPJobConfig, root: Path) -> Path:
    """Plots and ``study.md`` from every finished run under ``root`` -> the report dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study, heads = config.study, config.mtp.num_modules
    report = root / "report"
    report.mkdir(parents=True, exist_ok=True)
    by_variant: dict[str, list[RunResult]] = defaultdict(list)
    for variant in study.variants:
        for seed in study.seeds:
            run = root / "runs" / variant / f"seed{seed}"
            if finished_steps(run) >= config.rl.steps:
                by_variant[variant].append(load_run(run, variant, seed, config.rl.steps))
    variants = [v for v in study.variants if by_variant[v]]
    base = config.mtp.coefficient / max(heads, 1)

    # Figure 1: held-out accuracy and training reward, mean with a seed band.
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for v in variants:
        _band(axes[0], by_variant[v], "eval/heldout/greedy", v)
        _band(axes[1], by_variant[v], "rl/reward_mean", v, smooth=10)
    axes[0].set(title="held-out accuracy (greedy)", xlabel="RL step")
    axes[1].set(title="training reward (10-step moving mean)", xlabel="RL step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report / "accuracy_reward.png", dpi=110)
    plt.close(fig)

    # Figures 2-3: A_k, V_k and lambda_k over steps (head 1), every variant that logs them.
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    tags = ("occ/correlation_proxy/head1", "occ/penalty_proxy/head1", "occ/coefficient/head1")
    for v in variants:
        for ax, tag in zip(axes, tags, strict=True):
            _band(ax, by_variant[v], tag, v, smooth=9, median=True)
    for ax, tag in zip(axes, ("A_1", "V_1", "lambda_1"), strict=True):
        ax.set(title=f"{tag} (9-step moving median)", xlabel="RL step")
        ax.set_yscale("symlog", linthresh=1e-4)
    axes[0].set_title("A_1 (exact runs: <g, g_m>; 9-step moving median)")
    axes[1].set_title("V_1 (exact runs: ||g_m||^2; 9-step moving median)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report / "occ_proxies.png", dpi=110)
    plt.close(fig)

    # Proxy lambda against exact lambda* on the same mini-batches.
    all_runs = [r for v in variants for r in by_variant[v]]
    corr = _spearman_rows(all_runs, heads)
    head1 = [c for c in corr if c["head"] == 1 and not c["estimator"].startswith("exact[")]
    fig, axes = plt.subplots(1, max(len(head1), 1), figsize=(4.2 * max(len(head1), 1), 4))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, c in zip(axes, head1, strict=False):
        ax.scatter(c["x"], c["y"], s=4, alpha=0.4)
        ax.set(title=f"{c['estimator']}: Spearman {c['spearman']:+.2f} (n={c['n']})",
               xlabel="proxy lambda_1", ylabel="exact lambda*_1")  # fmt: skip
    fig.tight_layout()
    fig.savefig(report / "proxy_vs_exact.png", dpi=110)
    plt.close(fig)

    # Draft acceptance of the native engine's self-speculative rollouts.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        _band(ax, by_variant[v], "mtp/accept_rate", v, smooth=10)
    ax.set(title="MTP draft acceptance (10-step moving mean)", xlabel="RL step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report / "acceptance.png", dpi=110)
    plt.close(fig)

    # The table.
    def per_seed(v: str, fn) -> dict[int, float]:
        return {r.seed: fn(r) for r in by_variant[v]}

    tail = study.tail_steps
    acc = {v: per_seed(v, lambda r: _last(r.scalars.get("eval/heldout/greedy", {})))
           for v in variants}  # fmt: skip
    reward = {v: per_seed(v, lambda r: _tail_mean(r.scalars.get("rl/reward_mean", {}), tail))
              for v in variants}  # fmt: skip

    def acceptance(v: str, head: bool) -> dict[int, float]:
        rates = per_seed(v, lambda r: _tail_mean(r.scalars.get("mtp/accept_rate", {}), 10, head))
        return {seed: a for seed, a in rates.items() if not math.isnan(a)}

    accept_first = {v: acceptance(v, head=True) for v in variants}
    accept_last = {v: acceptance(v, head=False) for v in variants}
    ref = "detach" if "detach" in variants else None

    def paired(metric: dict, v: str) -> str:
        if ref is None or v == ref:
            return "-"
        seeds = sorted(set(metric[v]) & set(metric[ref]))
        diffs = [metric[v][s] - metric[ref][s] for s in seeds]
        mean, sd = _mean_sd(diffs)
        return f"{mean:+.3f} ± {sd:.3f} (n={len(diffs)})" if diffs else "-"

    lines = [
        f"# Regime study: {config.job.description or config.job.dump_folder}",
        "",
        f"Runs: {len(all_runs)} ({', '.join(variants)}; seeds {study.seeds}); "
        f"c = {config.mtp.coefficient}, K = {heads}, RL steps = {config.rl.steps}, "
        f"rl.lr = {config.rl.lr}, held-out problems = {config.data.num_heldout}. "
        "Mean ± sd over seeds; paired differences against Detach are per seed "
        "(same SFT checkpoint, same RL seed).",
        "",
        f"| variant | held-out acc (last eval) | Δ vs detach | train reward, last {tail} "
        "steps | Δ vs detach | acceptance first → last 10 steps | Δ vs detach (last 10) | "
        "λ_1/(c/K) median | λ_1 < 0 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        lam_rel, negative = [], []
        for r in by_variant[v]:
            for row in r.minibatches:
                if "applied/head1" in row and (row["epoch"], row["minibatch"]) != (0, 0):
                    lam_rel.append(row["applied/head1"] / base if base else math.nan)
                    negative.append(row["applied/head1"] < 0)
        lam_rel = sorted(x for x in lam_rel if not math.isnan(x))
        median = lam_rel[len(lam_rel) // 2] if lam_rel else math.nan
        neg = sum(negative) / len(negative) if negative else math.nan
        lines.append(
            f"| {v} | {_fmt(*_mean_sd(list(acc[v].values())))} | {paired(acc, v)} | "
            f"{_fmt(*_mean_sd(list(reward[v].values())))} | {paired(reward, v)} | "
            f"{_fmt(*_mean_sd(list(accept_first[v].values())), 2)} → "
            f"{_fmt(*_mean_sd(list(accept_last[v].values())), 2)} | {paired(accept_last, v)} | "
            f"{median:.3g} | {neg:.2f} |"
        )
    lines += [
        "",
        "Proxy λ against exact λ* on the same mini-batches (runs that computed the exact "
        "products; log-prob estimators without each step's first mini-batch, where they "
        "are 0 by construction):",
        "",
        "| estimator | head | mini-batches | Spearman vs exact λ*, pooled | per run (min, max) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {c['estimator']} | {c['head']} | {c['n']} | {c['spearman']:+.3f} | "
              f"{c['per_run'][0]:+.3f}, {c['per_run'][1]:+.3f} ({c['runs']} runs) |"
              for c in corr]  # fmt: skip
    lines += ["", "`exact[group]` is not an estimator: the exact products restricted to one "
              "group of the shared parameters, to show where the signal lives.", ""]  # fmt: skip
    lines += ["", "Plots: accuracy_reward.png, occ_proxies.png, proxy_vs_exact.png, "
              "acceptance.png.", ""]  # fmt: skip
    (report / "study.md").write_text("\n".join(lines))
    summary = {"spearman": [{k: c[k] for k in ("estimator", "head", "n", "spearman", "per_run")}
                            for c in corr],
               "accuracy": acc, "reward_tail": reward,
               "acceptance_last10": accept_last}  # fmt: skip
    _write_json(report / "summary.json", summary)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    report_only = "--report-only" in argv
    argv = [a for a in argv if a != "--report-only"]
    try:
        config = parse_job_config(argv)
    except ConfigError as e:
        print(f"[study] {e}", file=sys.stderr)
        return 2
    if config.rl.steps == 0:
        print("[study] rl.steps = 0: the study compares RL runs; set rl.steps > 0", file=sys.stderr)
        return 2
    root = Path(config.job.dump_folder)
    failures = []
    if not report_only:
        init = _run_sft(config, argv, root)
        failures = _run_matrix(config, argv, root, init)
    report = write_report(config, root)
    print(f"[study] report: {report / 'study.md'}", flush=True)
    print((report / "study.md").read_text(), flush=True)
    if failures:
        print("[study] failed runs:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
