"""Exceptions that reach a person: each message says what is wrong and what to do."""

from __future__ import annotations


class CarrierError(Exception):
    """An error a user can act on. The CLI prints the message on one line and exits ``exit_code``."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(CarrierError):
    """The configuration cannot be used as it is."""


class StoreError(CarrierError):
    """The state store cannot be opened or migrated."""


class SandboxError(CarrierError):
    """The loopback sandbox cannot start, stop or report."""
