"""How `model.init_from` becomes a new run's weights: the same network loads as it is (a variant's training-only
options, e.g. Control-LLM's divergence or freeze flags, may differ from the source's); a plain model is made
into this run's variant by the variant's `from_base` (Control-LLM expansion at init). Mismatches are one-line
CheckpointErrors, raised before the run writes anything."""
from __future__ import annotations

import dataclasses

import jax

from mathlm import models
from mathlm.models import sharding as shard_rules
from mathlm.models import variants
from mathlm.train import checkpoint as ckpt
from mathlm.train.config import Config
from mathlm.train.runs import RUNTIME_FIELDS, model_config_of, run_dir_of
from mathlm.train.trainer import Setup, sharding_rules


def check_init_from(cfg: Config):
    """How model.init_from becomes this run's weights: (its model section, True when it loads as it is, False
    when a plain model is made into this variant). Raises CheckpointError on a mismatch, before anything is
    written."""
    path = cfg.model.init_from
    src_cfg = model_config_of(path, cfg.model)
    src_name, name = variants.name_of(src_cfg), variants.name_of(cfg.model)
    if src_name == name:
        have, want = variants.structure_of(src_cfg), variants.structure_of(cfg.model)
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if diff:
            raise ckpt.CheckpointError(f"model.init_from={path} was built with {name} {diff[0]}={have.get(diff[0])!r}"
                                       f"; this config's expand:/model.variant says {want.get(diff[0])!r}")
        return src_cfg, True
    if src_name != variants.PLAIN or not variants.needs_base(cfg.model):
        raise ckpt.CheckpointError(f"model.init_from={path} holds a {src_name} model; this config builds a "
                                   f"{name} one")
    return src_cfg, False


def params_from_init(setup: Setup, fresh: dict, log) -> tuple[dict, int, bool]:
    """(params, source step, loaded unchanged) from model.init_from: the same network loads as it is; a plain
    one is made into this run's variant (Control-LLM expansion at init) by the variant's `from_base`."""
    cfg, path = setup.cfg, setup.cfg.model.init_from
    src_cfg, same = check_init_from(cfg)
    if same:
        params, step = ckpt.load_params(path, setup.abstract_params, setup.params_sh)
        log(f"initialised params from {path} (step {step})")
        return params, step, True
    runtime = {k: getattr(cfg.model, k) for k in RUNTIME_FIELDS}
    base_cfg = dataclasses.replace(src_cfg, init_from=None, **runtime)
    base_like = models.abstract(base_cfg)[1]
    base_sh = shard_rules.param_shardings(base_like, setup.mesh, sharding_rules(cfg))
    base, step = ckpt.load_params(path, base_like, base_sh)
    try:
        params = variants.from_base(cfg.model, base_cfg, base, fresh)
    except ValueError as e:
        raise ckpt.CheckpointError(f"model.init_from={path}: {e}") from None
    params = jax.device_put(params, setup.params_sh)
    log(f"initialised params from {path} (step {step}), made into model.variant "
        f"{variants.name_of(cfg.model)}")
    return params, step, False


def record_provenance(meta: dict, cfg: Config, unchanged: bool) -> None:
    """The `expansion` block's expanded_from: the run folder expanded at init, or the source's own record."""
    if "expansion" not in meta:
        return
    path = cfg.model.init_from
    if unchanged:
        meta["expansion"]["expanded_from"] = variants.options_of(model_config_of(path, cfg.model)).get("expanded_from")
    else:
        meta["expansion"]["expanded_from"] = str(run_dir_of(path))
