"""Fixtures of the unit tests that open a store: ``clock`` (a module may override it to start
elsewhere) and ``store`` on that clock, on each dialect ``store_url`` gives (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from clock_support import FakeClock

from carrier.store import Store


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock, store_url: str | None) -> Iterator[Store]:
    s = Store.open(tmp_path / "state", clock=clock, url=store_url)
    yield s
    s.close()
