"""Known user mistakes become one line on stderr and a non-zero exit code, never a traceback."""
from __future__ import annotations

import contextlib
import sys

import typer


def user_errors() -> tuple[type[BaseException], ...]:
    from mathlm.data.sources import DataError
    from mathlm.models.expand import ExpandError
    from mathlm.train.checkpoint import CheckpointError
    from mathlm.train.config import ConfigError
    from mathlm.train.expansion import ExpansionError
    from mathlm.train.lock import WorkdirLocked, WorkdirUnwritable
    from mathlm.train.topology import TopologyError
    from mathlm.train.trainer import TrainingError
    return (ConfigError, DataError, CheckpointError, TrainingError, ExpandError, ExpansionError, TopologyError,
            WorkdirLocked, WorkdirUnwritable, FileNotFoundError)


@contextlib.contextmanager
def one_line_errors():
    errors = user_errors()
    try:
        yield
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(code=130) from None
