"""`mathlm generate CKPT --prompt "..."`: sample completions from a trained (or imported) causal model."""
from __future__ import annotations

import json
import pathlib
import sys
from typing import List, Optional

import typer

from mathlm.cli.errors import one_line_errors


def _read_prompts(path: pathlib.Path) -> list[str]:
    from mathlm.data.sources import DataError, qa_prompt
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if "prompt" in rec:
            prompts.append(str(rec["prompt"]))
        elif "question" in rec:
            prompts.append(qa_prompt(str(rec["question"])))
        else:
            raise DataError(f"{path}:{n}: a prompts line needs a 'prompt' (or 'question') field")
    return prompts


def generate(
    checkpoint: str = typer.Argument(..., help="run folder, its checkpoints/ folder or one step folder"),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="prompt text (repeatable)"),
    prompts_file: Optional[pathlib.Path] = typer.Option(
        None, "--prompts", help="JSONL with 'prompt' (or 'question', asked as 'Question: ...\\nAnswer:') per line, "
                                "or a text file with one prompt per line; output is JSONL"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="new tokens per completion at most"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="autoregressive models: sample among the k most likely "
                                                           "tokens (default 0, all)"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="autoregressive models: nucleus sampling mass "
                                                               "(default 1, off)"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="stop string (repeatable); EOS always stops"),
    steps: Optional[int] = typer.Option(None, "--steps", help="diffusion models: sampling steps (default: "
                                                             "--max-new-tokens, the canvas length)"),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="diffusion models: unsupervised classifier-free guidance "
                                                            "weight (default 0, off)"),
    unmask: Optional[str] = typer.Option(None, "--unmask", help="diffusion models: low_confidence (default) or "
                                                                "ancestral"),
    seed: int = typer.Option(0, "--seed", help="PRNG seed; sample i uses key fold_in(seed, i)"),
    batch_size: int = typer.Option(16, "--batch-size", help="prompts decoded together"),
    fsdp: int = typer.Option(1, "--fsdp", help="shard weights over this many devices (default: replicate)"),
):
    """Print a completion for each prompt (stdout); throughput goes to stderr.

    Autoregressive checkpoints decode with a KV cache; masked diffusion checkpoints (read from the checkpoint)
    fill a canvas of --max-new-tokens masks in --steps steps."""
    with one_line_errors():
        from mathlm.data.sources import DataError
        from mathlm.models.generate import ContextOverflow
        from mathlm.train.eval.inference import complete, load_engine, make_sampling

        texts = list(prompt or []) + (_read_prompts(prompts_file) if prompts_file else [])
        if not texts:
            raise DataError("give --prompt TEXT or --prompts FILE")
        if batch_size < 1:
            raise DataError(f"--batch-size must be >= 1, got {batch_size}")
        engine = load_engine(checkpoint, fsdp=fsdp)
        try:
            sampling = make_sampling(engine.kind, max_new_tokens, temperature, top_k, top_p, steps, cfg, unmask)
        except ValueError as e:
            raise DataError(str(e)) from None
        try:
            out = complete(engine, texts, sampling, stop=stop or (), seed=seed, batch_size=batch_size)
        except (ContextOverflow, ValueError) as e:  # too long for the context; CFG without a prompt
            raise DataError(str(e)) from None
        for i, (p, c) in enumerate(zip(texts, out.texts)):
            if prompts_file:
                typer.echo(json.dumps({"id": i, "prompt": p, "completion": c}))
            else:
                typer.echo(c if len(texts) == 1 else f"--- [{i}]\n{c}")
        rate = out.new_tokens / max(out.seconds, 1e-9)
        print(f"{len(texts)} completions, {out.new_tokens} new tokens in {out.seconds:.2f} s "
              f"({rate:,.0f} tokens/s, compile included)", file=sys.stderr)
