"""`mathlm convert to-hf | from-hf` (Hugging Face interchange, + --verify) and `expand | merge-back` (Control-LLM)."""
from __future__ import annotations

import pathlib
import sys
from typing import Annotated

import typer

from mathlm.cli.errors import one_line_errors

app = typer.Typer(help="Convert between mathlm runs and Hugging Face (transformers) model folders; expand a run "
                       "(Control-LLM) and merge an expansion back.",
                  no_args_is_help=True)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _verify(run: pathlib.Path | str, hf_dir: pathlib.Path, atol: float) -> None:
    from mathlm.train.convert import format_report, verify
    report = verify(run, hf_dir, atol=atol)
    typer.echo(format_report(report))
    if not report["ok"]:
        raise typer.Exit(code=1)


def _empty_output(out_dir: pathlib.Path, overwrite: bool) -> None:
    """A model folder is written whole: a non-empty one is refused (no stray files from an earlier export are
    kept beside the new ones), or with --overwrite emptied first."""
    import shutil

    from mathlm.data.sources import DataError, check_writable
    check_writable(out_dir)
    if out_dir.is_file():
        raise DataError(f"{out_dir} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise DataError(f"{out_dir} is not empty: pass --overwrite to replace it, or choose a new folder")
        shutil.rmtree(out_dir)


@app.command("to-hf", no_args_is_help=True)
def to_hf(
    run: Annotated[str, typer.Argument(help="run folder, its checkpoints/ folder or one step folder")],
    out_dir: Annotated[pathlib.Path, typer.Argument(help="Hugging Face model folder to write")],
    verify: Annotated[bool, typer.Option("--verify", help="compare logits with transformers (needs "
                                                          "mathlm[hf])")] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="split model.safetensors above this "
                                                                         "size")] = "5GB",
    atol: Annotated[float, typer.Option("--atol", help="--verify: largest allowed |logit difference| "
                                                       "(float32)")] = 1e-4,
    peft: Annotated[bool, typer.Option("--peft", help="a LoRA run: write the adapter alone in PEFT format "
                                                      "(without it: the merged model)")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty OUT_DIR (its files are "
                                                                "removed first)")] = False,
):
    """Export a causal mathlm model as LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases), float32. A LoRA run
    exports merged (W + s·A·B), or with --peft its adapter alone; a stack expansion as a plain Llama."""
    with one_line_errors():
        _empty_output(out_dir, overwrite)
        if peft:
            from mathlm.train.convert import to_peft
            to_peft(run, out_dir, log=_log)
            return
        from mathlm.train.convert import parse_size
        from mathlm.train.convert import to_hf as export
        if verify:
            from mathlm.train.convert import require_hf_runtime
            require_hf_runtime()  # fail on a missing extra before writing anything
        out = export(run, out_dir, max_shard_bytes=parse_size(max_shard_size), log=_log)
        if verify:
            _verify(run, out, atol)


@app.command("from-hf", no_args_is_help=True)
def from_hf(
    hf_dir: Annotated[pathlib.Path, typer.Argument(help="Hugging Face folder: config.json, *.safetensors, "
                                                        "tokenizer.json")],
    out_ckpt: Annotated[pathlib.Path, typer.Argument(help="mathlm run folder to write (config.yaml + "
                                                          "checkpoints/0)")],
    verify: Annotated[bool, typer.Option("--verify", help="compare logits with transformers (needs "
                                                          "mathlm[hf])")] = False,
    atol: Annotated[float, typer.Option("--atol", help="--verify: largest allowed |logit difference| "
                                                       "(float32)")] = 1e-4,
):
    """Import a Llama, Mistral or Qwen2 checkpoint (safetensors) as a mathlm run, usable by train/generate/eval."""
    with one_line_errors():
        from mathlm.data.sources import check_writable
        from mathlm.train.convert import from_hf as import_hf
        check_writable(out_ckpt)
        if verify:
            from mathlm.train.convert import require_hf_runtime
            require_hf_runtime()
        out = import_hf(hf_dir, out_ckpt, log=_log)
        if verify:
            _verify(out, hf_dir, atol)


@app.command("expand", no_args_is_help=True)
def expand(
    run: Annotated[str, typer.Argument(help="plain run folder (trained here or made by `convert from-hf`)")],
    out_dir: Annotated[pathlib.Path, typer.Argument(help="expanded run folder to write")],
    type_: Annotated[str, typer.Option("--type", help="concat | stack | hybrid")] = "concat",
    num_layers: Annotated[int, typer.Option("--num-layers", help="k: merge sites / inserted blocks; must "
                                                                 "divide the base's layers")] = 8,
    merge: Annotated[str, typer.Option("--merge", help="lerp | slerp | dlerp | dlerpin | moe | proj | "
                                                       "prog")] = "lerp",
    gate_init: Annotated[str, typer.Option("--gate-init", help="gate init f (sigma(0) = 0.5); 'null': lerp "
                                                               "with a = 1")] = "0.0",
    freeze_gate: Annotated[bool, typer.Option("--freeze-gate", help="freeze f / b / c")] = False,
    div_loss: Annotated[str, typer.Option("--div-loss", help="cosine | mse | dot | dot_magnitude | "
                                                             "attention")] = "cosine",
    div_alpha: Annotated[float, typer.Option("--div-alpha", help="divergence weight; 0 off, -1 the "
                                                                 "gate")] = 1.0,
    norm_alpha: Annotated[float, typer.Option("--norm-alpha", help="relaxed norms in the copies; 0 off, "
                                                                   "-1 learned")] = 0.0,
):
    """Control-LLM expansion of a plain run: frozen pretrained blocks beside trainable copies (see
    docs/control-llm.md). OUT is an ordinary run folder for generate, eval, train (model.init_from) and, for
    stack, to-hf."""
    with one_line_errors():
        from mathlm.data.sources import check_writable
        from mathlm.models.expand import ExpandError, ExpandOptions
        from mathlm.train.expansion import expand_run
        check_writable(out_dir)
        try:
            gate = None if gate_init.lower() in ("null", "none") else float(gate_init)
        except ValueError:
            raise ExpandError(f"--gate-init must be a number or null, got {gate_init!r}") from None
        opts = ExpandOptions(type=type_, num_layers=num_layers, merge=merge, gate_init=gate,
                             freeze_gate=freeze_gate, div_loss=div_loss, div_alpha=div_alpha, norm_alpha=norm_alpha)
        expand_run(run, out_dir, opts, log=_log)


@app.command("merge-back", no_args_is_help=True)
def merge_back(
    run: Annotated[str, typer.Argument(help="expanded concat run (merge lerp, slerp, dlerp or dlerpin)")],
    out_dir: Annotated[pathlib.Path, typer.Argument(help="plain run folder to write")],
    data: Annotated[str | None, typer.Option("--data", help="held-out JSONL/text for the deltas (default: "
                                                            "the run's data.validation, or its synthetic "
                                                            "validation split)")] = None,
):
    """Merge each site's two blocks into one in weight space (an approximation) and report max |Δlogit|, the
    per-token KL and the next-token accuracy change against the unmerged model."""
    with one_line_errors():
        from mathlm.data.sources import check_writable
        from mathlm.train.expansion import format_merge_report, merge_back_run
        check_writable(out_dir)
        report = merge_back_run(run, out_dir, data, log=_log)
        typer.echo(format_merge_report(report))
