"""ansible-runner runs that outlive Carrier: spec, clean environment, detached worker, event reading,
and the readable verdict of a finished run.

A run lives in its job's private directory (``run_dir``, mode 0700)::

    spec.json                   what to run (RunSpec; no secrets)
    worker.log                  the worker's own stdout/stderr
    cancel                      present once a cancel was asked for (the worker polls it)
    artifacts/run/job_events/   ansible-runner's events, one <counter>-<uuid>.json each
    artifacts/run/{status,rc,stdout}
    result.json                 written by the worker last: runner status and rc

``start_worker`` launches ``python -m carrier.ansible.worker run_dir`` in its own session with a
clean environment, so the run goes on when Carrier stops; the job manager tails the events and, after
a restart, finds the worker again by pid and process start time (see ``ProcessId``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from carrier.ansible.errors import EngineError
from carrier.ansible.strategy import DEFAULT_STRATEGY, strategy_env
from carrier.procid import process_start as process_start  # re-exported for the job manager

IDENT = "run"
SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"
CANCEL_FILE = "cancel"
WORKER_LOG = "worker.log"
#: How often ansible-runner polls the cancel callback (seconds); its default of 5 s makes kill slow.
PEXPECT_TIMEOUT = 0.2
_EVENT_FILE_RE = re.compile(r"(\d+)-[0-9a-fA-F-]+\.json")
#: Environment variables passed through from Carrier's own environment (paths, not secrets).
PASS_THROUGH_ENV = ("HOME", "SSH_AUTH_SOCK", "ANSIBLE_CONFIG", "TZ")


@dataclass(frozen=True, slots=True)
class RunSpec:
    """What one ansible-runner run does. Everything here was validated before it was written."""

    kind: str  # playbook | adhoc
    inventory: str
    project_dir: str = ""
    playbook: str = ""  # relative to project_dir
    module: str = ""
    module_args: str = ""
    pattern: str = ""  # adhoc host pattern
    limit: str | None = None
    extra_vars: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    skip_tags: tuple[str, ...] = ()
    check: bool = False
    diff: bool = False
    forks: int = 10
    timeout: int | None = None
    verbosity: int = 0
    env: dict[str, str] = field(default_factory=dict)
    #: The worker reads a become (sudo) password from its stdin and hands it to Ansible through a
    #: FIFO (``--become-password-file``): it is never written to a file, spec.json or the artifacts.
    become_password: bool = False
    #: The execution node running this (``carrier.nodes.pool.Node.to_dict``); None: on the controller.
    node: dict[str, Any] | None = None
    #: Carrier's state directory (the node run reaches the node through its ssh masters).
    state_dir: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        data = json.loads(text)
        data["tags"] = tuple(data.get("tags") or ())
        data["skip_tags"] = tuple(data.get("skip_tags") or ())
        return cls(**data)

    def cmdline(self) -> str:
        """Extra ansible-playbook/ansible options (ansible-runner splits it with shlex)."""
        parts = []
        if self.check:
            parts.append("--check")
        if self.diff:
            parts.append("--diff")
        if self.skip_tags and self.kind == "playbook":
            parts.append("--skip-tags=" + ",".join(self.skip_tags))
        return " ".join(parts)


def ansible_env(
    *, ssh_env: Mapping[str, str], local_temp: Path, forks: int, parent: Mapping[str, str] | None = None,
    strategy: str = DEFAULT_STRATEGY,
) -> dict[str, str]:
    """The environment of a run: a few safe variables from ``parent`` and Carrier's Ansible settings,
    ``strategy`` among them (``carrier.ansible.strategy``).

    Nothing else of Carrier's environment goes in (ansible-runner copies the environment into its
    artifacts, and Carrier's may hold mail passwords). Host key checking is set explicitly: runner
    would otherwise turn it off, overriding StrictHostKeyChecking from the inventory.
    """
    parent = os.environ if parent is None else parent
    bin_dir = str(Path(sys.executable).parent)
    env = {name: parent[name] for name in PASS_THROUGH_ENV if parent.get(name)}
    env.update(
        {
            "PATH": os.pathsep.join((bin_dir, "/usr/local/bin", "/usr/bin", "/bin")),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_FORKS": str(forks),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_LOCAL_TEMP": str(local_temp),
            # Pipelining over a busy master can lose a session (rc -13): one retry covers it.
            "ANSIBLE_SSH_RETRIES": "1",
            "ANSIBLE_DEPRECATION_WARNINGS": "False",
            "PYTHONDONTWRITEBYTECODE": "1",
            # Python warnings of the controller's own libraries (a CryptographyDeprecationWarning
            # naming Carrier's venv) are not the job's output; Ansible's [WARNING]s still show.
            "PYTHONWARNINGS": "ignore",
        }
    )
    env.update(strategy_env(strategy))
    env.update(ssh_env)  # ANSIBLE_SSH_ARGS and the ControlPath settings (carrier.ansible.ssh)
    return env


# --------------------------------------------------------------------------- the worker process


@dataclass(frozen=True, slots=True)
class ProcessId:
    """A pid plus what makes it unique over time: boot id and start time (pid reuse is detected)."""

    pid: int
    start: str

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        start = process_start(pid)
        return cls(pid, start) if start is not None else None

    def alive(self) -> bool:
        return process_start(self.pid) == self.start


def _package_parent() -> str:
    return str(Path(__file__).resolve().parents[2])


def start_worker(run_dir: Path, spec: RunSpec, *, become_password: str | None = None,
                 warm: bool = False) -> ProcessId:
    """Write ``spec.json`` and start the detached worker; return its identity.

    ``become_password`` (with ``spec.become_password``) goes to the worker through a pipe only (a
    warm worker: over its socket). ``warm``: a child of the warm worker (``carrier.ansible.zygote``)
    instead of a new interpreter; EngineError when that cannot be had (the run did not start).
    """
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (run_dir / "tmp").mkdir(mode=0o700, exist_ok=True)
    spec_path = run_dir / SPEC_FILE
    fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(spec.to_json())
    if warm:
        return _start_warm(run_dir, spec, become_password)
    env = dict(spec.env)
    env["PYTHONPATH"] = _package_parent()
    # Every process of the run inherits this: how stragglers are found after a cancel or timeout.
    env[RUN_MARK_ENV] = str(run_dir)
    with open(run_dir / WORKER_LOG, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "carrier.ansible.worker", str(run_dir)],
            stdin=subprocess.PIPE if spec.become_password else subprocess.DEVNULL,
            stdout=log, stderr=log, env=env, cwd=str(run_dir), start_new_session=True, close_fds=True,
        )
    if proc.stdin is not None:
        with contextlib.suppress(BrokenPipeError):  # a worker that died at once reports it in its log
            proc.stdin.write((become_password or "").encode("utf-8"))
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    _CHILDREN[proc.pid] = proc  # reaped by reap_children(); a restarted Carrier has no such child
    ident = ProcessId.of(proc.pid)
    if ident is None:
        proc.wait()
        ident = ProcessId(proc.pid, "exited")
    return ident


def _start_warm(run_dir: Path, spec: RunSpec, become_password: str | None) -> ProcessId:
    from carrier.ansible import zygote

    if spec.node is not None:
        raise EngineError("a run on an execution node has no warm worker: it starts cold")
    state_dir = run_dir.parent.parent  # <state_dir>/jobs/<job id>
    path = zygote.ensure(state_dir, spec.env, zygote.run_cwd(state_dir, spec.kind, spec.project_dir),
                         spec.kind)
    pid = zygote.submit(path, run_dir, become_password if spec.become_password else None)
    return ProcessId.of(pid) or ProcessId(pid, "exited")


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
RUN_MARK_ENV = "CARRIER_RUN_DIR"


def _holds(entry: Path, run_dir: str) -> bool:
    """Whether the process of ``/proc/<pid>`` has ``run_dir`` open (a warm run's mark)."""
    try:
        fds = list((entry / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd) == run_dir:
                return True
    return False


def run_processes(run_dir: Path) -> list[int]:
    """Live processes of a run, ssh ControlMasters excepted (those serve every job and outlive runs
    on purpose): those that carry ``CARRIER_RUN_DIR=run_dir`` and, for a warm run, whose forks show
    the zygote's environment in /proc, those that hold ``run_dir`` open (``carrier.ansible.worker``)."""
    needle = f"{RUN_MARK_ENV}={run_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            marked = needle in (entry / "environ").read_bytes().split(b"\0")
            if not marked and not _holds(entry, str(run_dir)):
                continue
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ssh: ") and b"[mux]" in cmdline:
            continue
        found.append(int(entry.name))
    return found


def stop_run_processes(run_dir: Path, *, grace: float = 2.0) -> int:
    """SIGTERM, then SIGKILL, every process of the run but the caller; return how many there were.

    ansible-runner kills ansible-playbook's process group, but Ansible's forks start sessions of
    their own and would go on waiting for a remote command; this ends them and their ssh clients.
    """
    me = os.getpid()
    pids = [p for p in run_processes(run_dir) if p != me]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = [p for p in run_processes(run_dir) if p != me]
            if not pids:
                break
            time.sleep(0.05)
        if not pids:
            break
    return len(pids)


def reap_children() -> None:
    """Collect exit statuses of workers this process started (no zombies left behind)."""
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            _CHILDREN.pop(pid, None)


def request_cancel(run_dir: Path, worker: ProcessId | None) -> bool:
    """Ask a run to stop: the ``cancel`` file (polled by the worker) and SIGTERM to the worker."""
    with contextlib.suppress(OSError):
        (run_dir / CANCEL_FILE).touch(mode=0o600)
    if worker is not None and worker.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGTERM)
            return True
    return False


# --------------------------------------------------------------------------- reading a run


def events_dir(run_dir: Path) -> Path:
    return run_dir / "artifacts" / IDENT / "job_events"


def read_events(run_dir: Path, after: int) -> list[dict[str, Any]]:
    """Runner events with a counter above ``after``, in counter order (complete files only)."""
    directory = events_dir(run_dir)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    numbered = []
    for name in names:
        match = _EVENT_FILE_RE.fullmatch(name)
        if match and int(match.group(1)) > after:
            numbered.append((int(match.group(1)), name))
    events = []
    for counter, name in sorted(numbered):
        try:
            data = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # renamed into place whole, so this is a vanished file: skip it
        if isinstance(data, dict):
            data["counter"] = counter
            events.append(data)
    return events


@dataclass(frozen=True, slots=True)
class RunResult:
    """How the run ended, from ``result.json`` or, failing that, runner's own status/rc files."""

    status: str  # successful | failed | timeout | canceled | error
    rc: int | None
    error: str = ""


def read_result(run_dir: Path) -> RunResult | None:
    """The finished run's result, or None while it has not finished (or never wrote one)."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        data = json.loads((run_dir / RESULT_FILE).read_text())
        return RunResult(str(data["status"]), data.get("rc"), str(data.get("error") or ""))
    artifacts = run_dir / "artifacts" / IDENT
    with contextlib.suppress(OSError, ValueError):
        status = (artifacts / "status").read_text().strip()
        rc_text = (artifacts / "rc").read_text().strip()
        if status:
            return RunResult(status, int(rc_text) if rc_text.lstrip("-").isdigit() else None)
    return None


def stdout_tail(run_dir: Path, limit: int = 8192) -> str:
    """The end of the run's stdout (ansible's own words for errors that are not events)."""
    path = run_dir / "artifacts" / IDENT / "stdout"
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def worker_log_tail(run_dir: Path, limit: int = 4096) -> str:
    try:
        data = (run_dir / WORKER_LOG).read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace")


# --------------------------------------------------------------------------- events as Carrier keeps them

#: Fields of a task result worth keeping (the whole ``res`` can be huge).
_RES_FIELDS = ("changed", "failed", "unreachable", "skipped", "rc", "msg", "stdout", "stderr", "cmd",
               "skip_reason", "ping")
EVENT_TEXT_CAP = 8192


def _cap(value: Any, limit: int) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"\n[... carrier: {len(value) - limit} characters cut ...]"
    if isinstance(value, list):
        return [_cap(v, limit) for v in value[:50]]
    return value


def compact_event(raw: Mapping[str, Any], *, text_cap: int = EVENT_TEXT_CAP) -> tuple[str, dict[str, Any]]:
    """A runner event as ``(type, data)`` for the job's event stream: small, stable field names."""
    event = str(raw.get("event") or "verbose")
    ed = raw.get("event_data") or {}
    data: dict[str, Any] = {"counter": raw.get("counter")}
    for key in ("host", "task", "play", "task_action", "playbook"):
        if ed.get(key):
            data[key] = str(ed[key])
    if ed.get("ignore_errors"):
        data["ignore_errors"] = True
    stdout = raw.get("stdout")
    if stdout:
        data["stdout"] = _cap(str(stdout), text_cap)
    res = ed.get("res")
    if isinstance(res, Mapping):
        kept = {k: _cap(res[k], text_cap) for k in _RES_FIELDS if k in res}
        if kept:
            data["res"] = kept
    if event == "playbook_on_stats":
        stats: dict[str, dict[str, int]] = {}
        for field_name in ("ok", "changed", "dark", "failures", "skipped", "ignored", "rescued"):
            for host, count in (ed.get(field_name) or {}).items():
                stats.setdefault(str(host), {})[field_name] = int(count)
        for counts in stats.values():
            for field_name in ("ok", "changed", "dark", "failures", "skipped", "ignored", "rescued"):
                counts.setdefault(field_name, 0)
        data["stats"] = stats
    return f"ansible.{event}", data


def slim_event(type_: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without the bulky fields (when a job's output budget is spent)."""
    slim = {k: v for k, v in data.items() if k not in ("stdout", "res")}
    res = data.get("res")
    if isinstance(res, Mapping):
        small = {k: res[k] for k in ("changed", "failed", "unreachable", "rc") if k in res}
        if "msg" in res:
            small["msg"] = _cap(res["msg"], 512)
        if small:
            slim["res"] = small
    slim["truncated"] = True
    return slim


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True, slots=True)
class Verdict:
    """Final status, a reason code and one readable sentence."""

    status: str  # succeeded | failed | cancelled
    reason: str  # ok, task_failed, unreachable, syntax_error, missing_playbook, timeout, cancelled, error
    message: str
    rc: int | None


def _first_error(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "").splitlines()]
    for index, line in enumerate(lines):
        if line.startswith(("ERROR!", "[ERROR]")):
            rest = [line]
            for follow in lines[index + 1 : index + 4]:
                if not follow or follow.startswith(("The error appears", "Origin:", "^")):
                    break
                rest.append(follow)
            return " ".join(rest)
    return next((line for line in reversed(lines) if line), "")


#: Mitogen's connection reads ssh's output itself and words its failures its own way; a job's
#: message says them the way a person (and Ansible's own ssh connection) would.
_MITOGEN_HOST_KEY = (
    "Host key checking is enabled, and SSH reported an unrecognized or mismatching host key",
    "SSH requested permission to accept unknown host key",
)
_HOST_KEY_TEXT = ("Host key verification failed (the host's key is unknown or changed; host key checking "
                  "is on)")
_MITOGEN_AUTH = "SSH authentication is incorrect"
_AUTH_TEXT = "Permission denied: the host refused ssh's key or user (ssh authentication failed)"
#: Mitogen's "the ssh process ended": its last line says why (connection refused, no route...).
_MITOGEN_EOF = "EOF on stream; last 100 lines received:"


def _clean_msg(value: Any) -> str:
    """A task's or host's message on one line of at most 300 characters, Mitogen's in plain words."""
    raw = str(value or "")
    if any(marker in raw for marker in _MITOGEN_HOST_KEY):  # one wording, whatever the strategy
        raw = _HOST_KEY_TEXT
    elif _MITOGEN_AUTH in raw:
        raw = _AUTH_TEXT
    else:
        head, eof, received = raw.partition(_MITOGEN_EOF)
        if eof:
            lines = [line.strip() for line in received.splitlines() if line.strip()]
            raw = f"{head}the ssh connection ended: {lines[-1] if lines else 'ssh printed nothing'}"
    text = " ".join(raw.split())
    return text if len(text) <= 300 else text[:297] + "..."


def judge(
    result: RunResult,
    events: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    stdout: str = "",
    what: str = "the run",
    timeout: int | None = None,
    cancelled_by: str | None = None,
) -> Verdict:
    """Turn a finished run into a verdict. ``events`` are compact ``(type, data)`` pairs.

    Pure: the same inputs always give the same sentence, so every failure mode is unit-tested.
    """
    if result.status == "canceled":
        who = f" by {cancelled_by}" if cancelled_by else ""
        return Verdict("cancelled", "cancelled", f"cancelled{who}: {what} was stopped", result.rc)
    if result.status == "timeout":
        limit = f" after {timeout} s" if timeout else ""
        return Verdict("failed", "timeout", f"timed out{limit}: {what} was stopped", result.rc)
    stats: dict[str, dict[str, int]] = {}
    failures: list[tuple[str, str, str]] = []  # host, task, message
    unreachable: dict[str, str] = {}
    for type_, data in events:
        res = data.get("res") if isinstance(data.get("res"), Mapping) else {}
        assert isinstance(res, Mapping)
        if type_ == "ansible.playbook_on_stats":
            stats = dict(data.get("stats") or {})
        elif type_ == "ansible.runner_on_failed" and not data.get("ignore_errors"):
            host, task = str(data.get("host", "?")), str(data.get("task", "?"))
            failures.append((host, task, _clean_msg(res.get("msg"))))
        elif type_ == "ansible.runner_on_unreachable":
            unreachable[str(data.get("host", "?"))] = _clean_msg(res.get("msg"))
    if result.status == "successful" and result.rc == 0:
        parts = [f"{h} ok={c['ok']} changed={c['changed']}" for h, c in sorted(stats.items())]
        recap = "; ".join(parts) if parts else "no host matched"
        return Verdict("succeeded", "ok", f"succeeded: {recap}", 0)
    dark = sorted(h for h, c in stats.items() if c.get("dark"))
    failed_hosts = sorted(h for h, c in stats.items() if c.get("failures"))
    for host in dark:
        unreachable.setdefault(host, "")
    if failures or failed_hosts:
        host, task, msg = failures[0] if failures else (failed_hosts[0], "?", "")
        text = f"task failed: {task!r} on {host}" + (f": {msg}" if msg else "")
        others = sorted({h for h, _, _ in failures} | set(failed_hosts))
        if len(others) > 1:
            text += f" (failed hosts: {', '.join(others)})"
        if unreachable:
            text += f"; unreachable: {', '.join(sorted(unreachable))}"
        return Verdict("failed", "task_failed", text, result.rc)
    if unreachable:
        details = "; ".join(f"{h} ({m})" if m else h for h, m in sorted(unreachable.items()))
        return Verdict("failed", "unreachable", f"unreachable: {details}", result.rc)
    error = _first_error(stdout) or result.error
    lowered = error.lower()
    if "could not be found" in lowered and "playbook" in lowered:
        return Verdict("failed", "missing_playbook", f"missing playbook: {error}", result.rc)
    if result.rc == 4 or "syntax" in lowered or "yaml" in lowered or "parsing" in lowered:
        return Verdict("failed", "syntax_error", f"syntax error in {what}: {error}", result.rc)
    detail = f": {error}" if error else ""
    return Verdict("failed", "error", f"{what} failed (rc {result.rc}){detail}", result.rc)


def write_result(run_dir: Path, status: str, rc: int | None, error: str = "") -> None:
    """Atomically write ``result.json`` (the worker's last act)."""
    tmp = run_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps({"status": status, "rc": rc, "error": error}))
    os.replace(tmp, run_dir / RESULT_FILE)


def check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    out = []
    for tag in tags:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", tag):
            raise EngineError(f"invalid tag {tag[:40]!r}: tags are letters, digits, _ . -")
        out.append(tag)
    return tuple(out)
