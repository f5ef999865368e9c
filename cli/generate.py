"""`mathlm generate CKPT --prompt "..."`: sample completions from a trained (or imported) model, autoregressive or
masked diffusion (read from the checkpoint). Parses the options, calls train/eval/inference.py, prints."""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Annotated

import typer

from mathlm.cli.errors import one_line_errors


def generate(
    checkpoint: Annotated[str, typer.Argument(help="run folder, its checkpoints/ folder or one step folder")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="prompt text (repeatable)")] = None,
    prompts_file: Annotated[pathlib.Path | None, typer.Option(
        "--prompts", help="JSONL with 'prompt' (or 'question', asked as 'Question: ...\\nAnswer:') per line, "
                          "or a text file with one prompt per line; output is JSONL")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="new tokens per completion at "
                                                                               "most")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy")] = 0.0,
    top_k: Annotated[int | None, typer.Option("--top-k", help="autoregressive models: sample among the k most likely "
                                                              "tokens (default 0, all)")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="autoregressive models: nucleus sampling mass "
                                                                "(default 1, off)")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="stop string (repeatable); EOS always "
                                                                  "stops")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="diffusion models: sampling steps (default: "
                                                              "--max-new-tokens, the canvas length)")] = None,
    guidance: Annotated[float | None, typer.Option("--guidance", "--cfg", help="diffusion models: unsupervised "
                                                   "classifier-free guidance weight (default 0, off)")] = None,
    unmask: Annotated[str | None, typer.Option("--unmask", help="diffusion models: low_confidence (default) or "
                                                                "ancestral")] = None,
    seed: Annotated[int, typer.Option("--seed", help="PRNG seed; sample i uses key fold_in(seed, i)")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="prompts decoded together")] = 16,
    fsdp: Annotated[int, typer.Option("--fsdp", help="shard weights over this many devices (default: "
                                                     "replicate)")] = 1,
):
    """Print a completion for each prompt (stdout); throughput goes to stderr.

    Autoregressive checkpoints decode with a KV cache; masked diffusion checkpoints (read from the checkpoint)
    fill a canvas of --max-new-tokens masks in --steps steps."""
    with one_line_errors():
        from mathlm.data.sources import DataError, read_prompts
        from mathlm.train.eval.inference import generate_texts

        texts = list(prompt or []) + (read_prompts(prompts_file) if prompts_file else [])
        if not texts:
            raise DataError("give --prompt TEXT or --prompts FILE")
        out = generate_texts(checkpoint, texts, fsdp=fsdp, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, steps=steps, guidance=guidance, unmask=unmask,
                             stop=stop or (), seed=seed, batch_size=batch_size)
        for i, (p, c) in enumerate(zip(texts, out.texts)):
            if prompts_file:
                typer.echo(json.dumps({"id": i, "prompt": p, "completion": c}))
            else:
                typer.echo(c if len(texts) == 1 else f"--- [{i}]\n{c}")
        rate = out.new_tokens / max(out.seconds, 1e-9)
        print(f"{len(texts)} completions, {out.new_tokens} new tokens in {out.seconds:.2f} s "
              f"({rate:,.0f} tokens/s, compile included)", file=sys.stderr)
