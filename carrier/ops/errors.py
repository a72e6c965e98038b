"""What the operations layer raises: one base class, so a door renders every refusal the same way."""

from __future__ import annotations

from carrier.errors import CarrierError


class OpsError(CarrierError):
    """An operation cannot be done as asked (bad input, unknown playbook or job, not available).

    The message is for the person who asked: it says what was wrong and what to do instead.
    """


class Denied(OpsError):
    """The policy said no; the message carries its reason (``not allowed: ...``)."""
