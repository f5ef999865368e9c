"""LoRA adapters as a model variant (`model.variant: {name: lora, r: 8, alpha: 16, ...}`), for the weak-to-strong
recipe (issue 14; peft / LLaMA-Factory semantics).

Every targeted Linear (q, k, v, o, gate, up, down) computes y = x W + s (x A) B with A (d_in, r), B (r, d_out),
s = alpha / r (alpha / sqrt(r) with rslora). A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (peft's kaiming_uniform(a=sqrt(5)))
or N(0, 1/r^2) with `init: gaussian`; B = 0, so a fresh adapter is exactly the base. The base weights keep their
paths (blocks/i/attn/q/kernel) beside the adapter's (blocks/i/attn/q/lora_a, lora_b), so sharding rules and the
base's checkpoints read unchanged; only lora_a/lora_b train.
Defaults r = 8, alpha = 16 (LLaMA-Factory's alpha = 2r; peft's own default alpha is 8), dropout 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mathlm.models.transformer import ModelConfig, Transformer
from mathlm.models.variants import VariantSpec, check_keys, register

NAME = "lora"
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"  # "kaiming" (peft default) | "gaussian"
    targets: tuple[str, ...] = TARGETS
    enabled: bool = True  # False: the exact base forward (adapters kept, unused)

    @classmethod
    def parse(cls, options: dict) -> LoraOptions:
        check_keys(cls, options, "model.variant lora")
        opts = dict(options)
        if "targets" in opts:
            opts["targets"] = tuple(opts["targets"])
        out = cls(**opts)
        out.validate()
        return out

    def validate(self) -> None:
        if not (isinstance(self.r, int) and self.r >= 1):
            raise ValueError(f"lora r must be an integer >= 1, got {self.r!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"lora init must be kaiming or gaussian, got {self.init!r}")
        bad = sorted(set(self.targets) - set(TARGETS))
        if bad or not self.targets:
            raise ValueError(f"lora targets must be a non-empty subset of {', '.join(TARGETS)}, got {bad or '[]'}")
        if self.dropout != 0:
            # Not yet: dropout needs a per-step RNG in the forward; every reference recipe uses 0.
            raise ValueError("lora dropout > 0 is not supported yet (the recipes use 0)")

    @property
    def scale(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)


class LoraLinear(nnx.Linear):
    """A Linear with an adapter: its kernel (and bias) stay at the base's paths, lora_a / lora_b sit beside them."""

    def __init__(self, base: nnx.Linear, opts: LoraOptions, rngs: nnx.Rngs):
        d_in, d_out = base.kernel.shape
        super().__init__(d_in, d_out, use_bias=base.use_bias, dtype=base.dtype, dot_general=base.dot_general,
                         rngs=rngs)
        self.kernel = base.kernel
        if base.use_bias:
            self.bias = base.bias
        key = rngs.params()
        if opts.init == "gaussian":
            a = jax.random.normal(key, (d_in, opts.r)) / opts.r
        else:
            bound = 1.0 / d_in ** 0.5
            a = jax.random.uniform(key, (d_in, opts.r), jnp.float32, -bound, bound)
        self.lora_a = nnx.Param(a.astype(jnp.float32))
        self.lora_b = nnx.Param(jnp.zeros((opts.r, d_out), jnp.float32))
        self.scale, self.enabled = opts.scale, opts.enabled

    def __call__(self, x):
        y = super().__call__(x)
        if not self.enabled:
            return y
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        return y + lora_delta(x, a, b, self.scale).astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_delta(x, a, b, scale: float):
    """s (x A) B: the adapter's contribution, with a hand-written backward (the same gradients as autodiff).

    Why: each adapter's weight gradients contract over every token. Autodiff orders those products so that
    XLA:CPU transposes the wide (tokens, d_out) output gradient before the dot, a strided copy per adapted
    Linear that made a LoRA step on a d 256 model 1.3x slower than full fine-tuning (measured, docs/benchmarks.md).
    Here the narrow (tokens, r) operand is the one the dots transpose."""
    return scale * ((x @ a) @ b)


def _lora_delta_fwd(x, a, b, scale):
    h = x @ a
    return scale * (h @ b), (x, a, b, h)


def _lora_delta_bwd(scale, res, g):
    x, a, b, h = res
    g2, x2, h2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
    gh = scale * (g2 @ b.T)  # (tokens, r): the gradient at x A
    db = scale * jnp.einsum("tr,to->ro", h2, g2)
    da = jnp.einsum("tr,td->rd", gh, x2).T
    return (gh @ a.T).reshape(x.shape), da, db


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


class LoraTransformer(Transformer):
    def __init__(self, cfg: ModelConfig, opts: LoraOptions, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        for block in self.blocks:
            for parent in (block.attn, block.mlp):
                for name in TARGETS:
                    if name in opts.targets and hasattr(parent, name):
                        setattr(parent, name, LoraLinear(getattr(parent, name), opts, rngs))


@contextlib.contextmanager
def adapters_disabled(model: nnx.Module):
    """Every LoraLinear of `model` computes its base alone while the block runs (`enabled` restored after): the
    exact base the adapters sit on, e.g. DPO's reference. ValueError when the model has no adapters."""
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, LoraLinear)]
    if not layers:
        raise ValueError("the model has no LoRA adapters to disable")
    saved = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, saved):
            layer.enabled = enabled


def base_params(params: dict) -> dict:
    """LoRA params -> the plain model's (adapters dropped; the base weights are already at their paths)."""
    if not isinstance(params, dict):
        return params
    return {k: base_params(v) for k, v in params.items() if k not in ("lora_a", "lora_b")}


def merge_params(params: dict, opts: LoraOptions) -> dict:
    """W' = W + s A B in float32 (then the base dtype) for every adapted Linear: a plain model's params."""
    if not isinstance(params, dict):
        return params
    if "lora_a" in params:
        w = jnp.asarray(params["kernel"])
        delta = opts.scale * (jnp.asarray(params["lora_a"], jnp.float32) @ jnp.asarray(params["lora_b"], jnp.float32))
        out = {k: v for k, v in params.items() if k not in ("lora_a", "lora_b")}
        out["kernel"] = (w.astype(jnp.float32) + delta).astype(w.dtype)
        return out
    return {k: merge_params(v, opts) for k, v in params.items()}


def _insert_base(base: dict, fresh: dict) -> dict:
    """A plain model's weights placed into a fresh LoRA model's tree (adapters kept from `fresh`)."""
    if not isinstance(fresh, dict):
        return jnp.copy(base)
    return {k: v if k in ("lora_a", "lora_b") else _insert_base(base[k], v) for k, v in fresh.items()}


def _build(cfg: ModelConfig, options: dict, rngs: nnx.Rngs) -> nnx.Module:
    return LoraTransformer(cfg, LoraOptions.parse(options), rngs)


def _trainable(cfg: ModelConfig, options: dict):
    LoraOptions.parse(options)
    return lambda path: path.endswith(("/lora_a", "/lora_b"))


def _from_base(cfg: ModelConfig, options: dict, base: dict, fresh: dict) -> dict:
    return _insert_base(base, fresh)


def peft_tensors(cfg: ModelConfig, params: dict, opts: LoraOptions) -> dict:
    """The adapter alone in PEFT's layout: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
    (r, d_in) and ...lora_B.weight (d_out, r), float32."""
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    out = {}
    for i in range(cfg.n_layers):
        for part in ("attn", "mlp"):
            for name, leaf in params["blocks"][i][part].items():
                if isinstance(leaf, dict) and "lora_a" in leaf:
                    key = f"base_model.model.model.layers.{i}.{names[name]}"
                    out[f"{key}.lora_A.weight"] = np.ascontiguousarray(np.asarray(leaf["lora_a"], np.float32).T)
                    out[f"{key}.lora_B.weight"] = np.ascontiguousarray(np.asarray(leaf["lora_b"], np.float32).T)
    return out


def peft_config(opts: LoraOptions) -> dict:
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
             "down": "down_proj"}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": opts.r, "lora_alpha": opts.alpha,
            "lora_dropout": opts.dropout, "use_rslora": opts.rslora, "bias": "none",
            "target_modules": [names[t] for t in opts.targets]}


register(VariantSpec(NAME, _build, _trainable, from_base=_from_base,
                     plain_form=lambda cfg, options: dataclasses.replace(cfg, variant=None),
                     plain_params=lambda options, params: merge_params(params, LoraOptions.parse(options))))
