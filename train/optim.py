"""AdamW + warmup/cosine schedule + global-norm clipping, with an optax mask for frozen weights."""
from __future__ import annotations

import re

import jax
import optax

from mathlm.models.sharding import path_str
from mathlm.train.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to lr over `warmup_steps`, then cosine decay to lr * min_lr_ratio at the last step.

    Evaluated at step + 1 so the very first update already moves the weights (lr / warmup_steps).
    """
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)
    return lambda step: base(step + 1)


def trainable_labels(params, patterns: list[str] | None):
    """'train' or 'frozen' per leaf; `patterns` are regexes searched in slash-joined weight paths."""
    if patterns is None:
        return jax.tree.map(lambda _: "train", params)
    compiled = [re.compile(p) for p in patterns]

    def label(path, _):
        p = path_str(path)
        return "train" if any(c.search(p) for c in compiled) else "frozen"

    labels = jax.tree_util.tree_map_with_path(label, params)
    if "train" not in jax.tree.leaves(labels):
        raise ValueError(f"train.trainable={patterns} matches no weight")
    return labels


def make_optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    # Weight decay on matrices only: norms' scales (vectors) are not decayed (nanoGPT/MaxText practice).
    # Deviation: the SMDM reference's AdamW decays every parameter, norm gains included.
    # A callable, because multi_transform hands the inner optimizer a tree with frozen leaves masked out.
    decay_mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)
    adamw = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    # Frozen leaves go through set_to_zero, which keeps no state: no Adam moments for them at all.
    # Note: the clipping norm is then computed over trainable gradients only, as it should be.
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                                 trainable_labels(params, cfg.trainable))
