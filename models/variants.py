"""One factory for every network the project builds, and the metadata that rebuilds it from a checkpoint.

A variant is registered by name with a builder `(ModelConfig, options, rngs) -> nnx.Module` and the filter that
says which of its weights train. `model.variant: {name: ..., <options>}` in the config picks one (None = the
plain Transformer); the Control-LLM expansion and LoRA adapters register theirs next to this file. Every
consumer (trainer, run loading, generate, eval, convert) builds through `build` / `abstract` from the model
metadata stored with each checkpoint (`metadata` / `from_metadata`), never from whatever config is current.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
from flax import nnx

from mathlm.models.transformer import ModelConfig, Transformer

PLAIN = "plain"
METADATA_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    name: str
    build: Callable[[ModelConfig, dict, nnx.Rngs], nnx.Module]
    # options -> a predicate over slash-joined weight paths (True = trains), or None: every weight trains unless
    # train.trainable says otherwise
    trainable: Callable[[ModelConfig, dict], Callable[[str], bool] | None] = lambda cfg, options: None
    # (cfg, options, base params of the plain model, freshly initialised params of this variant) -> this variant's
    # params: how it starts from a plain checkpoint (`model.init_from` a plain run); None = it cannot
    from_base: Callable[[ModelConfig, dict, dict, dict], dict] | None = None
    # (cfg, options) -> extra blocks for the checkpoint metadata, e.g. {"expansion": {...}}
    describe: Callable[[ModelConfig, dict], dict] | None = None
    # (cfg, options) -> the plain ModelConfig whose weights are exactly this variant's (a stack expansion is a
    # plain model with N + k layers); raises ValueError when there is none. None: the variant has no plain form.
    plain_form: Callable[[ModelConfig, dict], ModelConfig] | None = None
    # (options, params) -> the plain form's params (LoRA: adapters merged); None: the params as they are
    plain_params: Callable[[dict, dict], dict] | None = None
    # options -> the ones that define the network's weights (a checkpoint loads into a config that agrees on
    # these; the rest, e.g. a loss weight, may change between runs). None: all of them.
    structure: Callable[[dict], dict] | None = None


VARIANTS: dict[str, VariantSpec] = {}


def register(spec: VariantSpec) -> VariantSpec:
    if spec.name in VARIANTS:
        raise ValueError(f"model variant {spec.name!r} is registered twice")
    VARIANTS[spec.name] = spec
    return spec


register(VariantSpec(PLAIN, lambda cfg, options, rngs: Transformer(cfg, rngs=rngs),
                     plain_form=lambda cfg, options: cfg))


def _split(model_cfg: ModelConfig) -> tuple[VariantSpec, dict]:
    variant = model_cfg.variant or {"name": PLAIN}
    if isinstance(variant, str):  # a bare name: that variant with its defaults
        variant = {"name": variant}
    if not isinstance(variant, dict) or "name" not in variant:
        raise ValueError(f"model.variant: expected a name or a mapping with a name, got {variant!r}")
    variant = dict(variant)
    name = variant.pop("name")
    if name not in VARIANTS:
        raise ValueError(f"model.variant: unknown variant {name!r}; choose from {', '.join(sorted(VARIANTS))}")
    return VARIANTS[name], variant


def check_keys(section: type, options: dict, where: str) -> None:
    """A variant's options against its dataclass: an unknown key is a one-line ValueError naming the known ones."""
    names = {f.name for f in dataclasses.fields(section)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; keys are {', '.join(sorted(names))}")


def validate(model_cfg: ModelConfig) -> None:
    _split(model_cfg)


def abstract_check(model_cfg: ModelConfig) -> None:
    """Build the network abstractly, so that a variant's option errors (ValueError) surface at config time."""
    nnx.eval_shape(lambda: build(model_cfg, nnx.Rngs(0)))


def needs_base(model_cfg: ModelConfig) -> bool:
    """True for variants made from a trained plain model (they have no meaningful fresh initialisation)."""
    return _split(model_cfg)[0].from_base is not None


def build(model_cfg: ModelConfig, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """The network `model_cfg` describes (its `variant` included), initialised from `rngs`."""
    spec, options = _split(model_cfg)
    return spec.build(model_cfg, options, rngs if rngs is not None else nnx.Rngs(0))


def init_params(model_cfg: ModelConfig, seed) -> dict:
    """Freshly initialised weights as a pure dict (traceable: `seed` may be a traced integer)."""
    model = build(model_cfg, nnx.Rngs(params=jax.random.key(seed)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract(model_cfg: ModelConfig) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, ShapeDtypeStruct pure dict of the weights) without allocating anything."""
    model = nnx.eval_shape(lambda: build(model_cfg, nnx.Rngs(0)))
    graphdef, _ = nnx.split(model, nnx.Param)
    return graphdef, jax.eval_shape(lambda seed: init_params(model_cfg, seed), 0)


def trainable_filter(model_cfg: ModelConfig, patterns: list[str] | None = None) -> Callable[[str], bool] | None:
    """Which weights train: `patterns` (train.trainable regexes searched in weight paths) when given, else the
    variant's own filter; None means every weight trains."""
    if patterns is not None:
        compiled = [re.compile(p) for p in patterns]
        return lambda path: any(c.search(path) for c in compiled)
    spec, options = _split(model_cfg)
    return spec.trainable(model_cfg, options)


def metadata(model_cfg: ModelConfig) -> dict:
    """What a checkpoint records to rebuild its network: the whole model section (variant and structure), and
    whatever the variant describes of itself (the Control-LLM `expansion` block)."""
    spec, options = _split(model_cfg)
    extra = spec.describe(model_cfg, options) if spec.describe else {}
    return {"format": METADATA_FORMAT, "model": dataclasses.asdict(dataclasses.replace(model_cfg, init_from=None)),
            **extra}


def name_of(model_cfg: ModelConfig) -> str:
    return _split(model_cfg)[0].name


def options_of(model_cfg: ModelConfig) -> dict:
    return _split(model_cfg)[1]


def structure_of(model_cfg: ModelConfig) -> dict:
    """The variant's options that define its weights (see VariantSpec.structure)."""
    spec, options = _split(model_cfg)
    return dict(sorted((spec.structure(options) if spec.structure else options).items()))


def plain_form(model_cfg: ModelConfig) -> ModelConfig:
    """The plain network with exactly this model's weights (for export); ValueError when there is none."""
    spec, options = _split(model_cfg)
    if spec.plain_form is None:
        raise ValueError(f"a {spec.name!r} model has no plain form")
    return spec.plain_form(model_cfg, options)


def plain_params(model_cfg: ModelConfig, params: dict) -> dict:
    """This model's params in its plain form's layout (see plain_form)."""
    spec, options = _split(model_cfg)
    return spec.plain_params(options, params) if spec.plain_params else params


def from_base(model_cfg: ModelConfig, base_cfg: ModelConfig, base_params: dict, fresh_params: dict) -> dict:
    """This variant's weights made from a plain model's (`model.init_from` names a plain run)."""
    spec, options = _split(model_cfg)
    if name_of(base_cfg) != PLAIN:
        raise ValueError(f"the base is already a {name_of(base_cfg)!r} model; a {spec.name!r} variant starts "
                         "from a plain one")
    if spec.from_base is None:
        raise ValueError(f"model.variant {spec.name!r} cannot start from a plain checkpoint")
    runtime = ("dtype", "remat", "attention", "init_from", "variant")
    want, have = dataclasses.asdict(model_cfg), dataclasses.asdict(base_cfg)
    diff = [k for k in want if k not in runtime and want[k] != have[k]]
    if diff:
        raise ValueError(f"the base model differs from this model section (model.{diff[0]}: {have[diff[0]]!r} "
                         f"there, {want[diff[0]]!r} here)")
    return spec.from_base(model_cfg, options, base_params, fresh_params)


def from_metadata(meta: dict) -> ModelConfig:
    if meta.get("format", METADATA_FORMAT) > METADATA_FORMAT:
        raise ValueError(f"checkpoint metadata format {meta['format']} is newer than this version reads "
                         f"({METADATA_FORMAT}); upgrade mathlm")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(meta["model"]) - fields)
    if unknown:
        raise ValueError(f"checkpoint model metadata has fields this version does not know: {', '.join(unknown)}")
    return ModelConfig(**meta["model"])
