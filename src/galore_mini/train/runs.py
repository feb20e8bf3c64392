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
* **Integrity.** Every file saved through :func:`atomic_save` ends in a trailer holding the
  SHA-256 of what precedes it (``torch.load`` ignores it); :func:`read_checkpoint` verifies it
  before unpickling, so damage inside a file that still opens (flipped bytes mid-file) is caught
  and treated like a truncated file: moved aside, the previous checkpoint used, one line saying
  so. Files written before the trailer existed are checked with the zip archive's own CRC-32 of
  every record. A DCP folder's ``meta.pt`` holds the digest of each of its data files.
  The fine-tuning harness and ``export_pretrained`` load through the same function.
* **Sharded runs** (``--fsdp``) keep DCP folders instead: ``checkpoint-dcp/`` and
  ``checkpoint-dcp.prev/``, published by :meth:`RunFolder.publish_dcp` (temporary folder, then
  renames) and picked by :meth:`RunFolder.newest_readable_dcp` with the same fall-back. A folder
  holding one kind of checkpoint is not resumed as the other: the error names the flag to use.

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
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from galore_mini.errors import UsageError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
DCP_CHECKPOINT = "checkpoint-dcp"  # a sharded (--fsdp) run's checkpoint: a DCP folder plus meta.pt
DCP_PREVIOUS = "checkpoint-dcp.prev"
DCP_META = "meta.pt"
METRICS = "metrics.jsonl"
FINAL = "final.json"
LOCK = ".lock"
CHECKPOINT_FORMAT = 1
# what a loadable checkpoint must hold
CHECKPOINT_KEYS = ("format", "step", "model", "optimizer", "scheduler", "data", "rng")
DCP_META_KEYS = ("format", "step", "scheduler", "data", "rng")
# the trailer after a saved file's bytes: a marker and the hex SHA-256 of everything before the marker
DIGEST_MARK = b"\n#galore-mini-sha256:"
_TRAILER = len(DIGEST_MARK) + 64


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through a temporary file beside it: `write` fills it, fsync, rename over `path`,
    fsync the folder.

    A crash at any point leaves either the old file or the new one at `path`, never half of one (a
    killed process leaves a ``*.tmp-*`` file, which resume deletes; a failing `write` removes it at
    once). The file gets the mode an ordinary ``open()`` would give it (mkstemp's is 0600).
    """
    tmp = written_temporary(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def written_temporary(path: Path, write: Callable[[BinaryIO], None]) -> str:
    """A temporary file beside `path` (``path.name + ".tmp-*"``) that `write` filled, fsynced, with the mode
    an ordinary ``open()`` would give it (mkstemp's is 0600); removed again if `write` fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


class _Hashing:
    """A write-only file that hashes what passes through it (``torch.save`` needs only ``write``)."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def __getattr__(self, name: str) -> Any:  # tell, fileno ...: the file's own
        return getattr(self.f, name)


def save_with_digest(obj: Any, f: BinaryIO) -> None:
    """``torch.save(obj, f)`` followed by the digest trailer (see the module docstring)."""
    hashing = _Hashing(f)
    torch.save(obj, hashing)
    f.write(DIGEST_MARK + hashing.sha.hexdigest().encode("ascii"))


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write`, with the digest trailer."""
    atomic_write(path, lambda f: save_with_digest(obj, f))


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def integrity_problem(path: Path) -> str:
    """Why the saved file `path` is damaged ('' when its digest, or for an older file its zip CRCs, agree)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - _TRAILER))
        tail = f.read()
    if tail[:len(DIGEST_MARK)] == DIGEST_MARK and len(tail) == _TRAILER:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            left = size - _TRAILER
            while left:
                block = f.read(min(left, 1 << 20))
                if not block:
                    break
                sha.update(block)
                left -= len(block)
        if sha.hexdigest() != tail[len(DIGEST_MARK):].decode("ascii", "replace"):
            return f"damaged: its content does not match its SHA-256 digest ({size:,} bytes)"
        return ""
    try:  # written before digests: the zip archive's CRC-32 of every record
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return ""  # not a zip at all: torch.load's verdict below says what it is
    return f"damaged: record {bad} fails its CRC-32 check ({size:,} bytes)" if bad else ""


def read_checkpoint(path: Path, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> tuple[dict | None, str]:
    """(state, '') or (None, why `path` cannot be used): missing, empty, damaged (digest), unreadable,
    without the `keys` a checkpoint must hold, or of another format. Never raises for a bad file."""
    if not path.exists():
        return None, "missing"
    size = path.stat().st_size
    if size == 0:
        return None, "empty (0 bytes)"
    why = integrity_problem(path)
    if why:
        return None, why
    try:
        with warnings.catch_warnings():  # a damaged file may also warn; the verdict below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on a damaged file (zip, pickle, EOF, OSError)
        return None, f"unreadable: truncated, damaged or not a checkpoint ({type(exc).__name__}, {size:,} bytes)"
    if not isinstance(state, dict) or any(key not in state for key in keys):
        return None, "not a galore-mini checkpoint"
    if "format" in state and state["format"] != CHECKPOINT_FORMAT:
        return None, f"checkpoint format {state['format']!r}, this version reads {CHECKPOINT_FORMAT}"
    return state, ""


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


def _position(state: dict[str, Any]) -> str:
    """Where a checkpoint stands: ``step N`` (or ``epoch N`` for a fine-tuning checkpoint of an older version)."""
    return f"step {state['step']}" if "step" in state else f"epoch {state.get('epoch')}"


class RunFolder:
    """One ``--out`` folder: claim it, lock it, save and load its checkpoints (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, keys: tuple[str, ...] = CHECKPOINT_KEYS, flag: str = "--resume",
                 restart: str = "start again with --overwrite (or another --out)"):
        self.path = Path(path)
        self.keys = keys  # what a checkpoint of this kind of run must hold
        self.flag = flag  # what the messages about its checkpoints start with
        self.restart = restart  # how the user starts the run again when no checkpoint can be read
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

    @property
    def dcp_checkpoint(self) -> Path:
        return self.path / DCP_CHECKPOINT

    @property
    def dcp_previous(self) -> Path:
        return self.path / DCP_PREVIOUS

    def dcp_temporary(self, step: int) -> Path:
        """The folder a sharded checkpoint is written to before it is published (same name on every rank)."""
        return self.path / f"{DCP_CHECKPOINT}.tmp-{step}"

    def run_files(self) -> list[Path]:
        """The files of a run that this folder holds (an empty metrics log does not count)."""
        found = [p for p in (self.checkpoint, self.previous, self.dcp_checkpoint, self.dcp_previous, self.final)
                 if p.exists()]
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
            old = self.run_files() + self.temporaries() + [self.path / (CHECKPOINT + ".corrupt"),
                                                           self.path / (DCP_CHECKPOINT + ".corrupt")]
            removed = [p.name for p in old if p.exists()]
            for p in old:
                self.clear(p)
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
            try:
                created = self._create_lock()
            except OSError as exc:  # a read-only file system, a folder without write permission, a full disk
                raise UsageError(f"--out={str(self.path)!r}: cannot write there ({exc.strerror or exc}); choose a "
                                 "writable folder for the run") from None
            if created:
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
        tmp = written_temporary(self.checkpoint, lambda f: save_with_digest(state, f))
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
            self.clear(tmp)

    @staticmethod
    def clear(path: Path) -> None:
        """Delete a file or a folder (a DCP checkpoint) if it exists."""
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    # -- sharded (DCP) checkpoints -------------------------------------------------------------------

    def publish_dcp(self, tmp: Path, meta: dict[str, Any]) -> None:
        """Add ``meta.pt`` to the fully written DCP folder `tmp` and make it the newest checkpoint.

        Folders cannot be hard-linked, so the rotation is two renames: ``checkpoint-dcp`` becomes
        ``checkpoint-dcp.prev`` (the older one deleted first), then `tmp` becomes ``checkpoint-dcp``.
        A crash between them leaves no ``checkpoint-dcp``, and resume falls back to the previous one;
        a crash before leaves a ``*.tmp-*`` folder that resume deletes.
        """
        files = {name: file_digest(tmp / name) for name in sorted(os.listdir(tmp)) if (tmp / name).is_file()}
        atomic_save({**meta, "files": files}, tmp / DCP_META)
        for name in os.listdir(tmp):  # DCP's own files, made durable before the folder is published
            with contextlib.suppress(OSError):
                fd = os.open(tmp / name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        if self.dcp_checkpoint.exists():
            self.clear(self.dcp_previous)
            os.replace(self.dcp_checkpoint, self.dcp_previous)
        os.replace(tmp, self.dcp_checkpoint)
        _fsync_dir(self.path)

    @staticmethod
    def _read_dcp(path: Path) -> tuple[dict | None, str]:
        """(meta, '') or (None, why the DCP folder `path` cannot be used)."""
        if not path.exists():
            return None, "missing"
        if not (path / ".metadata").is_file():
            return None, "incomplete (no DCP .metadata)"
        meta, why = read_checkpoint(path / DCP_META, keys=DCP_META_KEYS)
        for name, digest in (meta or {}).get("files", {}).items():  # sharded runs saved before digests: none
            if not (path / name).is_file():
                return None, f"incomplete (no {name})"
            if file_digest(path / name) != digest:
                return None, f"damaged: {name} does not match its SHA-256 digest"
        return meta, why

    def newest_readable_dcp(self, log: Callable[[str], None]) -> tuple[Path | None, dict[str, Any] | None]:
        """(folder, meta) of the sharded checkpoint to resume from, falling back with a message; (None, None)
        if there is none. A `UsageError` when one exists but none can be read, or the run's checkpoint
        is a one-process ``checkpoint.pt`` (resume that without ``--fsdp``)."""
        meta, why = self._read_dcp(self.dcp_checkpoint)
        if meta is not None:
            return self.dcp_checkpoint, meta
        previous, why_previous = self._read_dcp(self.dcp_previous)
        if why == "missing" and why_previous == "missing":
            if self.checkpoint.exists() or self.previous.exists():
                raise UsageError(f"--resume --fsdp: {self.path} holds a checkpoint of an unsharded run "
                                 f"({CHECKPOINT}); resume it without --fsdp, or start again with --overwrite")
            return None, None
        if previous is None:
            raise UsageError(f"--resume: {self.dcp_checkpoint} is {why} and {self.dcp_previous} is {why_previous}; "
                             "there is no readable checkpoint to fall back on; start again with --overwrite "
                             "(or another --out)")
        if why != "missing":
            aside = self.path / (DCP_CHECKPOINT + ".corrupt")
            self.clear(aside)
            os.replace(self.dcp_checkpoint, aside)
            log(f"--resume: {self.dcp_checkpoint} is {why}; moved it to {aside.name} and falling back to "
                f"{DCP_PREVIOUS} (step {previous['step']})")
        else:
            log(f"--resume: {self.dcp_checkpoint} is missing; falling back to {DCP_PREVIOUS} "
                f"(step {previous['step']})")
        return self.dcp_previous, previous

    def newest_readable(self, log: Callable[[str], None]) -> tuple[str | None, dict[str, Any] | None]:
        """(name, state) of the checkpoint to resume from (falling back with a message); (None, None) if none.

        Raises a `UsageError` when checkpoints exist but none can be read.
        """
        state, why = read_checkpoint(self.checkpoint, self.keys)
        if state is not None:
            return CHECKPOINT, state
        previous, why_previous = read_checkpoint(self.previous, self.keys)
        if why == "missing" and why_previous == "missing":
            if self.dcp_checkpoint.exists() or self.dcp_previous.exists():
                raise UsageError(f"--resume: {self.path} holds a sharded checkpoint ({DCP_CHECKPOINT}/) of an "
                                 "--fsdp run; resume it with --fsdp under the same torchrun command, or start "
                                 "again with --overwrite")
            return None, None
        if previous is None:
            detail = (f"{self.checkpoint} is {why}" if why_previous == "missing"
                      else f"{self.checkpoint} is {why} and {self.previous} is {why_previous}")
            raise UsageError(f"{self.flag}: {detail}; there is no readable checkpoint to fall back on; "
                             f"{self.restart}")
        if why != "missing":
            aside = self.path / (CHECKPOINT + ".corrupt")
            os.replace(self.checkpoint, aside)
            log(f"{self.flag}: {self.checkpoint} is {why}; moved it to {aside.name} and falling back to {PREVIOUS} "
                f"({_position(previous)})")
        else:
            log(f"{self.flag}: {self.checkpoint} is missing; falling back to {PREVIOUS} ({_position(previous)})")
        return PREVIOUS, previous

    def load(self, name: str, sharded: bool = False) -> dict[str, Any]:
        """The checkpoint `name` (with `sharded`: a DCP folder's ``meta.pt``, named as ``FOLDER/meta.pt``)."""
        keys = DCP_META_KEYS if sharded else self.keys
        state, why = read_checkpoint(self.path / name, keys=keys)
        if state is None:
            raise UsageError(f"--resume: {self.path / name} is {why}")
        return state
