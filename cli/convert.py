"""`mathlm convert to-hf RUN OUT` and `mathlm convert from-hf HF_DIR OUT`: Hugging Face interchange (+ --verify)."""
from __future__ import annotations

import pathlib
import sys
from typing import Annotated

import typer

from mathlm.cli.errors import one_line_errors

app = typer.Typer(help="Convert between mathlm runs and Hugging Face (transformers) model folders.",
                  no_args_is_help=True)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _verify(run: pathlib.Path | str, hf_dir: pathlib.Path, atol: float) -> None:
    from mathlm.train.convert import format_report, verify
    report = verify(run, hf_dir, atol=atol)
    typer.echo(format_report(report))
    if not report["ok"]:
        raise typer.Exit(code=1)


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
):
    """Export a causal mathlm model as LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases), float32."""
    with one_line_errors():
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
        from mathlm.train.convert import from_hf as import_hf
        if verify:
            from mathlm.train.convert import require_hf_runtime
            require_hf_runtime()
        out = import_hf(hf_dir, out_ckpt, log=_log)
        if verify:
            _verify(out, hf_dir, atol)
