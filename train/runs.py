"""Load a trained model from a run folder (or one of its checkpoints), and write a params-only run.

A run folder holds `config.yaml`, `tokenizer.json` and `checkpoints/<step>/params`; `generate`, `eval` and
`convert` accept the folder, its checkpoints/ folder or one step folder. `convert from-hf` writes the same layout
(one checkpoint at step 0), so every tool, and `model.init_from`, reads an imported model like a trained one.
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from mathlm import models
from mathlm.data.tokenizer import Tokenizer
from mathlm.models import sharding as shard_rules
from mathlm.models import variants
from mathlm.models.variants import from_metadata
from mathlm.train import checkpoint as ckpt
from mathlm.train.config import Config, ConfigError, load_config, save_config
from mathlm.train.paths import run_path


@dataclasses.dataclass
class LoadedRun:
    cfg: Config
    model: nnx.Module
    tokenizer: Tokenizer
    step: int
    run_dir: pathlib.Path


def run_dir_of(path: str | pathlib.Path) -> pathlib.Path:
    """The folder holding config.yaml for a run folder, its checkpoints/ folder or a step folder."""
    p = run_path(path)
    for cand in (p, p.parent, p.parent.parent):
        if (cand / "config.yaml").is_file():
            return cand
    raise ckpt.CheckpointError(f"{path}: not a mathlm run (no config.yaml next to its checkpoints); "
                               "Hugging Face models are imported with `mathlm convert from-hf`")


def abstract_params(cfg: Config):
    """(graphdef, abstract weights) of the network `cfg.model` describes, from the one factory."""
    return models.abstract(cfg.model)


# Model fields that say how a network computes, not what it is: a run may change them between saves and loads.
RUNTIME_FIELDS = ("dtype", "remat", "attention")


def model_config_of(path: str | pathlib.Path, fallback):
    """The model section stored with a checkpoint (what rebuilds its network), or `fallback` for checkpoints
    written before checkpoints carried it."""
    directory, step = ckpt.resolve(str(path))
    meta = ckpt.read_meta(directory, step)
    if meta is None:
        return fallback
    try:
        return from_metadata(meta)
    except ValueError as e:
        raise ckpt.CheckpointError(f"{path}: {e}") from None


def load_run(path: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None, rules=None,
             overrides: tuple[str, ...] = ()) -> LoadedRun:
    """Params placed on `mesh` by the sharding table (replicated on the default device without a mesh)."""
    run_dir = run_dir_of(path)
    try:
        cfg = load_config(run_dir / "config.yaml", overrides, migrate=True)
    except ConfigError as e:
        raise ckpt.CheckpointError(f"{run_dir / 'config.yaml'}: {e}") from None
    # The network is the one the checkpoint records, whatever config.yaml says now; only how it computes
    # (dtype, remat, attention kernel) follows the config and its overrides (convert --verify asks float32).
    runtime = {k: getattr(cfg.model, k) for k in RUNTIME_FIELDS}
    model_cfg = dataclasses.replace(model_config_of(path, cfg.model), init_from=None, **runtime)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    graphdef, like = abstract_params(cfg)
    if mesh is None:
        mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
        shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), like)
    else:
        shardings = shard_rules.param_shardings(like, mesh, rules or shard_rules.DEFAULT_RULES)
    params, step = ckpt.load_params(str(path), like, shardings)
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ckpt.CheckpointError(f"{run_dir}: no tokenizer.json")
    return LoadedRun(cfg, nnx.merge(graphdef, params), Tokenizer.load(tok_path), step, run_dir)


def save_params_run(out_dir: str | pathlib.Path, cfg: Config, params: dict, tokenizer_dir: str | pathlib.Path,
                    step: int = 0) -> pathlib.Path:
    """Write config.yaml + the tokenizer files + checkpoints/<step>/params (a pure dict shaped like the model's).

    The written config sets model.init_from to the folder itself, so `mathlm train OUT/config.yaml ...` fine-tunes
    the imported weights."""
    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    _, like = abstract_params(cfg)
    flat, want = ckpt.flatten(params), ckpt.flatten(like)
    if set(flat) != set(want):
        missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
        raise ckpt.CheckpointError(f"params do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, leaf in want.items():
        if tuple(flat[k].shape) != tuple(leaf.shape):
            raise ckpt.CheckpointError(f"weight {k} has shape {tuple(flat[k].shape)}, the model needs "
                                       f"{tuple(leaf.shape)}")
    saved = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(out)))
    save_config(saved, out / "config.yaml", objective_auto=True)
    tok_src = pathlib.Path(tokenizer_dir)
    files = {"tokenizer.json": tok_src if tok_src.is_file() else tok_src / "tokenizer.json"}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # HF sidecars: special token roles
        files[name] = (tok_src if tok_src.is_dir() else tok_src.parent) / name
    for name, src in files.items():
        if src.is_file() and src.absolute() != out / name:
            (out / name).write_bytes(src.read_bytes())
    meta = {**models.metadata(cfg.model), "frozen": None}
    with ocp.CheckpointManager(out / "checkpoints", item_handlers={
            "params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}) as mgr:
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)),
                 force=True)
        mgr.wait_until_finished()
    return out


def adopt_init_variant(cfg: Config) -> Config:
    """A config that names no model variant takes the one its `model.init_from` checkpoint was built as (train
    on the output of `convert expand` without repeating its settings)."""
    path = cfg.model.init_from
    if cfg.model.variant is not None or not path:
        return cfg
    try:
        src = model_config_of(path, cfg.model)
    except (ckpt.CheckpointError, FileNotFoundError):
        return cfg  # reported where the weights are loaded
    if src.variant is None or variants.name_of(src) == variants.PLAIN:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, variant=src.variant))
