"""Rewards: exact_match, the pooled math-verify reward (hostile input; stuck, crashing and
orphaned workers), dotted paths."""

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _rewards_workers import hang_or_score

from torchtitan_mtp.rewards import (
    REASONS,
    REWARD_FUNCTIONS,
    MathVerifyReward,
    PoolReward,
    exact_match,
    get_reward_function,
    score_batch,
)

HOSTILE_BOUND_S = 15.0


@pytest.fixture(scope="module")
def reward():
    with MathVerifyReward(workers=2, timeout_s=2.0) as r:
        yield r


def _delta(before: dict, after: dict) -> dict:
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)
    }


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, ...)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time (told apart from a reused pid) of every process below ``root``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            children.setdefault(int(stat[1]), []).append(int(entry))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            if (stat := _proc_stat(pid)) is not None:
                found[pid] = stat[19]
                todo.append(pid)
    return found


def _running(pid: int, start: str) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[19] == start and stat[0] not in "ZX"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


def _wait_until_gone(procs: dict[int, str], within_s: float) -> list[int]:
    """Poll until none of ``procs`` (pid -> start time) runs; -> those still running."""
    deadline = time.monotonic() + within_s
    while (left := [p for p, t in procs.items() if _running(p, t)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    return left


def test_exact_match_unchanged():
    assert exact_match(" 42\n", "42") == 1.0
    assert exact_match("42.0", "42") == 0.0
    assert "exact_match" in REWARD_FUNCTIONS
    assert get_reward_function("exact_match") is exact_match


def test_math_verify_right_and_wrong_answers(reward):
    gsm8k_solution = (
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
        "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18"
    )
    cases = [
        ("The answer is \\boxed{42}", "42", 1.0),
        ("\\frac{1}{2}", "0.5", 1.0),
        ("So the result is $0.5$.", "\\frac{1}{2}", 1.0),
        (gsm8k_solution, "18", 1.0),
        ("The answer is \\boxed{1,234}", "1234", 1.0),
        ("The answer is \\boxed{41}", "42", 0.0),
        ("We get $x = 17$, so the answer is 17.", "18", 0.0),
    ]
    before = reward.stats()
    scores = reward.score_batch([c[0] for c in cases], [c[1] for c in cases])
    assert scores == [c[2] for c in cases]
    assert _delta(before, reward.stats()) == {"ok": len(cases)}
    # The single-item call has the RewardFunction signature.
    assert reward("The answer is \\boxed{42}", "42") == 1.0
    assert reward("no idea", "42") == 0.0
    assert reward.stats()["no_answer"] == before["no_answer"] + 1


def test_hostile_answers_score_zero_fast_and_are_counted(reward):
    hostile = [
        ("10**100000", "42"),
        ("The answer is \\boxed{10^{100000}}", "42"),
        ("9" * 1_000_000, "42"),  # too_long
        ("\\frac{" * 5000, "42"),  # too_long
        ("x" * 1_000_000, "42"),  # too_long (1 MB)
        ("\\boxed{" + "\\frac{" * 2000 + "}", "42"),  # deep nesting under max_chars
        ("\\boxed{\ud800\udfff 4\x002}", "42"),  # lone surrogates, NUL
        ("\\boxed{", "42"),  # unclosed
        ("\\boxed{9^{9^{9^{9}}}}", "42"),  # timeout: sympy evaluates a 10^8-digit power
        ("The answer is \\boxed{9999999!}", "42"),  # timeout
        ("\\boxed{1}", "9" * 30_000),  # a hostile gold: too_long
        (None, "42"),  # not a string
    ]
    good = [(f"The answer is \\boxed{{{i}}}", str(i)) for i in range(6)]
    items = [pair for pairs in zip(hostile[:6], good, strict=True) for pair in pairs]
    items += hostile[6:]
    before, restarts = reward.stats(), reward.restarts
    t0 = time.monotonic()
    scores = reward.score_batch([r for r, _ in items], [a for _, a in items])
    elapsed = time.monotonic() - t0
    assert elapsed < HOSTILE_BOUND_S, f"hostile batch took {elapsed:.1f} s"
    by_item = dict(zip(map(repr, items), scores, strict=True))
    assert all(by_item[repr(h)] == 0.0 for h in hostile)
    # Good items that shared the pool with hostile ones (and were resubmitted after a
    # pool restart) still score right.
    assert all(by_item[repr(g)] == 1.0 for g in good)
    delta = _delta(before, reward.stats())
    assert sum(delta.values()) == len(items)
    assert delta["too_long"] == 4
    assert delta["invalid_input"] == 1
    assert delta["timeout"] >= 2
    assert reward.restarts > restarts
    print(f"\nhostile batch of {len(items)}: {elapsed:.2f} s, reasons {delta}")


def test_pool_recovers_after_a_timeout(reward):
    before = reward.stats()
    assert reward("\\boxed{9^{9^{9^{9}}}}", "1") == 0.0
    assert _delta(before, reward.stats()) == {"timeout": 1}
    t0 = time.monotonic()
    assert reward("The answer is \\boxed{7}", "7") == 1.0
    assert time.monotonic() - t0 < 5.0
    # A pair that timed out before scores 0 at once (degenerate policies repeat).
    t0 = time.monotonic()
    assert reward("\\boxed{9^{9^{9^{9}}}}", "1") == 0.0
    assert time.monotonic() - t0 < 0.5
    assert _delta(before, reward.stats()) == {"timeout": 2, "ok": 1}


def test_batch_timeout_bounds_a_batch_of_stuck_items():
    stuck = [f"\\boxed{{{n}^{{9^{{9^{{9}}}}}}}}" for n in range(3, 9)]  # 6 distinct hangs
    good = ["\\boxed{1}", "\\boxed{2}"]
    with MathVerifyReward(workers=2, timeout_s=2.0, batch_timeout_s=3.0) as r:
        t0 = time.monotonic()
        scores = r.score_batch(good + stuck, ["1", "2"] + ["1"] * len(stuck))
        elapsed = time.monotonic() - t0
        assert scores == [1.0, 1.0] + [0.0] * len(stuck)
        # The first two time out at 2 s; the rest are still running or queued at 3 s.
        stats = r.stats()
        assert stats["timeout"] + stats["batch_timeout"] == len(stuck)
        assert stats["batch_timeout"] >= 2, stats
        assert elapsed < 3.0 + 2.0, elapsed  # the budget, plus killing the pool
        assert r("\\boxed{3}", "3") == 1.0


def test_surrogates_are_replaced_not_fatal(reward):
    assert reward("\ud800 the answer is \\boxed{5}", "5") == 1.0
    assert reward(b"\xff\xfe \\boxed{5}", "5") == 1.0


def test_stats_has_every_reason_and_resets():
    r = MathVerifyReward(workers=1)
    assert r.stats() == dict.fromkeys(REASONS, 0)
    assert r("x" * 30_000, "1") == 0.0  # refused in the parent: no pool started
    assert r.stats(reset=True)["too_long"] == 1
    assert r.stats()["too_long"] == 0
    r.close()


def test_per_call_latency(reward):
    reward("\\boxed{3}", "3")
    t0 = time.monotonic()
    for i in range(20):
        assert reward(f"The answer is \\boxed{{{i}}}", str(i)) == 1.0
    per_call = (time.monotonic() - t0) / 20
    assert per_call < 0.5
    print(f"\nper call: {per_call * 1e3:.1f} ms")


# ------------------------------------------------------------------ worker crashes


def test_a_worker_crash_scores_zero_and_spares_the_others():
    with PoolReward(hang_or_score, workers=2, timeout_s=5.0) as r:
        responses = ["\\boxed{1}", "CRASH", "\\boxed{2}", "\\boxed{3}", "CRASH", "\\boxed{4}"]
        answers = ["1", "1", "2", "3", "1", "4"]
        assert r.score_batch(responses, answers) == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
        assert r.stats()["worker_crash"] == 2
        assert r.stats()["ok"] == 4
        assert r("\\boxed{5}", "5") == 1.0


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="lists processes through /proc")
def test_a_pool_broken_under_queued_items_is_replaced_and_they_are_rescored():
    # pebble gives up a pool whose worker dies with no item running: the batch's items are
    # lost there, and are retried (one at a time) in a new pool.
    before = _descendants(os.getpid())
    with PoolReward(hang_or_score, workers=1, timeout_s=5.0) as r:
        new = set(_descendants(os.getpid())) - set(before)
        (worker,) = [p for p in new if _proc_stat(p)[1] != str(os.getpid())]  # not the server
        os.kill(worker, signal.SIGKILL)
        answers = [str(i) for i in range(4)]
        assert r.score_batch([f"\\boxed{{{a}}}" for a in answers], answers) == [1.0] * 4
        assert r.stats()["ok"] == 4
        assert r.restarts >= 1


# ------------------------------------------------------------------ stuck workers


def test_timeouts_run_in_parallel_and_spare_the_other_items():
    timeout_s = 1.0
    good = [(f"The answer is \\boxed{{{i}}}", str(i)) for i in range(8)]
    items = []
    for i, pair in enumerate(good):
        items += [pair, ("SPIN", "1")] if i % 2 else [pair]  # 4 items stuck in C
    with PoolReward(hang_or_score, workers=4, timeout_s=timeout_s) as r:
        t0 = time.monotonic()
        scores = r.score_batch([p for p, _ in items], [a for _, a in items])
        elapsed = time.monotonic() - t0
        assert scores == [0.0 if p == "SPIN" else 1.0 for p, _ in items]
        assert r.stats() == {**dict.fromkeys(REASONS, 0), "ok": 8, "timeout": 4}
        # In parallel: about one timeout for the four, not four.
        assert elapsed < 2.5 * timeout_s, f"{elapsed:.2f} s"
        assert r("\\boxed{9}", "9") == 1.0  # the replaced workers score
    print(f"\n4 stuck items with 4 workers and timeout_s = {timeout_s}: {elapsed:.2f} s")


def test_batch_timeout_scores_unfinished_items_zero_and_the_next_batch_runs_clean():
    batch_timeout_s = 1.0
    with PoolReward(hang_or_score, workers=2, timeout_s=60.0, batch_timeout_s=batch_timeout_s) as r:
        responses = ["\\boxed{1}", "\\boxed{2}"] + ["SLEEP"] * 4  # 2 running, 2 queued
        t0 = time.monotonic()
        scores = r.score_batch(responses, ["1", "2"] + ["1"] * 4)
        elapsed = time.monotonic() - t0
        assert scores == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
        assert r.stats() == {**dict.fromkeys(REASONS, 0), "ok": 2, "batch_timeout": 4}
        assert elapsed < batch_timeout_s + 1.0, f"{elapsed:.2f} s"
        # No sleeper is left to hold a worker (each would for timeout_s = 60 s).
        t0 = time.monotonic()
        assert r.score_batch(["\\boxed{3}", "\\boxed{4}"], ["3", "4"]) == [1.0, 1.0]
        assert time.monotonic() - t0 < 10.0
        assert r.stats()["batch_timeout"] == 4  # not counted again


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="lists processes through /proc")
def test_kill_9_of_the_trainer_leaves_no_process_behind(tmp_path):
    """Idle and sleeping workers exit at once; one stuck in C by its alarm; then the
    forkserver and the resource tracker."""
    timeout_s = 1.5  # the stuck worker's own alarm ends it at 2 * 1.5 + 1 = 4 s
    tests_dir = str(Path(__file__).parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]),
        "REWARDS_TEST_PID_DIR": str(tmp_path),
    }
    trainer = subprocess.Popen(
        [sys.executable, "-c", f"import _rewards_workers as w; w.trainer_to_kill({timeout_s})"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    procs: dict[int, str] = {}
    try:
        ready, _, _ = select.select([trainer.stdout], [], [], 120.0)
        assert ready and trainer.stdout.readline().strip() == "ready", "the trainer did not start"
        deadline = time.monotonic() + 1.0  # the trainer would kill both items at 1.5 s
        while not all((tmp_path / n).exists() for n in ("SLEEP", "SPIN")):
            assert time.monotonic() < deadline, "the items did not start"
            time.sleep(0.01)
        time.sleep(0.05)
        procs = _descendants(trainer.pid)
        names = {pid: _cmdline(pid) for pid in procs}
        spinner = int((tmp_path / "SPIN").read_text())
        server = [
            p for p in procs if "forkserver" in names[p] and _proc_stat(p)[1] == str(trainer.pid)
        ]
        workers = {p: t for p, t in procs.items() if _proc_stat(p)[1] == str(server[0])}
        assert len(workers) == 3 and spinner in workers, names

        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        killed_at = time.monotonic()
        others = {p: t for p, t in workers.items() if p != spinner}
        left = _wait_until_gone(others, within_s=2.0)  # the alarm would take 4 s
        assert not left, f"idle or sleeping workers still running after kill -9: {left}"
        left = _wait_until_gone(procs, within_s=2 * timeout_s + 1.0 + 3.0)
        assert not left, f"still running after kill -9: {[names[p] for p in left]}"
        print(f"\n{len(procs)} processes gone {time.monotonic() - killed_at:.1f} s after kill -9")
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        for pid, start in procs.items():  # a failed run cleans up after itself
            if _running(pid, start):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------ registry


def test_registry_names_and_options():
    default = get_reward_function("math_verify")
    assert isinstance(default, MathVerifyReward) and set(REWARD_FUNCTIONS) >= {"math_verify"}
    custom = get_reward_function("math_verify", timeout_s=1.5, workers=3)
    assert isinstance(custom, MathVerifyReward) and custom is not default
    assert (custom.timeout_s, custom.workers) == (1.5, 3)
    assert get_reward_function("exact_match", timeout_s=1) is exact_match  # options ignored
    with pytest.raises(ValueError, match="is unknown.*exact_match"):
        get_reward_function("nope")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "NOT_CALLABLE = 3\n"
        "def contains(response, answer):\n"
        "    return float(answer in response)\n"
        "class Scorer:\n"
        "    def __call__(self, response, answer):\n"
        "        return 0.5\n"
        "    @staticmethod\n"
        "    def half(response, answer):\n"
        "        return 0.5\n"
    )
    (tmp_path / "my_broken_rewards_mod.py").write_text("import a_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("my_rewards_mod", "my_broken_rewards_mod"):
        sys.modules.pop(name, None)


def test_dotted_path_resolves_user_functions(user_module):
    for path in ("my_rewards_mod:contains", "my_rewards_mod.contains"):
        fn = get_reward_function(path)
        assert fn("the answer is 42", "42") == 1.0 and fn("41", "42") == 0.0
        assert score_batch(fn, ["42", "x"], ["42", "42"]) == [1.0, 0.0]
    assert get_reward_function("my_rewards_mod:Scorer")("a", "b") == 0.5  # instantiated
    assert get_reward_function("my_rewards_mod:Scorer.half")("a", "b") == 0.5
    assert get_reward_function("my_rewards_mod.Scorer.half")("a", "b") == 0.5
    assert isinstance(get_reward_function("torchtitan_mtp.rewards:MathVerifyReward"), PoolReward)


@pytest.mark.parametrize(
    "path, message",
    [
        (
            "no_such_module_xyz:fn",
            r"'no_such_module_xyz:fn'.*module 'no_such_module_xyz' not found",
        ),
        ("no_such_pkg_xyz.sub.fn", r"module 'no_such_pkg_xyz' not found"),
        ("my_rewards_mod:missing", r"'my_rewards_mod' has no attribute 'missing'"),
        ("my_rewards_mod.missing", r"'my_rewards_mod' has no attribute 'missing'"),
        ("my_rewards_mod:Scorer.nope", r"'Scorer' has no attribute 'nope'"),
        (
            "my_rewards_mod:NOT_CALLABLE",
            r"'my_rewards_mod:NOT_CALLABLE' is not callable \(it is a int\)",
        ),
        ("my_broken_rewards_mod:fn", r"importing 'my_broken_rewards_mod:fn' failed.*a_dep"),
        ("my_rewards_mod:", r"expected 'package.module:function'"),
    ],
)
def test_dotted_path_errors_name_the_path_and_the_failure(user_module, path, message):
    with pytest.raises(ValueError, match=message):
        get_reward_function(path)
