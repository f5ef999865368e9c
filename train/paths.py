"""One path layer for the run folder: `etils.epath`, the one orbax already writes checkpoints through.

A workdir is a local folder or a URI (`gs://bucket/run`, `s3://…`); `run_path` gives an `epath.Path` for either,
and every run-folder write (config.yaml, metrics.jsonl, train.lock, eval outputs, moved-aside checkpoints, the
checkpoints themselves) goes through it. Object stores differ from a disk in two ways this layer hides: a file
cannot be appended to (`LineLog` rewrites it), and a rename is a copy then a delete (`move`). Exclusive create
(`create_new`, the lock) is O_EXCL on a disk and a generation precondition on GCS.
"""
from __future__ import annotations

import os
import shutil

from etils import epath

from mathlm.data.sources import as_path
from mathlm.data.sources import is_uri as is_remote  # noqa: F401  (the one test of "is this a URI")


def run_path(path) -> epath.Path:
    """`path` as an epath.Path: a URI as given (its "gs://" restored if pathlib folded it to "gs:/"), a local
    path made absolute."""
    s = os.fspath(path)
    return epath.Path(as_path(s)) if is_remote(s) else epath.Path(os.path.abspath(s))


def create_new(path, text: str) -> bool | None:
    """Write a new file unless one exists, atomically: True written, False it exists; None when the store has no
    exclusive create (then the caller must check another way). A disk: O_EXCL. GCS: an upload with
    ifGenerationMatch=0 (gcsfs mode="create"), which the store refuses when the object exists, whoever races."""
    s = os.fspath(path)
    if not is_remote(s):
        try:
            fd = os.open(s, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    s = os.fspath(run_path(s))
    if not s.startswith(("gs://", "gcs://")):
        return None
    import fsspec
    fs, key = fsspec.core.url_to_fs(s)
    try:
        fs.pipe_file(key, text.encode(), mode="create")
    except FileExistsError:
        return False
    return True


def rmtree(path: epath.Path) -> None:
    """Remove a folder and everything in it, if it exists (on an object store: every object under the prefix)."""
    path = run_path(path)
    if is_remote(path):
        if path.exists():
            path.rmtree()
    elif path.exists():
        shutil.rmtree(os.fspath(path))


def files_under(root: epath.Path) -> list[tuple[str, epath.Path]]:
    """(path relative to root, path) of every file below `root`, sorted (folder by folder: epath has no `**`
    on GCS)."""
    out: list[tuple[str, epath.Path]] = []

    def visit(folder: epath.Path, prefix: str) -> None:
        for child in folder.iterdir():
            if child.is_dir():
                visit(child, f"{prefix}{child.name}/")
            else:
                out.append((prefix + child.name, child))
    visit(run_path(root), "")
    return sorted(out, key=lambda x: x[0])


def mtime_ns(path) -> int:
    """A file's modification time in ns (on an object store: its last update, at the store's resolution)."""
    if not is_remote(path):
        return os.stat(os.fspath(path)).st_mtime_ns
    return int(run_path(path).stat().mtime * 1e9)


class LineLog:
    """A text file that grows a line at a time (metrics.jsonl): appended on disk; on an object store, which has no
    append, the whole file is rewritten at each `flush` (once per logging interval)."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.remote = is_remote(path)
        self.lines = path.read_text().splitlines(keepends=True) if self.remote and path.exists() else []
        self.file = None if self.remote else open(os.fspath(path), "a", buffering=1)

    def write(self, line: str) -> None:
        if self.remote:
            self.lines.append(line)
            self.path.write_text("".join(self.lines))
        else:
            self.file.write(line)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def move(src: epath.Path, dst: epath.Path) -> None:
    """A folder moved: a rename on disk; on an object store a copy of every object, then a delete."""
    if not is_remote(src):
        shutil.move(os.fspath(src), os.fspath(dst))
        return
    dst = run_path(dst)
    for rel, f in files_under(src):
        f.copy(dst / rel)
    rmtree(src)
