"""Issue 13.3: the real `carrier remote` process never prints its token. A token with a CR/LF (or
any other malformed form) in $CARRIER_TOKEN is refused with a clear message before it gets near an
HTTP header, and neither that refusal nor any other error shows the token or a piece of it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mcp_http_support import issue, load, running_door, write_door_config

from carrier.config import Config
from carrier.mcp.http import HttpDoor
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox
REPO = Path(__file__).resolve().parents[2]
#: The MCP port of this module's door: the sandbox's plus this (other modules use other shifts).
PORT_SHIFT = 37


@pytest.fixture(scope="module")
def door_config(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Config:
    return load(write_door_config(sandbox, tmp_path_factory.mktemp("remote-token"), port_shift=PORT_SHIFT))


@pytest.fixture(scope="module")
def door(door_config: Config) -> Iterator[HttpDoor]:
    with running_door(door_config) as running:
        yield running


def carrier_remote(
    url: str, ca_file: Path, token: str | None, *args: str
) -> subprocess.CompletedProcess[str]:
    """`python -m carrier remote ...` as CI runs it, the token in $CARRIER_TOKEN."""
    env = {k: v for k, v in os.environ.items() if k != "CARRIER_TOKEN"}
    if token is not None:
        env["CARRIER_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "carrier", "remote", "--url", url, "--ca-file", str(ca_file), "run", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
        check=False,
    )


def pieces(value: str) -> set[str]:
    """The value and every run of 8+ characters of it without spaces or line breaks: none may show."""
    return {value, *(p for p in re.split(r"[\s\x00]+", value) if len(p) >= 8)}


def assert_hidden(done: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in secrets:
        for piece in pieces(secret):
            assert piece not in done.stdout and piece not in done.stderr, (piece, done.stderr)
            assert repr(piece)[1:-1] not in done.stderr  # nor as an escaped repr (b'Bearer ...')


MALFORMED: dict[str, tuple[Callable[[str], str], str]] = {
    "CRLF and a header": (lambda t: t + "\r\nX: y", r"contains a line break or NUL"),
    "bare LF inside": (lambda t: t[:20] + "\n" + t[20:], r"contains a line break or NUL"),
    "bare CR inside": (lambda t: t[:20] + "\r" + t[20:], r"contains a line break or NUL"),
    "U+2028 inside": (lambda t: t[:20] + "\u2028" + t[20:], r"contains a line break or NUL"),
    "Bearer prefix": (lambda t: "Bearer " + t, r"contains spaces or tabs"),
    "two tokens": (lambda t: t + " " + t, r"contains spaces or tabs"),
    "non-ASCII": (lambda t: t[:-1] + "é", r"characters other than A-Z a-z 0-9 _ -"),
    "truncated": (lambda t: t[:-3], r"40 characters long, a Carrier token has 43"),
}


@pytest.mark.parametrize("form", MALFORMED, ids=MALFORMED.keys())
def test_a_malformed_token_is_refused_and_never_shown(
    sandbox: Sandbox, door: HttpDoor, form: str
) -> None:
    token, _ = issue(door, "ci@example.test", "operator")  # a real, live token: only its form is wrong
    make, fragment = MALFORMED[form]
    value = make(token)
    done = carrier_remote(door.url, sandbox.layout.tls_cert, value, "ping", "--limit", "web1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "carrier: error: $CARRIER_TOKEN does not hold a Carrier token: " in done.stderr, done.stderr
    assert re.search(fragment, done.stderr), done.stderr
    assert "the value is not shown" in done.stderr and "Traceback" not in done.stderr
    assert "== job" not in done.stdout  # nothing was started
    assert_hidden(done, value, token)


def test_the_same_token_alone_works_and_is_not_printed(sandbox: Sandbox, door: HttpDoor) -> None:
    # The control: the door takes the token as issued (a trailing newline from `cat` is trimmed), so
    # the refusals above are about the form alone.
    token, _ = issue(door, "ci@example.test", "operator")
    done = carrier_remote(door.url, sandbox.layout.tls_cert, token + "\n", "ping", "--limit", "web1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "== job" in done.stdout
    assert_hidden(done, token)


def test_other_errors_do_not_show_the_token(sandbox: Sandbox, door: HttpDoor, tmp_path: Path) -> None:
    unknown = "Q" * 20 + "unknownTokenXYZ" + "q" * 8  # well-formed, never issued
    refused = carrier_remote(door.url, sandbox.layout.tls_cert, unknown, "ping")
    assert refused.returncode == 1 and "401 unauthorized" in refused.stderr, refused.stderr
    assert_hidden(refused, unknown)
    token, _ = issue(door, "ci@example.test", "operator")
    nowhere = carrier_remote("https://127.0.0.1:9/mcp", sandbox.layout.tls_cert, token, "ping")
    assert nowhere.returncode == 1 and "cannot talk to https://127.0.0.1:9/mcp" in nowhere.stderr
    assert_hidden(nowhere, token)
    empty = carrier_remote(door.url, sandbox.layout.tls_cert, " \r\n", "ping")
    assert empty.returncode == 1 and "$CARRIER_TOKEN is empty" in empty.stderr
