"""Who a process is, across pid reuse: its boot id and start time (from /proc)."""

from __future__ import annotations

from pathlib import Path


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def boot_id() -> str:
    """This machine's current boot id (``/proc/sys/kernel/random/boot_id``)."""
    return _boot_id()


def on_this_machine(start: str) -> bool:
    """Whether a ``process_start`` identity was taken on this machine since its last boot."""
    return start.partition("/")[0] == _boot_id()


def process_start(pid: int) -> str | None:
    """``<boot id>/<start time in ticks>`` of a live, non-zombie ``pid``; None when it is gone."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return f"{_boot_id()}/{fields[19]}"  # field 22 of stat; fields[] starts at field 3
