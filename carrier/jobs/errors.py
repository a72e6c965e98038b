"""Errors of the job layer; each message says what is wrong and what to do."""

from __future__ import annotations

from carrier.errors import CarrierError


class JobError(CarrierError):
    """A job request or job id cannot be used."""


class JobNotFound(JobError):
    """No job has that id."""
