"""TPU attention: the Pallas splash kernel (`jax.experimental.pallas.ops.tpu.splash_attention`), never (T, S).

Used by `model.attention: splash`, and by `auto` when the program is traced for TPU devices (the mesh's platform,
so a `--topology` dry-run on a CPU host compiles this same kernel). Document boundaries are `SegmentIds` (the
packing's segment ids), causal or bidirectional by the model; grouped-query attention runs the MQA form of the
kernel once per kv head (its G query heads share that head's keys/values, nothing is repeated).

The kernel has no SPMD partitioning rule, so under a sharded mesh it runs in `shard_map` over the batch (and
kv-head) axes of the activation rules; each shard then calls the kernel per sequence (`vmap`). Splash does not
scale the scores: q is multiplied by 1/sqrt(Dh) first. `interpret=True` runs the kernel through the Pallas
interpreter, which is how the CPU tests check it against the einsum path.
"""
from __future__ import annotations

import functools
import math

import jax
from jax.sharding import PartitionSpec as P

from mathlm.models import sharding


@functools.lru_cache(maxsize=64)
def _kernel(t: int, g: int, causal: bool, block: int, interpret: bool):
    """One sequence's MQA kernel: q (G, T, Dh), k/v (T, Dh), segment ids (T,) -> (G, T, Dh)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas TPU: only when used

    if t % block:
        raise ValueError(f"splash attention: sequence length {t} is not a multiple of the block {block}")
    one = sa.CausalMask((t, t)) if causal else sa.FullMask((t, t))
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mqa(sa.MultiHeadMask([one] * g), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _local(q, k, v, segment_ids, causal: bool, block: int, interpret: bool):
    """q (b, T, K, G, Dh), k/v (b, T, K, Dh), segment ids (b, T) on one shard -> (b, T, K, G, Dh)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    _, t, _, g, dh = q.shape
    kernel = _kernel(t, g, causal, block, interpret)
    qh = (q * (1.0 / math.sqrt(dh))).astype(q.dtype).transpose(0, 2, 3, 1, 4)  # (b, K, G, T, Dh)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, K, T, Dh)
    one = lambda q1, k1, v1, seg: kernel(q1, k1, v1, segment_ids=SegmentIds(q=seg, kv=seg))
    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))  # over kv heads, the segment ids shared
    out = jax.vmap(per_head)(qh, kh, vh, segment_ids)  # over sequences
    return out.transpose(0, 3, 1, 2, 4)


def splash_attend(q, k, v, segment_ids, causal: bool, block: int, interpret: bool = False):
    """Softmax attention q (B, T, K, G, Dh), k/v (B, T, K, Dh) -> (B, T, K, G, Dh) within each segment."""
    local = functools.partial(_local, causal=causal, block=block, interpret=interpret)
    q_spec = sharding.activation_spec(q.shape, "batch", None, "kv_heads", None, None)
    if q_spec is None:  # one device, or no mesh: the kernel sees the whole batch
        return local(q, k, v, segment_ids)
    mesh = sharding.current_mesh()[0]
    kv_spec = P(q_spec[0], None, q_spec[2], None)
    smapped = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)),
                            out_specs=q_spec, check_vma=False)
    return smapped(q, k, v, segment_ids)
