"""Attention on this machine: einsum (`model.attention: xla`) vs blocked, forward + backward of one call.

    python bench/attention_bench.py [--lengths 256 1024 4096] [--tokens 2048] [--repeats 3]

Per length T: B = max(1, tokens // T) sequences, 2 kv heads x 2 query heads per kv head, head dim 64, causal,
one document per row, block min(512, T); jit of grad(sum(attend(q, k, v) * w)); the min of `repeats` calls after
a warm-up, and XLA's temp buffer size of the program. What `BLOCKED_FROM` in models/attention_ops.py is set from.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

from mathlm.models.attention_ops import DocMask, _attend
from mathlm.models.blocked_attention import blocked_attend


def _program(kind: str, seg, block: int):
    mask = DocMask(seg, True)
    if kind == "einsum":
        attend = lambda q, k, v: _attend(q, k, v, mask.dense())
    else:
        attend = lambda q, k, v: blocked_attend(q, k, v, seg, True, block)
    return jax.jit(jax.grad(lambda q, k, v, w: jnp.sum(attend(q, k, v) * w), (0, 1, 2)))


def measure(t: int, tokens: int, repeats: int) -> dict:
    b = max(1, tokens // t)
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (b, t, 2, 2, 64))
    k, v = jax.random.normal(ks[1], (b, t, 2, 64)), jax.random.normal(ks[2], (b, t, 2, 64))
    w = jax.random.normal(ks[3], q.shape)
    seg = jnp.ones((b, t), jnp.int32)
    row = {"T": t, "B": b}
    for kind in ("einsum", "blocked"):
        fn = _program(kind, seg, min(512, t))
        compiled = fn.lower(q, k, v, w).compile()
        jax.block_until_ready(fn(q, k, v, w))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(q, k, v, w))
            times.append(time.perf_counter() - t0)
        row[f"{kind}_ms"] = round(1000 * min(times), 1)
        row[f"{kind}_temp_mib"] = round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)
    row["blocked_over_einsum"] = round(row["blocked_ms"] / row["einsum_ms"], 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "jax": jax.__version__}))
    for t in args.lengths:
        print(json.dumps(measure(t, args.tokens, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
