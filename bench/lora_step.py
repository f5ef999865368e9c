"""LoRA step benchmark (issue 14): the trainer's real step for full fine-tuning, LoRA with its hand-written
backward (models/lora.py `lora_delta`), and LoRA differentiated by autodiff (the code before), on one shape.

    python bench/lora_step.py                       # the w2s-synth strong model: d 256 x 4, SFT rows 16 x 160
    python bench/lora_step.py --pref                # also DPO and ORPO steps on (8, 2, 160) pair batches
    python bench/lora_step.py --d-model 512 --layers 8 --steps 10

Each case builds `mathlm.train.trainer.build(cfg).step_fn` from a config (random init: the step's cost does not
depend on the weights), runs one step to compile, then times `--steps` steps to completion (block_until_ready)
and reports the median ms/step and tokens/s (B x L / step time; every position counts, as padding would).
"Autodiff" swaps `mathlm.models.lora.lora_delta` for the plain formula s (x A) B before the step is traced, so
JAX differentiates it itself. Compare figures only within one run of this script (one machine, one load).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from mathlm.models import lora
from mathlm.train import trainer
from mathlm.train.config import Config, _build, _resolve_defaults


def _config(a, variant, objective, rows: int) -> Config:
    raw = {"model": {"vocab_size": 512, "d_model": a.d_model, "n_layers": a.layers, "n_heads": 4, "n_kv_heads": 2,
                     "d_ff": a.d_ff or int(2.75 * a.d_model), "max_seq_len": 1024, "variant": variant,
                     "init_from": "<bench: random init>" if variant else None},
           "data": {"train": ["<bench>"], "format": "pref" if rows == 2 else "sft"},
           "train": {"steps": 100, "batch_size": a.batch // rows, "seq_len": a.seq_len, "lr": 1e-3,
                     "warmup_steps": 0, "objective": objective}}
    return _resolve_defaults(_build(Config, raw, ""))


def _batch(cfg: Config, rows: int) -> dict:
    b, length = cfg.train.batch_size, cfg.train.seq_len
    shape = (b, rows, length) if rows > 1 else (b, length)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32)
    prompt = (np.arange(length) < length // 2)
    return {"inputs": ids, "targets": np.roll(ids, -1, axis=-1), "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy(),
            "loss_mask": np.broadcast_to(~prompt, shape).astype(np.float32),
            "prompt_mask": np.broadcast_to(prompt, shape).astype(np.int32)}


def _time(cfg: Config, rows: int, steps: int) -> float:
    setup = trainer.build(cfg)
    trainable, frozen, opt = setup.init_fn(0)
    batch = jax.device_put(_batch(cfg, rows), setup.batch_sh)
    trainable, opt, m = setup.step_fn(trainable, frozen, opt, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainable, opt, m = setup.step_fn(trainable, frozen, opt, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=None, help="default: 2.75 x d_model (704 at d 256)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16, help="rows per step (pairs count two rows)")
    p.add_argument("--seq-len", type=int, default=160)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--pref", action="store_true", help="also DPO and ORPO steps with LoRA")
    a = p.parse_args()
    adapter = {"name": "lora", "r": 8, "alpha": 16}
    cases = [("full fine-tuning", None, "sft", 1), ("LoRA, hand-written backward", adapter, "sft", 1),
             ("LoRA, autodiff", adapter, "sft", 1)]
    if a.pref:
        cases += [(f"{m.upper()} LoRA, {how}", adapter, m, 2) for m in ("dpo", "orpo")
                  for how in ("hand-written backward", "autodiff")]
    custom = lora.lora_delta
    print(f"d_model {a.d_model}, {a.layers} layers, {a.batch} rows x {a.seq_len}, {jax.devices()[0].device_kind}")
    try:
        for name, variant, objective, rows in cases:
            lora.lora_delta = (lambda x, a_, b, s: s * ((x @ a_) @ b)) if "autodiff" in name else custom
            dt = _time(_config(a, variant, objective, rows), rows, a.steps)
            tokens = a.batch // rows * rows * a.seq_len
            print(f"  {name:34s} {dt * 1e3:7.0f} ms/step  {tokens / dt:8,.0f} tokens/s", flush=True)
    finally:
        lora.lora_delta = custom


if __name__ == "__main__":
    main()
