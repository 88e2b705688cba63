"""Verifiable rewards: a function of the decoded response and the reference answer.

``RewardFunction(response, answer) -> float``. ``[reward] function`` names one of
``REWARD_FUNCTIONS`` or a user function by dotted path (``"pkg.module:function"`` or
``"pkg.module.function"``); see ``get_reward_function``.

- ``exact_match``: the response, stripped, equals the answer.
- ``math_verify``: math-verify (HF) extracts the final answer of the response (``\\boxed{}``,
  LaTeX, final numbers) and checks it against the parsed gold answer symbolically.
  Parsing is sympy/regex work that hostile model output can make arbitrarily slow (or
  crash), so it never runs in the trainer process: ``MathVerifyReward`` scores in a
  process pool with a per-item wall-clock timeout, kills and replaces stuck or crashed
  workers, and counts why each item scored what it did (``stats()``).

Reward objects with a ``score_batch(responses, answers)`` method should be called through
``score_batch`` (module function below), which falls back to one call per item.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import functools
import hashlib
import importlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = [
    "REASONS",
    "REWARD_FUNCTIONS",
    "MathVerifyReward",
    "PoolReward",
    "math_verify_item",
    "RewardFunction",
    "exact_match",
    "get_reward_function",
    "score_batch",
]

RewardFunction = Callable[[str, str], float]

logger = logging.getLogger(__name__)


def exact_match(response: str, answer: str) -> float:
    """1.0 when the response, stripped of surrounding whitespace, equals the answer."""
    return 1.0 if response.strip() == answer.strip() else 0.0


# --------------------------------------------------------------------------- worker side
# Everything in this section runs in the pool's worker processes. Workers import this
# module by name; math-verify is imported there, never in the trainer process.

REASONS = (
    "ok",  # math-verify compared the extracted answer with the gold (reward 0 or 1)
    "no_answer",  # nothing answer-like was extracted from the response
    "bad_gold",  # the reference answer did not parse (a data problem: check the dataset)
    "parse_error",  # math-verify raised while parsing or comparing
    "timeout",  # the item ran longer than timeout_s; its worker was killed
    "too_long",  # response (or answer) above max_chars, refused before the pool
    "invalid_input",  # not a str (or bytes)
    "worker_crash",  # the worker process died on this item
)

_STARTED: Any = None  # the pool's "item started" queue, set by _worker_init


def _worker_init(started: Any) -> None:
    global _STARTED
    _STARTED = started
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:  # import math-verify and build its grammars before the first item
        _parse_gold("1")
    except Exception:  # not installed: only math_verify_item needs it
        pass


def _worker_ping() -> int:
    return os.getpid()


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> list:
    from math_verify import parse

    # Golds are usually bare ("42", "\\frac{1}{2}"); retry wrapped as LaTeX math.
    for text in (answer, f"${answer}$", f"\\boxed{{{answer}}}"):
        # The pool enforces the timeout; math-verify's own uses signal.alarm.
        gold = parse(text, parsing_timeout=None)
        if gold:
            return gold
    return []


def _worker_run(
    task_id: int, fn: Callable[[str, str], Any], response: str, answer: str
) -> tuple[float, str]:
    """Run one item: report its start (the parent times the item alone), then score it."""
    _STARTED.put((task_id, time.monotonic()))
    out = fn(response, answer)
    if isinstance(out, tuple):
        return float(out[0]), str(out[1])
    return float(out), "ok"


def math_verify_item(response: str, answer: str) -> tuple[float, str]:
    """math-verify on one item, in-process and without timeout -> (reward, reason).

    Call it only in a worker (``MathVerifyReward``): hostile input can make it run for
    minutes or crash.
    """
    from math_verify import parse, verify

    try:
        gold = _parse_gold(answer)
    except Exception:
        return 0.0, "bad_gold"
    if not gold:
        return 0.0, "bad_gold"
    try:
        # parsing_timeout / timeout_seconds None: math-verify's signal.alarm timeouts off.
        pred = parse(response, parsing_timeout=None, raise_on_error=True)
    except Exception:
        return 0.0, "parse_error"
    if not pred:
        return 0.0, "no_answer"
    try:
        correct = verify(gold, pred, timeout_seconds=None)
    except Exception:
        return 0.0, "parse_error"
    return (1.0 if correct else 0.0), "ok"


# --------------------------------------------------------------------------- parent side


def _forkserver_context() -> multiprocessing.context.BaseContext:
    """The forkserver context, preloading this module (and the -m main module).

    Spawn and forkserver workers re-import the main module; under ``python -m
    torchtitan_mtp.train`` that imports torch (~10 s a worker). The forkserver imports
    it once, and every worker (and replacement after a timeout) is a cheap fork of it.
    Has no effect if this process already started its forkserver.
    """
    preload = ["__main__", __name__]
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_spec is not None and not main_spec.name.endswith("__main__"):
        preload.append(main_spec.name)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    return ctx


class _Pool:
    """One ProcessPoolExecutor and its "item started" queue."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, workers: int):
        self.started = ctx.SimpleQueue()
        self.executor = cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(self.started,),
        )

    def drain_started(self) -> list[tuple[int, float]]:
        out = []
        try:
            while not self.started.empty():
                out.append(self.started.get())
        except (OSError, EOFError, ValueError):  # closed or torn by a killed worker
            pass
        return out

    def kill(self) -> None:
        """Stop the pool now, killing its workers (a stuck C-level parse ignores all else)."""
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 2.0
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
        self.started.close()


def _digest(response: str, answer: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for text in (response, answer):
        data = text.encode("utf-8", errors="replace")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.digest()


class PoolReward:
    """A reward function run in a process pool with a per-item timeout.

    ``fn(response, answer) -> float | (float, reason)`` runs in worker processes (it must
    be a module-level function the workers can import). The parent:

    - refuses items longer than ``max_chars`` (reason ``too_long``) and replaces invalid
      unicode (lone surrogates) before anything is sent to a worker;
    - submits a whole batch at once; each worker reports when it starts an item, and an
      item running longer than ``timeout_s`` scores 0 (``timeout``): the pool is killed
      (its processes terminated: a stuck C-level parse ignores everything else) and
      replaced, and the other unfinished items are resubmitted, uncharged;
    - on a worker crash (BrokenProcessPool), the item that was running scores 0
      (``worker_crash``); if several were running, each is retried alone to find it;
    - remembers (response, answer) pairs that timed out (a degenerate policy repeats
      itself) and scores them 0 at once; ``batch_timeout_s`` (default none) bounds a
      whole batch: items unfinished by then score 0 (``timeout``).

    Workers come from a ``forkserver`` (default) or ``spawn`` context, never ``fork``.
    ``start()`` starts the pool (else the first call does); ``close()`` kills it.
    ``stats()`` counts the reasons (``REASONS``). Calls are serialised by a lock.
    """

    def __init__(
        self,
        fn: Callable[[str, str], Any],
        *,
        workers: int = 2,
        timeout_s: float = 5.0,
        max_chars: int = 20_000,
        start_method: str = "forkserver",
        startup_timeout_s: float = 300.0,
        batch_timeout_s: float | None = None,
    ):
        if workers < 1:
            raise ValueError(f"workers = {workers} must be >= 1")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s = {timeout_s} must be > 0")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(
                f"start_method = {start_method!r}: use 'forkserver' or 'spawn' "
                "(fork is unsafe in a multi-threaded torch process)"
            )
        self.fn = fn
        self.name = getattr(fn, "__name__", "pool")
        self.workers, self.timeout_s, self.max_chars = workers, timeout_s, max_chars
        self.start_method, self.startup_timeout_s = start_method, startup_timeout_s
        self.batch_timeout_s = batch_timeout_s
        self._timed_out: dict[bytes, None] = {}  # digests of timed-out pairs, oldest first
        self._pool: _Pool | None = None
        self._counts = dict.fromkeys(REASONS, 0)
        self._next_id = 0
        self._lock = threading.Lock()
        self.restarts = 0  # pool replacements (timeouts and crashes)

    # ------------------------------------------------------------------ lifecycle

    def _new_pool(self) -> _Pool:
        ctx = (
            _forkserver_context()
            if self.start_method == "forkserver"
            else multiprocessing.get_context("spawn")
        )
        return _Pool(ctx, self.workers)

    def start(self) -> PoolReward:
        """Start the pool and wait until its workers have imported math-verify."""
        with self._lock:
            self._ensure_pool()
        return self

    def _ensure_pool(self) -> _Pool:
        if self._pool is None:
            pool = self._new_pool()
            try:
                pings = [pool.executor.submit(_worker_ping) for _ in range(self.workers)]
                cf.wait(pings, timeout=self.startup_timeout_s)
                for ping in pings:
                    ping.result(timeout=0)
            except Exception as e:
                pool.kill()
                raise RuntimeError(
                    f"{self.name} reward: the worker pool ({self.start_method}) did not "
                    f"start within {self.startup_timeout_s} s: {type(e).__name__}: {e} "
                    "(a worker's traceback, if any, is on stderr)"
                ) from e
            except BaseException:
                pool.kill()
                raise
            self._pool = pool
            _live_rewards.add(self)
        return self._pool

    def _replace_pool(self) -> None:
        if self._pool is not None:
            self._pool.kill()
            self._pool = None
            self.restarts += 1

    def close(self) -> None:
        """Kill the worker pool (a later call starts a new one)."""
        if self._pool is not None:
            self._pool.kill()
            self._pool = None

    def __enter__(self) -> PoolReward:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ stats

    def stats(self, reset: bool = False) -> dict[str, int]:
        """Counts of scored items by reason (all of ``REASONS``), since the last reset."""
        counts = dict(self._counts)
        if reset:
            self._counts = dict.fromkeys(REASONS, 0)
        return counts

    # ------------------------------------------------------------------ scoring

    def __call__(self, response: str, answer: str) -> float:
        return self.score_batch([response], [answer])[0]

    def _screen(self, text: Any) -> tuple[str | None, str | None]:
        """-> (sanitised text, None) or (None, reason)."""
        if isinstance(text, bytes | bytearray):
            text = bytes(text).decode("utf-8", errors="replace")
        if not isinstance(text, str):
            return None, "invalid_input"
        if len(text) > self.max_chars:
            return None, "too_long"
        # Lone surrogates cannot be encoded (or pickled safely as UTF-8): replace them.
        return text.encode("utf-8", errors="replace").decode("utf-8"), None

    def score_batch(self, responses: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Scores of (response, answer) pairs, in order; all are submitted at once."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        with self._lock:
            scores: list[float] = [0.0] * len(responses)
            reasons: list[str | None] = [None] * len(responses)
            tasks: dict[int, tuple[str, str]] = {}
            for i, (response, answer) in enumerate(zip(responses, answers, strict=True)):
                response, why = self._screen(response)
                if why is None:
                    answer, why = self._screen(answer)
                if why is not None:
                    reasons[i] = why
                else:
                    tasks[i] = (response, answer)
                    if _digest(response, answer) in self._timed_out:
                        reasons[i] = "timeout"
                        del tasks[i]
            try:
                if tasks:
                    self._run(tasks, scores, reasons)
            except BaseException:
                self._replace_pool()  # interrupted: never leave a stuck worker behind
                raise
            batch_counts: dict[str, int] = {}
            for reason in reasons:
                reason = reason or "parse_error"
                batch_counts[reason] = batch_counts.get(reason, 0) + 1
                self._counts[reason] = self._counts.get(reason, 0) + 1
            failures = {
                k: batch_counts[k] for k in ("timeout", "worker_crash") if k in batch_counts
            }
            if failures:
                logger.warning(
                    "%s reward: %s in a batch of %d (scored 0; workers replaced)",
                    self.name,
                    ", ".join(f"{n} {k}" for k, n in failures.items()),
                    len(reasons),
                )
            return scores

    def _remember_timeout(self, response: str, answer: str, keep: int = 4096) -> None:
        self._timed_out[_digest(response, answer)] = None
        while len(self._timed_out) > keep:
            del self._timed_out[next(iter(self._timed_out))]

    def _run(
        self, tasks: dict[int, tuple[str, str]], scores: list[float], reasons: list[str | None]
    ) -> None:
        """Score ``tasks`` (index -> (response, answer)) into ``scores``/``reasons``."""
        normal = list(tasks)  # indices to submit together
        solo: list[int] = []  # crash suspects, retried one at a time to find the culprit
        isolated: set[int] = set()
        unresolved = set(tasks)
        done_q: queue.SimpleQueue = queue.SimpleQueue()  # (generation, task id, future)
        generation = 0
        inflight: dict[int, int] = {}  # task id -> index, current pool only
        running: dict[int, float] = {}  # task id -> start time in its worker (monotonic)
        empty_crashes = 0
        last_progress = time.monotonic()
        batch_deadline = (
            None if self.batch_timeout_s is None else last_progress + self.batch_timeout_s
        )

        def resolve(index: int, score: float, reason: str) -> None:
            scores[index], reasons[index] = score, reason
            unresolved.discard(index)

        def restart() -> None:
            """Kill the pool; requeue the unresolved items it had in flight (uncharged)."""
            nonlocal generation
            self._replace_pool()
            generation += 1
            for index in inflight.values():
                if index in unresolved:
                    (solo if index in isolated else normal).append(index)
            inflight.clear()
            running.clear()

        while unresolved:
            if batch_deadline is not None and time.monotonic() > batch_deadline:
                for index in list(unresolved):
                    resolve(index, 0.0, "timeout")
                if inflight:
                    restart()
                break
            pool = self._ensure_pool()
            # Submit every normal item, or else one suspect when nothing is in flight.
            if normal:
                batch, normal = normal, []
            elif solo and not inflight:
                batch = [solo.pop(0)]
            else:
                batch = []
            for index in batch:
                task_id, self._next_id = self._next_id, self._next_id + 1
                future = pool.executor.submit(_worker_run, task_id, self.fn, *tasks[index])
                inflight[task_id] = index
                future.add_done_callback(lambda f, g=generation, t=task_id: done_q.put((g, t, f)))
            if batch:
                last_progress = time.monotonic()

            # Wait for completions, at most until the earliest running item's deadline.
            wait_s = 0.05
            if running:
                deadline = min(running.values()) + self.timeout_s
                wait_s = min(wait_s, max(0.0, deadline - time.monotonic()))
            events = []
            try:
                events.append(done_q.get(timeout=wait_s))
                while True:
                    events.append(done_q.get_nowait())
            except queue.Empty:
                pass
            for task_id, started_at in pool.drain_started():
                if task_id in inflight:
                    running[task_id] = started_at

            crashed = False
            for gen, task_id, future in events:
                if gen != generation or task_id not in inflight or future.cancelled():
                    continue  # from a pool already replaced
                exc = future.exception()
                if isinstance(exc, BrokenProcessPool):
                    crashed = True
                    continue
                index = inflight.pop(task_id)
                running.pop(task_id, None)
                last_progress = time.monotonic()
                empty_crashes = 0
                if exc is not None:
                    resolve(index, 0.0, "parse_error")
                else:
                    resolve(index, *future.result())

            if crashed:
                suspects = [inflight[t] for t in running if t in inflight]
                if len(suspects) == 1:
                    resolve(suspects[0], 0.0, "worker_crash")
                elif suspects:
                    isolated.update(suspects)
                else:
                    empty_crashes += 1
                    if empty_crashes > 3:
                        raise RuntimeError(
                            f"{self.name} reward: the worker pool keeps dying with no item "
                            "running (out of memory? a broken install?)"
                        )
                restart()
                continue

            now = time.monotonic()
            expired = [t for t, started_at in running.items() if now - started_at > self.timeout_s]
            if expired:
                for task_id in expired:
                    resolve(inflight[task_id], 0.0, "timeout")
                    self._remember_timeout(*tasks[inflight[task_id]])
                restart()
                continue

            if inflight and not running and now - last_progress > self.startup_timeout_s:
                raise RuntimeError(
                    f"{self.name} reward: no worker started an item in {self.startup_timeout_s} s"
                )


class MathVerifyReward(PoolReward):
    """math-verify reward (1.0 / 0.0): ``PoolReward`` of ``math_verify_item``.

    Each item is ``parse(answer)`` (cached per worker) + ``parse(response)`` with
    math-verify's default extraction (``\\boxed{}``, LaTeX, final numbers) +
    ``verify(gold, pred)``, with math-verify's own signal-based timeouts disabled (the
    pool enforces ``timeout_s``).
    """

    def __init__(self, **options: Any):
        super().__init__(math_verify_item, **options)
        self.name = "math_verify"


_live_rewards: weakref.WeakSet[PoolReward] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for reward in list(_live_rewards):
        reward.close()


# --------------------------------------------------------------------------- registry

REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "exact_match": exact_match,
    # The shared default instance; its pool starts on first use.
    "math_verify": MathVerifyReward(),
}

_FACTORIES: dict[str, Callable[..., RewardFunction]] = {"math_verify": MathVerifyReward}


class _ModuleNotFound(ValueError):
    pass


def _import_module(module_name: str, what: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise _ModuleNotFound(f"{what}: module {module_name!r} not found") from e
        raise ValueError(f"{what}: importing module {module_name!r} failed: {e}") from e
    except Exception as e:
        raise ValueError(
            f"{what}: importing module {module_name!r} failed: {type(e).__name__}: {e}"
        ) from e


def _resolve_path(name: str) -> RewardFunction:
    """``"pkg.module:attr.path"`` or ``"pkg.module.attr[.attr]"`` -> the callable it names."""
    what = f"reward.function = {name!r}"
    if ":" in name:
        module_name, _, attr_path = name.partition(":")
        if not module_name or not attr_path:
            raise ValueError(
                f"{what}: expected 'package.module:function' or 'package.module.function'"
            )
        obj: Any = _import_module(module_name, what)
    else:
        # The longest importable prefix is the module ("pkg.mod.Class.method" works too).
        parts = name.split(".")
        if not all(parts):
            raise ValueError(f"{what}: expected 'package.module.function'")
        not_found: _ModuleNotFound | None = None
        for cut in range(len(parts) - 1, 0, -1):
            module_name, attr_path = ".".join(parts[:cut]), ".".join(parts[cut:])
            try:
                obj = _import_module(module_name, what)
                break
            except _ModuleNotFound as e:
                not_found = not_found or e
        else:
            assert not_found is not None
            raise not_found
    for i, attr in enumerate(attr_path.split(".")):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            owner = ".".join([module_name, *attr_path.split(".")[:i]])
            raise ValueError(f"{what}: {owner!r} has no attribute {attr!r}") from None
    if isinstance(obj, type):  # a reward class: instantiate it (no arguments)
        try:
            obj = obj()
        except Exception as e:
            raise ValueError(f"{what}: instantiating class {attr_path!r} failed: {e}") from e
    if not callable(obj):
        raise ValueError(
            f"{what}: {attr_path!r} in module {module_name!r} is not callable "
            f"(it is a {type(obj).__name__}); expected a function (response, answer) -> float"
        )
    return obj


def get_reward_function(name: str, **options: Any) -> RewardFunction:
    """A registry name (``REWARD_FUNCTIONS``) or a dotted path to a user function.

    ``options`` configure a registry reward that takes them (``math_verify``: ``workers``,
    ``timeout_s``, ``max_chars``, ``start_method``) and give a new instance; other rewards
    ignore them. Without options ``"math_verify"`` is the shared default instance. A user
    class (not instance) named by path is instantiated without arguments.
    """
    if options and name in _FACTORIES:
        return _FACTORIES[name](**options)
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if "." in name or ":" in name:
        return _resolve_path(name)
    raise ValueError(
        f"reward.function = {name!r} is unknown; available: {sorted(REWARD_FUNCTIONS)}, "
        "or a user function as 'package.module:function'"
    )


def score_batch(
    reward_fn: RewardFunction, responses: Sequence[str], answers: Sequence[str]
) -> list[float]:
    """``reward_fn.score_batch`` when it has one (one pool round trip), else item by item."""
    batch = getattr(reward_fn, "score_batch", None)
    if batch is not None:
        return [float(s) for s in batch(responses, answers)]
    return [float(reward_fn(r, a)) for r, a in zip(responses, answers, strict=True)]
