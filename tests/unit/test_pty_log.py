"""The PTY output log: byte cursors (never re-sent, never skipped), the bounded ring, the capped disk
segments, dropped-byte accounting, reopening after a restart, read-only readers, UTF-8 edges."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from carrier.jobs.errors import JobError
from carrier.jobs.ptylog import OutputLog, utf8_head_skip, utf8_tail_start


def _read_all(log: OutputLog, since: int, limit: int) -> tuple[bytes, int, int]:
    out = b""
    dropped = 0
    while True:
        chunk = log.read(since, limit)
        dropped += chunk.dropped
        if not chunk.data:
            return out, since, dropped
        out += chunk.data
        since = chunk.next_cursor


def test_cursors_never_resend_never_skip(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", memory_bytes=4096, disk_bytes=65536)
    expected = b""
    cursor = 0
    got = b""
    for i in range(300):
        piece = f"{i:05d}|".encode() * (i % 7 + 1)
        log.append(piece)
        expected += piece
        chunk = log.read(cursor, 97)  # odd sizes: chunks end anywhere
        got += chunk.data
        cursor = chunk.next_cursor
        assert chunk.dropped == 0
    rest, cursor, dropped = _read_all(log, cursor, 1000)
    assert got + rest == expected and cursor == log.end == len(expected) and dropped == 0


def test_ring_wraps_and_reads_from_disk(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", memory_bytes=4096, disk_bytes=1 << 20)
    data = os.urandom(50_000)
    for i in range(0, len(data), 333):
        log.append(data[i:i + 333])
    # Old bytes are beyond the memory ring: served from the disk segments, exactly.
    got, _, dropped = _read_all(log, 0, 7000)
    assert got == data and dropped == 0
    # A big single append larger than the ring.
    log.append(b"Z" * 10_000)
    assert log.read(log.end - 10, 10).data == b"Z" * 10


def test_a_cursor_older_than_what_is_kept_says_how_much_was_dropped(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", memory_bytes=4096, disk_bytes=16384)
    total = 0
    for _ in range(200):
        log.append(b"x" * 1000)
        total += 1000
    chunk = log.read(0, 100)
    assert chunk.dropped > 0
    assert chunk.start == chunk.dropped  # the oldest kept byte
    assert total - chunk.start >= 16384  # at least disk_bytes kept
    # Disk use stays bounded whatever was written.
    on_disk = sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert on_disk <= 16384 + log.segment_bytes + 1000


def test_memory_only_log(tmp_path: Path) -> None:
    log = OutputLog(None, memory_bytes=4096)
    log.append(b"a" * 5000)
    chunk = log.read(0, 10_000)
    assert chunk.dropped == 904 and len(chunk.data) == 4096
    assert not list(tmp_path.iterdir())


def test_reopen_after_restart_continues_the_cursors(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", memory_bytes=4096, disk_bytes=65536)
    log.append(b"before restart\n")
    log.close()
    again = OutputLog(tmp_path / "out", memory_bytes=4096, disk_bytes=65536)
    assert again.end == len(b"before restart\n")
    again.append(b"after\n")
    assert again.read(0, 100).data == b"before restart\nafter\n"


def test_readonly_reader_sees_what_the_writer_adds(tmp_path: Path) -> None:
    writer = OutputLog(tmp_path / "out", memory_bytes=4096, disk_bytes=65536)
    reader = OutputLog(tmp_path / "out", readonly=True)
    writer.append(b"one ")
    assert reader.read(0, 100).data == b"one "
    writer.append(b"two")
    assert reader.refresh() == 7
    assert reader.read(4, 100).data == b"two"
    with pytest.raises(JobError, match="read-only"):
        reader.append(b"x")


def test_bad_cursors(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out")
    log.append(b"abc")
    with pytest.raises(JobError, match="past the end"):
        log.read(4)
    with pytest.raises(JobError, match=">= 0"):
        log.read(-1)
    with pytest.raises(JobError, match="whole number"):
        log.read("3")  # type: ignore[arg-type]


def test_utf8_edges() -> None:
    euro = "€".encode()  # 3 bytes
    assert utf8_tail_start(b"ab" + euro[:2]) == 2
    assert utf8_tail_start(b"ab" + euro) == 5
    assert utf8_tail_start(b"ab" + "é".encode()[:1]) == 2
    assert utf8_tail_start(b"abc") == 3
    assert utf8_head_skip(euro[1:] + b"x") == 2
    assert utf8_head_skip(b"x") == 0
