"""The run folder (``--out``): never clobbered, never shared, checkpoints that survive any crash.

A run folder holds ``metrics.jsonl``, ``checkpoint.pt`` (the newest checkpoint),
``checkpoint.prev.pt`` (the one before it) and, once the run is done, ``final.json``.

* **Claiming.** :meth:`RunFolder.claim` refuses an ``--out`` that is a file, and one that
  already holds a run unless the caller resumes it (``--resume``) or starts it again
  (``--overwrite``, which deletes the old run's files, nothing else). It then takes
  ``OUT/.lock``: a file created atomically (written under a temporary name, then
  hard-linked into place, so a reader never sees it half-written) that names the
  process (pid, host, process start time). A second run on the same folder is refused
  with who holds it. A lock whose process is gone (same host, pid not running, or running
  but started at another time: a reused pid) is stale: it is taken over with a message.
  A lock from another host cannot be checked from here and is refused with the command
  that clears it.
* **Saving.** :meth:`RunFolder.save` writes the new checkpoint under a temporary name
  (fsync), hard-links the current ``checkpoint.pt`` to ``checkpoint.prev.pt``, renames the
  new one over ``checkpoint.pt`` and fsyncs the folder. At every instant both names hold
  complete checkpoints (or do not exist yet); a crash mid-write leaves a ``*.tmp-*`` file
  that :meth:`RunFolder.remove_temporaries` deletes on resume.
* **Loading.** :meth:`RunFolder.load` reads ``checkpoint.pt``; when it is missing, empty,
  truncated or not a checkpoint, it says so in one line, falls back to
  ``checkpoint.prev.pt`` and moves the bad file aside (``checkpoint.pt.corrupt``) so the
  next save cannot rotate it into the fallback slot. With no readable checkpoint it is one
  :class:`~galore_mini.errors.UsageError`, never an unpickler traceback.

Example::

    import tempfile
    from galore_mini.train.runs import RunFolder

    folder = RunFolder(tempfile.mkdtemp())
    folder.claim(resume=False, overwrite=False, log=print)    # a UsageError if it held a run or a live lock
    try:
        for step in (10, 20):
            folder.save({"format": 1, "step": step, "model": {}, "optimizer": {}, "scheduler": {}, "data": {},
                         "rng": []})
        folder.checkpoint.write_bytes(b"")                     # the newest is damaged ...
        name, state = folder.newest_readable(log=print)         # ... so: ("checkpoint.prev.pt", step 10)
    finally:
        folder.release()
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from galore_mini.errors import UsageError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
METRICS = "metrics.jsonl"
FINAL = "final.json"
LOCK = ".lock"
CHECKPOINT_FORMAT = 1
# what a loadable checkpoint must hold
_CHECKPOINT_KEYS = ("format", "step", "model", "optimizer", "scheduler", "data", "rng")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside `path`, fsync, rename over `path`, fsync the folder.

    A crash at any point leaves either the old file or the new one at `path`, never half of one.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    with os.fdopen(fd, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            # the command name (field 2) may hold spaces and parentheses: split after its last ')'
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunFolder:
    """One ``--out`` folder: claim it, lock it, save and load its checkpoints (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.locked = False

    # -- names ---------------------------------------------------------------------------------------

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def previous(self) -> Path:
        return self.path / PREVIOUS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def final(self) -> Path:
        return self.path / FINAL

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def run_files(self) -> list[Path]:
        """The files of a run that this folder holds (an empty metrics log does not count)."""
        found = [p for p in (self.checkpoint, self.previous, self.final) if p.exists()]
        if self.metrics.exists() and self.metrics.stat().st_size > 0:
            found.append(self.metrics)
        return found

    def temporaries(self) -> list[Path]:
        """Half-written checkpoint files a killed run left behind."""
        return sorted(self.path.glob("checkpoint*.tmp-*"))

    # -- claiming and locking ------------------------------------------------------------------------

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse a file, or a folder holding a run that is neither resumed nor overwritten."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out={str(self.path)!r} is a file, not a folder; name a folder for the run")
        if resume and overwrite:
            raise UsageError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                             "--overwrite deletes it; give one")
        if resume or overwrite or not self.path.is_dir():
            return
        found = self.run_files()
        if found:
            names = ", ".join(p.name for p in found)
            raise UsageError(f"--out={str(self.path)!r} already holds a run ({names}); add --resume to continue "
                             "it, --overwrite to delete it and start again, or choose another --out")

    def claim(self, resume: bool, overwrite: bool, log: Callable[[str], None]) -> None:
        """:meth:`check`, create the folder, take the lock and, with `overwrite`, delete the old run's files."""
        self.check(resume, overwrite)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out={str(self.path)!r}: cannot create the folder ({exc.strerror or exc})") from None
        self.acquire(log)
        if overwrite:
            old = self.run_files() + self.temporaries() + [self.path / (CHECKPOINT + ".corrupt")]
            removed = [p.name for p in old if p.exists()]
            for p in old:
                p.unlink(missing_ok=True)
            if removed:
                log(f"--overwrite: deleted the previous run's {', '.join(removed)} in {self.path}")

    def _lock_record(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _read_lock(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.lock_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _create_lock(self) -> bool:
        """Create the lock file with our record, atomically; False if one exists."""
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=LOCK + ".new-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._lock_record(), f)
            try:
                os.link(tmp, self.lock_path)
            except FileExistsError:
                return False
            except OSError:  # no hard links here (some network filesystems): exclusive create instead
                try:
                    with open(self.lock_path, "x", encoding="utf-8") as f:
                        json.dump(self._lock_record(), f)
                except FileExistsError:
                    return False
            return True
        finally:
            os.unlink(tmp)

    def _stale_reason(self, record: dict[str, Any]) -> str | None:
        """Why the lock `record` belongs to no running process, or None if it may (or cannot be checked)."""
        if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
            return None
        pid = record["pid"]
        if not _pid_alive(pid):
            return f"process {pid} is no longer running"
        start = _process_start(pid)
        if record.get("start") is not None and start is not None and start != record["start"]:
            return f"process {pid} is no longer running (the pid now belongs to another process)"
        return None

    def acquire(self, log: Callable[[str], None]) -> None:
        """Take ``OUT/.lock`` or raise a `UsageError` naming the run that holds it."""
        for _ in range(3):
            if self._create_lock():
                self.locked = True
                return
            record = self._read_lock()
            if record is None:  # released between our attempt and the read: try again
                continue
            who = (f"process {record.get('pid')} on {record.get('host')} since {record.get('since')}" if record
                   else "an unreadable lock")
            reason = self._stale_reason(record) if record else None
            if reason is None:
                raise UsageError(f"--out={str(self.path)!r} is in use by another run ({who}); wait for it, use "
                                 f"another --out, or delete {self.lock_path} if that run is gone")
            # take over: move the stale lock aside, and only if what we moved is still that stale lock
            aside = self.path / f"{LOCK}.stale-{os.getpid()}"
            try:
                os.replace(self.lock_path, aside)
            except FileNotFoundError:
                continue
            moved = self._read_json(aside)
            if moved != record:  # another process took it over first: put its lock back
                with contextlib.suppress(OSError):
                    os.link(aside, self.lock_path)
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            log(f"taking over the lock on {self.path} left by {who}: {reason}")
        raise UsageError(f"--out={str(self.path)!r}: could not take {self.lock_path}; another run is starting there")

    @staticmethod
    def _read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Remove our lock (and only ours)."""
        if not self.locked:
            return
        self.locked = False
        record = self._read_lock()
        if record and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
            self.lock_path.unlink(missing_ok=True)

    # -- checkpoints ---------------------------------------------------------------------------------

    def save(self, state: dict[str, Any]) -> None:
        """Write `state` as the newest checkpoint; the one it replaces becomes ``checkpoint.prev.pt``."""
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=CHECKPOINT + ".tmp-")
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if self.checkpoint.exists():
            link = self.path / f"{PREVIOUS}.tmp-{os.getpid()}"
            link.unlink(missing_ok=True)
            try:
                os.link(self.checkpoint, link)
                os.replace(link, self.previous)
            except OSError:  # no hard links: a moment without checkpoint.pt, when load falls back to prev
                os.replace(self.checkpoint, self.previous)
        os.replace(tmp, self.checkpoint)
        _fsync_dir(self.path)

    def remove_temporaries(self, log: Callable[[str], None]) -> None:
        for tmp in self.temporaries():
            log(f"removing {tmp.name}, a checkpoint write that did not finish")
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _read_checkpoint(path: Path) -> tuple[dict | None, str]:
        """(state, '') or (None, why it cannot be used)."""
        if not path.exists():
            return None, "missing"
        size = path.stat().st_size
        if size == 0:
            return None, "empty (0 bytes)"
        try:
            with warnings.catch_warnings():  # a damaged file may also warn; the verdict below says it all
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types on a damaged file (zip, pickle, EOF, OSError)
            return None, f"unreadable: truncated, damaged or not a checkpoint ({type(exc).__name__}, {size:,} bytes)"
        if not isinstance(state, dict) or any(key not in state for key in _CHECKPOINT_KEYS):
            return None, "not a galore-mini checkpoint"
        if state["format"] != CHECKPOINT_FORMAT:
            return None, f"checkpoint format {state['format']!r}, this version reads {CHECKPOINT_FORMAT}"
        return state, ""

    def newest_readable(self, log: Callable[[str], None]) -> tuple[str | None, dict[str, Any] | None]:
        """(name, state) of the checkpoint to resume from (falling back with a message); (None, None) if none.

        Raises a `UsageError` when checkpoints exist but none can be read.
        """
        state, why = self._read_checkpoint(self.checkpoint)
        if state is not None:
            return CHECKPOINT, state
        previous, why_previous = self._read_checkpoint(self.previous)
        if why == "missing" and why_previous == "missing":
            return None, None
        if previous is None:
            detail = (f"{self.checkpoint} is {why}" if why_previous == "missing"
                      else f"{self.checkpoint} is {why} and {self.previous} is {why_previous}")
            raise UsageError(f"--resume: {detail}; there is no readable checkpoint to fall back on; start again "
                             "with --overwrite (or another --out)")
        if why != "missing":
            aside = self.path / (CHECKPOINT + ".corrupt")
            os.replace(self.checkpoint, aside)
            log(f"--resume: {self.checkpoint} is {why}; moved it to {aside.name} and falling back to {PREVIOUS} "
                f"(step {previous['step']})")
        else:
            log(f"--resume: {self.checkpoint} is missing; falling back to {PREVIOUS} (step {previous['step']})")
        return PREVIOUS, previous

    def load(self, name: str) -> dict[str, Any]:
        state, why = self._read_checkpoint(self.path / name)
        if state is None:
            raise UsageError(f"--resume: {self.path / name} is {why}")
        return state
