"""Masked diffusion LMs (SMDM, Nie et al., "Scaling up Masked Diffusion Models on Text", ICLR 2025): sampling and
likelihood over a bidirectional Transformer (`ModelConfig(causal=False, mask_token=True)`).

The mask token id is always the model's `cfg.vocab_size` (the extra input-embedding row); the head covers the real
vocabulary only, so the mask can never be sampled.

Layout. A row is [left padding | prompt | L generation slots]; padding has segment id 0 and real tokens 1, so
attention never crosses between them (`attention_mask` allows equal segment ids only), and RoPE positions count
from the first real token. A row's result therefore does not depend on how much padding its batch neighbours force
on it. Every random draw is keyed per row (and per step, per generation slot / per position), never by canvas
column, for the same reason.

Sampling (`sample`, host driver `DiffusionGenerator`), following the reference `diff_sample`:
  - times t_k = linspace(1, eps, steps + 1), eps = 1e-3;
  - each step runs the whole canvas (static shapes; one `lax.fori_loop` per compile) and samples x0 for the masked
    slots by Gumbel-max. The reference's `add_gumbel_noise` takes argmax(exp(l) / (-log U)^T), which is
    argmax(l + T * G) with G = -log(-log U) a standard Gumbel: we use that log-space form (float32; no overflow of
    exp), i.e. a sample of softmax(l / T); T = 0 is the plain argmax (no noise drawn);
  - `ancestral` (the reference's "origin"): each still-masked slot is revealed with probability 1 - s/t; the last
    step reveals all that remain;
  - `low_confidence` (the reference's "greddy"): reveal the most confident masked slots (confidence = the model's
    probability of the sampled token). Deviations, both deliberate:
      * the count is per row, ranked within the row; the reference flattens the batch and takes one top-k over all
        rows' masks, which couples rows;
      * the count is n_mask - floor(n_mask * s/t) (i.e. the number kept masked is floored) instead of the
        reference's int(n_mask * (1 - s/t)). With eps > 0 and steps == L, the reference floors its first step's
        count (n_mask * (1 - s/t) < 1) to 0, then reveals one per step and two at the last: [0, 1, ..., 1, 2]
        (measured in experiments/sampler_identities). Ours reveals exactly one slot per step, and at most one more
        than the reference on any step. The last step reveals the rest.
  - unsupervised classifier-free guidance (SMDM Sec. 4), weight w = `guidance` (the reference's cfg_scale): the
    unconditional input is the same canvas with the prompt replaced by masks; logits = l_u + (w + 1)(l_c - l_u);
    both halves in one forward (concatenated on the batch axis). w = 0 compiles the conditional path alone
    (token-identical to no guidance).

Likelihood:
  - `elbo_nll`: the Monte-Carlo ELBO (an upper bound on the NLL, nats) with stratified times
    t_i = (i + u) / n, p_i = (1 - eps) t_i + eps, each target token masked with probability p_i, estimate
    mean_i sum_masked CE / p_i; returns it with the standard error of that mean (the iid formula, conservative for
    stratified samples). The prompt is never masked.
  - `chain_rule_nll`: exact NLL of a continuation in left-to-right order: for c_1..c_m after the prompt, row j
    reveals c_1..c_{j-1}, masks c_j..c_m and scores log p(c_j) at its slot; the NLL is minus the sum over j.
Both are traceable (plain jnp ops, so a batch sharding propagates); `DiffusionScorer` packs ragged rows and jits.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from mathlm.models.generate import ContextOverflow, Output, _bucket_len, _cut
from mathlm.models.transformer import Transformer

# The smallest sampling time and the ELBO's masking floor (the ε = 1e-3, the reference's training eps).
# Deviation: the reference sampler's own default is eps=1e-5; 1e-3 keeps sampling and training on one floor.
EPS = 1e-3
RULES = ("low_confidence", "ancestral")


def check_model(model: Transformer) -> None:
    """A diffusion sampler needs a bidirectional model with a mask-token embedding row."""
    if model.cfg.kind != "mdm":
        raise ValueError("diffusion sampling and scoring need a bidirectional model (model.causal=false); "
                         "this one is causal")
    if not model.cfg.mask_token:
        raise ValueError("diffusion sampling and scoring need a mask-token embedding row (model.mask_token=true)")


@dataclasses.dataclass(frozen=True)
class DiffusionSampling:
    max_new_tokens: int = 256  # L: the generation length (number of masks after the prompt)
    steps: int = 256
    temperature: float = 0.0  # 0 = greedy argmax
    rule: str = "low_confidence"  # or "ancestral"
    guidance: float = 0.0  # unsupervised classifier-free guidance weight w (the reference's cfg_scale); 0 = off
    eps: float = EPS

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        check_guidance(self.guidance)
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")


# --- shared pieces ------------------------------------------------------------------------------------------------

def check_guidance(guidance: float, prompts: Sequence[Sequence[int]] = ()) -> None:
    """ValueError for a negative guidance weight, or guidance > 0 with an empty prompt (nothing to condition on)."""
    if guidance < 0:
        raise ValueError(f"guidance/cfg_scale must be >= 0, got {guidance}")
    if guidance > 0 and any(len(p) == 0 for p in prompts):
        raise ValueError("classifier-free guidance (guidance > 0) needs a non-empty prompt in every row")


def guided_logits(model: Transformer, tokens, positions, segment_ids, prompt_mask, guidance=0.0, *,
                  guided: bool = False):
    """(B, T, V) logits. With `guided`, unsupervised CFG: l_u + (w + 1)(l_c - l_u), where the unconditional input is
    `tokens` with the prompt (prompt_mask) replaced by masks; both halves run as one (2B, T) forward."""
    if not guided:
        return model(tokens, positions, segment_ids)
    b = tokens.shape[0]
    uncond = jnp.where(prompt_mask, model.cfg.vocab_size, tokens)
    both = model(jnp.concatenate([tokens, uncond]), jnp.concatenate([positions, positions]),
                 jnp.concatenate([segment_ids, segment_ids]))
    cond, unc = both[:b], both[b:]
    return unc + (guidance + 1) * (cond - unc)


# --- sampling -----------------------------------------------------------------------------------------------------

def sample(model: Transformer, canvas, positions, segment_ids, keys, temperature, guidance, *, length: int,
           steps: int, rule: str, greedy: bool, guided: bool, eps: float = EPS, history: bool = False):
    """Traceable sampling loop. canvas (B, P + length) int32 holds [padding | prompt | `length` masks]; keys (B, 2)
    raw PRNG keys, one per row. temperature / guidance may be traced; `greedy` (temperature == 0) and `guided`
    (guidance > 0) pick the compiled variant. Returns (canvas, hist): hist (steps, B, length) is the generation
    region after each step when `history`, else None."""
    check_model(model)
    mid = model.cfg.vocab_size
    b, total = canvas.shape
    p_len = total - length
    prompt_mask = (jnp.arange(total) < p_len)[None] & (segment_ids > 0)
    ts = jnp.linspace(1.0, eps, steps + 1, dtype=jnp.float32)

    def body(i, carry):
        x, hist = carry
        t, s = ts[i], ts[i + 1]
        last = i == steps - 1
        gen = x[:, p_len:]
        is_mask = gen == mid
        logits = guided_logits(model, x, positions, segment_ids, prompt_mask, guidance, guided=guided)[:, p_len:]
        step_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, i)))(keys)  # (B, 2, 2)
        if greedy:
            x0 = jnp.argmax(logits, -1).astype(jnp.int32)
        else:  # Gumbel-max: argmax(l + T * G) samples softmax(l / T) (the reference's exp(l) / (-log U)^T)
            g = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], jnp.float32))(step_keys[:, 0])
            x0 = jnp.argmax(logits + temperature * g, -1).astype(jnp.int32)
        if rule == "ancestral":
            p_reveal = jnp.where(last, 1.0, 1.0 - s / t)
            u = jax.vmap(lambda k: jax.random.uniform(k, (length,)))(step_keys[:, 1])
            reveal = is_mask & (u < p_reveal)
        else:
            logp = jax.nn.log_softmax(logits, -1)
            conf = jnp.take_along_axis(logp, x0[..., None], -1)[..., 0]
            conf = jnp.where(is_mask, jnp.maximum(conf, -1e30), -jnp.inf)
            n_mask = jnp.sum(is_mask, 1)
            # Kept masked: floor(n_mask * s/t) (see the module docstring for the deviation from the reference).
            keep = jnp.floor(n_mask.astype(jnp.float32) * (s / t)).astype(jnp.int32)
            n_reveal = jnp.where(last, n_mask, n_mask - keep)
            rank = jnp.argsort(jnp.argsort(-conf, axis=1, stable=True), axis=1, stable=True)  # per row
            reveal = is_mask & (rank < n_reveal[:, None])
        gen = jnp.where(reveal, x0, gen)
        x = lax.dynamic_update_slice(x, gen, (0, p_len))
        if history:
            hist = lax.dynamic_update_slice(hist, gen[None], (i, 0, 0))
        return x, hist

    hist = jnp.zeros((steps, b, length), jnp.int32) if history else None
    return lax.fori_loop(0, steps, body, (canvas, hist))


@dataclasses.dataclass
class DiffusionOutput(Output):
    history: np.ndarray | None = None  # (steps, B, L) generation region after each step (return_history=True)


class DiffusionGenerator:
    """Host driver mirroring `generate.Generator`: compiles once per (batch, prompt bucket, L, steps, rule, greedy,
    guided) and reuses it. Weights are used where they are; `batch_sharding` places the batch rows."""

    def __init__(self, model: Transformer, *, eos_id: int, pad_id: int = 0,
                 batch_sharding: jax.sharding.Sharding | None = None):
        check_model(model)
        self.cfg = model.cfg
        self.graphdef, self.params = nnx.split(model)
        self.eos_id, self.pad_id = eos_id, pad_id
        self.batch_sharding = batch_sharding
        self._sample = jax.jit(self._sample_impl, static_argnames=("static",))

    def _sample_impl(self, params, canvas, positions, segment_ids, keys, temperature, guidance, static):
        model = nnx.merge(self.graphdef, params)
        length, steps, rule, greedy, guided, eps, history = static
        return sample(model, canvas, positions, segment_ids, keys, temperature, guidance, length=length,
                      steps=steps, rule=rule, greedy=greedy, guided=guided, eps=eps, history=history)

    def __call__(self, prompts: Sequence[Sequence[int]], settings: DiffusionSampling, keys: jax.Array | None = None,
                 pad_batch_to: int | None = None, return_history: bool = False) -> DiffusionOutput:
        """prompts: token ids per row (no padding; may be empty without guidance). keys: (B, 2) raw PRNG keys, one
        per prompt (needed for temperature > 0 or the ancestral rule). Completions are cut at the first EOS."""
        settings.validate()
        if not prompts:
            raise ValueError("need at least one prompt")
        check_guidance(settings.guidance, prompts)
        n_real, length = len(prompts), settings.max_new_tokens
        b = max(n_real, pad_batch_to or 0)
        longest = max(len(p) for p in prompts)
        if longest + length > self.cfg.max_seq_len:
            raise ContextOverflow(f"a prompt of {longest} tokens + {length} new tokens exceeds the model's context "
                                  f"of {self.cfg.max_seq_len}")
        p_len = _bucket_len(longest)
        canvas = np.full((b, p_len + length), self.pad_id, np.int32)
        canvas[:, p_len:] = self.cfg.vocab_size
        segment_ids = np.zeros((b, p_len + length), np.int32)
        segment_ids[:, p_len:] = 1
        for i, p in enumerate(list(prompts) + [prompts[0]] * (b - n_real)):  # filler rows repeat row 0
            if len(p):
                canvas[i, p_len - len(p):p_len] = p
                segment_ids[i, p_len - len(p):p_len] = 1
        positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
        greedy = settings.temperature == 0
        if keys is None:
            if not greedy or settings.rule == "ancestral":
                raise ValueError("sampling at temperature > 0 or with the ancestral rule needs PRNG keys")
            keys = np.zeros((b, 2), np.uint32)
        keys = np.asarray(jax.device_get(keys))
        if keys.ndim != 2 or keys.shape[0] < n_real:
            raise ValueError(f"need one raw PRNG key (jax.random.PRNGKey) per prompt: {n_real} prompts, "
                             f"keys of shape {keys.shape}")
        if keys.shape[0] < b:
            keys = np.concatenate([keys, np.broadcast_to(keys[:1], (b - keys.shape[0], 2))])
        keys = keys[:b]
        put = (lambda x: jax.device_put(x, self.batch_sharding)) if self.batch_sharding else jnp.asarray
        static = (length, settings.steps, settings.rule, greedy, settings.guidance > 0, settings.eps,
                  return_history)
        t0 = time.perf_counter()
        out, hist = self._sample(self.params, put(canvas), put(positions), put(segment_ids), put(keys),
                                 jnp.float32(settings.temperature), jnp.float32(settings.guidance), static=static)
        out, hist = jax.device_get((out, hist))
        seconds = time.perf_counter() - t0
        rows = [_cut(out[i, p_len:], self.eos_id) for i in range(n_real)]
        finished = [len(r) < length for r in rows]
        # new_tokens: kept tokens plus the EOS, as generate.Generator counts them.
        return DiffusionOutput(rows, finished, sum(len(r) + f for r, f in zip(rows, finished)), seconds,
                               None if hist is None else np.asarray(hist)[:, :n_real])


# --- likelihood ---------------------------------------------------------------------------------------------------

def pack(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int = 0,
         length: int | None = None) -> dict[str, np.ndarray]:
    """Left-pad prompt + target rows to `length` (default: the longest row bucketed to a power of two, >= 16):
    tokens, positions (from the first real token), segment_ids (0 padding, 1 real), prompt_mask, target_mask."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    longest = max(len(p) + len(t) for p, t in zip(prompts, targets))
    length = length or _bucket_len(longest)
    if longest > length:
        raise ValueError(f"a row of {longest} tokens does not fit length {length}")
    b = len(prompts)
    tokens = np.full((b, length), pad_id, np.int32)
    prompt_mask = np.zeros((b, length), bool)
    target_mask = np.zeros((b, length), bool)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        start = length - len(p) - len(t)
        tokens[i, start:] = list(p) + list(t)
        prompt_mask[i, start:start + len(p)] = True
        target_mask[i, start + len(p):] = True
    segment_ids = (prompt_mask | target_mask).astype(np.int32)
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "prompt_mask": prompt_mask,
            "target_mask": target_mask}


def _target_logp(logits, tokens):
    """log p(token) per slot, (N, T) float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]


def elbo_nll(model: Transformer, batch: dict, keys, *, n_samples: int, chunk: int | None = None, eps: float = EPS,
             guidance: float = 0.0, guided: bool = False, return_samples: bool = False):
    """Monte-Carlo ELBO, per row: (nll_upper_bound (B,), standard_error (B,)) in nats [, samples (B, n)].

    batch: `pack`'s arrays (B, T). keys (B, 2): one raw PRNG key per row. Samples are evaluated `chunk` at a time
    (chunk must divide n_samples; default all at once): each forward is (B * chunk, T)."""
    check_model(model)
    chunk = chunk or n_samples
    if n_samples < 1 or n_samples % chunk:
        raise ValueError(f"n_samples ({n_samples}) must be >= 1 and a multiple of chunk ({chunk})")
    mid = model.cfg.vocab_size
    tokens, positions, seg = batch["tokens"], batch["positions"], batch["segment_ids"]
    prompt_mask, target_mask = batch["prompt_mask"], batch["target_mask"]
    b, t = tokens.shape

    def row_draws(key, pos):
        k_u, k_m = jax.random.split(key)
        ti = (jnp.arange(n_samples) + jax.random.uniform(k_u, ())) / n_samples  # stratified
        p = (1 - eps) * ti + eps
        # One uniform per (sample, position from the first real token): independent of padding.
        r = jax.vmap(lambda i: jax.vmap(lambda q: jax.random.uniform(
            jax.random.fold_in(jax.random.fold_in(k_m, i), q)))(pos))(jnp.arange(n_samples))
        return p, r < p[:, None]

    p, masked = jax.vmap(row_draws)(keys, positions)  # (B, n), (B, n, T)
    masked = masked & target_mask[:, None]
    g = n_samples // chunk
    masked_g = masked.reshape(b, g, chunk, t).transpose(1, 0, 2, 3)
    p_g = p.reshape(b, g, chunk).transpose(1, 0, 2)

    def tile(a):
        return jnp.broadcast_to(a[:, None], (b, chunk, t)).reshape(b * chunk, t)

    def group(args):
        m, pg = args  # (B, chunk, T), (B, chunk)
        x = jnp.where(m, mid, tokens[:, None]).reshape(b * chunk, t)
        logits = guided_logits(model, x, tile(positions), tile(seg), tile(prompt_mask), guidance, guided=guided)
        ce = -_target_logp(logits, tile(tokens)).reshape(b, chunk, t)
        return jnp.sum(jnp.where(m, ce, 0.0), -1) / pg

    per_sample = lax.map(group, (masked_g, p_g)).transpose(1, 0, 2).reshape(b, n_samples)
    nll = jnp.mean(per_sample, 1)
    se = (jnp.std(per_sample, 1, ddof=1) / jnp.sqrt(n_samples)) if n_samples > 1 else jnp.full((b,), jnp.nan)
    return (nll, se, per_sample) if return_samples else (nll, se)


def chain_rule_nll(model: Transformer, batch: dict, *, max_target_len: int, chunk: int | None = None,
                   guidance: float = 0.0, guided: bool = False):
    """NLL (B,) of the targets in left-to-right order: row j reveals targets 1..j-1, masks j..m, scores target j.

    max_target_len (static) >= the longest target; the rows j run `chunk` at a time (chunk divides max_target_len;
    default all at once): each forward is (B * chunk, T)."""
    check_model(model)
    chunk = chunk or max_target_len
    if max_target_len < 1 or max_target_len % chunk:
        raise ValueError(f"max_target_len ({max_target_len}) must be >= 1 and a multiple of chunk ({chunk})")
    mid = model.cfg.vocab_size
    tokens, positions, seg = batch["tokens"], batch["positions"], batch["segment_ids"]
    prompt_mask, target_mask = batch["prompt_mask"], batch["target_mask"]
    b, t = tokens.shape
    rank = jnp.where(target_mask, jnp.cumsum(target_mask, 1) - 1, -1)  # index of each target slot, -1 elsewhere

    def tile(a):
        return jnp.broadcast_to(a[:, None], (b, chunk, t)).reshape(b * chunk, t)

    def group(j0):
        js = j0 + jnp.arange(chunk)
        masked = target_mask[:, None] & (rank[:, None] >= js[None, :, None])  # (B, chunk, T)
        scored = rank[:, None] == js[None, :, None]
        x = jnp.where(masked, mid, tokens[:, None]).reshape(b * chunk, t)
        logits = guided_logits(model, x, tile(positions), tile(seg), tile(prompt_mask), guidance, guided=guided)
        lp = _target_logp(logits, tile(tokens)).reshape(b, chunk, t)
        return jnp.sum(jnp.where(scored, lp, 0.0), (1, 2))

    return -jnp.sum(lax.map(group, jnp.arange(0, max_target_len, chunk)), 0)


class DiffusionScorer:
    """Host driver for the likelihoods: packs ragged (prompt, target) rows, jits once per shape bucket."""

    def __init__(self, model: Transformer, *, pad_id: int = 0, batch_sharding: jax.sharding.Sharding | None = None):
        check_model(model)
        self.cfg = model.cfg
        self.graphdef, self.params = nnx.split(model)
        self.pad_id, self.batch_sharding = pad_id, batch_sharding
        self._elbo = jax.jit(lambda params, batch, keys, w, static: elbo_nll(
            nnx.merge(self.graphdef, params), batch, keys, n_samples=static[0], chunk=static[1], eps=static[2],
            guidance=w, guided=static[3]), static_argnames=("static",))
        self._chain = jax.jit(lambda params, batch, w, static: chain_rule_nll(
            nnx.merge(self.graphdef, params), batch, max_target_len=static[0], chunk=static[1], guidance=w,
            guided=static[2]), static_argnames=("static",))

    def _batch(self, prompts, targets, pad_batch_to):
        if not prompts:
            raise ValueError("need at least one row")
        if any(len(t) == 0 for t in targets):
            raise ValueError("every target needs at least one token")
        longest = max(len(p) + len(t) for p, t in zip(prompts, targets))
        if longest > self.cfg.max_seq_len:
            raise ContextOverflow(f"a row of {longest} tokens exceeds the model's context of {self.cfg.max_seq_len}")
        n = len(prompts)
        b = max(n, pad_batch_to or 0)
        fill = b - n
        batch = pack(list(prompts) + [prompts[0]] * fill, list(targets) + [targets[0]] * fill, self.pad_id)
        put = (lambda x: jax.device_put(x, self.batch_sharding)) if self.batch_sharding else jnp.asarray
        return {k: put(v) for k, v in batch.items()}, n, b, put

    def elbo(self, prompts, targets, keys, *, n_samples: int = 128, chunk: int | None = None, eps: float = EPS,
             guidance: float = 0.0, pad_batch_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-row ELBO NLL upper bound and its standard error, nats over the target tokens."""
        check_guidance(guidance, prompts)
        batch, n, b, put = self._batch(prompts, targets, pad_batch_to)
        keys = np.asarray(jax.device_get(keys))
        if keys.ndim != 2 or keys.shape[0] < n:
            raise ValueError(f"need one raw PRNG key per row: {n} rows, keys of shape {keys.shape}")
        keys = np.concatenate([keys[:n], np.broadcast_to(keys[:1], (b - n, 2))]) if b > n else keys[:n]
        nll, se = self._elbo(self.params, batch, put(keys), jnp.float32(guidance),
                             static=(n_samples, chunk, eps, guidance > 0))
        nll, se = jax.device_get((nll, se))
        return np.asarray(nll)[:n], np.asarray(se)[:n]

    def chain_rule(self, prompts, targets, *, chunk: int | None = None, guidance: float = 0.0,
                   pad_batch_to: int | None = None) -> np.ndarray:
        """Per-row exact left-to-right NLL of the targets (nats)."""
        check_guidance(guidance, prompts)
        batch, n, _, _ = self._batch(prompts, targets, pad_batch_to)
        m = max(len(t) for t in targets)
        chunk = min(chunk or 8, m)
        m = -(-m // chunk) * chunk  # rows j beyond a target's length score nothing
        nll = self._chain(self.params, batch, jnp.float32(guidance), static=(m, chunk, guidance > 0))
        return np.asarray(jax.device_get(nll))[:n]
