"""One path layer for the run folder: `etils.epath`, the one orbax already writes checkpoints through.

A workdir is a local folder or a URI (`gs://bucket/run`, `s3://…`); `run_path` gives an `epath.Path` for either,
and every run-folder write (config.yaml, metrics.jsonl, train.lock, eval outputs, moved-aside checkpoints, the
checkpoints themselves) goes through it. Object stores differ from a disk in two ways this layer hides: a file
cannot be appended to (`append_line` rewrites it), and a rename is a copy then a delete (`move`).
"""
from __future__ import annotations

import os
import re
import shutil

from etils import epath


def is_remote(path) -> bool:
    """A URI such as gs://bucket/run (also as pathlib leaves it, gs:/bucket/run, after a typed CLI option)."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", os.fspath(path)) is not None


def run_path(path) -> epath.Path:
    """`path` as an epath.Path: a URI as given, a local path made absolute."""
    s = os.fspath(path)
    return epath.Path(s if is_remote(s) else os.path.abspath(s))


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
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            move(child, dst / child.name)
        else:
            child.copy(dst / child.name)
    src.rmtree()
