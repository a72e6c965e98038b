"""`carrier remote`'s pure parts: fingerprints, exit codes, the JUnit report; the HTTP door's checks."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import anyio
import pytest

from carrier.mcp.http import GuardVerifier, is_loopback
from carrier.mcp.remote import RemoteError, exit_code, junit_report, normalize_fingerprint, tls_context

RECAP_OK = {
    "web1": {"ok": 1, "changed": 0, "failures": 0, "dark": 0},
    "web2": {"ok": 1, "changed": 0, "failures": 0, "dark": 0},
}


def job(
    status: str, recap: dict[str, Any] | None = None, reason: str = "ok", message: str = "m"
) -> dict[str, Any]:
    return {
        "job_id": "j-aaaaaaaaaaaa",
        "status": status,
        "reason": reason,
        "message": message,
        "summary": {"recap": recap} if recap is not None else {},
        "started_at": 1.0,
        "finished_at": 3.5,
    }


def test_fingerprint_forms() -> None:
    plain = "ab" * 32
    want = ":".join(["AB"] * 32)
    assert normalize_fingerprint(plain) == want
    assert normalize_fingerprint(want) == want
    assert normalize_fingerprint("sha256:" + want.lower()) == want
    for bad in ("", "ab" * 31, "zz" * 32, "ab" * 33):
        with pytest.raises(RemoteError, match="64 hex digits"):
            normalize_fingerprint(bad)


def test_tls_context_refuses_http_and_both_options(tmp_path: Any) -> None:
    with pytest.raises(RemoteError, match="https"):
        tls_context("http://127.0.0.1:1/mcp")
    with pytest.raises(RemoteError, match="not both"):
        tls_context("https://h/mcp", ca_file=tmp_path / "ca.pem", pin_sha256="ab" * 32)
    with pytest.raises(RemoteError, match="does not exist"):
        tls_context("https://h/mcp", ca_file=tmp_path / "missing.pem")
    context = tls_context("https://h/mcp")
    assert context.check_hostname and context.verify_mode.name == "CERT_REQUIRED"


@pytest.mark.parametrize(
    ("the_job", "code"),
    [
        (job("succeeded", RECAP_OK), 0),
        (job("failed", {**RECAP_OK, "db1": {"ok": 0, "failures": 1, "dark": 0}}, "task_failed"), 2),
        (job("failed", {**RECAP_OK, "db1": {"ok": 0, "failures": 0, "dark": 1}}, "unreachable"), 4),
        (job("failed", {"a": {"failures": 1, "dark": 0}, "b": {"failures": 0, "dark": 1}}, "task_failed"), 2),
        (job("failed", None, "syntax_error"), 1),
        (job("cancelled", None, "cancelled"), 1),
    ],
)
def test_exit_codes(the_job: dict[str, Any], code: int) -> None:
    assert exit_code(the_job) == code


def test_junit_one_case_per_host() -> None:
    recap = {**RECAP_OK, "db1": {"ok": 0, "changed": 0, "failures": 0, "dark": 1}}
    suite = ET.fromstring(junit_report(job("failed", recap, "unreachable"), "ping").split("\n", 1)[1])  # noqa: S314
    assert suite.get("tests") == "3" and suite.get("failures") == "1" and suite.get("time") == "2.500"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"web1", "web2", "db1"}
    failure = cases["db1"].find("failure")
    assert failure is not None and failure.get("type") == "unreachable"


def test_junit_without_recap_is_one_failed_case() -> None:
    suite = ET.fromstring(  # noqa: S314 (our own output)
        junit_report(job("failed", None, "syntax_error", "bad yaml"), "x").split("\n", 1)[1]
    )
    assert suite.get("tests") == "1" and suite.get("failures") == "1"
    failure = suite.find("testcase/failure")
    assert failure is not None and failure.get("message") == "bad yaml"


def test_loopback_and_verifier() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")  # noqa: S104 and not is_loopback("10.0.0.1") and not is_loopback("example.org")
    # Outside a request the guard admitted, the verifier accepts no token at all.
    assert anyio.run(GuardVerifier().verify_token, "A" * 43) is None
