"""Trainable and frozen weights as two pytrees, and where frozen weights come from on disk.

The trainer differentiates `trainable` alone and passes `frozen` into its jitted step as sharded arguments:
    frozen = {"model": the model's frozen weights (same nesting, frozen leaves only),
              "sets": {name: a whole parameter set an objective asked for (spec.frozen_sets), e.g. a reference}}
A frozen part that is bit-identical to weights already on disk (the `init_from` run, an HF import) is recorded
by source (checkpoint folder + step) and a content hash of its files, instead of being rewritten at every save;
one that exists nowhere else is saved once, under <workdir>/frozen/. Resume loads each from its source and
checks the hash first (`FrozenSourceError` when the source changed or is gone).
"""
from __future__ import annotations

import hashlib
import math
import os
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mathlm.models.sharding import path_str
from mathlm.train.paths import files_under, mtime_ns, run_path


class CheckpointError(ValueError):
    """A user-facing problem with a checkpoint (missing, wrong shapes); re-exported by train/checkpoint.py."""


class FrozenSourceError(CheckpointError):
    """A frozen weight set's source on disk is gone or no longer what the run was trained against."""


def n_params(tree) -> int:
    """Elements in a pytree of arrays or ShapeDtypeStructs."""
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree))


def partition(params: dict, is_trainable: Callable[[str], bool] | None) -> tuple[dict, dict]:
    """Split a nested pure dict into (trainable, frozen) nested dicts by weight path ("blocks/0/mlp/up/kernel")."""
    if is_trainable is None:
        return params, {}

    def walk(tree, prefix):
        a, b = {}, {}
        for k, v in tree.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict):
                x, y = walk(v, path)
                if x:
                    a[k] = x
                if y:
                    b[k] = y
            else:
                (a if is_trainable(path) else b)[k] = v
        return a, b

    trainable, frozen = walk(params, "")
    if not jax.tree.leaves(trainable):
        raise ValueError("the trainable filter (train.trainable or the model variant) matches no weight")
    return trainable, frozen


def combine(a: dict, b: dict) -> dict:
    """The inverse of `partition`: one nested dict holding the leaves of both."""
    out = dict(a)
    for k, v in b.items():
        out[k] = combine(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def leaf_paths(tree) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def copy_tree(tree):
    """A fresh buffer for every leaf (a frozen reference set must not alias donated trainable buffers)."""
    return jax.tree.map(jnp.copy, tree)


_HASHES: dict[tuple, str] = {}  # (files, sizes, mtimes) -> digest: a source is read once per process


def _local_hash(root) -> str:
    files = files_under(root)
    key = (os.fspath(root), tuple((rel, f.stat().length, mtime_ns(f)) for rel, f in files))
    if key not in _HASHES:
        h = hashlib.sha256()
        for rel, f in files:
            h.update(rel.encode() + b"\0")
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def content_hash(step_dir: str | pathlib.Path) -> str:
    """sha256 over the relative paths and bytes of every file of a checkpoint's `params` item.

    Multi-process runs read the files on process 0 only and broadcast the digest, so every host agrees (and a
    pod does not read a large source once per host)."""
    root = run_path(step_dir) / "params"
    if jax.process_count() == 1:
        if not root.is_dir():
            raise FrozenSourceError(f"{root}: gone")
        return _local_hash(root)
    import numpy as np
    from jax.experimental import multihost_utils
    digest = _local_hash(root) if jax.process_index() == 0 and root.is_dir() else ""
    raw = np.frombuffer(digest.encode().ljust(64, b"\0"), np.uint8)
    out = bytes(np.asarray(multihost_utils.broadcast_one_to_all(raw))).rstrip(b"\0").decode()
    if not out:
        raise FrozenSourceError(f"{root}: gone")
    return out


def source_record(directory: pathlib.Path, step: int, run_dir: pathlib.Path | None = None) -> dict:
    """How a run's metadata names a frozen part that lives in another checkpoint; a source inside the run's own
    folder (`run_dir`) is recorded relative to it, so the folder can be moved."""
    source = run_path(directory)
    digest = content_hash(source / str(step))
    if run_dir is not None and source.is_relative_to(run_path(run_dir)):
        return {"source": str(source.relative_to(run_path(run_dir))), "in_run": True,
                "step": int(step), "sha256": digest}
    return {"source": str(source), "step": int(step), "sha256": digest}


def check_source(record: dict, what: str, run_dir: pathlib.Path | None = None) -> tuple[pathlib.Path, int]:
    """The source folder and step of a record (`run_dir`: the folder of the run that wrote it), after checking
    that its files still hash the same."""
    directory, step = record["source"], int(record["step"])
    directory = run_path(run_path(run_dir) / directory if record.get("in_run") else directory)
    if not (directory / str(step) / "params").is_dir():
        raise FrozenSourceError(f"{what}: its source {directory} (step {step}) is gone; restore it there, or "
                                "start a new run")
    if content_hash(directory / str(step)) != record["sha256"]:
        raise FrozenSourceError(f"{what}: its source {directory} (step {step}) changed since this run started "
                                "(content hash differs); the run's frozen weights cannot be restored")
    return directory, step
