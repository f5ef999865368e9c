"""The trainer: one jitted step over pure pytrees, read top to bottom in named sections.

  1. runtime   - jax.distributed, mesh
  2. model     - abstract init, shardings from the table in models/sharding.py, sharded init (or init_from)
  3. optimizer - AdamW with the trainable mask; optimizer-state shardings from the compiled init
  4. step      - objective (by name) -> grads accumulated over micro-batches by lax.scan -> update; donated state
  5. data      - grain iterator for this process, restored position on resume
  6. loop      - progress, metrics, eval, checkpoints, SIGTERM, NaN guard
The objective is looked up by name; the trainer never branches on which one it runs.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mathlm.models import sharding as shard_rules
from mathlm.models.transformer import Transformer
from mathlm.train import checkpoint as ckpt
from mathlm.train.config import Config, ConfigError, objective_name, save_config, sft_pad_is_eos
from mathlm.train.objectives import get_eval, get_objective, token_nll
from mathlm.train.optim import lr_schedule, make_optimizer
from mathlm.train.runtime import (data_parallel_size, flops_6nd, flops_per_token, make_mesh,
                                  maybe_initialize_distributed)


class TrainingError(RuntimeError):
    """A run that had to stop (NaN loss); the message names the step."""


@dataclasses.dataclass
class Setup:
    """Everything compiled and sharded for a run, before any data is read."""
    cfg: Config
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    params_sh: object
    opt_sh: object
    batch_sh: jax.sharding.NamedSharding
    tx: optax.GradientTransformation
    step_fn: object  # jitted (params, opt, batch) -> (params, opt, metrics)
    init_fn: object  # jitted seed -> (params, opt)
    abstract_params: object
    abstract_opt: object


def _rules(cfg: Config):
    return tuple((r[0], r[1]) for r in cfg.mesh.rules) if cfg.mesh.rules else shard_rules.DEFAULT_RULES


def batch_spec(cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32), "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
            "positions": jax.ShapeDtypeStruct(shape, jnp.int32),
            "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32),
            "prompt_mask": jax.ShapeDtypeStruct(shape, jnp.int32)}


# ----------------------------------------------------------------------------- 1-4: runtime, model, optimizer, step

def _mirror_param_shardings(state, params, params_sh, replicated):
    """Shard each optimizer-state leaf like the param whose path it ends with (Adam's mu/nu); others replicate.

    (optax.tree_map_params cannot see through the MaskedNodes that frozen weights leave in the state.)
    """
    by_path = {jax.tree_util.keystr(p): (leaf.shape, sh) for (p, leaf), sh in
               zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(params_sh))}

    def one(path, leaf):
        key = jax.tree_util.keystr(path)
        for suffix, (shape, sh) in by_path.items():
            if key.endswith(suffix) and tuple(leaf.shape) == tuple(shape):
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(one, state)


def build(cfg: Config, frozen=None) -> Setup:
    maybe_initialize_distributed(cfg.mesh)
    mesh = make_mesh(cfg.mesh)
    dp = data_parallel_size(mesh)
    t = cfg.train
    if t.batch_size % (dp * t.micro_batches):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by data-parallel size {dp} "
                          f"x train.micro_batches={t.micro_batches}")
    if t.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by {jax.process_count()} processes")
    rules = _rules(cfg)
    objective = get_objective(objective_name(cfg), t)

    def fresh_params(seed):
        model = Transformer(cfg.model, rngs=nnx.Rngs(params=jax.random.key(seed)))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    abstract_model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract_model, nnx.Param)
    abstract_params = jax.eval_shape(fresh_params, 0)
    params_sh = shard_rules.param_shardings(abstract_params, mesh, rules)
    tx = make_optimizer(t, abstract_params)

    def opt_init(params, seed):
        return {"state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.PRNGKey(seed))}

    # Optimizer moments are sharded exactly like the params they belong to; counters are replicated.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_sh = _mirror_param_shardings(jax.eval_shape(tx.init, abstract_params), abstract_params, params_sh,
                                       replicated)
    opt_sh = {"state": state_sh, "step": replicated, "rng": replicated}
    abstract_opt = jax.eval_shape(opt_init, abstract_params, 0)

    def _init(seed):
        params = jax.lax.with_sharding_constraint(fresh_params(seed), params_sh)
        return params, opt_init(params, seed)

    init_fn = jax.jit(_init, out_shardings=(params_sh, opt_sh))
    schedule = lr_schedule(t)
    k = t.micro_batches

    def loss_fn(params, mb, rng):
        return objective(nnx.merge(graphdef, params), mb, rng, frozen)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(params, opt, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(opt["rng"]), opt["step"])
        if k == 1:
            (loss_sum, metrics), grads = grad_fn(params, batch, jax.random.fold_in(rng, 0))
        else:
            # Rows i*k + j go to micro-batch j: each device keeps its own rows, no resharding.
            mbs = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)

            def body(acc, xs):
                mb, i = xs
                (ls, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, acc, (ls, m, g)), None

            zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], mbs),
                                                               rng))
            zero = (zero[0][0], zero[0][1], zero[1])
            (loss_sum, metrics, grads), _ = jax.lax.scan(body, zero, (mbs, jnp.arange(k)))
        denom = jnp.maximum(metrics["denom"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, new_state = tx.update(grads, opt["state"], params)
        new_params = optax.apply_updates(params, updates)
        out = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads), "lr": schedule(opt["step"]),
               "tokens": metrics["denom"], **{k_: v for k_, v in metrics.items() if k_ != "denom"}}
        new_opt = {"state": new_state, "step": opt["step"] + 1, "rng": opt["rng"]}
        return new_params, new_opt, out

    batch_sh = shard_rules.batch_sharding(mesh, rules)
    step_fn = jax.jit(step, in_shardings=(params_sh, opt_sh, batch_sh),
                      out_shardings=(params_sh, opt_sh, replicated), donate_argnums=(0, 1))
    return Setup(cfg, mesh, graphdef, params_sh, opt_sh, batch_sh, tx, step_fn, init_fn, abstract_params,
                 abstract_opt)


def make_eval_fn(setup: Setup, byte_lengths: np.ndarray):
    """Jitted held-out metrics: summed NLL, loss tokens and target bytes (for bits-per-byte)."""
    table = jnp.asarray(byte_lengths, jnp.float32)
    custom = get_eval(objective_name(setup.cfg), setup.cfg.train)
    if custom is not None:  # e.g. masked diffusion: its ELBO, not next-token NLL
        return jax.jit(lambda params, batch: custom(nnx.merge(setup.graphdef, params), batch, table),
                       in_shardings=(setup.params_sh, setup.batch_sh))

    def ev(params, batch):
        logits = nnx.merge(setup.graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
        mask = batch["loss_mask"]
        return {"nll": jnp.sum(token_nll(logits, batch["targets"]) * mask), "tokens": jnp.sum(mask),
                "bytes": jnp.sum(table[batch["targets"]] * mask)}

    return jax.jit(ev, in_shardings=(setup.params_sh, setup.batch_sh))


def to_global(setup: Setup, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> one global array per field, laid out on the batch sharding."""
    b = setup.cfg.train.batch_size
    return {k: jax.make_array_from_process_local_data(setup.batch_sh, v, (b, *v.shape[1:]))
            for k, v in local.items()}


# ----------------------------------------------------------------------------- dry run

def dry_run(cfg: Config) -> dict:
    """Compile the step for the configured mesh without data; report size, FLOPs and per-device memory."""
    setup = build(cfg)
    n_dev = jax.device_count()

    def per_device_bytes(tree, shardings):
        total = 0
        for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
            shape = sh.shard_shape(leaf.shape)
            total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
        return total

    compiled = setup.step_fn.lower(setup.abstract_params, setup.abstract_opt, batch_spec(cfg)).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    tokens = cfg.train.batch_size * cfg.train.seq_len
    out = {
        "devices": n_dev, "mesh": dict(setup.mesh.shape),
        "params": cfg.model.param_count(), "params_non_embedding": cfg.model.param_count(embeddings=False),
        "flops_per_step_model": flops_per_token(cfg.model, cfg.train.seq_len) * tokens,
        "flops_6nd_per_step": flops_6nd(cfg.model, tokens),
        "flops_per_step_xla_per_device": float((cost or {}).get("flops", 0.0)),
        "bytes_params_per_device": per_device_bytes(setup.abstract_params, setup.params_sh),
        "bytes_opt_state_per_device": per_device_bytes(setup.abstract_opt, setup.opt_sh),
    }
    if mem is not None:
        out.update({"bytes_step_temp_per_device": int(mem.temp_size_in_bytes),
                    "bytes_step_args_per_device": int(mem.argument_size_in_bytes),
                    "bytes_step_output_per_device": int(mem.output_size_in_bytes),
                    "bytes_step_code": int(mem.generated_code_size_in_bytes)})
    return out


# ----------------------------------------------------------------------------- 5-6: data and loop

class _Preemption:
    """SIGTERM (a TPU preemption) sets a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. tests calling train() from a worker)
            self._old = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train(cfg: Config, workdir: str | pathlib.Path, *, show_progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Train (or resume) in `workdir`; returns the last logged metrics.

    `stop_after` ends this invocation early at that step (saving a checkpoint), as a preemption would.
    """
    from mathlm.data.pipeline import eval_batches, make_source, train_dataset
    from mathlm.train.data_setup import prepare_run_data
    from mathlm.train.metrics import RunLogger, Throughput, console
    from mathlm.train.runtime import measured_matmul_peak, peak_flops_per_device

    workdir = pathlib.Path(workdir).absolute()
    setup = build(cfg)
    lead = jax.process_index() == 0
    log = (lambda m: console.print(m, highlight=False)) if lead else (lambda m: None)
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, workdir / "config.yaml")
    t = cfg.train
    data = prepare_run_data(cfg, workdir, log)
    # SMDM pads SFT rows with EOS (a target of mdm_sft); the causal objectives pad with pad (masked either way).
    pad = data.tokenizer.eos_id if sft_pad_is_eos(cfg) else data.tokenizer.pad_id
    src = make_source(data.train_url, cfg.data.format, t.seq_len, pad, cfg.data.truncate)
    if lead:
        from mathlm.data.store import unigram_entropy
        h1 = unigram_entropy(src.store)
        log(f"training data: unigram entropy {h1:.3f} nats/token (the loss of a context-free model)")
    if src.truncated:
        log(f"[yellow]{src.truncated} training examples are longer than {t.seq_len + 1} tokens; truncated")

    # State: restore the latest checkpoint, or initialise (optionally from another run's params).
    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save)
    start = checkpointer.latest_step()
    data_state = None
    if start is not None:
        params, opt, data_state = checkpointer.restore(start, setup.abstract_params, setup.params_sh,
                                                       setup.abstract_opt, setup.opt_sh)
        log(f"resuming from step {start} (checkpoint in {checkpointer.directory})")
    else:
        start = 0
        params, opt = setup.init_fn(t.seed)
        if cfg.model.init_from:
            params, from_step = ckpt.load_params(cfg.model.init_from, setup.abstract_params, setup.params_sh)
            log(f"initialised params from {cfg.model.init_from} (step {from_step})")
    log(f"model: {cfg.model.param_count():,} params; mesh {dict(setup.mesh.shape)}; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), {jax.process_count()} process(es)")

    ds = train_dataset(src, global_batch=t.batch_size, process_index=jax.process_index(),
                       process_count=jax.process_count(), seed=t.seed, threads=cfg.data.grain_workers,
                       prefetch=cfg.data.prefetch)
    it = iter(ds)
    if data_state is not None:
        it.set_state(data_state)
    evals = []
    if data.validation_url and t.eval_every > 0:
        vsrc = make_source(data.validation_url, cfg.data.format, t.seq_len, pad, True)
        evals = eval_batches(vsrc, global_batch=t.batch_size, process_index=jax.process_index(),
                             process_count=jax.process_count(), max_batches=t.eval_batches)
        if not evals:
            log("[yellow]validation set smaller than one batch: periodic eval disabled")
    byte_lengths = np.asarray([0 if data.tokenizer.hf.id_to_token(i) is None or i in
                               (data.tokenizer.pad_id, data.tokenizer.bos_id, data.tokenizer.eos_id)
                               else len(data.tokenizer.hf.id_to_token(i)) for i in range(cfg.model.vocab_size)])
    eval_fn = make_eval_fn(setup, byte_lengths)

    fpt = flops_per_token(cfg.model, t.seq_len)
    if t.peak_flops:
        peak = t.peak_flops
    elif jax.devices()[0].platform == "cpu":  # all host cores drive one XLA CPU client per process
        peak = measured_matmul_peak() * jax.process_count()
    else:
        peak = peak_flops_per_device() * jax.device_count()
    logger = RunLogger(workdir, t.steps, enabled=lead, start_step=start, show_progress=show_progress)
    meter = Throughput(fpt, peak)
    pending: list[tuple[int, dict]] = []  # device metrics not yet fetched: one device_get per interval
    last = {}

    def flush(step: int) -> dict:
        """Fetch pending metrics; stop on the first non-finite loss (before any checkpoint could store it)."""
        nonlocal pending
        if not pending:
            return {}
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched):
            if not math.isfinite(float(m["loss"])):
                pending = []
                raise TrainingError(f"loss is {float(m['loss'])} at step {s}; stopped. The last good checkpoint "
                                    f"(step {checkpointer.latest_step()}) is intact")
        tokens = sum(float(m["tokens"]) for m in fetched)
        m = fetched[-1]
        row = {k: float(v) for k, v in m.items() if k not in ("nll_sum", "correct_sum", "aux_loss", "masked_nll_sum")}
        # Masked diffusion scores only its masked tokens: accuracy and the unweighted CE are over those.
        scored = float(m["masked_tokens"]) if "masked_tokens" in m else float(m["tokens"])
        row["accuracy"] = float(m["correct_sum"]) / max(scored, 1.0)
        if "masked_nll_sum" in m:
            row["masked_ce"] = float(m["masked_nll_sum"]) / max(scored, 1.0)
        # C = 6·N·D (N non-embedding params, D tokens seen, padding and SSL-cropped positions included: the
        # compute axis of the SMDM/Chinchilla IsoFLOP curves); from the step count, so it survives a resume.
        row["tokens_seen"] = float(step) * t.batch_size * t.seq_len
        row["flops_6nd"] = flops_6nd(cfg.model, row["tokens_seen"])
        row.update(meter.interval(sum(t.batch_size * t.seq_len for _ in fetched)))
        row["loss_tokens"] = tokens
        pending = []
        return row

    def run_eval(step: int) -> dict:
        sums = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
        for b in evals:
            out = jax.device_get(eval_fn(params, to_global(setup, b)))
            for k in sums:
                sums[k] += float(out[k])
        loss = sums["nll"] / max(sums["tokens"], 1.0)
        return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0)),
                "eval/bpb": sums["nll"] / math.log(2) / max(sums["bytes"], 1.0)}

    step = start
    with _Preemption() as preempt:
        try:
            meter.reset()
            while step < t.steps:
                batch = to_global(setup, next(it))
                params, opt, metrics = setup.step_fn(params, opt, batch)
                step += 1
                pending.append((step, metrics))
                if step % t.log_every == 0 or step == t.steps:
                    last = flush(step)
                    logger.log(step, last)
                else:
                    logger.advance(step)
                if evals and (step % t.eval_every == 0 or step == t.steps):
                    last_eval = run_eval(step)
                    logger.log(step, last_eval)
                    last.update(last_eval)
                    meter.reset()
                if stop_after is not None and step >= stop_after:
                    preempt.requested = True
                if step % cfg.checkpoint.every_steps == 0 or step == t.steps or preempt.requested:
                    flush(step)
                    checkpointer.save(step, params, opt, it.get_state())
                if preempt.requested:
                    checkpointer.wait()
                    logger.info(f"stopping: saved checkpoint at step {step}; rerun the same command to resume")
                    break
        finally:
            checkpointer.close()
            logger.close()
    last["step"] = step
    last["preempted"] = preempt.requested
    return last


def final_params(workdir: str | pathlib.Path, cfg: Config):
    """Load the latest params of a run (for tests and tools)."""
    setup = build(cfg)
    params, _ = ckpt.load_params(str(workdir), setup.abstract_params, setup.params_sh)
    return params
