"""`carrier enroll|token|audit`: the local admin's view of the trust layer.

Register with ``main.add_command(enroll)``, ``main.add_command(token)``, ``main.add_command(audit)``.
A local admin is whoever can read carrier.yml and the state directory: enrollment and token commands
are operations of :mod:`carrier.ops` as the local user (``local:<unix user>``, door ``cli``), decided
and audited like every door's.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import click

from carrier.auth.audit import open_audit, read_checkpoint, sign_checkpoint
from carrier.auth.errors import AuthError
from carrier.auth.service import Trust
from carrier.clikit import CliOps, config_option, friendly, open_ops
from carrier.config import load_config, resolve_config_path
from carrier.store import ENROLLMENT_STATES, Store


@contextmanager
def _trust(config_path: Path | None) -> Iterator[Trust]:
    config = load_config(resolve_config_path(config_path, os.environ), os.environ)
    store = Store.open(config.state_dir, url=config.store.dsn())
    try:
        yield Trust(config, store)
    finally:
        store.close()


def _ops(config_path: Path | None) -> contextlib.AbstractContextManager[CliOps]:
    """The operations layer as the local user (no job system is started for these commands)."""
    return open_ops(config_path, start=False, log_warnings=False)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _finish(status: str, reply: str, ok: tuple[str, ...]) -> None:
    click.echo(reply)
    if status not in ok:
        sys.exit(1)


# --------------------------------------------------------------------------- enroll


@click.group()
def enroll() -> None:
    """Enrollment requests: list them, approve, deny, revoke a key."""


@enroll.command("list")
@config_option
@click.option("--state", "states", multiple=True, type=click.Choice(ENROLLMENT_STATES),
              help="Only requests in this state (repeatable). Default: the open ones "
                   "(requested, challenged, verified).")
@click.option("--all", "show_all", is_flag=True, help="Every request, whatever its state.")
@friendly
def enroll_list(config_path: Path | None, states: tuple[str, ...], show_all: bool) -> None:
    """List enrollment requests, newest first."""
    with _ops(config_path) as cli:
        chosen = None if show_all else (list(states) or ["requested", "challenged", "verified"])
        records = cli.ops.enrollments(cli.who, chosen)
    if not records:
        click.echo("no enrollment requests")
        return
    for r in records:
        click.echo(f"{r.id}  {r.state:<10}  {r.email}  {r.fingerprint or '-'}  role={r.role or '-'}  "
                   f"created={_when(r.created_at)}  decided_by={r.decided_by or '-'}")


@enroll.command("approve")
@config_option
@click.argument("request_id")
@click.option("--role", default=None, help="Role to enroll with (default: auth.default_role).")
@friendly
def enroll_approve(config_path: Path | None, request_id: str, role: str | None) -> None:
    """Approve a confirmed request (exit 1 if it cannot be approved)."""
    with _ops(config_path) as cli:
        outcome = cli.ops.approve_enrollment(cli.who, request_id, role)
    _finish(outcome.status, outcome.reply, ("approved",))


@enroll.command("deny")
@config_option
@click.argument("request_id")
@friendly
def enroll_deny(config_path: Path | None, request_id: str) -> None:
    """Deny an open request."""
    with _ops(config_path) as cli:
        outcome = cli.ops.deny_enrollment(cli.who, request_id)
    _finish(outcome.status, outcome.reply, ("denied",))


@enroll.command("revoke")
@config_option
@click.argument("fingerprint")
@friendly
def enroll_revoke(config_path: Path | None, fingerprint: str) -> None:
    """Revoke an enrolled key (also one listed in carrier.yml) and its owner's tokens."""
    with _ops(config_path) as cli:
        outcome = cli.ops.revoke_key(cli.who, fingerprint)
    _finish(outcome.status, outcome.reply, ("revoked",))


# --------------------------------------------------------------------------- token


@click.group()
def token() -> None:
    """MCP bearer tokens: issue (shown once), list, revoke."""


@token.command("issue")
@config_option
@click.argument("owner")
@click.option("--role", default=None, help="Role of the token (default: the owner's enrolled role).")
@click.option("--scope", "scopes", multiple=True,
              help="Narrow the token: tools:run|jobs|mail|* or hosts:<pattern> (repeatable).")
@click.option("--ttl", type=click.IntRange(1), default=None,
              help="Lifetime in seconds (default: auth.token_ttl).")
@friendly
def token_issue(config_path: Path | None, owner: str, role: str | None, scopes: tuple[str, ...],
                ttl: int | None) -> None:
    """Issue a token for OWNER and print it once (only its hash is kept)."""
    with _ops(config_path) as cli:
        issued = cli.ops.token_issue(cli.who, owner, role, scopes=scopes, ttl=ttl)
        role = issued.record.role
    click.echo(issued.token)
    expires = _when(issued.record.expires_at)
    click.echo(f"id {issued.record.id}, owner {owner}, role {role}, expires {expires} UTC: "
               "this is the only time the token is shown", err=True)


@token.command("list")
@config_option
@click.option("--owner", default=None, help="Only tokens of this owner.")
@friendly
def token_list(config_path: Path | None, owner: str | None) -> None:
    """List tokens (never the tokens themselves), newest first."""
    with _ops(config_path) as cli:
        records = cli.ops.token_list(cli.who, owner)
        now = cli.ops.store.clock()
    if not records:
        click.echo("no tokens")
        return
    for r in records:
        state = ("revoked" if r.revoked_at is not None
                 else "expired" if r.expires_at is not None and r.expires_at <= now else "live")
        click.echo(f"{r.id}  {state:<7}  {r.owner}  role={r.role}  scopes={','.join(r.scopes) or '-'}  "
                   f"expires={_when(r.expires_at)}  last_used={_when(r.last_used_at)}")


@token.command("revoke")
@config_option
@click.argument("token_id")
@friendly
def token_revoke(config_path: Path | None, token_id: str) -> None:
    """Revoke a token by its id (t-...)."""
    with _ops(config_path) as cli:
        done = cli.ops.token_revoke(cli.who, token_id)
    if not done:
        click.echo(f"no live token {token_id}")
        sys.exit(1)
    click.echo(f"revoked {token_id}")


# --------------------------------------------------------------------------- audit


def _carrier_signer(trust: Trust) -> str:
    """Carrier's own OpenPGP key (the one its replies are signed with)."""
    address = trust.config.default_account.address
    fpr = trust.keyring.secret_fingerprint(address)
    if fpr is None:
        raise AuthError(f"no secret key for {address} in {trust.config.gnupg_home}: Carrier signs "
                        "checkpoints with its own key", reason="setup")
    return fpr


@click.command()
@config_option
@click.option("--verify", is_flag=True, help="Check the hash chain; exit 1 and name each broken row.")
@click.option("--checkpoint", "checkpoint", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Alone: write the current head, signed with Carrier's OpenPGP key, to FILE ('-' for "
                   "stdout); keep it off this machine. With --verify: check FILE's signature and that "
                   "the chain still holds that head.")
@click.option("--adopt-key", is_flag=True,
              help="Key an existing unkeyed chain with an audit key you put in place yourself.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--actor", default=None, help="Only rows of this actor.")
@click.option("--action", default=None, help="Only rows of this action (e.g. enroll:approve).")
@friendly
def audit(config_path: Path | None, verify: bool, checkpoint: str | None, adopt_key: bool, limit: int,
          actor: str | None, action: str | None) -> None:
    """Show the newest audit rows, --verify the whole chain, or take a signed --checkpoint."""
    with _trust(config_path) as trust:
        if adopt_key:
            marker = open_audit(trust.config, trust.store, adopt=True).bind()
            click.echo(f"audit chain keyed from row {marker.from_id} (key id {marker.key_id})")
            return
        if verify:
            point = None
            if checkpoint is not None:
                data = sys.stdin.buffer.read() if checkpoint == "-" else _read_file(Path(checkpoint))
                point = read_checkpoint(trust.keyring, data, _carrier_signer(trust))
            report = trust.audit.verify(point)
            if report.ok:
                against = f", holds the checkpoint at row {point.last_id}" if point else ""
                click.echo(f"audit chain ok: {report.rows} rows{against}")
                return
            for problem in report.problems:
                click.echo(problem)
            click.echo(f"audit chain BROKEN: {len(report.problems)} problem(s) in {report.rows} rows",
                       err=True)
            sys.exit(1)
        if checkpoint is not None:
            signed = sign_checkpoint(trust.keyring, trust.audit.head(), _carrier_signer(trust))
            if checkpoint == "-":
                sys.stdout.buffer.write(signed)
                sys.stdout.flush()
            else:
                Path(checkpoint).write_bytes(signed)
                click.echo(f"checkpoint written to {checkpoint}: keep a copy off this machine", err=True)
            return
        rows = trust.store.list_audit(actor=actor, action=action, limit=limit)
    for r in reversed(rows):
        detail = " ".join(f"{k}={v}" for k, v in sorted(r.detail.items()))
        click.echo(f"{r.id}  {_when(r.ts)}  {r.door:<6}  {r.actor}  {r.action}  {r.target or '-'}  "
                   f"{r.outcome}  {detail}".rstrip())


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AuthError(f"cannot read {path}: {exc.strerror}", reason="setup") from None
