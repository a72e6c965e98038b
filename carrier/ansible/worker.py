"""The detached ansible-runner worker: ``python -m carrier.ansible.worker RUN_DIR``.

Started by ``carrier.ansible.runner.start_worker`` in its own session, so it keeps running when
Carrier stops. It reads ``spec.json``, runs ansible-runner with a cancel callback (SIGTERM or the
``cancel`` file) polled every ``PEXPECT_TIMEOUT`` seconds, and writes ``result.json`` last. When
the spec names an execution node, the run goes there instead (``carrier.nodes.stream``).

The warm worker (``carrier.ansible.zygote``) calls ``run`` in a child forked from a parent that
has imported Ansible already; ansible-runner then gets ``ansible-playbook``/``ansible`` as a forked
grandchild on its pty that runs the CLI in-process (``_InProcessAnsible``) instead of a new
interpreter. Everything else (events, stdout, cancel, result) is ansible-runner's, as in a cold run.
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
from typing import Any

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


def run(run_dir: Path, *, warm: bool = False, become_password: str | None = None) -> int:
    """Run ``run_dir``'s spec. ``warm``: in a zygote's child, the become password (if the spec wants
    one) is ``become_password`` (it came over the zygote's socket) instead of stdin."""
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
    _spawn_ansible(run_dir, warm)
    if spec.become_password:
        password = (become_password or "") if warm else sys.stdin.read()
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


# --------------------------------------------------------------------------- the warm worker's runs

#: The environment the zygote imported Ansible with (``prepare_warm``). Ansible reads its settings
#: at import, so a run's environment may differ from it only in ``PER_RUN_ENV``.
_IMPORT_ENV: dict[str, str] | None = None
#: Exit status of an in-process run refused because the zygote's Ansible does not fit the run.
STALE_EXIT = 250


def prepare_warm() -> None:
    """In the zygote, after Ansible was imported: remember the environment it was imported with."""
    global _IMPORT_ENV
    _IMPORT_ENV = dict(os.environ)


def _spawn_ansible(run_dir: Path, warm: bool) -> None:
    """How ansible-runner's pexpect starts ``ansible-playbook``/``ansible``.

    Both ways: ptyprocess sleeps 0.1 s in ``close()`` "to let the kernel update the process
    status", but ansible-runner closes only once the child is no longer alive, so that sleep is
    pure delay on every run (it is a tenth of a warm 5-task play). ``warm``: the child is a fork of
    this process that runs the CLI in-process instead of exec. The run's processes all hold an
    open descriptor of ``run_dir`` (forks keep the zygote's environment in /proc, so
    ``CARRIER_RUN_DIR`` is not enough for ``stop_run_processes`` to find them)."""
    import pexpect.pty_spawn
    import ptyprocess

    mark = -1
    if warm:
        mark = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        os.set_inheritable(mark, True)

    def spawnpty(_self: object, args: list[bytes], **kwargs: Any) -> Any:
        if warm:
            sys.stdout.flush()
            sys.stderr.flush()
            env = dict(kwargs.get("env") or {})
            before = kwargs.get("preexec_fn")

            def in_process() -> None:  # in the forked grandchild, instead of exec
                if callable(before):
                    before()
                _ansible_in_process([a.decode() if isinstance(a, bytes) else str(a) for a in args], env,
                                    mark)

            kwargs["preexec_fn"] = in_process
            kwargs["pass_fds"] = (mark,)
        proc = ptyprocess.PtyProcess.spawn(args, **kwargs)
        proc.delayafterclose = 0.0
        return proc

    pexpect.pty_spawn.spawn._spawnpty = spawnpty


def _ansible_in_process(argv: list[str], env: dict[str, str], mark: int) -> None:
    """The CLI of ``argv`` in this (forked, pty-attached) process; never returns."""
    import atexit
    import resource

    top = min(1048576, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.closerange(3, mark)  # ptyprocess's exec-error pipe among them: the parent goes on as after exec
    os.closerange(mark + 1, top)
    atexit._clear()  # the zygote's exit handlers are not this run's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 1
    try:
        code = _cli(argv, env)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = STALE_EXIT
    finally:
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _cli(argv: list[str], env: dict[str, str]) -> int:
    from ansible import constants as C
    from ansible.config.manager import find_ini_config_file

    from carrier.ansible.zygote import PER_RUN_ENV

    base = _IMPORT_ENV or {}
    changed = {k for k in set(env) | set(base) if env.get(k) != base.get(k)}
    stale = sorted(changed - set(PER_RUN_ENV))
    os.environ.clear()
    os.environ.update(env)
    config_file = find_ini_config_file()
    if stale or config_file != C.config._config_file:
        why = f"environment {', '.join(stale)}" if stale else f"configuration file {config_file}"
        print(f"ERROR! carrier: the warm worker imported Ansible with another {why}: run the job again "
              "(a new warm worker starts) or set ansible.worker: cold", file=sys.stderr, flush=True)
        return STALE_EXIT
    for name, definition in C.config.get_configuration_definitions().items():
        if {e.get("name") for e in definition.get("env") or ()} & changed:
            C.set_constant(name, C.config.get_config_value(name))  # e.g. this run's local temp
    sys.argv = list(argv)
    program = Path(argv[0]).name
    if program == "ansible-playbook":
        from ansible.cli.playbook import PlaybookCLI

        PlaybookCLI.cli_executor(argv)
    elif program == "ansible":
        from ansible.cli.adhoc import AdHocCLI

        AdHocCLI.cli_executor(argv)
    print(f"ERROR! carrier: the warm worker does not run {program}", file=sys.stderr, flush=True)
    return STALE_EXIT


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m carrier.ansible.worker RUN_DIR", file=sys.stderr)
        return 2
    return run(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
