"""Objective specs, looked up by name: `causal` (causal_lm, sft), `diffusion` (mdm, mdm_sft) and `preference`
(dpo, orpo) register theirs.

`train.objective` is a typed section chosen by its `name` (`train.objective: {name: mdm, eps: 1.0e-3}`; a bare
string `train.objective: causal_lm` is the section with its defaults; `auto` picks the spec registered for the
model kind and data format). See base.py for the loss contract and the spec's fields.
"""
from __future__ import annotations

from mathlm.train.objectives import causal, diffusion, preference  # noqa: F401  (register their specs)
from mathlm.train.objectives.base import (  # noqa: F401
    REGISTRY,
    Objective,
    ObjectiveSpec,
    add_aux_losses,
    forward,
    forward_logprobs,
    register,
    token_nll,
)

AUTO = "auto"


def names() -> list[str]:
    return sorted(REGISTRY)


def get_spec(name: str) -> ObjectiveSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown objective {name!r}; choose from {', '.join(names())} or {AUTO}")
    return REGISTRY[name]


def auto_name(model_kind: str, data_format: str) -> str:
    """The objective `train.objective: auto` means for this model kind ("arm" | "mdm") and data.format."""
    for spec in REGISTRY.values():
        if (model_kind, data_format) in spec.auto_for:
            return spec.name
    raise ValueError(f"no objective is the default for a {model_kind} model on data.format={data_format}; "
                     "set train.objective")


def objective_name(cfg) -> str:
    """The objective of a config: its typed section's name (load_config resolves `auto`; a config built by hand
    may still hold a bare name, `auto` included)."""
    section = cfg.train.objective
    name = section if isinstance(section, str) else section.name
    return auto_name(cfg.model.kind, cfg.data.format) if name == AUTO else name


def spec_of(cfg) -> ObjectiveSpec:
    return get_spec(objective_name(cfg))


def sft_pad_is_eos(cfg) -> bool:
    """Whether SFT rows are padded with EOS (a target for mdm_sft) rather than the pad token."""
    return cfg.data.sft_pad == "eos" or (cfg.data.sft_pad == "auto" and spec_of(cfg).sft_pad == "eos")


def _section_of(name: str, section_or_train_cfg):
    """A typed section from a section, a TrainConfig (its .objective) or None (the spec's defaults)."""
    spec = get_spec(name)
    section = getattr(section_or_train_cfg, "objective", section_or_train_cfg)
    if section is None or isinstance(section, str):  # a bare name (a config built by hand): the defaults
        return spec.section()
    if not isinstance(section, spec.section):
        raise TypeError(f"objective {name!r} takes a {spec.section.__name__}, got {section!r}")
    return section


def section_of(cfg):
    """The typed objective section of a config."""
    return _section_of(objective_name(cfg), cfg.train)


def frozen_sets_of(cfg) -> tuple[str, ...]:
    """The frozen parameter sets a run's objective reads (spec.frozen_sets, resolved against the config)."""
    sets = spec_of(cfg).frozen_sets
    return tuple(sets(section_of(cfg), cfg) if callable(sets) else sets)


def get_objective(name: str, section=None) -> Objective:
    """The loss of objective `name`, with the hyperparameters of `section` (or a TrainConfig; None = defaults)."""
    return get_spec(name).make_loss(_section_of(name, section))


def get_eval(name: str, section=None):
    """The held-out metric function of objective `name`, or None for the default next-token NLL."""
    spec = get_spec(name)
    return spec.make_eval(_section_of(name, section)) if spec.make_eval else None


def checks(cfg) -> list[tuple[bool, str]]:
    """The model kind and data format the objective needs, then its own checks."""
    spec, name = spec_of(cfg), objective_name(cfg)
    need = {"arm": "a causal model (model.causal=true)",
            "mdm": "a bidirectional model with a mask token (model.causal=false, model.mask_token=true)"}
    out = [(cfg.model.kind == spec.model_kind, f"train.objective={name} needs {need[spec.model_kind]}"),
           (cfg.data.format in spec.data_formats,
            f"train.objective={name} needs data.format={' or '.join(spec.data_formats)}")]
    return out + (spec.validate(cfg.train.objective, cfg) if spec.validate else [])
