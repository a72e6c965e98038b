"""PTY jobs (issues 4 and 16): throughput vs raw ``ssh -tt`` over the same ControlMaster (plain
jobs, and tmux jobs with both ``pty.tmux_output`` ways: ``pipe`` and ``control``), keystroke round
trip, Carrier's memory (and the host's disk) while a job prints 1 GB, and 30 concurrent jobs over
the 3 sandbox hosts.

Every baseline runs interleaved with what it is compared to, in this process, against a sandbox of
its own (port offset 5500) that is destroyed at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from carrier.ansible.inventory import Inventory
from carrier.ansible.ssh import SshControl
from carrier.jobs.pty import PtyJob, PtyRunner, PtySpec
from carrier.jobs.ptyoutputs import DEFAULT_OUTPUT
from carrier.jobs.ptypipe import MAX_PIPES_PER_HOST as MAX_PIPES
from carrier.jobs.ptytmux import TmuxPtyJob
from carrier.sandbox.manager import Sandbox
from carrier.store import new_job_id

PORT_OFFSET = 5500
SOCKET = "carrier-bench"
SEQ = 3_000_000
ROUNDS = 3
KEYS = 200
BIG_MB = int(os.environ.get("CARRIER_BENCH_PTY_MB", "1024"))
TARGET = 0.8


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _tmux_pid(job: PtyJob) -> int:
    """The tmux server's pid (the sandbox hosts are this machine, so /proc shows it)."""
    if not isinstance(job, TmuxPtyJob):
        return 0
    lines = job.server.command("display-message -p '#{pid}'")
    return int(lines[-1]) if lines and lines[-1].isdigit() else 0


def _cpu_seconds(pid: int) -> float:
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Bench:
    def __init__(self, box: Sandbox, state: Path) -> None:
        self.box = box
        self.ssh = SshControl(state / "state")
        self.inventory = Inventory(box.layout.inventory_dir)
        #: One runner per ``pty.tmux_output`` (both talk to the same tmux server on each host).
        self.runners = {output: PtyRunner(self.ssh, tmux_socket=SOCKET, memory_bytes=256 * 1024,
                                          disk_bytes=8 << 20, tmux_output=output)
                        for output in ("pipe", "control")}
        self.jobs_dir = state / "jobs"
        #: Per output: (CPU seconds of the host's tmux server, wall seconds) for each throughput run.
        self.tmux_cpu: dict[str, list[tuple[float, float]]] = {"pipe": [], "control": []}
        self.home = self._remote_home()

    def _remote_home(self) -> Path:
        done = subprocess.run(["ssh", "-F", str(self.box.layout.ssh_config), "web1", "echo $HOME"],
                              capture_output=True, text=True, timeout=30, check=True,
                              stdin=subprocess.DEVNULL)
        return Path(done.stdout.strip())

    def job(self, host: str, command: str, *, mode: str, cols: int = 120, rows: int = 40,
            output: str = DEFAULT_OUTPUT, exact: bool = True) -> PtyJob:
        job_id = new_job_id()
        spec = PtySpec(job_id, host, command, shell=True, mode=mode, cols=cols, rows=rows)  # noqa: S604
        job = self.runners[output].start(spec, self.inventory.conn(host), self.jobs_dir / job_id)
        if isinstance(job, TmuxPtyJob) and exact:
            assert job.output_mode == output, (job.output_mode, output)
        return job

    def raw_argv(self, host: str, command: str) -> list[str]:
        conn = self.inventory.conn(host)
        self.ssh.ensure_master(conn)
        return ["setsid", "-c", *self.ssh.argv(conn, command, flags=("-tt", "-q", "-e", "none"))]

    # ----------------------------------------------------------------- throughput

    def raw_seq(self) -> tuple[float, int]:
        master, slave = os.openpty()
        started = time.perf_counter()
        proc = subprocess.Popen(self.raw_argv("web1", f"seq 1 {SEQ}"), stdin=slave, stdout=slave,
                                stderr=slave, env={**os.environ, "TERM": "xterm-256color"})
        os.close(slave)
        total = 0
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            total += len(data)
        proc.wait()
        os.close(master)
        return time.perf_counter() - started, total

    def job_seq(self, mode: str, output: str = DEFAULT_OUTPUT) -> tuple[float, int]:
        started = time.perf_counter()
        job = self.job("web1", f"seq 1 {SEQ}", mode=mode, output=output)
        server = _tmux_pid(job)
        cpu = _cpu_seconds(server)
        info = job.wait_exit(600)
        took = time.perf_counter() - started
        assert info is not None and info.succeeded, info
        if server:
            self.tmux_cpu[output].append((_cpu_seconds(server) - cpu, took))
        return took, job.log.end

    # ----------------------------------------------------------------- keystrokes

    def job_keys(self, mode: str, output: str = DEFAULT_OUTPUT) -> list[float]:
        job = self.job("web2", "exec cat", mode=mode, output=output)
        job.wait(idle_ms=200, timeout=10)
        times = []
        for i in range(KEYS):
            token = f"k{i:04d}"
            started = time.perf_counter()
            cursor = job.input(token)
            found = job.wait(re.escape(token), timeout=10, since=cursor)
            times.append(time.perf_counter() - started)
            assert found.reason == "match", found
            if i % 20 == 19:
                job.input(keys=["ctrl-u"])  # keep cat's line short
        job.input(keys=["ctrl-u", "ctrl-d"])
        job.wait_exit(10)
        return times

    def raw_keys(self) -> list[float]:
        master, slave = os.openpty()
        proc = subprocess.Popen(self.raw_argv("web2", "exec cat"), stdin=slave, stdout=slave, stderr=slave,
                                env={**os.environ, "TERM": "xterm-256color"})
        os.close(slave)
        time.sleep(0.5)
        while select.select([master], [], [], 0.1)[0]:
            os.read(master, 65536)  # whatever the session printed first
        times = []
        for i in range(KEYS):
            token = f"k{i:04d}".encode()
            started = time.perf_counter()
            os.write(master, token)
            seen = b""
            while token not in seen:
                select.select([master], [], [], 5)
                seen += os.read(master, 65536)
            times.append(time.perf_counter() - started)
            if i % 20 == 19:
                os.write(master, b"\x15")
        os.write(master, b"\x04")
        proc.wait(timeout=10)
        os.close(master)
        return times

    # ----------------------------------------------------------------- memory

    def big_output(self, mode: str, megabytes: int,
                   output: str = DEFAULT_OUTPUT) -> tuple[int, float, int, int]:
        """Peak RSS growth (MB), time, bytes, and the peak disk space (MB) of the host's pipe file."""
        baseline = _rss_kb()
        peak = [baseline]
        disk = [0]
        stop = threading.Event()
        pipe_file: list[Path] = []

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_kb())
                if pipe_file:
                    with contextlib.suppress(OSError):
                        disk[0] = max(disk[0], pipe_file[0].stat().st_blocks * 512)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        # 64-byte lines (63 x's and a newline) up to the size asked.
        job = self.job("db1", f"yes xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx | "
                              f"head -c {megabytes}M", mode=mode, output=output)
        pipe_file.append(self.home / ".carrier-pty" / f"{job.job_id}.out")  # the hosts are this machine
        info = job.wait_exit(1800)
        took = time.perf_counter() - started
        assert info is not None and info.succeeded, info
        job.screen()  # the on-demand pyte render is part of what a job costs
        stop.set()
        sampler.join()
        return (peak[0] - baseline) // 1024, took, job.log.end, disk[0] >> 20

    # ----------------------------------------------------------------- concurrency

    def concurrent(self, count: int) -> dict[str, float]:
        hosts = ["web1", "web2", "db1"]
        logins_before = sum(self._logins(h) for h in hosts)
        started = time.perf_counter()
        loop = "while read l; do echo got:$l; done"
        # Beyond the pipe readers a host allows, jobs fall back to control mode.
        jobs = [self.job(hosts[i % 3], loop, mode="tmux", exact=False) for i in range(count)]
        piped = sum(1 for job in jobs if isinstance(job, TmuxPtyJob) and job.output_mode == "pipe")
        start_time = time.perf_counter() - started
        times = []
        usable = 0
        for n, job in enumerate(jobs):
            t0 = time.perf_counter()
            cursor = job.input(f"n{n}", ["enter"])
            if job.wait(f"got:n{n}$", timeout=30, since=cursor).reason == "match":
                usable += 1
            times.append(time.perf_counter() - t0)
        for job in jobs:
            job.input(keys=["ctrl-d"])
        ended = [job.wait_exit(30) for job in jobs]
        lost = sum(1 for e in ended if e is None or not e.succeeded)
        logins_after = sum(self._logins(h) for h in hosts)
        return {"count": count, "start": start_time, "usable": usable, "lost": lost, "piped": piped,
                "p50": statistics.median(times), "p90": _pct(times, 0.9),
                "logins": logins_after - logins_before}

    def _logins(self, host: str) -> int:
        text = self.box.layout.log_file(f"sshd-{host}").read_text(errors="replace")
        return text.count("Accepted publickey")

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()
        subprocess.run(["ssh", "-F", str(self.box.layout.ssh_config), "web1",
                        f"tmux -L {SOCKET} kill-server; rm -f /tmp/tmux-$(id -u)/{SOCKET}"],
                       capture_output=True, timeout=30, check=False, stdin=subprocess.DEVNULL)
        self.ssh.close_all()


def _interleaved(fns: dict[str, Callable[[], tuple[float, int]]]) -> dict[str, tuple[float, int]]:
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            results[name].append(fn())
    return {name: sorted(runs)[len(runs) // 2] for name, runs in results.items()}


_LOGINS_OK = "(one control channel per host plus the pipe readers, all within MaxSessions)."
_LOGINS_UNEXPLAINED = (f"(the control channel and at most {MAX_PIPES} pipe readers per host take "
                       f"{MAX_PIPES + 1} of MaxSessions' 10, so the channel count does not explain them; "
                       "the cause was not found in this run).")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def main() -> str:
    root = Path(tempfile.mkdtemp(prefix="carrier-bench-pty-", dir="/var/tmp"))
    root.chmod(0o755)
    box = Sandbox(root, port_offset=PORT_OFFSET)
    try:
        box.up()
        bench = Bench(box, root)
        try:
            tp = _interleaved({"raw": bench.raw_seq,
                               "tmux pipe": lambda: bench.job_seq("tmux", "pipe"),
                               "tmux control": lambda: bench.job_seq("tmux", "control"),
                               "plain": lambda: bench.job_seq("plain")})
            keys = {"raw": bench.raw_keys(), "plain": bench.job_keys("plain"),
                    "tmux pipe": bench.job_keys("tmux", "pipe"),
                    "tmux control": bench.job_keys("tmux", "control")}
            big = {"plain": bench.big_output("plain", BIG_MB),
                   "tmux pipe": bench.big_output("tmux", BIG_MB, "pipe"),
                   "tmux control": bench.big_output("tmux", BIG_MB, "control")}
            conc = bench.concurrent(30)
            tmux_cpu = {output: sorted(runs)[len(runs) // 2] if runs else (0.0, 0.0)
                        for output, runs in bench.tmux_cpu.items()}
        finally:
            bench.close()
    finally:
        box.destroy()
        shutil.rmtree(root, ignore_errors=True)

    raw_t, raw_n = tp["raw"]
    ratios = {name: raw_t / t for name, (t, _) in tp.items()}
    lines = [
        "### PTY jobs (issues 4 and 16)",
        "",
        f"Output throughput: `seq 1 {SEQ}` on web1 (~{raw_n / 1e6:.0f} MB through the terminal), median of "
        f"{ROUNDS} interleaved rounds of all four; the job's time runs from start to its recorded exit. "
        f"Target ≥ {TARGET}x of raw `ssh -tt` over the same master.",
        "",
        "| what | time | MB/s | vs raw ssh -tt | host tmux CPU |",
        "|---|---|---|---|---|",
        f"| raw `ssh -tt -q -e none` (local pty, read to EOF) | {raw_t:.2f} s | "
        f"{raw_n / raw_t / 1e6:.1f} | 1.00x | |",
    ]
    for name in ("plain", "tmux pipe", "tmux control"):
        t, n = tp[name]
        verdict = "meets" if ratios[name] >= TARGET else "misses"
        cpu = tmux_cpu.get(name.removeprefix("tmux "))
        cpu_text = f"{cpu[0]:.2f} s per {cpu[1]:.2f} s" if cpu else ""
        label = {"plain": "job, plain", "tmux pipe": "job, tmux, `tmux_output: pipe`",
                 "tmux control": "job, tmux, `tmux_output: control`"}[name]
        lines.append(f"| {label} | {t:.2f} s | {n / t / 1e6:.1f} | {ratios[name]:.2f}x "
                     f"({verdict} the target) | {cpu_text} |")
    pipe_ratio, control_ratio = ratios["tmux pipe"], ratios["tmux control"]
    lines += [
        "",
        f"`pipe` (the default, `pty.tmux_output`) reads the program's raw bytes: `tmux pipe-pane -O` appends "
        "them to a 0600 file on the host and one ssh channel per job tails it from a byte offset; tmux "
        "is then only the terminal (emulation for `capture-pane`, input, exit status, survival of a "
        "restart). `control` reads tmux control mode's `%output`, where tmux escapes every byte below 32 "
        f"one printf at a time: {pipe_ratio / control_ratio:.1f}x slower than `pipe` in this run, and the "
        "host's tmux server is its bottleneck (CPU column). What is left between `pipe` and raw "
        "`ssh -tt` is tmux's own terminal emulation of every byte plus the file hop.",
        "",
        f"Keystroke round trip (`job_input` of 5 characters, then `job_wait` for their echo from `cat` on "
        f"web2), {KEYS} keystrokes each:",
        "",
        "| what | p50 | p90 |",
        "|---|---|---|",
        f"| raw ssh -tt (write to the pty, read the echo) | {_ms(statistics.median(keys['raw']))} | "
        f"{_ms(_pct(keys['raw'], 0.9))} |",
    ]
    for name in ("plain", "tmux pipe", "tmux control"):
        lines.append(f"| job, {name} | {_ms(statistics.median(keys[name]))} | {_ms(_pct(keys[name], 0.9))} |")
    lines += [
        "",
        f"Memory: peak RSS growth of this (Carrier) process while one job prints {BIG_MB} MiB "
        "(ring 256 KiB in memory, 8 MiB kept on disk; the screen rendered once at the end). Target ≤ 50 MB. "
        "For `pipe`, also the peak disk space of the job's file on the host (its read part is punched "
        "out every 32 MiB: the file's size grows, its blocks do not).",
        "",
        "| job | output | time | peak RSS growth | host disk (peak) |",
        "|---|---|---|---|---|",
    ]
    for name in ("plain", "tmux pipe", "tmux control"):
        rss, took, size, disk = big[name]
        verdict = "meets" if rss <= 50 else "misses"
        disk_text = f"{disk} MB" if name == "tmux pipe" else ""
        lines.append(f"| {name} | {size / 1e6:.0f} MB | {took:.1f} s | {rss} MB ({verdict}) | {disk_text} |")
    lines += [
        "",
        f"Concurrency: {int(conc['count'])} tmux-backed jobs over web1, web2, db1 (10 each, sshd MaxSessions "
        f"10): started in {conc['start']:.2f} s; {int(conc['piped'])} with pipe output (at most "
        f"{MAX_PIPES} reader channels per host, the rest on control mode); usable (answered input) "
        f"{int(conc['usable'])}/{int(conc['count'])}; lost {int(conc['lost'])}; input-to-echo p50 "
        f"{_ms(conc['p50'])}, p90 {_ms(conc['p90'])}; new ssh logins while they ran: {int(conc['logins'])} "
        + (_LOGINS_OK if not conc["logins"] else _LOGINS_UNEXPLAINED),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main())
