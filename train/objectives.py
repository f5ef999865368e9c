"""Objectives: small pure loss functions over a batch. The trainer does not know which one it runs.

Contract: `objective(model, batch, rng, frozen) -> (loss_sum, metrics)`
  - `model`: the NNX module with the trainable + frozen weights merged in;
  - `batch`: dict of (B, L) arrays (see mathlm.data.pipeline);
  - `rng`: a PRNG key for stochastic objectives (diffusion masking), distinct per micro-batch and step;
  - `frozen`: extra parameter sets (e.g. a DPO reference model), a pytree, possibly empty;
  - returns the *sum* of the loss over the batch and `metrics`, which must hold `denom`, the normaliser of that
    sum (e.g. the number of loss tokens). The trainer divides Σ loss_sum by Σ denom over all micro-batches, so k
    micro-batches give exactly the gradient of one k-times larger batch. Other metrics are sums, divided by denom
    for logging.
Objectives with hyperparameters (the masked-diffusion ones, train/diffusion_objectives.py) register a factory
`make(train_cfg) -> objective`; `get_objective(name, train_cfg)` builds them, so the trainer still only passes a name.
Auxiliary losses a model sows as `nnx.Intermediate` under the name `aux_loss` (Control-LLM divergence) are mean
values; objectives call the model through `forward`, which captures them (`nnx.capture`), and `add_aux_losses`
folds them in with the same normaliser.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
OBJECTIVES: dict[str, Objective] = {}
FACTORIES: dict[str, Callable[..., Objective]] = {}  # name -> make(train_cfg) -> objective
# name -> make(train_cfg) -> eval(model, batch, byte_table) -> {nll, tokens, bytes} sums, for objectives whose
# held-out loss is not next-token NLL (the trainer's default eval); masked diffusion reports its ELBO.
EVALS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn: Objective) -> Objective:
        OBJECTIVES[name] = fn
        return fn

    return deco


def register_factory(name: str):
    def deco(make):
        FACTORIES[name] = make
        return make

    return deco


def register_eval(name: str):
    def deco(make):
        EVALS[name] = make
        return make

    return deco


def get_eval(name: str, train_cfg=None):
    """The held-out metric function of objective `name`, or None for the default next-token NLL."""
    import mathlm.train.diffusion_objectives  # noqa: F401
    return EVALS[name](train_cfg) if name in EVALS else None


def get_objective(name: str, train_cfg=None) -> Objective:
    """The objective `name`; factories read their hyperparameters from `train_cfg` (None = their defaults)."""
    import mathlm.train.diffusion_objectives  # noqa: F401  (registers mdm, mdm_sft; imported late: it imports us)
    if name in FACTORIES:
        return FACTORIES[name](train_cfg)
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from {sorted({*OBJECTIVES, *FACTORIES})}")
    return OBJECTIVES[name]


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in float32, (B, L)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def forward(model: nnx.Module, *args) -> tuple[jax.Array, jax.Array]:
    """Run the model, capturing what it sows: (logits, Σ of every `aux_loss`, a float32 scalar)."""
    logits, sown = nnx.capture(model, nnx.Intermediate)(*args)
    values = [v for path, v in jax.tree_util.tree_leaves_with_path(sown)
              if any(getattr(k, "key", None) == "aux_loss" for k in path)]
    return logits, sum((jnp.sum(jnp.asarray(v, jnp.float32)) for v in values), jnp.zeros((), jnp.float32))


def add_aux_losses(loss_sum: jax.Array, aux: jax.Array, denom: jax.Array) -> jax.Array:
    """A summed loss plus the (mean) auxiliary losses scaled by the same normaliser."""
    return loss_sum + aux * denom


def _masked_lm(model, batch):
    logits, aux = forward(model, batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    nll = token_nll(logits, batch["targets"]) * mask
    denom = jnp.sum(mask)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * mask)
    loss_sum = add_aux_losses(jnp.sum(nll), aux, denom)
    return loss_sum, {"denom": denom, "nll_sum": jnp.sum(nll), "correct_sum": correct, "aux_loss": aux * denom}


@register("causal_lm")
def causal_lm(model, batch, rng=None, frozen=None):
    """Next-token cross-entropy on packed documents; `loss_mask` drops targets across document boundaries."""
    return _masked_lm(model, batch)


@register("sft")
def sft(model, batch, rng=None, frozen=None):
    """Supervised fine-tuning: the pipeline's loss_mask covers the response (and eos) only, never the prompt."""
    return _masked_lm(model, batch)
