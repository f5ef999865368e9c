"""`mathlm data synth|prepare` and `mathlm tokenizer train`."""
from __future__ import annotations

import itertools
import pathlib
from typing import List

import typer

from mathlm.cli.errors import one_line_errors

data_app = typer.Typer(help="Build corpora and tokenized stores.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train byte-level BPE tokenizers.", no_args_is_help=True)


@data_app.command("synth")
def synth(
    out: pathlib.Path = typer.Option(..., "--out", help="output folder for train/validation/test .jsonl"),
    n: int = typer.Option(50000, "--n", help="number of problems over all splits"),
    seed: int = typer.Option(0, "--seed"),
    min_steps: int = typer.Option(1, "--min-steps", help="fewest reasoning steps per problem (1-5)"),
    max_steps: int = typer.Option(5, "--max-steps", help="most reasoning steps per problem (1-5)"),
    max_value: int = typer.Option(100, "--max-value", help="largest operand"),
):
    """Generate the built-in synthetic grade-school math corpus (GSM8K format, answers checked with sympy)."""
    with one_line_errors():
        from mathlm.data import synth as synth_mod
        try:
            cfg = synth_mod.SynthConfig(n=n, seed=seed, min_steps=min_steps, max_steps=max_steps,
                                        max_value=max_value)
            splits = synth_mod.generate(cfg)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        paths = synth_mod.write_jsonl(splits, out)
        for split, path in paths.items():
            typer.echo(f"{split:10s} {len(splits[split]):7d} problems -> {path}")


@data_app.command("prepare")
def prepare(
    files: List[str] = typer.Argument(..., help="JSONL/text files or globs, or hf:NAME[:SPLIT]"),
    tokenizer: pathlib.Path = typer.Option(..., "--tokenizer", help="tokenizer.json"),
    out: str = typer.Option(..., "--out", help="store path or tensorstore URL (e.g. gs://bucket/tokens)"),
):
    """Tokenize text into a tensorstore token store that `mathlm train` reads (data.train=STORE)."""
    with one_line_errors():
        from mathlm.data.sources import read_examples
        from mathlm.data.store import write_store
        from mathlm.data.tokenizer import Tokenizer
        meta = write_store(out, read_examples(files), Tokenizer.load(tokenizer))
        typer.echo(f"{meta['n_docs']:,} documents, {meta['n_tokens']:,} tokens -> {out}")


@tokenizer_app.command("train")
def train_tok(
    files: List[str] = typer.Argument(..., help="JSONL/text files or globs"),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="tokens incl. pad/bos/eos (a mask token is added)"),
    out: pathlib.Path = typer.Option(pathlib.Path("tokenizer.json"), "--out"),
    max_examples: int = typer.Option(1_000_000, "--max-examples", help="train on at most this many examples"),
):
    """Train a byte-level BPE tokenizer (digits split one per token) and save it as tokenizer.json."""
    with one_line_errors():
        from mathlm.data.sources import read_examples
        from mathlm.data.tokenizer import train_tokenizer
        if vocab_size < 260:
            raise typer.BadParameter("--vocab-size must be at least 260 (256 bytes + specials)")
        texts = (ex.text for ex in itertools.islice(read_examples(files), max_examples))
        tok = train_tokenizer(texts, vocab_size)
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.save(out)
        typer.echo(f"{tok.vocab_size + 1} tokens (mask id {tok.mask_id}) -> {out}")
