"""The `mathlm w2s` recipe config: typed sections, YAML + dotted overrides, one-line errors (train/config.py's
builder). Defaults marked *(framework default)* are LLaMA-Factory's; the paper's own LoRA rank, learning rates,
epochs, beta and lambda are not public (../shared/research/w2s.md §2.7)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import typing

import yaml

from mathlm.data.w2s import AGREE_MODES, PairRule
from mathlm.models.lora import LoraOptions
from mathlm.train.config import ConfigError, _build, read_raw

TASKS = ("synth", "gsm8k", "math")
VARIANTS = ("weak", "icl", "hybrid")
PO_METHODS = ("dpo", "orpo")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """One fine-tuning (or pretraining) run: written as a `mathlm train` config into its run folder."""
    epochs: float | None = 3.0  # None: `steps` sets the length
    steps: int | None = None
    lr: float = 5e-5
    batch_size: int = 16
    seq_len: int = 1024  # LLaMA-Factory cutoff_len (framework default)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # HF's cosine decays to 0
    weight_decay: float = 0.0
    b2: float = 0.999  # HF AdamW's betas (0.9, 0.999)
    log_every: int = 10
    overrides: list[str] = dataclasses.field(default_factory=list)  # further `mathlm train` dotted overrides


@dataclasses.dataclass(frozen=True)
class SynthData:
    """The built-in setting: synthetic word problems (data/synth.py), pooled and carved by id into disjoint
    test / split 2 / split 1 / pretraining sets."""
    seed: int = 0
    max_steps: int = 2
    max_value: int = 30
    n_test: int = 500
    n_split2: int = 2000
    n_split1: int = 2000
    n_pretrain: int = 20000
    per_document: int = 4  # problems per pretraining document ("Question: ...\nAnswer: ...", blank-line apart)


@dataclasses.dataclass(frozen=True)
class DataSection:
    source: str = "synth"  # "synth" | "files"
    synth: SynthData = dataclasses.field(default_factory=SynthData)
    train: str | None = None  # files: one labelled file split 50/50 by split_seed into split 1 and split 2
    split1: str | None = None  # files: or the two splits given directly (split 2 may lack answers)
    split2: str | None = None
    test: str | None = None
    split_seed: int = 0
    limit: int | None = None  # first N questions of split 2 and of the test set (smoke runs)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    run: str | None = None  # a ready mathlm run folder (e.g. from `mathlm convert from-hf`)
    model: dict | None = None  # ModelConfig keys: the network to pretrain here (synth), or its shape for --dry-run
    pretrain: TrainSpec | None = None  # pretrain `model` on the synthetic pretraining corpus
    sft: TrainSpec | None = None  # weak only: fine-tune on split-1 gold solutions (full fine-tuning)
    runtime: dict = dataclasses.field(default_factory=dict)  # model keys for its runs: dtype, remat, attention


@dataclasses.dataclass(frozen=True)
class GenerationSection:
    max_new_tokens: int = 1024  # the reference: 1024 for GSM8K, 2048 for MATH
    batch_size: int = 64
    stop: list[str] = dataclasses.field(default_factory=lambda: ["Question", "Answer"])


@dataclasses.dataclass(frozen=True)
class DemosSection:
    k: int = 4
    seed: int = 0
    file: str | None = None  # a JSON list of {question, response}: overrides the draw (ablations)


@dataclasses.dataclass(frozen=True)
class Stage1Section:
    rounds: int = 2  # the reference: 2 for GSM8K, 1 for MATH
    variants: list[str] = dataclasses.field(default_factory=lambda: list(VARIANTS))
    agree: str = "exact"  # "exact" (the reference) | "equiv" (the grader's equivalence)
    sft: TrainSpec = dataclasses.field(default_factory=TrainSpec)  # lr 5e-5, 3 epochs, cosine (framework default)


@dataclasses.dataclass(frozen=True)
class Stage2Section:
    n: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # sample s uses seed + s (the reference: vLLM seeds 0..9)


@dataclasses.dataclass(frozen=True)
class PairsSection:
    tau: float = 0.6
    tau_flip: float = 0.8
    max_per_question: int = 1  # 1 for gsm8k and synth, 3 for math
    seed: int = 42
    agree: str = "exact"
    weak_side: bool = True  # False: the ablation "pairs from the strong model's samples only" (pos vs neg)


def _po_train() -> TrainSpec:
    return TrainSpec(epochs=1.0, lr=1e-5)  # DPO and ORPO: lr 1e-5, 1 epoch (framework default)


@dataclasses.dataclass(frozen=True)
class POSection:
    methods: list[str] = dataclasses.field(default_factory=lambda: ["orpo"])  # released final models are ORPO
    beta: float = 0.1  # DPO beta (framework default)
    lam: float = 0.1  # ORPO lambda, LLaMA-Factory's orpo_beta (framework default)
    train: TrainSpec = dataclasses.field(default_factory=_po_train)


@dataclasses.dataclass(frozen=True)
class EvalSection:
    pass_k: int = 10  # pass@k at temperature 1.0 for M_plus, M_pro and the ceiling
    naive: bool = True  # M fine-tuned on all of D1_weak
    ceiling: bool = True  # M fine-tuned on split-2 gold (reads split-2 answers: eval only)


@dataclasses.dataclass(frozen=True)
class W2SConfig:
    task: str = "synth"
    data: DataSection = dataclasses.field(default_factory=DataSection)
    weak: ModelSection = dataclasses.field(default_factory=ModelSection)
    strong: ModelSection = dataclasses.field(default_factory=ModelSection)
    generation: GenerationSection = dataclasses.field(default_factory=GenerationSection)
    demos: DemosSection = dataclasses.field(default_factory=DemosSection)
    stage1: Stage1Section = dataclasses.field(default_factory=Stage1Section)
    stage2: Stage2Section = dataclasses.field(default_factory=Stage2Section)
    pairs: PairsSection = dataclasses.field(default_factory=PairsSection)
    po: POSection = dataclasses.field(default_factory=POSection)
    lora: dict = dataclasses.field(default_factory=dict)  # LoraOptions: r 8, alpha 16 (LLaMA-Factory's 2r)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    mesh: dict = dataclasses.field(default_factory=dict)  # the `mesh:` section of every training run (FSDP etc.)

    @property
    def numeric(self) -> bool:
        return self.task != "math"

    @property
    def lora_options(self) -> LoraOptions:
        return LoraOptions.parse(self.lora)

    @property
    def pair_rule(self) -> PairRule:
        p = self.pairs
        return PairRule(p.tau, p.tau_flip, p.max_per_question, p.seed, p.agree)


def _checks(cfg: W2SConfig) -> list[tuple[bool, str]]:
    s1, d = cfg.stage1, cfg.data
    return [
        (cfg.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}"),
        (d.source in ("synth", "files"), f"data.source must be synth or files, got {d.source!r}"),
        (d.source != "files" or bool(d.test) and (bool(d.train) != bool(d.split1 and d.split2)),
         "data.source=files needs data.test and either data.train or data.split1 + data.split2"),
        (d.source != "synth" or cfg.task == "synth", "data.source=synth goes with task=synth"),
        (s1.rounds >= 1, f"stage1.rounds must be >= 1, got {s1.rounds}"),
        (bool(s1.variants) and set(s1.variants) <= set(VARIANTS),
         f"stage1.variants must be a non-empty subset of {', '.join(VARIANTS)}, got {s1.variants}"),
        (s1.rounds == 1 or {"weak", "icl"} <= set(s1.variants),
         "stage1.rounds >= 2 regenerates with the weak-ft and icl-ft models: keep both in stage1.variants"),
        ("hybrid" in s1.variants, "stage1.variants needs hybrid: M_plus (Stage II's model) is the hybrid model"),
        (s1.agree in AGREE_MODES and cfg.pairs.agree in AGREE_MODES,
         f"stage1.agree and pairs.agree must be one of {', '.join(AGREE_MODES)}"),
        (cfg.stage2.n >= 1, f"stage2.n must be >= 1, got {cfg.stage2.n}"),
        (cfg.stage2.temperature > 0, "stage2.temperature must be > 0 (Stage II samples)"),
        (0 < cfg.stage2.top_p <= 1, "stage2.top_p must be in (0, 1]"),
        (cfg.demos.k >= 1, f"demos.k must be >= 1, got {cfg.demos.k}"),
        (cfg.generation.max_new_tokens >= 1 and cfg.generation.batch_size >= 1,
         "generation.max_new_tokens and generation.batch_size must be >= 1"),
        (bool(cfg.po.methods) and set(cfg.po.methods) <= set(PO_METHODS),
         f"po.methods must be a non-empty subset of {', '.join(PO_METHODS)}, got {cfg.po.methods}"),
        (cfg.po.beta > 0 and cfg.po.lam >= 0, "po.beta must be > 0 and po.lam >= 0"),
        (cfg.eval.pass_k >= 1, f"eval.pass_k must be >= 1, got {cfg.eval.pass_k}"),
        (cfg.strong.run is not None or (cfg.strong.model is not None and cfg.strong.pretrain is not None),
         "strong: set strong.run (a model run) or strong.model + strong.pretrain (train one here)"),
        (cfg.weak.run is not None or (cfg.weak.model is not None and cfg.weak.pretrain is not None),
         "weak: set weak.run (a model run) or weak.model + weak.pretrain (train one here)"),
        (d.source == "synth" or (cfg.strong.pretrain is None and cfg.weak.pretrain is None),
         "strong/weak.pretrain uses the synthetic pretraining corpus: only with data.source=synth"),
    ]


def validate(cfg: W2SConfig) -> None:
    for ok, msg in _checks(cfg):
        if not ok:
            raise ConfigError(msg)
    try:
        cfg.pair_rule.validate()
        LoraOptions.parse(cfg.lora)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name, spec in [("stage1.sft", cfg.stage1.sft), ("po.train", cfg.po.train), ("weak.sft", cfg.weak.sft),
                       ("weak.pretrain", cfg.weak.pretrain), ("strong.pretrain", cfg.strong.pretrain)]:
        if spec is not None and spec.epochs is None and spec.steps is None:
            raise ConfigError(f"{name}: set epochs or steps")


def load(path: str | pathlib.Path | None, overrides: typing.Sequence[str] = ()) -> W2SConfig:
    cfg = _build(W2SConfig, read_raw(path, overrides), "")
    validate(cfg)
    return cfg


def to_dict(cfg: W2SConfig) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg: W2SConfig, path: pathlib.Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def fingerprint(*parts) -> str:
    """A short hash of JSON-able parts (config slices, upstream keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
