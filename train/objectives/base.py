"""The objective contract, its spec, the registry, and the pieces every LM objective shares.

Contract: `loss(model, batch, rng, frozen) -> (loss_sum, metrics)`
  - `model`: the NNX module with the trainable + frozen weights merged in;
  - `batch`: dict of (B, L) arrays (see mathlm.data.pipeline; `spec.batch_fields` names the ones it reads), or
    (B, R, L) with R = `spec.rows_per_example` rows per example (a preference pair: chosen, rejected);
  - `rng`: a PRNG key for stochastic objectives (diffusion masking), distinct per micro-batch and step;
  - `frozen`: the extra parameter sets it asked for by name in `spec.frozen_sets` (e.g. a DPO reference model),
    a dict of pure-dict pytrees passed into the jitted step as sharded arguments; empty for most objectives.
    Which sets a run gets is `objectives.frozen_sets_of(cfg)` (the spec's tuple, or its function of the config);
  - returns the *sum* of the loss over the batch and `metrics`, which must hold `denom`, the normaliser of that
    sum (e.g. the number of loss tokens). The trainer divides Σ loss_sum by Σ denom over all micro-batches, so k
    micro-batches give exactly the gradient of one k-times larger batch. Other metrics are sums, turned into
    logged values by `spec.summarize`.
Auxiliary losses a model sows as `nnx.Intermediate` under the name `aux_loss` (Control-LLM divergence) are mean
values; objectives call the model through `forward`, which captures them (`nnx.capture`), and `add_aux_losses`
folds them in with the same normaliser.

Everything objective-specific lives in its `ObjectiveSpec`: the typed `train.objective` section, defaults that
depend on the objective, validation, loss, held-out eval, padding policy, batch fields, logged metrics and the label
the CLI prints. The trainer, config loader, CLI and data pipeline ask the spec; none of them names an objective.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
LM_FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def _lm_summary(m: dict) -> dict:
    """Logged values of a next-token objective: accuracy over the loss tokens (`tokens` is the summed denom)."""
    tokens = max(float(m["tokens"]), 1.0)
    return {"accuracy": float(m["correct_sum"]) / tokens, **aux_summary(m)}


def aux_summary(m: dict) -> dict:
    """Logged values of what the model sowed: the auxiliary loss and each merge site's diagnostics."""
    tokens = max(float(m["tokens"]), 1.0)
    out = {k[4:]: float(v) / tokens for k, v in m.items() if k.startswith("aux/")}
    if out:
        out["aux_loss"] = float(m["aux_loss"]) / tokens
    return out


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    section: type  # frozen dataclass with a `name` field: the typed `train.objective` section
    make_loss: Callable[[Any], Objective]  # section -> loss(model, batch, rng, frozen)
    model_kind: str  # "arm" | "mdm" (ModelConfig.kind): the kind of model it trains
    data_formats: tuple[str, ...] = ("lm", "sft")
    auto_for: tuple[tuple[str, str], ...] = ()  # (model kind, data.format) pairs for which `auto` picks it
    # section -> eval(model, batch, byte_table, frozen) -> {nll, tokens, bytes} sums; None = next-token NLL
    # (the default). `frozen`: the same parameter sets the loss receives.
    make_eval: Callable[[Any], Callable] | None = None
    validate: Callable[[Any, Any], list[tuple[bool, str]]] | None = None  # (section, cfg) -> [(ok, message)]
    default_lr: float = 3e-4  # train.lr when the config leaves it unset
    default_warmup: Callable[[int], int] = lambda steps: 100  # train.steps -> train.warmup_steps when unset
    sft_pad: str = "pad"  # what fills an SFT row after its example: "pad" (masked) or "eos" (a target)
    batch_fields: tuple[str, ...] = LM_FIELDS
    metric_names: tuple[str, ...] = ("accuracy",)  # what `summarize` logs besides loss/grad_norm/lr/tokens
    summarize: Callable[[dict], dict] = _lm_summary  # fetched metric sums (+ "tokens") -> logged values
    eval_label: str | None = None  # printed after the held-out figures, e.g. "Monte-Carlo ELBO, upper bounds"
    # Extra parameter sets the loss reads from `frozen`, by name, each starting as a copy of the initial model: a
    # tuple, or (section, cfg) -> tuple when the config decides (DPO: a reference copy unless LoRA adapters give
    # it). Read it through `objectives.frozen_sets_of(cfg)`.
    frozen_sets: tuple[str, ...] | Callable[[Any, Any], tuple[str, ...]] = ()
    rows_per_example: int = 1  # rows each batch element holds: 2 for a preference pair (batches (B, 2, L))
    # The loss the first step of a fresh run must have (DPO: log 2, policy = reference); the loop stops there
    # with a TrainingError when it does not. None: no such check.
    start_loss: float | None = None


REGISTRY: dict[str, ObjectiveSpec] = {}


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"objective {spec.name!r} is registered twice")
    REGISTRY[spec.name] = spec
    return spec


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in float32, (B, L)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


DIAGNOSTICS = ("site_div", "site_cos", "site_gate")  # what a Control-LLM merge site sows for the logs


def forward(model: nnx.Module, *args) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Run the model, capturing what it sows: (logits, Σ of every `aux_loss` as a float32 scalar, diagnostics).

    Diagnostics are per-layer means a model sows for the logs (a merge site's divergence, cos(h_pre, h_exp) and
    mean gate), keyed "site<block>/<div|cos|gate>"."""
    logits, sown = nnx.capture(model, nnx.Intermediate)(*args)
    return (logits, *_sown(sown))


def forward_logprobs(model: nnx.Module, inputs, targets, positions, segment_ids):
    """Like `forward`, but through the model's chunked loss head (the full fp32 logits never exist at once):
    (log p(targets) (B, L) float32, argmax == target (B, L), aux, diagnostics)."""
    (logp, hit), sown = nnx.capture(model.target_logprobs, nnx.Intermediate)(inputs, targets, positions,
                                                                              segment_ids)
    return (logp, hit, *_sown(sown))


def _sown(sown) -> tuple[jax.Array, dict[str, jax.Array]]:
    aux, diag = jnp.zeros((), jnp.float32), {}
    for path, v in jax.tree_util.tree_leaves_with_path(sown):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        value = jnp.sum(jnp.asarray(v, jnp.float32))
        if "aux_loss" in keys:
            aux = aux + value
        for name in DIAGNOSTICS:
            if name in keys:
                block = keys[keys.index("blocks") + 1] if "blocks" in keys else "?"
                diag[f"site{block}/{name.split('_')[1]}"] = value
    return aux, diag


def diagnostics_metrics(diag: dict, denom) -> dict:
    """Per-micro-batch means -> sums weighted by the normaliser (the trainer's metrics are sums); `summarize`
    divides by the summed normaliser again."""
    return {f"aux/{k}": v * denom for k, v in diag.items()}


def add_aux_losses(loss_sum: jax.Array, aux: jax.Array, denom: jax.Array) -> jax.Array:
    """A summed loss plus the (mean) auxiliary losses scaled by the same normaliser.

    # deviation from ControlLLM: after the trainer's division by all loss tokens this is CE + D with D weighted
    # by each micro-batch's loss tokens; the reference averages per-micro-batch means, (CE_mb + D_mb) / GA (equal
    # when micro-batches carry equal loss-token counts)."""
    return loss_sum + aux * denom
