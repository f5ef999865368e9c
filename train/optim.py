"""AdamW + warmup/cosine schedule + global-norm clipping, over the trainable weights."""
from __future__ import annotations

import jax
import optax

from mathlm.train.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from warmup_from to lr over `warmup_steps`, then cosine decay to lr * min_lr_ratio at
    `horizon_steps` (default: the last step), flat after it.

    Evaluated at step + 1 so the very first update already moves the weights (lr / warmup_steps).
    # deviation from ControlLLM (`WarmupCosineAnnealingLR`): its first update uses exactly eta_min.
    """
    horizon = cfg.horizon_steps or cfg.steps
    warmup = min(cfg.warmup_steps, max(horizon - 1, 0))
    base = optax.warmup_cosine_decay_schedule(
        init_value=cfg.warmup_from, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(horizon, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)
    return lambda step: base(step + 1)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optimizer of the trainable weights. Frozen weights never reach it (the trainer splits them off before
    differentiating), so they have no gradient, no Adam moments, and no part in the clipping norm."""
    schedule = lr_schedule(cfg)
    if cfg.weight_decay_lr_ratio is not None:
        # Control-LLM resets every group's weight_decay to ratio * lr after each step (`update_weigth_decay`):
        # decoupled decay lr(t) * ratio * lr(t) * p on every parameter (no groups), effectively none at lr 5e-5.
        wd = lambda count: cfg.weight_decay_lr_ratio * schedule(count)
        return optax.chain(
            optax.clip_by_global_norm(cfg.clip_norm),
            optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.add_decayed_weights(wd),
            optax.scale_by_learning_rate(schedule),
        )
    # Weight decay on matrices only: norms' scales (vectors) are not decayed (nanoGPT/MaxText practice).
    # Deviation: the SMDM reference's AdamW decays every parameter, norm gains included.
    decay_mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
