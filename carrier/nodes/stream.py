"""The controller's half of a node run: transmit, relay the worker's stream with a heartbeat, process.

Called by the detached worker (``carrier.ansible.worker``) when the spec names a node:

1. stage a private data directory (``node/``: ``project/`` and ``inventory/`` copied from Carrier's
   playbook directory and inventory) and write the transmit stream of it (``transmit.stream``);
2. start ``ansible-runner worker`` on the node with that stream as stdin (``NodeTransport``);
3. relay the node's stream into ``ansible-runner process``, which writes events (one file each,
   renamed into place, as a local run does) and the artifacts into ``artifacts/run/``: the job
   manager tails them with the same cursors as a local run;
4. delete the run's directory on the node.

A cancel (the ``cancel`` file or SIGTERM) stops the worker's process group on the node, then,
after ``STOP_GRACE`` seconds, kills every process of the run there. While the stream is quiet for
``HEARTBEAT_INTERVAL`` seconds the node is probed (``NodeTransport.probe``); a probe that fails, or
a stream that ends without the worker's final status, means the node is gone: the run ends
``node_lost`` (the local ssh is killed, so nothing waits on a dead connection).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carrier.ansible.errors import SshError
from carrier.ansible.runner import IDENT, RunSpec
from carrier.ansible.ssh import ansible_ssh_env
from carrier.nodes.pool import Node
from carrier.nodes.transport import CONTROL_TIMEOUT, PROBE_TIMEOUT, NodeTransport

#: Seconds of a quiet stream between two heartbeat probes of the node.
HEARTBEAT_INTERVAL = 5.0
#: Seconds a cancelled worker gets to stop before its processes on the node are killed.
STOP_GRACE = 10.0
STAGE_DIR = "node"
STREAM_FILE = "transmit.stream"
SSH_LOG = "node-ssh.log"
#: Status the worker writes when the node went away (the engine says ``failed: node X unreachable``).
NODE_LOST = "node_lost"
_FINAL = ("successful", "failed", "canceled", "timeout")
#: Variables of the controller's run environment that name controller paths or sockets.
_CONTROLLER_ONLY = ("HOME", "SSH_AUTH_SOCK", "ANSIBLE_CONFIG", "PATH", "ANSIBLE_LOCAL_TEMP",
                    "ANSIBLE_SSH_ARGS", "ANSIBLE_SSH_CONTROL_PATH", "ANSIBLE_SSH_CONTROL_PATH_DIR")
_IGNORED = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".venv")


@dataclass(frozen=True, slots=True)
class NodeResult:
    status: str
    rc: int | None
    error: str = ""


def node_env(spec_env: Mapping[str, str], node: Node, base: str) -> dict[str, str]:
    """The run's environment as the node's ansible-playbook gets it: Carrier's Ansible settings with
    the node's own paths (temp and ControlPersist sockets in the run directory there)."""
    env = {k: v for k, v in spec_env.items() if k not in _CONTROLLER_ONLY}
    runner_dir = str(Path(node.ansible_runner).parent) if node.ansible_runner.startswith("/") else ""
    env["PATH"] = ":".join(p for p in (runner_dir, "/usr/local/bin", "/usr/bin", "/bin") if p)
    env["ANSIBLE_LOCAL_TEMP"] = f"{base}/tmp"  # noqa: S108 - inside the run's own 0700 directory
    env.update(ansible_ssh_env(Path(f"{base}/cm")))
    return env


def _stage_inventory(source: Path, target: Path) -> str:
    """Copy the inventory (file or directory, with group_vars/host_vars beside a file); return its
    path (runner's transmit makes a path inside the private data directory relative to it)."""
    target.mkdir(mode=0o700, parents=True)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=_IGNORED)
        return str(target)
    shutil.copy2(source, target / source.name)
    for sibling in ("group_vars", "host_vars"):
        if (source.parent / sibling).is_dir():
            shutil.copytree(source.parent / sibling, target / sibling, ignore=_IGNORED)
    return str(target / source.name)


def transmit_kwargs(run_dir: Path, spec: RunSpec, node: Node, base: str) -> dict[str, Any]:
    """Stage the private data directory and return ``ansible_runner.run`` arguments for it."""
    stage = run_dir / STAGE_DIR
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(mode=0o700)
    inventory = _stage_inventory(Path(spec.inventory), stage / "inventory")
    kwargs: dict[str, Any] = {
        "private_data_dir": str(stage),
        "ident": IDENT,
        "inventory": inventory,
        "extravars": spec.extra_vars or None,
        "forks": spec.forks,
        "verbosity": spec.verbosity or None,
        "cmdline": spec.cmdline() or None,
        "envvars": node_env(spec.env, node, base),
        "settings": {"suppress_ansible_output": True},
        "timeout": spec.timeout or None,
        "limit": spec.limit,
    }
    if spec.kind == "playbook":
        shutil.copytree(spec.project_dir, stage / "project", ignore=_IGNORED)
        kwargs["playbook"] = spec.playbook
        if spec.tags:
            kwargs["tags"] = ",".join(spec.tags)
    else:
        kwargs.update(module=spec.module, module_args=spec.module_args or None, host_pattern=spec.pattern)
    return {k: v for k, v in kwargs.items() if v is not None}


def write_transmit(run_dir: Path, kwargs: Mapping[str, Any]) -> Path:
    import ansible_runner

    path = run_dir / STREAM_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        transmitter = ansible_runner.run(streamer="transmit", _output=out, **kwargs)
        if transmitter.status == "error":  # pragma: no cover - runner raises rather than returns this
            raise RuntimeError("ansible-runner transmit failed")
    shutil.rmtree(run_dir / STAGE_DIR, ignore_errors=True)  # it is all in the stream now
    return path


class _Relay:
    """Copies the node's stream into a pipe for ``process`` and remembers when it last heard bytes."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.read_fd, self.write_fd = os.pipe()
        self.last = time.monotonic()
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._copy, name="carrier-node-relay", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        try:
            while True:
                chunk = os.read(self.source.fileno(), 65536)
                if not chunk:
                    break
                self.last = time.monotonic()
                view = memoryview(chunk)
                while view:
                    written = os.write(self.write_fd, view)
                    view = view[written:]
        except OSError:
            pass
        finally:
            self.ended.set()
            with contextlib.suppress(OSError):
                os.close(self.write_fd)

    def silent_for(self) -> float:
        return time.monotonic() - self.last


def _event_writer(run_dir: Path) -> Callable[[dict[str, Any]], bool]:
    directory = run_dir / "artifacts" / IDENT / "job_events"

    def write(event: dict[str, Any]) -> bool:
        counter, uuid = event.get("counter"), event.get("uuid")
        if not counter or not uuid:
            return False
        name = f"{int(counter)}-{uuid}.json"
        tmp = directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(event, fh)
        os.replace(tmp, directory / name)  # whole files only: the manager tails this directory
        return False  # written here; the processor's own non-atomic write is skipped

    return write


def run_on_node(run_dir: Path, spec: RunSpec, node: Node, transport: NodeTransport,
                cancelled: Callable[[], bool]) -> NodeResult:
    """One run on ``node``; never raises for a node problem (it becomes the result)."""
    import ansible_runner

    base = node.remote_base(run_dir.name)
    stream = write_transmit(run_dir, transmit_kwargs(run_dir, spec, node, base))
    (run_dir / "artifacts" / IDENT / "job_events").mkdir(mode=0o700, parents=True, exist_ok=True)
    statuses: list[str] = []
    with open(stream, "rb") as stdin, open(run_dir / SSH_LOG, "ab") as ssh_log:
        try:
            proc = transport.open_worker(node, base, stdin, ssh_log)
        except SshError as exc:
            return NodeResult(NODE_LOST, None, f"node {node.name} unreachable: {exc}")
    assert proc.stdout is not None
    relay = _Relay(proc.stdout)
    lost = ""
    stop = threading.Event()

    def watch() -> None:
        nonlocal lost
        stopped_at: float | None = None
        killed = False
        probed = time.monotonic()
        while not stop.wait(0.1):
            if cancelled() and stopped_at is None:
                stopped_at = time.monotonic()
                with contextlib.suppress(SshError):
                    transport.stop_worker(node, base, "TERM")
            elif stopped_at is not None and not killed and time.monotonic() - stopped_at > STOP_GRACE:
                killed = True
                with contextlib.suppress(SshError):
                    transport.stop_worker(node, base, "KILL")
                proc.kill()
            quiet = min(relay.silent_for(), time.monotonic() - probed)
            if not relay.ended.is_set() and quiet > HEARTBEAT_INTERVAL:
                probed = time.monotonic()
                try:
                    transport.probe(node)
                except SshError as exc:
                    lost = f"node {node.name} unreachable: {exc}"
                    proc.kill()  # the relay sees EOF and the processor ends
                    return

    watcher = threading.Thread(target=watch, name="carrier-node-watch", daemon=True)
    watcher.start()
    with os.fdopen(relay.read_fd, "rb") as source:
        processor = ansible_runner.run(
            streamer="process", _input=source, private_data_dir=str(run_dir), ident=IDENT, quiet=True,
            event_handler=_event_writer(run_dir),
            status_handler=lambda data, runner_config: statuses.append(str(data.get("status"))),
        )
    stop.set()
    watcher.join()
    relay.thread.join(5)
    with contextlib.suppress(Exception):
        proc.wait(5)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    final = next((s for s in reversed(statuses) if s in _FINAL), None)
    # A node that was lost gets one short try: the job must end in seconds, not wait on it.
    cleaned = _cleanup(transport, node, base, PROBE_TIMEOUT if final is None else CONTROL_TIMEOUT)
    if final is None:
        why = lost or f"node {node.name} unreachable: the stream ended early (ssh exit {proc.returncode}"
        if not lost:
            tail = _tail(run_dir / SSH_LOG)
            why += f": {tail})" if tail else ")"
        return NodeResult(NODE_LOST, None, why + ("" if cleaned else "; its run directory may remain"))
    rc_text = ""
    with contextlib.suppress(OSError):
        rc_text = (run_dir / "artifacts" / IDENT / "rc").read_text().strip()
    rc = int(rc_text) if rc_text.lstrip("-").isdigit() else None
    del processor
    return NodeResult(final, rc, "" if cleaned else f"node {node.name}: the run directory {base} remains")


def _cleanup(transport: NodeTransport, node: Node, base: str, timeout: float) -> bool:
    try:
        transport.stop_worker(node, base, "KILL", timeout)  # stragglers: Ansible's forks and masters
        return transport.cleanup(node, base, timeout)
    except SshError:
        return False


def _tail(path: Path, limit: int = 300) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-2:])[-limit:]
