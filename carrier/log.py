"""Structured logging to stderr, with secrets redacted.

stdout belongs to the MCP stdio transport, so Carrier never logs there: ``setup_logging`` puts one
handler on the ``carrier`` logger (every module logs through ``logging.getLogger(__name__)``) that
writes JSON lines to stderr (or the given stream)::

    {"ts": "2025-01-02T03:04:05.678Z", "level": "INFO", "logger": "carrier.jobs", "msg": "...", ...}

Fields passed with ``extra=`` become top-level keys (``extra_<key>`` if one would shadow ts, level,
logger, msg, exc or stack).

Redaction: ``RedactingFilter`` replaces every registered secret with ``***`` in the message, its
arguments, the extra fields, the exception text and the stack; ``add_secret`` registers more at run
time (a password read from a file, a token just issued). Where occurrences of several secrets
overlap, the union of them is replaced, so no fragment of either is left.

Which values count as secrets:
- empty or whitespace-only values are ignored: replacing "" or " " would garble every line;
- a value with surrounding whitespace (a password file's trailing newline) is registered both as
  given and stripped;
- values shorter than ``MIN_SECRET_LENGTH`` (4) characters are not redacted, and a warning (without
  the value) is logged once. Masking every "ab" or "1" in every line makes logs unreadable and
  gives away where the short secret occurs anyway; not logging is not an option. A secret that
  short is weak and should be replaced.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

LOGGER_NAME = "carrier"
REDACTED = "***"
MIN_SECRET_LENGTH = 4

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(
    {
        *logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__,
        "message",
        "asctime",
        "taskName",
    }
)
_CORE_KEYS = ("ts", "level", "logger", "msg", "exc", "stack")
_HANDLER_MARK = "_carrier_handler"

_warn_log = logging.getLogger(f"{LOGGER_NAME}.log")


class RedactingFilter(logging.Filter):
    """A handler filter that replaces registered secrets with ``***`` everywhere in a record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()  # longest first; replaced, never mutated
        self._warned_short = False
        for secret in secrets:
            self.add_secret(secret)

    @property
    def secret_count(self) -> int:
        return len(self._secrets)

    def add_secret(self, value: str) -> bool:
        """Register ``value`` for redaction; False when it is ignored (empty, blank or too short)."""
        if not isinstance(value, str):
            return False
        candidates = {value, value.strip()}
        accepted = {c for c in candidates if len(c.strip()) >= MIN_SECRET_LENGTH}
        too_short = any(0 < len(c.strip()) < MIN_SECRET_LENGTH for c in candidates)
        warn = False
        with self._lock:
            if accepted - set(self._secrets):
                merged = set(self._secrets) | accepted
                self._secrets = tuple(sorted(merged, key=lambda s: (-len(s), s)))
            if too_short and not accepted and not self._warned_short:
                self._warned_short = warn = True
        if warn:
            _warn_log.warning(
                "a secret shorter than %d characters is not redacted from logs "
                "(masking so short a string would garble every line): replace it with a longer one",
                MIN_SECRET_LENGTH,
            )
        return bool(accepted)

    def redact(self, text: str) -> str:
        """``text`` with every occurrence of every secret (overlaps merged) replaced by ``***``."""
        secrets = self._secrets
        if not secrets or not text:
            return text
        spans: list[tuple[int, int]] = []
        for secret in secrets:
            start = text.find(secret)
            while start != -1:
                spans.append((start, start + len(secret)))
                start = text.find(secret, start + 1)
        if not spans:
            return text
        spans.sort()
        parts: list[str] = []
        pos = 0
        cur_start, cur_end = spans[0]
        for start, end in spans[1:]:
            if start <= cur_end:
                cur_end = max(cur_end, end)
                continue
            parts += [text[pos:cur_start], REDACTED]
            pos = cur_end
            cur_start, cur_end = start, end
        parts += [text[pos:cur_start], REDACTED, text[cur_end:]]
        return "".join(parts)

    def _redact_value(self, value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {self.redact(str(k)): self._redact_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._redact_value(v) for v in value]
        return self.redact(str(value))

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging would print the raw args to stderr
            message = f"{record.msg} {record.args!r}"
        record.msg = self.redact(message)
        record.args = None
        for key, value in list(record.__dict__.items()):
            if key not in _RECORD_ATTRS:
                record.__dict__[key] = self._redact_value(value)
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO-8601), level, logger, msg, extra fields, exc, stack."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRS or key.startswith("_"):
                continue
            payload[f"extra_{key}" if key in _CORE_KEYS else key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii: newlines and U+2028 come out escaped, so a record is always one line.
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: msg`` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso(record.created)


def _iso(created: float) -> str:
    return datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: The process-wide filter used by the handler ``setup_logging`` installs.
_FILTER = RedactingFilter()


def add_secret(value: str) -> bool:
    """Redact ``value`` from every log line from now on (see the module docstring for the rules)."""
    return _FILTER.add_secret(value)


def redact(text: str) -> str:
    """``text`` with the registered secrets replaced, for messages that leave Carrier another way."""
    return _FILTER.redact(text)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger(f"{LOGGER_NAME}.thread").error(
        "thread %s ended with an exception", name,
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.strip().upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    return number


def setup_logging(
    level: str = "INFO",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    json_format: bool = True,
) -> None:
    """Send the ``carrier`` loggers to stderr (or ``stream``) as JSON lines, secrets redacted.

    Calling it again replaces Carrier's handler (no duplicate lines); registered secrets are kept.
    The ``carrier`` logger does not propagate to the root logger, so no unredacted copy reaches a
    handler some library installed there. The same handler also sits on the root logger (WARNING and
    up) so that other libraries' log lines and Python warnings are JSON lines too, and an exception
    that ends a thread is logged instead of printed: stderr carries nothing but JSON lines.
    """
    number = _level_number(level)
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        if getattr(old, _HANDLER_MARK, False):
            logger.removeHandler(old)
            old.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(_FILTER)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
    logger.setLevel(number)
    logger.propagate = False
    # Python warnings (a library's DeprecationWarning, say) become JSON lines too: stderr carries
    # nothing but Carrier's log lines.
    logging.captureWarnings(True)
    # Libraries' loggers (uvicorn, the MCP SDK, python-gnupg, httpx, asyncio) propagate to the root
    # logger: Carrier's handler sits there too, at WARNING (their INFO chatter is not Carrier's
    # log), so their lines are JSON and redacted like Carrier's own.
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(number, logging.WARNING))
    # An exception that ends a thread (a library's reader thread, say) is a log record, not a
    # traceback printed to stderr.
    threading.excepthook = _log_thread_exception
    for secret in secrets:  # after the handler exists, so a too-short warning is visible
        add_secret(secret)
