"""``carrier mcp``: serve Carrier's MCP tools over stdio, for an MCP client that starts Carrier.

stdout carries the MCP protocol, so everything else (logs, errors) goes to stderr. Registered on
the main CLI as ``main.add_command(mcp)``; ``python -m carrier.mcp.cli`` runs it directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from carrier.errors import CarrierError


@click.command("mcp")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="carrier.yml (default: $CARRIER_CONFIG, then ~/.config/carrier/carrier.yml).",
)
def mcp(config_path: Path | None) -> None:
    """Serve the MCP tools (mail_*) over stdio until the client disconnects."""
    from carrier.config import load_config, resolve_config_path
    from carrier.log import setup_logging
    from carrier.mcp.server import run_stdio

    try:
        config = load_config(resolve_config_path(config_path, os.environ), os.environ)
        setup_logging(config.logging.level, secrets=config.secrets())
        run_stdio(config)
    except CarrierError as exc:
        click.echo(f"carrier: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    mcp()
