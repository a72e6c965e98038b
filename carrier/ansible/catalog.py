"""The playbook catalog: which playbooks may be named, what each one does, which extra vars it takes.

A playbook is a top-level ``NAME.yml`` (or ``.yaml``) in one of the configured ``playbook_dirs``.
Its catalog entry is the sidecar ``NAME.meta.yml`` beside it (like an AWX survey)::

    description: Show disk usage of a mount point
    admin_only: false            # true: only admins may run it (the policy layer decides)
    controller: false            # true: it runs tasks on the Carrier controller (hosts: localhost,
                                 # delegate_to: localhost, local_action, connection: local); only
                                 # a role with `local: true` may run it. Without it, such a
                                 # playbook is refused (carrier.ansible.controller finds them).
    default_limit: all           # the host pattern used when the request names none
    approval: {by: admin, count: 1, expires: 3600, preview: true}
                                 # a run waits until `count` people of role `by`, none of them the
                                 # requester, approve it by signed mail (`approve <job>`); it is
                                 # cancelled after `expires` seconds without; `preview`: a check-mode
                                 # --diff run's recap goes to the approvers (see docs/approvals.md)
    strategy: linear             # the Ansible strategy of its runs (mitogen, linear or free),
                                 # instead of the engine's `ansible.strategy` (carrier.yml)
    vars:
      path: {type: str, default: /, pattern: '^/[A-Za-z0-9_./-]*$', description: mount point}
      warn_percent: {type: int, default: 90, min: 1, max: 100}
      mode: {type: choice, choices: [quick, full], default: quick}
      verbose: {type: bool, default: false}

A playbook without a sidecar takes no extra vars. Extra vars outside the declared ones are refused,
as is any value holding a Jinja delimiter (Ansible would render it on the controller) and any name
starting with ``ansible_`` (those override connection settings). Names are plain file names: no
``/``, no ``..``; a symlink leading out of the playbook directory is refused too.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from carrier.ansible.errors import EngineError, ExtraVarsError, PatternError, PlaybookError
from carrier.ansible.inventory import check_pattern
from carrier.ansible.strategy import check_strategy
from carrier.formats import PLAYBOOK_EXTENSIONS as _EXTENSIONS
from carrier.formats import PLAYBOOK_NAME_RE as _NAME_RE
from carrier.formats import ROLE_NAME_RE, playbook_stem

_VAR_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
META_SUFFIX = ".meta.yml"
VAR_TYPES = ("str", "int", "bool", "choice")
_JINJA = ("{{", "{%", "{#", "}}", "%}", "#}")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
DEFAULT_MAX_LENGTH = 256
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


@dataclass(frozen=True, slots=True)
class VarSpec:
    """One declared extra var."""

    name: str
    type: str
    description: str = ""
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    min: int | None = None
    max: int | None = None
    pattern: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "required": self.required, "default": self.default}
        if self.description:
            out["description"] = self.description
        if self.choices:
            out["choices"] = list(self.choices)
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        if self.pattern:
            out["pattern"] = self.pattern
        return out


@dataclass(frozen=True, slots=True)
class ApprovalRule:
    """Who must approve a run before it starts: ``count`` people of role ``by``, within ``expires`` s."""

    by: str
    count: int = 1
    expires: int = 3600
    #: Run the playbook in check mode with --diff first and show its recap to the approvers (for
    #: playbooks whose tasks support check mode).
    preview: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"by": self.by, "count": self.count, "expires": self.expires, "preview": self.preview}


@dataclass(frozen=True, slots=True)
class PlaybookInfo:
    """A catalogued playbook."""

    name: str
    path: Path
    directory: Path
    description: str = ""
    admin_only: bool = False
    default_limit: str | None = None
    vars: Mapping[str, VarSpec] = field(default_factory=dict)
    #: The metadata declares that it runs tasks on the controller (see carrier.ansible.controller).
    controller: bool = False
    approval: ApprovalRule | None = None
    #: The metadata's own strategy (``carrier.ansible.strategy``); None: the engine's setting.
    strategy: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "approval": self.approval.to_dict() if self.approval else None,
            "description": self.description,
            "admin_only": self.admin_only,
            "controller": self.controller,
            "default_limit": self.default_limit,
            "strategy": self.strategy,
            "vars": {name: spec.to_dict() for name, spec in self.vars.items()},
        }


def check_playbook_name(name: object) -> str:
    """The bare name (``ping`` for ``ping.yml``), or PlaybookError for anything path-like."""
    if not isinstance(name, str) or not name.strip():
        raise PlaybookError("the playbook name is empty: name one from `carrier playbooks`")
    bare = playbook_stem(name)
    if bare is None:
        raise PlaybookError(
            f"invalid playbook name {name[:60]!r}: a playbook is named by its file name in a playbook "
            "directory (letters, digits, _ and -; no '/', no '..')"
        )
    return bare


# --------------------------------------------------------------------------- metadata


def _fail(path: Path, message: str) -> PlaybookError:
    return PlaybookError(f"{path}: {message}: fix the catalog file")


def _parse_var(path: Path, name: str, raw: Any) -> VarSpec:
    if _VAR_NAME_RE.fullmatch(str(name)) is None or str(name).startswith(("ansible_", "carrier_")):
        raise _fail(path, f"var name {name!r} must be [a-z0-9_], not starting with ansible_/carrier_")
    if not isinstance(raw, Mapping):
        raise _fail(path, f"var {name}: expected a mapping with at least `type`")
    unknown = set(raw) - {"type", "description", "required", "default", "choices", "min", "max", "pattern",
                          "max_length"}
    if unknown:
        raise _fail(path, f"var {name}: unknown keys {', '.join(sorted(map(str, unknown)))}")
    kind = raw.get("type", "str")
    if kind not in VAR_TYPES:
        raise _fail(path, f"var {name}: type must be one of {', '.join(VAR_TYPES)}")
    choices = tuple(str(c) for c in raw.get("choices") or ())
    if kind == "choice" and not choices:
        raise _fail(path, f"var {name}: type choice needs choices")
    pattern = raw.get("pattern")
    if pattern is not None:
        try:
            re.compile(str(pattern))
        except re.error as exc:
            raise _fail(path, f"var {name}: bad pattern ({exc})") from None
    spec = VarSpec(
        name=str(name),
        type=str(kind),
        description=str(raw.get("description") or ""),
        required=bool(raw.get("required", "default" not in raw)),
        default=None,
        choices=choices,
        min=int(raw["min"]) if raw.get("min") is not None else None,
        max=int(raw["max"]) if raw.get("max") is not None else None,
        pattern=str(pattern) if pattern is not None else None,
        max_length=int(raw.get("max_length") or DEFAULT_MAX_LENGTH),
    )
    if raw.get("default") is not None:
        try:
            default = _convert(spec, raw["default"])
        except ExtraVarsError as exc:
            raise _fail(path, f"default: {exc}") from None
        spec = dataclasses.replace(spec, default=default)
    return spec


def _flag(meta: Path, raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise _fail(meta, f"{name} must be true or false")
    return value


def _load_meta(playbook: Path, directory: Path, name: str) -> PlaybookInfo:
    meta = playbook.with_name(name + META_SUFFIX)
    if not meta.exists():
        return PlaybookInfo(name=name, path=playbook, directory=directory)
    try:
        raw = YAML(typ="safe").load(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, YAMLError) as exc:
        raise _fail(meta, f"cannot read it ({exc})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise _fail(meta, "expected a mapping (description, admin_only, controller, default_limit, approval, "
                          "strategy, vars)")
    unknown = set(raw) - {"description", "admin_only", "controller", "default_limit", "approval", "strategy",
                          "vars"}
    if unknown:
        raise _fail(meta, f"unknown keys {', '.join(sorted(map(str, unknown)))}")
    default_limit = raw.get("default_limit")
    if default_limit is not None:
        try:
            check_pattern(str(default_limit))
        except PatternError as exc:
            raise _fail(meta, f"default_limit: {exc}") from None
    strategy = raw.get("strategy")
    if strategy is not None:
        try:
            strategy = check_strategy(strategy)
        except EngineError as exc:
            raise _fail(meta, str(exc)) from None
    specs = raw.get("vars") or {}
    if not isinstance(specs, Mapping):
        raise _fail(meta, "vars must be a mapping of name: {type: ...}")
    return PlaybookInfo(
        name=name,
        path=playbook,
        directory=directory,
        description=str(raw.get("description") or "").strip(),
        admin_only=bool(raw.get("admin_only", False)),
        controller=_flag(meta, raw, "controller"),
        default_limit=str(default_limit) if default_limit is not None else None,
        approval=_approval(meta, raw.get("approval")),
        strategy=strategy,
        vars={str(k): _parse_var(meta, str(k), v) for k, v in specs.items()},
    )


def _approval(meta: Path, raw: Any) -> ApprovalRule | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) - {"by", "count", "expires", "preview"} or "by" not in raw:
        raise _fail(meta, "approval must be a mapping {by: ROLE, count: N, expires: SECONDS, preview: BOOL}")
    by = raw["by"]
    if not isinstance(by, str) or not ROLE_NAME_RE.fullmatch(by):
        raise _fail(meta, f"approval.by must be a role name, not {str(by)[:40]!r}")
    count, expires = raw.get("count", 1), raw.get("expires", 3600)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10:
        raise _fail(meta, "approval.count must be a whole number from 1 to 10")
    if isinstance(expires, bool) or not isinstance(expires, int) or not 10 <= expires <= 30 * 86400:
        raise _fail(meta, "approval.expires must be seconds, from 10 to 2592000 (30 days)")
    preview = raw.get("preview", False)
    if not isinstance(preview, bool):
        raise _fail(meta, "approval.preview must be true or false")
    return ApprovalRule(by, count, expires, preview)


# --------------------------------------------------------------------------- extra vars


def _convert(spec: VarSpec, value: Any) -> Any:
    """``value`` as ``spec``'s type, or ExtraVarsError saying what is accepted."""
    name = spec.name
    if spec.type == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ExtraVarsError(f"extra var {name} must be true or false, got {str(value)[:40]!r}")
    if spec.type == "int":
        if isinstance(value, bool):
            raise ExtraVarsError(f"extra var {name} must be a whole number")
        if isinstance(value, int):
            number = value
        elif isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value.strip()):
            number = int(value.strip())
        else:
            raise ExtraVarsError(f"extra var {name} must be a whole number, got {str(value)[:40]!r}")
        if spec.min is not None and number < spec.min:
            raise ExtraVarsError(f"extra var {name} must be >= {spec.min}, got {number}")
        if spec.max is not None and number > spec.max:
            raise ExtraVarsError(f"extra var {name} must be <= {spec.max}, got {number}")
        return number
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ExtraVarsError(f"extra var {name} must be text")
    text = str(value)
    if any(mark in text for mark in _JINJA):
        raise ExtraVarsError(f"extra var {name} contains a template delimiter ({{{{ {{% {{#): not allowed")
    if _CONTROL_RE.search(text):
        raise ExtraVarsError(f"extra var {name} contains control characters")
    if len(text) > spec.max_length:
        raise ExtraVarsError(f"extra var {name} is longer than {spec.max_length} characters")
    if spec.type == "choice":
        if text not in spec.choices:
            allowed = ", ".join(spec.choices)
            raise ExtraVarsError(f"extra var {name} must be one of {allowed}, got {text[:40]!r}")
        return text
    if spec.pattern is not None and re.fullmatch(spec.pattern, text) is None:
        raise ExtraVarsError(f"extra var {name} {text[:40]!r} does not match {spec.pattern}")
    return text


def validate_extra_vars(info: PlaybookInfo, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The extra vars to pass: the given ones converted and checked, plus declared defaults."""
    given = dict(given or {})
    unknown = [k for k in given if k not in info.vars]
    if unknown:
        allowed = ", ".join(sorted(info.vars)) if info.vars else "none (this playbook takes no extra vars)"
        raise ExtraVarsError(
            f"unknown extra var {', '.join(repr(str(k)[:40]) for k in sorted(map(str, unknown)))} "
            f"for playbook {info.name}: allowed: {allowed}"
        )
    out: dict[str, Any] = {}
    for name, spec in info.vars.items():
        if name in given:
            out[name] = _convert(spec, given[name])
        elif spec.default is not None:
            out[name] = spec.default
        elif spec.required:
            what = spec.description or spec.type
            raise ExtraVarsError(f"playbook {info.name} needs extra var {name} ({what})")
    return out


def parse_assignments(pairs: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b=x y"]`` (CLI ``-e``, mail ``key=value``) as a dict of strings."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ExtraVarsError(f"extra var {pair[:40]!r} is not key=value")
        out[name.strip()] = value
    return out


# --------------------------------------------------------------------------- the catalog


class Catalog:
    """Playbooks in ``dirs`` (first directory wins for a name). Thread-safe, re-read on change."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        self.dirs = tuple(Path(d) for d in dirs)
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple[int, int], PlaybookInfo]] = {}

    def _candidates(self, name: str) -> list[tuple[Path, Path]]:
        found = []
        for directory in self.dirs:
            for ext in _EXTENSIONS:
                path = directory / f"{name}{ext}"
                if path.is_file():
                    found.append((directory, path))
        return found

    def get(self, name: str) -> PlaybookInfo | None:
        """The playbook called ``name`` (checked), or None when no directory has it."""
        bare = check_playbook_name(name)
        for directory, path in self._candidates(bare):
            root = directory.resolve()
            real = path.resolve()
            if not real.is_relative_to(root):
                raise PlaybookError(
                    f"playbook {bare} resolves to {real}, outside {root}: symlinks out of a playbook "
                    "directory are refused"
                )
            return self._info(path, directory, bare)
        return None

    def _info(self, path: Path, directory: Path, name: str) -> PlaybookInfo:
        meta = path.with_name(name + META_SUFFIX)
        try:
            st = meta.stat()
            key = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            key = (0, -1)
        with self._lock:
            cached = self._cache.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
        info = _load_meta(path, directory, name)
        with self._lock:
            self._cache[path] = (key, info)
        return info

    def list(self) -> list[PlaybookInfo]:
        """Every playbook, sorted by name (a name in an earlier directory hides later ones)."""
        seen: dict[str, PlaybookInfo] = {}
        for directory in self.dirs:
            try:
                entries = sorted(directory.iterdir())
            except OSError:
                continue
            for path in entries:
                if path.suffix not in _EXTENSIONS or path.name.endswith(META_SUFFIX) or not path.is_file():
                    continue
                name = path.name[: -len(path.suffix)]
                if _NAME_RE.fullmatch(name) is None or name in seen:
                    continue
                if not path.resolve().is_relative_to(directory.resolve()):
                    continue
                seen[name] = self._info(path, directory, name)
        return [seen[k] for k in sorted(seen)]
