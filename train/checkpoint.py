"""Orbax checkpoints: trainable params, optimizer state (+ step and RNG), the data iterator position and the run
metadata (`meta`: the model section that rebuilds the network, and where its frozen weights live), as items.

Params are their own item so `model.init_from` can load them alone. Pytrees are stored as flat dicts keyed by
dotted weight paths: stable names on disk whatever container types the model uses. A run with frozen weights
stores only its trainable ones in `params`; `meta["frozen"]` names the source of the rest (train/state.py), and
`load_params` follows it, so every reader gets the whole model. Checkpoints without `meta` (older runs) hold
every weight and are read as before.
"""
from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from mathlm.models.sharding import path_str
from mathlm.train import state as frozen_state
from mathlm.train.state import CheckpointError  # noqa: F401  (the checkpoint error of every reader)


def flatten(tree) -> dict:
    return {path_str(p).replace("/", "."): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(template, flat: dict):
    paths = [path_str(p).replace("/", ".") for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), [flat[p] for p in paths])


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _handlers() -> dict:
    return {"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def save(self, step: int, params, opt: dict, data_state: dict, meta: dict) -> None:
        """`params`: the trainable weights (all of them for a run that freezes nothing)."""
        args = ocp.args.Composite(params=ocp.args.StandardSave(flatten(params)),
                                  opt=ocp.args.StandardSave(flatten(opt)),
                                  data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta))
        self.mgr.save(step, args=args, force=True)

    def restore(self, step: int, params_like, params_shardings, opt_like, opt_shardings):
        """Restore onto the given shardings; returns (params, opt, data_state, meta or None)."""
        args = dict(params=ocp.args.StandardRestore(flatten(_abstract(params_like, params_shardings))),
                    opt=ocp.args.StandardRestore(flatten(_abstract(opt_like, opt_shardings))),
                    data=ocp.args.JsonRestore())
        for item, like in (("params", params_like), ("opt", opt_like)):
            _check_shapes(self.mgr, step, item, flatten(like), f"{self.directory} (step {step})",
                          hint="; it does not fit this config: use a new --workdir or the run's own config")
        meta = read_meta(self.directory, step)
        out = self.mgr.restore(step, args=ocp.args.Composite(**args))
        return unflatten(params_like, out["params"]), unflatten(opt_like, out["opt"]), out["data"], meta

    def wait(self) -> None:
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()


def _check_shapes(mgr, step: int, item: str, want: dict, where: str, hint: str = "") -> None:
    """Compare stored shapes with the model's before restoring, so a mismatch names the weight."""
    meta = mgr.item_metadata(step)
    stored = meta[item] if meta is not None and item in meta else None
    if stored is None:
        return
    stored = dict(stored)
    missing = sorted(set(want) - set(stored))
    if missing:
        raise CheckpointError(f"{where}: checkpoint lacks {missing[0]} ({len(missing)} missing){hint}")
    for k, leaf in want.items():
        have = tuple(getattr(stored[k], "shape", ()))
        if have != tuple(leaf.shape):
            raise CheckpointError(f"{where}: weight {k} has shape {have} in the checkpoint but the model "
                                  f"needs {tuple(leaf.shape)}{hint}")


def resolve(path: str) -> tuple[pathlib.Path, int]:
    """A workdir, its checkpoints/ folder, or one step folder -> (manager directory, step)."""
    p = pathlib.Path(path).absolute()
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.name.isdigit() and p.parent.is_dir() and (p / "params").exists():
        return p.parent, int(p.name)
    if p.is_dir():
        steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit() and (c / "params").exists())
        if steps:
            return p, steps[-1]
    raise CheckpointError(f"no checkpoint found at {path}")


def read_meta(directory: pathlib.Path, step: int) -> dict | None:
    """The `meta` item of one checkpoint, or None (older checkpoints, params-only imports without one)."""
    directory = pathlib.Path(directory)
    if not (directory / str(step) / "meta").exists():
        return None
    with ocp.CheckpointManager(directory, item_handlers=_handlers()) as mgr:
        return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def save_frozen_once(directory: pathlib.Path, flat: dict) -> dict:
    """Write weights that exist nowhere else on disk (a frozen part of a fresh init) once; returns their record."""
    directory = pathlib.Path(directory).absolute()
    with ocp.CheckpointManager(directory, item_handlers=_handlers()) as mgr:
        if mgr.latest_step() is None:
            mgr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(flat)), force=True)
            mgr.wait_until_finished()
    return frozen_state.source_record(directory, 0)


def _stored_keys(directory: pathlib.Path, step: int) -> dict:
    with ocp.CheckpointManager(directory, item_handlers=_handlers()) as mgr:
        meta = mgr.item_metadata(step)
    return dict(meta["params"]) if meta is not None and meta.get("params") is not None else {}


def restore_flat(directory: pathlib.Path, step: int, want: dict, where: str) -> dict:
    """The weights `want` names (flat key -> ShapeDtypeStruct with sharding) from one checkpoint; weights its
    `params` item lacks come from the frozen source its metadata names (followed recursively, hash checked)."""
    stored = _stored_keys(directory, step)
    here = {k: v for k, v in want.items() if k in stored}
    for k, leaf in here.items():
        have = tuple(getattr(stored[k], "shape", ()))
        if have != tuple(leaf.shape):
            raise CheckpointError(f"{where}: weight {k} has shape {have} in the checkpoint but the model "
                                  f"needs {tuple(leaf.shape)}")
    out = {}
    if here:
        handlers = {**_handlers(), "params": ocp.PyTreeCheckpointHandler()}  # partial restore of a flat dict
        with ocp.CheckpointManager(directory, item_handlers=handlers) as mgr:
            args = ocp.args.PyTreeRestore(here, restore_args=ocp.checkpoint_utils.construct_restore_args(here),
                                          partial_restore=len(here) < len(stored))
            out = dict(mgr.restore(step, args=ocp.args.Composite(params=args))["params"])
    missing = {k: v for k, v in want.items() if k not in here}
    if missing:
        record = ((read_meta(directory, step) or {}).get("frozen") or {}).get("model")
        if record is None:
            raise CheckpointError(f"{where}: checkpoint lacks {sorted(missing)[0]} ({len(missing)} missing)")
        src, src_step = frozen_state.check_source(record, f"{where}: frozen weights")
        out.update(restore_flat(src, src_step, missing, f"{src} (step {src_step})"))
    return out


def load_params(path: str, params_like, shardings):
    """The whole model's params (for `model.init_from` and run loading), frozen weights followed to their source;
    a shape check names the first mismatching weight."""
    directory, step = resolve(path)
    flat = restore_flat(directory, step, flatten(_abstract(params_like, shardings)), path)
    return unflatten(params_like, flat), step


def load_frozen_set(record: dict, params_like, shardings, what: str):
    """A frozen set recorded by source: hash checked, then restored onto `shardings`."""
    directory, step = frozen_state.check_source(record, what)
    flat = restore_flat(directory, step, flatten(_abstract(params_like, shardings)), f"{directory} (step {step})")
    return unflatten(params_like, flat)
