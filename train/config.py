"""Typed, validated run configuration: YAML file + `dotted.key=value` overrides -> `Config`.

Every section is a frozen dataclass; unknown keys and wrong types are errors that name the key (and close matches).
"""
from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re
import types
import typing

import yaml

from mathlm.data.sources import DataError, as_path, read_utf8
from mathlm.models import variants
from mathlm.models.expand import NAME as EXPAND
from mathlm.models.expand import ExpandOptions
from mathlm.models.transformer import ModelConfig
from mathlm.train import objectives

FORMATS = ("lm", "sft", "pref")  # data.format (see DataConfig.format)


class ConfigError(ValueError):
    """A user mistake in a config file or override; the CLI prints it as one line."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Training data: "synth" (the built-in corpus), JSONL/text files or globs, or a `mathlm data prepare` store.
    train: list[str] = dataclasses.field(default_factory=lambda: ["synth"])
    # Held-out data for periodic eval; None = the synthetic validation split when train is "synth", else no eval.
    validation: list[str] | None = None
    # "lm": packed documents; "sft": (prompt, response) pairs with the prompt masked out; "pref": preference pairs
    # (JSONL prompt/chosen/rejected) for dpo/orpo, each side an sft row
    format: str = "lm"
    tokenizer: str | None = None  # tokenizer.json; None trains one on the training data (saved in the workdir)
    synth_n: int = 20000  # problems in the built-in corpus
    synth_seed: int = 0
    synth_max_steps: int = 5
    synth_max_value: int = 100  # upper bound of every number in a synthetic question
    truncate: bool = True  # SFT pairs longer than seq_len: truncate (with a count reported) or error
    # What fills an SFT row after the response: "pad" (masked out), "eos" (SMDM: the padding is EOS and a target of
    # the mdm_sft objective), "auto" = the objective's padding policy (eos for mdm_sft, else pad).
    sft_pad: str = "auto"
    grain_workers: int = 0
    prefetch: int = 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # global batch in sequences per optimizer step
    micro_batches: int = 1  # gradient accumulation: batch_size is split into this many micro-batches
    seq_len: int = 256
    # The objective's own typed section, chosen by name (train/objectives/): `causal_lm` | `sft` | `mdm` | `mdm_sft`,
    # e.g. {name: mdm, eps: 1.0e-3, ssl_ratio: 0.01}; a bare name is that section with its defaults. `auto`:
    # causal_lm for a causal model; for a bidirectional one mdm (data.format=lm) or mdm_sft (data.format=sft).
    # load_config replaces it by the typed section (the saved config.yaml records the resolved one).
    objective: typing.Any = "auto"
    # None = the objective's default, filled in by load_config: the SMDM paper's 2e-4 with 1% warmup for masked
    # diffusion, 3e-4 with 100 warmup steps (nanoGPT-like) for causal objectives.
    lr: float | None = None
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (SMDM: 2e-4 -> 2e-5)
    warmup_steps: int | None = None
    warmup_from: float = 0.0  # lr at the start of the warmup (Control-LLM: eta_min = 1e-5)
    # Cosine horizon in steps (warmup included): the lr reaches lr * min_lr_ratio there; None = train.steps.
    horizon_steps: int | None = None
    weight_decay: float = 0.1
    # wd(t) = ratio * lr(t) on every trainable leaf (Control-LLM's `update_weigth_decay`, 0.1); replaces weight_decay
    weight_decay_lr_ratio: float | None = None
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    seed: int = 0
    trainable: list[str] | None = None  # regexes over weight paths; None = everything trains
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    peak_flops: float | None = None  # FLOP/s of the whole run for MFU; None = known accelerator peak or measured


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 200
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: whatever devices remain after fsdp * tensor
    fsdp: int = 1
    tensor: int = 1
    # Multislice (TPU slices joined by DCN): how many of the data / fsdp axis's shards lie across slices.
    # -1: all slices on data (else on fsdp when data does not divide); their product = the number of slices.
    dcn_data: int = -1
    dcn_fsdp: int = 1
    rules: list[list] | None = None  # [[logical, mesh_axis or [axes] or null], ...]; None = models.sharding defaults
    distributed: str = "auto"  # "auto": initialise jax.distributed when a cluster is detected; "on"; "off"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    # Generation tasks run on the final model after training (`mathlm train` prints their accuracy), e.g. [synth].
    tasks: list[str] = dataclasses.field(default_factory=list)
    data: dict[str, str] | None = None  # task -> file, for tasks other than synth
    limit: int | None = None  # first N problems per task
    max_new_tokens: int = 256
    batch_size: int = 64
    steps: int | None = None  # masked diffusion models: sampling steps (None = max_new_tokens, as the paper)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    # Control-LLM expansion (models/expand.py; the `convert expand` flags): with model.init_from a plain run, the
    # run expands it at init. Sets model.variant to {name: expand, ...these keys}.
    expand: ExpandOptions | None = None


# ----------------------------------------------------------------------------- conversion with type checks

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # X | None: X's own message ("expected a number") says it best
            raise errors[0]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (typing.Any,)
        if isinstance(value, (str, int, float)) and item is str:
            value = [value]  # a single path is a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is typing.Any or origin is not None:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads '3e-4' as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        optional = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if optional and value is not None:  # an optional section (`expand:`)
            tp = optional[0]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if isinstance(node.get(k), str) and k == "objective":  # `train.objective=mdm train.objective.eps=0.5`
            node[k] = {"name": node[k]}
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _yaml_kind(value) -> str:
    kind = {list: "a list", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return kind.get(type(value), type(value).__name__)


def read_raw(path: str | pathlib.Path | None, overrides: typing.Sequence[str] = ()) -> dict:
    """A YAML config file (or nothing) with dotted overrides applied, as a plain dict; ConfigError names the file."""
    raw: dict = {}
    if path is not None:
        p = as_path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(read_utf8(p))
        except DataError as e:
            raise ConfigError(str(e)) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections (model:, data:, train:, ...) at the top level, "
                              f"got {_yaml_kind(raw)}")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return raw


def load_config(path: str | pathlib.Path | None, overrides: typing.Sequence[str] = (),
                migrate: bool = False) -> Config:
    """`migrate`: the file is a run's saved config.yaml, possibly from an older version: keys that moved are
    carried to their new place instead of refused (user-written configs get the one-line error)."""
    raw = read_raw(path, overrides)
    moved = _moved_keys(raw, migrate)
    cfg = _resolve_defaults(_build(Config, raw, ""), moved)
    validate(cfg)
    return cfg


# Keys that moved into an objective's own section: a config that still uses them gets the new key's name.
MOVED_KEYS = {"mdm_eps": "train.objective.eps", "ssl_ratio": "train.objective.ssl_ratio",
              "cfg_drop": "train.objective.cfg_drop"}


def _moved_keys(raw: dict, migrate: bool) -> dict:
    """Old flat keys: refused with their new name, or (`migrate`) taken out and returned as section fields."""
    train = raw.get("train")
    if migrate and isinstance(train, dict):
        return {MOVED_KEYS[k].split(".")[-1]: train.pop(k) for k in list(train) if k in MOVED_KEYS}
    for key in (train if isinstance(train, dict) else {}):
        if key in MOVED_KEYS:
            name, field = ("mdm_sft" if key == "cfg_drop" else "mdm"), MOVED_KEYS[key].split(".")[-1]
            raise ConfigError(f"train.{key} is now {MOVED_KEYS[key]} (e.g. train.objective: "
                              f"{{name: {name}, {field}: ...}})")
    return {}


def _objective_section(cfg: Config, moved: dict):
    """train.objective (a name or a mapping with `name`) -> the spec's typed section; `auto` resolved; `moved`:
    migrated old flat keys, kept where the section has such a field."""
    raw = cfg.train.objective
    if isinstance(raw, str):
        raw = {"name": raw}
    elif dataclasses.is_dataclass(raw):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"train.objective: expected a name or a mapping with a name, got {raw!r}")
    raw = dict(raw)
    name = raw.setdefault("name", objectives.AUTO)
    if cfg.data.format not in FORMATS:  # before `auto` reads it
        raise ConfigError(f"data.format must be {' or '.join(map(repr, FORMATS))}, got {cfg.data.format!r}")
    try:
        if name == objectives.AUTO:
            name = raw["name"] = objectives.auto_name(cfg.model.kind, cfg.data.format)
        spec = objectives.get_spec(name)
    except ValueError as e:
        raise ConfigError(f"train.objective: {e}") from None
    fields = {f.name for f in dataclasses.fields(spec.section)}
    return _build(spec.section, {**{k: v for k, v in moved.items() if k in fields}, **raw}, "train.objective.")


def _expand_variant(cfg: Config) -> Config:
    """The `expand:` section as the model variant it describes."""
    if cfg.expand is None:
        return cfg
    want = {"name": EXPAND, **dataclasses.asdict(cfg.expand)}
    have = cfg.model.variant
    if have is not None and have != want and not (isinstance(have, dict) and have.get("name") == EXPAND
                                                  and ExpandOptions.parse({k: v for k, v in have.items()
                                                                           if k != "name"}) == cfg.expand):
        raise ConfigError(f"expand: and model.variant disagree ({have!r}); set one of them")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, variant=want))


def _resolve_defaults(cfg: Config, moved: dict | None = None) -> Config:
    """Type the objective section and fill the settings whose default depends on it (see TrainConfig.lr)."""
    cfg = _expand_variant(cfg)
    t = cfg.train
    section = _objective_section(cfg, moved or {})
    spec = objectives.get_spec(section.name)
    lr = t.lr if t.lr is not None else spec.default_lr
    warmup = t.warmup_steps if t.warmup_steps is not None else spec.default_warmup(t.steps)
    return dataclasses.replace(cfg, train=dataclasses.replace(t, objective=section, lr=lr, warmup_steps=warmup))


def validate(cfg: Config) -> None:
    try:
        cfg.model.validate()
        variants.validate(cfg.model)
        variants.abstract_check(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if variants.needs_base(cfg.model) and not cfg.model.init_from:
        raise ConfigError(f"model.variant {variants.name_of(cfg.model)} is made from a trained model: set "
                          "model.init_from (a plain run to expand, or an expanded one)")
    t = cfg.train
    block = min(cfg.model.attention_block, t.seq_len)
    if cfg.model.attention in ("blocked", "splash") and t.seq_len % block:
        raise ConfigError(f"model.attention={cfg.model.attention}: train.seq_len={t.seq_len} is not a multiple of "
                          f"model.attention_block={cfg.model.attention_block}")
    if cfg.model.attention == "splash" and block % 128:
        raise ConfigError(f"model.attention=splash: its block min(model.attention_block, train.seq_len) = {block} "
                          "must be a multiple of 128 (the TPU's lanes)")
    checks = [
        (t.steps >= 1, f"train.steps must be >= 1, got {t.steps}"),
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (t.micro_batches >= 1 and t.batch_size % t.micro_batches == 0,
         f"train.batch_size={t.batch_size} is not divisible by train.micro_batches={t.micro_batches}"),
        (2 <= t.seq_len <= cfg.model.max_seq_len,
         f"train.seq_len={t.seq_len} must be in [2, model.max_seq_len={cfg.model.max_seq_len}]"),
        (t.lr is not None and t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (t.warmup_steps is not None and t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}"),
        (0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}"),
        (t.warmup_from >= 0, f"train.warmup_from must be >= 0, got {t.warmup_from}"),
        (t.horizon_steps is None or t.horizon_steps >= 1, f"train.horizon_steps must be >= 1, got {t.horizon_steps}"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps must be >= 1"),
        (cfg.checkpoint.keep >= 1, "checkpoint.keep must be >= 1"),
        (cfg.data.format in FORMATS, f"data.format must be {' or '.join(map(repr, FORMATS))}, got {cfg.data.format!r}"),
        (cfg.mesh.distributed in ("auto", "on", "off"), "mesh.distributed must be auto, on or off"),
        (not cfg.data.train == [], "data.train is empty"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    _validate_objective(cfg)
    for pattern in cfg.train.trainable or []:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"train.trainable: {pattern!r} is not a regular expression ({e})") from None
    from mathlm.data.tasks import TASKS
    for task in cfg.eval.tasks:
        if task not in TASKS:
            raise ConfigError(f"eval.tasks: unknown task {task!r}; choose from {', '.join(TASKS)}")
        if task != "synth" and not (cfg.eval.data or {}).get(task):
            raise ConfigError(f"eval.tasks: {task} needs a file in eval.data.{task}")


def _validate_objective(cfg: Config) -> None:
    checks = [(cfg.data.sft_pad in ("auto", "pad", "eos"),
               f"data.sft_pad must be auto, pad or eos, got {cfg.data.sft_pad!r}"), *objectives.checks(cfg)]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | pathlib.Path, objective_auto: bool = False) -> None:
    """`objective_auto`: write `train.objective: auto` (an imported model's config, which a user may fine-tune
    either way) instead of the resolved section."""
    d = to_dict(cfg)
    if objective_auto:
        d["train"]["objective"] = objectives.AUTO
    as_path(path).write_text(yaml.safe_dump(d, sort_keys=False))
