"""The `carrier` command: thin wrappers that parse arguments and call the layers below."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import ParamSpec, TypeVar

import click

from carrier import __version__
from carrier.errors import CarrierError

P = ParamSpec("P")
R = TypeVar("R")


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"carrier: error: {message}", err=True)
    sys.exit(code)


def friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a CarrierError into one line on stderr and its exit status (no traceback)."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CarrierError as exc:
            _fail(str(exc), exc.exit_code)
            raise AssertionError("unreachable") from exc

    return wrapper


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="carrier.yml (default: $CARRIER_CONFIG, then ~/.config/carrier/carrier.yml).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="carrier")
def main() -> None:
    """Carrier: drive the hosts in your Ansible inventory from signed email, MCP agents and CI."""


@main.command()
@config_option
@friendly
def check(config_path: Path | None) -> None:
    """Validate a configuration and list every problem at once (exit 1 when any)."""
    from carrier.config import check_config, resolve_config_path

    path = resolve_config_path(config_path, os.environ)
    problems = check_config(path, os.environ)
    if len(problems) == 1:
        _fail(problems[0])
    if problems:
        click.echo(f"{path}: {len(problems)} problems", err=True)
        for problem in problems:
            click.echo(f"  - {problem}", err=True)
        sys.exit(1)
    click.echo(f"{path}: ok")


@main.command()
@config_option
@friendly
def serve(config_path: Path | None) -> None:
    """Start Carrier with a configuration: state store, logging, mail accounts checked."""
    from carrier.serve import serve_forever

    serve_forever(config_path)


@main.group()
def sandbox() -> None:
    """The loopback sandbox: Dovecot, SMTP, three sshd hosts, GnuPG homes, a keyserver."""


sandbox_dir_option = click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Sandbox directory (default: $CARRIER_SANDBOX_DIR or /var/tmp/carrier-sandbox).",
)


@sandbox.command("up")
@sandbox_dir_option
@click.option("--port-offset", type=click.IntRange(0, 50000), default=None,
              help="Shift every sandbox port (run two sandboxes side by side); default: the "
                   "sandbox's current ports, 0 for a new one.")
@friendly
def sandbox_up(root: Path | None, port_offset: int | None) -> None:
    """Start the sandbox (idempotent) and write carrier.yml and an inventory."""
    from carrier.sandbox.manager import Sandbox, default_root

    box = Sandbox(root or default_root(), port_offset=port_offset)
    report = box.up()
    click.echo(report.render())
    click.echo(f"\nconfig: {box.layout.config_file}\nnext:   eval \"$(carrier sandbox env"
               f"{'' if root is None else ' --dir ' + str(root)})\"")


@sandbox.command("down")
@sandbox_dir_option
@click.option("--destroy", is_flag=True, help="Also delete the sandbox directory.")
@friendly
def sandbox_down(root: Path | None, destroy: bool) -> None:
    """Stop every process the sandbox started (by pid)."""
    from carrier.sandbox.manager import Sandbox, default_root

    box = Sandbox(root or default_root())
    stopped = box.destroy() if destroy else box.down()
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@sandbox.command("status")
@sandbox_dir_option
@friendly
def sandbox_status(root: Path | None) -> None:
    """Show which sandbox services run (exit 3 when some are down)."""
    from carrier.sandbox.manager import Sandbox, default_root

    report = Sandbox(root or default_root()).status()
    click.echo(report.render())
    if not report.all_running:
        sys.exit(3)


@sandbox.command("env")
@sandbox_dir_option
@friendly
def sandbox_env(root: Path | None) -> None:
    """Print `export` lines for CARRIER_CONFIG and each identity's password and GNUPGHOME."""
    from carrier.sandbox.manager import Sandbox, default_root

    for line in Sandbox(root or default_root()).env_lines():
        click.echo(line)
