"""The training loop around the trainer's step: data, state (fresh, `init_from` or resumed), progress and metrics,
periodic eval, checkpoints, SIGTERM and the NaN guard.

  1. setup     - the compiled step (train/trainer.py), the run's data stores, the grain iterator
  2. state     - resume the latest good checkpoint, or initialise (train/resume.py)
  3. metrics   - one device_get per logging interval; the objective's spec turns its sums into logged values
  4. loop      - step, log, eval, checkpoint, stop on preemption
"""
from __future__ import annotations

import math
import pathlib

import jax
import numpy as np

from mathlm.train import checkpoint as ckpt
from mathlm.train import preemption
from mathlm.train.config import Config, ConfigError, save_config
from mathlm.train.eval.gates import block_of, write_results
from mathlm.train.init_from import check_init_from
from mathlm.train.lock import WorkdirLock
from mathlm.train.objectives import sft_pad_is_eos
from mathlm.train.paths import run_path
from mathlm.train.resume import initial_state, log_frozen
from mathlm.train.runs import adopt_init_variant
from mathlm.train.runtime import flops_6nd
from mathlm.train.state import n_params
from mathlm.train.trainer import (
    Setup,
    TrainingError,
    build,
    make_eval_fn,
    model_flops_per_token,
    to_global,
)

# ----------------------------------------------------------------------------- 1, 3, 4: data, metrics, loop

def _byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    special = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    return np.asarray([0 if tokenizer.hf.id_to_token(i) is None or i in special
                       else len(tokenizer.hf.id_to_token(i)) for i in range(vocab_size)])


def _peak_flops(cfg: Config, log) -> float:
    """The whole run's peak FLOP/s for MFU: train.peak_flops, else the accelerator's dense peak, else (CPU) this
    machine's matmul peak, measured once and cached (train/runtime.py cached_cpu_peak)."""
    from mathlm.train.runtime import cached_cpu_peak, peak_flops_per_device
    if cfg.train.peak_flops:
        return cfg.train.peak_flops
    if jax.devices()[0].platform == "cpu":  # all host cores drive one XLA CPU client per process
        return cached_cpu_peak(log) * jax.process_count()
    return peak_flops_per_device() * jax.device_count()


def _data(cfg: Config, workdir: pathlib.Path, lead: bool, log):
    """(tokenizer, training source, eval batches) for this process."""
    from mathlm.data.pipeline import eval_batches, make_source
    from mathlm.train.data_setup import prepare_run_data
    t = cfg.train
    data = prepare_run_data(cfg, workdir, log)
    # The objective's padding policy: EOS for mdm_sft (a target there), pad otherwise (masked either way).
    pad = data.tokenizer.eos_id if sft_pad_is_eos(cfg) else data.tokenizer.pad_id
    src = make_source(data.train_url, cfg.data.format, t.seq_len, pad, cfg.data.truncate)
    if lead:
        from mathlm.data.store import unigram_entropy
        log(f"training data: unigram entropy {unigram_entropy(src.store):.3f} nats/token (the loss of a "
            "context-free model)")
    if src.truncated:
        log(f"[yellow]{src.truncated} training examples are longer than {t.seq_len + 1} tokens; truncated")
    evals = []
    if data.validation_url and t.eval_every > 0:
        vsrc = make_source(data.validation_url, cfg.data.format, t.seq_len, pad, True)
        evals = eval_batches(vsrc, global_batch=t.batch_size, process_index=jax.process_index(),
                             process_count=jax.process_count(), max_batches=t.eval_batches)
        if not evals:
            log("[yellow]validation set smaller than one batch: periodic eval disabled")
    return data.tokenizer, src, evals


class _Metrics:
    """Device metrics of each step, fetched once per logging interval and summarised by the objective's spec."""

    def __init__(self, setup: Setup, meter, checkpointer):
        self.setup, self.meter, self.checkpointer, self.pending = setup, meter, checkpointer, []
        self.uncounted = 0  # steps of the pending interval left out of tok/s (the first one: compilation)

    def add(self, step: int, metrics) -> None:
        self.pending.append((step, metrics))

    def flush(self, step: int) -> dict:
        """Fetch pending metrics; stop on the first non-finite loss (before any checkpoint could store it)."""
        if not self.pending:
            return {}
        t, cfg = self.setup.cfg.train, self.setup.cfg
        fetched = jax.device_get([m for _, m in self.pending])
        for (s, _), m in zip(self.pending, fetched):
            bad_loss, bad_state = not math.isfinite(float(m["loss"])), not bool(m.get("finite", True))
            if bad_loss or bad_state:
                self.pending = []
                what = (f"loss is {float(m['loss'])}" if bad_loss else
                        f"the weights or optimizer state became non-finite (loss {float(m['loss']):.4g})")
                self.checkpointer.wait()
                saved = self.checkpointer.latest_step()
                last = (f"the last checkpoint saved is step {saved} (finite; rerunning resumes from it)"
                        if saved is not None else "no checkpoint was saved")
                raise TrainingError(f"{what} at step {s}; stopped without saving it: {last}. Lower train.lr or "
                                    "check the data")
        m = fetched[-1]
        row = {k: float(m[k]) for k in ("loss", "grad_norm", "lr", "tokens")}
        row.update(self.setup.spec.summarize(m))
        # C = 6·N·D (N non-embedding params, D tokens seen, padding and SSL-cropped positions included: the
        # compute axis of the SMDM/Chinchilla IsoFLOP curves); from the step count, so it survives a resume.
        per_step = t.batch_size * self.setup.spec.rows_per_example * t.seq_len  # a pair is 2 rows
        row["tokens_seen"] = float(step) * per_step
        row["flops_6nd"] = flops_6nd(cfg.model, row["tokens_seen"])
        row.update(self.meter.interval((len(fetched) - self.uncounted) * per_step))
        self.uncounted = 0
        row["loss_tokens"] = sum(float(x["tokens"]) for x in fetched)
        self.pending = []
        return row


def _check_start(setup: Setup, metrics, logger) -> None:
    """The first step of a fresh run against the objective's start_loss (DPO: log 2, since policy = reference);
    the value is logged as metrics.jsonl's step-0 row {"start_loss": ...} (objectives.preference.initial_loss)."""
    want = setup.spec.start_loss
    if want is None:
        return
    have = float(jax.device_get(metrics["loss"]))
    logger.log(0, {"start_loss": have})
    if not abs(have - want) <= 1e-4:
        raise TrainingError(f"step-0 {setup.spec.name} loss is {have:.6f}, not {want:.6f}: the policy does not "
                            "start as its reference (with LoRA adapters as the reference, model.init_from must be "
                            "a plain or merged run, not a trained adapter)")


def _check_fields(setup: Setup, batch: dict) -> None:
    """The objective's batch fields against what the data pipeline gives (checked on the first batch)."""
    missing = sorted(set(setup.spec.batch_fields) - set(batch))
    if missing:
        raise ConfigError(f"train.objective={setup.spec.name} reads batch field(s) {', '.join(missing)}, which "
                          f"data.format={setup.cfg.data.format} does not provide")


def _run_eval(setup: Setup, eval_fn, trainable, frozen, evals) -> dict:
    """Held-out loss, perplexity, bits per byte, and each merge site's running-mean gate over the eval batches
    (reset at every eval, as the reference's `get_interp_weights`)."""
    sums: dict[str, float] = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for b in evals:
        out = jax.device_get(eval_fn(trainable, frozen, to_global(setup, b)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    loss = sums["nll"] / max(sums["tokens"], 1.0)
    row = {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0)),
           "eval/bpb": sums["nll"] / math.log(2) / max(sums["bytes"], 1.0)}
    row.update({f"eval/{k}": v / len(evals) for k, v in sums.items() if k.endswith("/gate")})
    return row


def write_eval_gates(workdir: pathlib.Path, step: int, row: dict) -> None:
    """The training eval's per-site gates into <run>/evaluation_results.json (`convert merge-back` reads them)."""
    gates = {block_of(k[5:]): v for k, v in row.items() if k.startswith("eval/site") and k.endswith("/gate")}
    write_results(workdir, step, gates, eval_loss=row["eval/loss"])


def train(cfg: Config, workdir: str | pathlib.Path, *, show_progress: bool = True,
          stop_after: int | None = None, resume_from: int | None = None) -> dict:
    """Train (or resume) in `workdir`; returns the last logged metrics.

    `stop_after` ends this invocation early at that step (saving a checkpoint), as a preemption would.
    """
    from mathlm.train.metrics import console

    with preemption.handling() as preempt:  # from the start: a SIGTERM during startup also ends with exit 0
        workdir = run_path(workdir)  # a local folder or a URI (gs://bucket/run): every write goes through epath
        cfg = adopt_init_variant(cfg)
        setup = build(cfg)  # joins jax.distributed: from here its sync manager owns SIGTERM on several processes
        lead = jax.process_index() == 0
        log = (lambda m: console.print(m, highlight=False)) if lead else (lambda m: None)
        if cfg.model.init_from and not (workdir / "checkpoints").is_dir():
            check_init_from(cfg)  # a mismatch is one line, with nothing written
        with WorkdirLock(workdir, enabled=lead) as lock:
            lock.acquire(warn=lambda m: log(f"[yellow]{m}"))
            return _train_locked(cfg, setup, workdir, lead, log, show_progress, stop_after, resume_from, preempt,
                                 lock)


def _train_locked(cfg: Config, setup: Setup, workdir: pathlib.Path, lead: bool, log, show_progress: bool,
                  stop_after: int | None, resume_from: int | None, preempt: preemption.Preemption,
                  lock: WorkdirLock) -> dict:
    from mathlm.data.pipeline import train_dataset
    from mathlm.train.metrics import RunLogger, Throughput

    t = cfg.train
    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save)
    # The state first: a resume this config cannot do is refused before config.yaml or the data are touched.
    notes: list[str] = []  # "resuming from ...", printed once the data is read: a data mistake is then one line
    start, trainable, frozen, opt, data_state, meta = initial_state(setup, checkpointer, workdir, log, resume_from,
                                                                    note=notes.append)
    tokenizer, src, evals = _data(cfg, workdir, lead, log)
    for note in notes:
        log(note)
    if lead:  # once the data is read: a mistake there leaves an existing run's config.yaml as it was
        save_config(cfg, workdir / "config.yaml")
    total = n_params(setup.abstract_params)
    log(f"model: {total:,} params; mesh {dict(setup.mesh.shape)}; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), {jax.process_count()} process(es)")
    log_frozen(setup, log)

    ds = train_dataset(src, global_batch=t.batch_size, process_index=jax.process_index(),
                       process_count=jax.process_count(), seed=t.seed, threads=cfg.data.grain_workers,
                       prefetch=cfg.data.prefetch)
    it = iter(ds)
    if data_state is not None:
        it.set_state(data_state)
    eval_fn = make_eval_fn(setup, _byte_lengths(tokenizer, cfg.model.vocab_size))
    logger = RunLogger(workdir, t.steps, enabled=lead, start_step=start, show_progress=show_progress)
    meter = Throughput(model_flops_per_token(setup), _peak_flops(cfg, log))
    metrics = _Metrics(setup, meter, checkpointer)
    last = {}
    step = start
    stopped = False
    try:
        meter.reset()
        if start < t.steps and preempt.before_start():
            logger.info(f"stopping: SIGTERM before the first step; nothing new to save (step {start})")
            stopped = True
        while step < t.steps and not stopped:
            local = next(it)
            if step == start:
                _check_fields(setup, local)
            trainable, opt, m = setup.step_fn(trainable, frozen, opt, to_global(setup, local))
            if step == 0:  # the step's loss is the one before its update: the initial model's
                _check_start(setup, m, logger)
            step += 1
            metrics.add(step, m)
            if step == start + 1 and t.log_every > 1:  # its time is compilation: the interval starts after it
                jax.block_until_ready(m["loss"])
                meter.reset()
                metrics.uncounted = 1
            if step % t.log_every == 0 or step == t.steps:
                last = metrics.flush(step)
                logger.log(step, last)
                lock.beat()
            else:
                logger.advance(step)
            if evals and (step % t.eval_every == 0 or step == t.steps):
                last_eval = _run_eval(setup, eval_fn, trainable, frozen, evals)
                if lead:
                    write_eval_gates(workdir, step, last_eval)
                logger.log(step, last_eval)
                last.update(last_eval)
                meter.reset()
            if stop_after is not None and step >= stop_after:
                preempt.request()
            stopped = preempt.stop_at(step)  # every step, on every process: the same answer everywhere
            if step % cfg.checkpoint.every_steps == 0 or step == t.steps or stopped:
                metrics.flush(step)
                checkpointer.save(step, trainable, opt, it.get_state(), meta)
            if stopped:
                checkpointer.wait()
                logger.info(f"stopping: saved checkpoint at step {step}; rerun the same command to resume")
    finally:
        checkpointer.close()
        logger.close()
    last["step"] = step
    last["preempted"] = stopped or preempt.requested  # requested: a SIGTERM while the last save completed
    return last


def final_params(workdir: str | pathlib.Path, cfg: Config):
    """The latest whole-model params of a run (frozen weights included), for tests and tools."""
    setup = build(cfg)
    params, _ = ckpt.load_params(str(workdir), setup.abstract_params, setup.params_sh)
    return params
