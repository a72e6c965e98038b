"""`carrier schedule add|list|remove`: schedules as the local user (``local:<user>`` with
``mcp.stdio_role``, a local admin), each one call of :class:`carrier.ops.schedules.ScheduleOps`,
decided and audited like every door's request. ``carrier serve`` runs them (docs/schedules.md).

Exit status: 0 on success, 1 for bad input (a bad cron expression, an unknown playbook, a name in
use) or a refusal, with one line on stderr that says what to fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from carrier.clikit import config_option, friendly, open_ops


@click.group("schedule")
def schedule_group() -> None:
    """Playbook runs on a cron schedule, run by `carrier serve` as their owner."""


@schedule_group.command("add")
@config_option
@click.argument("name")
@click.option("--playbook", "-p", required=True, help="A playbook name from `carrier playbooks`.")
@click.option("--limit", "-l", default=None, help="Host pattern (default: the playbook's default_limit).")
@click.option("--cron", required=True, metavar="EXPR",
              help='When, in UTC: 5 cron fields ("0 3 * * *"), 6 with seconds last, or @daily etc.')
@click.option("-e", "--extra-var", "extra_vars", multiple=True, metavar="KEY=VALUE",
              help="An extra var the playbook declares (repeatable).")
@click.option("--notify", type=click.Choice(["always", "failure", "never"]), default="failure",
              show_default=True, help="When the result is mailed to the owner (if the owner has an address).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly
def add_command(config_path: Path | None, name: str, playbook: str, limit: str | None, cron: str,
                extra_vars: tuple[str, ...], notify: str, as_json: bool) -> None:
    """Add schedule NAME: run PLAYBOOK on LIMIT at every slot of CRON."""
    from carrier.ops import parse_assignments
    from carrier.ops.schedules import ScheduleOps

    with open_ops(config_path, start=False) as cli:
        view = ScheduleOps(cli.ops).add(cli.who, name, playbook, cron=cron, limit=limit,
                                        extra_vars=parse_assignments(extra_vars), notify=notify)
    if as_json:
        click.echo(json.dumps(view.to_dict(), indent=2))
        return
    click.echo(view.added_text())


@schedule_group.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly
def list_command(config_path: Path | None, as_json: bool) -> None:
    """The schedules (the local user sees everyone's), their next run and last slots."""
    from carrier.ops.schedules import ScheduleOps

    with open_ops(config_path, start=False) as cli:
        views = ScheduleOps(cli.ops).list(cli.who)
    if as_json:
        click.echo(json.dumps([v.to_dict() for v in views], indent=2))
        return
    if not views:
        click.echo("no schedules (add one with `carrier schedule add`)")
    for view in views:
        click.echo(view.line())


@schedule_group.command("remove")
@config_option
@click.argument("name")
@friendly
def remove_command(config_path: Path | None, name: str) -> None:
    """Remove schedule NAME (its history stays in the audit trail)."""
    from carrier.ops.schedules import ScheduleOps

    with open_ops(config_path, start=False) as cli:
        ScheduleOps(cli.ops).remove(cli.who, name)
    click.echo(f"schedule {name} removed")
