"""Structured logging: JSON lines on stderr only, secrets redacted everywhere in a record."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from carrier import log as carrier_log
from carrier.log import RedactingFilter, add_secret, setup_logging

PASSWORD = "hunter2-Pa55word"


@pytest.fixture(autouse=True)
def fresh_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh secret registry per test, and the carrier logger as it was afterwards."""
    monkeypatch.setattr(carrier_log, "_FILTER", RedactingFilter())
    logger = logging.getLogger("carrier")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    # Start from a process's pristine logger: handlers left on it by earlier in-process tests
    # (pytest's capture handlers included) would format these deliberately broken records raw.
    # setup_logging in each test then sets propagate=False itself, as in production.
    for handler in handlers:
        logger.removeHandler(handler)
    logger.propagate = True  # pytest also hooks loggers that do not propagate; a fresh one does
    logger.setLevel(logging.NOTSET)
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    excepthook = threading.excepthook
    yield
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in root_handlers:
        root.addHandler(handler)
    root.setLevel(root_level)
    threading.excepthook = excepthook


def emit_everything(logger: logging.Logger, secret: str) -> None:
    logger.info(f"login with {secret}")
    logger.info("login with %s", secret)
    logger.info("login with %(pw)s", {"pw": secret})
    logger.info(
        "login",
        extra={"password": secret, "argv": ["sshpass", "-p", secret], "nested": {"k": f"x{secret}x"}},
    )
    try:
        raise RuntimeError(f"authentication failed for {secret}")
    except RuntimeError:
        logger.exception("imap login failed")
    logger.info("%d jobs", secret)  # a broken format string must not leak its args either


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    text = buf.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.split("\n")[:-1]]


def test_secret_never_appears(capsys: pytest.CaptureFixture[str]) -> None:
    buf = io.StringIO()
    setup_logging("DEBUG", secrets=[PASSWORD], stream=buf)
    emit_everything(logging.getLogger("carrier.test"), PASSWORD)
    out = buf.getvalue()
    assert PASSWORD not in out
    assert "hunter2" not in out
    records = lines(buf)
    assert len(records) == 6
    assert records[0]["msg"] == "login with ***"
    assert records[1]["msg"] == "login with ***"
    assert records[2]["msg"] == "login with ***"
    assert records[3]["password"] == "***"
    assert records[3]["argv"] == ["sshpass", "-p", "***"]
    assert records[3]["nested"] == {"k": "x***x"}
    assert "authentication failed for ***" in records[4]["exc"]
    assert "Traceback" in records[4]["exc"]
    assert "***" in records[5]["msg"]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_secret_added_at_run_time() -> None:
    buf = io.StringIO()
    setup_logging(stream=buf)
    logger = logging.getLogger("carrier.tokens")
    logger.info("issued %s", "tok_0123456789")
    assert add_secret("tok_0123456789")
    logger.info("issued %s", "tok_0123456789")
    records = lines(buf)
    assert records[0]["msg"] == "issued tok_0123456789"
    assert records[1]["msg"] == "issued ***"


@pytest.mark.parametrize("blank", ["", " ", "   ", "\n", "\t \n"])
def test_blank_secrets_change_nothing(blank: str) -> None:
    def run(secrets: list[str]) -> list[dict[str, Any]]:
        carrier_log._FILTER = RedactingFilter()
        buf = io.StringIO()
        setup_logging("DEBUG", secrets=secrets, stream=buf)
        emit_everything(logging.getLogger("carrier.test"), "plain value")
        logging.getLogger("carrier.test").info("spaces   and\ttabs\nand newlines")
        records = lines(buf)
        for r in records:
            del r["ts"]
        return records

    assert run([blank]) == run([])
    assert carrier_log._FILTER.secret_count == 0
    assert not add_secret(blank)


def test_overlapping_secrets_fully_redacted() -> None:
    for order in (["abc123", "abc123xyz"], ["abc123xyz", "abc123"]):
        f = RedactingFilter(order)
        assert f.redact("abc123xyz") == "***"
        assert f.redact("a abc123 b abc123xyz c xabc123xyzabc123y") == "a *** b *** c x***y"
    # Partial overlap: neither secret contains the other, the union is masked.
    f = RedactingFilter(["wxyzab", "zabcde"])
    assert f.redact("..wxyzabcde..") == "..***.."
    assert f.redact("zabcde wxyzab") == "*** ***"


def test_overlapping_secrets_in_a_log_line() -> None:
    buf = io.StringIO()
    setup_logging(secrets=["abc123", "abc123xyz"], stream=buf)
    logging.getLogger("carrier.x").warning("key=abc123xyz alt=abc123")
    (record,) = lines(buf)
    assert record["msg"] == "key=*** alt=***"


def test_short_secrets_are_not_redacted_and_warned_once() -> None:
    buf = io.StringIO()
    setup_logging(secrets=["k7", "q9z", " k7 "], stream=buf)
    logging.getLogger("carrier.x").info("about q9z and k7")
    records = lines(buf)
    assert len(records) == 2
    warning = records[0]["msg"]
    assert records[0]["level"] == "WARNING" and "shorter than 4 characters" in warning
    assert "k7" not in warning and "q9z" not in warning
    assert records[1]["msg"] == "about q9z and k7"
    assert carrier_log._FILTER.secret_count == 0


def test_surrounding_whitespace_is_stripped_too() -> None:
    f = RedactingFilter(["s3cret-pass\n"])
    assert f.redact("password s3cret-pass used") == "password *** used"


def test_one_json_object_per_line() -> None:
    buf = io.StringIO()
    setup_logging("DEBUG", stream=buf)
    logger = logging.getLogger("carrier.jobs")
    logger.debug("multi\nline\r\nmessage \u2028 with separators", extra={"job": "j-abcdefghijkl", "n": 3})
    logger.error("weird extra", extra={"obj": object(), "level": "shadow"})
    records = lines(buf)
    assert len(records) == 2
    first = records[0]
    assert set(first) >= {"ts", "level", "logger", "msg", "job", "n"}
    assert first["level"] == "DEBUG" and first["logger"] == "carrier.jobs" and first["n"] == 3
    assert first["msg"] == "multi\nline\r\nmessage \u2028 with separators"
    assert first["ts"].endswith("Z")
    assert records[1]["level"] == "ERROR" and records[1]["extra_level"] == "shadow"
    assert buf.getvalue().count("\n") == 2


def test_nothing_goes_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", secrets=[PASSWORD])
    emit_everything(logging.getLogger("carrier.mcp"), PASSWORD)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 6
    assert PASSWORD not in captured.err


def test_setup_twice_does_not_duplicate() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(stream=first)
    setup_logging(stream=second)
    logging.getLogger("carrier.x").info("once")
    logging.getLogger("somelib").warning("lib once")
    assert first.getvalue() == ""
    assert [line["msg"] for line in lines(second)] == ["once", "lib once"]
    for name in ("carrier", ""):
        marked = [h for h in logging.getLogger(name).handlers if getattr(h, "_carrier_handler", 0)]
        assert len(marked) == 1
    assert logging.getLogger("carrier").propagate is False


def test_other_libraries_log_json_redacted_and_warning_up() -> None:
    """uvicorn, the MCP SDK, python-gnupg log through their own loggers: JSON lines, redacted."""
    buf = io.StringIO()
    setup_logging("DEBUG", secrets=[PASSWORD], stream=buf)
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request %s", PASSWORD)
    logging.getLogger("mcp.server.streamable_http").info("session chatter")
    logging.getLogger("gnupg").error("gpg said %s", PASSWORD)
    got = lines(buf)
    assert [(line["logger"], line["msg"]) for line in got] == [
        ("uvicorn.error", "Invalid HTTP request ***"), ("gnupg", "gpg said ***")]
    assert PASSWORD not in buf.getvalue()


def test_an_exception_ending_a_thread_is_a_json_line() -> None:
    buf = io.StringIO()
    setup_logging(secrets=[PASSWORD], stream=buf)

    def boom() -> None:
        raise RuntimeError(f"reader failed with {PASSWORD}")

    thread = threading.Thread(target=boom, name="gpg-reader")
    thread.start()
    thread.join()
    (line,) = lines(buf)
    assert line["msg"] == "thread gpg-reader ended with an exception"
    assert "RuntimeError: reader failed with ***" in line["exc"]
    assert PASSWORD not in buf.getvalue()


def test_levels_and_text_format() -> None:
    buf = io.StringIO()
    setup_logging("warning", secrets=[PASSWORD], stream=buf, json_format=False)
    logger = logging.getLogger("carrier.x")
    logger.info("hidden")
    logger.warning("shown %s", PASSWORD)
    text = buf.getvalue()
    assert "hidden" not in text
    assert text.rstrip("\n").endswith("WARNING carrier.x: shown ***")
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("LOUD")
