"""Next-token objectives for autoregressive (causal) models: `causal_lm` on packed documents, `sft` on pairs."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mathlm.train.objectives.base import (
    ObjectiveSpec,
    add_aux_losses,
    diagnostics_metrics,
    forward_logprobs,
    register,
)


def masked_lm(model, batch):
    """Σ next-token NLL over `loss_mask`, normalised by the loss-token count."""
    logp, hit, aux, diag = forward_logprobs(model, batch["inputs"], batch["targets"], batch["positions"],
                                            batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    nll = -logp * mask
    denom = jnp.sum(mask)
    correct = jnp.sum(hit * mask)
    loss_sum = add_aux_losses(jnp.sum(nll), aux, denom)
    return loss_sum, {"denom": denom, "nll_sum": jnp.sum(nll), "correct_sum": correct, "aux_loss": aux * denom,
            **diagnostics_metrics(diag, denom)}


def causal_lm(model, batch, rng=None, frozen=None):
    """Next-token cross-entropy on packed documents; `loss_mask` drops targets across document boundaries."""
    return masked_lm(model, batch)


def sft(model, batch, rng=None, frozen=None):
    """Supervised fine-tuning: the pipeline's loss_mask covers the response (and eos) only, never the prompt."""
    return masked_lm(model, batch)


@dataclasses.dataclass(frozen=True)
class CausalLMConfig:
    name: str = "causal_lm"


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    name: str = "sft"


# nanoGPT-like defaults: lr 3e-4 with 100 warmup steps (TrainConfig.lr / warmup_steps left unset).
register(ObjectiveSpec("causal_lm", CausalLMConfig, lambda section: causal_lm, model_kind="arm",
                       auto_for=(("arm", "lm"), ("arm", "sft"))))
register(ObjectiveSpec("sft", SFTConfig, lambda section: sft, model_kind="arm"))
