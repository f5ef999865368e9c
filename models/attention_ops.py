"""Attention arithmetic shared by the Transformer's paths: which keys a query sees (`DocMask`), the einsum
softmax attention with its hand-written backward (`_attend`), the KV-cache layouts and the one-query decode
attention, and `attention_kind`, the choice between einsum, blocked, splash and cuDNN."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from mathlm.models import sharding

ATTENTION_KINDS = ("auto", "xla", "cudnn", "blocked", "splash")
# `auto` on CPU switches from the einsum path to `blocked` at this many tokens (docs/benchmarks.md, "Attention on
# CPU"). Deviation (memory over speed): einsum measured 1.17-1.52x faster at every T, but its scores grow with
# T^2 (at 4096, 6x blocked's temp per call; ~32 GiB per layer for ganita-208m's 16 heads x 8 rows).
BLOCKED_FROM = 4096
SPLASH_LANES = 128  # splash's blocks must be multiples of the TPU's 128 lanes (shorter sequences: einsum)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DocMask:
    """Who attends to whom in a training/scoring forward: the segment ids (B, T), within a document and (causal)
    to the past. Kept as ids so that the blocked and splash paths never build the (B, 1, 1, T, S) mask."""
    segment_ids: jax.Array
    causal: bool = dataclasses.field(metadata={"static": True})

    def dense(self):
        return attention_mask(self.segment_ids, self.causal)


def dense_mask(mask) -> jax.Array:
    """A (B, 1, 1, T, S) boolean mask from a DocMask, or the dense mask itself (the KV-cache path's)."""
    return mask.dense() if isinstance(mask, DocMask) else mask


def attention_mask(segment_ids, causal: bool):
    """(B, 1, 1, T, S) boolean: attend only within the same document (and to the past when causal)."""
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        t = segment_ids.shape[1]
        same_doc = same_doc & jnp.tril(jnp.ones((t, t), bool))[None]
    return same_doc[:, None, None]


@jax.custom_vjp
def _attend(q, k, v, mask):
    """Softmax attention, q (B, T, K, G, Dh), k/v (B, S, K, Dh), mask (B, 1, 1, T, S) -> (B, T, K, G, Dh)."""
    return _attend_fwd(q, k, v, mask)[0]


def _attend_fwd(q, k, v, mask):
    # Plain einsum attention: measured faster than jax.nn.dot_product_attention on the XLA CPU backend.
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v), (q, k, v, probs)


def _attend_bwd(res, dout):
    q, k, v, p = res
    dv = jnp.einsum("bkgts,btkgd->bskd", p, dout)
    dp = jnp.einsum("btkgd,bskd->bkgts", dout, v).astype(jnp.float32)
    p32 = p.astype(jnp.float32)  # masked entries have p == 0, so their gradient is 0 as with the `where`
    ds = (p32 * (dp - jnp.sum(dp * p32, axis=-1, keepdims=True)) / math.sqrt(q.shape[-1])).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", ds, k), jnp.einsum("bkgts,btkgd->bskd", ds, q), dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


# KV cache layouts: keys (B, K, Dh, S), values (B, K, S, Dh). A decode step reads each once, reducing over the
# non-minor axis (Dh for the scores, S for the output) so that XLA streams contiguous rows of S or Dh.
# Stored (B, S, K, Dh), as the projections produce it, XLA copied the whole cache into the layouts its batched
# attention dots wanted, every decode step and layer (a third of decode time on CPU).
K_LAYOUT, V_LAYOUT = (0, 2, 3, 1), (0, 2, 1, 3)  # (B, T, K, Dh) -> the cache's axis order


def _write_cache(cache, new, index, layout):
    """Write this call's keys or values, new (B, T, K, Dh), at slots [index, index + T) of a cache stored in
    `layout`. Only the T new slots are transposed; with the cache donated, XLA updates it in place."""
    start = [0, 0, 0, 0]
    start[layout.index(1)] = index
    return lax.dynamic_update_slice(cache, new.transpose(layout).astype(cache.dtype), start)


def _attend_cache(q, k, v, mask):
    """q (B, T, K, G, Dh) over the cache, k (B, K, Dh, S) and v (B, K, S, Dh), under mask (B, 1, 1, T, S)
    -> (B, T, K, G, Dh)."""
    scale = math.sqrt(q.shape[-1])
    if q.shape[1] > 1:  # a prefill or a multi-token extension: batched matmuls
        logits = jnp.einsum("btkgd,bkds->bkgts", q, k).astype(jnp.float32) / scale
        probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1).astype(q.dtype)
        return jnp.einsum("bkgts,bksd->btkgd", probs, v)
    # One query per row (a decode step) is memory-bound: multiply + reduce, which XLA fuses into one pass over
    # each cache; as batched dots (M = G rows) XLA:CPU ran slower.
    q32 = q[:, 0, ..., None].astype(jnp.float32)  # (B, K, G, Dh, 1)
    logits = jnp.sum(q32 * k[:, :, None].astype(jnp.float32), 3) / scale  # (B, K, G, S)
    probs = jax.nn.softmax(jnp.where(mask[:, :, :, 0], logits, jnp.finfo(jnp.float32).min), axis=-1)
    out = jnp.sum(probs[..., None] * v[:, :, None].astype(jnp.float32), 3)  # (B, K, G, Dh)
    return out[:, None].astype(q.dtype)


def attention_kind(cfg, t: int) -> str:
    """The attention path for T tokens: `cfg.attention`, or under "auto" by the platform the program is traced
    for (the mesh's devices, not `jax.default_backend()`, so a TPU topology dry-run picks splash)."""
    if cfg.attention != "auto":
        return cfg.attention
    block = min(cfg.attention_block, t)
    platform = sharding.current_platform()
    # Splash needs shard_map over the mesh to run on sharded inputs: outside a traced trainer step (sampling,
    # tools) that mesh is unknown, so there it is used on a single device only.
    placed = sharding.current_mesh() is not None or jax.device_count() == 1
    if platform == "tpu" and placed and t % block == 0 and block % SPLASH_LANES == 0:
        return "splash"
    if platform == "gpu" and cfg.dtype == "bfloat16":
        return "cudnn"
    return "blocked" if t >= BLOCKED_FROM and t % block == 0 else "xla"
