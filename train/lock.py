"""One trainer per run folder: `<workdir>/train.lock` names its holder (host, pid, start time).

A second `mathlm train` on the same workdir refuses in one line naming the holder (two trainers interleaved
metrics.jsonl and left one run's checkpoints under the other's success). A lock whose process is gone (same host,
dead pid) is stale: it is taken over with a warning. So is one whose holder stopped beating: the trainer rewrites
its `heartbeat` at every logging interval (at most once a minute), and a lock not refreshed for STALE_AFTER seconds
is taken over from any host (a pod job restarted on new machines after a hard kill). Multi-host runs: process 0
holds it for all.

The run folder may be a URI (gs://bucket/run, through train/paths.py). The lock is created exclusively: O_EXCL on a
disk, an upload GCS refuses when the object exists (ifGenerationMatch=0) in a bucket. A store without exclusive
create (other fsspec stores) gets a write, then a read-back: two trainers starting within the same fraction of a
second could both pass there.

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
import socket
import time

from mathlm.train.paths import create_new, is_remote, rmtree, run_path

LOCK_NAME = "train.lock"
STALE_AFTER = 15 * 60  # seconds without a heartbeat after which any host may take the lock over
BEAT_EVERY = 60


class WorkdirLocked(RuntimeError):
    """Another live trainer holds this run folder."""


class WorkdirUnwritable(RuntimeError):
    """The run folder cannot be created or written (read-only, or its path runs through a file)."""


def _cannot_write(folder: pathlib.Path, e: OSError) -> WorkdirUnwritable:
    from mathlm.data.sources import cannot_write
    return WorkdirUnwritable(f"{cannot_write(folder, e)}; choose another --workdir")


def _first_missing(folder: pathlib.Path) -> pathlib.Path | None:
    """The outermost folder of `folder` and its parents that does not exist yet (what mkdir -p creates); on an
    object store, `folder` itself when nothing is stored under it yet (it has no folders of its own)."""
    if is_remote(folder):
        return None if folder.exists() else folder
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
    return ((ckpts.is_dir() and any(ckpts.iterdir())) or (metrics.is_file() and metrics.stat().length > 0)
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


def _stale(holder: dict, me: dict) -> str | None:
    """Why the lock is stale, or None: its process is gone (same host: the pid decides), or, from another host, it
    has not beaten for STALE_AFTER seconds."""
    if holder.get("host") == me["host"]:
        return None if _alive(int(holder.get("pid", -1))) else "no longer running"
    beat = holder.get("heartbeat")
    if isinstance(beat, (int, float)) and time.time() - beat > STALE_AFTER:
        return f"no heartbeat for {(time.time() - beat) / 60:.0f} min"
    return None


def _same_holder(a: dict | None, b: dict) -> bool:
    return a is not None and all(a.get(k) == b[k] for k in ("host", "pid", "started"))


class WorkdirLock:
    def __init__(self, workdir: pathlib.Path, enabled: bool = True):
        self.path = run_path(workdir) / LOCK_NAME
        self.remote = is_remote(self.path)
        self.enabled = enabled
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "heartbeat": time.time()}
        self.held = False
        self.created: pathlib.Path | None = None  # the outermost folder acquire() created

    def acquire(self, warn=lambda msg: None) -> None:
        if not self.enabled:
            return
        folder = self.path.parent
        created = _first_missing(folder)
        try:
            if not self.remote:
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _cannot_write(folder, e) from None
        for _ in range(2):
            try:
                taken = self._create()
            except OSError as e:  # a read-only folder or bucket (the lock is the run's first write)
                raise _cannot_write(folder, e) from None
            if taken:
                self.held = True
                self.created = created
                return
            holder = _read(self.path)
            if holder is None:
                raise WorkdirLocked(f"{self.path} exists but cannot be read; if no trainer uses "
                                    f"{self.path.parent}, delete it and rerun") from None
            why = _stale(holder, self.me)
            if why is None:
                raise WorkdirLocked(f"{self.path.parent} is in use by another trainer ({_describe(holder)}); "
                                    f"wait for it, or use a new --workdir (if that process is gone, delete "
                                    f"{self.path})") from None
            warn(f"taking over a stale lock of {self.path.parent} ({_describe(holder)}, {why})")
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        raise WorkdirLocked(f"could not take the lock {self.path}: another trainer took it meanwhile")

    def _create(self) -> bool:
        """Write the lock unless one exists: atomically where the store can (a disk, GCS); elsewhere write and
        read back."""
        taken = create_new(self.path, json.dumps(self.me))
        if taken is not None:
            return taken
        if self.path.exists():
            return False
        self.path.write_text(json.dumps(self.me))
        if not _same_holder(_read(self.path), self.me):
            raise WorkdirLocked(f"could not take the lock {self.path}: another trainer took it meanwhile")
        return True

    def beat(self) -> None:
        """Refresh the heartbeat (at most once every BEAT_EVERY seconds): the lock of a live trainer never goes
        stale, whatever host reads it."""
        if self.held and time.time() - self.me["heartbeat"] >= BEAT_EVERY:
            self.me["heartbeat"] = time.time()
            with contextlib.suppress(OSError):  # a missed beat is retried at the next interval
                self.path.write_text(json.dumps(self.me))

    def release(self) -> None:
        if self.held and _same_holder(_read(self.path), self.me):
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
        with contextlib.suppress(OSError):
            rmtree(folder)
        for parent in () if self.remote else folder.parents:
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
