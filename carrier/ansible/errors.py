"""Errors of the Ansible engine; each message says what is wrong and what to do."""

from __future__ import annotations

from carrier.errors import CarrierError


class EngineError(CarrierError):
    """The engine cannot do what was asked."""


class InventoryError(EngineError):
    """The inventory cannot be loaded, or a host or pattern is unknown."""


class PatternError(InventoryError):
    """A host pattern is malformed or matches no host."""


class ControllerError(PatternError):
    """A pattern selects the Carrier controller itself (implicit localhost, or a local host that was not
    allowed)."""


class HostError(InventoryError):
    """A host's connection settings are unusable (checked before they reach an ssh argv)."""


class PlaybookError(EngineError):
    """A playbook name is invalid, escapes the playbook directories, or has bad catalog metadata."""


class ExtraVarsError(PlaybookError):
    """Extra vars outside a playbook's declared ones, or of the wrong type."""


class SshError(EngineError):
    """An ssh master cannot be started, checked or closed."""
