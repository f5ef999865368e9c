"""The trainer: mesh, state and one jitted step over pure pytrees, read top to bottom in named sections.

  1. runtime   - jax.distributed, mesh, batch-size checks
  2. model     - the network from the one factory (mathlm.models), abstract weights, shardings from the table in
                 models/sharding.py; split into trainable and frozen by the variant's filter or train.trainable
  3. optimizer - AdamW over the trainable weights only; its moments sharded like the weights they belong to
  4. step      - (trainable, frozen, opt, batch) -> (trainable, opt, metrics): the objective's loss, gradients of
                 `trainable` alone accumulated over micro-batches by lax.scan, update; trainable and opt donated
  5. eval      - the objective's held-out metric (next-token NLL unless its spec brings one)
The loop around it (data, progress, eval, checkpoints, preemption) is train/loop.py. The objective comes from its
spec (train/objectives/); the trainer never branches on which one runs or which model variant it trains.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mathlm import models
from mathlm.models import sharding as shard_rules
from mathlm.models.attention_ops import attention_kind
from mathlm.train import objectives
from mathlm.train.config import Config, ConfigError
from mathlm.train.optim import lr_schedule, make_optimizer
from mathlm.train.runtime import (
    data_parallel_size,
    flops_6nd,
    flops_per_token,
    make_mesh,
    maybe_initialize_distributed,
    network_flops_per_token,
)
from mathlm.train.state import combine, copy_tree, n_params, partition


class TrainingError(RuntimeError):
    """A run that had to stop (NaN loss); the message names the step."""


@dataclasses.dataclass
class Setup:
    """Everything compiled and sharded for a run, before any data is read."""
    cfg: Config
    spec: objectives.ObjectiveSpec
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    is_trainable: Callable[[str], bool] | None  # None: every weight trains
    abstract_params: dict  # the whole model
    abstract_trainable: dict
    abstract_frozen: dict  # {"model": frozen weights of the model, "sets": {name: parameter set}}
    frozen_sets: tuple[str, ...]  # the objective's frozen sets for this config (objectives.frozen_sets_of)
    abstract_opt: dict
    params_sh: object
    trainable_sh: object
    frozen_sh: object
    opt_sh: object
    batch_sh: jax.sharding.NamedSharding
    tx: optax.GradientTransformation
    step_fn: object  # jitted (trainable, frozen, opt, batch) -> (trainable, opt, metrics)
    init_fn: object  # jitted seed -> (trainable, frozen, opt)

    def split(self, params: dict) -> tuple[dict, dict]:
        """Whole-model params -> (trainable, frozen["model"])."""
        return partition(params, self.is_trainable)

    def frozen_from(self, params: dict, frozen_model: dict) -> dict:
        """The step's frozen argument: the model's frozen weights plus each set the objective asked for, which
        starts as a copy of the initial model (a reference policy)."""
        return {"model": frozen_model, "sets": {name: copy_tree(params) for name in self.frozen_sets}}


def sharding_rules(cfg: Config):
    return tuple((r[0], r[1]) for r in cfg.mesh.rules) if cfg.mesh.rules else shard_rules.DEFAULT_RULES


def batch_spec(cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's batch: (B, L) arrays, or (B, R, L) for an objective with R rows per example (a pair)."""
    rows = objectives.spec_of(cfg).rows_per_example
    shape = (cfg.train.batch_size, *((rows,) if rows > 1 else ()), cfg.train.seq_len)
    return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32), "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
            "positions": jax.ShapeDtypeStruct(shape, jnp.int32),
            "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32),
            "prompt_mask": jax.ShapeDtypeStruct(shape, jnp.int32)}


# ----------------------------------------------------------------------------- 1-3: runtime, model, optimizer

def _mirror_param_shardings(state, params, params_sh, replicated):
    """Shard each optimizer-state leaf like the param whose path it ends with (Adam's mu/nu); others replicate."""
    by_path = {jax.tree_util.keystr(p): (leaf.shape, sh) for (p, leaf), sh in
               zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(params_sh))}

    def one(path, leaf):
        key = jax.tree_util.keystr(path)
        for suffix, (shape, sh) in by_path.items():
            if key.endswith(suffix) and tuple(leaf.shape) == tuple(shape):
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(one, state)


def _check_batch(cfg: Config, mesh) -> None:
    t, dp = cfg.train, data_parallel_size(mesh)
    if t.batch_size % (dp * t.micro_batches):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by data-parallel size {dp} "
                          f"x train.micro_batches={t.micro_batches}")
    if t.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by {jax.process_count()} processes")


def _model_and_state(cfg: Config, mesh, rules):
    """Abstract weights, their split and shardings, the optimizer and its state's shardings."""
    graphdef, abstract_params = models.abstract(cfg.model)
    try:
        is_trainable = models.trainable_filter(cfg.model, cfg.train.trainable)
        abstract_trainable, abstract_frozen_model = partition(abstract_params, is_trainable)
    except ValueError as e:
        raise ConfigError(f"train.trainable={cfg.train.trainable}: {e}") from None
    spec, frozen_sets = objectives.spec_of(cfg), objectives.frozen_sets_of(cfg)
    sets = {name: abstract_params for name in frozen_sets}
    abstract_frozen = {"model": abstract_frozen_model, "sets": sets}
    shard = lambda tree: shard_rules.param_shardings(tree, mesh, rules)
    tx = make_optimizer(cfg.train)

    def opt_init(trainable, seed):
        return {"state": tx.init(trainable), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.PRNGKey(seed))}

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    trainable_sh = shard(abstract_trainable)
    state_sh = _mirror_param_shardings(jax.eval_shape(tx.init, abstract_trainable), abstract_trainable,
                                       trainable_sh, replicated)
    return dict(spec=spec, graphdef=graphdef, is_trainable=is_trainable, abstract_params=abstract_params,
                abstract_trainable=abstract_trainable, abstract_frozen=abstract_frozen, frozen_sets=frozen_sets,
                abstract_opt=jax.eval_shape(opt_init, abstract_trainable, 0), params_sh=shard(abstract_params),
                trainable_sh=trainable_sh, frozen_sh={"model": shard(abstract_frozen_model),
                                                      "sets": {n: shard(t) for n, t in sets.items()}},
                opt_sh={"state": state_sh, "step": replicated, "rng": replicated}, tx=tx, opt_init=opt_init)


# ----------------------------------------------------------------------------- 4: step

def all_finite(tree) -> jax.Array:
    """One boolean: every floating-point value of `tree` is finite (a reduction per leaf, fused by XLA)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _make_step(cfg: Config, graphdef, objective, tx):
    schedule = lr_schedule(cfg.train)
    k = cfg.train.micro_batches

    def loss_fn(trainable, frozen, mb, rng):
        model = nnx.merge(graphdef, combine(trainable, frozen["model"]))
        return objective(model, mb, rng, frozen["sets"])

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)  # argument 0 only: frozen weights get no gradient

    def step(trainable, frozen, opt, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(opt["rng"]), opt["step"])
        if k == 1:
            (loss_sum, metrics), grads = grad_fn(trainable, frozen, batch, jax.random.fold_in(rng, 0))
        else:
            # Rows i*k + j go to micro-batch j: each device keeps its own rows, no resharding.
            mbs = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)

            def body(acc, xs):
                mb, i = xs
                (ls, m), g = grad_fn(trainable, frozen, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, acc, (ls, m, g)), None

            zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, trainable, frozen,
                                                               jax.tree.map(lambda x: x[0], mbs), rng))
            zero = (zero[0][0], zero[0][1], zero[1])
            (loss_sum, metrics, grads), _ = jax.lax.scan(body, zero, (mbs, jnp.arange(k)))
        denom = jnp.maximum(metrics["denom"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, new_state = tx.update(grads, opt["state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        out = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads), "lr": schedule(opt["step"]),
               "tokens": metrics["denom"], **{k_: v for k_, v in metrics.items() if k_ != "denom"},
               "finite": all_finite((new_trainable, new_state))}  # read before any save (train/loop.py)
        new_opt = {"state": new_state, "step": opt["step"] + 1, "rng": opt["rng"]}
        return new_trainable, new_opt, out

    return step


def build(cfg: Config, devices: list | None = None) -> Setup:
    """Everything a run needs, for the run's devices (or, compile-only, a TPU topology's `devices`)."""
    if devices is None:
        maybe_initialize_distributed(cfg.mesh)
    mesh = make_mesh(cfg.mesh, devices)
    _check_batch(cfg, mesh)
    rules = sharding_rules(cfg)
    parts = _model_and_state(cfg, mesh, rules)
    opt_init = parts.pop("opt_init")
    spec, tx = parts["spec"], parts["tx"]
    objective = spec.make_loss(objectives.section_of(cfg))

    def _init(seed):
        params = jax.lax.with_sharding_constraint(models.init_params(cfg.model, seed), parts["params_sh"])
        trainable, frozen_model = partition(params, parts["is_trainable"])
        frozen = {"model": frozen_model, "sets": {name: params for name in parts["frozen_sets"]}}
        return trainable, frozen, opt_init(trainable, seed)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    init_fn = jax.jit(_init, out_shardings=(parts["trainable_sh"], parts["frozen_sh"], parts["opt_sh"]))
    batch_sh = shard_rules.batch_sharding(mesh, rules)
    # Traced under the mesh so the model's activation constraints (models/sharding.py) apply.
    step_fn = jax.jit(shard_rules.traced_under(_make_step(cfg, parts["graphdef"], objective, tx), mesh, rules),
                      in_shardings=(parts["trainable_sh"], parts["frozen_sh"], parts["opt_sh"], batch_sh),
                      out_shardings=(parts["trainable_sh"], parts["opt_sh"], replicated), donate_argnums=(0, 2))
    return Setup(cfg=cfg, mesh=mesh, batch_sh=batch_sh, step_fn=step_fn, init_fn=init_fn, **parts)


# ----------------------------------------------------------------------------- 5: eval

def make_eval_fn(setup: Setup, byte_lengths: np.ndarray):
    """Jitted held-out metrics over (trainable, frozen, batch): summed NLL, loss tokens and target bytes."""
    table = jnp.asarray(byte_lengths, jnp.float32)
    custom = setup.spec.make_eval(objectives.section_of(setup.cfg)) if setup.spec.make_eval else None
    merge = lambda trainable, frozen: nnx.merge(setup.graphdef, combine(trainable, frozen["model"]))

    def ev(trainable, frozen, batch):
        model = merge(trainable, frozen)
        if custom is not None:  # e.g. masked diffusion: its ELBO, not next-token NLL
            return custom(model, batch, table, frozen["sets"])
        logp, _, _, diag = objectives.forward_logprobs(model, batch["inputs"], batch["targets"], batch["positions"],
                                                       batch["segment_ids"])
        mask = batch["loss_mask"]
        # Each merge site's batch-mean gate (Control-LLM `avg_interp_weight`), averaged over batches by the loop.
        gates = {k: v for k, v in diag.items() if k.endswith("/gate")}
        return {"nll": -jnp.sum(logp * mask), "tokens": jnp.sum(mask),
                "bytes": jnp.sum(table[batch["targets"]] * mask), **gates}

    return jax.jit(shard_rules.traced_under(ev, setup.mesh, sharding_rules(setup.cfg)),
                   in_shardings=(setup.trainable_sh, setup.frozen_sh, setup.batch_sh))


def to_global(setup: Setup, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> one global array per field, laid out on the batch sharding."""
    b = setup.cfg.train.batch_size
    return {k: jax.make_array_from_process_local_data(setup.batch_sh, v, (b, *v.shape[1:]))
            for k, v in local.items()}


# ----------------------------------------------------------------------------- dry run

def _per_device_bytes(tree, shardings) -> int:
    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += int(np.prod(sh.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
    return total


def model_flops_per_token(setup: Setup) -> float:
    """Training FLOPs per token of the network this run builds (a variant's counted from its weights)."""
    cfg = setup.cfg
    if models.variants.name_of(cfg.model) == models.variants.PLAIN:
        return flops_per_token(cfg.model, cfg.train.seq_len)
    return network_flops_per_token(cfg.model, cfg.train.seq_len, setup.abstract_params)


def compile_step(setup: Setup):
    """The step compiled ahead of time for the configured shapes (what the jit builds at the first call)."""
    return setup.step_fn.lower(setup.abstract_trainable, setup.abstract_frozen, setup.abstract_opt,
                               batch_spec(setup.cfg)).compile()


def dry_run(cfg: Config, devices: list | None = None) -> dict:
    """Compile the step for the configured mesh (over `devices`, e.g. a TPU topology's, when given) without
    data; report size, FLOPs and per-device memory. `bytes_step_peak_per_device` is what must fit on a chip;
    temp can exceed it (buffers that are never live together)."""
    setup = build(cfg, devices)
    t0 = time.perf_counter()
    compiled = compile_step(setup)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    tokens = cfg.train.batch_size * setup.spec.rows_per_example * cfg.train.seq_len
    with shard_rules.activation_sharding(setup.mesh, sharding_rules(cfg)):  # the choice the traced step made
        attention = attention_kind(cfg.model, cfg.train.seq_len)
    out = {
        "devices": setup.mesh.size, "device_kind": setup.mesh.devices.flat[0].device_kind, "attention": attention,
        "mesh": dict(setup.mesh.shape), "compile_seconds": round(seconds, 1),
        "params": n_params(setup.abstract_params), "params_trainable": n_params(setup.abstract_trainable),
        "params_non_embedding": n_params(setup.abstract_params) - cfg.model.param_count()
        + cfg.model.param_count(embeddings=False),
        "flops_per_step_model": model_flops_per_token(setup) * tokens,
        "flops_per_step_model_per_device": model_flops_per_token(setup) * tokens / setup.mesh.size,
        "flops_6nd_per_step": flops_6nd(cfg.model, tokens),
        "flops_per_step_xla_per_device": float((cost or {}).get("flops", 0.0)),
        "bytes_params_per_device": _per_device_bytes(setup.abstract_params, setup.params_sh),
        "bytes_opt_state_per_device": _per_device_bytes(setup.abstract_opt, setup.opt_sh),
        "bytes_frozen_sets_per_device": _per_device_bytes(setup.abstract_frozen["sets"], setup.frozen_sh["sets"]),
    }
    if mem is not None:
        out.update({"bytes_step_temp_per_device": int(mem.temp_size_in_bytes),
                    "bytes_step_args_per_device": int(mem.argument_size_in_bytes),
                    "bytes_step_output_per_device": int(mem.output_size_in_bytes),
                    "bytes_step_code": int(mem.generated_code_size_in_bytes)})
        if setup.mesh.devices.flat[0].platform == "tpu":  # libtpu's peak: what its out-of-memory check compares
            out["bytes_step_peak_per_device"] = int(mem.peak_memory_in_bytes)
            # Pallas (Mosaic) kernels in the program, e.g. splash's forward, dq and dkv per layer
            out["tpu_custom_calls"] = compiled.as_text().count('custom_call_target="tpu_custom_call"')
        else:  # XLA:CPU's peak_memory_in_bytes counts the arguments only (measured); report an upper bound
            out["bytes_step_peak_per_device"] = int(mem.argument_size_in_bytes + mem.temp_size_in_bytes
                                                    + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    return out
