"""`mathlm train CONFIG [key=value ...]`."""
from __future__ import annotations

import json
import pathlib
from typing import Annotated

import typer

from mathlm.cli.errors import one_line_errors


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _verdict(report: dict) -> None:
    """The last line a launcher greps: `fits: yes`, or `fits: no` with the reason and a non-zero exit."""
    if report["fits"]:
        typer.echo(f"fits: yes ({_human(report['bytes_step_peak_per_device'])} peak of "
                   f"{_human(report['hbm_bytes_per_device'])} HBM per chip on {report['topology']}, "
                   f"libtpu {report['libtpu_version']})")
        return
    reason = report.get("reason") or (f"peak {_human(report['bytes_step_peak_per_device'])} > "
                                      f"{_human(report['hbm_bytes_per_device'])} HBM per chip")
    typer.echo(f"fits: no ({reason})")
    raise typer.Exit(code=1)


def topology_for(name: str | None, slices: int, dry_run: bool):
    """--topology/--slices as a train.topology.Topology (None without --topology), its environment set before jax
    starts; a bad name, or --topology without --dry-run, is one line and exit 2."""
    if name is None:
        return None
    if not dry_run:
        typer.echo("error: --topology needs --dry-run (it compiles for a TPU slice; it cannot train)", err=True)
        raise typer.Exit(code=2)
    from mathlm.train import topology as topo_mod
    try:
        topo = topo_mod.parse(name, slices)
    except topo_mod.TopologyError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None
    topo_mod.prepare_environment(topo)
    return topo


def train(
    config: Annotated[pathlib.Path, typer.Argument(help="YAML recipe, e.g. configs/math-tiny.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="dotted overrides after the config, e.g. train.steps=200 train.seed=1 model.init_from=runs/a")] = None,
    workdir: Annotated[pathlib.Path | None, typer.Option(
        "--workdir", "-w", help="run folder (default: runs/<config name>); an existing one is resumed")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="compile the step for the mesh, print size/FLOPs/memory, exit")] = False,
    no_progress: Annotated[bool, typer.Option(
        "--no-progress", help="plain log lines instead of a progress bar")] = False,
    topology: Annotated[str | None, typer.Option(
        "--topology", help="with --dry-run: compile for this TPU slice (e.g. v5e-8, v4-16, v6e-256) on this "
        "host with libtpu (the tpu extra) and report per-chip memory and whether it fits")] = None,
    slices: Annotated[int, typer.Option("--slices", help="with --topology: number of slices (multislice)")] = 1,
    resume_from: Annotated[int | None, typer.Option(
        "--resume-from", help="resume from this checkpoint step instead of the latest (later ones are moved "
        "aside to checkpoints-superseded/, not deleted)")] = None,
):
    """Train a model from a YAML config. Rerunning on a workdir with checkpoints resumes from the latest one."""
    topo = topology_for(topology, slices, dry_run)
    from mathlm.train import preemption
    with one_line_errors(), preemption.handling() as preempt:
        from mathlm.train.config import load_config
        from mathlm.train.runs import adopt_init_variant
        cfg = adopt_init_variant(load_config(config, overrides or []))
        if dry_run:
            if topo is not None:
                from mathlm.train import topology as topo_mod
                report = topo_mod.dry_run(cfg, topo)
            else:
                from mathlm.train.trainer import dry_run as run_dry
                report = run_dry(cfg)
            for k, v in report.items():
                shown = _human(v) if k.startswith(("bytes_", "hbm_")) else (f"{v:.3e}" if "flops" in k else v)
                typer.echo(f"{k:34s} {shown}")
            typer.echo(json.dumps(report))
            if topology is not None:
                _verdict(report)
            return
        from mathlm.train.loop import train as run_train
        from mathlm.train.paths import run_path
        wd = run_path(workdir or pathlib.Path("runs") / config.stem)  # a folder, or a URI such as gs://bucket/run
        last = run_train(cfg, wd, show_progress=not no_progress, resume_from=resume_from)
        if last.get("preempted"):
            return
        keys = ("loss", "eval/loss", "eval/ppl", "eval/bpb", "tokens_per_sec")
        summary = ", ".join(f"{k} {last[k]:.4g}" for k in keys if k in last)
        from mathlm.train.objectives import spec_of
        label = spec_of(cfg).eval_label
        if label and "eval/loss" in last:
            summary += f" (eval: {label})"
        typer.echo(f"done: step {last['step']} in {wd}: {summary}")
        from mathlm.train.eval.evaluate import evaluate_after_training
        try:
            preempt.past_last_save()  # the checkpoint is complete: a SIGTERM from here ends the command, exit 0
            evaluate_after_training(cfg, wd, log=typer.echo)
        except preemption.Preempted:
            typer.echo(f"stopping: SIGTERM after the last checkpoint (step {last['step']}); the evaluation after "
                       f"training was skipped: `mathlm eval {wd}` runs it", err=True)
