"""Bounded reads of a job's events: pages of at most N bytes of JSON with a cursor to read on, and
anything cut to fit flagged (``truncated``), never silently dropped."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from carrier.jobs.manager import Manager


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON."""
    return len(json.dumps(value, default=str, ensure_ascii=False).encode("utf-8"))


def clip_text(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to ``limit`` UTF-8 bytes (on a character boundary) and whether it was cut."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text, False
    return raw[:limit].decode("utf-8", "ignore"), True


def _clip_event(data: Mapping[str, Any], limit: int) -> tuple[dict[str, Any], bool]:
    """An event's data with its long string fields cut to ``limit`` bytes (flagged when cut)."""
    out: dict[str, Any] = {}
    cut = False
    for key, value in data.items():
        if isinstance(value, str):
            value, was = clip_text(value, limit)
            cut = cut or was
        elif isinstance(value, Mapping | list) and json_size(value) > limit:
            value, cut = f"({json_size(value)} bytes of {key}: too large for one result)", True
        out[key] = value
    return out, cut


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[dict[str, Any]]
    next_cursor: int
    more: bool
    truncated: bool


def read_events(manager: Manager, job_id: str, since: int, max_bytes: int) -> EventPage:
    """Events after ``since`` up to ``max_bytes`` of JSON; the cursor points past the last one
    returned. An event too large alone is returned with its long fields cut (``truncated``)."""
    events: list[dict[str, Any]] = []
    used, cursor, truncated = 0, since, False
    while True:
        batch, _ = manager.output(job_id, cursor, 200)
        if not batch:
            return EventPage(events, cursor, False, truncated)
        for event in batch:
            item: dict[str, Any] = {"seq": event.seq, "ts": event.ts, "type": event.type,
                                    "data": dict(event.data or {})}
            size = json_size(item)
            if used + size > max_bytes:
                if events:
                    return EventPage(events, cursor, True, truncated)
                item["data"], cut = _clip_event(item["data"], max(128, max_bytes // 4))
                item["truncated"] = cut
                truncated = truncated or cut
                size = json_size(item)
            events.append(item)
            used += size
            cursor = event.seq
