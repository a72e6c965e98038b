"""SQL for per-user settings (schema migration 9): what a user chose for themselves by a signed
``settings`` mail. One row per identity (its address); no row means every default."""

from __future__ import annotations

from dataclasses import dataclass

from carrier.store import schema
from carrier.store.db import Store

DEFAULT_ENCRYPT = "auto"


@dataclass(frozen=True, slots=True)
class UserSettings:
    identity: str
    encrypt: str = DEFAULT_ENCRYPT
    updated_at: float | None = None


def get_settings(store: Store, identity: str) -> UserSettings:
    """``identity``'s settings (the defaults when they never chose any)."""
    row = store._conn().execute(
        "SELECT identity, encrypt, updated_at FROM user_settings WHERE identity = ?", (identity,)
    ).fetchone()
    if row is None:
        return UserSettings(identity)
    return UserSettings(row["identity"], row["encrypt"], float(row["updated_at"]))


def set_encrypt(store: Store, identity: str, mode: str) -> UserSettings:
    """Record ``identity``'s choice of reply encryption (one of ``schema.ENCRYPT_MODES``)."""
    if mode not in schema.ENCRYPT_MODES:
        raise ValueError(f"invalid encrypt mode {mode!r}: expected one of {', '.join(schema.ENCRYPT_MODES)}")
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO user_settings (identity, encrypt, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (identity) DO UPDATE SET encrypt = excluded.encrypt, "
            "updated_at = excluded.updated_at",
            (identity, mode, store.clock()),
        )
    return get_settings(store, identity)
