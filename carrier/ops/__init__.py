"""The operations layer: what every door (mail, MCP, CLI) calls to decide, audit and run.

See :mod:`carrier.ops.service` and docs/architecture.md.
"""

from carrier.ops.errors import Denied, OpsError
from carrier.ops.identity import local_identity
from carrier.ops.runtime import Services
from carrier.ops.service import JOB_KINDS, JOB_STATUSES, HostInfo, Ops, Planned

__all__ = ["JOB_KINDS", "JOB_STATUSES", "Denied", "HostInfo", "Ops", "OpsError", "Planned", "Services",
           "local_identity"]
