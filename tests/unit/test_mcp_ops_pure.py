"""The operations layer's pure parts: byte caps that say when they cut, the local identity."""

from __future__ import annotations

from pathlib import Path

from carrier.config import Config, McpSettings, Role
from carrier.ops.identity import local_identity
from carrier.ops.pages import _clip_event
from carrier.ops.pages import clip_text as _clip_text


def test_clip_text_counts_bytes_and_keeps_utf8_whole() -> None:
    assert _clip_text("short", 10) == ("short", False)
    text, cut = _clip_text("é" * 10, 5)  # 2 bytes each: 2 whole characters fit in 5 bytes
    assert (text, cut) == ("éé", True)


def test_clip_event_flags_what_it_cut() -> None:
    data, cut = _clip_event({"host": "web1", "stdout": "x" * 1000, "res": {"big": "y" * 1000}, "rc": 0}, 100)
    assert cut and data["host"] == "web1" and data["rc"] == 0
    assert data["stdout"] == "x" * 100
    assert "too large" in data["res"]
    same, cut = _clip_event({"stdout": "ok"}, 100)
    assert same == {"stdout": "ok"} and not cut


def test_local_identity(tmp_path: Path) -> None:
    config = Config(path=tmp_path / "c.yml", state_dir=tmp_path, inventory=tmp_path, gnupg_home=tmp_path,
                    accounts=())
    me = local_identity(config)
    assert me.name.startswith("local:") and me.role == "operator" and me.door == "mcp" and me.local
    assert local_identity(config, door="cli").door == "cli"  # the CLI is the same local user
    only = Config(path=tmp_path / "c.yml", state_dir=tmp_path, inventory=tmp_path, gnupg_home=tmp_path,
                  accounts=(), roles={"ops": Role(exec=True)})
    assert local_identity(only).role == "ops"
    chosen = Config(path=tmp_path / "c.yml", state_dir=tmp_path, inventory=tmp_path, gnupg_home=tmp_path,
                    accounts=(), mcp=McpSettings(stdio_role="viewer"))
    assert local_identity(chosen).role == "viewer"  # the config decides the stdio door's role
