"""A reward function that hangs on rank 1 from its second batch: a stuck rank."""

import os
import time

_calls = {"n": 0}


def score(response: str, answer: str) -> float:
    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] > 64:
        time.sleep(3600)
    return float(response.strip() == answer)
