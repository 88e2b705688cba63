"""The embedded arithmetic task: deterministic addition problems (the loaders are in
``data/loader.py``).

Problems are ``"{a}+{b}="`` with answer ``"{a + b}"``, operands of 1..``max_digits``
digits. The held-out split is drawn first and never appears in the train split; as SFT
samples it is the ``[validation]`` set (``build_validation_dataloader``).
"""

from __future__ import annotations

import random

from .records import Problem

__all__ = ["arithmetic_problems", "noisy_teacher", "without_carries"]


def _draw(rng: random.Random, max_digits: int) -> Problem:
    operands = []
    for _ in range(2):
        digits = rng.randint(1, max_digits)
        operands.append(rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits))
    a, b = operands
    return Problem(prompt=f"{a}+{b}=", answer=str(a + b))


def without_carries(problem: Problem) -> Problem:
    """The answer of a teacher that forgets carries: digit-wise (a_i + b_i) mod 10."""
    a, b = problem.prompt.rstrip("=").split("+")
    width = max(len(a), len(b))
    digits = [(int(x) + int(y)) % 10 for x, y in zip(a.zfill(width), b.zfill(width), strict=True)]
    return Problem(problem.prompt, str(int("".join(map(str, digits)))))


def noisy_teacher(problems: list[Problem], error_rate: float, seed: int) -> list[Problem]:
    """SFT targets where a seeded ``error_rate`` fraction of answers drops carries."""
    rng = random.Random(seed + 1)
    return [without_carries(p) if rng.random() < error_rate else p for p in problems]


def arithmetic_problems(
    seed: int, max_digits: int, num_train: int, num_heldout: int
) -> tuple[list[Problem], list[Problem]]:
    """Deterministic (train, held-out) splits; held-out problems are unique and unseen."""
    space = (10**max_digits) ** 2
    if num_heldout > space // 2:
        raise ValueError(
            f"data.num_heldout = {num_heldout} is too large for max_digits = {max_digits} "
            f"(at most {space // 2} distinct problems may be held out)"
        )
    rng = random.Random(seed)
    heldout: dict[Problem, None] = {}
    while len(heldout) < num_heldout:
        heldout[_draw(rng, max_digits)] = None
    train = []
    while len(train) < num_train:
        problem = _draw(rng, max_digits)
        if problem not in heldout:
            train.append(problem)
    return train, list(heldout)
