"""`mathlm w2s run CONFIG --dry-run [--topology SLICE]`: compile each kind of training step the recipe runs (the
weak model's SFT, the strong model's LoRA SFT, DPO and ORPO) for its mesh, from the model shapes alone (no weights,
no data): on this host's devices, or with libtpu for a TPU slice (train/topology.py) with per-chip memory and a
fits verdict."""
from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable, Iterator

from mathlm.train.config import Config as TrainRunConfig
from mathlm.train.config import ConfigError, _build, _resolve_defaults, validate
from mathlm.train.w2s import models
from mathlm.train.w2s.config import W2SConfig
from mathlm.train.w2s.context import Ctx

PLACEHOLDER = pathlib.Path("<dry-run: no weights>")


def _shape(section, which: str) -> dict:
    if section.model is not None:
        return {"vocab_size": 1024, "max_seq_len": 512, **section.model, "init_from": None, "variant": None}
    if section.run and (pathlib.Path(section.run) / "config.yaml").is_file():
        return models.base_model_section(section.run)
    raise ConfigError(f"{which}: --dry-run needs {which}.model (the network's shape) or an existing {which}.run")


def _compiler(topo):
    def compile_(raw: dict) -> dict:
        cfg = _resolve_defaults(_build(TrainRunConfig, raw, ""))
        validate(cfg)
        if topo is not None:
            from mathlm.train import topology
            return topology.dry_run(cfg, topo)  # adds the chip's HBM and `fits`
        from mathlm.train.trainer import dry_run
        return dry_run(cfg)  # its report carries compile_seconds
    return compile_


def programs(cfg: W2SConfig, topo=None) -> dict[str, Callable[[], dict]]:
    """name -> a thunk compiling that training step; the weak model's SFT first (the smallest program).
    `topo` (a train.topology.Topology): compile for that TPU slice instead of this host's devices."""
    _compile = _compiler(topo)
    ctx = Ctx(cfg, pathlib.Path("."))
    lora = {"name": "lora", **cfg.lora}
    out: dict[str, Callable[[], dict]] = {}
    if cfg.weak.sft is not None:
        weak = _shape(cfg.weak, "weak")
        out["weak_sft"] = lambda: _compile(ctx.run_config("weak", weak, PLACEHOLDER, "sft", cfg.weak.sft, 1000,
                                                          objective="sft", init_from=PLACEHOLDER))
    strong = _shape(cfg.strong, "strong")
    out["strong_sft_lora"] = lambda: _compile(ctx.run_config("strong", strong, PLACEHOLDER, "sft", cfg.stage1.sft,
                                                             1000, objective="sft", init_from=PLACEHOLDER,
                                                             variant=lora))
    for m in cfg.po.methods:
        objective = {"name": "dpo", "beta": cfg.po.beta} if m == "dpo" else {"name": "orpo", "lam": cfg.po.lam}
        out[f"strong_{m}_lora"] = functools.partial(
            lambda obj: _compile(ctx.run_config("strong", strong, PLACEHOLDER, "pref", cfg.po.train, 1000,
                                                objective=obj, init_from=PLACEHOLDER, variant=lora)), objective)
    return out


def dry_run(cfg: W2SConfig, only: list[str] | None = None, topo=None) -> Iterator[tuple[str, dict]]:
    """Compile each selected program in turn, yielding its report as soon as it is compiled."""
    progs = programs(cfg, topo)
    unknown = sorted(set(only or []) - set(progs))
    if unknown:
        raise ConfigError(f"--only: unknown program(s) {', '.join(unknown)}; this config has {', '.join(progs)}")
    for name, thunk in progs.items():
        if not only or name in only:
            yield name, thunk()
