"""Blocked ("flash") softmax attention in plain JAX: memory grows with T x block, not T x S.

A `lax.scan` over key/value blocks keeps a running max and normaliser per query (the online softmax of Milakov &
Gimelshein 2018, as in FlashAttention); the custom VJP saves only the output and the per-query log-sum-exp and
recomputes each block's probabilities in the backward, so no (T, S) score or probability buffer is ever live.
No (T, S) mask exists either: each block's (T, block) mask is built from the segment ids (attend within the
same document, and to the past when causal), exactly `attention_mask`'s rule.

Shapes as in models/transformer.py: q (B, T, K, G, Dh), k/v (B, T, K, Dh) (self-attention), segment_ids (B, T).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

NEG = jnp.finfo(jnp.float32).min


def _blocks(x, block: int, axis: int):
    """Split `axis` into (n, block) and move n to the front, for lax.scan."""
    n = x.shape[axis] // block
    x = x.reshape(*x.shape[:axis], n, block, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _scores(q, kb, mb, scale):
    s = jnp.einsum("btkgd,bskd->bkgts", q, kb).astype(jnp.float32) * scale
    return jnp.where(mb, s, NEG)


def _key_blocks(k, v, segment_ids, block):
    """The scan's inputs: key, value and segment-id blocks and each block's first key index."""
    n = k.shape[1] // block
    return (_blocks(k, block, 1), _blocks(v, block, 1), _blocks(segment_ids, block, 1),
            jnp.arange(n, dtype=jnp.int32) * block)


def _block_mask(segment_ids, seg_b, start, causal: bool):
    """(B, 1, 1, T, block): query t may see key start + j (same document; j's index <= t when causal)."""
    mb = segment_ids[:, :, None] == seg_b[:, None, :]
    if causal:
        t, blk = segment_ids.shape[1], seg_b.shape[1]
        mb = mb & (jnp.arange(t)[:, None] >= start + jnp.arange(blk)[None, :])[None]
    return mb[:, None, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blocked_attend(q, k, v, segment_ids, causal: bool, block: int):
    return _forward(q, k, v, segment_ids, causal, block)[0]


def _forward(q, k, v, segment_ids, causal, block):
    s_len = k.shape[1]
    if s_len % block:
        raise ValueError(f"blocked attention: key length {s_len} is not a multiple of the block {block}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    b, t, kh, g, dh = q.shape

    def body(carry, xs):
        m, l, acc = carry  # running max, normaliser (B, K, G, T), unnormalised output (B, K, G, T, Dh)
        kb, vb, seg_b, start = xs
        mb = _block_mask(segment_ids, seg_b, start, causal)
        s = _scores(q, kb, mb, scale)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mb, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), vb).astype(jnp.float32)
        return (m_new, l, acc), None

    init = (jnp.full((b, kh, g, t), NEG, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
            jnp.zeros((b, kh, g, t, dh), jnp.float32))
    (m, l, acc), _ = lax.scan(body, init, _key_blocks(k, v, segment_ids, block))
    safe = jnp.where(l > 0, l, 1.0)  # a fully masked query row (padding) gets zeros, not NaN
    out = (acc / safe[..., None]).transpose(0, 3, 1, 2, 4).astype(q.dtype)  # (B, T, K, G, Dh)
    lse = m + jnp.log(safe)
    return out, (q, k, v, segment_ids, out, lse)


def _backward(causal, block, res, dout):
    q, k, v, segment_ids, out, lse = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    do = dout.astype(jnp.float32)
    delta = jnp.einsum("btkgd,btkgd->bkgt", do, out.astype(jnp.float32))  # sum_j p_ij dp_ij = dout . out

    def body(dq, xs):
        kb, vb, seg_b, start = xs
        mb = _block_mask(segment_ids, seg_b, start, causal)
        s = _scores(q, kb, mb, scale)
        p = jnp.where(mb, jnp.exp(s - lse[..., None]), 0.0)  # (B, K, G, T, blk)
        dv = jnp.einsum("bkgts,btkgd->bskd", p, do)
        dp = jnp.einsum("btkgd,bskd->bkgts", do, vb.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, kb.astype(jnp.float32))
        dk = jnp.einsum("bkgts,btkgd->bskd", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    dq, (dks, dvs) = lax.scan(body, jnp.zeros(q.shape, jnp.float32), _key_blocks(k, v, segment_ids, block))
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)  # (n, B, blk, K, Dh) -> (B, S, K, Dh)
    return dq.astype(q.dtype), unblock(dks).astype(k.dtype), unblock(dvs).astype(v.dtype), None


blocked_attend.defvjp(lambda q, k, v, seg, causal, block: _forward(q, k, v, seg, causal, block), _backward)
