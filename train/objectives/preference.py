"""Preference optimisation on (prompt, chosen, rejected) pairs: `dpo` (Rafailov et al. 2023) and `orpo` (Hong et
al. 2024), for Stage II of the weak-to-strong recipe (issue 14; ../shared/research/w2s.md §3.6).

Data: `data.format: pref`, batches (B, 2, L) with row 0 the chosen and row 1 the rejected side (data/pipeline.py
PairRows). Both objectives fold the pair axis into the batch, one forward pass over the 2B rows, and score a side y
by its response tokens: the pipeline's loss_mask covers the response and its eos, never the prompt or padding, and
the targets are the inputs shifted by one. The unit of normalisation is the pair: loss_sum = Σ over pairs and
denom = the number of pairs, so gradient accumulation divides by the total pairs, not tokens. Dropout is off in
both (the reference disables it; our model has none).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from mathlm.models import lora, variants
from mathlm.train.objectives.base import ObjectiveSpec, add_aux_losses, forward_logprobs, register

LN2 = math.log(2.0)
ELL_MAX = -1e-6  # ORPO's mean token log-prob is clipped to <= this (see log_odds)
REFERENCES = ("auto", "adapters", "copy")
SIDE_FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def sequence_logps(model, batch):
    """(S, n, aux): S (B, 2) = Σ_{t∈resp} log p(y_t | x, y_<t) in float32 for [chosen, rejected], n (B, 2) the
    response token counts, aux the (mean) auxiliary loss the model sowed."""
    b, r, length = batch["inputs"].shape
    rows = lambda k: batch[k].reshape(b * r, length)  # pair i -> rows 2i (chosen), 2i + 1 (rejected)
    logp, _, aux, _ = forward_logprobs(model, rows("inputs"), rows("targets"), rows("positions"),
                                       rows("segment_ids"))
    mask = rows("loss_mask").astype(jnp.float32)
    logp = logp * mask
    return jnp.sum(logp, -1).reshape(b, r), jnp.sum(mask, -1).reshape(b, r), aux


def _has_adapters(model) -> bool:
    return any(isinstance(m, lora.LoraLinear) for _, m in nnx.iter_modules(model))


def reference_logps(model, batch, frozen, mode: str):
    """S_ref (B, 2) under stop_gradient. `copy`: the frozen set "reference" (a copy of the initial model);
    `adapters`: this model with its LoRA adapters disabled, i.e. exactly the base they sit on."""
    if mode == "copy":
        if "reference" not in (frozen or {}):
            raise ValueError("DPO with reference: copy needs the frozen parameter set 'reference'")
        s = sequence_logps(nnx.merge(nnx.graphdef(model), frozen["reference"]), batch)[0]
    else:
        if not _has_adapters(model):
            raise ValueError("DPO with neither LoRA nor a reference: the model has no adapters to disable")
        with lora.adapters_disabled(model):
            s = sequence_logps(model, batch)[0]
    return jax.lax.stop_gradient(s)


def dpo_loss(model, batch, frozen, *, beta: float = 0.1, label_smoothing: float = 0.0, reference: str = "auto"):
    """TRL DPOTrainer's sigmoid loss per pair, −log σ(z) = softplus(−z) with z = β·[(S_θ − S_ref)(y_w) −
    (S_θ − S_ref)(y_l)]; label smoothing ε (cDPO, as TRL's sigmoid) gives (1 − ε)·softplus(−z) + ε·softplus(z).
    `reference: auto` uses the frozen set when the run has one, else the adapters."""
    if reference == "auto":
        reference = "copy" if "reference" in (frozen or {}) else "adapters"
    s, _, aux = sequence_logps(model, batch)
    rewards = beta * (s - reference_logps(model, batch, frozen, reference))  # implicit rewards β·log π_θ/π_ref
    z = rewards[:, 0] - rewards[:, 1]
    per_pair = (1.0 - label_smoothing) * jax.nn.softplus(-z) + label_smoothing * jax.nn.softplus(z)
    pairs = jnp.asarray(z.shape[0], jnp.float32)
    return add_aux_losses(jnp.sum(per_pair), aux, pairs), {
        "denom": pairs, "rewards/chosen": jnp.sum(rewards[:, 0]), "rewards/rejected": jnp.sum(rewards[:, 1]),
        "rewards/accuracy": jnp.sum((z > 0).astype(jnp.float32)), "rewards/margin": jnp.sum(z),
        "logps/chosen": jnp.sum(s[:, 0]), "logps/rejected": jnp.sum(s[:, 1])}


def log1mexp(x):
    """log(1 − eˣ) for x < 0, accurate at both ends (TRL's fix for the NaNs of plain log1p(−eˣ) as x → 0):
    log(−expm1 x) for x > −ln 2, log1p(−eˣ) below. Each branch gets an input inside its own domain, so the
    branch jnp.where discards has a finite gradient too."""
    near = x > -LN2
    a = jnp.log(-jnp.expm1(jnp.where(near, x, -LN2)))
    b = jnp.log1p(-jnp.exp(jnp.where(near, -LN2, x)))
    return jnp.where(near, a, b)


def log_odds(ell):
    """log(p / (1 − p)) of a mean token log-prob ℓ = log p. ℓ is clipped to ≤ −1e−6 first: at ℓ = 0 (every
    response token certain) log(1 − e^ℓ) is −inf; above the clip the odds are constant and the gradient is 0."""
    ell = jnp.minimum(ell, ELL_MAX)
    return ell - log1mexp(ell)


def orpo_loss(model, batch, *, lam: float = 0.1):
    """LLaMA-Factory v0.6.2 CustomORPOTrainer (the form the reference trained with), per pair
    −ℓ(y_w) + λ·softplus(−(log odds(y_w) − log odds(y_l))), ℓ(y) = (1/|resp|)·Σ_{t∈resp} log p, the mean over
    the response tokens (eos included). No reference model.
    Deviation from TRL's ORPOTrainer: its NLL term is a token-mean cross-entropy over the prompt and the response
    of the chosen sequences; ours (LLaMA-Factory's) is the chosen response's mean-token NLL, per pair."""
    s, n, aux = sequence_logps(model, batch)
    ell = s / jnp.maximum(n, 1.0)  # a side truncated to no response tokens scores 0 (then the clip)
    ratio = log_odds(ell[:, 0]) - log_odds(ell[:, 1])
    or_loss = jax.nn.softplus(-ratio)
    nll = -ell[:, 0]  # unclipped: its gradient is the plain SFT gradient
    pairs = jnp.asarray(ell.shape[0], jnp.float32)
    rewards = lam * ell  # LLaMA-Factory's logged rewards: λ·ℓ
    return add_aux_losses(jnp.sum(nll + lam * or_loss), aux, pairs), {
        "denom": pairs, "nll": jnp.sum(nll), "or_loss": jnp.sum(or_loss), "log_odds_ratio": jnp.sum(ratio),
        "rewards/chosen": jnp.sum(rewards[:, 0]), "rewards/rejected": jnp.sum(rewards[:, 1]),
        "rewards/accuracy": jnp.sum((rewards[:, 0] > rewards[:, 1]).astype(jnp.float32)),
        "rewards/margin": jnp.sum(rewards[:, 0] - rewards[:, 1]),
        "logps/chosen": jnp.sum(ell[:, 0]), "logps/rejected": jnp.sum(ell[:, 1])}


def chosen_nll(model, batch, byte_table, frozen=None):
    """Held-out figures of a preference set: the chosen responses' summed token NLL over their tokens and target
    bytes (eval/loss, ppl and bpb), so a run shows how likely its preferred answers stay. One forward of B rows."""
    side = {k: batch[k][:, 0] for k in SIDE_FIELDS}
    logp, _, _, _ = forward_logprobs(model, side["inputs"], side["targets"], side["positions"], side["segment_ids"])
    mask = side["loss_mask"].astype(jnp.float32)
    return {"nll": -jnp.sum(logp * mask), "tokens": jnp.sum(mask),
            "bytes": jnp.sum(byte_table[side["targets"]] * mask)}


def initial_loss(run_dir) -> float:
    """The loss of a fresh DPO run's first step, i.e. of its initial policy (the loop checks it is log 2 and
    writes it as metrics.jsonl's step-0 row, {"step": 0, "start_loss": ...})."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in open(path)] if path.is_file() else []
    for row in rows:
        if "start_loss" in row:
            return float(row["start_loss"])
    raise ValueError(f"{run_dir}: no step-0 loss recorded (not a fresh dpo run)")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    name: str = "dpo"
    beta: float = 0.1  # β (TRL / LLaMA-Factory dpo_beta default)
    label_smoothing: float = 0.0  # ε of TRL's sigmoid loss (cDPO); 0 = plain DPO, the recipe's
    # The reference policy: `adapters` = this LoRA model with its adapters disabled (the base they sit on; the
    # recipe merges the SFT adapter first, so that base is M_plus); `copy` = a frozen copy of the initial model
    # (full fine-tuning); `auto` = adapters for a LoRA model whose base stays frozen, else copy.
    reference: str = "auto"


@dataclasses.dataclass(frozen=True)
class ORPOConfig:
    name: str = "orpo"
    lam: float = 0.1  # λ, the odds-ratio weight: LLaMA-Factory's orpo_beta (TRL's `beta`), default 0.1


def _adapters_give_the_base(cfg) -> bool:
    """LoRA adapters are all that trains, so disabling them gives the frozen base exactly."""
    return (variants.name_of(cfg.model) == lora.NAME and cfg.train.trainable is None
            and variants.options_of(cfg.model).get("enabled", True) is not False)


def reference_mode(section, cfg) -> str:
    """`adapters` or `copy`: the section's choice, `auto` resolved against the model."""
    if section.reference != "auto":
        return section.reference
    return "adapters" if _adapters_give_the_base(cfg) else "copy"


def _dpo_checks(section, cfg) -> list[tuple[bool, str]]:
    key = "train.objective"
    return [(section.beta > 0, f"{key}.beta must be > 0, got {section.beta}"),
            (0 <= section.label_smoothing < 0.5,
             f"{key}.label_smoothing must be in [0, 0.5), got {section.label_smoothing}"),
            (section.reference in REFERENCES,
             f"{key}.reference must be {', '.join(REFERENCES)}, got {section.reference!r}"),
            (section.reference != "adapters" or _adapters_give_the_base(cfg),
             f"DPO with neither LoRA nor a reference: {key}.reference=adapters needs a LoRA model (model.variant "
             "lora, adapters enabled, train.trainable unset); use reference: copy for full fine-tuning")]


def _orpo_checks(section, cfg) -> list[tuple[bool, str]]:
    return [(section.lam >= 0, f"train.objective.lam must be >= 0, got {section.lam}")]


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
               "logps/rejected")
ORPO_METRICS = ("nll", "or_loss", "log_odds_ratio", *DPO_METRICS)


def _per_pair(names: tuple[str, ...]):
    """Fetched metric sums -> per-pair means (`tokens` is the summed denom, the number of pairs)."""
    def summarize(m: dict) -> dict:
        pairs = max(float(m.get("tokens", 0.0)), 1.0)
        return {k: float(m.get(k, 0.0)) / pairs for k in names}
    return summarize


# TRL / LLaMA-Factory defaults for DPO and ORPO: lr 1e-5 (their recipes' value). Warmup: min(20, steps // 10),
# about LLaMA-Factory examples' warmup_ratio 0.1, capped (HF's own default is no warmup).
_PREF = dict(model_kind="arm", data_formats=("pref",), rows_per_example=2, default_lr=1e-5,
             default_warmup=lambda steps: min(20, steps // 10), make_eval=lambda section: chosen_nll,
             eval_label="NLL of the chosen responses")

register(ObjectiveSpec(
    "dpo", DPOConfig, validate=_dpo_checks, summarize=_per_pair(DPO_METRICS), metric_names=DPO_METRICS,
    make_loss=lambda s: lambda model, batch, rng=None, frozen=None: dpo_loss(
        model, batch, frozen, beta=s.beta, label_smoothing=s.label_smoothing, reference=s.reference),
    frozen_sets=lambda section, cfg: ("reference",) if reference_mode(section, cfg) == "copy" else (),
    start_loss=LN2, **_PREF))  # policy = reference at step 0: z = 0, loss = softplus(0) = log 2
register(ObjectiveSpec(
    "orpo", ORPOConfig, validate=_orpo_checks, summarize=_per_pair(ORPO_METRICS), metric_names=ORPO_METRICS,
    make_loss=lambda s: lambda model, batch, rng=None, frozen=None: orpo_loss(model, batch, lam=s.lam), **_PREF))
