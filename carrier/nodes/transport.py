"""How the streaming protocol reaches a node: ``NodeTransport``, and ``SshTransport`` over OpenSSH.

The transport knows five things: start ``ansible-runner worker`` on the node with the transmit
stream as its stdin and the worker's stream as its stdout; stop a worker (its whole process group,
plus every process carrying the run's marker, on the node itself: killing the local ssh would
leave them running); delete the run's directory; probe that the node still answers (the heartbeat while
the stream is quiet: ansible-runner before 2.4 sends no keepalives); and ask the node for its
``ansible-runner --version``. A Receptor transport (``receptorctl work submit``) would implement
the same five.

On the node a run lives in ``<work_dir>/carrier-<job id>/``: ``pid`` (the worker's process group),
``data/`` (the private data directory the worker unpacks and deletes), ``tmp/`` and ``cm/``
(Ansible's local temp and ControlPersist sockets there). Every process of the run inherits
``CARRIER_NODE_RUN=<that directory>``.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import IO, Protocol

from carrier.ansible.errors import SshError
from carrier.ansible.ssh import SshControl, remote_command
from carrier.nodes.pool import Node

#: The environment variable that marks every process of a run on the node.
NODE_MARK_ENV = "CARRIER_NODE_RUN"
CONTROL_TIMEOUT = 30.0
#: Seconds a heartbeat probe may take before the node counts as gone.
PROBE_TIMEOUT = 10.0

# $0 = the run directory, $1 = the ansible-runner command. The outer shell
# is sshd's session leader, so setsid forks: the child (the worker, by exec) leads a new session
# and process group whose id it writes to ``pid``; -w passes its exit status back.
_WORKER_INNER = (
    f'echo $$ > pid; {NODE_MARK_ENV}="$0"; export {NODE_MARK_ENV}; '
    'exec "$1" worker --private-data-dir="$0/data" --delete'
)
_WORKER_OUTER = (
    'umask 077; mkdir -p "$0/cm" "$0/tmp" && cd "$0" || exit 97; '
    f'exec setsid -w sh -c {shlex.quote(_WORKER_INNER)} "$0" "$1"'
)
# $0 = the run directory, $1 = the signal: the worker's group, then every marked process.
_STOP = (
    'if [ -f "$0/pid" ]; then kill -s "$1" -- "-$(cat "$0/pid")" 2>/dev/null; fi; '
    f'for e in /proc/[0-9]*/environ; do grep -qzxF "{NODE_MARK_ENV}=$0" "$e" 2>/dev/null || continue; '
    'p=${e#/proc/}; kill -s "$1" "${p%/environ}" 2>/dev/null; n=$((n+1)); done; echo "${n:-0}"'
)
# $0 = the run directory: remove it; print "gone" when nothing is left.
_CLEAN = 'rm -rf -- "$0"; [ -e "$0" ] || echo gone'


class NodeTransport(Protocol):
    """What a run needs from the way a node is reached (see the module docstring)."""

    def open_worker(self, node: Node, base: str, stdin: IO[bytes],
                    stderr: IO[bytes]) -> subprocess.Popen[bytes]:
        """Start the worker; its stdout (a pipe) is the worker's stream."""
        ...

    def stop_worker(self, node: Node, base: str, signal_name: str = "TERM",
                    timeout: float = CONTROL_TIMEOUT) -> int:
        """Signal the run's processes on the node; return how many were found."""
        ...

    def cleanup(self, node: Node, base: str, timeout: float = CONTROL_TIMEOUT) -> bool:
        """Delete the run's directory on the node; True when it is gone."""
        ...

    def probe(self, node: Node) -> None:
        """Return when the node answers; SshError when it does not within ``PROBE_TIMEOUT``."""
        ...

    def version(self, node: Node) -> str:
        """The node's ``ansible-runner --version`` (SshError when it cannot be asked)."""
        ...


class SshTransport:
    """The stream over ``ssh`` through Carrier's ControlPersist master for the node."""

    def __init__(self, control: SshControl) -> None:
        self.control = control

    def _argv(self, node: Node, argv: list[str]) -> list[str]:
        self.control.ensure_master(node.conn)  # SshError, in ssh's words, when the node is down
        return self.control.argv(node.conn, remote_command(argv, shell=False))

    def open_worker(self, node: Node, base: str, stdin: IO[bytes],
                    stderr: IO[bytes]) -> subprocess.Popen[bytes]:
        argv = self._argv(node, ["sh", "-c", _WORKER_OUTER, base, node.ansible_runner])
        return subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=stderr, close_fds=True)

    def _run(self, node: Node, argv: list[str], what: str, timeout: float = CONTROL_TIMEOUT) -> str:
        try:
            done = subprocess.run(self._argv(node, argv), stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise SshError(f"node {node.name}: {what} did not answer within {timeout:g} s") from None
        if done.returncode != 0:
            detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise SshError(f"node {node.name}: {what} failed (exit {done.returncode})"
                           + (f": {detail[-1][:300]}" if detail else ""))
        return done.stdout.decode("utf-8", "replace").strip()

    def stop_worker(self, node: Node, base: str, signal_name: str = "TERM",
                    timeout: float = CONTROL_TIMEOUT) -> int:
        found = self._run(node, ["sh", "-c", _STOP, base, signal_name], "stopping the worker", timeout)
        return int(found) if found.isdigit() else 0

    def cleanup(self, node: Node, base: str, timeout: float = CONTROL_TIMEOUT) -> bool:
        return self._run(node, ["sh", "-c", _CLEAN, base], "deleting the run directory", timeout) == "gone"

    def probe(self, node: Node) -> None:
        self._run(node, ["true"], "a heartbeat", PROBE_TIMEOUT)

    def version(self, node: Node) -> str:
        return self._run(node, [node.ansible_runner, "--version"], "ansible-runner --version")


def transport_for(state_dir: Path) -> SshTransport:
    """The transport a worker process uses (its own SshControl: masters are shared by socket)."""
    return SshTransport(SshControl(state_dir))
