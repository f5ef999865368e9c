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
    return {k.split("/")[0][4:]: v / batches for k, v in sums.items()}


def record(summary: dict, run_dir: pathlib.Path, gates: dict[str, float]) -> None:
    """Put the gates into the summary and <run>/evaluation_results.json (the latest eval wins)."""
    if not gates:
        return
    summary["eval_avg_interp_weights"] = gates
    (pathlib.Path(run_dir) / "evaluation_results.json").write_text(json.dumps(
        {"step": summary.get("step"), "task": summary.get("task"), "eval_avg_interp_weights": gates}, indent=1))
