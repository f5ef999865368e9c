"""Hugging Face Llama-family mapping: config.json <-> ModelConfig, HF state dict <-> our flat params (numpy only).

Our weights use flat dotted paths (`mathlm.train.checkpoint.flatten` of the model's nnx.Param pure dict). Linear
kernels are stored (in, out), the transpose of torch's `nn.Linear.weight` (out, in); everything else maps as is.
RoPE uses the same rotate-half layout as transformers, so q/k need no permutation.

Supported families: llama, mistral (full attention; identical to sliding-window attention while the sequence fits
the window) and qwen2 (q/k/v biases). A model with q/k/v biases is exported as Qwen2ForCausalLM: Llama's
`attention_bias` also puts a bias on o_proj, which we do not have, so only Qwen2 round-trips exactly.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from mathlm.models.transformer import ModelConfig

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")

# (our dotted path, HF tensor name, transpose). {i} is the layer index; bias rows apply only with q/k/v biases.
WEIGHT_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("embed.embedding", "model.embed_tokens.weight", False),
    ("blocks.{i}.attn_norm.scale", "model.layers.{i}.input_layernorm.weight", False),
    ("blocks.{i}.attn.q.kernel", "model.layers.{i}.self_attn.q_proj.weight", True),
    ("blocks.{i}.attn.k.kernel", "model.layers.{i}.self_attn.k_proj.weight", True),
    ("blocks.{i}.attn.v.kernel", "model.layers.{i}.self_attn.v_proj.weight", True),
    ("blocks.{i}.attn.q.bias", "model.layers.{i}.self_attn.q_proj.bias", False),
    ("blocks.{i}.attn.k.bias", "model.layers.{i}.self_attn.k_proj.bias", False),
    ("blocks.{i}.attn.v.bias", "model.layers.{i}.self_attn.v_proj.bias", False),
    ("blocks.{i}.attn.o.kernel", "model.layers.{i}.self_attn.o_proj.weight", True),
    ("blocks.{i}.mlp_norm.scale", "model.layers.{i}.post_attention_layernorm.weight", False),
    ("blocks.{i}.mlp.gate.kernel", "model.layers.{i}.mlp.gate_proj.weight", True),
    ("blocks.{i}.mlp.up.kernel", "model.layers.{i}.mlp.up_proj.weight", True),
    ("blocks.{i}.mlp.down.kernel", "model.layers.{i}.mlp.down_proj.weight", True),
    ("final_norm.scale", "model.norm.weight", False),
    ("lm_head.kernel", "lm_head.weight", True),
)


class HFMappingError(ValueError):
    """A config or checkpoint we cannot map; the message is one line and names the field or tensor."""


def weight_pairs(cfg: ModelConfig) -> Iterator[tuple[str, str, bool]]:
    """Every (our path, HF name, transpose) this model has."""
    for ours, theirs, transpose in WEIGHT_TABLE:
        if ours.endswith(".bias") and not cfg.attention_bias:
            continue
        if ours == "lm_head.kernel" and cfg.tie_embeddings:
            continue
        if "{i}" in ours:
            for i in range(cfg.n_layers):
                yield ours.format(i=i), theirs.format(i=i), transpose
        else:
            yield ours, theirs, transpose


# ----------------------------------------------------------------------------- configs

def _rope_from_hf(hf: Mapping) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either the transformers v5 `rope_parameters` or the v4 keys."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise HFMappingError(f"rope_scaling type {kind!r} is not supported (only llama3 or none)")
    return float(theta), params


def config_from_hf(hf: Mapping) -> tuple[ModelConfig, list[str]]:
    """config.json dict -> (ModelConfig, notes worth logging). Raises HFMappingError naming the offending field."""
    family = hf.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise HFMappingError(f"model_type {family!r} is not supported; supported families: "
                             f"{', '.join(SUPPORTED_FAMILIES)} (Llama-style decoders)")
    notes = []
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers' "swish" is SiLU too
        raise HFMappingError(f"hidden_act={hf['hidden_act']!r} is not supported (mathlm's MLP is SwiGLU: silu)")
    if hf.get("mlp_bias"):
        raise HFMappingError("mlp_bias=true is not supported (mathlm's MLP has no biases)")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise HFMappingError("use_sliding_window=true is not supported (mathlm attends over the full context)")
    if family != "qwen2" and hf.get("attention_bias"):
        raise HFMappingError("attention_bias=true is not supported for Llama/Mistral (it adds an o_proj bias)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFMappingError(f"partial_rotary_factor={hf['partial_rotary_factor']} is not supported")
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hf.get("head_dim") not in (None, d // heads) or d % heads:
        raise HFMappingError(f"head_dim={hf.get('head_dim')} is not supported: mathlm needs head_dim = "
                             f"hidden_size / num_attention_heads = {d / heads:g}")
    window, n_pos = hf.get("sliding_window"), int(hf["max_position_embeddings"])
    if family == "mistral" and window and window < n_pos:
        notes.append(f"sliding_window={window}: mathlm attends over the full context, identical to the original "
                     f"only for sequences of at most {window} tokens")
    theta, scaling = _rope_from_hf(hf)
    eos = hf.get("eos_token_id")
    rope = {}
    if scaling is not None:
        rope = {"rope_scaling": "llama3", "rope_factor": float(scaling["factor"]),
                "rope_low_freq_factor": float(scaling["low_freq_factor"]),
                "rope_high_freq_factor": float(scaling["high_freq_factor"]),
                "rope_original_max_len": int(scaling.get("original_max_position_embeddings", n_pos))}
    cfg = ModelConfig(
        vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads), d_ff=int(hf["intermediate_size"]),
        max_seq_len=n_pos, rope_theta=theta, attention_bias=family == "qwen2",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        causal=True, mask_token=False, dtype="float32", **rope)
    try:
        cfg.validate()
    except ValueError as e:
        raise HFMappingError(str(e)) from None
    if isinstance(eos, list) and len(eos) > 1:
        notes.append(f"eos_token_id lists {eos}; mathlm stops at the tokenizer's eos token only")
    return cfg, notes


def config_to_hf(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None, pad_id: int | None) -> dict:
    """ModelConfig -> config.json dict (LlamaForCausalLM, or Qwen2ForCausalLM when q/k/v have biases)."""
    if not cfg.causal:
        raise HFMappingError("a bidirectional (masked diffusion, model.causal=false) model has no Hugging Face "
                             "causal-LM equivalent; only causal models can be exported")
    family = "qwen2" if cfg.attention_bias else "llama"
    # Both spellings of RoPE: rope_theta/rope_scaling for transformers 4.x, rope_parameters for 5.x.
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                        "high_freq_factor": cfg.rope_high_freq_factor,
                        "original_max_position_embeddings": cfg.rope_original_max_len}
        rope_parameters = {**rope_scaling, "rope_theta": cfg.rope_theta}
    hf = {
        "architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if family == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    else:
        hf.update(attention_bias=False, mlp_bias=False)
    return hf


# ----------------------------------------------------------------------------- weights

def params_to_hf(cfg: ModelConfig, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat params -> HF state dict (float32, contiguous). The mask-token embedding row is dropped."""
    out = {}
    for ours, theirs, transpose in weight_pairs(cfg):
        w = np.asarray(flat[ours], np.float32)
        if ours == "embed.embedding":
            w = w[: cfg.vocab_size]
        out[theirs] = np.ascontiguousarray(w.T if transpose else w)
    return out


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
                   shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """HF tensors (name -> array, any float dtype) -> our flat params (float32), checked against `shapes` (our
    flat path -> shape, from the abstract model). Raises HFMappingError naming a missing or misshapen tensor.
    Extra tensors (a tied model's lm_head.weight, old rotary_emb.inv_freq buffers) are ignored."""
    if cfg.mask_token:
        raise HFMappingError("imported models have no mask-token row (model.mask_token must be false)")
    out = {}
    for ours, theirs, transpose in weight_pairs(cfg):
        if theirs not in tensors:
            raise HFMappingError(f"checkpoint lacks tensor {theirs}")
        w = tensors[theirs]
        want = tuple(reversed(shapes[ours])) if transpose else tuple(shapes[ours])
        if tuple(w.shape) != want:
            raise HFMappingError(f"tensor {theirs} has shape {tuple(w.shape)}, expected {want}")
        w = np.asarray(w, np.float32)
        out[ours] = np.ascontiguousarray(w.T if transpose else w)
    return out
