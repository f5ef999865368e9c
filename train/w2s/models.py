"""The recipe's model runs: pretraining (synthetic setting), weak SFT on split 1, LoRA SFT of the strong base,
LoRA merge, and preference optimisation. Each is an ordinary `mathlm train` run folder whose config
(`train.yaml`, then the resolved `config.yaml`) can be rerun by hand; a run whose step key changed is removed
before it is trained again (it would otherwise resume stale weights)."""
from __future__ import annotations

import dataclasses
import math
import pathlib
import shutil

import jax
import yaml
from flax import nnx

from mathlm.models import variants
from mathlm.train.config import Config, load_config
from mathlm.train.runs import load_run, save_params_run
from mathlm.train.w2s.config import TrainSpec

KEY_FILE = "w2s_key"


class Preempted(Exception):
    """A training run stopped early (SIGTERM / a preemption) after saving its checkpoint: the pipeline stops too,
    and the same command resumes it."""


def base_model_section(run: str | pathlib.Path) -> dict:
    """The model section of a run (its network, without a variant or init_from)."""
    cfg = load_config(pathlib.Path(run) / "config.yaml", migrate=True)
    model = dataclasses.asdict(variants.plain_form(cfg.model))
    model.update(init_from=None, variant=None)
    return model


def steps_for(spec: TrainSpec, n_examples: int) -> int:
    if spec.steps is not None:
        return spec.steps
    return max(1, math.ceil(spec.epochs * n_examples / spec.batch_size))


def train_config(model: dict, data_file: pathlib.Path, fmt: str, spec: TrainSpec, n_examples: int, *,
                 objective="auto", init_from=None, variant=None, mesh: dict | None = None) -> dict:
    """A `mathlm train` config as a dict: the model section plus this run's data and schedule."""
    steps = steps_for(spec, n_examples)
    return {
        "model": {**model, "init_from": str(init_from) if init_from else None, "variant": variant},
        "data": {"train": [str(data_file)], "format": fmt},
        "train": {"steps": steps, "batch_size": spec.batch_size, "seq_len": min(spec.seq_len, model["max_seq_len"]),
                  "lr": spec.lr, "warmup_steps": spec.warmup_steps, "min_lr_ratio": spec.min_lr_ratio,
                  "weight_decay": spec.weight_decay, "b2": spec.b2, "log_every": min(spec.log_every, steps),
                  "eval_every": 0, "objective": objective},
        "checkpoint": {"every_steps": max(1, min(steps, 200)), "keep": 1},
        "mesh": dict(mesh or {}),
    }


def fit(run_dir: pathlib.Path, raw: dict, spec: TrainSpec, key: str, log=print, show_progress: bool = False) -> dict:
    """Train (or resume) the run in `run_dir`; a folder left by another key is removed first."""
    marker = run_dir / KEY_FILE
    if run_dir.exists() and (not marker.is_file() or marker.read_text() != key):
        log(f"  removing {run_dir.name}: it was trained for another config")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)
    (run_dir / "train.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(run_dir / "train.yaml", spec.overrides)
    from mathlm.train.loop import train
    from mathlm.train.runs import adopt_init_variant
    log(f"  training {run_dir} ({cfg.train.steps} steps of {cfg.train.batch_size})")
    last = train(adopt_init_variant(cfg), run_dir, show_progress=show_progress)
    if last.get("preempted"):
        raise Preempted(f"{run_dir} stopped at step {last['step']} (checkpoint saved)")
    return {k: float(v) for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def merge_lora(run: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """A LoRA run's adapters merged into its base (W + s A B in float32): a plain run folder."""
    if out.exists():
        shutil.rmtree(out)
    loaded = load_run(run)
    cfg: Config = loaded.cfg
    plain = variants.plain_form(cfg.model)
    params = variants.plain_params(cfg.model, jax.device_get(nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))))
    plain_cfg = dataclasses.replace(cfg, model=dataclasses.replace(plain, init_from=None))
    return save_params_run(out, plain_cfg, params, run / "tokenizer.json", step=loaded.step)
