"""CLI commands for jobs: ``run``, ``exec``, ``jobs``, ``job show|output|kill``, ``hosts``, ``nodes``,
``playbooks``.

Registered on the main group from ``COMMANDS`` (``carrier.cli._register``)::

    from carrier.jobs.cli import COMMANDS
    for command in COMMANDS:
        main.add_command(command)

``job`` is a click group; other modules add subcommands to it (``job.add_command(...)``).

Every command is one call of the operations layer (:mod:`carrier.ops`) as the local user
(``local:<user>``, the role ``mcp.stdio_role`` names, like the stdio MCP door): decided by the policy
and written to the audit trail like any other door's request.

Exit status: 0 when the job succeeded, 2 when it ended otherwise (failed, cancelled, lost), like
``ansible-playbook``; 1 for bad input or configuration (one line on stderr that names the fix).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from carrier.clikit import CliOps, open_ops
from carrier.clikit import config_option as _config_option
from carrier.clikit import friendly as _friendly
from carrier.jobs.manager import JobView

EXIT_FAILED = 2

_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def cli_owner() -> str:
    """Who a CLI job belongs to: the local user, ``local:<user>`` (the same name stdio MCP uses)."""
    from carrier.ops.identity import local_user

    return f"local:{local_user()}"


def _dump(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _exit_for(view: JobView) -> None:
    if view.status != "succeeded":
        sys.exit(EXIT_FAILED)


def _follow(cli: CliOps, job: str | JobView, *, cursor: int = 0, as_json: bool = False) -> JobView:
    """Print the job's events as they come until it ends; Ctrl-C cancels the job. ``job``: an id,
    or the view of a job this command just started."""
    from carrier.jobs.render import event_text

    watch = cli.ops.watch(cli.who, job) if isinstance(job, str) else cli.ops.own_watch(cli.who, job)
    job_id = watch.job_id
    cancelled = False
    while True:
        try:
            events, cursor = watch.output(cursor, 500)
            for event in events:
                if as_json:
                    click.echo(json.dumps({"seq": event.seq, "ts": event.ts, "type": event.type,
                                           "data": event.data}, default=str))
                    continue
                text = event_text(event)
                if text:
                    click.echo(text)
            view = watch.get()
            if view.done and not events:
                return view
            if not events:
                watch.wait(timeout=0.25)
        except KeyboardInterrupt:
            if cancelled:
                raise
            cancelled = True
            click.echo(f"\ncarrier: cancelling {job_id} (Ctrl-C again to stop watching)", err=True)
            cli.ops.kill(cli.who, job_id)


# --------------------------------------------------------------------------- run


@click.command("run")
@_config_option
@click.argument("playbook")
@click.option("-l", "--limit", default=None,
              help="Host pattern (default: the playbook's default_limit, or all).")
@click.option("-e", "--extra-var", "extra_vars", multiple=True, metavar="KEY=VALUE",
              help="An extra var the playbook declares (repeatable).")
@click.option("--tags", default=None, help="Only tasks with these tags (comma-separated).")
@click.option("--skip-tags", default=None, help="Skip tasks with these tags (comma-separated).")
@click.option("--check", is_flag=True, help="Check mode: report what would change, change nothing.")
@click.option("--diff", is_flag=True, help="Show the differences in changed files.")
@click.option("--forks", type=click.IntRange(1, 100), default=None, help="Parallel hosts.")
@click.option("--timeout", type=click.IntRange(1, 7 * 24 * 3600), default=None,
              help="Stop the run after N s.")
@click.option("--wait", is_flag=True, help="Follow the run in the terminal until it ends (exit 0/2).")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a JUnit XML report here when the run ends (implies --wait).")
@_json_option
@_friendly
def run_command(config_path: Path | None, playbook: str, limit: str | None, extra_vars: tuple[str, ...],
                tags: str | None, skip_tags: str | None, check: bool, diff: bool, forks: int | None,
                timeout: int | None, wait: bool, junit: Path | None, as_json: bool) -> None:
    """Run PLAYBOOK from the playbook directories as a job."""
    from carrier.ops import parse_assignments

    options: dict[str, Any] = {"extra_vars": parse_assignments(extra_vars), "check": check, "diff": diff,
                               "limit": limit, "forks": forks, "timeout": timeout,
                               "tags": _csv(tags), "skip_tags": _csv(skip_tags)}
    with open_ops(config_path) as cli:
        view = cli.ops.run_playbook(cli.who, playbook, **options)
        if not (wait or junit):
            watch = cli.ops.own_watch(cli.who, view)
            while view.status == "queued":
                view = watch.wait(timeout=0.5)
            if as_json:
                _dump(view.to_dict())
            elif view.done:
                click.echo(f"{view.id} {view.status}: {view.message}")
            else:
                click.echo(f"{view.id} {view.status}: follow it with `carrier job output {view.id} --follow`")
            if view.done:
                _exit_for(view)
            return
        click.echo(f"== job {view.id}: playbook {playbook} on {view.target or '-'}", err=True)
        if view.approval is not None and view.approval.get("state") == "pending":
            click.echo(f"== waiting for approval by {view.approval.get('needed')} person(s) of role "
                       f"{view.approval.get('by')} (`approve {view.id}` by signed mail; `carrier serve` "
                       "mails them the request)", err=True)
        view = _follow(cli, view, as_json=as_json)
        if junit is not None:
            from carrier.jobs.render import junit_xml

            events = []
            cursor = 0
            watch = cli.ops.own_watch(cli.who, view)
            while True:
                batch, cursor = watch.output(cursor, 5000)
                events.extend(batch)
                if len(batch) < 5000:
                    break
            junit.write_text(junit_xml(view, events), encoding="utf-8")
        if as_json:
            _dump(view.to_dict())
        _exit_for(view)


# --------------------------------------------------------------------------- exec


@click.command("exec", context_settings={"ignore_unknown_options": True})
@_config_option
@click.option("--shell", is_flag=True, help="Give the command to the remote shell as one string.")
@click.option("--timeout", type=click.IntRange(1, 7 * 24 * 3600), default=None, help="Stop after N s.")
@_json_option
@click.argument("pattern")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_friendly
def exec_command(config_path: Path | None, shell: bool, timeout: int | None, as_json: bool, pattern: str,
                 command: tuple[str, ...]) -> None:
    """Run a command on each host of PATTERN over its ssh master: carrier exec web -- uptime -p."""
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise click.UsageError("give the command after --: carrier exec PATTERN -- CMD [ARGS...]")
    with open_ops(config_path) as cli:
        cmd: list[str] | str = " ".join(argv) if shell else argv
        view = cli.ops.exec(cli.who, pattern, cmd, shell=shell, timeout=float(timeout) if timeout else None)
        if as_json:
            watch = cli.ops.own_watch(cli.who, view)
            view = watch.wait()
            events, _ = watch.output(0, 10_000)
            _dump({"job": view.to_dict(),
                   "results": [e.data for e in events if e.type == "exec.result"]})
        else:
            view = _follow(cli, view)
        _exit_for(view)


# --------------------------------------------------------------------------- jobs / job


@click.command("jobs")
@_config_option
@click.option("--owner", default=None, help="Only this owner's jobs.")
@click.option("--status", default=None, help="Only jobs in this status (queued, running, succeeded, ...).")
@click.option("--kind", default=None, help="Only this kind (playbook, adhoc, exec, pty).")
@click.option("-n", "--limit", type=click.IntRange(1, 1000), default=50, help="At most N jobs.")
@_json_option
@_friendly
def jobs_command(config_path: Path | None, owner: str | None, status: str | None, kind: str | None,
                 limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    from carrier.jobs.render import jobs_table

    with open_ops(config_path, start=False) as cli:
        views = cli.ops.list_jobs(cli.who, owner=owner, status=status, kind=kind, limit=limit)
    if as_json:
        _dump([v.to_dict() for v in views])
    else:
        click.echo(jobs_table(views))


@click.group("job")
def job_group() -> None:
    """One job: show, output, kill; terminal (PTY) jobs: start, input, screen, attach."""


@job_group.command("show")
@_config_option
@click.argument("job_id")
@_json_option
@_friendly
def job_show(config_path: Path | None, job_id: str, as_json: bool) -> None:
    """Status, message and recap of JOB_ID."""
    from carrier.jobs.render import job_text

    with open_ops(config_path, start=False) as cli:
        view = cli.ops.watch(cli.who, job_id).wait(timeout=1.0)  # nobody watched it: catch up first
    if as_json:
        _dump(view.to_dict())
    else:
        click.echo(job_text(view))


@job_group.command("output")
@_config_option
@click.argument("job_id")
@click.option("--cursor", type=click.IntRange(0), default=0, help="Only events after this sequence number.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@_json_option
@_friendly
def job_output(config_path: Path | None, job_id: str, cursor: int, follow: bool, as_json: bool) -> None:
    """The output of JOB_ID (events after --cursor); the next cursor goes to stderr."""
    from carrier.jobs.render import event_text

    with open_ops(config_path, start=False) as cli:
        if follow:
            view = _follow(cli, job_id, cursor=cursor, as_json=as_json)
            _exit_for(view)
            return
        _, events, next_cursor = cli.ops.events(cli.who, job_id, cursor, 10_000)
    if as_json:
        _dump({"events": [{"seq": e.seq, "ts": e.ts, "type": e.type, "data": e.data} for e in events],
               "next_cursor": next_cursor})
        return
    for event in events:
        text = event_text(event)
        if text:
            click.echo(text)
    click.echo(f"next cursor: {next_cursor}", err=True)


@job_group.command("kill")
@_config_option
@click.argument("job_id")
@click.option("--wait", "wait_s", type=click.FloatRange(0, 3600), default=10.0, show_default=True,
              help="Seconds to wait for the job to stop.")
@_friendly
def job_kill(config_path: Path | None, job_id: str, wait_s: float) -> None:
    """Cancel JOB_ID: a queued job ends at once, a running one is stopped."""
    with open_ops(config_path, start=False) as cli:
        watch = cli.ops.watch(cli.who, job_id)
        view = watch.get()
        if view.done:
            click.echo(f"{view.id} already {view.status}: {view.message}")
            return
        view = cli.ops.kill(cli.who, job_id)
        deadline = time.monotonic() + wait_s
        while not view.done and time.monotonic() < deadline:
            view = watch.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
    click.echo(f"{view.id} {view.status}: {view.message or 'cancel requested'}")


# --------------------------------------------------------------------------- hosts / playbooks


@click.command("hosts")
@_config_option
@click.argument("pattern", default="all")
@_json_option
@_friendly
def hosts_command(config_path: Path | None, pattern: str, as_json: bool) -> None:
    """The inventory hosts PATTERN selects, with their groups."""
    with open_ops(config_path, start=False) as cli:
        hosts = cli.ops.hosts(cli.who, pattern)
    if as_json:
        _dump([{"host": h.name, "groups": list(h.groups)} for h in hosts])
        return
    for host in hosts:
        click.echo(f"{host.name:<24} {', '.join(host.groups)}")


@click.command("nodes")
@_config_option
@_json_option
@_friendly
def nodes_command(config_path: Path | None, as_json: bool) -> None:
    """The execution nodes: target, groups, capacity, health and running jobs."""
    with open_ops(config_path, start=False) as cli:
        nodes = cli.ops.nodes(cli.who)
    if as_json:
        _dump([n.to_dict() for n in nodes])
        return
    if not nodes:
        click.echo("no execution nodes configured: every job runs on this machine (see docs/nodes.md)")
        return
    for node in nodes:
        state = "ok" if node.healthy else "DOWN"
        click.echo(f"{node.name:<16} {state:<5} {node.target}  groups: {', '.join(node.groups)}  "
                   f"running {len(node.running)}/{node.capacity}  {node.detail}")
        for job_id in node.running:
            click.echo(f"    {job_id}")


@click.command("playbooks")
@_config_option
@_json_option
@_friendly
def playbooks_command(config_path: Path | None, as_json: bool) -> None:
    """The playbooks that can be run, with their extra vars."""
    with open_ops(config_path, start=False) as cli:
        infos = cli.ops.playbooks(cli.who)
    if as_json:
        _dump([i.to_dict() for i in infos])
        return
    for info in infos:
        flag = " (admin)" if info.admin_only else ""
        click.echo(f"{info.name}{flag}: {info.description or '-'}")
        for name, spec in info.vars.items():
            extra = f" one of {', '.join(spec.choices)}" if spec.choices else ""
            default = f" [default {spec.default}]" if spec.default is not None else " (required)"
            click.echo(f"    {name}: {spec.type}{extra}{default} {spec.description}".rstrip())


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


#: Everything to register on the main ``carrier`` group.
COMMANDS = (run_command, exec_command, jobs_command, job_group, hosts_command, nodes_command,
            playbooks_command)
