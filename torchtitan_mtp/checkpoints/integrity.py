"""Checkpoint integrity around TorchTitan's CheckpointManager (issue #11).

TorchTitan picks what to load from a folder listing: the newest ``step-N`` that has a DCP
``.metadata``, and ``checkpoint.initial_load_path`` only while ``checkpoint.folder`` does
not exist. So a save killed half-way made a job restart from fresh weights (exit 0), a
truncated shard failed with an ``EOFError`` naming no file, flipped bytes loaded
silently, and a full disk showed up as ``unexpected pos``. :class:`CheckpointGuard` wraps
the trainer's CheckpointManager, through its public ``load`` and ``save`` only:

* After TorchTitan's save, rank 0 writes ``<step>/.torchtitan_mtp_manifest.json`` (the
  size and CRC-32 of every file of the step) through a temporary file and ``os.replace``.
  DCP writes ``.metadata`` on rank 0 only once every rank's shards are written, so a fresh
  ``.metadata`` is the sign that the whole step is there; a manifest marks it complete.
* Before a load, the step to load is verified (:func:`verify_step`). A bad step is moved
  aside to ``<folder>.damaged/step-N`` and the previous complete step loads
  (``[checkpoint] on_damaged = "fallback"``), or the job stops naming the bad file
  (``"refuse"``). With no step left the warm start (``initial_load_path``) loads, and it
  must exist and verify. Rank 0 decides and moves; every rank gets the same decision.
* A save that fails because the disk is full says so (:class:`DiskFullError`).

Damaged steps go to a sibling folder, not to ``step-N.damaged`` beside the good ones:
TorchTitan matches ``step-(\\d+)`` anywhere in a name, both to pick the step to load and
to purge old steps (``keep_latest_k``), and any entry left in the folder makes it ignore
``initial_load_path``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.tools.logging import logger

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "CheckpointGuard",
    "Damage",
    "DamagedCheckpointError",
    "DiskFullError",
    "LoadedCheckpoint",
    "disk_full_error",
    "guard_checkpointer",
    "has_manifest",
    "resumed_checkpoint_hint",
    "verify_step",
    "write_manifest",
]

MANIFEST = ".torchtitan_mtp_manifest.json"
_STEP_DIR = re.compile(r"step-(\d+)")
_CHUNK = 1 << 22
# Messages of a failed write: the zip writer under torch.save turns ENOSPC into
# "unexpected pos" (seen with a full disk).
_WRITE_FAILURES = ("no space left on device", "disk quota exceeded", "errno 28", "unexpected pos")

T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded as asked."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint step is incomplete, fails its checksums, or fails to load."""


class DiskFullError(CheckpointError):
    """A checkpoint save ran out of disk space."""


@dataclass(frozen=True)
class Damage:
    """What is wrong with a checkpoint step: the bad (or missing) file and why."""

    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """The checkpoint a trainer loaded: its folder, the trainer step after loading it,
    and whether its files matched a manifest."""

    path: str
    step: int
    verified: bool


# ---------------------------------------------------------------- manifest and checks


def _crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)  # releases the GIL: threads hash files in parallel
    return f"{crc:08x}"


def _checksums(root: str, names: list[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        return list(pool.map(lambda name: _crc32(os.path.join(root, name)), names))


def _step_files(step_dir: str) -> list[str]:
    """Paths (relative, sorted) of the step's files, the manifest excluded."""
    names = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            if not name.startswith(MANIFEST):
                names.append(os.path.relpath(os.path.join(root, name), step_dir))
    return sorted(names)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def write_manifest(step_dir: str) -> str:
    """Write ``<step_dir>/.torchtitan_mtp_manifest.json``: size and CRC-32 of each file.

    Atomic (temporary file, fsync, ``os.replace``): the manifest exists only complete.
    Returns its path.
    """
    names = _step_files(step_dir)
    sizes = [os.path.getsize(os.path.join(step_dir, name)) for name in names]
    sums = _checksums(step_dir, names)
    files = {n: {"bytes": b, "crc32": c} for n, b, c in zip(names, sizes, sums, strict=True)}
    path = os.path.join(step_dir, MANIFEST)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump({"format": 1, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(step_dir)
    return path


def has_manifest(step_dir: str) -> bool:
    """Whether TorchTitan's save of ``step_dir`` finished and its manifest was written."""
    return os.path.isfile(os.path.join(step_dir, MANIFEST))


def _check_manifest(step_dir: str) -> Damage | None:
    manifest = os.path.join(step_dir, MANIFEST)
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
        expected = {name: (int(e["bytes"]), str(e["crc32"])) for name, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return Damage(manifest, f"unreadable manifest ({type(e).__name__}: {e})")
    for name, (size, _) in sorted(expected.items()):
        path = os.path.join(step_dir, name)
        if not os.path.isfile(path):
            return Damage(path, "missing (listed in the manifest)")
        actual = os.path.getsize(path)
        if actual != size:
            return Damage(path, f"{actual} bytes, the manifest says {size} (truncated?)")
    names = sorted(expected)
    for name, crc in zip(names, _checksums(step_dir, names), strict=True):
        if crc != expected[name][1]:
            return Damage(
                os.path.join(step_dir, name),
                f"CRC-32 {crc}, the manifest says {expected[name][1]} (its bytes changed)",
            )
    return None


def _check_against_dcp_metadata(step_dir: str) -> Damage | None:
    """A step without manifest: every file its ``.metadata`` names, long enough."""
    metadata = os.path.join(step_dir, ".metadata")
    try:
        storage = FileSystemReader(step_dir).read_metadata().storage_data
    except Exception as e:  # a damaged pickle raises anything
        return Damage(metadata, f"unreadable ({type(e).__name__}: {e})")
    needed: dict[str, int] = {}
    for info in storage.values() if isinstance(storage, dict) else ():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        path = os.path.join(step_dir, name)
        if not os.path.isfile(path):
            return Damage(path, "missing (named in .metadata)")
        if (actual := os.path.getsize(path)) < end:
            return Damage(path, f"{actual} bytes, .metadata needs {end} (truncated)")
    return None


def verify_step(step_dir: str) -> Damage | None:
    """None if ``step_dir`` is a complete, intact checkpoint step, else what is wrong.

    With a manifest: every listed file has its size and CRC-32. Without one (a step of
    an older version, or one whose job stopped between the save and the manifest): the
    DCP ``.metadata`` is readable and every shard it names is long enough (flipped bytes
    go unnoticed there). A step without ``.metadata`` is an unfinished save, unless it
    is TorchTitan's HF format (``model.safetensors.index.json``).
    """
    if not os.path.isdir(step_dir):
        return Damage(step_dir, "does not exist")
    if has_manifest(step_dir):
        return _check_manifest(step_dir)
    if not os.path.isfile(os.path.join(step_dir, ".metadata")):
        if os.path.isfile(os.path.join(step_dir, "model.safetensors.index.json")):
            return None
        return Damage(os.path.join(step_dir, ".metadata"), "missing: the save did not finish")
    return _check_against_dcp_metadata(step_dir)


# ---------------------------------------------------------------- disk-full errors


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the per-rank failures DCP wraps."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        if isinstance(e, CheckpointException):
            todo += [failure[0] for failure in e.failures.values()]


def _mount_point(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def disk_full_error(exc: BaseException, target: str) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``target`` and the free space, if ``exc`` (or
    anything it wraps) is a failed write: ENOSPC/EDQUOT, or the messages they become."""
    hits = [
        e
        for e in _chain(exc)
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
        or any(marker in str(e).lower() for marker in _WRITE_FAILURES)
    ]
    if not hits:
        return None
    e = next((h for h in hits if not isinstance(h, CheckpointException)), hits[0])
    existing = os.path.abspath(target)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    return DiskFullError(
        f"checkpoint save to {target} failed: the disk is full ({free} bytes free on "
        f"{_mount_point(existing)}). Free space (or point job.dump_folder elsewhere) and "
        "restart: the incomplete step is moved aside then. "
        f"The writer said: {type(e).__name__}: {str(e).strip().splitlines()[-1]}"
    )


# ---------------------------------------------------------------- the guard


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _decided_on_rank0(decide: Callable[[], T]) -> T:
    """``decide()`` on rank 0 (which may move folders), its result (or error) everywhere."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return decide()
    box: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except Exception as e:
            error = e
            kind = type(e) if isinstance(e, CheckpointError) else CheckpointError
            box[0] = ("error", (kind, f"rank 0: {type(e).__name__}: {e}"))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "ok":
        return value
    if error is not None:
        raise error
    kind, message = value
    raise kind(message)


def _move_aside(step_dir: str) -> str:
    """Rename ``<folder>/step-N`` to ``<folder>.damaged/step-N`` (or ``step-N.1``, ...)."""
    folder, name = os.path.split(os.path.normpath(step_dir))
    aside_root = f"{folder}.damaged"
    os.makedirs(aside_root, exist_ok=True)
    target, n = os.path.join(aside_root, name), 0
    while os.path.exists(target):
        n += 1
        target = os.path.join(aside_root, f"{name}.{n}")
    os.rename(step_dir, target)
    return target


def _summary(exc: BaseException) -> str:
    """The innermost error of a failed load, with the file it names if any."""
    causes = list(_chain(exc))
    named = [e for e in causes if isinstance(e, OSError) and e.filename]
    plain = [e for e in causes if not isinstance(e, CheckpointException)]
    e = (named or plain or causes)[0]
    text = str(e).strip().splitlines()[-1] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" + (f" ({e.filename})" if named else "")


class CheckpointGuard:
    """TorchTitan's CheckpointManager with verified loads and checksummed saves.

    Replaces ``trainer.checkpointer`` (:func:`guard_checkpointer`); ``load`` and
    ``save`` keep their signatures, every other attribute is the manager's own.
    ``loaded`` records the checkpoint the last ``load`` read (:func:`resumed_checkpoint_hint`).

    ``owner``: this process trains into the folder, so it may move damaged steps aside.
    A reader (an evaluation, possibly while the training job is saving a step) skips
    them and leaves the folder as it is.
    """

    def __init__(
        self, checkpointer: CheckpointManager, on_damaged: str, train_state: Any, owner: bool
    ):
        self.checkpointer = checkpointer
        self.on_damaged = on_damaged
        self.train_state = train_state  # the trainer: its ``step`` after a load
        self.owner = owner and not getattr(checkpointer, "load_only", False)
        self.loaded: LoadedCheckpoint | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "checkpointer":  # not set yet (copy, unpickle)
            raise AttributeError(name)
        return getattr(self.checkpointer, name)

    # -------------------------------------------------------------- load

    def load(self, step: int = -1) -> bool:
        """Verify, then ``CheckpointManager.load``; -> whether a checkpoint was loaded.

        ``step = -1``: the newest complete step of the folder, else the warm start.
        """
        ckpt = self.checkpointer
        if not ckpt.enable:
            return ckpt.load(step=step)
        step, path, verified = _decided_on_rank0(lambda: self._choose(step))
        try:
            loaded = ckpt.load(step=step)
        except (Exception, CheckpointException) as exc:
            raise DamagedCheckpointError(
                f"loading the checkpoint {path} failed: {_summary(exc)}. It may be damaged: "
                "move it aside to resume from an earlier step."
            ) from exc
        if loaded:
            where = path or ckpt.folder
            self.loaded = LoadedCheckpoint(where, int(self.train_state.step), verified)
        return loaded

    def _choose(self, step: int) -> tuple[int, str | None, bool]:
        """(step to pass to TorchTitan, folder it will read, verified by a manifest)."""
        folder = self.checkpointer.folder
        if step != -1 and os.path.isdir(folder):  # (TorchTitan ignores it without folder)
            path = os.path.join(folder, f"step-{step}")
            if (damage := verify_step(path)) is not None:
                raise DamagedCheckpointError(
                    f"checkpoint.load_step = {step} asks for {path}, which is damaged or "
                    f"incomplete: {damage}"
                )
            return step, path, has_manifest(path)
        steps = []
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                match = _STEP_DIR.fullmatch(name)
                if match and os.path.isdir(os.path.join(folder, name)):
                    steps.append(int(match.group(1)))
        for candidate in sorted(steps, reverse=True):
            path = os.path.join(folder, f"step-{candidate}")
            damage = verify_step(path)
            if damage is None:
                if not has_manifest(path):
                    logger.info(
                        f"{path} has no checksum manifest (an older version wrote it, or the "
                        "job stopped right after saving it): checked against its .metadata"
                    )
                return candidate, path, has_manifest(path)
            if self.on_damaged == "refuse":
                raise DamagedCheckpointError(
                    f"the checkpoint {path} is damaged or incomplete: {damage}. With "
                    '[checkpoint] on_damaged = "refuse" the job stops: move the step away to '
                    "resume from an earlier one, or use --checkpoint.on_damaged fallback."
                )
            if self.owner:
                done = f"Moved it to {_move_aside(path)}"
            else:
                done = "Left it in place (this process only reads checkpoints)"
            logger.warning(
                f"the checkpoint {path} is damaged or incomplete: {damage}. {done}; "
                "loading the previous complete step (or the warm start)."
            )
        init = self._warm_start(folder)
        return -1, init, init is not None and has_manifest(init)

    def _warm_start(self, folder: str) -> str | None:
        """No step to resume from: make TorchTitan load ``initial_load_path`` (it does
        only while the folder does not exist), which must exist and verify."""
        ckpt = self.checkpointer
        init = ckpt.initial_load_path
        if os.path.isdir(folder):
            leftovers = sorted(os.listdir(folder))
            if not leftovers and self.owner:
                os.rmdir(folder)  # empty: TorchTitan then takes the warm start
            elif init or (leftovers and not self.owner):
                # The folder exists: TorchTitan would ignore initial_load_path, or pick
                # one of the damaged steps a reader leaves in place.
                fix = "move the folder away" + (
                    "" if self.owner else " (resuming the training job moves damaged steps aside)"
                )
                ignored = f"initial_load_path = {init}" if init else "a complete checkpoint"
                raise CheckpointError(
                    f"{folder} holds no complete checkpoint step "
                    f"({', '.join(leftovers[:5]) or 'it is empty'}), so this job would not "
                    f"start from {ignored}: {fix}."
                )
        if not init:
            return None
        if not os.path.isdir(init):
            raise CheckpointError(
                f"checkpoint.initial_load_path = {init} does not exist (or is not a "
                "folder): the job was told to start from these weights."
            )
        if not ckpt.initial_load_in_hf and (damage := verify_step(init)) is not None:
            raise DamagedCheckpointError(
                f"the warm start checkpoint.initial_load_path = {init} is damaged or "
                f"incomplete: {damage}"
            )
        return init

    # -------------------------------------------------------------- save

    def save(self, curr_step: int, last_step: bool = False) -> None:
        """``CheckpointManager.save``, then the manifest of the step if it was written;
        a full disk raises :class:`DiskFullError`.

        Asynchronous saves return before ``.metadata`` exists: those steps (all but the
        last) get no manifest and are checked against their ``.metadata`` on load.
        """
        ckpt = self.checkpointer
        if not ckpt.enable:
            return ckpt.save(curr_step, last_step=last_step)
        step_dir = os.path.join(ckpt.folder, f"step-{curr_step}")
        metadata = os.path.join(step_dir, ".metadata")
        before = _identity(metadata)
        try:
            ckpt.save(curr_step, last_step=last_step)
            # DCP renames .metadata into place on rank 0 after every rank wrote its shards,
            # so a new .metadata means the step was just written, all of it.
            if _rank() == 0 and _identity(metadata) not in (None, before):
                write_manifest(step_dir)
        except (Exception, CheckpointException) as exc:
            if (full := disk_full_error(exc, step_dir)) is None:
                raise
            raise full from exc


def _identity(path: str) -> tuple[int, int] | None:
    """(inode, mtime) of a file: DCP's rename gives each new ``.metadata`` a new inode."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def guard_checkpointer(trainer: Any, owner: bool = False) -> CheckpointGuard:
    """Wrap ``trainer.checkpointer`` in a :class:`CheckpointGuard` (once) and return it.

    ``owner``: the trainer trains into its checkpoint folder (the training entry); a
    guard installed by a reader (evaluation) never moves anything."""
    if not isinstance(trainer.checkpointer, CheckpointGuard):
        policy = getattr(trainer.job_config.checkpoint, "on_damaged", "fallback")
        trainer.checkpointer = CheckpointGuard(trainer.checkpointer, policy, trainer, owner)
    return trainer.checkpointer


def resumed_checkpoint_hint(checkpointer: Any, step: int) -> str | None:
    """For a non-finite gradient at ``step``: a sentence blaming the checkpoint loaded
    just before (``step`` is the first step after it), else None."""
    loaded: LoadedCheckpoint | None = getattr(checkpointer, "loaded", None)
    if loaded is None or step != loaded.step + 1:
        return None
    how = (
        "its files match their checksums, so it may have been saved with bad values"
        if loaded.verified
        else "it has no checksum manifest"
    )
    return (
        f"This is the first step after loading {loaded.path}: that checkpoint may be "
        f"damaged ({how}). Move it aside to resume from an earlier step, or recreate it."
    )
