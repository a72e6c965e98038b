"""Helpers every `carrier` subcommand shares: one-line errors and the --config option."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, ParamSpec, TypeVar

import click

from carrier.errors import CarrierError

if TYPE_CHECKING:  # the CLI loads each layer only when a command needs it
    from carrier.auth.policy import Identity
    from carrier.ops import Ops

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


@dataclass
class CliOps:
    """The operations layer and the local identity, for one CLI command."""

    ops: Ops
    who: Identity


@contextlib.contextmanager
def open_ops(config_path: Path | None, *, start: bool = True, log_warnings: bool = True) -> Iterator[CliOps]:
    """Config, store, trust and the operations layer for one CLI command; closed (jobs handed back)
    at the end."""
    from carrier.config import load_config, resolve_config_path
    from carrier.log import setup_logging
    from carrier.ops.identity import local_identity
    from carrier.ops.runtime import Services

    config = load_config(resolve_config_path(config_path, os.environ), os.environ)
    if log_warnings:  # JSON log lines at WARNING on stderr
        setup_logging("WARNING", secrets=config.secrets())
    services = Services(config, start_jobs=start)
    try:
        yield CliOps(services.ops, local_identity(config, door="cli"))
    finally:
        services.close()
