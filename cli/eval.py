"""`mathlm eval CKPT --task T` (generate + grade) and `mathlm eval score FILE --task T` (re-grade, no model)."""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Optional

import click
import typer
from typer.core import TyperGroup

from mathlm.cli.errors import one_line_errors

TASK_HELP = "synth | gsm8k | math | svamp | mawps | perplexity"


class _DefaultRun(TyperGroup):
    """`mathlm eval CKPT ...` means `mathlm eval run CKPT ...`; `mathlm eval score ...` stays a subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(cls=_DefaultRun, no_args_is_help=True,
                       help="Evaluate a model on a math task, or re-grade saved completions (`eval score`).")


def _ks(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--k takes comma-separated integers, got {text!r}") from None


def _table(rows: list[tuple[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console(file=sys.stdout).print(table)


@eval_app.command("run", no_args_is_help=True)
def run(
    checkpoint: str = typer.Argument(..., help="run folder, its checkpoints/ folder or one step folder"),
    task: str = typer.Option(..., "--task", help=TASK_HELP),
    data: Optional[str] = typer.Option(None, "--data", help="task file (JSONL) or hf:NAME[:SPLIT]; synth needs none"),
    shots: int = typer.Option(0, "--shots", help="0 (Question/Answer), gsm8k-like 5 (lm-eval) or 8 (Wei CoT), "
                                                 "math 4 (Minerva)"),
    style: Optional[str] = typer.Option(None, "--style", help="qa | boxed | lm-eval | cot | minerva (default: from "
                                                              "--shots)"),
    exemplars: Optional[pathlib.Path] = typer.Option(None, "--exemplars", help="few-shot exemplar file (JSON)"),
    samples: int = typer.Option(1, "--samples", help="completions per problem (pass@k, maj@k, coverage plot)"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="autoregressive models (default 0, all tokens)"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="autoregressive models (default 1, off)"),
    k: Optional[str] = typer.Option(None, "--k", help="pass@k / maj@k values, e.g. 1,4,16 (default 1,2,4,..)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="new tokens (diffusion: canvas length)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="diffusion models: sampling steps (default: -n)"),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="diffusion models: unsupervised classifier-free guidance "
                                                            "weight (default 0, off)"),
    unmask: Optional[str] = typer.Option(None, "--unmask", help="diffusion models: low_confidence | ancestral"),
    mc_samples: Optional[int] = typer.Option(None, "--mc-samples", help="diffusion models, perplexity: Monte-Carlo "
                                                                         "ELBO samples per chunk (default 128)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N problems (or documents) only"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(16, "--batch-size"),
    fsdp: int = typer.Option(1, "--fsdp", help="shard weights over this many devices (default: replicate)"),
    out: Optional[pathlib.Path] = typer.Option(None, "--out", help="output folder (default: RUN/eval/TASK)"),
    no_progress: bool = typer.Option(False, "--no-progress"),
):
    """Generate and grade: writes summary.json, samples.jsonl (and coverage.png with --samples > 1)."""
    with one_line_errors():
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.console import Console

        from mathlm.data.sources import DataError
        from mathlm.train.eval.inference import load_engine

        if task != "perplexity":
            from mathlm.data.tasks import TASKS
            if task not in TASKS:
                raise DataError(f"unknown task {task!r}; choose one of {TASK_HELP}")
        else:
            if data is None:
                raise DataError("--task perplexity needs --data FILE (JSONL with 'text', or plain text)")
            # Options that only shape generation would be silently ignored by a likelihood evaluation.
            unused = [flag for flag, given in (
                ("--shots", shots != 0), ("--style", style), ("--exemplars", exemplars), ("--samples", samples != 1),
                ("--temperature", temperature != 0), ("--top-k", top_k is not None), ("--top-p", top_p is not None),
                ("--k", k), ("--max-new-tokens", max_new_tokens != 256), ("--steps", steps is not None),
                ("--cfg", cfg is not None), ("--unmask", unmask)) if given]
            if unused:
                raise DataError(f"{unused[0]} does not apply to --task perplexity (it scores text, generates nothing)")
        if task != "perplexity" and mc_samples is not None:
            raise DataError("--mc-samples applies to --task perplexity only")
        req = None
        if task != "perplexity":
            from mathlm.data import tasks
            from mathlm.train.eval.evaluate import EvalRequest
            req = EvalRequest(task, data, shots, style, str(exemplars) if exemplars else None, samples,
                              temperature, top_k, top_p, max_new_tokens, limit, seed, batch_size, _ks(k),
                              steps, cfg, unmask)
            # Every check that needs no model runs before the (possibly large) checkpoint is loaded.
            req.validate()
            try:
                tasks.resolve_format(task, shots, style, req.exemplars)
            except ValueError as e:
                raise DataError(str(e)) from None
            if data and not data.startswith("hf:"):
                if not pathlib.Path(data).is_file():
                    raise DataError(f"data file not found: {data}")
                tasks.load_problems(data, task, limit)
        elif not pathlib.Path(data).is_file():
            raise DataError(f"data file not found: {data}")
        engine = load_engine(checkpoint, fsdp=fsdp)
        folder = out or engine.run.run_dir / "eval" / task
        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeRemainingColumn(), console=Console(file=sys.stderr), disable=no_progress)
        with progress:
            bar = progress.add_task(task, total=None)
            update = lambda done, total: progress.update(bar, completed=done, total=total)
            if task == "perplexity":
                from mathlm.train.eval.perplexity import evaluate_perplexity
                if engine.kind == "arm" and mc_samples is not None:
                    raise DataError("--mc-samples is for masked diffusion checkpoints; an autoregressive model's "
                                    "likelihood is exact")
                metrics = evaluate_perplexity(engine, data, limit, batch_size, progress=update,
                                              mc_samples=128 if mc_samples is None else mc_samples, seed=seed)
                folder.mkdir(parents=True, exist_ok=True)
                summary = {"task": task, "model": str(engine.run.run_dir), "kind": engine.kind, "step": engine.run.step,
                           "n": metrics["documents"], "settings": {"data": data, "limit": limit},
                           "metrics": metrics}
                (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            else:
                from mathlm.train.eval.evaluate import evaluate
                summary = evaluate(engine, req, folder, progress=update)
        m = summary["metrics"]
        rows = [(key, f"{v:.4f}" if isinstance(v, float) else str(v)) for key, v in m.items()
                if not isinstance(v, dict)]
        rows += [(f"accuracy ({name})", f"{v:.4f}") for name, v in m.get("accuracy_by_extractor", {}).items()]
        _table(rows, f"{task}: {summary['n']} {'documents' if task == 'perplexity' else 'problems'}")
        asked, used = summary["settings"].get("max_new_tokens_requested"), summary["settings"].get("max_new_tokens")
        if asked is not None and used != asked:
            typer.echo(f"note: --max-new-tokens {asked} shortened to {used}, what the context of "
                       f"{summary['settings']['context']} leaves after the longest prompt", err=True)
        if "accuracy" in m:
            typer.echo(f"{task} accuracy: {m['accuracy']:.2%} ({summary['n']} problems) -> {folder}")
        else:
            bound = " (upper bounds: Monte-Carlo ELBO)" if engine.kind == "mdm" else ""
            typer.echo(f"perplexity {m['token_perplexity']:.4g}, bits/byte {m['bits_per_byte']:.4g}{bound} -> {folder}")


@eval_app.command("score", no_args_is_help=True)
def score(
    samples_file: pathlib.Path = typer.Argument(..., help="JSONL: 'completion' plus 'reference' or the task's fields"),
    task: str = typer.Option(..., "--task", help="synth | gsm8k | math | svamp | mawps"),
    style: Optional[str] = typer.Option(None, "--style", help="prompt style the completions answer (default: qa)"),
    out: Optional[pathlib.Path] = typer.Option(None, "--out", help="write the lines back with extracted/correct"),
):
    """Re-grade saved completions from any model (no model needed) and print the accuracy."""
    with one_line_errors():
        from mathlm.data import tasks
        from mathlm.data.sources import DataError
        if task not in tasks.TASKS:
            raise DataError(f"unknown task {task!r}; choose one of {', '.join(tasks.TASKS)}")
        if not samples_file.is_file():
            raise DataError(f"file not found: {samples_file}")
        try:
            scored = list(tasks.score_file(samples_file, task, style))
        except ValueError as e:
            raise DataError(str(e)) from None
        if not scored:
            raise DataError(f"{samples_file}: no lines")
        if out:
            with open(out, "w") as f:
                for rec in scored:
                    f.write(json.dumps(rec) + "\n")
        flags = [c for rec in scored for c in (rec["correct"] if isinstance(rec["correct"], list)
                                               else [rec["correct"]])]
        typer.echo(f"{task} accuracy: {sum(flags) / len(flags):.2%} ({sum(flags)}/{len(flags)})"
                   + (f" -> {out}" if out else ""))
