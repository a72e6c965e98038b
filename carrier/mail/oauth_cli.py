"""`carrier auth mail-login ACCOUNT`: get an account's first OAuth2 refresh token with the device flow.

The command shows the provider's verification address and a user code, waits while the user
approves Carrier there (RFC 8628), writes the refresh token to the account's ``password_file``
(mode 0600) and checks it with one IMAP login. The token is never printed.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from carrier.clikit import config_option, fail, friendly
from carrier.config import load_config, resolve_config_path
from carrier.mail import oauth


@click.group("auth")
def auth_group() -> None:
    """Credentials Carrier itself logs in with (mail accounts)."""


@auth_group.command("mail-login")
@config_option
@click.argument("account_name", metavar="ACCOUNT")
@click.option("--no-check", is_flag=True, help="Do not try an IMAP login with the new token.")
@friendly
def mail_login(config_path: Path | None, account_name: str, no_check: bool) -> None:
    """Log ACCOUNT (auth: oauth2) in at its provider and save the refresh token to its password_file."""
    config = load_config(resolve_config_path(config_path, os.environ), os.environ)
    account = config.account(account_name)
    if account.auth != "oauth2" or account.oauth2 is None:
        fail(f"account {account.name} uses auth: password: set auth: oauth2 and an oauth2: section "
             "(see docs/providers.md) before `carrier auth mail-login`")
    if account.password_file is None:
        fail(f"account {account.name} reads its refresh token from ${account.password_env}: "
             "`carrier auth mail-login` writes it to a file: set password_file for the account instead")
    code = oauth.start_device_login(account)
    minutes = max(1, round(code.expires_in / 60))
    click.echo(f"To let Carrier use the mailbox of account {account.name} ({account.address}):")
    click.echo(f"  1. open {code.verification_uri}")
    click.echo(f"  2. enter the code {code.user_code} and sign in as {account.username}")
    if code.verification_uri_complete:
        click.echo(f"  (or open {code.verification_uri_complete} directly)")
    click.echo(f"Waiting for the approval (the code expires in {minutes} min)...")
    refresh_token = oauth.finish_device_login(account, code)
    oauth.save_refresh_token(account.password_file, refresh_token)
    oauth.forget(account)
    click.echo(f"Refresh token saved to {account.password_file} (mode 0600).")
    if no_check:
        return
    from carrier.mail.connect import imap_connect

    client = imap_connect(account, timeout=30)
    try:
        click.echo(f"IMAP login as {account.username} with {oauth.sasl_mechanism(account)}: ok")
    finally:
        client.logout()
