"""Control-LLM merge layers and divergence losses as pure functions (linkedin/ControlLLM `model_expander.py`).

A merge site runs the frozen pretrained block and its trainable expanded copy on the same input h_in and
interpolates their post-residual outputs h_pre, h_exp (B, T, D). Each function follows the reference class named
in its docstring, quirks included; every deliberate deviation says so (`# deviation from ControlLLM: ...`) and is
listed in docs/control-llm.md. Shapes: B batch, T sequence, D hidden, H heads.

Nothing here stops gradients: like the reference (`MergeLayer.forward`), gradients reach h_pre through the
output's (1 - a) factor, the divergence and dlerp's gate features, and from h_pre flow on into h_in and every
earlier expanded block. "Frozen" means no parameter update, never a cut activation gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

MERGES = ("lerp", "slerp", "dlerp", "dlerpin", "moe", "proj", "prog")
DIVERGENCES = ("cosine", "mse", "dot", "dot_magnitude", "attention")


def _lerp(h_pre, h_exp, a):
    return h_pre + a * (h_exp - h_pre)  # torch.lerp


def _slerp(h_pre, h_exp, a):
    """`MergeLayerSlerp`: spherical interpolation in float32 with the reference's batch-global lerp fallback."""
    dtype = h_pre.dtype
    p, e = h_pre.astype(jnp.float32), h_exp.astype(jnp.float32)
    norm = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
    c = jnp.clip(jnp.sum(norm(p) * norm(e), -1, keepdims=True), -1.0, 1.0)

    def spherical(_):
        theta = jnp.arccos(c)
        s = jnp.maximum(jnp.sqrt(1.0 - c * c + 1e-8), 1e-6)
        return jnp.sin((1 - a) * theta) / s * p + jnp.sin(a * theta) / s * e

    # `(theta < 1e-4).any()` over the whole batch tensor: one aligned token switches every token to lerp. lax.cond
    # runs one branch only, as the reference's Python `if`, and theta is formed inside the spherical branch (the
    # test itself carries no gradient), so arccos' infinite slope at c = 1 never meets a zero cotangent (0 * inf).
    aligned = jnp.any(jnp.arccos(lax.stop_gradient(c)) < 1e-4)
    out = lax.cond(aligned, lambda _: (1 - a) * p + a * e, spherical, None)
    return out.astype(dtype)


def merge(kind: str, gate: dict, h_in, h_pre, h_exp, gate_is_one: bool = False):
    """(out, a, p_h_pre): the merged hidden states, the gate a (a scalar, or (B, T, 1) per token; moe: p1) and the
    h_pre the divergence compares (P h_pre for proj, h_pre otherwise). `gate` holds this site's gate weights:
    factor (1,) f; w (2D,) or (D,) and b (1,) for dlerp/dlerpin; router (2, D) and bias (2,) for moe;
    proj (D, D) for proj/prog, in torch's (out, in) layout: "P h" is h @ P^T."""
    if kind in ("lerp", "slerp", "proj", "prog"):
        # lerp with gate_init null: the reference's `interpolation_factor=None`, a = 1 (out = h_exp).
        a = jnp.ones((), jnp.float32) if gate_is_one else jax.nn.sigmoid(gate["factor"][0])
        if kind == "slerp":
            return _slerp(h_pre, h_exp, a), a, h_pre
        if kind == "proj":  # `MergeLayerProj`: P enters only the divergence, never the output
            return _lerp(h_pre, h_exp, a.astype(h_pre.dtype)), a, _project(h_pre, gate["proj"])
        if kind == "prog":  # `MergeLayerProg`: a lateral connection on the pretrained branch; divergence unprojected
            p = _project(h_pre, gate["proj"])
            return ((1 - a) * p + a * h_exp).astype(h_pre.dtype), a, h_pre
        return _lerp(h_pre, h_exp, a.astype(h_pre.dtype)), a, h_pre
    if kind in ("dlerp", "dlerpin"):
        # `MergeLayerDlerp`: features [h_pre ; h_exp] (h_pre's half first); `MergeLayerDlerpIn`: h_in.
        feats = jnp.concatenate([h_pre, h_exp], -1) if kind == "dlerp" else h_in
        a = jax.nn.sigmoid(feats.astype(jnp.float32) @ gate["w"].astype(jnp.float32) + gate["b"][0])[..., None]
        return ((1 - a) * h_pre + a * h_exp).astype(h_pre.dtype), a, h_pre
    if kind == "moe":
        # `MergeLayerMoE`: hard top-1 routing; the router sees no gradient from the output (argmax).
        p = _router_probs(gate, h_in)
        to_exp = (jnp.argmax(p, -1) == 1)[..., None]
        return jnp.where(to_exp, h_exp, h_pre), p[..., 1:2] * to_exp, h_pre
    raise ValueError(f"unknown merge {kind!r}; choose from {', '.join(MERGES)}")


def _router_probs(gate: dict, h_in):
    return jax.nn.softmax(h_in.astype(jnp.float32) @ gate["router"].T.astype(jnp.float32) + gate["bias"], -1)


def moe_routed(gate: dict, h_in):
    """(B, T, 1) True where moe routes the token to the expanded block (m_t = [argmax p = 1])."""
    return (jnp.argmax(_router_probs(gate, h_in), -1) == 1)[..., None]


def gate_mean(kind: str, gate: dict, h_in, a):
    """The batch-mean gate the reference averages in eval (`avg_interp_weight`): sigma(f), mean a, or mean p1."""
    if kind == "moe":
        return jnp.mean(_router_probs(gate, h_in)[..., 1])
    return jnp.mean(jnp.asarray(a, jnp.float32))


def _project(h, p):
    return (h.astype(jnp.float32) @ p.T.astype(jnp.float32)).astype(h.dtype)


def _cos(x, y, eps: float = 1e-8):
    """F.cosine_similarity: x.y / max(|x| |y|, eps), over the last axis."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    return jnp.sum(x * y, -1) / jnp.maximum(jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1), eps)


def cosine_similarity(h_pre, h_exp):
    return _cos(h_pre, h_exp)


def _smooth_l1(r):
    return jnp.where(r < 1.0, 0.5 * r * r, r - 0.5)  # smooth_l1_loss(r, 0, beta=1)


def token_divergence(kind: str, h_pre, h_exp):
    """Per-token divergence d (B, T) (`compute_divergence_loss`), for every kind but attention.
    # deviation from ControlLLM: the cosine is taken in float32 (the reference computes it in the hidden states'
    # own dtype, bf16 in its recipes); identical in float32 runs."""
    if kind in ("cosine", "dot", "dot_magnitude"):
        d = _smooth_l1(jnp.maximum(0.0, 1.0 - _cos(h_pre, h_exp)))  # margin 0: no caller passes another
        if kind == "dot":
            # The reference's magnitude term compares h_pre with itself (its helper returns h_pre twice), so its
            # `dot` is exactly half the cosine loss; reproduced.
            return 0.5 * d
        if kind == "dot_magnitude":
            # deviation from ControlLLM: the intended 0.5 cosine + 0.5 (|h_pre| - |h_exp|)^2; used by no recipe.
            norm = lambda h: jnp.linalg.norm(h.astype(jnp.float32), axis=-1)
            n = norm(h_pre) - norm(h_exp)
            return 0.5 * d + 0.5 * n * n
        return d
    if kind == "mse":
        diff = h_exp.astype(jnp.float32) - h_pre.astype(jnp.float32)
        return jnp.mean(diff * diff, -1)
    raise ValueError(f"unknown divergence {kind!r}; choose from {', '.join(DIVERGENCES)}")


def attention_divergence(probs_pre, probs_exp):
    """Elementwise KL(A_exp || A_pre) over (B, H, T, S) attention probabilities (the `attention` loss)."""
    p, e = probs_pre.astype(jnp.float32), probs_exp.astype(jnp.float32)
    return e * (jnp.log(e + 1e-8) - jnp.log(p + 1e-8))


def site_loss(kind: str, alpha: float, a, h_pre, h_exp, probs=None):
    """L_site = mean over all positions (padding and prompt included, no mask) of alpha_t * d_t.

    alpha 0 computes nothing; alpha -1 uses the gate itself, not detached, so the term also trains the gate
    (sigma(f); a_t for dlerp/dlerpin; p1_t * m_t for moe, whose inputs first go through `moe_inputs`).
    probs: (pre, exp) attention probabilities (B, H, T, S) for the attention loss."""
    if alpha == 0:
        return jnp.zeros((), jnp.float32)
    weight = jnp.asarray(a, jnp.float32) if alpha == -1 else jnp.float32(alpha)
    if kind == "attention":
        d = attention_divergence(*probs)  # (B, H, T, S)
        w = weight[:, None, :, :] if weight.ndim == 3 else weight  # (B, T, 1) -> (B, 1, T, 1)
        return jnp.mean(w * d)
    d = token_divergence(kind, h_pre, h_exp)
    w = weight[..., 0] if weight.ndim == 3 else weight
    return jnp.mean(w * d)


def moe_inputs(h_pre, h_exp, routed):
    """moe divergence inputs: where the token went to the pretrained block, both become 0.01 * ones."""
    fill = jnp.full_like(h_pre, 0.01)
    return jnp.where(routed, h_pre, fill), jnp.where(routed, h_exp, fill)
