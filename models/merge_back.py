"""Merge-back of a concat expansion into a plain model (`ModelExpander.merge_layers_concat`,
`WeightMerger.merge_weights`): an optional, approximate export, not part of the method.

A weight-space interpolation of a nonlinear block is not the output-space interpolation that was trained, so the
merged model is measured against the unmerged one (train/expansion.py reports the deltas). Only concat with lerp,
slerp, dlerp or dlerpin is supported: the reference's stack merge-back averages a residual block into its
predecessor (destroying the function) and its hybrid merge-back is broken.
"""
from __future__ import annotations

import numpy as np

from mathlm.models.expand import ExpandError, ExpandOptions, layout

MERGEABLE = ("lerp", "slerp", "dlerp", "dlerpin")


def check_mergeable(opts: ExpandOptions) -> None:
    if opts.type != "concat":
        raise ExpandError(f"merge-back supports concat expansions only, not {opts.type} (the reference's stack "
                          "merge-back destroys the function and its hybrid one is broken)")
    if opts.merge not in MERGEABLE:
        raise ExpandError(f"merge-back supports merges {', '.join(MERGEABLE)}, not {opts.merge}")
    if opts.norm_alpha != 0:
        raise ExpandError("merge-back of copies with relaxed norms (expand.norm_alpha != 0) is not supported")


def lerp_weights(w_pre: np.ndarray, w_exp: np.ndarray, a: float) -> np.ndarray:
    """'lerp': (1 - a) W_pre + a W_exp in float32."""
    return ((1 - a) * w_pre.astype(np.float32) + a * w_exp.astype(np.float32)).astype(np.float32)


def slerp_weights(w_pre: np.ndarray, w_exp: np.ndarray, a: float) -> np.ndarray:
    """Per-row SLERP along torch's last dimension (the input axis of `Linear.weight`), which for a Flax
    (in, out) kernel is axis 0; a 1-D vector (a norm scale) is one row. The clamp and the 1e-6 in the
    denominator scale identical rows by ~0.99929, as in the reference."""
    p, e = w_pre.astype(np.float64), w_exp.astype(np.float64)
    axis = 0
    norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)
    c = np.clip(np.sum(norm(p) * norm(e), axis=axis, keepdims=True), -1 + 1e-6, 1 - 1e-6)
    theta = np.arccos(c)
    s = np.sin(theta) + 1e-6
    return (np.sin((1 - a) * theta) / s * p + np.sin(a * theta) / s * e).astype(np.float32)


def merge_weights(kind: str, w_pre: np.ndarray, w_exp: np.ndarray, a: float) -> np.ndarray:
    return lerp_weights(w_pre, w_exp, a) if kind == "lerp" else slerp_weights(w_pre, w_exp, a)


def _sigmoid(x: float) -> float:
    return float(1 / (1 + np.exp(-x)))


def site_weight(site: dict, opts: ExpandOptions, eval_gate: float | None) -> float:
    """The interpolation weight a of one site: the eval running-mean gate when the run has one, else sigma(f)
    (for dlerp/dlerpin sigma(b), w ignored, as the reference's `interpolation_factor` property)."""
    if eval_gate is not None:
        return float(eval_gate)
    if opts.gate_init is None:
        return 1.0
    f = site["interp_b"] if opts.merge in ("dlerp", "dlerpin") else site["interpolation_factor"]
    return _sigmoid(float(np.asarray(f).reshape(-1)[0]))


def _merge_tree(kind: str, pre, exp, a: float):
    if isinstance(pre, dict):
        return {k: _merge_tree(kind, pre[k], exp[k], a) for k in pre}
    return merge_weights(kind, np.asarray(pre), np.asarray(exp), a)


def merged_params(params: dict, n_layers: int, opts: ExpandOptions, eval_gates: dict[int, float]) -> tuple[dict, dict]:
    """(plain params, {block index: a used}) from an expanded concat model's params (numpy leaves)."""
    check_mergeable(opts)
    out = {k: v for k, v in params.items() if k != "blocks"}
    blocks, used = {}, {}
    for j, (role, _) in enumerate(layout(n_layers, opts)):
        blk = params["blocks"][j]
        if role == "site":
            a = site_weight(blk, opts, eval_gates.get(j))
            blocks[j] = _merge_tree(opts.merge, blk["pretrained"], blk["expanded"], a)
            used[j] = a
        else:
            blocks[j] = blk
    out["blocks"] = blocks
    return out, used
