"""`mathlm`: one CLI for training and evaluating math language models."""
from __future__ import annotations

import typer

from mathlm.cli import convert as convert_cmd
from mathlm.cli import data as data_cmd
from mathlm.cli import eval as eval_cmd
from mathlm.cli import generate as generate_cmd
from mathlm.cli import train as train_cmd
from mathlm.cli import w2s as w2s_cmd

app = typer.Typer(
    help="mathlm: train math language models with JAX, from a laptop CPU to TPU pods and GPU clusters.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command(name="train", no_args_is_help=True)(train_cmd.train)
app.command(name="generate", no_args_is_help=True)(generate_cmd.generate)
app.add_typer(eval_cmd.eval_app, name="eval")
app.add_typer(convert_cmd.app, name="convert")
app.add_typer(data_cmd.data_app, name="data")
app.add_typer(data_cmd.tokenizer_app, name="tokenizer")
app.add_typer(w2s_cmd.app, name="w2s")



def main() -> None:
    """The `mathlm` entry point: the app, with a mistyped command line (unknown option, missing argument, a value
    of the wrong type) as one line on stderr and exit 2 instead of click's usage box."""
    import sys
    try:
        from typer._click import exceptions as click_errors  # typer vendors click from 0.2x on
    except ImportError:
        from click import exceptions as click_errors
    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:  # `mathlm train` alone: its help, as before
        print(e.ctx.get_help() if e.ctx else e.format_message())
        sys.exit(0)
    except click_errors.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
