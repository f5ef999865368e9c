"""`mathlm data synth|prepare` and `mathlm tokenizer train`."""
from __future__ import annotations

import itertools
import pathlib
from typing import Annotated

import typer

from mathlm.cli.errors import one_line_errors

data_app = typer.Typer(help="Build corpora and tokenized stores.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train byte-level BPE tokenizers.", no_args_is_help=True)


@data_app.command("synth")
def synth(
    out: Annotated[pathlib.Path, typer.Option("--out", help="output folder for train/validation/test .jsonl")],
    n: Annotated[int, typer.Option("--n", help="number of problems over all splits")] = 50000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    min_steps: Annotated[int, typer.Option("--min-steps", help="fewest reasoning steps per problem (1-5)")] = 1,
    max_steps: Annotated[int, typer.Option("--max-steps", help="most reasoning steps per problem (1-5)")] = 5,
    max_value: Annotated[int, typer.Option("--max-value", help="largest operand")] = 100,
):
    """Generate the built-in synthetic grade-school math corpus (GSM8K format, answers checked with sympy)."""
    with one_line_errors():
        from mathlm.data import synth as synth_mod
        from mathlm.data.sources import DataError, check_writable
        if n < 1:
            raise DataError(f"--n must be >= 1 (problems over all splits), got {n}")
        check_writable(out)
        try:
            cfg = synth_mod.SynthConfig(n=n, seed=seed, min_steps=min_steps, max_steps=max_steps,
                                        max_value=max_value)
            splits = synth_mod.generate(cfg)
        except ValueError as e:
            raise DataError(str(e)) from None
        paths = synth_mod.write_jsonl(splits, out)
        for split, path in paths.items():
            typer.echo(f"{split:10s} {len(splits[split]):7d} problems -> {path}")


@data_app.command("prepare")
def prepare(
    files: Annotated[list[str], typer.Argument(help="JSONL/text files or globs, or hf:NAME[:SPLIT]")],
    tokenizer: Annotated[pathlib.Path, typer.Option("--tokenizer", help="tokenizer.json")],
    out: Annotated[str, typer.Option("--out", help="store path or tensorstore URL (e.g. gs://bucket/tokens)")],
):
    """Tokenize text into a tensorstore token store that `mathlm train` reads (data.train=STORE)."""
    with one_line_errors():
        from mathlm.data.sources import check_writable, read_examples
        from mathlm.data.store import write_store
        from mathlm.data.tokenizer import Tokenizer
        if "://" not in out or out.startswith("file://"):
            check_writable(out.removeprefix("file://"))  # before tokenizing
        meta = write_store(out, read_examples(files), Tokenizer.load(tokenizer))
        typer.echo(f"{meta['n_docs']:,} documents, {meta['n_tokens']:,} tokens -> {out}")


@tokenizer_app.command("train")
def train_tok(
    files: Annotated[list[str], typer.Argument(help="JSONL/text files or globs")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="tokens incl. pad/bos/eos (a mask token is "
                                                                 "added)")] = 4096,
    out: Annotated[pathlib.Path, typer.Option("--out")] = pathlib.Path("tokenizer.json"),
    max_examples: Annotated[int, typer.Option("--max-examples", help="train on at most this many "
                                                                     "examples")] = 1_000_000,
):
    """Train a byte-level BPE tokenizer (digits split one per token) and save it as tokenizer.json."""
    with one_line_errors():
        from mathlm.data.sources import DataError, check_writable, read_examples
        from mathlm.data.tokenizer import train_tokenizer
        if vocab_size < 260:
            raise DataError(f"--vocab-size must be at least 260 (256 bytes + specials), got {vocab_size}")
        if out.is_dir():
            raise DataError(f"--out {out} is a folder; give the file to write, e.g. {out / 'tokenizer.json'}")
        check_writable(out.parent)  # before training
        texts = (ex.text for ex in itertools.islice(read_examples(files), max_examples))
        tok = train_tokenizer(texts, vocab_size)
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.save(out)
        typer.echo(f"{tok.vocab_size + 1} tokens (mask id {tok.mask_id}) -> {out}")
