"""Password sudo for the sandbox login user: what become passwords and sudo prompts are tested on.

``LOGIN_USER`` gets a random password, kept machine-wide in ``MACHINE_PASSWORD`` (root only, made
once: concurrent sandboxes on one machine share the system user, so they share its password) and
copied into the sandbox's ``secrets/sudo.pass``. sudo asks for it every time (no timestamp).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

from carrier.errors import SandboxError
from carrier.sandbox import procs
from carrier.sandbox.layout import LOGIN_USER, Layout

MACHINE_PASSWORD = Path("/etc/carrier-sandbox/sudo.pass")
SUDOERS = Path(f"/etc/sudoers.d/{LOGIN_USER}")
SUDOERS_TEXT = (
    "# Written by `carrier sandbox up`: password sudo for the sandbox login user.\n"
    f"Defaults:{LOGIN_USER} !lecture, timestamp_timeout=0, passwd_tries=1\n"
    f"{LOGIN_USER} ALL=(ALL:ALL) ALL\n"
)


def machine_password() -> str:
    """The sudo password of ``LOGIN_USER`` on this machine (made on first use)."""
    MACHINE_PASSWORD.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        fd = os.open(MACHINE_PASSWORD, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(18) + "\n")
    value = MACHINE_PASSWORD.read_text().strip()
    if not value:
        raise SandboxError(f"{MACHINE_PASSWORD} is empty: remove it and run `carrier sandbox up` again")
    return value


def ensure_sudo_password(layout: Layout) -> Path:
    """Give ``LOGIN_USER`` its password and the sudoers rule; the sandbox's copy of the password."""
    password = machine_password()
    chpasswd = procs.find_binary("chpasswd")
    done = subprocess.run([chpasswd], input=f"{LOGIN_USER}:{password}\n", capture_output=True, text=True,
                          timeout=60, check=False)
    if done.returncode != 0:
        raise SandboxError(f"setting the {LOGIN_USER} password failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-200:]}")
    if not SUDOERS.exists() or SUDOERS.read_text() != SUDOERS_TEXT:
        procs.find_binary("sudo")
        tmp = SUDOERS.with_name(f".{SUDOERS.name}.tmp")  # sudo skips names with a dot
        tmp.write_text(SUDOERS_TEXT)
        tmp.chmod(0o440)
        procs.run_checked([procs.find_binary("visudo"), "-cf", str(tmp)], what="checking the sudoers rule")
        os.replace(tmp, SUDOERS)
    layout.secrets_dir.mkdir(mode=0o700, exist_ok=True)
    copy = layout.password_file("sudo")
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    os.chmod(copy, 0o600)
    return copy
