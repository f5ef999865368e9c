"""Checkpoints that are verified: a content checksum per item, recorded at save and checked at restore, and the
fallback to the previous checkpoint when the newest is damaged.

A leaf's checksum is the sum of its raw 32-bit words modulo 2^32, computed on device (one reduction per leaf,
exact in any order, so every sharding and host count gives the same value); an item's is the SHA-256 of its
leaves' (name, dtype, shape, word sum). The data iterator state (JSON) is hashed as canonical JSON. A truncated
or zeroed file, a missing item, or a file from another run then fails verification instead of loading as
garbage; the damaged step folder is moved aside (never deleted) to `<workdir>/checkpoints-damaged/`.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from mathlm.train.paths import move, run_path
from mathlm.train.state import CheckpointError


class CheckpointDamaged(CheckpointError):
    """One checkpoint step failed to restore or to verify (the caller falls back to an earlier one)."""


def _words(x: jax.Array) -> jax.Array:
    """The leaf's bytes as uint32 words (1- and 2-byte types widened, 8-byte types split)."""
    size = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if size == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes -> (..., 2) words


@jax.jit
def _word_sums(flat: dict) -> dict:
    return {k: jnp.sum(_words(v), dtype=jnp.uint32) for k, v in flat.items()}


def tree_checksum(flat: dict) -> str:
    """SHA-256 over (name, dtype, shape, word sum) of every leaf of a flat dict (name -> array)."""
    sums = jax.device_get(_word_sums(flat)) if flat else {}
    h = hashlib.sha256()
    for k in sorted(flat):
        v = flat[k]
        h.update(f"{k}|{jnp.dtype(v.dtype).name}|{tuple(v.shape)}|{int(np.asarray(sums[k]))};".encode())
    return h.hexdigest()


def json_checksum(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def checksums(flat_params: dict, flat_opt: dict, data_state) -> dict:
    return {"params": tree_checksum(flat_params), "opt": tree_checksum(flat_opt), "data": json_checksum(data_state)}


def verify(recorded: dict | None, flat_params: dict, flat_opt: dict, data_state, where: str) -> None:
    """Raise CheckpointDamaged naming the first item whose content differs from what was saved. Checkpoints
    written before checksums existed (no record) are accepted as they are."""
    if not recorded:
        return
    have = checksums(flat_params, flat_opt, data_state)
    for item in ("params", "opt", "data"):
        if item in recorded and recorded[item] != have[item]:
            raise CheckpointDamaged(f"{item}: checksum mismatch")


def move_aside(directory: pathlib.Path, step: int, why: str = "damaged") -> pathlib.Path:
    """Move one step folder out of the checkpoint manager's sight, to <workdir>/checkpoints-<why>/<step>[.n]."""
    directory = run_path(directory)
    src = directory / str(step)
    dest_root = directory.parent / f"checkpoints-{why}"
    dest_root.mkdir(parents=True, exist_ok=True)
    dest, n = dest_root / str(step), 1
    while dest.exists():
        dest, n = dest_root / f"{step}.{n}", n + 1
    move(src, dest)
    return dest


def short_reason(err: BaseException) -> str:
    """One line for an orbax/tensorstore restore failure (they run to hundreds of lines)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."
