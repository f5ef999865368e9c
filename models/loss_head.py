"""The output head and its log-probabilities, computed over sequence chunks so the fp32 (B, T, V) logits never
exist whole.

At 4096 tokens the logits of one chip's 8 sequences are 2.1 GiB in fp32, and a plain loss keeps several such
buffers (logits, log-softmax, their gradient). Here a `lax.scan` walks chunks of C positions; each chunk's
function is `jax.checkpoint`ed, so the backward recomputes that chunk's logits instead of saving them: live
memory is one (B, C, V) chunk, the cost one extra head matmul forward. Every objective that reads token
log-probabilities (next-token CE, the diffusion ELBO, DPO/ORPO sequence log-probs) goes through here.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from mathlm.models.sharding import constrain


def _chunk_stats(logits_fn: Callable, w, x, targets):
    logits = constrain(logits_fn(w, x).astype(jnp.float32), "batch", "length", "vocab")
    # optax.softmax_cross_entropy_with_integer_labels' arithmetic (no inf/nan special cases as in
    # jax.nn.logsumexp): the head is memory-bound on CPU, and every extra (B, T, V) pass shows in the step time.
    shifted = logits - lax.stop_gradient(jnp.max(logits, -1, keepdims=True))
    picked = jnp.take_along_axis(shifted, targets[..., None], -1)[..., 0]
    logp = picked - jnp.log(jnp.sum(jnp.exp(shifted), -1))
    return logp, jnp.argmax(logits, -1) == targets


def target_logprobs(logits_fn: Callable, w, x, targets, chunk: int):
    """log p(targets) (B, T) float32 and argmax == target (B, T) bool, from hidden states x (B, T, D) and the
    head `logits_fn(w, x_chunk) -> (B, C, V)`. With T <= chunk this is one plain pass; otherwise T is padded up
    to a multiple of `chunk` and the padding sliced off."""
    b, t = targets.shape
    if t <= chunk:
        return _chunk_stats(logits_fn, w, x, targets)
    n = -(-t // chunk)
    pad = n * chunk - t
    xp = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    tp = jnp.pad(targets, ((0, 0), (0, pad)))
    xs = jnp.moveaxis(xp.reshape(b, n, chunk, x.shape[-1]), 1, 0)  # (n, B, C, D)
    ts = jnp.moveaxis(tp.reshape(b, n, chunk), 1, 0)
    one = jax.checkpoint(lambda w, xc, tc: _chunk_stats(logits_fn, w, xc, tc))
    _, (logp, hit) = lax.scan(lambda carry, xt: (carry, one(w, *xt)), None, (xs, ts))
    unchunk = lambda a: jnp.moveaxis(a, 0, 1).reshape(b, n * chunk)[:, :t]
    return unchunk(logp), unchunk(hit)
