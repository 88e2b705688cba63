"""Reward functions for tests/test_rewards.py that the pool's workers import by name.

Kept out of the test module so that a fresh worker imports only this (not pytest), and
``trainer_to_kill`` is the stand-in trainer of the ``kill -9`` test (run with ``python -c``).
"""

import os
import time
from pathlib import Path

from torchtitan_mtp.rewards import PoolReward, math_verify_item

PID_DIR = "REWARDS_TEST_PID_DIR"  # if set, "SLEEP" and "SPIN" write their worker's pid there


def hang_or_score(response: str, answer: str):
    """math-verify, except: "SLEEP" sleeps for an hour, "SPIN" computes in C for hours while
    holding the GIL (so no Python signal handler or thread runs), "CRASH" kills the worker."""
    if response in ("SLEEP", "SPIN") and os.environ.get(PID_DIR):
        Path(os.environ[PID_DIR], response).write_text(str(os.getpid()))
    if response == "SLEEP":
        time.sleep(3600)
    if response == "SPIN":
        sum(range(10**18))
    if response == "CRASH":
        os._exit(3)
    return math_verify_item(response, answer)


def trainer_to_kill(timeout_s: float, start_method: str = "forkserver") -> None:
    """3 workers; prints "ready", then keeps one sleeping, one spinning, one idle until killed."""
    with PoolReward(
        hang_or_score, workers=3, timeout_s=timeout_s, start_method=start_method
    ) as reward:
        assert reward("\\boxed{1}", "1") == 1.0
        print("ready", flush=True)
        reward.score_batch(["SLEEP", "SPIN"], ["1", "1"])
