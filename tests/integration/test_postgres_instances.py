"""Several Carrier instances on one PostgreSQL store and one mailbox (issue 14).

Everything is real: two `carrier serve` processes, each with its own state directory, on a real
PostgreSQL cluster (Debian's binaries, started by the sandbox's own component) and the sandbox's
Dovecot account carrier@; signed mails over SMTP; real playbooks on the sandbox sshd hosts; the
audit chain checked by `carrier audit --verify` run as a process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from door_support import Serve, door_config, identities, send_signed, text_of, wait_replies
from mail_support import token
from ruamel.yaml import YAML

from carrier.sandbox.manager import Sandbox
from carrier.store.dialect import PgConnection, connect_pg

HOSTS = ("web1", "web2", "db1")


def pg_rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows read with a connection of the test's own (the statement in the store's SQL dialect)."""
    conn: PgConnection = connect_pg(url, frozenset(), timeout=30)
    try:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


#: A playbook that takes a few seconds on each host: long enough to kill an instance mid-run.
SLOW_PLAYBOOK = """\
- name: Slow
  hosts: all
  gather_facts: false
  tasks:
    - name: Take a while
      ansible.builtin.command: sleep 6
      changed_when: false
"""


@contextlib.contextmanager
def instances(sandbox: Sandbox, pg_cluster: Any, n: int) -> Iterator[tuple[list[Serve], str]]:
    """``n`` `carrier serve` configs (own state dirs) on one fresh PostgreSQL schema and carrier@."""
    url, store = pg_cluster.fresh_store()
    dirs = [Path(tempfile.mkdtemp(prefix=f"cpg{i}-", dir="/var/tmp")) for i in range(n)]
    books = Path(tempfile.mkdtemp(prefix="cpgbooks-", dir="/var/tmp"))
    books.chmod(0o755)
    (books / "slow.yml").write_text(SLOW_PLAYBOOK)
    meta = "description: Sleep a few seconds on each host\ndefault_limit: all\n"
    (books / "slow.meta.yml").write_text(meta)
    base = door_config(sandbox, dirs[0])
    playbook_dirs = [*YAML(typ="safe").load(base.read_text())["playbook_dirs"], str(books)]
    serves = []
    for directory in dirs:
        directory.chmod(0o700)
        serves.append(Serve(door_config(sandbox, directory, store=store, playbook_dirs=playbook_dirs)))
    try:
        yield serves, url
        for serve in serves:
            assert not serve.raw, f"carrier serve wrote non-JSON lines to stderr: {serve.raw[:10]}"
    finally:
        for serve in serves:
            if serve.proc is not None and serve.proc.poll() is None:
                try:
                    serve.stop()
                except subprocess.TimeoutExpired:
                    serve.kill()  # never leave an instance behind (it would hold the next test's ports)
        home = str(sandbox.layout.gnupg_home("carrier"))
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], capture_output=True, check=False,
                       timeout=30)
        for directory in [*dirs, books]:
            shutil.rmtree(directory, ignore_errors=True)


def handled_by(serve: Serve) -> int:
    return sum(1 for line in serve.lines
               if line.get("msg") == "mail handled" and line.get("outcome") not in ("busy", "already"))


def _dump(url: str, serves: list[Serve]) -> None:
    """What the store and both logs say (printed when a multi-instance test fails)."""
    print("JOBS", pg_rows(url, "SELECT j.id, j.status, r.supervisor_pid FROM jobs j "
                               "JOIN job_runs r ON r.job_id = j.id"))
    print("MSGS", pg_rows(url, "SELECT message_id, state, error FROM messages"))
    print("MJOBS", pg_rows(url, "SELECT job_id, state FROM mail_jobs"))
    print("LEASES", pg_rows(url, "SELECT message_id, owner, expires_at FROM mail_leases"))
    print("OUTBOX", pg_rows(url, "SELECT id, state, claimed_by, attempts, last_error FROM outbox"))
    for i, serve in enumerate(serves):
        for line in serve.lines:
            if line.get("level") in ("WARNING", "ERROR") or line.get("logger") == "carrier.mail.gateway":
                print(f"S{i}", line)


def test_two_instances_share_40_mails_each_runs_once_and_is_answered_once(
    sandbox: Sandbox, pg_cluster: Any
) -> None:
    n = 40
    with instances(sandbox, pg_cluster, 2) as (serves, url), identities(sandbox) as people:
        for serve in serves:
            serve.start()
        tag = token("pg2")
        # Each signed text is unique (a signature block, which is no command): one signer, one text
        # and one signature second make the same signature, and a second mail with it is a replay.
        sent = [send_signed(sandbox, people["ops"], f"run ping on {HOSTS[i % 3]}\n-- \n{tag} m{i:02d}",
                            f"{tag} m{i:02d}")[0]
                for i in range(n)]
        try:
            replies = wait_replies(sandbox, "ops", tag, 2 * n, timeout=400, settle=5.0)
        except AssertionError:
            _dump(url, serves)
            raise
        assert len(replies) == 2 * n  # an acceptance and a result per mail, nothing twice
        by_thread: dict[str, list[str]] = {}
        for reply in replies:
            by_thread.setdefault(str(reply["In-Reply-To"]), []).append(text_of(reply))
        assert sorted(by_thread) == sorted(sent)
        for texts in by_thread.values():
            assert sum("accepted, job" in t for t in texts) == 1, texts
            assert sum("succeeded" in t for t in texts) == 1, texts
        jobs = pg_rows(url, "SELECT status FROM jobs WHERE door = 'mail'")
        assert len(jobs) == n and {s for (s,) in jobs} == {"succeeded"}
        assert pg_rows(url, "SELECT state, count(*) FROM messages GROUP BY state") == [("done", n)]
        assert pg_rows(url, "SELECT count(*) FROM mail_leases") == [(0,)]
        # Each mail decided once and started one job, in the audit chain.
        audit = pg_rows(url, "SELECT action, outcome, count(*) FROM audit WHERE door = 'mail' "
                             "GROUP BY action, outcome ORDER BY action")
        assert audit == [("decide:playbook", "allowed", n), ("job:start", "accepted", n)]
        # Both instances did work (one mailbox, one store, no double run).
        assert all(handled_by(serve) > 0 for serve in serves), [handled_by(s) for s in serves]
        assert sum(handled_by(serve) for serve in serves) == n
        for serve in serves:
            assert serve.stop() == 0
        done = _carrier(serves[0].config, "audit", "--verify")
        assert done.returncode == 0 and "audit chain ok" in done.stdout, done.stdout + done.stderr


def test_sigkill_of_one_instance_mid_run_its_jobs_finish_on_the_other(
    sandbox: Sandbox, pg_cluster: Any
) -> None:
    with instances(sandbox, pg_cluster, 2) as (serves, url), identities(sandbox) as people:
        for serve in serves:
            serve.start()
        tag = token("pgkill")
        sent = [send_signed(sandbox, people["ops"], f"run slow on {host}", f"{tag} {host}")[0]
                for host in HOSTS]
        # Wait for a running job and kill the instance that supervises it.
        pids = {serve.proc.pid: serve for serve in serves if serve.proc is not None}
        victim = None
        deadline = time.monotonic() + 120
        conn = connect_pg(url, frozenset(), timeout=30)
        try:
            while victim is None and time.monotonic() < deadline:
                rows = conn.execute("SELECT r.supervisor_pid FROM jobs j JOIN job_runs r "
                                    "ON r.job_id = j.id WHERE j.status = 'running'").fetchall()
                victim = next((pids[r[0]] for r in rows if r[0] in pids), None)
                time.sleep(0.01)
        finally:
            conn.close()
        assert victim is not None, "no job ran"
        victim.kill()
        survivor = next(s for s in serves if s is not victim)
        try:
            replies = wait_replies(sandbox, "ops", tag, 2 * len(HOSTS), timeout=120, settle=5.0)
        except AssertionError:
            print("JOBS", pg_rows(url, "SELECT j.id, j.status, r.supervisor_pid, r.pid FROM jobs j "
                                       "JOIN job_runs r ON r.job_id = j.id"))
            print("MSGS", pg_rows(url, "SELECT message_id, state, job_id FROM messages"))
            print("MJOBS", pg_rows(url, "SELECT job_id, state FROM mail_jobs"))
            print("OUTBOX", pg_rows(url, "SELECT id, state, claimed_by, attempts, last_error FROM outbox"))
            print("VICTIM", victim.proc.pid if victim.proc else None)
            for line in survivor.lines:
                if line.get("level") in ("WARNING", "ERROR") or "job" in str(line.get("msg")):
                    print("SURV", line)
            raise
        assert len(replies) == 2 * len(HOSTS)
        by_thread: dict[str, list[str]] = {}
        for reply in replies:
            by_thread.setdefault(str(reply["In-Reply-To"]), []).append(
                f"{reply['Message-ID']} {text_of(reply)}")
        assert sorted(by_thread) == sorted(sent)
        for texts in by_thread.values():
            assert sum("accepted, job" in t for t in texts) == 1, texts
            assert sum("succeeded" in t for t in texts) == 1, texts
        jobs = pg_rows(url, "SELECT status FROM jobs WHERE door = 'mail'")
        assert sorted(s for (s,) in jobs) == ["succeeded"] * len(HOSTS)
        states = pg_rows(url, "SELECT state, count(*) FROM messages GROUP BY state")
        assert states == [("done", len(HOSTS))]
        assert any(line.get("msg") == "job adopted" for line in survivor.lines)
        assert survivor.stop() == 0


def on_another_machine(fake_boot_id: Path) -> tuple[str, ...]:
    """A prefix that runs a command as if on another machine: in a mount namespace of its own with
    another boot id (what Carrier tells machines apart by, ``carrier.procid``), so the other
    instance cannot judge it by its pid and must go by its leases. ``exec`` keeps the pid."""
    fake_boot_id.write_text(f"another-machine-{token('boot')}\n")
    script = f'mount --bind {fake_boot_id} /proc/sys/kernel/random/boot_id && exec "$@"'
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh")


def test_a_mail_of_an_instance_killed_on_another_machine_is_taken_over_once_its_lease_runs_out(
    sandbox: Sandbox, pg_cluster: Any, tmp_path: Path
) -> None:
    """The victim, on 'another machine', takes a mail and is SIGKILLed while working on it. The
    survivor respects the lease while it lasts (the mail is busy), takes the mail once the lease
    has run out (it is renewed no more), and answers it once."""
    with instances(sandbox, pg_cluster, 2) as (serves, url), identities(sandbox) as people:
        victim, survivor = serves
        victim.prefix = on_another_machine(tmp_path / "boot_id")
        victim.start()
        assert victim.proc is not None
        tag = token("pglease")
        sent, _ = send_signed(sandbox, people["ops"], f"hosts\nplaybooks\n-- \n{tag}", tag)
        owner = None
        deadline = time.monotonic() + 60
        while owner is None and time.monotonic() < deadline:
            rows = pg_rows(url, "SELECT owner FROM mail_leases")
            owner = next((o for (o,) in rows if o.startswith(f"{victim.proc.pid}|")), None)
            time.sleep(0.01)
        assert owner is not None, "the victim took no lease"
        assert "another-machine-" in owner  # its identity is not this machine's
        victim.kill()
        assert pg_rows(url, "SELECT state FROM messages") != [("done",)]  # killed mid-mail
        survivor.start()
        try:
            replies = wait_replies(sandbox, "ops", tag, 1, timeout=180, settle=5.0)
        except AssertionError:
            _dump(url, serves)
            raise
        assert len(replies) == 1 and str(replies[0]["In-Reply-To"]) == sent
        text = text_of(replies[0])
        assert "web1" in text and "slow" in text, text  # both commands answered: hosts, playbooks
        assert pg_rows(url, "SELECT state, count(*) FROM messages GROUP BY state") == [("done", 1)]
        assert pg_rows(url, "SELECT count(*) FROM mail_leases") == [(0,)]
        outcomes = [line.get("outcome") for line in survivor.lines if line.get("msg") == "mail handled"]
        assert outcomes[0] == "busy" and outcomes[-1] == "answered", outcomes  # the lease held first
        assert outcomes.count("answered") == 1
        assert survivor.stop() == 0


def _carrier(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "carrier", *args, "--config", str(config)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300, check=False)


def test_concurrent_audit_writers_keep_one_chain_and_verify(sandbox: Sandbox, pg_cluster: Any) -> None:
    """Four CLI processes issuing tokens at once (each issue decides and writes an audit row) on
    one PostgreSQL store: one chain, no gap, `carrier audit --verify` says ok."""
    with instances(sandbox, pg_cluster, 1) as (serves, url):
        config = serves[0].config
        script = ("for i in $(seq 1 8); do {carrier} token issue w$W-$i@tokens.test --role operator "
                  "--ttl 600 --config {config} >/dev/null || exit 1; done").format(
            carrier=f"{sys.executable} -m carrier", config=config)
        writers = [subprocess.Popen(["sh", "-c", script], env={**os.environ, "W": str(w)},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                   for w in range(4)]
        for proc in writers:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err
        rows = pg_rows(url, "SELECT id, prev_hash, row_hash FROM audit ORDER BY id")
        issued = pg_rows(url, "SELECT count(*) FROM audit WHERE action = 'token:issue'")
        assert issued[0][0] == 32
        # One chain: every row links to the row before it.
        assert all(rows[i][1] == rows[i - 1][2] for i in range(1, len(rows)))
        head = pg_rows(url, "SELECT last_id, row_count FROM audit_head")
        assert head == [(rows[-1][0], len(rows))]
        done = _carrier(config, "audit", "--verify")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"audit chain ok: {len(rows)} rows" in done.stdout


def test_a_password_in_store_url_is_refused_with_what_to_do(sandbox: Sandbox, pg_cluster: Any) -> None:
    with instances(sandbox, pg_cluster, 1) as (serves, _url):
        config = serves[0].config
        text = config.read_text()
        bad = text.replace("postgresql://carrier@", "postgresql://carrier:hunter2@")
        assert bad != text
        config.write_text(bad)
        done = _carrier(config, "audit", "--verify")
        assert done.returncode != 0
        assert "store.url has a password in it" in done.stderr and "password_file" in done.stderr
        assert "hunter2" not in done.stdout + done.stderr


def test_an_unreachable_store_stops_serve_with_a_clear_error(sandbox: Sandbox, pg_cluster: Any) -> None:
    with instances(sandbox, pg_cluster, 1) as (serves, _url):
        config = serves[0].config
        from carrier.ports import port_in_use

        port = next(p for p in range(39100, 39200) if not port_in_use("127.0.0.1", p))
        config.write_text(config.read_text().replace(f":{pg_cluster.component.port}/", f":{port}/"))
        proc = subprocess.run([sys.executable, "-m", "carrier", "serve", "--config", str(config)],
                              capture_output=True, text=True, env=dict(os.environ), timeout=120, check=False)
        assert proc.returncode != 0
        assert "cannot connect to the PostgreSQL store" in proc.stderr
