"""``carrier mcp`` (stdio, or ``--http`` for the HTTPS door), ``carrier cert`` and ``carrier remote``.

Over stdio, stdout carries the MCP protocol, so everything else (logs, errors) goes to stderr.
Registered on the main CLI as ``main.add_command(mcp)``, ``main.add_command(cert)`` and
``main.add_command(remote)``; ``python -m carrier.mcp.cli`` runs ``mcp`` directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from carrier.clikit import config_option, friendly
from carrier.errors import CarrierError


@click.command("mcp")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="carrier.yml (default: $CARRIER_CONFIG, then ~/.config/carrier/carrier.yml).",
)
@click.option("--http", "http", is_flag=True,
              help="Serve streamable HTTP with TLS on mcp.bind_host:mcp.port (bearer tokens), not stdio.")
@click.option("--plain-http", is_flag=True,
              help="With --http: no TLS (refused unless mcp.bind_host is a loopback address).")
def mcp(config_path: Path | None, http: bool, plain_http: bool) -> None:
    """Serve the MCP tools over stdio until the client disconnects (or over HTTPS with --http)."""
    from carrier.config import load_config, resolve_config_path
    from carrier.log import setup_logging
    from carrier.mcp.server import run_stdio

    try:
        if plain_http and not http:
            raise CarrierError("--plain-http goes with --http")
        config = load_config(resolve_config_path(config_path, os.environ), os.environ)
        setup_logging(config.logging.level, secrets=config.secrets())
        if http:
            from carrier.mcp.http import serve_http

            serve_http(config, plain=plain_http)
            return
        run_stdio(config)
    except CarrierError as exc:
        click.echo(f"carrier: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


@click.command("cert")
@config_option
@click.option("--host", "hosts", multiple=True,
              help="A DNS name or IP address the certificate is for (repeatable; default: "
                   "mcp.bind_host, localhost and 127.0.0.1).")
@click.option("--days", type=click.IntRange(1, 3650), default=825, show_default=True, help="Validity.")
@click.option("--force", is_flag=True, help="Replace an existing certificate and key.")
@friendly
def cert(config_path: Path | None, hosts: tuple[str, ...], days: int, force: bool) -> None:
    """Make a self-signed TLS certificate for the MCP HTTP door (mcp.tls_cert / mcp.tls_key)."""
    from carrier.config import load_config, resolve_config_path
    from carrier.tls import cert_fingerprint_sha256, make_self_signed

    config = load_config(resolve_config_path(config_path, os.environ), os.environ)
    cert_path, key_path = config.mcp.tls_cert, config.mcp.tls_key
    if cert_path is None or key_path is None:
        raise CarrierError("set mcp.tls_cert and mcp.tls_key in carrier.yml (where to write the pair), "
                           "then run `carrier cert` again")
    if (cert_path.exists() or key_path.exists()) and not force:
        raise CarrierError(f"{cert_path} or {key_path} exists: pass --force to replace them")
    names = list(hosts) or list(dict.fromkeys([config.mcp.bind_host, "localhost", "127.0.0.1"]))
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    make_self_signed(cert_path, key_path, hosts=names, days=days)
    fingerprint = cert_fingerprint_sha256(cert_path)
    click.echo(f"certificate: {cert_path}\nkey:         {key_path} (mode 0600)")
    click.echo(f"hosts:       {', '.join(names)}")
    click.echo(f"SHA-256 fingerprint: {fingerprint}")
    click.echo("Clients verify it with the certificate file (carrier remote --ca-file CERT) or the "
               "fingerprint (carrier remote --pin-sha256 FINGERPRINT).")
    click.echo("To use a CA-issued certificate instead, point mcp.tls_cert at its PEM chain (leaf first) "
               "and mcp.tls_key at its key (mode 0600); clients then need no option.")


@click.group("remote")
@click.option("--url", required=True, help="The Carrier MCP endpoint, e.g. https://carrier.example:18443/mcp.")
@click.option("--token-env", default="CARRIER_TOKEN", show_default=True,
              help="The environment variable holding the bearer token (never pass it on the command line).")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Trust this CA or self-signed certificate (PEM) for the server.")
@click.option("--pin-sha256", default=None, help="Trust exactly the server certificate with this SHA-256 "
              "fingerprint (as `carrier cert` prints it).")
@click.pass_context
def remote(ctx: click.Context, url: str, token_env: str, ca_file: Path | None,
           pin_sha256: str | None) -> None:
    """Talk to a running Carrier over MCP (HTTPS + bearer token), e.g. from CI."""
    ctx.obj = {"url": url, "token_env": token_env, "ca_file": ca_file, "pin": pin_sha256}


@remote.command("run")
@click.argument("playbook")
@click.option("-l", "--limit", default=None, help="Host pattern (default: the playbook's default_limit).")
@click.option("-e", "--extra-var", "extra_vars", multiple=True, metavar="KEY=VALUE",
              help="An extra var the playbook declares (repeatable).")
@click.option("--wait", is_flag=True, help="Stream the run and exit 0 ok / 2 failed hosts / 4 unreachable.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a JUnit XML report (one test case per host); implies --wait.")
@click.pass_context
def remote_run(ctx: click.Context, playbook: str, limit: str | None, extra_vars: tuple[str, ...], wait: bool,
               junit: Path | None) -> None:
    """Run PLAYBOOK on the remote Carrier; exit 0 success, 2 failed hosts, 4 unreachable, 1 errors."""
    import anyio

    from carrier.log import redact
    from carrier.mcp import remote as rem
    from carrier.ops import parse_assignments

    opts = ctx.obj
    try:
        token = rem.bearer_token(os.environ, opts["token_env"])  # checked and registered for redaction
        name = playbook[:-4] if playbook.endswith(".yml") else playbook[:-5] if playbook.endswith(".yaml") \
            else playbook
        variables = parse_assignments(extra_vars)
        context = rem.tls_context(opts["url"], ca_file=opts["ca_file"], pin_sha256=opts["pin"])
        job = anyio.run(lambda: rem.run_playbook(opts["url"], token, context, name, limit=limit,
                                                 extra_vars=variables, wait=wait or junit is not None,
                                                 echo=click.echo))
    except CarrierError as exc:
        click.echo(f"carrier: error: {redact(str(exc))}", err=True)
        sys.exit(rem.EXIT_ERROR)
    except Exception as exc:  # no traceback: its text could quote the request (and so the token)
        click.echo(f"carrier: error: unexpected {type(exc).__name__}: {redact(str(exc))}", err=True)
        sys.exit(rem.EXIT_ERROR)
    if not (wait or junit is not None):
        return
    if junit is not None:
        junit.write_text(rem.junit_report(job, name), encoding="utf-8")
    sys.exit(rem.exit_code(job))


if __name__ == "__main__":
    mcp()
