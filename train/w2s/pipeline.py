"""The w2s steps as units of work with keys, inputs and outputs; `run` walks them in order, skipping what is done.

A unit's key hashes the config sections it reads and its upstream units' keys: a changed config invalidates the
unit and everything after it; a done unit whose inputs still hash the same is skipped.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable

from mathlm.data.sources import DataError
from mathlm.train import preemption
from mathlm.train.w2s import evaluation, stage1, stage2
from mathlm.train.w2s.config import W2SConfig, fingerprint, save, to_dict
from mathlm.train.w2s.context import Ctx
from mathlm.train.w2s.manifest import Manifests
from mathlm.train.w2s.models import Preempted

STEPS = ("prepare", "weak-gen", "icl-gen", "filter", "sft", "regen", "sample", "pairs", "po", "eval", "report")


@dataclasses.dataclass
class Unit:
    name: str  # e.g. "round2/filter"; the DONE manifest's name
    step: str  # one of STEPS
    sections: tuple[str, ...]  # config sections (dotted) its result depends on
    deps: tuple[str, ...]  # upstream unit names
    inputs: Callable[[Ctx], list[pathlib.Path]]
    outputs: Callable[[Ctx], list[pathlib.Path]]
    run: Callable[[Ctx], dict]


def _slice(cfg: dict, dotted: str):
    node = cfg
    for k in dotted.split("."):
        node = node[k]
    return node


def _prepare_units(cfg: W2SConfig) -> list[Unit]:
    units = [Unit("prepare/data", "prepare", ("task", "data"), (), lambda c: [],
                  lambda c: [c.data[s] for s in ("split1", "split2", "test")], stage1.prepare_data)]
    if cfg.strong.pretrain is not None:
        units.append(Unit("prepare/strong", "prepare", ("strong",), ("prepare/data",), lambda c: [c.data["pretrain"]],
                          lambda c: [c.strong], lambda c: stage1.pretrain(c, "strong")))
    if cfg.weak.pretrain is not None:
        units.append(Unit("prepare/weak_base", "prepare", ("weak",), ("prepare/data",),
                          lambda c: [c.data["pretrain"]], lambda c: [c.weak_base],
                          lambda c: stage1.pretrain(c, "weak")))
    if cfg.weak.sft is not None:
        base = ("prepare/weak_base",) if cfg.weak.pretrain is not None else ()
        units.append(Unit("prepare/weak", "prepare", ("weak",), ("prepare/data", *base),
                          lambda c: [c.data["split1"]], lambda c: [c.weak], stage1.weak_sft))
    return units


def _stage1_units(cfg: W2SConfig, models: tuple[str, ...]) -> list[Unit]:
    gen = ("task", "generation")
    units = [
        Unit("round1/weak_gen", "weak-gen", gen, models, lambda c: [c.data["split2"], c.weak],
             lambda c: [c.round_dir(1) / "weak_gen.jsonl"], lambda c: stage1.weak_gen(c, 1)),
        Unit("round1/icl_gen", "icl-gen", (*gen, "demos"), (*models, "round1/weak_gen"),
             lambda c: [c.data["split2"], c.strong, c.round_dir(1) / "weak_gen.jsonl"],
             lambda c: [c.demos_file, c.round_dir(1) / "icl_gen.jsonl"], lambda c: stage1.icl_gen(c, 1))]
    for r in range(1, cfg.stage1.rounds + 1):
        rd = lambda c, r=r: c.round_dir(r)  # noqa: E731
        if r > 1:
            prev = tuple(f"round{r - 1}/sft_{v}" for v in ("weak", "icl"))
            units.append(Unit(f"round{r}/regen", "regen", gen, prev,
                              lambda c, r=r: [c.data["split2"], c.round_model(r - 1, "weak"),
                                              c.round_model(r - 1, "icl")],
                              lambda c, r=r: [rd(c, r) / "weak_gen.jsonl", rd(c, r) / "icl_gen.jsonl"],
                              lambda c, r=r: stage1.regen(c, r)))
        gens = ("round1/weak_gen", "round1/icl_gen") if r == 1 else (f"round{r}/regen",)
        units.append(Unit(f"round{r}/filter", "filter", ("task", "stage1.agree"), gens,
                          lambda c, r=r: [rd(c, r) / "weak_gen.jsonl", rd(c, r) / "icl_gen.jsonl"],
                          lambda c, r=r: [rd(c, r) / f"kept_{v}.jsonl" for v in ("weak", "icl", "hybrid")]
                          + [rd(c, r) / "stats.json"], lambda c, r=r: stage1.filter_round(c, r)))
        for v in cfg.stage1.variants:
            units.append(Unit(f"round{r}/sft_{v}", "sft", ("stage1.sft", "lora"), (f"round{r}/filter", *models),
                              lambda c, r=r, v=v: [rd(c, r) / f"kept_{v}.jsonl", c.strong],
                              lambda c, r=r, v=v: [c.round_model(r, v)],
                              lambda c, r=r, v=v: _sft_one(c, r, v)))
    return units


def _sft_one(c: Ctx, r: int, v: str) -> dict:
    from mathlm.train.w2s.manifest import read_jsonl
    rows = read_jsonl(c.round_dir(r) / f"kept_{v}.jsonl")
    last = stage1.sft_strong(c, stage1.sft_records(rows), c.round_model(r, v), f"round{r}/kept_{v}.jsonl")
    return {"examples": len(rows), "loss": last.get("loss")}


def _stage2_units(cfg: W2SConfig) -> list[Unit]:
    m_plus = f"round{cfg.stage1.rounds}/sft_hybrid"
    units = [Unit("stage2/sample", "sample", ("task", "generation", "stage2"), (m_plus,),
                  lambda c: [c.data["split2"], c.m_plus],
                  lambda c: [c.m_plus_merged, c.stage2 / "samples.jsonl"], stage2.sample),
             Unit("stage2/pairs", "pairs", ("task", "pairs"), ("stage2/sample", "round1/weak_gen"),
                  lambda c: [c.stage2 / "samples.jsonl", c.round_dir(1) / "weak_gen.jsonl"],
                  lambda c: [c.stage2 / "pairs.jsonl", c.stage2 / "stats.json"], stage2.pairs)]
    for m in cfg.po.methods:
        units.append(Unit(f"stage2/{m}", "po", ("po.beta" if m == "dpo" else "po.lam", "po.train", "lora"),
                          ("stage2/pairs",), lambda c: [c.stage2 / "pairs.jsonl", c.m_plus_merged],
                          lambda c, m=m: [c.po_model(m)], lambda c, m=m: stage2.po(c, m)))
    return units


def _eval_units(cfg: W2SConfig, models: tuple[str, ...]) -> list[Unit]:
    units, producer = [], {"weak": models, "strong": models, "weak_icl": ("round1/icl_gen",)}
    for name in ("naive", "ceiling"):
        if getattr(cfg.eval, name):
            deps = ("round1/weak_gen",) if name == "naive" else models
            units.append(Unit(f"eval/train_{name}", "eval", ("stage1.sft", "lora", "eval"), deps,
                              lambda c: [], lambda c, n=name: [evaluation.baseline_model(c, n)],
                              lambda c, n=name: evaluation.train_baseline(c, n)))
            producer[name] = (f"eval/train_{name}",)
    for r in range(1, cfg.stage1.rounds + 1):
        for v in cfg.stage1.variants:
            producer[f"round{r}_{v}"] = (f"round{r}/sft_{v}",)
    for m in cfg.po.methods:
        producer[m] = (f"stage2/{m}",)
    ev = ("task", "generation")
    for name, deps in producer.items():
        units.append(Unit(f"eval/{name}", "eval", ev, (*models, *deps), lambda c: [c.data["test"]],
                          lambda c, n=name: [c.workdir / "eval" / f"{n}.json"],
                          lambda c, n=name: evaluation.score(c, n)))
    pass_names = [f"round{cfg.stage1.rounds}_hybrid", *cfg.po.methods] + (["ceiling"] if cfg.eval.ceiling else [])
    for name in pass_names:
        units.append(Unit(f"eval/{name}_pass", "eval", (*ev, "eval.pass_k"), producer[name], lambda c: [c.data["test"]],
                          lambda c, n=name: [c.workdir / "eval" / f"{n}_pass.json"],
                          lambda c, n=name: evaluation.score(c, n, samples=True)))
    units.append(Unit("report", "report", ("eval",), tuple(u.name for u in units), lambda c: [],
                      lambda c: [c.workdir / "results.json"], evaluation.report))
    return units


def units_of(cfg: W2SConfig) -> list[Unit]:
    prep = _prepare_units(cfg)
    models = tuple(u.name for u in prep)
    return prep + _stage1_units(cfg, models) + _stage2_units(cfg) + _eval_units(cfg, models)


def keys_of(cfg: W2SConfig, units: list[Unit]) -> dict[str, str]:
    raw, keys = to_dict(cfg), {}
    for u in units:
        keys[u.name] = fingerprint(u.name, {s: _slice(raw, s) for s in u.sections}, [keys[d] for d in u.deps])
    return keys


def select(units: list[Unit], step: str | None = None, start: str | None = None, stop: str | None = None,
           round_: int | None = None) -> list[Unit]:
    """One step's units (optionally one round's), or the units in pipeline order from the first unit of step
    `start` to the last unit of step `stop` (so `--to filter` includes every round's filter and what lies
    between)."""
    for s in (step, start, stop):
        if s is not None and s not in STEPS:
            raise DataError(f"unknown step {s!r}; steps: {', '.join(STEPS)}")
    if step:
        chosen = [u for u in units if u.step == step]
    else:
        first = next((i for i, u in enumerate(units) if u.step == start), None) if start else 0
        last = max((i for i, u in enumerate(units) if u.step == stop), default=None) if stop else len(units) - 1
        if first is None or last is None:
            raise DataError(f"this config has no {start if first is None else stop} step")
        chosen = units[first: last + 1]
    if round_ is not None:
        chosen = [u for u in chosen if u.name.startswith(f"round{round_}/")]
    return chosen


def states(ctx: Ctx, units: list[Unit]) -> dict[str, str]:
    keys, man = keys_of(ctx.cfg, units), Manifests(ctx.workdir)
    return {u.name: man.state(u.name, keys[u.name], u.inputs(ctx)) for u in units}


def check_models(cfg: W2SConfig) -> None:
    """Ready-made weak/strong runs must exist and be causal LMs (KV-cache generation, LoRA SFT), before anything
    runs: one line otherwise."""
    from mathlm.train.checkpoint import CheckpointError
    from mathlm.train.config import load_config
    from mathlm.train.runs import run_dir_of
    for which in ("weak", "strong"):
        section = getattr(cfg, which)
        if section.run is None or section.pretrain is not None:
            continue
        folder = run_dir_of(section.run)
        if not (folder / "checkpoints").is_dir():
            raise CheckpointError(f"{which}.run={section.run}: no checkpoints/ in that run folder")
        if load_config(folder / "config.yaml", migrate=True).model.kind != "arm":
            raise CheckpointError(f"{which}.run={section.run} is a masked diffusion model; the recipe generates "
                                  "with KV-cache decoding and needs a causal (autoregressive) model")


def run(cfg: W2SConfig, workdir: pathlib.Path, chosen: list[Unit] | None = None, log=print,
        show_progress: bool = False) -> dict[str, str]:
    """Run the chosen units (default: all) in order; returns unit -> what happened (done / ran / stopped).

    A SIGTERM stops the pipeline cleanly wherever it lands: in a training unit train() saves and returns
    `preempted` (it shares this handler); in a generation pass the finished batches stay in the partial file;
    between units nothing is lost. The unit is not recorded as done; the same command resumes it."""
    units = units_of(cfg)
    chosen = units if chosen is None else chosen
    if any(u.step != "prepare" for u in chosen):  # the data splits alone need no model
        check_models(cfg)
    workdir = workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    save(cfg, workdir / "config.yaml")
    keys, man = keys_of(cfg, units), Manifests(workdir)
    done: dict[str, str] = {}
    with preemption.handling() as preempt:
        ctx = Ctx(cfg, workdir, log, show_progress, should_stop=lambda: preempt.requested)
        for u in chosen:
            if _run_unit(u, units, {c.name for c in chosen}, ctx, keys, man, done, preempt) == "stopped":
                break
    return done


def _run_unit(u: Unit, units: list[Unit], names: set[str], ctx: Ctx, keys, man: Manifests, done: dict,
              preempt) -> str:
    state = man.state(u.name, keys[u.name], u.inputs(ctx))
    if state == "done":
        done[u.name] = "done"
        return "done"
    missing = [d for d in u.deps if d not in names and man.state(
        d, keys[d], next(x for x in units if x.name == d).inputs(ctx)) != "done"]
    if missing:
        step = next(x for x in units if x.name == missing[0]).step
        raise DataError(f"{u.name} needs {missing[0]}, which is not done for this config: run "
                        f"`mathlm w2s {step}` (or `mathlm w2s run`) first")
    if preempt.requested:  # a SIGTERM during the previous unit's bookkeeping: stop before starting this one
        ctx.log(f"[yellow]stopping: SIGTERM before {u.name}; rerun the same command to resume")
        done[u.name] = "stopped"
        return "stopped"
    if state == "stale":
        removed = man.clear(u.name, u.outputs(ctx))
        ctx.log(f"[yellow]{u.name}: config or inputs changed; redoing it" + (f" (removed {', '.join(removed)})"
                                                                             if removed else ""))
    ctx.log(f"[bold]{u.name}[/bold]")
    t0 = time.perf_counter()
    ctx.key = keys[u.name]
    try:
        summary = u.run(ctx)
    except Preempted as e:
        ctx.log(f"[yellow]stopping: {e}; rerun the same command to resume")
        done[u.name] = "stopped"
        return "stopped"
    man.record(u.name, keys[u.name], u.inputs(ctx), u.outputs(ctx), time.perf_counter() - t0, summary)
    done[u.name] = "ran"
    return "ran"
