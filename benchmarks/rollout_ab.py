"""A/B of benchmarks/rollout.py between two source trees: which engine is faster on CPU.

Runs ``benchmarks/rollout.py`` with the same arguments from a baseline tree (A, e.g. a
``git worktree`` of an older commit) and from this tree (B), alternately A B A B ..., each
run in a fresh process that imports its own tree's ``torchtitan_mtp`` (``PYTHONPATH``).
Alternating spreads a busy machine's slow spells over both sides. Prints each row's
median tok/s per tree over the rounds and the ratio B / A.

    git worktree add ../old-native 4d400a2
    python benchmarks/rollout_ab.py --baseline ../old-native --rounds 3 -- \\
        --suite smollm2 --batch 1,8 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def table_rows(stdout: str) -> dict[tuple[str, int], tuple[float, int]]:
    """(engine, batch) -> (tok/s, tokens) of the table rollout.py prints; columns found by
    their header, so tables of older trees (fewer columns) parse too."""
    rows, columns = {}, None
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "engine" in cells and "tok/s" in cells:
            columns = {name: i for i, name in enumerate(cells)}
        elif columns and len(cells) == len(columns) and cells[columns["batch"]].isdigit():
            key = (cells[columns["engine"]], int(cells[columns["batch"]]))
            rows[key] = (float(cells[columns["tok/s"]]), int(cells[columns["tokens"]]))
    return rows


def run_tree(tree: Path, args: list[str]) -> dict[tuple[str, int], tuple[float, int]]:
    """One rollout.py run from ``tree`` (its own package first on the path; relative paths
    in ``args`` are the caller's, as for both trees)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(tree / "benchmarks" / "rollout.py"), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    rows = table_rows(out.stdout)
    if not rows:
        raise SystemExit(f"no table in the output of {' '.join(cmd)}:\n{out.stdout[-3000:]}")
    return rows


def summary(runs: dict[str, list[dict]]) -> list[str]:
    """Lines of a table: per (engine, batch) the median tok/s of A and B, and B / A."""
    a, b = runs["A"], runs["B"]
    keys = [k for k in a[0] if all(k in r for r in a + b)]
    lines = [
        "| engine | batch | A tok/s (median) | B tok/s (median) | B / A | A runs | B runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        speeds = [[r[key][0] for r in side] for side in (a, b)]
        med_a, med_b = (statistics.median(s) for s in speeds)
        spread = [" ".join(f"{v:.1f}" for v in s) for s in speeds]
        lines.append(
            f"| {key[0]} | {key[1]} | {med_a:.1f} | {med_b:.1f} | {med_b / med_a:.2f}x | "
            f"{spread[0]} | {spread[1]} |"
        )
    for key in keys:  # greedy and lossless on both sides: the same tokens
        if len({r[key][1] for r in a + b}) > 1:
            lines.append(f"{key}: token counts differ between runs: check the outputs")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", required=True, type=Path, help="tree A (B is this tree)")
    p.add_argument("--rounds", type=int, default=3, help="runs per tree, alternating")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then rollout.py's arguments")
    opts = p.parse_args(argv)
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    trees = {"A": opts.baseline.resolve(), "B": ROOT}
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for i in range(opts.rounds):
        for side, tree in trees.items():
            t0 = time.perf_counter()
            runs[side].append(run_tree(tree, args))
            print(f"round {i + 1} {side} ({tree}): {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\nA = {trees['A']}, B = {trees['B']}; rollout.py {' '.join(args)}")
    print("\n".join(summary(runs)))


if __name__ == "__main__":
    main()
