"""A clock the store tests set by hand (``Store.open(clock=...)``)."""

from __future__ import annotations


class FakeClock:
    """Returns ``now``; tests move it forward."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now
