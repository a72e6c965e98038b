"""The pipe-output pieces that need no host: the reader's header, the saved offset and where a
re-attach resumes, job ids checked before any path or command is built, the setting in carrier.yml,
and the host-side scripts run for real with /bin/sh in a scratch HOME (file modes, the hole punch,
the refusal of a directory that is not the user's)."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from carrier.config import check_config, load_config
from carrier.jobs import ptypipe
from carrier.jobs.pty import PtyError, PtyRunner

CONFIG = """\
inventory: inventory
accounts:
  - name: carrier
    address: carrier@example.test
    password_file: carrier.pass
    imap: {host: imap.example.test}
    smtp: {host: smtp.example.test}
"""


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)
    return path


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("line", "ok", "punch", "detail"), [
    (b"carrier-pipe ok 1", True, True, ""),
    (b"carrier-pipe ok 0\r", True, False, ""),
    (b"carrier-pipe error /h/.carrier-pty is not a directory of this user", False, False,
     "/h/.carrier-pty is not a directory of this user"),
    (b"carrier-pipe ok", False, False, "unexpected reply 'carrier-pipe ok'"),
    (b"carrier-pipe ok yes", False, False, "unexpected reply 'carrier-pipe ok yes'"),
    (b"Welcome to host", False, False, "unexpected reply 'Welcome to host'"),
])
def test_reader_header(line: bytes, ok: bool, punch: bool, detail: str) -> None:
    assert ptypipe.parse_header(line) == ptypipe.Header(ok, punch, detail)


def test_offset_record_roundtrip_and_garbage() -> None:
    record = ptypipe.format_offset(ptypipe.PipeOffset(123456789, 120))
    assert len(record) == 48 and record.endswith(b"\n")
    assert ptypipe.parse_offset(record) == ptypipe.PipeOffset(123456789, 120)
    for bad in (b"", b"12", b"1 2 3", b"-1 2", b"a b", b"\x00" * 48):
        assert ptypipe.parse_offset(bad) is None


def test_resume_at_adds_what_reached_the_log_after_the_save() -> None:
    assert ptypipe.resume_at(None, 0) == 0
    saved = ptypipe.PipeOffset(host=1000, log=990)  # 10 bytes fewer in the log (a masked secret)
    assert ptypipe.resume_at(saved, 990) == 1000
    assert ptypipe.resume_at(saved, 1090) == 1100  # a crash between the log write and the save
    assert ptypipe.resume_at(saved, 900) == 1000  # never before the saved byte


def test_offset_file_is_rewritten_in_place(tmp_path: Path) -> None:
    offsets = ptypipe.OffsetFile(tmp_path)
    assert offsets.load() is None
    offsets.save(ptypipe.PipeOffset(10**12, 5))
    offsets.save(ptypipe.PipeOffset(7, 6))  # shorter: the padding keeps the record whole
    offsets.close()
    assert offsets.load() == ptypipe.PipeOffset(7, 6)
    assert (tmp_path / ptypipe.OFFSET_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("bad", ["../../etc/passwd", "j-aaaaaaaaaaaa/../x", "j-$(id)aaaaaa", "",
                                 "J-AAAAAAAAAAAA", "j-aaaaaaaaaaaa\n"])
def test_bad_job_ids_never_reach_a_path_or_command(bad: str) -> None:
    for build in (ptypipe.pipe_command, ptypipe.cleanup_script, lambda j: ptypipe.reader_command(j, 0)):
        with pytest.raises(PtyError, match="invalid job id"):
            build(bad)


@pytest.mark.parametrize("offset", [-1, True, 1.5, "3"])
def test_bad_offsets_are_refused(offset: object) -> None:
    with pytest.raises(PtyError, match="pipe offset"):
        ptypipe.reader_command("j-aaaaaaaaaaaa", offset)  # type: ignore[arg-type]


def test_output_setting_values() -> None:
    assert ptypipe.check_output("pipe") == "pipe" and ptypipe.check_output("control") == "control"
    with pytest.raises(PtyError, match="tmux_output must be one of pipe, control"):
        ptypipe.check_output("fifo")
    with pytest.raises(PtyError, match="tmux_output must be one of pipe, control"):
        PtyRunner(None, tmux_output="raw")


# --------------------------------------------------------------------------- carrier.yml


def test_the_setting_is_read_from_carrier_yml(tmp_path: Path) -> None:
    write(tmp_path / "inventory" / "hosts.yml", "all: {hosts: {web1: {}}}\n", 0o644)
    write(tmp_path / "carrier.pass", "s3cret-mail\n")
    config = load_config(write(tmp_path / "carrier.yml", CONFIG + "pty: {tmux_output: control}\n"), {})
    assert config.pty.tmux_output == "control"
    assert load_config(write(tmp_path / "carrier.yml", CONFIG), {}).pty.tmux_output == ptypipe.DEFAULT_OUTPUT
    problems = check_config(write(tmp_path / "carrier.yml", CONFIG + "pty: {tmux_output: fifo}\n"), {})
    assert len(problems) == 1 and problems[0].startswith(
        "pty.tmux_output (line 8): 'fifo' is not one of: pipe, control"), problems


# --------------------------------------------------------------------------- the host-side scripts


def _reader(home: Path, job: str, offset: int = 0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["/bin/sh", "-c", ptypipe.reader_command(job, offset)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env={**os.environ, "HOME": str(home)})


def _writer(home: Path, job: str, data: bytes) -> None:
    """What tmux's pipe-pane does: run the pipe command with the pane's bytes on its stdin."""
    subprocess.run(["/bin/sh", "-c", ptypipe.pipe_command(job)], input=data, check=True,
                   env={**os.environ, "HOME": str(home)})


def test_reader_streams_from_an_offset_and_ends_with_its_writer(tmp_path: Path) -> None:
    job = "j-aaaaaaaaaaaa"
    reader = _reader(tmp_path, job)
    assert reader.stdout is not None and reader.stdin is not None
    assert ptypipe.parse_header(reader.stdout.readline()).ok
    folder = tmp_path / ".carrier-pty"
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / f"{job}.out").stat().st_mode & 0o777 == 0o600
    assert not (folder / f"{job}.probe").exists()
    reader.stdin.write(b"go\n")
    reader.stdin.flush()
    _writer(tmp_path, job, b"hello\x01\x1b[0m world\n")  # the writer has ended: so does tail
    assert reader.stdout.read() == b"hello\x01\x1b[0m world\n"  # to the end of the stream
    reader.communicate(timeout=20)
    # A later reader (a re-attach) starts at the byte asked for.
    again = _reader(tmp_path, job, 6)
    assert again.stdout is not None and again.stdin is not None
    assert ptypipe.parse_header(again.stdout.readline()).ok
    again.stdin.write(b"go\n")
    again.stdin.flush()
    assert again.stdout.read() == b"\x1b[0m world\n"
    again.communicate(timeout=20)
    subprocess.run(["/bin/sh", "-c", ptypipe.cleanup_script(job)], check=True, env={"HOME": str(tmp_path)})
    assert not any(folder.iterdir())


def test_reader_punches_out_what_was_read(tmp_path: Path) -> None:
    job = "j-bbbbbbbbbbbb"
    reader = _reader(tmp_path, job)
    assert reader.stdout is not None and reader.stdin is not None
    header = ptypipe.parse_header(reader.stdout.readline())
    if not header.punch:
        pytest.fail("this test needs a file system that punches holes (ext4, xfs, tmpfs)")
    data = os.urandom(1 << 20) * 8
    writer = subprocess.Popen(["/bin/sh", "-c", ptypipe.pipe_command(job)], stdin=subprocess.PIPE,
                              env={**os.environ, "HOME": str(tmp_path)})
    assert writer.stdin is not None
    writer.stdin.write(data)
    writer.stdin.flush()
    reader.stdin.write(b"go\n")
    reader.stdin.flush()
    got = b""
    while len(got) < len(data):
        got += os.read(reader.stdout.fileno(), 1 << 20)
    reader.stdin.write(f"punch {6 << 20}\n".encode())
    reader.stdin.flush()
    path = tmp_path / ".carrier-pty" / f"{job}.out"
    deadline = time.monotonic() + 20
    while path.stat().st_blocks * 512 > 3 << 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.stat().st_size == len(data) and path.stat().st_blocks * 512 <= 3 << 20
    assert got == data
    writer.stdin.close()
    writer.wait(10)
    reader.communicate(timeout=20)
    with path.open("rb") as fh:  # the unread part is untouched, the punched part reads as zeros
        fh.seek(6 << 20)
        assert fh.read() == data[6 << 20:]


def test_reader_refuses_a_directory_that_is_a_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (home / ".carrier-pty").symlink_to(elsewhere)
    reader = _reader(home, "j-cccccccccccc")
    out, _ = reader.communicate(timeout=20)
    header = ptypipe.parse_header(out.splitlines()[0])
    assert not header.ok and "is not a directory of this user" in header.detail
    assert reader.returncode == 4 and not any(elsewhere.iterdir())


def test_reader_after_a_lost_file_says_so(tmp_path: Path) -> None:
    reader = _reader(tmp_path, "j-dddddddddddd", 100)
    out, _ = reader.communicate(timeout=20)
    header = ptypipe.parse_header(out.splitlines()[0])
    assert not header.ok and header.detail.endswith("j-dddddddddddd.out is gone")
