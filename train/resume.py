"""Where a run starts: the newest checkpoint that restores and verifies (damaged ones reported, moved aside, and
the previous one tried; `--resume-from STEP` picks one), with the frozen weights from their recorded sources, or a
fresh initialisation (from `model.init_from` when set). Used by train/loop.py."""
from __future__ import annotations

import dataclasses
import pathlib

import jax

from mathlm import models
from mathlm.models.variants import from_metadata
from mathlm.train import checkpoint as ckpt
from mathlm.train import verify
from mathlm.train.config import Config
from mathlm.train.init_from import params_from_init, record_provenance
from mathlm.train.runs import RUNTIME_FIELDS
from mathlm.train.state import FrozenSourceError, combine, n_params, source_record
from mathlm.train.trainer import Setup

# Model fields that may change between a checkpoint and a resumed run: how it computes, not what it is.
RUNTIME_MODEL_FIELDS = (*RUNTIME_FIELDS, "init_from")


def _frozen_records(setup: Setup, workdir: pathlib.Path, frozen: dict, source: tuple | None) -> dict:
    """Where each frozen part lives: `source` (the checkpoint folder and step it was loaded from unchanged,
    so bit-identical to it), else written once now under <workdir>/frozen/."""
    out = {"model": None, "sets": {}}
    parts = [("model", frozen["model"], workdir / "frozen" / "model")]
    parts += [(name, tree, workdir / "frozen" / "sets" / name) for name, tree in frozen["sets"].items()]
    for name, tree, folder in parts:
        if not jax.tree.leaves(tree):
            continue
        if source is not None:
            rec = source_record(*source, run_dir=workdir)
        else:
            rec = ckpt.save_frozen(folder, ckpt.flatten(tree), workdir)
        if name == "model":
            out["model"] = rec
        else:
            out["sets"][name] = rec
    return out


def _restore_frozen(setup: Setup, meta: dict, where: str, workdir: pathlib.Path) -> dict:
    records = meta.get("frozen") or {"model": None, "sets": {}}
    wants = [("model", records.get("model"), setup.abstract_frozen["model"], setup.frozen_sh["model"])]
    wants += [(n, records.get("sets", {}).get(n), setup.abstract_frozen["sets"][n], setup.frozen_sh["sets"][n])
              for n in setup.frozen_sets]
    out = {"model": {}, "sets": {}}
    for name, rec, like, sh in wants:
        if not jax.tree.leaves(like):
            continue
        if rec is None:
            raise FrozenSourceError(f"{where}: the checkpoint records no source for the frozen weights "
                                    f"'{name}' this config needs (train.trainable or the objective changed?)")
        tree = ckpt.load_frozen_set(rec, like, sh, f"{where}: frozen weights '{name}'", workdir)
        if name == "model":
            out["model"] = tree
        else:
            out["sets"][name] = tree
    return out


def _restore_legacy_frozen(setup: Setup, checkpointer, step: int, where: str, workdir: pathlib.Path):
    """A checkpoint from before the split holds the frozen weights itself; they are written once under frozen/
    (the old checkpoint will rotate away) and recorded there."""
    like, sh = setup.abstract_frozen["model"], setup.frozen_sh["model"]
    if setup.frozen_sets:
        raise FrozenSourceError(f"{where}: written before frozen sets existed; the objective "
                                f"{setup.spec.name} needs {', '.join(setup.frozen_sets)}: start a new run")
    frozen = {"model": {}, "sets": {}}
    if jax.tree.leaves(like):
        frozen["model"] = ckpt.restore_tree(checkpointer.directory, step, like, sh, where)
    return frozen, _frozen_records(setup, workdir, frozen, None)


def _check_model_meta(cfg: Config, meta: dict, where: str) -> None:
    try:
        have = dataclasses.asdict(from_metadata(meta))  # fields this version added take their defaults
    except ValueError as e:
        raise ckpt.CheckpointError(f"{where}: {e}") from None
    want = models.metadata(cfg.model)["model"]
    diff = [k for k in want if k not in RUNTIME_MODEL_FIELDS and have.get(k) != want[k]]
    if diff:
        raise ckpt.CheckpointError(f"{where} was written for a different model (model.{diff[0]}: "
                                   f"{have.get(diff[0])!r} there, {want[diff[0]]!r} here); use a new --workdir "
                                   "or the run's own config")


def _restore_good(setup: Setup, checkpointer: ckpt.Checkpointer, log, resume_from: int | None):
    """(step, (trainable, opt, data state, meta)) of the newest checkpoint that restores and verifies, or None
    when there is none. A damaged one is reported in one line and moved aside, and the previous one is tried;
    `resume_from` picks one step (later ones are moved aside, to checkpoints-superseded/)."""
    directory = checkpointer.directory
    steps = sorted(checkpointer.mgr.all_steps(), reverse=True)
    lead = jax.process_index() == 0
    if resume_from is not None:
        if resume_from not in steps:
            raise ckpt.CheckpointError(f"--resume-from {resume_from}: no such checkpoint in {directory} (have: "
                                       f"{', '.join(map(str, sorted(steps))) or 'none'})")
        for later in [s for s in steps if s > resume_from]:
            if lead:
                log(f"[yellow]checkpoint {later} moved to {verify.move_aside(directory, later, 'superseded')}")
        checkpointer.mgr.reload()
        steps = [resume_from]
    for i, step in enumerate(steps):
        try:
            return step, checkpointer.restore(step, setup.abstract_trainable, setup.trainable_sh,
                                              setup.abstract_opt, setup.opt_sh)
        except verify.CheckpointDamaged as e:
            reason = str(e)
        except ckpt.CheckpointError:
            raise  # it does not fit this config: a user decision, not damage
        except Exception as e:  # orbax / tensorstore: truncated, zeroed or missing files
            reason = verify.short_reason(e)
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        log(f"[yellow]checkpoint {step} is damaged ({reason}); "
            + (f"falling back to {nxt}" if nxt is not None else "no earlier checkpoint"))
        if lead:
            verify.move_aside(directory, step)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"moved-aside-{step}")
        checkpointer.mgr.reload()
    if steps:
        raise ckpt.CheckpointError(f"no usable checkpoint is left in {directory} (the damaged ones are in "
                                   f"{directory.parent / 'checkpoints-damaged'}); rerun to start again from step "
                                   "0, or move one back and pass --resume-from STEP")
    return None


def initial_state(setup: Setup, checkpointer: ckpt.Checkpointer, workdir: pathlib.Path, log,
                  resume_from: int | None = None, note=None):
    """(start step, trainable, frozen, opt, data-iterator state or None, checkpoint metadata). `log` says what
    happened to damaged checkpoints; `note` (default `log`) which one is resumed."""
    cfg = setup.cfg
    good = _restore_good(setup, checkpointer, log, resume_from)
    if good is not None:
        start, (trainable, opt, data_state, meta) = good
        where = f"{checkpointer.directory} (step {start})"
        if meta is None:
            frozen, records = _restore_legacy_frozen(setup, checkpointer, start, where, workdir)
        else:
            _check_model_meta(cfg, meta, where)
            frozen, records = _restore_frozen(setup, meta, where, workdir), meta["frozen"]
        (note or log)(f"resuming from step {start} (checkpoint in {checkpointer.directory})")
        # The model section as this run computes it now (dtype, remat, attention may differ from the last save).
        keep = {"expansion": meta["expansion"]} if meta and "expansion" in meta else {}  # its expanded_from
        return start, trainable, frozen, opt, data_state, {**models.metadata(cfg.model), **keep, "frozen": records}
    trainable, frozen, opt = setup.init_fn(cfg.train.seed)
    source = None
    meta = models.metadata(cfg.model)
    if cfg.model.init_from:
        params, from_step, unchanged = params_from_init(setup, combine(trainable, frozen["model"]), log)
        trainable, frozen_model = setup.split(params)
        frozen = setup.frozen_from(params, frozen_model)
        # Weights made from the source (an expansion) are not the source's: they are written once instead.
        source = (ckpt.resolve(cfg.model.init_from)[0], from_step) if unchanged else None
        record_provenance(meta, cfg, unchanged)
    meta["frozen"] = _frozen_records(setup, workdir, frozen, source)
    return 0, trainable, frozen, opt, None, meta


def log_frozen(setup: Setup, log) -> None:
    n_frozen = n_params(setup.abstract_frozen["model"])
    if n_frozen:
        n_all = n_params(setup.abstract_params)
        log(f"frozen: {n_frozen:,} of {n_all:,} params (no gradients, no optimizer state)")
    for name in setup.frozen_sets:
        log(f"frozen set '{name}': a copy of the initial model")


