"""`mathlm eval CKPT --task T` (generate + grade, or perplexity) and `mathlm eval score FILE --task T` (re-grade,
no model). Each command parses its options, calls one function (train/eval/run.py `run_eval`, data/tasks.py
`rescore_file`) and prints the result."""
from __future__ import annotations

import contextlib
import pathlib
import sys
from typing import Annotated

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
        from mathlm.data.sources import DataError
        raise DataError(f"--k takes comma-separated integers, got {text!r}") from None


def _table(rows: list[tuple[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console(file=sys.stdout).print(table)


@contextlib.contextmanager
def _progress_bar(description: str, disable: bool):
    """A progress(done, total) callback for run_eval; the bar (stderr) appears at its first call, once the job has
    passed its checks and the checkpoint is loaded."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeRemainingColumn(), console=Console(file=sys.stderr), disable=disable)
    bar = None

    def update(done: int, total: int | None) -> None:
        nonlocal bar
        if bar is None:
            progress.start()
            bar = progress.add_task(description, total=total)
        progress.update(bar, completed=done, total=total)

    try:
        yield update
    finally:
        if bar is not None:  # a stopped bar that never started still writes a blank line to stderr
            progress.stop()


def _report(summary: dict, folder: pathlib.Path) -> None:
    """The metrics table, a note when the new-token budget was shortened, and the one-line result."""
    task, m = summary["task"], summary["metrics"]
    rows = [(key, f"{v:.4f}" if isinstance(v, float) else str(v)) for key, v in m.items() if not isinstance(v, dict)]
    rows += [(f"accuracy ({name})", f"{v:.4f}") for name, v in m.get("accuracy_by_extractor", {}).items()]
    _table(rows, f"{task}: {summary['n']} {'documents' if task == 'perplexity' else 'problems'}")
    asked, used = summary["settings"].get("max_new_tokens_requested"), summary["settings"].get("max_new_tokens")
    if asked is not None and used != asked:
        typer.echo(f"note: --max-new-tokens {asked} shortened to {used}, what the context of "
                   f"{summary['settings']['context']} leaves after the longest prompt", err=True)
    if "accuracy" in m:
        typer.echo(f"{task} accuracy: {m['accuracy']:.2%} ({summary['n']} problems) -> {folder}")
    else:
        bound = " (upper bounds: Monte-Carlo ELBO)" if summary["kind"] == "mdm" else ""
        typer.echo(f"perplexity {m['token_perplexity']:.4g}, bits/byte {m['bits_per_byte']:.4g}{bound} -> {folder}")


@eval_app.command("run", no_args_is_help=True)
def run(
    checkpoint: Annotated[str, typer.Argument(help="run folder, its checkpoints/ folder or one step folder")],
    task: Annotated[str, typer.Option("--task", help=TASK_HELP)],
    data: Annotated[str | None, typer.Option(
        "--data", help="task file (JSONL) or hf:NAME[:SPLIT]; synth needs none")] = None,
    shots: Annotated[int, typer.Option("--shots", help="0 (Question/Answer), gsm8k-like 5 (lm-eval) or 8 (Wei CoT), "
                                                       "math 4 (Minerva)")] = 0,
    style: Annotated[str | None, typer.Option("--style", help="qa | boxed | lm-eval | cot | minerva (default: from "
                                                              "--shots)")] = None,
    exemplars: Annotated[pathlib.Path | None, typer.Option("--exemplars", help="few-shot exemplar file (JSON)")] = None,
    samples: Annotated[int, typer.Option("--samples", help="completions per problem (pass@k, maj@k, coverage "
                                                           "plot)")] = 1,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy")] = 0.0,
    top_k: Annotated[int | None, typer.Option("--top-k", help="autoregressive models (default 0, all tokens)")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="autoregressive models (default 1, off)")] = None,
    k: Annotated[str | None, typer.Option("--k", help="pass@k / maj@k values, e.g. 1,4,16 (default 1,2,4,..)")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="new tokens (diffusion: canvas "
                                                                               "length)")] = 256,
    steps: Annotated[int | None, typer.Option("--steps", help="diffusion models: sampling steps (default: "
                                                              "-n)")] = None,
    guidance: Annotated[float | None, typer.Option("--guidance", "--cfg", help="diffusion models: unsupervised "
                                                   "classifier-free guidance weight (default 0, off)")] = None,
    unmask: Annotated[str | None, typer.Option("--unmask", help="diffusion models: low_confidence | "
                                                                "ancestral")] = None,
    mc_samples: Annotated[int | None, typer.Option("--mc-samples", help="diffusion models, perplexity: Monte-Carlo "
                                                                        "ELBO samples per chunk (default 128)")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="first N problems (or documents) only")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    fsdp: Annotated[int, typer.Option("--fsdp", help="shard weights over this many devices (default: "
                                                     "replicate)")] = 1,
    out: Annotated[pathlib.Path | None, typer.Option("--out", help="output folder (default: RUN/eval/TASK, or "
                                                   "RUN/eval/TASK/SETTINGS for non-default settings, e.g. "
                                                   "limit50-shots8)")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace an evaluation already in that folder")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
):
    """Generate and grade: writes summary.json, samples.jsonl (and coverage.png with --samples > 1)."""
    with one_line_errors():
        from mathlm.train.eval.evaluate import EvalRequest
        from mathlm.train.eval.run import EvalJob, run_eval

        request = EvalRequest(task, data, shots, style, str(exemplars) if exemplars else None, samples, temperature,
                              top_k, top_p, max_new_tokens, limit, seed, batch_size, _ks(k), steps, guidance, unmask)
        job = EvalJob(checkpoint, request, mc_samples=mc_samples, fsdp=fsdp, out=out, overwrite=overwrite)
        with _progress_bar(task, disable=no_progress) as update:
            summary, folder = run_eval(job, progress=update)
        _report(summary, folder)


@eval_app.command("score", no_args_is_help=True)
def score(
    samples_file: Annotated[pathlib.Path, typer.Argument(
        help="JSONL: 'completion' plus 'reference' or the task's fields")],
    task: Annotated[str, typer.Option("--task", help="synth | gsm8k | math | svamp | mawps")],
    style: Annotated[str | None, typer.Option("--style", help="prompt style the completions answer (default: "
                                                              "qa)")] = None,
    out: Annotated[pathlib.Path | None, typer.Option("--out", help="write the lines back with "
                                                                   "extracted/correct")] = None,
):
    """Re-grade saved completions from any model (no model needed) and print the accuracy."""
    with one_line_errors():
        from mathlm.data import tasks
        correct, total = tasks.rescore_file(samples_file, task, style, out)
        typer.echo(f"{task} accuracy: {correct / total:.2%} ({correct}/{total})" + (f" -> {out}" if out else ""))
