"""One trainer per run folder: `<workdir>/train.lock` names its holder (host, pid, start time).

A second `mathlm train` on the same workdir refuses in one line naming the holder (two trainers interleaved
metrics.jsonl and left one run's checkpoints under the other's success). A lock whose process is gone (same host,
dead pid) is stale: it is taken over with a warning. Multi-host runs: process 0 holds it for all.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import time

LOCK_NAME = "train.lock"


class WorkdirLocked(RuntimeError):
    """Another live trainer holds this run folder."""


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

    def acquire(self, warn=lambda msg: None) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            return
        raise WorkdirLocked(f"could not take the lock {self.path}: another trainer took it meanwhile")

    def release(self) -> None:
        if self.held and _read(self.path) == self.me:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
