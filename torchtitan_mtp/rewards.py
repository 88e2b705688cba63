"""Verifiable rewards: a function of the decoded response and the reference answer.

``RewardFunction(response, answer) -> float``. ``[reward] function`` names one of
``REWARD_FUNCTIONS`` or a user function by dotted path (``"pkg.module:function"`` or
``"pkg.module.function"``); see ``get_reward_function``.

- ``exact_match``: the response, stripped, equals the answer.
- ``math_verify``: math-verify (HF) extracts the final answer of the response (``\\boxed{}``,
  LaTeX, final numbers) and checks it against the parsed gold answer symbolically.
  Parsing is sympy/regex work that hostile model output can make arbitrarily slow (or
  crash), so it never runs in the trainer process: ``MathVerifyReward`` scores in a
  process pool (pebble) with a per-item wall-clock timeout that kills and replaces only the
  stuck worker, an optional bound on a whole batch, and counts why each item scored what it
  did (``stats()``). Its workers never outlive the trainer, even after ``kill -9``.

Reward objects with a ``score_batch(responses, answers)`` method should be called through
``score_batch`` (module function below), which falls back to one call per item.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import ctypes
import functools
import hashlib
import logging
import multiprocessing
import os
import pkgutil
import queue
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pebble

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
    "timeout",  # the item ran longer than timeout_s; its worker was killed and replaced
    "batch_timeout",  # unscored when the batch reached batch_timeout_s; the pool was replaced
    "too_long",  # response (or answer) above max_chars, refused before the pool
    "invalid_input",  # not a str (or bytes)
    "worker_crash",  # the worker process died on this item
)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_ALARM_EXITCODE = -signal.SIGALRM if hasattr(signal, "SIGALRM") else None
_hard_limit_s = 0.0  # a worker's own bound on one item (SIGALRM), set by _worker_init


def _worker_init(hard_limit_s: float, parent_death_signal: bool) -> None:
    """Prepare a new worker: signals, its ways to die with the trainer, math-verify warm."""
    global _hard_limit_s
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    # pebble stops a worker with SIGTERM and waits 3 s before SIGKILL, one worker after the
    # other; its handler is Python code, which never runs while a parse is stuck in C holding
    # the GIL. The default action ends the process at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "setitimer"):
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        _hard_limit_s = hard_limit_s
    if parent_death_signal:
        _set_parent_death_signal()
    _exit_with_trainer()
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:  # import math-verify and build its grammars before the first item
        _parse_gold("1")
    except Exception:  # not installed: only math_verify_item needs it
        pass


def _set_parent_death_signal() -> None:
    """Linux: the kernel SIGKILLs this process when the thread that forked it ends (spawn: a
    thread of the trainer; not the forkserver, whose death must not take running items)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the watchdog and the alarm remain
        pass


def _exit_with_trainer() -> None:
    """Exit as soon as the trainer (the process that started this worker) is gone.

    ``parent_process()`` waits on a pipe that only the trainer holds open, so this sees a
    ``kill -9`` too, under forkserver (whose workers are not the trainer's children) as under
    spawn. An idle worker would see pebble's task pipe close anyway; this ends a running item
    at once. The thread needs the GIL: an item stuck in C is ended by its alarm instead.
    """
    trainer = multiprocessing.parent_process()
    if trainer is not None:
        threading.Thread(
            target=_exit_after, args=(trainer,), name="exit-with-trainer", daemon=True
        ).start()


def _exit_after(trainer: multiprocessing.process.BaseProcess) -> None:
    trainer.join()
    os._exit(0)


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


def _worker_run(fn: Callable[[str, str], Any], response: str, answer: str) -> tuple[float, str]:
    """Score one item under an alarm: SIGALRM's default action ends the process (even while C
    code holds the GIL) should the trainer fail to kill it at the timeout (it died)."""
    if _hard_limit_s:
        signal.setitimer(signal.ITIMER_REAL, _hard_limit_s)
    try:
        out = fn(response, answer)
    finally:
        if _hard_limit_s:
            signal.setitimer(signal.ITIMER_REAL, 0)
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
    it once, and every worker (and replacement after a timeout) is a cheap fork of it,
    with math-verify already imported. The forkserver exits once the trainer and every
    worker are gone. Has no effect if this process already started its forkserver.
    """
    preload = ["__main__", __name__, "math_verify"]
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_spec is not None and not main_spec.name.endswith("__main__"):
        preload.append(main_spec.name)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    return ctx


def _stop(pool: pebble.ProcessPool) -> None:
    """Stop a pool now, killing its workers (running items are abandoned)."""
    pool.stop()
    pool.join()


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
    - submits a whole batch at once to a ``pebble.ProcessPool``: an item running longer than
      ``timeout_s`` scores 0 (``timeout``) and only its worker is killed and replaced, while
      the other items keep running;
    - an item whose worker dies scores 0 (``worker_crash``); should the whole pool break,
      the items it was running are retried one at a time to find the culprit;
    - remembers (response, answer) pairs that timed out (a degenerate policy repeats
      itself) and scores them 0 at once; ``batch_timeout_s`` (default none) bounds a
      whole batch: items unfinished by then score 0 (``batch_timeout``) and the pool is
      replaced, so the next batch starts clean.

    Workers come from a ``forkserver`` (default) or ``spawn`` context, never ``fork``. They
    never outlive the trainer, even after ``kill -9``: an idle worker sees the trainer's end
    of pebble's task pipe close, a busy one is ended by a watchdog thread that waits on the
    trainer's sentinel, and one stuck in C code that holds the GIL by its own alarm
    (SIGALRM) at ``2 * timeout_s + 1`` s. Under spawn on Linux, when the pool is started from
    the main thread, the kernel also kills the workers with the trainer (parent-death
    signal). The forkserver and multiprocessing's resource tracker exit once the trainer and
    the workers are gone.

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
        if batch_timeout_s is not None and batch_timeout_s <= 0:
            raise ValueError(f"batch_timeout_s = {batch_timeout_s} must be > 0 (or None)")
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
        self._pool: pebble.ProcessPool | None = None
        self._counts = dict.fromkeys(REASONS, 0)
        self._lock = threading.Lock()
        self.restarts = 0  # workers killed and replaced (timeouts, crashes, broken pools)

    # ------------------------------------------------------------------ lifecycle

    def _new_pool(self) -> pebble.ProcessPool:
        if self.start_method == "forkserver":
            ctx = _forkserver_context()
        else:
            ctx = multiprocessing.get_context("spawn")
        # Under spawn the workers are the trainer's children. Their parent-death signal
        # follows the thread that forked them: this one (the first workers), then pebble's
        # manager thread (replacements), which lives as long as the pool.
        death_signal = (
            self.start_method == "spawn" and threading.current_thread() is threading.main_thread()
        )
        return pebble.ProcessPool(
            max_workers=self.workers,
            initializer=_worker_init,
            initargs=(2 * self.timeout_s + 1.0, death_signal),
            context=ctx,
        )

    def start(self) -> PoolReward:
        """Start the pool and wait until its workers have imported math-verify."""
        with self._lock:
            self._ensure_pool()
        return self

    def _ensure_pool(self) -> pebble.ProcessPool:
        if self._pool is not None and not self._pool.active:  # a worker died idle
            self._replace_pool()
        if self._pool is None:
            pool = self._new_pool()
            try:
                pings = [pool.schedule(_worker_ping) for _ in range(self.workers)]
                cf.wait(pings, timeout=self.startup_timeout_s)
                for ping in pings:
                    ping.result(timeout=0)
            except Exception as e:
                _stop(pool)
                raise RuntimeError(
                    f"{self.name} reward: the worker pool ({self.start_method}) did not "
                    f"start within {self.startup_timeout_s} s: {type(e).__name__}: {e} "
                    "(a worker's traceback, if any, is on stderr)"
                ) from e
            except BaseException:
                _stop(pool)
                raise
            self._pool = pool
            _live_rewards.add(self)
        return self._pool

    def _replace_pool(self) -> None:
        """Kill the pool's workers; the next call starts a new pool."""
        if self._pool is not None:
            _stop(self._pool)
            self._pool = None
            self.restarts += self.workers

    def close(self) -> None:
        """Kill the worker pool (a later call starts a new one)."""
        if self._pool is not None:
            _stop(self._pool)
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
                k: batch_counts[k]
                for k in ("timeout", "batch_timeout", "worker_crash")
                if k in batch_counts
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
        unresolved = set(tasks)
        pending = list(tasks)  # indices to submit together
        suspects: list[int] = []  # in flight when the pool broke: retried one at a time
        isolated: set[int] = set()  # suspects already sent alone once
        inflight: dict[cf.Future, int] = {}  # future -> index, current pool only
        done: queue.SimpleQueue[cf.Future] = queue.SimpleQueue()
        deadline = None if self.batch_timeout_s is None else time.monotonic() + self.batch_timeout_s

        def resolve(index: int, score: float, reason: str) -> None:
            scores[index], reasons[index] = score, reason
            unresolved.discard(index)

        def settle(future: cf.Future, index: int) -> bool:
            """Record a finished item; False when the pool broke under it."""
            exc = future.exception()
            if exc is None:
                resolve(index, *future.result())
            elif isinstance(exc, BrokenProcessPool):
                return False
            elif isinstance(exc, TimeoutError) or (
                isinstance(exc, pebble.ProcessExpired) and exc.exitcode == _ALARM_EXITCODE
            ):
                resolve(index, 0.0, "timeout")
                self._remember_timeout(*tasks[index])
                self.restarts += 1
            elif isinstance(exc, pebble.ProcessExpired):
                resolve(index, 0.0, "worker_crash")
                self.restarts += 1
            else:  # fn raised (or could not be sent to a worker)
                resolve(index, 0.0, "parse_error")
            return True

        while unresolved:
            pool = self._ensure_pool()
            if pending:
                batch, pending = pending, []
            elif suspects and not inflight:
                batch = [suspects.pop()]
            else:
                batch = []
            broken = False
            for n, index in enumerate(batch):
                try:
                    future = pool.schedule(
                        _worker_run, args=(self.fn, *tasks[index]), timeout=self.timeout_s
                    )
                except RuntimeError:  # the pool broke since _ensure_pool looked
                    for index in batch[n:]:
                        (suspects if index in isolated else pending).append(index)
                    broken = True
                    break
                inflight[future] = index
                future.add_done_callback(done.put)

            if not broken:
                wait_s = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                try:
                    future = done.get(timeout=max(0.0, wait_s))
                except queue.Empty:
                    if deadline is not None and time.monotonic() >= deadline:
                        for index in list(unresolved):
                            resolve(index, 0.0, "batch_timeout")
                        self._replace_pool()  # kill what still runs: the next batch starts clean
                        return
                    broken = not pool.active  # broke without a word to the items in flight
                else:
                    index = inflight.pop(future, None)
                    if index is not None and not settle(future, index):
                        inflight[future] = index
                        broken = True
            if not broken:
                continue

            # The pool broke: the items in flight are lost and the culprit, if any, unknown.
            for future, index in inflight.items():
                if future.done() and settle(future, index):
                    continue
                if index in isolated:
                    resolve(index, 0.0, "worker_crash")
                else:
                    isolated.add(index)
                    suspects.append(index)
            inflight.clear()
            self._replace_pool()


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

REWARD_FUNCTIONS: dict[str, Callable[..., RewardFunction]] = {
    "exact_match": lambda **options: exact_match,  # takes no options
    "math_verify": MathVerifyReward,  # a new pool per call, started on first use
}
"""Registry names -> factories taking the ``[reward]`` options."""


def _resolve_path(name: str) -> RewardFunction:
    """``"pkg.module:attr.path"`` or ``"pkg.module.attr[.attr]"`` -> the callable it names
    (``pkgutil.resolve_name``); a class is instantiated without arguments."""
    what = f"reward.function = {name!r}"
    module, colon, attr = name.partition(":")
    if not all(name.replace(":", ".").split(".")) or (colon and not (module and attr)):
        raise ValueError(f"{what}: expected 'package.module:function' or 'package.module.function'")
    try:
        obj = pkgutil.resolve_name(name)
    except ModuleNotFoundError as e:
        missing = e.name or "?"
        if name.replace(":", ".").startswith(missing + ".") or missing == module:
            raise ValueError(f"{what}: module {missing!r} not found") from e
        raise ValueError(f"{what}: importing {name!r} failed: {e}") from e
    except AttributeError as e:
        raise ValueError(f"{what}: {e}") from None
    except Exception as e:
        raise ValueError(f"{what}: importing {name!r} failed: {type(e).__name__}: {e}") from e
    if isinstance(obj, type):  # a reward class: instantiate it (no arguments)
        try:
            obj = obj()
        except Exception as e:
            raise ValueError(f"{what}: instantiating the class failed: {e}") from e
    if not callable(obj):
        raise ValueError(
            f"{what} is not callable (it is a {type(obj).__name__}); expected a function "
            "(response, answer) -> float"
        )
    return obj


def get_reward_function(name: str, **options: Any) -> RewardFunction:
    """A registry name (``REWARD_FUNCTIONS``) or a dotted path to a user function.

    ``options`` configure a registry reward that takes them (``math_verify``: ``workers``,
    ``timeout_s``, ``batch_timeout_s``, ``max_chars``, ``start_method``); every call gives
    a new instance. A user class (not instance) named by path is instantiated without
    arguments; options do not apply to user functions.
    """
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name](**options)
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
