"""Generation tasks of `mathlm eval` (and of `eval.tasks` after training): generate answers, grade them, report
accuracy, pass@k and maj@k.

Reads top to bottom: problems -> prompts -> completions (n samples each) -> grades -> metrics -> files.
Output folder: summary.json (task, model, kind, n, settings, metrics, throughput), samples.jsonl (one line per
sample) and, with more than one sample per problem, coverage.png (pass@k against k with the "Large Language
Monkeys" fit). `evaluate` runs one request on a loaded engine; `evaluate_after_training` runs a config's
`eval.tasks` on a finished run. The CLI's entry point (checks, engine, perplexity) is train/eval/run.py.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable

from mathlm.data import answers, synth, tasks
from mathlm.data.sources import DataError, as_path, load_hf
from mathlm.models.diffusion import DiffusionSampling
from mathlm.models.generate import ContextOverflow, Sampling
from mathlm.train.eval import scoring
from mathlm.train.eval.inference import (
    Engine,
    complete,
    make_sampling,
    new_token_budget,
)


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    task: str
    data: str | None = None  # a JSONL file, hf:NAME[:CONFIG][:SPLIT] (default split: test), or None for synth
    shots: int | None = 0
    style: str | None = None
    exemplars: str | None = None
    samples: int = 1
    temperature: float = 0.0
    top_k: int | None = None  # autoregressive only (None = 0, all tokens)
    top_p: float | None = None  # autoregressive only (None = 1, off)
    max_new_tokens: int = 256
    limit: int | None = None
    seed: int = 0
    batch_size: int = 16
    ks: tuple[int, ...] | None = None  # pass@k / maj@k; None = 1, 2, 4, ... up to samples
    steps: int | None = None  # masked diffusion only: sampling steps (None = max_new_tokens)
    guidance: float | None = None  # masked diffusion only: unsupervised classifier-free guidance weight (None = 0)
    unmask: str | None = None  # masked diffusion only: low_confidence | ancestral

    def resolved_ks(self) -> tuple[int, ...]:
        if self.ks is not None:
            return tuple(self.ks)
        ks, k = [], 1
        while k <= self.samples:
            ks.append(k)
            k *= 2
        return tuple(ks) if ks[-1] == self.samples else tuple(ks + [self.samples])

    def validate(self) -> None:
        if self.samples < 1:
            raise DataError(f"--samples must be >= 1, got {self.samples}")
        if self.samples > 1 and self.temperature == 0:
            raise DataError("--samples > 1 needs --temperature > 0 (greedy samples are all the same)")
        if self.limit is not None and self.limit < 1:
            raise DataError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise DataError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.ks is not None and min(self.ks) < 1:
            raise DataError(f"--k values must be >= 1, got {min(self.ks)}")
        try:
            scoring.check_sample_budget(self.samples, self.resolved_ks())
        except ValueError as e:
            raise DataError(str(e).replace("raise the sample count", "raise --samples")) from None


# --- problems ---------------------------------------------------------------------------------------------------

def synth_test_file(engine: Engine) -> pathlib.Path:
    """The run's own synthetic test split; regenerated (deterministically, from the run's data settings) if the
    run folder does not have it, e.g. after copying only the checkpoint."""
    return synth.ensure_splits(engine.run.run_dir / "data", synth.SynthConfig.from_data(engine.run.cfg.data))["test"]


def _hf_dataset_file(name: str, out: pathlib.Path) -> pathlib.Path:
    """hf:NAME[:CONFIG][:SPLIT] (default split: test) -> a local JSONL copy (needs `datasets` and the network)."""
    path = out / "hf_data.jsonl"
    with path.open("w") as f:
        f.writelines(json.dumps(rec, default=str) + "\n" for rec in load_hf(name, default_split="test"))
    return path


def load_task_problems(engine: Engine, req: EvalRequest, out: pathlib.Path) -> list[tasks.Problem]:
    if req.data is None:
        if req.task != "synth":
            raise DataError(f"--task {req.task} needs --data FILE.jsonl (or hf:NAME[:SPLIT])")
        path = synth_test_file(engine)
    elif req.data.startswith("hf:"):
        path = _hf_dataset_file(req.data, out)
    else:
        path = as_path(req.data)
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
    problems = tasks.load_problems(path, req.task, req.limit)
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems


# --- metrics ----------------------------------------------------------------------------------------------------

def compute_metrics(task: str, graded: list[list[dict]], ks: tuple[int, ...], seed: int) -> dict:
    """graded[problem][sample] -> accuracy (mean over all samples; greedy when one sample), accuracy per
    extractor, pass@k (Chen et al.) and maj@k (answers grouped by their canonical key)."""
    numeric = tasks.get_task(task).numeric
    flat = [g for row in graded for g in row]
    metrics = {"accuracy": sum(g["correct"] for g in flat) / len(flat)}
    metrics["accuracy_by_extractor"] = {
        name: sum(g["correct_by"][name] for g in flat) / len(flat) for name in flat[0]["correct_by"]}
    n = len(graded[0])
    counts = [sum(g["correct"] for g in row) for row in graded]
    for k, v in scoring.summarize(counts, n, ks).items():
        metrics[f"pass@{k}"] = v
    keys = [[answers.answer_key(g["extracted"], numeric) for g in row] for row in graded]
    correct = [[g["correct"] for g in row] for row in graded]
    for k, v in scoring.summarize_majority(keys, correct, ks, seed=seed).items():
        metrics[f"maj@{k}"] = v
    return metrics


# --- the run ----------------------------------------------------------------------------------------------------

def _sampling_for(engine: Engine, req: EvalRequest, prompts: list[str]) -> Sampling | DiffusionSampling:
    try:
        # One budget for the whole set (a completion must not depend on its batch neighbours); a diffusion model's
        # default step count follows the canvas it really fills.
        budget = new_token_budget(engine, prompts, req.max_new_tokens)
        return make_sampling(engine.kind, budget, req.temperature, req.top_k, req.top_p, req.steps, req.guidance,
                             req.unmask)
    except ContextOverflow as e:  # a prompt as long as the model's context
        raise DataError(f"{e}; use fewer --shots") from None
    except ValueError as e:
        raise DataError(str(e)) from None


def _grade_and_write(req: EvalRequest, style: str, problems: list[tasks.Problem], prompts: list[str],
                     texts: list[str], path: pathlib.Path) -> list[list[dict]]:
    """graded[problem][sample]; one samples.jsonl line per sample (completion j of problem i is texts[i * n + j])."""
    n = req.samples
    graded: list[list[dict]] = []
    with path.open("w") as f:
        for i, prob in enumerate(problems):
            row = []
            for j in range(n):
                completion = texts[i * n + j]
                g = tasks.grade(completion, prob.reference, req.task, style)
                row.append(g)
                f.write(json.dumps({"id": prob.id, "sample": j, "prompt": prompts[i], "completion": completion,
                                    "extracted": g["extracted"], "reference": prob.reference,
                                    "correct": g["correct"], "extracted_by": g["extracted_by"],
                                    "correct_by": g["correct_by"]}) + "\n")
            graded.append(row)
    return graded


def _settings(engine: Engine, req: EvalRequest, fmt: tasks.PromptFormat,
              sampling: Sampling | DiffusionSampling) -> dict:
    return {"data": req.data or "synth test split", "style": fmt.style, "shots": fmt.shots, "samples": req.samples,
            "temperature": req.temperature, "max_new_tokens": sampling.max_new_tokens,
            "max_new_tokens_requested": req.max_new_tokens, "context": engine.run.cfg.model.max_seq_len,
            "seed": req.seed, "stop": list(fmt.stop), "primary_extractor": fmt.extractors[0],
            "maj_tie_rule": "the tied answer sampled first wins; invalid extractions never vote",
            # summary.json keeps the key "cfg" for the guidance weight (files written before the rename read alike).
            **({"steps": sampling.steps, "cfg": sampling.guidance, "unmask": sampling.rule}
               if engine.kind == "mdm" else {"top_k": sampling.top_k, "top_p": sampling.top_p})}


def evaluate(engine: Engine, req: EvalRequest, out: pathlib.Path,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Run one task end to end; returns the summary (also written to out/summary.json)."""
    req.validate()
    out.mkdir(parents=True, exist_ok=True)
    try:
        fmt = tasks.resolve_format(req.task, req.shots, req.style, req.exemplars)
    except ValueError as e:
        raise DataError(str(e)) from None
    problems = load_task_problems(engine, req, out)
    n = req.samples
    prompts = [fmt.prompt(p) for p in problems]
    sampling = _sampling_for(engine, req, prompts)

    # Generation: sample j of problem i is row i * n + j with its own PRNG key, so results do not depend on
    # batch size or order.
    rows = [prompts[i] for i in range(len(problems)) for _ in range(n)]
    total, done = len(rows), 0

    def on_batch(count: int) -> None:
        nonlocal done
        done += count
        if progress:
            progress(done, total)

    t0 = time.perf_counter()
    try:
        gen = complete(engine, rows, sampling, stop=fmt.stop, seed=req.seed, batch_size=req.batch_size,
                       on_batch=on_batch)
    except ValueError as e:  # e.g. guidance without a prompt
        raise DataError(str(e)) from None
    wall = time.perf_counter() - t0

    graded = _grade_and_write(req, fmt.style, problems, prompts, gen.texts, out / "samples.jsonl")
    ks = req.resolved_ks()
    metrics = compute_metrics(req.task, graded, ks, req.seed)
    summary = {
        "task": req.task, "model": str(engine.run.run_dir), "kind": engine.kind, "step": engine.run.step,
        "n": len(problems), "settings": _settings(engine, req, fmt, sampling), "metrics": metrics,
        "throughput": {"seconds": round(wall, 3), "problems_per_sec": len(problems) / wall,
                       "samples_per_sec": total / wall, "new_tokens_per_sec": gen.new_tokens / max(gen.seconds, 1e-9)},
    }
    if n > 1:
        coverage = [metrics[f"pass@{k}"] for k in ks]
        a, b = scoring.coverage_fit(ks, coverage)
        summary["coverage_fit"] = {"form": "pass@k ~ exp(a * k^b)", "a": a, "b": b}
        scoring.plot_coverage(str(out / "coverage.png"), ks, coverage, (a, b),
                              title=f"{req.task}: pass@k, {len(problems)} problems")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate_after_training(cfg, workdir: pathlib.Path, log=print) -> dict[str, dict]:
    """The config's `eval.tasks` on the run's final checkpoint (greedy, zero-shot); returns task -> summary."""
    import jax

    from mathlm.train.eval.inference import load_engine
    from mathlm.train.eval.run import output_folder
    if not cfg.eval.tasks:
        return {}
    if jax.process_count() > 1:  # the decode loop reads results on the host: one process sees all of them
        log("eval.tasks: skipped in a multi-process run; run `mathlm eval` from one host")
        return {}
    engine = load_engine(str(workdir))
    results = {}
    for task in cfg.eval.tasks:
        req = EvalRequest(task, (cfg.eval.data or {}).get(task), limit=cfg.eval.limit,
                          max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                          steps=cfg.eval.steps if engine.kind == "mdm" else None)
        try:
            folder = output_folder(workdir, req)  # training's own evaluation: rewritten with the run
            summary = evaluate(engine, req, folder)
        except DataError as e:  # training itself succeeded; say why its evaluation could not run
            log(f"eval {task}: not run: {e}")
            continue
        m = summary["metrics"]
        log(f"eval {task}: accuracy {m['accuracy']:.2%} on {summary['n']} problems "
            f"({summary['throughput']['problems_per_sec']:.1f} problems/s) -> {folder}")
        results[task] = summary
    return results
