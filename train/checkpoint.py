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
from mathlm.train import verify
from mathlm.train.paths import rmtree, run_path
from mathlm.train.state import CheckpointError  # noqa: F401  (the checkpoint error of every reader)


def flatten(tree) -> dict:
    return {path_str(p).replace("/", "."): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(template, flat: dict):
    paths = [path_str(p).replace("/", ".") for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), [flat[p] for p in paths])


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# Where the optimizer state lived before the split: optax.multi_transform's "train" branch.
LEGACY_OPT_PREFIX = "state.inner_states.train.inner_state."


def _pytree_restore(target: dict, partial: bool = False):
    return ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=partial)


def _handlers() -> dict:
    return {"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        self.directory = run_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def save(self, step: int, params, opt: dict, data_state: dict, meta: dict) -> None:
        """`params`: the trainable weights (all of them for a run that freezes nothing). The metadata records a
        content checksum of every item (train/verify.py), checked by `restore`."""
        flat_params, flat_opt = flatten(params), flatten(opt)
        meta = {**meta, "checksums": verify.checksums(flat_params, flat_opt, data_state)}
        args = ocp.args.Composite(params=ocp.args.StandardSave(flat_params),
                                  opt=ocp.args.StandardSave(flat_opt),
                                  data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta))
        self.mgr.save(step, args=args, force=True)

    def restore(self, step: int, params_like, params_shardings, opt_like, opt_shardings):
        """Restore onto the given shardings; returns (params, opt, data_state, meta or None).

        A checkpoint without `meta` (written before trainable and frozen weights were split) holds every weight
        in `params` and the optimizer state under optax.multi_transform's keys: both are read into today's layout.
        """
        where = f"{self.directory} (step {step})"
        hint = "; it does not fit this config: use a new --workdir or the run's own config"
        meta = read_meta(self.directory, step)
        want_params = flatten(_abstract(params_like, params_shardings))
        want_opt = flatten(_abstract(opt_like, opt_shardings))
        if meta is None:
            return (*self._restore_legacy(step, params_like, want_params, opt_like, want_opt, where, hint), None)
        _check_shapes(self.mgr, step, "params", want_params, where, hint, exact=True)
        _check_shapes(self.mgr, step, "opt", want_opt, where, hint)
        out = self.mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(want_params),
                                                             opt=ocp.args.StandardRestore(want_opt),
                                                             data=ocp.args.JsonRestore()))
        if out["data"] is None:
            raise verify.CheckpointDamaged("data: the iterator state is missing")
        verify.verify(meta.get("checksums"), out["params"], out["opt"], out["data"], where)
        meta = {k: v for k, v in meta.items() if k != "checksums"}
        return unflatten(params_like, out["params"]), unflatten(opt_like, out["opt"]), out["data"], meta

    def _restore_legacy(self, step, params_like, want_params, opt_like, want_opt, where, hint):
        """A checkpoint from before the trainable/frozen split: the trainable subset of its whole-model params,
        and the optimizer state under optax.multi_transform's keys when it has them."""
        stored_opt = set(dict(self.mgr.item_metadata(step).get("opt") or {}))
        legacy_keys = not set(want_opt) <= stored_opt
        names = {k: (LEGACY_OPT_PREFIX + k[len("state."):] if legacy_keys and k.startswith("state.") else k)
                 for k in want_opt}
        _check_shapes(self.mgr, step, "opt", {names[k]: v for k, v in want_opt.items()}, where, hint)
        params = restore_flat(self.directory, step, want_params, where)
        handlers = {**_handlers(), "opt": ocp.PyTreeCheckpointHandler()}
        with ocp.CheckpointManager(self.directory, item_handlers=handlers) as mgr:
            out = mgr.restore(step, args=ocp.args.Composite(
                opt=_pytree_restore({names[k]: v for k, v in want_opt.items()}), data=ocp.args.JsonRestore()))
        opt = {k: out["opt"][names[k]] for k in want_opt}
        return unflatten(params_like, params), unflatten(opt_like, opt), out["data"]

    def wait(self) -> None:
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()


def _check_shapes(mgr, step: int, item: str, want: dict, where: str, hint: str = "", exact: bool = False) -> None:
    """Compare stored shapes with the model's before restoring, so a mismatch names the weight. `exact`: the
    item must hold nothing else either (a run's trainable weights, when train.trainable changed on resume)."""
    meta = mgr.item_metadata(step)
    stored = meta[item] if meta is not None and item in meta else None
    if stored is None:
        return
    stored = dict(stored)
    missing = sorted(set(want) - set(stored))
    if missing:
        raise CheckpointError(f"{where}: checkpoint lacks {missing[0]} ({len(missing)} missing){hint}")
    extra = sorted(set(stored) - set(want))
    if exact and extra:
        raise CheckpointError(f"{where}: checkpoint trains {extra[0]} ({len(extra)} weights) that this config "
                              f"freezes (train.trainable or the model variant changed?){hint}")
    for k, leaf in want.items():
        have = tuple(getattr(stored[k], "shape", ()))
        if have != tuple(leaf.shape):
            raise CheckpointError(f"{where}: weight {k} has shape {have} in the checkpoint but the model "
                                  f"needs {tuple(leaf.shape)}{hint}")


def resolve(path: str) -> tuple[pathlib.Path, int]:
    """A workdir, its checkpoints/ folder, or one step folder -> (manager directory, step)."""
    p = run_path(path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.name.isdigit() and p.parent.is_dir() and (p / "params").exists():
        return p.parent, int(p.name)
    if p.is_dir():
        steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit() and (c / "params").exists())
        if steps:
            return p, steps[-1]
    raise CheckpointError(f"no checkpoint found at {path}")


def _reader(directory: pathlib.Path, handlers: dict | None = None) -> ocp.CheckpointManager:
    """A manager for reading: it creates no folder (sources of frozen weights may belong to other runs)."""
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                 item_handlers=handlers or _handlers())


def read_meta(directory: pathlib.Path, step: int) -> dict | None:
    """The `meta` item of one checkpoint, or None (older checkpoints, params-only imports without one)."""
    directory = run_path(directory)
    if not (directory / str(step) / "meta").exists():
        return None
    with _reader(directory) as mgr:
        return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def save_frozen(directory: pathlib.Path, flat: dict, run_dir: pathlib.Path) -> dict:
    """Write weights that exist nowhere else on disk (a frozen part of a fresh init), once per run: called when a
    run starts from step 0, it replaces whatever an earlier, abandoned start left there. Returns their record."""
    directory = run_path(directory)
    if jax.process_index() == 0:
        rmtree(directory)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"frozen-{directory.name}")
    with ocp.CheckpointManager(directory, item_handlers=_handlers()) as mgr:
        mgr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(flat)), force=True)
        mgr.wait_until_finished()
    return frozen_state.source_record(directory, 0, run_dir)


def _stored_keys(directory: pathlib.Path, step: int) -> dict:
    with _reader(directory) as mgr:
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
        with _reader(directory, handlers) as mgr:
            args = ocp.args.PyTreeRestore(here, restore_args=ocp.checkpoint_utils.construct_restore_args(here),
                                          partial_restore=len(here) < len(stored))
            out = dict(mgr.restore(step, args=ocp.args.Composite(params=args))["params"])
    missing = {k: v for k, v in want.items() if k not in here}
    if missing:
        record = ((read_meta(directory, step) or {}).get("frozen") or {}).get("model")
        if record is None:
            raise CheckpointError(f"{where}: checkpoint lacks {sorted(missing)[0]} ({len(missing)} missing)")
        # Records are relative to the run folder that wrote them: the parent of its checkpoints/ folder.
        src, src_step = frozen_state.check_source(record, f"{where}: frozen weights", run_path(directory).parent)
        out.update(restore_flat(src, src_step, missing, f"{src} (step {src_step})"))
    return out


def load_params(path: str, params_like, shardings):
    """The whole model's params (for `model.init_from` and run loading), frozen weights followed to their source;
    a shape check names the first mismatching weight."""
    directory, step = resolve(path)
    flat = restore_flat(directory, step, flatten(_abstract(params_like, shardings)), path)
    return unflatten(params_like, flat), step


def restore_tree(directory: pathlib.Path, step: int, like, shardings, where: str):
    """The weights shaped like `like` from one checkpoint, onto `shardings` (see restore_flat)."""
    return unflatten(like, restore_flat(directory, step, flatten(_abstract(like, shardings)), where))


def load_frozen_set(record: dict, params_like, shardings, what: str, run_dir: pathlib.Path):
    """A frozen set recorded by source (by the run in `run_dir`): hash checked, then restored onto `shardings`."""
    directory, step = frozen_state.check_source(record, what, run_dir)
    return restore_tree(directory, step, params_like, shardings, f"{directory} (step {step})")
