"""Workdir bookkeeping: atomic writes, DONE manifests and the state every step is in.

A step's DONE manifest (<workdir>/done/<unit>.json) records its key (a hash of the config sections it reads and
of its upstream steps' keys, so a changed config invalidates everything downstream), the hashes of the files it
read and of the files it wrote. A step is done when its manifest's key is today's key, the inputs still hash the
same and its outputs exist.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import time
from collections.abc import Iterable


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename it into place (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: pathlib.Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: pathlib.Path, records: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def digest(path: pathlib.Path) -> str:
    """sha256 of a file; of a run folder, its config and the step list of its checkpoints (weights are big)."""
    h = hashlib.sha256()
    if path.is_dir():
        for name in ("config.yaml", "tokenizer.json"):
            if (path / name).is_file():
                h.update((path / name).read_bytes())
        ckpts = path / "checkpoints"
        h.update(json.dumps(sorted(p.name for p in ckpts.iterdir()) if ckpts.is_dir() else []).encode())
        return h.hexdigest()[:16]
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _rel(workdir: pathlib.Path, p: pathlib.Path) -> str:
    try:
        return str(p.relative_to(workdir))
    except ValueError:
        return str(p)


class Manifests:
    def __init__(self, workdir: pathlib.Path):
        self.workdir = workdir
        self.folder = workdir / "done"

    def path(self, unit: str) -> pathlib.Path:
        return self.folder / (unit.replace("/", "__") + ".json")

    def read(self, unit: str) -> dict | None:
        p = self.path(unit)
        return json.loads(p.read_text()) if p.is_file() else None

    def state(self, unit: str, key: str, inputs: list[pathlib.Path]) -> str:
        """done | stale (config or inputs changed since) | pending."""
        m = self.read(unit)
        if m is None:
            return "pending"
        if m["key"] != key:
            return "stale"
        want = {_rel(self.workdir, p): digest(p) for p in inputs if p.exists()}
        if want != m["inputs"] or not all((self.workdir / o).exists() for o in m["outputs"]):
            return "stale"
        return "done"

    def record(self, unit: str, key: str, inputs: list[pathlib.Path], outputs: list[pathlib.Path],
               seconds: float, summary: dict | None = None) -> None:
        write_json(self.path(unit), {
            "unit": unit, "key": key, "inputs": {_rel(self.workdir, p): digest(p) for p in inputs if p.exists()},
            "outputs": {_rel(self.workdir, p): digest(p) for p in outputs},
            "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "summary": summary or {}})

    def clear(self, unit: str, outputs: list[pathlib.Path]) -> list[str]:
        """Forget a unit whose key changed: its manifest and its outputs (stale model runs would resume)."""
        self.path(unit).unlink(missing_ok=True)
        removed = []
        for p in outputs:
            if p.is_dir():
                shutil.rmtree(p)
                removed.append(_rel(self.workdir, p))
            elif p.exists():
                p.unlink()
                removed.append(_rel(self.workdir, p))
        return removed
