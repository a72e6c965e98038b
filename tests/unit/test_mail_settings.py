"""Per-user settings (``settings [encrypt on|off|auto]``): the grammar, the store (migration 9, on
both dialects) and which replies are encrypted or withheld (carrier.mail.crypto, pure parts)."""

from __future__ import annotations

import sqlite3

import pytest
from clock_support import FakeClock

from carrier.mail.commands import EXAMPLES, GRAMMAR, CommandError, parse_commands
from carrier.mail.crypto import wants_encryption, withheld_reason, withheld_sections
from carrier.mail.replies import Section
from carrier.store import Store
from carrier.store import settings as user_settings
from carrier.store.schema import ENCRYPT_MODES

T0 = 1_700_000_000.0




@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)




# --------------------------------------------------------------------------- the grammar


@pytest.mark.parametrize(("line", "mode"), [
    ("settings encrypt on", "always"), ("SETTINGS Encrypt ON", "always"),
    ("settings encrypt always", "always"),
    ("settings encrypt off", "never"), ("settings encrypt never", "never"), ("settings encrypt auto", "auto"),
])
def test_settings_encrypt_words(line: str, mode: str) -> None:
    (cmd,) = parse_commands(line).commands
    assert (cmd.verb, cmd.encrypt) == ("settings", mode)


def test_settings_alone_shows_them() -> None:
    (cmd,) = parse_commands("settings").commands
    assert (cmd.verb, cmd.encrypt) == ("settings", None)
    assert "settings | settings encrypt on|off|auto" in GRAMMAR
    assert EXAMPLES["settings"] == "settings encrypt on"


@pytest.mark.parametrize(("line", "message"), [
    ("settings encrypt", "`settings encrypt` needs on, off or auto"),
    ("settings encrypt sometimes", "`settings encrypt` needs on, off or auto"),
    ("settings colour blue", "unknown setting 'colour': the setting is `encrypt`"),
    ("settings encrypt on now", "settings"),
])
def test_bad_settings_lines_say_why(line: str, message: str) -> None:
    (entry,) = parse_commands(line).entries
    assert isinstance(entry, CommandError)
    assert message in entry.message, entry.message
    assert entry.example == EXAMPLES["settings"]


def test_unknown_verbs_list_settings() -> None:
    (entry,) = parse_commands("setings encrypt on").entries
    assert isinstance(entry, CommandError) and "settings" in entry.message


# --------------------------------------------------------------------------- the store


def test_no_row_means_the_defaults(store: Store) -> None:
    got = user_settings.get_settings(store, "ops@example.test")
    assert (got.identity, got.encrypt, got.updated_at) == ("ops@example.test", "auto", None)


def test_set_encrypt_upserts_one_row_per_identity(store: Store, clock: FakeClock) -> None:
    assert user_settings.set_encrypt(store, "ops@example.test", "always").encrypt == "always"
    clock.now += 60
    again = user_settings.set_encrypt(store, "ops@example.test", "never")
    assert (again.encrypt, again.updated_at) == ("never", T0 + 60)
    user_settings.set_encrypt(store, "admin@example.test", "auto")
    assert user_settings.get_settings(store, "ops@example.test").encrypt == "never"
    assert user_settings.get_settings(store, "admin@example.test").encrypt == "auto"
    rows = store._conn().execute("SELECT count(*) AS n FROM user_settings").fetchone()
    assert rows["n"] == 2


def test_an_unknown_mode_is_refused_before_and_by_the_schema(store: Store) -> None:
    with pytest.raises(ValueError, match="invalid encrypt mode 'sometimes'"):
        user_settings.set_encrypt(store, "ops@example.test", "sometimes")
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as conn:
        conn.execute("INSERT INTO user_settings (identity, encrypt, updated_at) VALUES (?, ?, ?)",
                     ("ops@example.test", "sometimes", T0))
    assert user_settings.get_settings(store, "ops@example.test").encrypt == "auto"


# --------------------------------------------------------------------------- which replies are encrypted


def test_wants_encryption() -> None:
    assert ENCRYPT_MODES == ("always", "never", "auto")
    assert wants_encryption("always", False) and wants_encryption("always", True)
    assert not wants_encryption("never", True) and not wants_encryption("never", False)
    assert wants_encryption("auto", True) and not wants_encryption("auto", False)


def test_a_withheld_reply_keeps_statuses_and_job_ids_only() -> None:
    reason = withheld_reason("always")
    assert "NOT encrypted" in reason and "`encrypt always`" in reason and "settings encrypt off" in reason
    assert "`encrypt auto`" in withheld_reason("auto")
    sections = [Section("run ping on web1", "accepted", "job j-abcdefgh2345 started", job="j-abcdefgh2345"),
                Section("exec db1 cat /etc/secret", "denied", "not allowed: db1"),
                Section("hosts", "ok", "2 host(s)", block="web1\nweb2")]
    shown = withheld_sections(reason, sections)
    assert [s.text for s in shown] == [reason, "command 1: accepted (job j-abcdefgh2345)",
                                       "command 2: refused", "command 3: done"]
    assert all(s.line == "" and s.block is None for s in shown)
