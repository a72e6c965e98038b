"""The `carrier` command: thin wrappers that parse arguments and call the layers below."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import ClassVar

import click

from carrier import __version__
from carrier.clikit import config_option, fail, friendly


class _LazyGroup(click.Group):
    """Subcommands defined next to each layer's code, imported only when used, so `carrier
    --version`, `check` and `sandbox` do not pay for importing Ansible, mcp and gnupg."""

    #: command name -> "module:attribute" of the click command
    lazy: ClassVar[dict[str, str]] = {
        "run": "carrier.jobs.cli:run_command",
        "exec": "carrier.jobs.cli:exec_command",
        "jobs": "carrier.jobs.cli:jobs_command",
        "job": "carrier.cli:_job_group",
        "hosts": "carrier.jobs.cli:hosts_command",
        "nodes": "carrier.jobs.cli:nodes_command",
        "playbooks": "carrier.jobs.cli:playbooks_command",
        "enroll": "carrier.auth.cli:enroll",
        "token": "carrier.auth.cli:token",
        "audit": "carrier.auth.cli:audit",
        "auth": "carrier.mail.oauth_cli:auth_group",
        "mcp": "carrier.mcp.cli:mcp",
        "cert": "carrier.mcp.cli:cert",
        "remote": "carrier.mcp.cli:remote",
        "schedule": "carrier.schedule_cli:schedule_group",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module_name, _, attribute = self.lazy[cmd_name].partition(":")
            loaded = getattr(importlib.import_module(module_name), attribute)
            command = loaded() if attribute.startswith("_") else loaded
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


def _job_group() -> click.Group:
    """`carrier job`: show/output/kill from the job layer plus the PTY commands."""
    from carrier.jobs import ptycli
    from carrier.jobs.cli import job_group

    for command in ptycli.COMMANDS:
        job_group.add_command(command)
    return job_group


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
        fail(problems[0])
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
    """The loopback sandbox: Dovecot, SMTP, sshd hosts (and execution nodes), GnuPG homes, a keyserver."""


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
@click.option("--with-postgres", is_flag=True,
              help="Also run a PostgreSQL cluster on the loopback and point carrier.yml's store.url at "
                   "it (kept on by later ups until the sandbox is destroyed).")
@click.option("--exec-nodes", "exec_nodes", type=int, default=None, metavar="N",
              help="Also run N execution nodes (sshd hosts exec1.. on 127.0.0.21.., with Debian's "
                   "ansible-runner) serving the web and db groups in carrier.yml; 0 removes them. "
                   "Default: as many as the sandbox has (0 for a new one).")
@friendly
def sandbox_up(root: Path | None, port_offset: int | None, with_postgres: bool,
               exec_nodes: int | None) -> None:
    """Start the sandbox (idempotent) and write carrier.yml and an inventory."""
    from carrier.sandbox.manager import Sandbox, default_root

    box = Sandbox(root or default_root(), port_offset=port_offset, with_postgres=with_postgres,
                  exec_nodes=exec_nodes)
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

