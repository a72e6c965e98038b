"""tmux-backed PTY jobs whose output comes raw from ``tmux pipe-pane`` (``pty.tmux_output: pipe``),
driven through a real MCP client session: large output arrives complete and in order (checksum,
in both output modes), from the very first byte; a Carrier restart in the middle of the output
resumes at the exact byte; the host's file is 0600 in a 0700 directory, its read part is punched
out (the disk does not fill), and it is removed when the job ends; a bad job id is refused."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client.client import Client
from mcp_http_support import data_of, error_of, load, write_door_config

from carrier.config import Config
from carrier.jobs.pty import load_state
from carrier.mcp.server import build_server
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

SEQ = 200_000


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="cpipe-", dir="/var/tmp"))
    directory.chmod(0o700)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _config(sandbox: Sandbox, workdir: Path, output: str) -> Config:
    return load(write_door_config(sandbox, workdir, port_shift=41, mcp={"stdio_role": "admin"},
                                  extra={"pty": {"tmux_output": output}}))


def _remote(sandbox: Sandbox, host: str, command: str) -> str:
    import subprocess

    done = subprocess.run(["ssh", "-F", str(sandbox.layout.ssh_config), host, command], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL, check=True)
    return done.stdout


def _host_files(sandbox: Sandbox, job: str) -> str:
    return _remote(sandbox, "web1", f'cd "$HOME/.carrier-pty" 2>/dev/null && ls -a | grep -F {job} || true')


async def _call(client: Client, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    return data_of(await client.call_tool(tool, args))


async def _all_output(client: Client, job: str) -> bytes:
    """Every byte of the job's output, page by page with the cursors (none may be dropped)."""
    out = bytearray()
    cursor = 0
    while True:
        page = await _call(client, "job_output", {"job_id": job, "since": cursor, "max_bytes": 1 << 20})
        assert page["dropped"] == 0 and page["cursor"] == cursor, page
        out += page["text"].encode()
        cursor = page["next_cursor"]
        if not page["more"]:
            return bytes(out)


def _first_difference(data: bytes, expected: bytes) -> str:
    at = next((i for i, (a, b) in enumerate(zip(data, expected, strict=False)) if a != b),
              min(len(data), len(expected)))
    near = data[max(0, at - 40):at + 80]
    return f"{len(data)} vs {len(expected)} bytes, first difference at {at}: {near!r}"


def _expected(first: str, numbers: range, prefix: str = "") -> bytes:
    lines = [first] + [f"{prefix}{n}" for n in numbers]
    return ("\r\n".join(lines) + "\r\n").encode()


@pytest.mark.parametrize("output", ["pipe", "control"])
def test_large_output_arrives_complete_and_in_order(sandbox: Sandbox, workdir: Path, output: str) -> None:
    config = _config(sandbox, workdir, output)
    server, context = build_server(config, modules=("carrier.mcp.tools_ops",))
    found: dict[str, Any] = {}

    async def session() -> None:
        async with Client(server) as client:
            # The first bytes come the moment the program starts: none may be missed.
            command = f"printf 'at-start\\n'; seq 1 {SEQ}"
            job = (await _call(client, "job_start", {"host": "web1", "command": command}))["job_id"]
            found["job"] = job
            done = await _call(client, "job_wait", {"job_id": job, "timeout": 120})
            assert done["done"] and done["job"]["status"] == "succeeded", done
            found["data"] = await _all_output(client, job)

    try:
        anyio.run(session)
    finally:
        context.close()
    job, data = found["job"], found["data"]
    expected = _expected("at-start", range(1, SEQ + 1))
    assert len(data) == len(expected) and hashlib.sha256(data).digest() == hashlib.sha256(expected).digest()
    state = load_state(config.state_dir / "jobs" / job)
    assert (state["mode"], state["output"]) == ("tmux", output)
    # The host's file is gone with the job.
    assert _host_files(sandbox, job) == ""


def test_restart_in_the_middle_resumes_without_loss_or_repeat(sandbox: Sandbox, workdir: Path) -> None:
    """Carrier stops while the program prints, and starts again: the output read after the restart
    goes on at the byte where the first Carrier stopped, with what was printed meanwhile."""
    config = _config(sandbox, workdir, "pipe")
    # Lines slowly (while nobody reads), then a burst after the restart, then the end on input.
    command = ("i=0; while [ $i -lt 150 ]; do i=$((i+1)); echo n$i; sleep 0.02; done; "
               "read -r go; seq -f b%g 1 50000; read -r x; echo end:$x")
    found: dict[str, Any] = {}

    async def first() -> None:
        async with Client(server) as client:
            job = (await _call(client, "job_start", {"host": "web1", "command": command}))["job_id"]
            found["job"] = job
            seen = await _call(client, "job_wait", {"job_id": job, "pattern": r"n20\b", "timeout": 60})
            assert seen["wait"]["reason"] == "match", seen
            found["files"] = _remote(sandbox, "web1", f'stat -c "%a %U %n" "$HOME/.carrier-pty" '
                                                      f'"$HOME/.carrier-pty/{job}.out"')

    async def second() -> None:
        async with Client(server) as client:
            job = found["job"]
            seen = await _call(client, "job_wait", {"job_id": job, "pattern": r"n150\b", "timeout": 60})
            assert seen["wait"]["reason"] == "match", seen
            await _call(client, "job_input", {"job_id": job, "text": "go", "keys": ["Enter"]})
            seen = await _call(client, "job_wait", {"job_id": job, "pattern": r"b50000\b", "timeout": 60})
            assert seen["wait"]["reason"] == "match", seen
            await _call(client, "job_input", {"job_id": job, "text": "x", "keys": ["Enter"]})
            done = await _call(client, "job_wait", {"job_id": job, "timeout": 60})
            assert done["done"] and done["job"]["status"] == "succeeded", done
            found["data"] = await _all_output(client, job)

    server, context = build_server(config, modules=("carrier.mcp.tools_ops",))
    try:
        anyio.run(first)
    finally:
        context.close()  # Carrier stops; the program goes on printing in tmux
    server, context = build_server(config, modules=("carrier.mcp.tools_ops",))
    try:
        anyio.run(second)
    finally:
        context.close()
    job, data = found["job"], found["data"]
    dir_line, file_line = found["files"].splitlines()
    assert dir_line.startswith("700 ") and file_line.startswith("600 "), found["files"]
    # The typed lines echo; every printed line is there once, in order.
    expected = (_expected("n1", range(2, 151), "n") + b"go\r\n" + _expected("b1", range(2, 50001), "b")
                + b"x\r\nend:x\r\n")
    same = hashlib.sha256(data).digest() == hashlib.sha256(expected).digest()
    assert same, _first_difference(data, expected)
    assert _host_files(sandbox, job) == ""


def test_a_lost_reader_channel_is_replaced_without_loss(sandbox: Sandbox, workdir: Path) -> None:
    """The host's tail is killed while the program prints: a new reader goes on from the next byte."""
    config = _config(sandbox, workdir, "pipe")
    server, context = build_server(config, modules=("carrier.mcp.tools_ops",))
    command = ("i=0; while [ $i -lt 200 ]; do i=$((i+1)); echo n$i; sleep 0.02; done; "
               "read -r x; echo end:$x")
    found: dict[str, Any] = {}

    async def session() -> None:
        async with Client(server) as client:
            job = (await _call(client, "job_start", {"host": "web1", "command": command}))["job_id"]
            seen = await _call(client, "job_wait", {"job_id": job, "pattern": r"n30\b", "timeout": 60})
            assert seen["wait"]["reason"] == "match", seen
            killed = _remote(sandbox, "web1", f"pkill -f 'tail -c .*{job}[.]out' && echo killed")
            assert killed.strip() == "killed"
            seen = await _call(client, "job_wait", {"job_id": job, "pattern": r"n200\b", "timeout": 60})
            assert seen["wait"]["reason"] == "match", seen
            await _call(client, "job_input", {"job_id": job, "text": "x", "keys": ["Enter"]})
            done = await _call(client, "job_wait", {"job_id": job, "timeout": 60})
            assert done["done"] and done["job"]["status"] == "succeeded", done
            found["data"] = await _all_output(client, job)

    try:
        anyio.run(session)
    finally:
        context.close()
    expected = _expected("n1", range(2, 201), "n") + b"x\r\nend:x\r\n"
    same = hashlib.sha256(found["data"]).digest() == hashlib.sha256(expected).digest()
    assert same, _first_difference(found["data"], expected)


def test_read_output_is_punched_out_of_the_host_file(sandbox: Sandbox, workdir: Path) -> None:
    """80 MB through a job: the host's file keeps its size (offsets stay valid) but not its blocks."""
    config = _config(sandbox, workdir, "pipe")
    server, context = build_server(config, modules=("carrier.mcp.tools_ops",))
    found: dict[str, str] = {}

    async def session() -> None:
        async with Client(server) as client:
            job = (await _call(client, "job_start", {
                "host": "web1",
                "command": "yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ | "
                           "head -c 80M; echo; echo printed; read -r x"}))["job_id"]
            for _ in range(30):  # until the output itself (not only the screen) has the last line
                seen = await _call(client, "job_wait", {"job_id": job, "pattern": "^printed", "timeout": 300})
                assert seen["wait"]["reason"] == "match", seen
                if seen["wait"]["where"] == "output":
                    break
                await anyio.sleep(1)
            found["stat"] = _remote(sandbox, "web1", f'stat -c "%s %b %B" "$HOME/.carrier-pty/{job}.out"')
            await _call(client, "job_input", {"job_id": job, "text": "x", "keys": ["Enter"]})
            done = await _call(client, "job_wait", {"job_id": job, "timeout": 120})
            assert done["done"], done
            found["job"] = job

    try:
        anyio.run(session)
    finally:
        context.close()
    size, blocks, block = (int(n) for n in found["stat"].split())
    assert size > 80 << 20  # the pty's CRLFs make it a bit more than 80 MiB
    assert blocks * block < 40 << 20, found["stat"]  # at most the unpunched tail (32 MiB steps)
    assert _host_files(sandbox, found["job"]) == ""


def test_bad_job_ids_are_refused_before_any_path(sandbox: Sandbox, workdir: Path) -> None:
    config = _config(sandbox, workdir, "pipe")
    server, context = build_server(config, modules=("carrier.mcp.tools_ops",))

    async def session() -> None:
        async with Client(server) as client:
            for bad in ("../../etc/passwd", "j-aaaaaaaaaaaa/../x", "j-$(id)aaaaaa", ""):
                calls = (("job_output", {"job_id": bad}), ("job_input", {"job_id": bad, "text": "x"}),
                         ("job_screen", {"job_id": bad}))
                for tool, args in calls:
                    text = error_of(await client.call_tool(tool, args))
                    assert "invalid job id" in text, (tool, bad, text)

    try:
        anyio.run(session)
    finally:
        context.close()
    jobs = config.state_dir / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir())  # nothing was made for them
