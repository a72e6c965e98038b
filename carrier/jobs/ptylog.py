"""A PTY job's raw output: a bounded ring in memory plus a capped log on disk, read by byte cursors.

A cursor is a byte offset from the start of the job's output. ``read(since)`` returns the bytes
from ``since`` on and the cursor to ask with next, so nothing is sent twice and nothing is skipped.
Memory holds the newest ``memory_bytes``; the disk log (segment files ``out-<offset>.log`` in the
job's directory) holds at least the newest ``disk_bytes`` (old segments are deleted), so neither
grows with the output. A cursor older than what is kept gets the oldest kept bytes and says how
many were dropped in between.

Segment names carry their start offset, so a later process (after a restart, or a CLI reading a
job run by ``carrier serve``) finds where the output ends without any other bookkeeping.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from carrier.jobs.errors import JobError

DEFAULT_MEMORY = 256 * 1024
DEFAULT_DISK = 8 * 1024 * 1024
MAX_READ = 4 * 1024 * 1024
_SEGMENT_RE = re.compile(r"out-(\d{16})\.log")


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """Bytes ``[start, next_cursor)`` of the output; ``dropped`` bytes before ``start`` (after the
    asked cursor) are no longer kept."""

    data: bytes
    start: int
    next_cursor: int
    dropped: int


def utf8_tail_start(data: bytes) -> int:
    """Index where an incomplete UTF-8 sequence at the end of ``data`` begins (``len(data)`` if none)."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for the lead byte
        if byte & 0x80 == 0:
            return n  # ASCII: complete
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return n - back if back < need else n
    return n


def utf8_head_skip(data: bytes) -> int:
    """How many continuation bytes open ``data`` (a cursor that landed inside a character)."""
    skip = 0
    while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:
        skip += 1
    return skip


class OutputLog:
    """The output of one job. Thread-safe. ``directory=None`` keeps memory only.

    ``readonly`` opens a log another process writes: reads go to the disk segments only.
    """

    def __init__(
        self,
        directory: Path | None,
        *,
        memory_bytes: int = DEFAULT_MEMORY,
        disk_bytes: int = DEFAULT_DISK,
        readonly: bool = False,
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.memory_bytes = max(4096, int(memory_bytes))
        self.disk_bytes = max(self.memory_bytes, int(disk_bytes))
        self.segment_bytes = max(4096, self.disk_bytes // 4)
        self.readonly = readonly
        self._lock = threading.Lock()
        self._ring = bytearray(0 if readonly else self.memory_bytes)
        self._segments: list[tuple[int, int]] = []  # (start, size), oldest first
        self._fh: int | None = None
        self.end = 0
        if self.directory is not None:
            if not readonly:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._segments = self._scan()
            if self._segments:
                start, size = self._segments[-1]
                self.end = start + size
        # Memory starts empty after a reopen; older bytes are read from disk.
        self._mem_start = self.end

    # ----------------------------------------------------------------- disk segments

    def _path(self, start: int) -> Path:
        assert self.directory is not None
        return self.directory / f"out-{start:016d}.log"

    def _scan(self) -> list[tuple[int, int]]:
        """The contiguous run of segments that ends with the newest one."""
        assert self.directory is not None
        found: list[tuple[int, int]] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.directory):
                match = _SEGMENT_RE.fullmatch(entry.name)
                if match is not None:
                    with contextlib.suppress(FileNotFoundError):
                        found.append((int(match.group(1)), entry.stat().st_size))
        found.sort()
        run: list[tuple[int, int]] = []
        for start, size in reversed(found):
            if run and start + size != run[0][0]:
                break
            run.insert(0, (start, size))
        return run

    def _write_disk(self, data: bytes) -> None:
        if self.directory is None:
            return
        view = memoryview(data)
        offset = self.end
        while view:
            if self._fh is None or self._segments[-1][1] >= self.segment_bytes:
                # A new segment starts here (a reopened log also starts a new one).
                if self._fh is not None:
                    os.close(self._fh)
                self._fh = os.open(self._path(offset), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                   0o600)
                if not self._segments or self._segments[-1][0] != offset:
                    self._segments.append((offset, 0))
            start, size = self._segments[-1]
            piece = view[:self.segment_bytes - size]
            written = os.write(self._fh, piece)
            self._segments[-1] = (start, size + written)
            view = view[written:]
            offset += written
        # Keep at least disk_bytes: drop the oldest segment only when the rest still hold that much.
        kept = sum(size for _, size in self._segments)
        while len(self._segments) > 1 and kept - self._segments[0][1] >= self.disk_bytes:
            old_start, old_size = self._segments.pop(0)
            kept -= old_size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(old_start))

    def _read_disk(self, since: int, limit: int) -> bytes:
        out = bytearray()
        for start, size in list(self._segments):
            if start + size <= since or len(out) >= limit:
                continue
            offset = max(0, since + len(out) - start)
            try:
                fd = os.open(self._path(start), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                break  # deleted under us (another process pruned it): stop at a gap, never skip
            try:
                out += os.pread(fd, min(limit - len(out), size - offset), offset)
            finally:
                os.close(fd)
        return bytes(out)

    # ----------------------------------------------------------------- write / read

    def append(self, data: bytes) -> int:
        """Add output; return the new end cursor."""
        if not data:
            return self.end
        if self.readonly:
            raise JobError("this output log is read-only (another Carrier process writes it)")
        with self._lock:
            self._write_disk(data)
            size = len(self._ring)
            if len(data) >= size:
                tail = data[-size:]
                pos = (self.end + len(data) - size) % size
                first = size - pos
                self._ring[pos:] = tail[:first]
                self._ring[:pos] = tail[first:]
            else:
                pos = self.end % size
                first = min(len(data), size - pos)
                self._ring[pos:pos + first] = data[:first]
                if first < len(data):
                    self._ring[:len(data) - first] = data[first:]
            self.end += len(data)
            self._mem_start = max(self._mem_start, self.end - size)
            return self.end

    def refresh(self) -> int:
        """A read-only log: look again at what the writing process has added; the new end."""
        with self._lock:
            self._refresh()
            return self.end

    def _refresh(self) -> None:
        if self.readonly and self.directory is not None:
            self._segments = self._scan()
            if self._segments:
                start, size = self._segments[-1]
                self.end = self._mem_start = start + size

    def _oldest(self) -> int:
        if self._segments:
            return min(self._segments[0][0], self._mem_start)
        return self._mem_start

    def read(self, since: int, limit: int = 65536) -> OutputChunk:
        """Bytes from cursor ``since`` (at most ``limit``)."""
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise JobError(f"the output cursor must be a whole number >= 0, got {since!r}")
        limit = max(1, min(int(limit), MAX_READ))
        with self._lock:
            if self.readonly:
                self._refresh()
            end = self.end
            if since > end:
                raise JobError(f"output cursor {since} is past the end of the output ({end}): "
                               "use the next_cursor a previous read returned")
            oldest = self._oldest()
            dropped = max(0, oldest - since)
            start = max(since, oldest)
            stop = min(end, start + limit)
            if start >= self._mem_start and not self.readonly:
                data = self._read_memory(start, stop)
            else:
                data = self._read_disk(start, stop - start)
                stop = start + len(data)
            return OutputChunk(data, start, stop, dropped)

    def _read_memory(self, start: int, stop: int) -> bytes:
        size = len(self._ring)
        a, b = start % size, stop % size
        if stop - start == 0:
            return b""
        if a < b:
            return bytes(self._ring[a:b])
        return bytes(self._ring[a:]) + bytes(self._ring[:b])

    def tail(self, size: int) -> OutputChunk:
        """The newest ``size`` bytes that are kept."""
        with self._lock:
            end = self.end
        return self.read(max(0, end - size), size)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                os.close(self._fh)
                self._fh = None
