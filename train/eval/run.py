"""`mathlm eval RUN --task T`, below the CLI: check a job, load the checkpoint, run the task, write the summary.

`run_eval(job)` is the whole command: every check that needs no model runs first (so a bad flag never waits for a
large checkpoint to load), then the engine is loaded and the job goes to `evaluate` (generation tasks) or
`evaluate_perplexity` (`--task perplexity`). Errors are one-line DataErrors that name the flag the user typed.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable

from mathlm.data import tasks
from mathlm.data.sources import DataError, as_path, read_examples
from mathlm.train.eval.evaluate import EvalRequest
from mathlm.train.eval.gates import has_sites, record, site_gates
from mathlm.train.eval.inference import GUIDANCE_FLAG, Engine
from mathlm.train.paths import run_path

TASK_NAMES = "synth | gsm8k | math | svamp | mawps | perplexity"
MC_SAMPLES = 128  # diffusion perplexity: Monte-Carlo ELBO samples per chunk when --mc-samples is not given


@dataclasses.dataclass(frozen=True)
class EvalJob:
    """One `mathlm eval` run: the checkpoint, the request (task, data and settings, with the CLI's defaults), and
    the options that only the command has."""
    checkpoint: str
    request: EvalRequest
    mc_samples: int | None = None  # masked diffusion perplexity only (None = MC_SAMPLES)
    fsdp: int = 1
    out: pathlib.Path | None = None  # None: RUN/eval/TASK, or RUN/eval/TASK/<settings> (output_folder)
    overwrite: bool = False  # replace an existing evaluation in that folder


def _num(x) -> str:
    return f"{x:g}"


def settings_tag(req: EvalRequest) -> str:
    """The settings a request sets away from the defaults, as a folder name (`limit50-shots8-t0.7`); "" for none.
    So `--limit 50` never lands on the full evaluation that training wrote to RUN/eval/TASK."""
    parts = [(pathlib.Path(req.data or "").stem, req.task == "perplexity" and req.data),  # which text it scored
             (f"limit{req.limit}", req.limit is not None), (f"shots{req.shots}", bool(req.shots)),
             (f"style-{req.style}", req.style), (f"exemplars-{pathlib.Path(req.exemplars or '').stem}", req.exemplars),
             (f"samples{req.samples}", req.samples != 1), (f"t{_num(req.temperature)}", req.temperature != 0),
             (f"topk{req.top_k}", req.top_k is not None), (f"topp{_num(req.top_p or 0)}", req.top_p is not None),
             (f"n{req.max_new_tokens}", req.max_new_tokens != 256), (f"steps{req.steps}", req.steps is not None),
             (f"cfg{_num(req.guidance or 0)}", req.guidance is not None), (f"unmask-{req.unmask}", req.unmask),
             (f"seed{req.seed}", req.seed != 0)]
    return "-".join(name for name, given in parts if given)


def output_folder(run_dir: pathlib.Path, req: EvalRequest) -> pathlib.Path:
    tag = settings_tag(req)
    return run_dir / "eval" / req.task / tag if tag else run_dir / "eval" / req.task


def check_folder(folder: pathlib.Path, overwrite: bool) -> None:
    """An evaluation already in `folder` is kept unless --overwrite: a rerun never replaces one silently."""
    if (folder / "summary.json").exists() and not overwrite:
        raise DataError(f"{folder} already holds an evaluation (summary.json); pass --overwrite to replace it, "
                        "or --out DIR")


def _generation_flags_given(req: EvalRequest) -> list[str]:
    """The generation options a job sets away from their defaults, as the CLI spells them."""
    return [flag for flag, given in (
        ("--shots", req.shots != 0), ("--style", req.style), ("--exemplars", req.exemplars),
        ("--samples", req.samples != 1), ("--temperature", req.temperature != 0), ("--top-k", req.top_k is not None),
        ("--top-p", req.top_p is not None), ("--k", req.ks), ("--max-new-tokens", req.max_new_tokens != 256),
        ("--steps", req.steps is not None), (GUIDANCE_FLAG, req.guidance is not None), ("--unmask", req.unmask))
        if given]


def check_job(job: EvalJob) -> None:
    """Every check that needs no model: the task, the options it takes, the request's values, the data file."""
    req = job.request
    if req.task == "perplexity":
        if req.data is None:
            raise DataError("--task perplexity needs --data FILE (JSONL with 'text', or plain text)")
        # Options that only shape generation would be silently ignored by a likelihood evaluation.
        unused = _generation_flags_given(req)
        if unused:
            raise DataError(f"{unused[0]} does not apply to --task perplexity (it scores text, generates nothing)")
        if not as_path(req.data).is_file():
            raise DataError(f"data file not found: {req.data}")
        return
    if req.task not in tasks.TASKS:
        raise DataError(f"unknown task {req.task!r}; choose one of {TASK_NAMES}")
    if job.mc_samples is not None:
        raise DataError("--mc-samples applies to --task perplexity only")
    req.validate()
    try:
        tasks.resolve_format(req.task, req.shots, req.style, req.exemplars)
    except ValueError as e:
        raise DataError(str(e)) from None
    if req.data and not req.data.startswith("hf:"):
        if not as_path(req.data).is_file():
            raise DataError(f"data file not found: {req.data}")
        tasks.load_problems(req.data, req.task, req.limit)


def _perplexity(engine: Engine, job: EvalJob, folder: pathlib.Path,
                progress: Callable[[int, int], None] | None) -> dict:
    from mathlm.train.eval.perplexity import evaluate_perplexity
    req = job.request
    if engine.kind == "arm" and job.mc_samples is not None:
        raise DataError("--mc-samples is for masked diffusion checkpoints; an autoregressive model's likelihood is "
                        "exact")
    metrics = evaluate_perplexity(engine, req.data, req.limit, req.batch_size, progress=progress,
                                  mc_samples=MC_SAMPLES if job.mc_samples is None else job.mc_samples, seed=req.seed)
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"task": req.task, "model": str(engine.run.run_dir), "kind": engine.kind, "step": engine.run.step,
               "n": metrics["documents"], "settings": {"data": req.data, "limit": req.limit}, "metrics": metrics}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_eval(job: EvalJob, progress: Callable[[int, int | None], None] | None = None) -> tuple[dict, pathlib.Path]:
    """Check, load, evaluate; returns (summary, output folder). summary.json (and the task's other files) are in
    the folder. `progress` is called with (0, None) once the checkpoint is loaded, then (done, total) after each
    batch."""
    from mathlm.train.eval.evaluate import evaluate
    from mathlm.train.eval.inference import load_engine
    from mathlm.train.runs import run_dir_of
    check_job(job)
    folder = run_path(job.out) if job.out else output_folder(run_dir_of(job.checkpoint), job.request)
    check_folder(folder, job.overwrite)  # before the model loads: nothing is read or written for a refusal
    engine = load_engine(job.checkpoint, fsdp=job.fsdp)
    if progress:
        progress(0, None)
    if job.request.task == "perplexity":
        summary = _perplexity(engine, job, folder, progress)
        texts = [e.text for e in read_examples([job.request.data])][: job.request.limit]
    else:
        summary = evaluate(engine, job.request, folder, progress=progress)
        texts = [r["prompt"] + r["completion"] for r in map(json.loads, (folder / "samples.jsonl").open())]
    if has_sites(engine.run.model):  # Control-LLM: each merge site's mean gate over this eval's text
        record(summary, engine.run.run_dir, site_gates(engine.run.model, engine.tokenizer, texts,
                                                       engine.run.cfg.model.max_seq_len, job.request.batch_size))
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary, folder
