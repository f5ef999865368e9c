"""One trainer per run folder: `<workdir>/train.lock` names its holder (host, pid, start time).

A second `mathlm train` on the same workdir refuses in one line naming the holder (two trainers interleaved
metrics.jsonl and left one run's checkpoints under the other's success). A lock whose process is gone (same host,
dead pid) is stale: it is taken over with a warning. Multi-host runs: process 0 holds it for all.

Taking the lock is the run's first write: a folder that cannot be created or written is refused there in one line
(`WorkdirUnwritable`, "cannot write to ..."). A folder the lock created is removed again when the run fails before
it kept anything (no checkpoint, no logged step): a mistake found during startup (bad data, a corrupt tokenizer)
leaves no half-made run folder behind that a rerun would take for a run to resume.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import time

LOCK_NAME = "train.lock"


class WorkdirLocked(RuntimeError):
    """Another live trainer holds this run folder."""


class WorkdirUnwritable(RuntimeError):
    """The run folder cannot be created or written (read-only, or its path runs through a file)."""


def _cannot_write(folder: pathlib.Path, e: OSError) -> WorkdirUnwritable:
    from mathlm.data.sources import cannot_write
    return WorkdirUnwritable(f"{cannot_write(folder, e)}; choose another --workdir")


def _first_missing(folder: pathlib.Path) -> pathlib.Path | None:
    """The outermost folder of `folder` and its parents that does not exist yet (what mkdir -p creates)."""
    missing = None
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing = p
    return missing


def _kept_anything(workdir: pathlib.Path) -> bool:
    """A checkpoint, a logged step, or a finished token store (hours of tokenizing a large corpus, kept for the
    rerun when e.g. the first step runs out of memory): what a failed run's folder is kept for."""
    ckpts = workdir / "checkpoints"
    metrics = workdir / "metrics.jsonl"
    stores = workdir / "data" / "tokens"
    return ((ckpts.is_dir() and any(ckpts.iterdir())) or (metrics.is_file() and metrics.stat().st_size > 0)
            or (stores.is_dir() and any(stores.glob("*/meta.json"))))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"


class WorkdirLock:
    def __init__(self, workdir: pathlib.Path, enabled: bool = True):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self.enabled = enabled
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self.held = False
        self.created: pathlib.Path | None = None  # the outermost folder acquire() created

    def acquire(self, warn=lambda msg: None) -> None:
        if not self.enabled:
            return
        folder = self.path.parent
        created = _first_missing(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _cannot_write(folder, e) from None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    raise WorkdirLocked(f"{self.path} exists but cannot be read; if no trainer uses "
                                        f"{self.path.parent}, delete it and rerun") from None
                stale = holder.get("host") == self.me["host"] and not _alive(int(holder.get("pid", -1)))
                if not stale:
                    raise WorkdirLocked(f"{self.path.parent} is in use by another trainer ({_describe(holder)}); "
                                        f"wait for it, or use a new --workdir (if that process is gone, delete "
                                        f"{self.path})") from None
                warn(f"taking over a stale lock of {self.path.parent} ({_describe(holder)}, no longer running)")
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            except OSError as e:  # a read-only folder (the lock is the run's first write)
                raise _cannot_write(folder, e) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            self.created = created
            return
        raise WorkdirLocked(f"could not take the lock {self.path}: another trainer took it meanwhile")

    def release(self) -> None:
        if self.held and _read(self.path) == self.me:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.held = False

    def __enter__(self):
        return self

    def _remove_created(self) -> None:
        """The run failed before keeping anything in a folder this lock created: remove it (and the empty
        parents mkdir made for it), so nothing of the failed start is left behind."""
        folder = self.path.parent
        if self.created is None or not self.held or _kept_anything(folder):
            return
        shutil.rmtree(folder, ignore_errors=True)
        for parent in folder.parents:
            if parent == self.created.parent:
                break
            try:
                parent.rmdir()  # only if empty: another run may have been started beside this one
            except OSError:
                break
        self.held = False

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._remove_created()
        self.release()
