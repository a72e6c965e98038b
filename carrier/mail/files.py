"""The one directory the mail tools read and write files in (``mail.download_dir``).

Every path from outside is resolved against it and refused when it leads anywhere else: ``..``,
absolute paths elsewhere, and symlinks that point out are all caught by comparing real paths.
Files are created with O_EXCL|O_NOFOLLOW, mode 0600, so nothing existing is overwritten or followed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from carrier.mail.imap import MailInputError

_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]+")
MAX_NAME = 200


def safe_filename(name: str, fallback: str = "attachment.bin") -> str:
    """A file name safe to create: no separators or control characters, not hidden, bounded length."""
    cleaned = _UNSAFE_NAME.sub("_", name).strip().lstrip(".").strip()
    if not cleaned:
        cleaned = fallback
    if len(cleaned) > MAX_NAME:
        stem, dot, ext = cleaned.rpartition(".")
        cleaned = (
            (stem[: MAX_NAME - len(ext) - 1] + dot + ext) if dot and len(ext) < 20 else cleaned[:MAX_NAME]
        )
    return cleaned


def ensure_dir(root: Path) -> Path:
    """The download directory, created mode 0700 when missing; its real path."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Path(os.path.realpath(root))


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_inside(root: Path, requested: str, what: str) -> Path:
    """``requested`` (relative to ``root``, or absolute) as a real path inside ``root``, or MailInputError."""
    if not isinstance(requested, str) or "\x00" in requested:
        raise MailInputError(f"{what} must be a path without NUL characters")
    real_root = ensure_dir(root)
    candidate = Path(requested) if os.path.isabs(requested) else real_root / requested
    # realpath resolves every symlink and '..' that exists; a link pointing out is caught here.
    real = Path(os.path.realpath(candidate))
    if not _inside(real, real_root):
        raise MailInputError(
            f"{what} {requested!r} is outside the download directory {real_root}: "
            "give a name inside it (mail.download_dir in carrier.yml)"
        )
    return real


def target_file(root: Path, save_to: str, filename: str) -> Path:
    """Where to write an attachment: ``save_to`` names a file, or a directory to put ``filename`` in."""
    path = resolve_inside(root, save_to if save_to.strip() else ".", "save_to")
    if path.is_dir():
        base = safe_filename(filename)
        stem, dot, ext = base.rpartition(".")
        if not dot:
            stem, ext = base, ""
        candidate = path / base
        counter = 1
        while candidate.exists() or candidate.is_symlink():
            candidate = path / (f"{stem} ({counter}).{ext}" if ext else f"{stem} ({counter})")
            counter += 1
        return candidate
    if path.exists() or path.is_symlink():
        raise MailInputError(
            f"save_to {save_to!r} already exists: choose a new name (files are never overwritten)"
        )
    if not path.parent.is_dir():
        raise MailInputError(f"save_to {save_to!r}: directory {path.parent} does not exist")
    return path


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (never following a symlink or replacing a file) with ``data``, mode 0600."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise MailInputError(f"{path} already exists: choose a new name") from None
    except OSError as exc:
        raise MailInputError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def read_inside(root: Path, requested: str, limit: int) -> tuple[str, bytes]:
    """A file under ``root`` to attach: its name and content; refused when outside, missing or too big."""
    path = resolve_inside(root, requested, "attachment path")
    if not path.is_file():
        raise MailInputError(f"attachment path {requested!r} is not a file in the download directory")
    size = path.stat().st_size
    if size > limit:
        raise MailInputError(f"attachment {requested!r} is {size} bytes, over the {limit}-byte cap")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise MailInputError(f"cannot read {requested!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        return path.name, handle.read(limit + 1)[:limit]
