"""One Llama-style Transformer (Flax NNX): RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases.

The same network serves every objective: `causal=True` for autoregressive LMs, `causal=False` for masked
diffusion (bidirectional). The input embedding may carry one extra row for a mask token; the output head always
covers the real vocabulary only, so a model can never predict the mask.

Shapes: B batch, T sequence, D d_model, H query heads, K kv heads, G = H // K, Dh head dim, F ffn dim, V vocab.
Parallelism is applied outside this file: models/sharding.py maps each weight, and each activation named by
`constrain(x, logical axes...)` here, to mesh axes (a no-op outside a sharded trainer step).

Two hand-written backward passes (custom VJPs; forward values are the plain ops, gradients equal autodiff's up to
float rounding) make training on XLA:CPU much faster (numbers in docs/benchmarks.md):
  - `_linear`, every Linear's matmul: the weight gradient is one 2-D GEMM, (B*T, D)^T @ (B*T, F). Autodiff's
    version contracts over two batch dims, which XLA:CPU lowered to a copy-transpose of the cotangent plus a slow
    generic dot (2-3x slower for the output head).
  - `_attend`, softmax attention: saves only the probabilities and computes dlogits = p * (dp - sum(dp * p)),
    instead of differentiating through the masked exp/sum/divide (one fused pass instead of several).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from mathlm.models import loss_head
from mathlm.models.attention_ops import (  # noqa: F401  (re-exported: tests and variants use them from here)
    ATTENTION_KINDS,
    BLOCKED_FROM,
    K_LAYOUT,
    V_LAYOUT,
    DocMask,
    _attend,
    _attend_cache,
    _write_cache,
    attention_kind,
    attention_mask,
    dense_mask,
)
from mathlm.models.blocked_attention import blocked_attend
from mathlm.models.sharding import constrain
from mathlm.models.splash import splash_attend


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 704
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    # Llama 3.1 RoPE frequency scaling ("llama3") with its four parameters; None = plain RoPE.
    rope_scaling: str | None = None
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2); o and the MLP never have one
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    causal: bool = True
    mask_token: bool = True  # reserve embedding row `vocab_size` for a [MASK] input (diffusion models)
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: bool = False
    # "auto" picks per platform of the mesh being traced (`attention_kind`): the Pallas splash kernel on TPUs,
    # cuDNN flash attention on NVIDIA GPUs in bf16, else the einsum path below, or `blocked` from BLOCKED_FROM
    # tokens. "xla" (einsum) | "cudnn" | "splash" | "blocked" force one; blocked is the plain-JAX flash attention
    # of models/blocked_attention.py (memory T x block, not T x S).
    attention: str = "auto"
    attention_block: int = 512  # block of `blocked` and `splash`; the sequence length must be a multiple of it
    # The loss head runs over chunks of this many positions (forward and backward, `target_logprobs`), so the
    # fp32 (B, T, V) logits never exist whole; sequences up to this length are one chunk (today's program).
    loss_chunk: int = 1024
    init_from: str | None = None  # a workdir or checkpoint path to load params from (read by the trainer)
    # A network variant from models/variants.py: a name or {name: ..., <its options>}; None = the plain Transformer.
    variant: dict | str | None = None

    @property
    def kind(self) -> str:
        """The model kind, the project's one word for it: "arm" (autoregressive: causal attention, next-token
        objectives, KV-cache decoding) or "mdm" (masked diffusion: bidirectional, diffusion objectives and sampling)."""
        return "arm" if self.causal else "mdm"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"model.attention must be one of {', '.join(ATTENTION_KINDS)}, got {self.attention!r}")
        if self.attention_block < 1:
            raise ValueError(f"model.attention_block must be >= 1, got {self.attention_block}")
        if self.loss_chunk < 1:
            raise ValueError(f"model.loss_chunk must be >= 1, got {self.loss_chunk}")
        if self.rope_scaling not in (None, "llama3"):
            raise ValueError(f"model.rope_scaling must be null or llama3, got {self.rope_scaling!r}")
        if self.rope_scaling and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError("model.rope_high_freq_factor must be > model.rope_low_freq_factor")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype must be float32 or bfloat16, got {self.dtype!r}")

    def param_count(self, embeddings: bool = True) -> int:
        d, f, dh = self.d_model, self.d_ff, self.head_dim
        attn = d * dh * (self.n_heads * 2 + self.n_kv_heads * 2)
        attn += dh * (self.n_heads + 2 * self.n_kv_heads) if self.attention_bias else 0
        block = attn + 3 * d * f + 2 * d
        n = self.n_layers * block + d
        if embeddings:
            n += (self.vocab_size + int(self.mask_token)) * d
            n += 0 if self.tie_embeddings else d * self.vocab_size
        return n


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


@jax.custom_vjp
def _linear(x, w):
    """x (..., D) @ w (D, F), exactly the dot nnx.Linear computes; the backward is shaped for fast GEMMs."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _linear_fwd(x, w):
    return _linear(x, w), (x, w)


def _linear_bwd(res, g):
    x, w = res
    dx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    dw = lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())))
    return dx, dw


_linear.defvjp(_linear_fwd, _linear_bwd)


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    """nnx.Linear's `dot_general`: its plain (..., D) x (D, F) case goes through `_linear`, anything else to lax."""
    if (dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2 and precision is None
            and preferred_element_type is None and kw.get("out_sharding") is None):
        return _linear(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kw)


def _dense(i: int, o: int, std: float, dtype, rngs: nnx.Rngs, bias: bool = False) -> nnx.Linear:
    return nnx.Linear(i, o, use_bias=bias, kernel_init=_normal(std), dtype=dtype, dot_general=_dot_general,
                      rngs=rngs)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        # Normalise in float32 whatever the compute dtype: bf16 variance is too coarse.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig):
    """Inverse frequencies (Dh/2,), with Llama 3.1's scaling when configured (as transformers computes them)."""
    dh = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    if cfg.rope_scaling == "llama3":
        # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated smoothly.
        low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = jnp.where(medium, smoothed, scaled)
    return inv_freq


def rope(x, positions, inv_freq):
    """Rotary embedding in the rotate-half layout used by Hugging Face Llama (weights convert 1:1)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, Dh/2)
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, dh = cfg.d_model, cfg.head_dim
        dt = jnp.dtype(cfg.dtype)
        lin = lambda i, o, std, bias=False: _dense(i, o, std, dt, rngs, bias)
        self.q = lin(d, cfg.n_heads * dh, 0.02, cfg.attention_bias)
        self.k = lin(d, cfg.n_kv_heads * dh, 0.02, cfg.attention_bias)
        self.v = lin(d, cfg.n_kv_heads * dh, 0.02, cfg.attention_bias)
        # Residual projections scaled by 1/sqrt(2L) (GPT-2) so the residual stream does not grow with depth.
        self.o = lin(cfg.n_heads * dh, d, 0.02 / math.sqrt(2 * cfg.n_layers))

    def _rotated_qk(self, x, positions):
        """q (B, T, H, Dh) and k (B, T, K, Dh), RoPE applied."""
        cfg = self.cfg
        b, t, _ = x.shape
        inv_freq = rope_frequencies(cfg)
        q = rope(self.q(x).reshape(b, t, cfg.n_heads, cfg.head_dim), positions, inv_freq)
        k = rope(self.k(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim), positions, inv_freq)
        return constrain(q, "batch", "length", "heads", None), constrain(k, "batch", "length", "kv_heads", None)

    def __call__(self, x, positions, mask, kv_cache=None, index=None):
        """With `kv_cache` = (k, v) of shapes (B, K, Dh, S) and (B, K, S, Dh), this call's keys/values are written
        at slots [index, index + T) and the queries attend over the whole cache (under `mask`); returns
        (out, new kv_cache)."""
        cfg = self.cfg
        b, t, _ = x.shape
        kv, g, dh = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
        q, k = self._rotated_qk(x, positions)
        v = constrain(self.v(x).reshape(b, t, kv, dh), "batch", "length", "kv_heads", None)
        if kv_cache is not None:
            k = _write_cache(kv_cache[0], k, index, K_LAYOUT)
            v = _write_cache(kv_cache[1], v, index, V_LAYOUT)
            out = _attend_cache(q.reshape(b, t, kv, g, dh), k, v, mask).reshape(b, t, cfg.n_heads * dh)
            return self.o(out), (k, v)
        kind, q5 = attention_kind(cfg, t), q.reshape(b, t, kv, g, dh)
        if kind == "cudnn":
            # Flash attention never materialises the (T, S) scores: needed for long contexts on GPUs.
            # The causal part goes to cuDNN's causal mode; the mask adds the document (segment) boundaries.
            # Unverified on hardware: the segment-mask case with cuDNN (docs/benchmarks.md says so).
            out = jax.nn.dot_product_attention(q, k, v, mask=dense_mask(mask)[:, 0], is_causal=cfg.causal,
                                               implementation="cudnn")
        elif kind == "splash":
            out = splash_attend(q5, k, v, mask.segment_ids, cfg.causal, min(cfg.attention_block, t))
        elif kind == "blocked":
            out = blocked_attend(q5, k, v, mask.segment_ids, cfg.causal, min(cfg.attention_block, t))
        else:
            out = _attend(q5, k, v, dense_mask(mask))
        out = out.reshape(b, t, cfg.n_heads * dh)
        return self.o(constrain(out, "batch", "length", "heads"))


    def probs(self, x, positions, mask):
        """The attention probabilities (B, H, T, S) in float32, for losses that compare them (Control-LLM's
        `attention` divergence); recomputes q and k rather than changing what the fused paths return."""
        cfg = self.cfg
        g, dh = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
        q, k = self._rotated_qk(x, positions)
        k = jnp.repeat(k, g, axis=2)  # head h uses kv head h // g, as in _attend
        logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / math.sqrt(dh)
        logits = jnp.where(dense_mask(mask)[:, 0], logits, jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(logits, axis=-1)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        dt = jnp.dtype(cfg.dtype)
        lin = lambda i, o, std: _dense(i, o, std, dt, rngs)
        self.gate = lin(d, f, 0.02)
        self.up = lin(d, f, 0.02)
        self.down = lin(f, d, 0.02 / math.sqrt(2 * cfg.n_layers))

    def __call__(self, x):
        return self.down(constrain(jax.nn.silu(self.gate(x)) * self.up(x), "batch", "length", "mlp"))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs)

    def init_cache(self, batch: int, slots: int):
        """This block's KV cache: (k, v) of shapes (B, K, Dh, S) and (B, K, S, Dh) (K_LAYOUT, V_LAYOUT)."""
        cfg = self.attn.cfg
        shape = (batch, slots, cfg.n_kv_heads, cfg.head_dim)  # as the projections' (B, T, K, Dh)
        dt = jnp.dtype(cfg.dtype)
        return (jnp.zeros([shape[i] for i in K_LAYOUT], dt), jnp.zeros([shape[i] for i in V_LAYOUT], dt))

    def __call__(self, x, positions, mask, kv_cache=None, index=None):
        if kv_cache is None:
            x = constrain(x + self.attn(self.attn_norm(x), positions, mask), "batch", "length", "embed")
            return constrain(x + self.mlp(self.mlp_norm(x)), "batch", "length", "embed")
        h, kv_cache = self.attn(self.attn_norm(x), positions, mask, kv_cache, index)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), kv_cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        n_embed = cfg.vocab_size + int(cfg.mask_token)
        self.embed = nnx.Embed(n_embed, cfg.d_model, embedding_init=_normal(0.02), rngs=rngs)
        self.blocks = nnx.List(self._make_blocks(cfg, rngs))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg.d_model, cfg.vocab_size, 0.02, jnp.dtype(cfg.dtype), rngs)

    def _make_blocks(self, cfg: ModelConfig, rngs: nnx.Rngs) -> list[nnx.Module]:
        """The layers in depth order; a variant (models/expand.py) overrides this to place its own."""
        return [Block(cfg, rngs) for _ in range(cfg.n_layers)]

    def __call__(self, tokens, positions=None, segment_ids=None):
        """tokens (B, T) int32 -> logits (B, T, V) float32 over the real vocabulary."""
        return self._head(self.hidden(tokens, positions, segment_ids))

    def target_logprobs(self, tokens, targets, positions=None, segment_ids=None):
        """log p(targets | tokens) (B, T) float32 and whether each target is the argmax (B, T), with the head run
        over chunks of `loss_chunk` positions (models/loss_head.py): what every training objective reads."""
        x = self.final_norm(self.hidden(tokens, positions, segment_ids))
        return loss_head.target_logprobs(self._logits, self._head_weight(), x, targets, self.cfg.loss_chunk)

    def hidden(self, tokens, positions=None, segment_ids=None):
        """The last block's residual stream (B, T, D), before the final norm."""
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        mask = DocMask(segment_ids, cfg.causal)
        x = constrain(self.embed(tokens).astype(jnp.dtype(cfg.dtype)), "batch", "length", "embed")
        for block in self.blocks:
            if cfg.remat:
                x = nnx.remat(lambda blk, h: blk(h, positions, mask))(block, x)
            else:
                x = block(x, positions, mask)
        return x

    def _head_weight(self):
        """The output projection in compute dtype: the tied embedding rows (V, D), or lm_head's kernel (D, V)."""
        dt = jnp.dtype(self.cfg.dtype)
        if self.cfg.tie_embeddings:
            return self.embed.embedding[...][: self.cfg.vocab_size].astype(dt)
        return self.lm_head.kernel[...].astype(dt)

    def _logits(self, w, x):
        if self.cfg.tie_embeddings:
            return jnp.einsum("btd,vd->btv", x, w)
        return _linear(x, w)

    def _head(self, x):
        logits = self._logits(self._head_weight(), self.final_norm(x))
        return constrain(logits.astype(jnp.float32), "batch", "length", "vocab")

    # --- incremental decoding (causal models only) ---------------------------------------------------------------
    # The cache has a fixed number of slots S; every row of the batch writes the same slot index, so ragged
    # prompts are left-padded and `valid` marks the padding slots that no query may attend to.

    def init_cache(self, batch: int, slots: int) -> dict:
        """Per layer its own cache pytree (a block's (k, v); a Control-LLM merge site holds one per branch)."""
        return {"layers": tuple(block.init_cache(batch, slots) for block in self.blocks),
                "valid": jnp.zeros((batch, slots), bool), "index": jnp.zeros((), jnp.int32)}

    def extend(self, tokens, positions, valid, cache: dict, last_only: bool = False):
        """Run `tokens` (B, T) at cache slots [index, index + T): returns (logits, cache).

        positions (B, T) are RoPE positions (they skip left padding); valid (B, T) is False on padding.
        With last_only the head runs on the final slot only: (B, 1, V), all a sampler needs after a prefill.
        The caller keeps index + T <= slots: past the end, dynamic_update_slice would clamp and overwrite.
        """
        cfg = self.cfg
        if not cfg.causal:
            raise ValueError("incremental decoding needs a causal model")
        t = tokens.shape[1]
        index = cache["index"]
        slot_valid = lax.dynamic_update_slice(cache["valid"], valid, (0, index))
        query_slot = index + jnp.arange(t)
        key_slot = jnp.arange(slot_valid.shape[1])
        mask = (key_slot[None, :] <= query_slot[:, None])[None] & slot_valid[:, None, :]
        mask = mask[:, None, None]  # (B, 1, 1, T, S)
        x = self.embed(tokens).astype(jnp.dtype(cfg.dtype))
        layers = []
        for block, layer_cache in zip(self.blocks, cache["layers"]):
            x, layer_cache = block(x, positions, mask, layer_cache, index)
            layers.append(layer_cache)
        if last_only:
            x = x[:, -1:]
        new_cache = {"layers": tuple(layers), "valid": slot_valid, "index": index + t}
        return self._head(x), new_cache
