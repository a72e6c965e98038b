"""The detached ansible-runner worker: ``python -m carrier.ansible.worker RUN_DIR``.

Started by ``carrier.ansible.runner.start_worker`` in its own session, so it keeps running when
Carrier stops. It reads ``spec.json``, runs ansible-runner with a cancel callback (SIGTERM or the
``cancel`` file) polled every ``PEXPECT_TIMEOUT`` seconds, and writes ``result.json`` last. When
the spec names an execution node, the run goes there instead (``carrier.nodes.stream``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from carrier.ansible.runner import (
    CANCEL_FILE,
    IDENT,
    PEXPECT_TIMEOUT,
    SPEC_FILE,
    RunSpec,
    stop_run_processes,
    write_result,
)


def _become_fifo(password: str) -> tuple[Path, threading.Thread]:
    """A FIFO in a fresh 0700 directory outside the run's files: Ansible reads the password from it
    once (``--become-password-file``); a thread writes it, then the FIFO is removed. Nothing of the
    password is ever on disk."""
    where = Path(tempfile.mkdtemp(prefix="carrier-become-"))
    fifo = where / "become"
    os.mkfifo(fifo, 0o600)

    def feed() -> None:
        try:
            with open(fifo, "w", encoding="utf-8") as pipe:  # blocks until ansible opens it
                pipe.write(password + "\n")
        finally:
            with contextlib.suppress(OSError):
                fifo.unlink()
            with contextlib.suppress(OSError):
                where.rmdir()

    thread = threading.Thread(target=feed, name="carrier-become", daemon=True)
    thread.start()
    return fifo, thread


def run(run_dir: Path) -> int:
    spec = RunSpec.from_json((run_dir / SPEC_FILE).read_text(encoding="utf-8"))
    cancelled = threading.Event()

    def on_term(signum: int, _frame: FrameType | None) -> None:
        cancelled.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cancel_file = run_dir / CANCEL_FILE

    def cancel_callback() -> bool:
        return cancelled.is_set() or cancel_file.exists()

    if spec.node is not None:
        return _run_on_node(run_dir, spec, cancel_callback)

    import ansible_runner

    cmdline = spec.cmdline()
    fifo: Path | None = None
    if spec.become_password:
        password = sys.stdin.read()
        if not password:
            write_result(run_dir, "error", None, "the become password did not reach the worker")
            return 1
        fifo, _feeder = _become_fifo(password)
        del password
        cmdline = f"{cmdline} --become-password-file={fifo}".strip()

    kwargs: dict[str, object] = {
        "private_data_dir": str(run_dir),
        "ident": IDENT,
        "inventory": spec.inventory,
        "extravars": spec.extra_vars or None,
        "forks": spec.forks,
        "verbosity": spec.verbosity or None,
        "cmdline": cmdline or None,
        "envvars": spec.env,
        "quiet": True,
        "cancel_callback": cancel_callback,
        "settings": {"pexpect_timeout": PEXPECT_TIMEOUT, "suppress_ansible_output": True},
    }
    if spec.timeout:
        kwargs["timeout"] = spec.timeout
    if spec.kind == "playbook":
        kwargs.update(project_dir=spec.project_dir, playbook=spec.playbook, limit=spec.limit)
        if spec.tags:
            kwargs["tags"] = ",".join(spec.tags)
    else:
        kwargs.update(module=spec.module, module_args=spec.module_args or None, host_pattern=spec.pattern,
                      limit=spec.limit)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        result = ansible_runner.run(**kwargs)
    except Exception as exc:  # runner refuses bad input by raising; the job must still end
        traceback.print_exc()
        write_result(run_dir, "error", None, f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        if fifo is not None:  # never read (the run failed first): remove it anyway
            with contextlib.suppress(OSError):
                fifo.unlink()
            with contextlib.suppress(OSError):
                fifo.parent.rmdir()
    if result.status in ("canceled", "timeout", "failed"):
        stop_run_processes(run_dir)  # Ansible's forks outlive a killed ansible-playbook
    write_result(run_dir, str(result.status), result.rc)
    return 0


def _run_on_node(run_dir: Path, spec: RunSpec, cancelled: Callable[[], bool]) -> int:
    """The run on an execution node (``carrier.nodes.stream``), with the same result file."""
    from carrier.nodes.pool import Node
    from carrier.nodes.stream import run_on_node
    from carrier.nodes.transport import transport_for

    assert spec.node is not None
    try:
        result = run_on_node(run_dir, spec, Node.from_dict(spec.node), transport_for(Path(spec.state_dir)),
                             cancelled)
    except Exception as exc:  # the job must still end, with the reason
        traceback.print_exc()
        write_result(run_dir, "error", None, f"{type(exc).__name__}: {exc}")
        return 1
    stop_run_processes(run_dir)  # the local ssh client, should it linger
    write_result(run_dir, result.status, result.rc, result.error)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m carrier.ansible.worker RUN_DIR", file=sys.stderr)
        return 2
    return run(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
