"""`mathlm w2s`: weak-to-strong reasoning (Yang, Ma, Liu 2024), one command per step plus `run` and `status`."""
from __future__ import annotations

import json
import pathlib
from typing import Annotated

import typer

from mathlm.cli.errors import one_line_errors

app = typer.Typer(help="Weak-to-strong reasoning: consistency-filtered SFT (iterated), then DPO/ORPO on "
                       "self-picked pairs. A rerun skips steps that are done; a changed config redoes what it "
                       "changes and everything after it.", no_args_is_help=True)

ConfigArg = Annotated[pathlib.Path, typer.Argument(help="w2s recipe YAML, e.g. configs/w2s-synth.yaml")]
Overrides = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. stage1.rounds=1 pairs.tau=0.7")]
Workdir = Annotated[pathlib.Path | None, typer.Option(
    "--workdir", "-w", help="pipeline folder (default: runs/<config name>)")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars for the training runs")]


def _setup(config: pathlib.Path, overrides, workdir):
    from mathlm.train.w2s.config import load
    cfg = load(config, overrides or [])
    return cfg, (workdir or pathlib.Path("runs") / config.stem)


def _log():
    from mathlm.train.metrics import console
    return lambda m: console.print(m, highlight=False)


def _run_steps(config, overrides, workdir, progress, **select) -> None:
    with one_line_errors():
        from mathlm.train.w2s import pipeline
        cfg, wd = _setup(config, overrides, workdir)
        chosen = pipeline.select(pipeline.units_of(cfg), **select)
        if not chosen:
            typer.echo("nothing to do: no unit of this config belongs to that step/round")
            return
        result = pipeline.run(cfg, wd, chosen, log=_log(), show_progress=progress)
        ran = [n for n, s in result.items() if s == "ran"]
        if "stopped" in result.values():
            typer.echo(f"stopped in {wd} after {len(ran)} step(s); rerun the same command to resume")
            return
        typer.echo(f"done in {wd}: ran {len(ran)}, already done {len(result) - len(ran)}")


@app.command()
def run(config: ConfigArg, overrides: Overrides = None, workdir: Workdir = None,
        start: Annotated[str | None, typer.Option("--from", help="first step to run")] = None,
        stop: Annotated[str | None, typer.Option("--to", help="last step to run")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="compile the recipe's training steps for "
                                               "their mesh (no weights, no data); print sizes and memory")] = False,
        only: Annotated[list[str] | None, typer.Option("--only", help="with --dry-run: compile only this program "
                                                       "(weak_sft, strong_sft_lora, strong_dpo_lora, "
                                                       "strong_orpo_lora); repeatable")] = None,
        topology: Annotated[str | None, typer.Option(
            "--topology", help="with --dry-run: compile for this TPU slice (e.g. v5p-64) with libtpu (the tpu "
            "extra); per-chip memory and whether each program fits")] = None,
        slices: Annotated[int, typer.Option("--slices", help="with --topology: number of slices")] = 1,
        progress: Progress = False):
    """Run the whole pipeline (or --from/--to a range of steps): prepare, weak-gen, icl-gen, filter, sft, regen,
    sample, pairs, po, eval, report."""
    if dry_run:
        _dry_run(config, overrides, workdir, only, topology, slices)
        return
    from mathlm.cli.train import topology_for
    topology_for(topology, slices, dry_run=False)  # --topology without --dry-run: one line, exit 2
    _run_steps(config, overrides, workdir, progress, start=start, stop=stop)


def _dry_line(name: str, r: dict) -> str:
    from mathlm.cli.train import _human
    if "params" not in r:  # a TPU compile refused for memory: only the verdict
        return f"{name:18s} does not fit on {r['topology']}: {r['reason']}"
    temp = r.get("bytes_step_temp_per_device")
    line = (f"{name:18s} params {r['params']:,} ({r['params_trainable']:,} trainable) on mesh {r['mesh']}; "
            f"per device: params {_human(r['bytes_params_per_device'])}, optimizer "
            f"{_human(r['bytes_opt_state_per_device'])}" + (f", step temp {_human(temp)}" if temp is not None else "")
            + f"; {r['flops_per_step_model']:.3e} FLOPs/step; compiled in {r['compile_seconds']} s")
    if "fits" in r:
        line += (f"; peak {_human(r['bytes_step_peak_per_device'])} of {_human(r['hbm_bytes_per_device'])} HBM "
                 f"per chip: {'fits' if r['fits'] else 'does not fit'}")
    return line


def _dry_run(config, overrides, workdir, only, topology: str | None, slices: int) -> None:
    """Compile the recipe's programs, a line each as it compiles, then the JSON of all reports. With --topology
    the last line is the verdict (`fits: yes`, or `fits: no` naming the programs, exit 1)."""
    from mathlm.cli.train import topology_for
    topo = topology_for(topology, slices, dry_run=True)
    with one_line_errors():
        from mathlm.train.w2s.dry_run import dry_run as run_dry
        cfg, _ = _setup(config, overrides, workdir)
        reports = {}
        for name, r in run_dry(cfg, only, topo):
            reports[name] = r
            typer.echo(_dry_line(name, r))
        typer.echo(json.dumps(reports))
    if topo is not None:
        too_big = [n for n, r in reports.items() if not r["fits"]]
        if too_big:
            typer.echo(f"fits: no ({', '.join(too_big)} on {topology})")
            raise typer.Exit(code=1)
        typer.echo(f"fits: yes (every program on {topology}, libtpu {next(iter(reports.values()))['libtpu_version']})")


def _step_command(step: str, doc: str):
    def command(config: ConfigArg, overrides: Overrides = None, workdir: Workdir = None,
                round_: Annotated[int | None, typer.Option("--round", help="only this round (Stage I steps)")] = None,
                progress: Progress = False):
        _run_steps(config, overrides, workdir, progress, step=step, round_=round_)
    command.__doc__ = doc
    app.command(name=step, no_args_is_help=True)(command)


for _step, _doc in [
    ("prepare", "Write the splits (and, in the synthetic setting, pretrain the strong and weak models)."),
    ("weak-gen", "Round 1: the weak model answers every split-2 question zero-shot, greedily (D1_weak)."),
    ("icl-gen", "Round 1: draw the demonstrations; the strong base answers 4-shot, greedily (D1_icl)."),
    ("filter", "Keep the questions whose weak and ICL answers agree; write the weak / icl / hybrid sets."),
    ("sft", "LoRA-fine-tune the strong base on each kept set (fresh adapters every round)."),
    ("regen", "Rounds >= 2: the previous round's weak-ft and icl-ft models answer split 2 zero-shot."),
    ("sample", "Stage II: merge M_plus, then sample every split-2 question n times."),
    ("pairs", "Stage II: majority vote against the weak answer; write the preference pairs."),
    ("po", "Stage II: DPO / ORPO with a new adapter on the merged M_plus (M_pro)."),
    ("eval", "Train the naive and gold-ceiling baselines; score every model on the test split; pass@k."),
    ("report", "results.json (accuracies, PGR, filter and pair statistics) and results.png."),
]:
    _step_command(_step, _doc)


@app.command()
def status(workdir: Annotated[pathlib.Path, typer.Argument(help="a w2s pipeline folder")]):
    """Every step of the pipeline in a workdir: done (with its time), stale (config or inputs changed), partial
    (a generation pass that was interrupted) or pending."""
    with one_line_errors():
        from mathlm.train.w2s.status import table
        typer.echo(table(workdir))
