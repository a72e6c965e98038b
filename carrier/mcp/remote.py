"""``carrier remote``: an MCP client of a running Carrier over streamable HTTP with TLS (for CI).

TLS is always verified: against the system CAs, a CA file, or a pinned SHA-256 fingerprint of the
server's certificate (then exactly that certificate is trusted for the session). The verdict of a
playbook run maps to exit codes like ``ansible-playbook``: 0 ok, 2 failed hosts, 4 unreachable
hosts, 1 for anything else (bad input, refused token, no connection, a run that ended otherwise).

The token is a secret and CI logs are public: ``bearer_token`` checks its form before it goes near
an HTTP header (a CR or LF in it would make the HTTP library quote it in its error) and registers
it for redaction, and every message this module raises passes through ``carrier.log.redact``.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from carrier.errors import CarrierError
from carrier.formats import token_problem
from carrier.log import add_secret, redact

EXIT_OK, EXIT_ERROR, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2, 4
_FPR_RE = re.compile(r"(?:[0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}")


class RemoteError(CarrierError):
    """The remote Carrier could not be reached or refused the request."""


def bearer_token(environ: Mapping[str, str], name: str) -> str:
    """The token in environment variable ``name``, checked for form; RemoteError otherwise.

    The value (and each word of it, should it hold spaces or line breaks) is registered with
    ``carrier.log.add_secret`` first, and no message here ever includes it.
    """
    raw = environ.get(name, "")
    for piece in {raw, *re.split(r"[\s\x00]+", raw)}:
        add_secret(piece)
    token = raw.strip()
    if not token:
        raise RemoteError(f"${name} is empty: put the token in that variable")
    problem = token_problem(token)
    if problem:
        raise RemoteError(
            f"${name} does not hold a Carrier token: {problem} (the value is not shown; "
            "`carrier token issue` prints a token)"
        )
    return token


def normalize_fingerprint(value: str) -> str:
    """``AB:CD:...`` (64 hex digits, colons optional) as upper-case colon-separated hex."""
    text = value.strip()
    if text.lower().startswith("sha256:"):
        text = text[7:]
    if not _FPR_RE.fullmatch(text):
        raise RemoteError(
            f"--pin-sha256 wants the certificate's SHA-256 fingerprint (64 hex digits, as "
            f"`carrier cert` prints it), not {value!r}"
        )
    digits = text.replace(":", "").upper()
    return ":".join(digits[i : i + 2] for i in range(0, 64, 2))


def _server_pem(host: str, port: int, timeout: float) -> bytes:
    """The certificate the server presents, read only to compare it with the pin; the session
    itself then verifies against exactly that certificate."""
    return ssl.get_server_certificate((host, port), timeout=timeout).encode()


def tls_context(
    url: str, *, ca_file: Path | None = None, pin_sha256: str | None = None, timeout: float = 10.0
) -> ssl.SSLContext:
    """A verifying TLS context for ``url``: system CAs (+ ``ca_file``), or the pinned certificate."""
    if ca_file is not None and pin_sha256 is not None:
        raise RemoteError("give --ca-file or --pin-sha256, not both")
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise RemoteError(f"the URL must be https://... (Carrier's MCP door uses TLS), not {url!r}")
    if pin_sha256 is None:
        context = ssl.create_default_context()
        if ca_file is not None:
            if not ca_file.is_file():
                raise RemoteError(f"--ca-file {ca_file} does not exist")
            context.load_verify_locations(cafile=str(ca_file))
        return context
    want = normalize_fingerprint(pin_sha256)
    host, port = parts.hostname or "", parts.port or 443
    try:
        pem = _server_pem(host, port, timeout)
    except OSError as exc:
        raise RemoteError(f"cannot reach {host}:{port}: {exc}") from None
    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    got = hashlib.sha256(der).hexdigest().upper()
    got = ":".join(got[i : i + 2] for i in range(0, 64, 2))
    if got != want:
        raise RemoteError(
            f"the server's certificate fingerprint is {got}, not the pinned {want}: refusing to connect"
        )
    # Only that exact certificate is trusted; the pin replaces the host name check.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=pem.decode())
    return context


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True, slots=True)
class HostResult:
    host: str
    outcome: str  # ok | failed | unreachable
    counts: Mapping[str, int]


def host_results(job: Mapping[str, Any]) -> list[HostResult]:
    """Per-host results from a finished playbook job's recap (summary.recap)."""
    recap = (job.get("summary") or {}).get("recap") or {}
    out = []
    for host, counts in sorted(recap.items()):
        counts = {k: int(v) for k, v in dict(counts).items()}
        outcome = "failed" if counts.get("failures") else "unreachable" if counts.get("dark") else "ok"
        out.append(HostResult(str(host), outcome, counts))
    return out


def exit_code(job: Mapping[str, Any]) -> int:
    """0 succeeded, 2 a host failed, 4 a host was unreachable, 1 anything else."""
    results = host_results(job)
    if job.get("status") == "succeeded":
        return EXIT_OK
    if any(r.outcome == "failed" for r in results):
        return EXIT_FAILED
    if any(r.outcome == "unreachable" for r in results) or job.get("reason") == "unreachable":
        return EXIT_UNREACHABLE
    return EXIT_ERROR


def junit_report(job: Mapping[str, Any], playbook: str) -> str:
    """JUnit XML: one test case per host; a run without a recap is one failed case with its message."""
    suite = ET.Element("testsuite", name=f"carrier {playbook}")
    results = host_results(job)
    failures = 0
    for result in results:
        case = ET.SubElement(suite, "testcase", classname=f"carrier.{playbook}", name=result.host)
        counts = " ".join(f"{k}={v}" for k, v in sorted(result.counts.items()))
        if result.outcome != "ok":
            failures += 1
            node = ET.SubElement(
                case, "failure", message=f"{result.host} {result.outcome}", type=result.outcome
            )
            node.text = counts
        else:
            ET.SubElement(case, "system-out").text = counts
    if not results or (job.get("status") != "succeeded" and failures == 0):
        case = ET.SubElement(
            suite, "testcase", classname=f"carrier.{playbook}", name=f"job {job.get('job_id')}"
        )
        if job.get("status") != "succeeded":
            ET.SubElement(
                case,
                "failure",
                message=str(job.get("message") or job.get("status")),
                type=str(job.get("reason") or job.get("status")),
            )
            failures += 1
    suite.set("tests", str(len(suite.findall("testcase"))))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    if job.get("started_at") and job.get("finished_at"):
        suite.set("time", f"{float(job['finished_at']) - float(job['started_at']):.3f}")
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


def event_line(event: Mapping[str, Any]) -> str | None:
    data = event.get("data") or {}
    kind = str(event.get("type", ""))
    if kind.startswith("ansible."):
        text = str(data.get("stdout") or "").strip("\n")
        return text or None
    if kind == "job.finished":
        return f"== {data.get('status')}: {data.get('message')}"
    return None


# --------------------------------------------------------------------------- the client run


async def run_playbook(
    url: str,
    token: str,
    context: ssl.SSLContext,
    playbook: str,
    *,
    limit: str | None,
    extra_vars: Mapping[str, str],
    wait: bool,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Start ``playbook`` through the remote's MCP tools; with ``wait``, stream its output until it
    ends. Returns the job (as job_status gives it)."""
    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    def result_of(result: Any, tool: str) -> dict[str, Any]:
        text = "".join(getattr(c, "text", "") for c in result.content)
        if result.is_error:
            raise RemoteError(redact(f"{tool}: {text}"))
        data = result.structured_content
        if not isinstance(data, dict):
            data = json.loads(text)
        return dict(data)

    add_secret(token)
    problem = token_problem(token)
    if problem:  # never let the HTTP library see (and quote) a malformed token
        raise RemoteError(f"the bearer token is not a Carrier token: {problem}")
    refused: list[int] = []

    async def note_refusal(response: httpx2.Response) -> None:
        if response.status_code in (401, 403, 413, 429):
            refused.append(response.status_code)

    try:
        http = httpx2.AsyncClient(
            verify=context,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx2.Timeout(30.0, read=300.0),
            event_hooks={"response": [note_refusal]},
        )
        async with http, Client(streamable_http_client(url, http_client=http)) as client:
            args: dict[str, Any] = {"playbook": playbook, "extra_vars": dict(extra_vars)}
            if limit:
                args["limit"] = limit
            job = result_of(await client.call_tool("playbook_run", args), "playbook_run")
            echo(f"== job {job['job_id']} {job['status']} on {job['target']}")
            if not wait:
                return job
            cursor = 0
            while True:
                page = result_of(
                    await client.call_tool("job_output", {"job_id": job["job_id"], "since": cursor}),
                    "job_output",
                )
                for event in page["events"]:
                    line = event_line(event)
                    if line:
                        echo(line)
                cursor = page["next_cursor"]
                if not page["more"]:
                    break
                if not page["events"]:
                    await client.call_tool("job_wait", {"job_id": job["job_id"], "timeout": 2})
            return result_of(await client.call_tool("job_status", {"job_id": job["job_id"]}), "job_status")
    except RemoteError:
        raise
    except Exception as exc:  # connection, TLS and HTTP status errors end up here
        status = refused[-1] if refused else None
        why = REFUSALS.get(status) if status else redact(_why(exc))
        raise RemoteError(f"cannot talk to {url}: {why}") from None


REFUSALS = {
    401: "401 unauthorized: the token is missing, wrong, expired or revoked",
    403: "403 forbidden: this address may not connect (mcp.ip_allow / mcp.ip_deny)",
    413: "413 request too large",
    429: "429 too many requests: the rate limit was reached",
}


def _why(exc: BaseException) -> str:
    inner = getattr(exc, "exceptions", None)
    if inner:
        return _why(inner[0])
    return f"{type(exc).__name__}: {exc}"
