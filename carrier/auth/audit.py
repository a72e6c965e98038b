"""The audit trail: every trust decision and every job start/end, hash-chained with a key.

Each row's hash covers the previous row's hash and the row's own content (id, time, actor, door,
action, target, outcome, detail). Rows written since schema migration 6 are keyed: HMAC-SHA256 with
the audit key, a file kept outside the state directory (``auth.audit_key_file``, default
``audit.key`` beside carrier.yml, mode 0600, made at first start). Older rows keep their unkeyed
SHA-256 hash and still verify; a marker MACed with the key records the row where keying began, so
an unkeyed row after it is a rewrite. The head (newest id, hash, row count) carries a MAC too.

``verify()`` recomputes the chain: an edited, deleted or inserted row is reported by id. Someone who
can write the database but cannot read the key cannot recompute it. Someone who holds the key can:
against them only a signed checkpoint kept off the machine helps (``Checkpoint``,
``carrier audit --checkpoint``). See docs/security.md.

Rows are written only through ``Audit.record``: the store has no unchained writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from carrier.auth.errors import AuthError
from carrier.auth.keyring import Keyring, normalize_fingerprint
from carrier.auth.pgp import verify_clearsigned
from carrier.auth.policy import Decision, Identity, Request
from carrier.config import Config, _loose_mode
from carrier.store import Store
from carrier.store.auth import (
    GENESIS_HASH,
    AuditChain,
    AuditKeyed,
    ChainedAuditRow,
    append_audit,
    bind_audit_key,
    read_audit_keyed,
    read_audit_state,
)

SHA256 = "sha256"
HMAC_SHA256 = "hmac-sha256"
KEY_BYTES = 32
KEY_FILE_NAME = "audit.key"


class AuditKeyError(AuthError):
    """The audit key cannot be used (missing, loose permissions, wrong key, inside the state dir)."""

    reason = "audit_key"


def _content(prev_hash: str, row: ChainedAuditRow, version: int) -> bytes:
    content = {
        "v": version,
        "prev": prev_hash,
        "id": row.id,
        "ts": row.ts,
        "actor": row.actor,
        "door": row.door,
        "action": row.action,
        "target": row.target,
        "outcome": row.outcome,
        "detail": row.detail_json,
    }
    text = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


def row_hash(prev_hash: str, row: ChainedAuditRow) -> str:
    """The unkeyed chain hash (rows written before the audit key): sha256 over canonical JSON."""
    return hashlib.sha256(_content(prev_hash, row, 1)).hexdigest()


def keyed_row_hash(key: bytes, prev_hash: str, row: ChainedAuditRow) -> str:
    """The keyed chain hash: HMAC-SHA256(key, canonical JSON of prev_hash + the row's content)."""
    return hmac.new(key, _content(prev_hash, row, 2), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditKey:
    """The audit HMAC key (never logged: the repr shows only its id)."""

    secret: bytes = field(repr=False)
    path: Path | None = None

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError("an audit key has at least 16 bytes")

    def _mac(self, text: str) -> str:
        return hmac.new(self.secret, text.encode("utf-8"), hashlib.sha256).hexdigest()

    @property
    def id(self) -> str:
        """A public name for the key (to tell a wrong key from a tampered chain)."""
        return self._mac("carrier audit key id")[:16]

    def row_hash(self, prev_hash: str, row: ChainedAuditRow) -> str:
        return keyed_row_hash(self.secret, prev_hash, row)

    def marker_mac(self, from_id: int) -> str:
        return self._mac(f"carrier audit keyed from {from_id}")

    def head_mac(self, last_id: int, last_hash: str, row_count: int) -> str:
        return self._mac(f"carrier audit head {last_id} {last_hash} {row_count}")

    def where(self) -> str:
        return str(self.path) if self.path else "the audit key"


def audit_key_path(config: Config) -> Path:
    """``auth.audit_key_file``, or ``audit.key`` in carrier.yml's directory."""
    return config.auth.audit_key_file or config.path.parent / KEY_FILE_NAME


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def _read_key(path: Path) -> bytes:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise AuditKeyError(f"the audit key {path} is not a regular file")
    loose = _loose_mode(path, st.st_mode)
    if loose:
        raise AuditKeyError(f"the audit key {loose}")
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditKeyError(f"cannot read the audit key {path}: {exc}") from None
    if not re.fullmatch(r"[0-9a-f]{32,128}", text) or len(text) % 2:
        raise AuditKeyError(f"{path} is not an audit key (expected hex digits on one line): restore it "
                            "from your backup")
    return bytes.fromhex(text)


def _make_key(path: Path) -> None:
    """Write a new key so that no reader ever sees a partial file: a 0600 temp file made with
    O_EXCL, then hard-linked into place (the link fails if another process got there first)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(KEY_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def load_audit_key(path: Path, state_dir: Path, store: Store) -> tuple[AuditKey, bool]:
    """The key at ``path`` and whether it was missing (made now). A missing key is made only while
    the chain has never been keyed: once it has, the key is needed to check it and must be restored."""
    if _inside(path, state_dir):
        raise AuditKeyError(
            f"the audit key {path} is inside the state directory {state_dir}: whoever can write the "
            "store could read it; set auth.audit_key_file to a path outside it")
    missing = False
    try:
        return AuditKey(_read_key(path), path), missing
    except FileNotFoundError:
        missing = True
    except OSError as exc:
        raise AuditKeyError(f"cannot read the audit key {path}: {exc.strerror}") from None
    marker = read_audit_keyed(store)
    if marker is not None:
        # Another process (a second instance starting at the same time) may have made the key
        # and keyed the chain since we looked: then it is there now.
        with contextlib.suppress(FileNotFoundError):
            return AuditKey(_read_key(path), path), False
        raise AuditKeyError(
            f"the audit key {path} is missing but the audit chain is keyed from row {marker.from_id} "
            f"(key id {marker.key_id}): restore the key from your backup (it is not made again, "
            "that would hide a rewrite)")
    try:
        _make_key(path)
        return AuditKey(_read_key(path), path), missing
    except OSError as exc:
        raise AuditKeyError(f"cannot create the audit key {path}: {exc.strerror}") from None


def open_audit(config: Config, store: Store, *, adopt: bool = False) -> Audit:
    """The audit trail of ``store`` with its key (made at first start), bound to the chain.

    ``adopt``: key an existing unkeyed chain with a key that already exists (an admin put it
    there); a key made now adopts the chain by itself.
    """
    key, made = load_audit_key(audit_key_path(config), config.state_dir, store)
    audit = Audit(store, key, adopt=adopt or made)
    audit.bind()
    return audit


@dataclass(frozen=True, slots=True)
class AuditReport:
    rows: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------- signed checkpoints

CHECKPOINT_TITLE = "Carrier audit checkpoint v1"
_CHECKPOINT_FIELDS = ("rows", "last_id", "last_hash", "taken_at")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The audit head at one moment, as Carrier signs it (clear-signed text, kept off the machine)."""

    rows: int
    last_id: int
    last_hash: str
    taken_at: float

    def text(self) -> str:
        return (f"{CHECKPOINT_TITLE}\nrows: {self.rows}\nlast_id: {self.last_id}\n"
                f"last_hash: {self.last_hash}\ntaken_at: {_iso(self.taken_at)}\n")

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = [line.strip() for line in text.strip().splitlines()]
        if not lines or lines[0] != CHECKPOINT_TITLE:
            raise AuthError(f"not an audit checkpoint: the signed text must start with {CHECKPOINT_TITLE!r}",
                            reason="malformed")
        values: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or name in values:
                raise AuthError(f"unreadable checkpoint line {line!r}", reason="malformed")
            values[name.strip()] = value.strip()
        if sorted(values) != sorted(_CHECKPOINT_FIELDS):
            raise AuthError(f"a checkpoint has exactly the fields {', '.join(_CHECKPOINT_FIELDS)}",
                            reason="malformed")
        try:
            taken = datetime.strptime(values["taken_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            point = cls(int(values["rows"]), int(values["last_id"]), values["last_hash"], taken.timestamp())
        except ValueError:
            raise AuthError("unreadable checkpoint values", reason="malformed") from None
        if point.rows < 0 or point.last_id < 0 or not re.fullmatch(r"[0-9a-f]{64}", point.last_hash):
            raise AuthError("unreadable checkpoint values", reason="malformed")
        return point


def sign_checkpoint(keyring: Keyring, point: Checkpoint, signer: str) -> bytes:
    """The checkpoint clear-signed by Carrier's key ``signer`` (verified by ``read_checkpoint``)."""
    signer = normalize_fingerprint(signer)
    result = keyring.gpg.sign(point.text(), keyid=signer, clearsign=True, detach=False,
                              extra_args=["--no-include-key-block"])
    data = bytes(result.data or b"")
    if b"BEGIN PGP SIGNED MESSAGE" not in data:
        raise AuthError(f"gpg could not sign with key {signer}: is its secret key in {keyring.home}?",
                        reason="gpg")
    return data


def read_checkpoint(keyring: Keyring, data: bytes, signer: str) -> Checkpoint:
    """The checkpoint in ``data`` if it is signed by ``signer``; VerificationError otherwise."""
    signed = verify_clearsigned(keyring, data, signer)  # only the signed text counts
    return Checkpoint.parse(signed.text)


def checkpoint_problems(chain: AuditChain, point: Checkpoint) -> list[str]:
    """Whether ``chain`` still holds the head ``point`` recorded, at the same row and count."""
    when = _iso(point.taken_at)
    if point.last_id == 0:
        return [] if point.rows == 0 else [f"the checkpoint of {when} is inconsistent (rows, no last id)"]
    chained = [r for r in chain.rows if r.row_hash is not None and r.id <= point.last_id]
    row = next((r for r in chained if r.id == point.last_id), None)
    problems: list[str] = []
    if row is None:
        problems.append(f"row {point.last_id}, the head in the checkpoint of {when}, is gone: rows were "
                        "deleted")
    elif row.row_hash != point.last_hash:
        problems.append(f"row {point.last_id}: its hash is not the head in the checkpoint of {when}: a row "
                        f"at or before row {point.last_id} was rewritten and the chain recomputed")
    if len(chained) != point.rows:
        problems.append(f"the checkpoint of {when} counts {point.rows} rows up to row {point.last_id}, the "
                        f"table has {len(chained)}: rows were deleted or inserted")
    return problems


class Audit:
    """Appends chained audit rows to the store and checks the chain."""

    def __init__(self, store: Store, key: AuditKey, *, adopt: bool = False) -> None:
        self.store = store
        self.key = key
        self.adopt = adopt  # may key a chain that already has unkeyed rows
        self._marker: AuditKeyed | None = None

    def bind(self) -> AuditKeyed:
        """The chain's switch marker, made now if the chain was never keyed (AuditKeyError if it
        may not be: unkeyed rows and a key that was not just made, or another key)."""
        if self._marker is not None:
            return self._marker
        marker = bind_audit_key(self.store, self.key.id, self.key.marker_mac, self.key.head_mac,
                                allow_existing_rows=self.adopt)
        if marker is None:
            raise AuditKeyError(
                f"{self.key.where()} exists but the audit chain was never keyed with it and has unkeyed "
                "rows. If you put the key there for this upgrade, run `carrier audit --adopt-key` once; "
                "if Carrier had keyed this chain before, its switch marker was deleted (the store was "
                "tampered with): check it with `carrier audit --verify --checkpoint FILE`")
        if marker.key_id != self.key.id:
            raise AuditKeyError(
                f"{self.key.where()} (key id {self.key.id}) is not the key this audit chain is keyed with "
                f"(key id {marker.key_id}): restore the right key from your backup")
        self._marker = marker
        return marker

    def record(
        self,
        actor: str,
        door: str,
        action: str,
        *,
        target: str = "",
        outcome: str = "ok",
        detail: Mapping[str, Any] | None = None,
    ) -> ChainedAuditRow:
        """Append one row: who (``actor``), through which door, did what, to what, with what result."""
        self.bind()
        return append_audit(self.store, self.key.row_hash, actor=actor or "unknown", door=door,
                            action=action, target=target, outcome=outcome, detail=dict(detail or {}),
                            scheme=HMAC_SHA256, head_mac=self.key.head_mac)

    def decision(
        self, identity: Identity, request: Request, decision: Decision, *, target: str = ""
    ) -> ChainedAuditRow:
        """Record a policy decision (allowed or denied) with the hosts and the reason."""
        detail: dict[str, Any] = {"reason": decision.reason, "role": identity.role,
                                  "hosts": [h.name for h in request.hosts]}
        for key in ("playbook", "module", "command", "tool", "job_owner", "secret"):  # secret: its name
            value = getattr(request, key)
            if value is not None:
                detail[key] = value
        if identity.token_id:
            detail["token"] = identity.token_id
        if identity.fingerprint:
            detail["fingerprint"] = identity.fingerprint
        return self.record(identity.name, identity.door, f"decide:{request.action}", target=target,
                           outcome="allowed" if decision.allowed else "denied", detail=detail)

    def job(
        self,
        identity: Identity,
        job_id: str,
        event: str,
        *,
        hosts: Sequence[str] = (),
        outcome: str = "ok",
        detail: Mapping[str, Any] | None = None,
    ) -> ChainedAuditRow:
        """Record a job's start or end (``event``: start, end, kill...), with its hosts and result."""
        return self.record(identity.name, identity.door, f"job:{event}", target=job_id, outcome=outcome,
                           detail={"hosts": list(hosts), "role": identity.role, **dict(detail or {})})

    def verify(self, checkpoint: Checkpoint | None = None) -> AuditReport:
        """Recompute the chain (and compare it with a checkpoint); each problem names where it shows."""
        try:
            self.bind()
        except AuditKeyError as exc:
            chain = read_audit_state(self.store)
            return AuditReport(len(chain.rows), [str(exc)])
        chain = read_audit_state(self.store)
        problems = self._chain_problems(chain)
        if checkpoint is not None:
            problems += checkpoint_problems(chain, checkpoint)
        return AuditReport(len(chain.rows), problems)

    def head(self) -> Checkpoint:
        """The current head as a checkpoint (after checking the chain: a broken one is not signed)."""
        report = self.verify()
        if not report.ok:
            raise AuthError(f"the audit chain is broken ({report.problems[0]}): run `carrier audit "
                            "--verify`; no checkpoint is taken of a broken chain", reason="audit")
        head = read_audit_state(self.store).head
        if head is None:
            return Checkpoint(0, 0, GENESIS_HASH, self.store.clock())
        return Checkpoint(head.row_count, head.last_id, head.last_hash, self.store.clock())

    def _chain_problems(self, chain: AuditChain) -> list[str]:
        marker, head, key = chain.keyed, chain.head, self.key
        problems: list[str] = []
        if marker is None:
            problems.append("the keyed-chain marker (table audit_keyed) is missing: it was deleted")
        elif marker.key_id != key.id:
            return [f"{key.where()} (key id {key.id}) is not the key this chain is keyed with "
                    f"(key id {marker.key_id}): restore the right key"]
        elif not hmac.compare_digest(marker.mac, key.marker_mac(marker.from_id)):
            problems.append(f"the keyed-chain marker was changed (it says keyed from row {marker.from_id})")
        prev = GENESIS_HASH
        chained = 0
        last_id = 0
        for row in chain.rows:
            if row.row_hash is None or row.prev_hash is None:
                problems.append(f"row {row.id}: not chained (written outside carrier.auth.audit, or its "
                                "hash was removed)")
                continue
            chained += 1
            if row.prev_hash != prev:
                problems.append(f"row {row.id}: the chain is broken before it (a row was deleted, "
                                "inserted or changed)")
            if row.scheme == HMAC_SHA256:
                expected = key.row_hash(row.prev_hash, row)
            else:
                expected = row_hash(row.prev_hash, row)
                if marker is not None and row.id >= marker.from_id:
                    problems.append(f"row {row.id}: it has an unkeyed hash but the chain is keyed from row "
                                    f"{marker.from_id} (rewritten by someone without the audit key)")
            if not hmac.compare_digest(expected, row.row_hash):
                problems.append(f"row {row.id}: its content was changed after it was written")
            prev = row.row_hash
            last_id = row.id
        if head is None:
            if chained or marker is not None:
                problems.append("the audit head record is missing")
            return problems
        if head.last_hash != prev or head.last_id != last_id:
            problems.append(f"the newest row(s) are missing or changed: the head names row "
                            f"{head.last_id}, the table ends at row {last_id or 'none'}")
        if head.row_count != chained:
            problems.append(f"the head counts {head.row_count} rows, the table has {chained}")
        if marker is not None and not (
            head.head_mac and hmac.compare_digest(head.head_mac,
                                                  key.head_mac(head.last_id, head.last_hash, head.row_count))
        ):
            problems.append(f"the audit head (row {head.last_id}, {head.row_count} rows) was replaced: its "
                            "keyed MAC does not match (the newest rows may have been cut)")
        return problems
