"""Helpers every `carrier` subcommand shares: one-line errors and the --config option."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import NoReturn, ParamSpec, TypeVar

import click

from carrier.errors import CarrierError

P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``carrier: error: <message>`` on stderr and exit with ``code``."""
    click.echo(f"carrier: error: {message}", err=True)
    sys.exit(code)


def friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a CarrierError into one line on stderr and its exit status (no traceback)."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CarrierError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="carrier.yml (default: $CARRIER_CONFIG, then ~/.config/carrier/carrier.yml).",
)
