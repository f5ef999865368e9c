"""Batched autoregressive decoding with a KV cache: one prefill, then a jitted decode loop with static shapes.

Shapes are bucketed so that a whole evaluation compiles a handful of programs: the prompt length P to a power of
two (at least 16), the new-token budget N to a multiple of the chunk size, the batch to `pad_batch_to`. Ragged
prompts are left-padded: every row writes the same cache slot each step, RoPE positions skip the padding and the
cache's `valid` mask hides it.

The decode loop runs on device in chunks (`lax.while_loop`, exiting early once every row is done); between chunks
the host looks at the new tokens once, so stop strings (a text-level test the caller supplies) end rows early.

Sampling: greedy at temperature 0, else softmax(logits / T) restricted by top-k and top-p (nucleus). Each row has
its own PRNG key, folded with the step index, so a sample does not depend on what else is in its batch.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from mathlm.models.transformer import Transformer


class ContextOverflow(ValueError):
    """A prompt plus the new-token budget does not fit the model's context."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_logits(logits, key, sampling: Sampling):
    """logits (V,) float32 -> one token id. Greedy when temperature is 0."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg = jnp.finfo(logits.dtype).min
    if sampling.top_k:
        kth = lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][-1]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1:
        order = jnp.argsort(-logits)
        probs = jax.nn.softmax(logits[order])
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop_sorted = jnp.cumsum(probs) - probs >= sampling.top_p
        logits = logits.at[order].set(jnp.where(drop_sorted, neg, logits[order]))
    return jax.random.categorical(key, logits).astype(jnp.int32)


def _bucket_len(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass
class Output:
    tokens: list[list[int]]  # new tokens per prompt, cut after EOS (excluded) or at the step a stop was detected
    finished: list[bool]  # ended by EOS or a stop string (False: ran out of max_new_tokens)
    new_tokens: int  # generated tokens summed over real rows (for tokens/s)
    seconds: float


class Generator:
    """Compiles prefill and decode once per bucket and reuses them across calls.

    Weights are used where they already are (place them on a mesh first to shard them); `batch_sharding`
    (optional) places the batch rows; XLA partitions the rest.
    """

    def __init__(self, model: Transformer, *, eos_id: int, pad_id: int = 0, chunk: int = 32,
                 batch_sharding: jax.sharding.Sharding | None = None):
        if model.cfg.kind != "arm":
            raise ValueError("KV-cache decoding needs a causal (autoregressive) model; this one is bidirectional "
                             "(masked diffusion): use models.diffusion.DiffusionGenerator")
        self.cfg = model.cfg
        self.graphdef, self.params = nnx.split(model)
        self.eos_id, self.pad_id, self.chunk = eos_id, pad_id, chunk
        self.batch_sharding = batch_sharding
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("slots",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("sampling",), donate_argnums=(1,))

    # --- device programs ------------------------------------------------------------------------------------------

    def _prefill_impl(self, params, tokens, positions, valid, slots):
        model = nnx.merge(self.graphdef, params)
        cache = model.init_cache(tokens.shape[0], slots)
        logits, cache = model.extend(tokens, positions, valid, cache, last_only=True)
        return logits[:, 0], cache

    def _decode_impl(self, params, state, stop_at, sampling: Sampling):
        """Run until step `stop_at` or until every row is done; state carries the cache and the output buffer."""
        model = nnx.merge(self.graphdef, params)

        def cond(st):
            return (st["step"] < stop_at) & ~jnp.all(st["done"])

        def body(st):
            step = st["step"]
            keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(st["keys"])
            tok = jax.vmap(lambda lg, k: sample_logits(lg, k, sampling))(st["logits"], keys)
            tok = jnp.where(st["done"], self.pad_id, tok)
            out = lax.dynamic_update_slice(st["out"], tok[:, None], (0, step))
            done = st["done"] | (tok == self.eos_id)
            ones = jnp.ones_like(tok, bool)[:, None]
            logits, cache = model.extend(tok[:, None], st["pos"][:, None], ones, st["cache"], last_only=True)
            return dict(st, logits=logits[:, 0], cache=cache, out=out, done=done, pos=st["pos"] + 1,
                        step=step + 1, n_new=st["n_new"] + jnp.sum(~st["done"]))

        return lax.while_loop(cond, body, state)

    # --- host driver ----------------------------------------------------------------------------------------------

    def __call__(self, prompts: Sequence[Sequence[int]], sampling: Sampling, keys: jax.Array | None = None,
                 is_done: Callable[[int, list[int]], bool] | None = None,
                 pad_batch_to: int | None = None) -> Output:
        """prompts: token ids per row (no padding). keys: (B, 2) uint32 PRNG keys, one per row (needed to sample).
        is_done(row, new_tokens) -> True ends the row (checked between chunks, e.g. for stop strings)."""
        sampling.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        n_real = len(prompts)
        b = max(n_real, pad_batch_to or 0)
        longest = max(len(p) for p in prompts)
        if longest + sampling.max_new_tokens > self.cfg.max_seq_len:
            raise ContextOverflow(f"a prompt of {longest} tokens + {sampling.max_new_tokens} new tokens exceeds the "
                             f"model's context of {self.cfg.max_seq_len}")
        p_len = _bucket_len(longest)
        chunk = self.chunk if is_done is not None else sampling.max_new_tokens
        n_slots = _round_up(sampling.max_new_tokens, chunk)
        tokens = np.full((b, p_len), self.pad_id, np.int32)
        valid = np.zeros((b, p_len), bool)
        for i, p in enumerate(list(prompts) + [prompts[0]] * (b - n_real)):  # filler rows repeat row 0
            tokens[i, p_len - len(p):] = p
            valid[i, p_len - len(p):] = True
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
        if keys is None:
            if sampling.temperature > 0:
                raise ValueError("sampling at temperature > 0 needs PRNG keys")
            keys = np.zeros((b, 2), np.uint32)
        keys = np.asarray(jax.device_get(keys))  # a copy: the decode state (keys included) is donated
        if keys.ndim != 2 or keys.shape[0] < n_real:
            raise ValueError(f"need one raw PRNG key (jax.random.PRNGKey) per prompt: {n_real} prompts, "
                             f"keys of shape {keys.shape}")
        if keys.shape[0] < b:
            keys = np.concatenate([keys, np.broadcast_to(keys[:1], (b - keys.shape[0], 2))])
        put = (lambda x: jax.device_put(x, self.batch_sharding)) if self.batch_sharding else jnp.asarray

        t0 = time.perf_counter()
        logits, cache = self._prefill(self.params, put(tokens), put(positions), put(valid),
                                      slots=p_len + n_slots)
        done = np.zeros((b,), bool)
        done[n_real:] = True
        state = {"logits": logits, "cache": cache, "out": put(np.full((b, n_slots), self.pad_id, np.int32)),
                 "done": put(done), "pos": put(positions[:, -1] + 1), "keys": put(keys),
                 "step": jnp.zeros((), jnp.int32), "n_new": jnp.zeros((), jnp.int32)}
        rule = dataclasses.replace(sampling, max_new_tokens=1)  # the static part: one compile for any budget
        stopped = np.zeros((b,), bool)
        stop_step = np.full((b,), n_slots)
        for stop_at in range(chunk, sampling.max_new_tokens + chunk, chunk):
            stop_at = min(stop_at, sampling.max_new_tokens)
            state = self._decode(self.params, state, jnp.int32(stop_at), sampling=rule)
            out, done, step = jax.device_get((state["out"], state["done"], state["step"]))
            if is_done is not None:  # also after the last chunk: a row that hit a stop string is finished
                newly = [i for i in range(n_real) if not (done[i] or stopped[i])
                         and is_done(i, _cut(out[i, :step], self.eos_id))]
                for i in newly:
                    stopped[i], stop_step[i] = True, step
                if newly and step < sampling.max_new_tokens:
                    state["done"] = put(done | stopped)
            if (done | stopped).all() or step >= sampling.max_new_tokens:
                break
        out, done, step, n_new = jax.device_get((state["out"], state["done"], state["step"], state["n_new"]))
        seconds = time.perf_counter() - t0
        rows = [_cut(out[i, :min(step, stop_step[i])], self.eos_id) for i in range(n_real)]
        return Output(rows, [bool(done[i] or stopped[i]) for i in range(n_real)], int(n_new), seconds)


def _cut(row: np.ndarray, eos_id: int) -> list[int]:
    row = row.tolist()
    return row[: row.index(eos_id)] if eos_id in row else row


def greedy_reference(model: Transformer, prompt: Sequence[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding by full recomputation, no cache: the slow reference the cached path is tested against.

    Each step runs the whole sequence again; it sits right-padded in a fixed-length buffer (causal attention never
    looks at the padding) so one compiled forward serves every step."""
    length = _bucket_len(len(prompt) + max_new_tokens)
    forward = jax.jit(lambda tokens: model(tokens)[0])
    ids = np.zeros((1, length), np.int32)
    ids[0, : len(prompt)] = prompt
    new: list[int] = []
    for t in range(len(prompt), len(prompt) + max_new_tokens):
        tok = int(jnp.argmax(forward(jnp.asarray(ids))[t - 1]))
        if tok == eos_id:
            break
        new.append(tok)
        ids[0, t] = tok
    return new
