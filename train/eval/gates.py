"""Control-LLM eval statistics: each merge site's running mean of the batch-mean gate over an evaluation's
batches (`avg_interp_weight`), written as `eval_avg_interp_weights` (block index -> a) to the eval's summary.json
and to <run>/evaluation_results.json, which `convert merge-back` reads. Empty for models without merge sites."""
from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mathlm.train.objectives import forward
from mathlm.train.paths import run_path


def has_sites(model) -> bool:
    return any(hasattr(b, "pretrained") for b in getattr(model, "blocks", ()))


def site_gates(model, tokenizer, texts: Sequence[str], max_len: int, batch_size: int = 16) -> dict[str, float]:
    """Mean over batches of each site's batch-mean gate, over all B*T positions (padding included, as the
    reference's HF batches); texts are encoded after <bos>, right-padded to the longest row of their batch.
    # deviation from ControlLLM: one extra forward over the eval's prompts + completions, not the generation's
    # own forward calls."""
    if not has_sites(model) or not texts:
        return {}
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda p, x: {k: v for k, v in forward(nnx.merge(graphdef, p), x)[2].items()
                               if k.endswith("/gate")})
    sums: dict[str, float] = {}
    batches = 0
    for i in range(0, len(texts), batch_size):
        rows = [([tokenizer.bos_id] + tokenizer.encode(t))[:max_len] for t in texts[i:i + batch_size]]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), tokenizer.pad_id if tokenizer.pad_id is not None else 0, np.int32)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = row
        for k, v in jax.device_get(fn(params, jnp.asarray(ids))).items():
            sums[k] = sums.get(k, 0.0) + float(v)
        batches += 1
    return {block_of(k): v / batches for k, v in sums.items()}


RESULTS = "evaluation_results.json"


def block_of(key: str) -> str:
    """"site5/gate" (a diagnostics key) -> "5" (the block index)."""
    return key.split("/")[0].removeprefix("site")


def write_results(run_dir: pathlib.Path, step: int, gates: dict[str, float], **extra) -> None:
    """<run>/evaluation_results.json: the latest eval's per-site gates (the one writer; the last eval wins)."""
    if gates:
        (run_path(run_dir) / RESULTS).write_text(json.dumps(
            {"step": step, **extra, "eval_avg_interp_weights": gates}, indent=1))


def gates_of(run_dir: pathlib.Path) -> dict | None:
    """{"step": the evaluated step, "gates": {block index: a}} from <run>/evaluation_results.json, or None."""
    path = run_path(run_dir) / RESULTS
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return {"step": raw.get("step"), "gates": {int(k): float(v) for k, v in
                                               raw.get("eval_avg_interp_weights", {}).items()}}


def record(summary: dict, run_dir: pathlib.Path, gates: dict[str, float]) -> None:
    """Put the gates into a `mathlm eval` summary and <run>/evaluation_results.json."""
    if gates:
        summary["eval_avg_interp_weights"] = gates
        write_results(run_dir, summary.get("step"), gates, task=summary.get("task"))
