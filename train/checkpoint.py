"""Orbax checkpoints: params, optimizer state (+ step and RNG) and the data iterator position, as separate items.

Params are their own item so `model.init_from` can load them alone. Pytrees are stored as flat dicts keyed by
dotted weight paths: stable names on disk whatever container types the model uses.
"""
from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from mathlm.models.sharding import path_str


class CheckpointError(ValueError):
    """A user-facing problem with a checkpoint (missing, wrong shapes)."""


def flatten(tree) -> dict:
    return {path_str(p).replace("/", "."): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(template, flat: dict):
    paths = [path_str(p).replace("/", ".") for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), [flat[p] for p in paths])


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def save(self, step: int, params, opt: dict, data_state: dict) -> None:
        args = ocp.args.Composite(params=ocp.args.StandardSave(flatten(params)),
                                  opt=ocp.args.StandardSave(flatten(opt)),
                                  data=ocp.args.JsonSave(data_state))
        self.mgr.save(step, args=args, force=True)

    def restore(self, step: int, params_like, params_shardings, opt_like, opt_shardings):
        """Restore onto the given shardings; returns (params, opt, data_state)."""
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(flatten(_abstract(params_like, params_shardings))),
            opt=ocp.args.StandardRestore(flatten(_abstract(opt_like, opt_shardings))),
            data=ocp.args.JsonRestore())
        for item, like in (("params", params_like), ("opt", opt_like)):
            _check_shapes(self.mgr, step, item, flatten(like), f"{self.directory} (step {step})",
                          hint="; it does not fit this config: use a new --workdir or the run's own config")
        out = self.mgr.restore(step, args=args)
        return unflatten(params_like, out["params"]), unflatten(opt_like, out["opt"]), out["data"]

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


def load_params(path: str, params_like, shardings):
    """Params only (for `model.init_from`), with a shape check that names the first mismatching weight."""
    directory, step = resolve(path)
    # Every item gets its handler (only params is restored): orbax warns about items it cannot interpret otherwise.
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_handlers=handlers) as mgr:
        _check_shapes(mgr, step, "params", flatten(params_like), path)
        target = flatten(_abstract(params_like, shardings))
        out = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    return unflatten(params_like, out["params"]), step

