"""Masked diffusion objectives (SMDM: Nie et al., "Scaling up Masked Diffusion Models on Text", ICLR 2025).

Forward process (§2): x_t keeps each token of x0 with probability 1 - t and replaces it by [MASK] with
probability t, independently. The model (bidirectional) predicts every masked token of x0 from x_t, and
    -log p(x0) <= E_t E_xt [ (1/t) Σ_i 1[x_t^i = MASK] · -log p(x0^i | x_t) ]          (the MDM ELBO, §2)
is trained by Monte Carlo: one t per sequence, one x_t per t. As in the reference code (SMDM `forward_process`),
t is floored at ε: p = (1 - ε)·t + ε, so the 1/p weight stays finite; ε = `train.objective.eps` (1e-3).

The mask id is always `model.cfg.vocab_size` (the model's extra embedding row); the head covers the real
vocabulary only, so [MASK] can never be a prediction, and x0 never holds it, so it is never a target.

Random draws, one micro-batch: `k_ssl, k_len, k_t, k_mask, k_cfg = jax.random.split(rng, 5)` (the tests redo them).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mathlm.train.objectives.base import ObjectiveSpec, add_aux_losses, forward_logprobs, register


def split_keys(rng):
    """The five keys of one micro-batch: SSL gate, SSL length, t, token masks, CFG prompt dropout."""
    return jax.random.split(rng, 5)


def forward_process(k_t, k_mask, x0, maskable, mask_id: int, eps: float):
    """Mask x0: t ~ U(0, 1) per row, p = (1 - eps)·t + eps; each maskable token masked w.p. p.

    Returns x_t, the boolean mask of masked positions and p (B,).
    """
    b = x0.shape[0]
    t = jax.random.uniform(k_t, (b,), jnp.float32)
    p = (1.0 - eps) * t + eps
    masked = (jax.random.uniform(k_mask, x0.shape, jnp.float32) < p[:, None]) & maskable
    return jnp.where(masked, mask_id, x0), masked, p


def ssl_keep(k_ssl, k_len, shape, ratio: float):
    """Stochastic sequence length: with probability `ratio` the whole micro-batch is cropped to ℓ ~ U[1, L].

    Static shapes: positions >= ℓ are kept in the arrays but made absent (see `_elbo`): they leave the loss and
    the normaliser, and move to segment 0, which no position < ℓ attends to. For a bidirectional model with
    per-position RoPE that is exactly the forward pass of the cropped sequence x[:, :ℓ]: every kept position
    sees the same keys (those < ℓ of its document) at the same positions. SMDM crops 1% of its batches
    (`train.objective.ssl_ratio` = 0.01), so that the model also sees sequences shorter than the context.
    """
    b, length = shape
    crop = jax.random.uniform(k_ssl, ()) < ratio
    ell = jax.random.randint(k_len, (), 1, length + 1)
    keep = jnp.arange(length) < jnp.where(crop, ell, length)
    return jnp.broadcast_to(keep, shape)


def _elbo(model, x0, xt, masked, p, positions, segment_ids, denom):
    """Σ over masked tokens of CE(x0 | x_t) / p, with the logging sums next to it."""
    logp, hit, aux, _ = forward_logprobs(model, xt, x0, positions, segment_ids)
    nll = -logp
    w = masked.astype(jnp.float32)
    weighted = jnp.sum(nll * w / p[:, None])
    correct = jnp.sum(hit * w)
    loss_sum = add_aux_losses(weighted, aux, denom)
    return loss_sum, {"denom": denom, "nll_sum": weighted, "correct_sum": correct, "aux_loss": aux * denom,
                      # unweighted CE over the masked tokens and their count (logged as masked_ce, accuracy)
                      "masked_nll_sum": jnp.sum(nll * w), "masked_tokens": jnp.sum(w)}


def mdm_loss(model, batch, rng, *, eps: float = 1e-3, ssl_ratio: float = 0.0):
    """Unconditional MDM pretraining on packed windows.

    x0 is the window itself (`inputs`, no shift). Normaliser: all present tokens (segment_ids > 0, and < ℓ under
    SSL), i.e. B·L for full packed windows, as SMDM divides by B·L; never the masked count (that would reweight
    the ELBO by 1/(t·L) per sequence).
    Deviation: our windows pack several documents and `segment_ids` keep attention inside each document; the
    reference trains on plain 2048-token chunks that attend across document boundaries.
    Deviation (gradient accumulation): the trainer adds the loss sums and normalisers of its micro-batches and
    divides once, so an SSL-cropped micro-batch weighs by its (smaller) token count; the reference averages each
    micro-batch's own mean. Without a crop every micro-batch has B·L tokens and the two are identical.
    """
    k_ssl, k_len, k_t, k_mask, _ = split_keys(rng)
    x0 = batch["inputs"]
    present = (batch["segment_ids"] > 0) & ssl_keep(k_ssl, k_len, x0.shape, ssl_ratio)
    segment_ids = jnp.where(present, batch["segment_ids"], 0)
    xt, masked, p = forward_process(k_t, k_mask, x0, present, model.cfg.vocab_size, eps)
    denom = jnp.sum(present.astype(jnp.float32))
    return _elbo(model, x0, xt, masked, p, batch["positions"], segment_ids, denom)


def mdm_sft_loss(model, batch, rng, *, eps: float = 1e-3, cfg_drop: float = 0.0):
    """Conditional MDM fine-tuning of p(response | prompt) on `sft` rows padded with EOS (data.sft_pad).

    Row = [bos, prompt, response, eos, eos, ...]: the EOS padding is part of x0 and a target, as in SMDM (the
    model learns where the response ends), so the whole row is one sequence (segment 1). Prompt tokens are
    never masked and never scored; each response/padding token is masked w.p. p, loss CE/p; normaliser
    B·L − Σ prompt lengths (the scored positions).
    `cfg_drop` (standard classifier-free guidance training): with that probability per row the whole prompt span,
    bos included, becomes [MASK] tokens — the unconditional input a CFG sampler builds. 0 = SMDM's default,
    unsupervised CFG (the pretrained MDM serves as the unconditional model).
    """
    _, _, k_t, k_mask, k_cfg = split_keys(rng)
    x0 = batch["inputs"]
    mask_id = model.cfg.vocab_size
    prompt = batch["prompt_mask"] > 0
    response = ~prompt
    xt, masked, p = forward_process(k_t, k_mask, x0, response, mask_id, eps)
    drop = jax.random.uniform(k_cfg, (x0.shape[0],)) < cfg_drop
    xt = jnp.where(prompt & drop[:, None], mask_id, xt)
    denom = jnp.sum(response.astype(jnp.float32))
    return _elbo(model, x0, xt, masked, p, batch["positions"], jnp.ones_like(batch["segment_ids"]), denom)


# Held-out loss: the same ELBO with a fixed key per batch (no SSL), so eval/loss is a deterministic upper bound
# on the per-token NLL (nats), comparable across steps and to an ARM's eval/loss. bpb counts the scored tokens.

def _elbo_eval(loss_fn, scored):
    def ev(model, batch, byte_table, frozen=None):
        key = jax.random.fold_in(jax.random.key(0), jnp.sum(batch["inputs"]))
        loss_sum, m = loss_fn(model, batch, key)
        return {"nll": loss_sum, "tokens": m["denom"],
                "bytes": jnp.sum(byte_table[batch["inputs"]] * scored(batch).astype(jnp.float32))}

    return ev


@dataclasses.dataclass(frozen=True)
class MDMConfig:
    name: str = "mdm"
    eps: float = 1e-3  # mask probability p = (1 - eps)·t + eps, t ~ U(0, 1) (SMDM)
    ssl_ratio: float = 0.01  # probability that a micro-batch is cropped to a random length U[1, seq_len]


@dataclasses.dataclass(frozen=True)
class MDMSFTConfig:
    name: str = "mdm_sft"
    eps: float = 1e-3
    cfg_drop: float = 0.0  # per-row probability of masking the whole prompt (standard CFG training)


def _summary(m: dict) -> dict:
    """Masked diffusion scores only its masked tokens: accuracy and the unweighted CE are over those."""
    scored = max(float(m["masked_tokens"]), 1.0)
    return {"masked_tokens": float(m["masked_tokens"]), "accuracy": float(m["correct_sum"]) / scored,
            "masked_ce": float(m["masked_nll_sum"]) / scored}


def _checks(section, cfg) -> list[tuple[bool, str]]:
    m, key = cfg.model, "train.objective"
    # eps > 0 keeps every mask probability, and so the 1/p loss weight, away from 0.
    checks = [(0 < section.eps < 1, f"{key}.eps must be in (0, 1), got {section.eps}"),
              (m.mask_token,
               f"train.objective={section.name} needs a bidirectional model with a mask token "
               f"(model.causal=false, model.mask_token=true)")]
    if isinstance(section, MDMConfig):
        checks.append((0 <= section.ssl_ratio <= 1, f"{key}.ssl_ratio must be in [0, 1], got {section.ssl_ratio}"))
    else:
        checks += [(0 <= section.cfg_drop <= 1, f"{key}.cfg_drop must be in [0, 1], got {section.cfg_drop}"),
                   (cfg.data.sft_pad != "pad",
                    "train.objective=mdm_sft trains on EOS padding: set data.sft_pad to eos or auto")]
    return checks


# The SMDM paper's optimisation defaults: lr 2e-4 (-> 2e-5 cosine, TrainConfig.min_lr_ratio) with 1% warmup.
_DIFFUSION = dict(model_kind="mdm", validate=_checks, default_lr=2e-4,
                  default_warmup=lambda steps: max(1, int(0.01 * steps)), summarize=_summary,
                  metric_names=("masked_tokens", "accuracy", "masked_ce"),
                  eval_label="Monte-Carlo ELBO, upper bounds")

register(ObjectiveSpec(
    "mdm", MDMConfig, auto_for=(("mdm", "lm"),), batch_fields=("inputs", "positions", "segment_ids"),
    make_loss=lambda s: lambda model, batch, rng, frozen=None: mdm_loss(model, batch, rng, eps=s.eps,
                                                                         ssl_ratio=s.ssl_ratio),
    make_eval=lambda s: _elbo_eval(lambda m, b, k: mdm_loss(m, b, k, eps=s.eps, ssl_ratio=0.0),
                                   lambda b: b["segment_ids"] > 0),
    **_DIFFUSION))
# SMDM pads SFT rows with EOS, a target of mdm_sft (the model learns where the response ends).
register(ObjectiveSpec(
    "mdm_sft", MDMSFTConfig, auto_for=(("mdm", "sft"),), data_formats=("sft",), sft_pad="eos",
    batch_fields=("inputs", "positions", "segment_ids", "prompt_mask"),
    make_loss=lambda s: lambda model, batch, rng, frozen=None: mdm_sft_loss(model, batch, rng, eps=s.eps,
                                                                             cfg_drop=s.cfg_drop),
    make_eval=lambda s: _elbo_eval(lambda m, b, k: mdm_sft_loss(m, b, k, eps=s.eps),
                                   lambda b: b["prompt_mask"] == 0),
    **_DIFFUSION))
