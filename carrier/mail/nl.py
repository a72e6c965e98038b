"""Optional free-text commands through an LLM (off by default: ``llm.enabled``).

Free text from an authenticated, enrolled sender (a signed mail with no command line) is sent to
an OpenAI-compatible chat-completions API together with the grammar, the playbooks this sender may
run and the inventory groups (``context``, attached by the door). The answer is never run: its
first line that parses as a command (one of the verbs in ``PROPOSABLE``) is checked against the
sender's policy (``validate``, attached by the door) and mailed back as a proposal with a one-time
code; only a signed ``confirm <code>`` from the same sender runs it, and the policy is checked
again then. The code is stored as its sha256, expires after ``PROPOSAL_TTL`` and works once. An
answer that contains the API key is refused outright.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from carrier.auth.policy import Identity
from carrier.config import Config, LlmSettings
from carrier.errors import CarrierError
from carrier.mail.commands import GRAMMAR, Command, parse_commands, parse_line
from carrier.mail.replies import Section
from carrier.store import Store
from carrier.store import gateway as sql

PROPOSAL_TTL = 3600.0
PROPOSABLE = ("run", "exec", "status", "output", "jobs", "hosts", "playbooks", "help")
MAX_TEXT = 4000
TIMEOUT = 30.0
_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


class LlmError(CarrierError):
    """The LLM could not be asked, or its answer is not a command Carrier can propose."""


def code_hash(code: str) -> str:
    return hashlib.sha256(code.upper().encode("ascii", "replace")).hexdigest()


def chat(settings: LlmSettings, messages: Sequence[dict[str, str]], *, timeout: float = TIMEOUT) -> str:
    """One chat-completions call; the assistant's text. LlmError for every failure."""
    if not settings.api_url or not settings.model:
        raise LlmError("llm.api_url and llm.model must be set")
    url = settings.api_url.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions"
    payload = json.dumps({"model": settings.model, "messages": list(messages), "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    key = settings.api_key()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if not url.startswith(("http://", "https://")):
        raise LlmError("llm.api_url must be an http:// or https:// URL")
    request = urllib.request.Request(url, data=payload, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (configured URL)
            data = json.loads(response.read(1_000_000))
        return str(data["choices"][0]["message"]["content"])
    except urllib.error.HTTPError as exc:
        raise LlmError(f"the LLM API answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise LlmError(f"the LLM API could not be used ({type(exc).__name__})") from None


class Proposer:
    """Turns free text into a proposed command; ``take`` gives it back for a valid confirm code."""

    def __init__(
        self,
        settings: LlmSettings,
        store: Store,
        *,
        context: Callable[[Identity], str] | None = None,
        validate: Callable[[Identity, Command], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.context = context
        self.validate = validate

    def attach(
        self, context: Callable[[Identity], str], validate: Callable[[Identity, Command], None]
    ) -> None:
        """Set the prompt context and the policy check where none was given (the door calls this)."""
        self.context = self.context or context
        self.validate = self.validate or validate

    def system_prompt(self, identity: Identity) -> str:
        return (
            "You translate an operator's request into exactly one Carrier command line. Answer with "
            "the command only, nothing else. The grammar:\n"
            + GRAMMAR
            + "\n"
            + (self.context(identity) if self.context is not None else "")
        )

    def _ask(self, identity: Identity, text: str) -> str:
        system = self.system_prompt(identity)
        return chat(
            self.settings,
            [{"role": "system", "content": system}, {"role": "user", "content": text[:MAX_TEXT]}],
        )

    def propose(self, identity: Identity, text: str) -> Section:
        answer = self._ask(identity, text)
        key = self.settings.api_key()
        if key and key in answer:
            raise LlmError("the answer was refused (it contained a secret): write the command yourself")
        parsed = parse_commands(answer.replace("`", ""), max_commands=50)
        commands = [c for c in parsed.commands if c.verb in PROPOSABLE]
        if not commands:
            raise LlmError(
                "the answer was not a command Carrier can propose: write the command yourself "
                "(`help` lists them)"
            )
        command = commands[0]
        if self.validate is None:
            raise LlmError("no policy check is attached to the assistant: nothing can be proposed")
        self.validate(identity, command)
        code = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(10))
        sql.add_proposal(
            self.store, code_hash(code), identity.name, command.line, self.store.clock() + PROPOSAL_TTL
        )
        return Section(
            "",
            "ok",
            f"Proposed command (nothing ran). To run it, reply with this line, signed:"
            f"\n\nconfirm {code}\n\nThe code works once, within {int(PROPOSAL_TTL // 60)} minutes.",
            block=command.line,
        )

    def take(self, identity: Identity, code: str) -> Command:
        line = sql.take_proposal(self.store, code_hash(code), identity.name)
        if line is None:
            raise LlmError("no proposal is waiting for this code (wrong, used, expired or not yours)")
        return parse_line(line)


def proposer_for(config: Config, store: Store, **kwargs: Any) -> Proposer | None:
    """The proposer when ``llm.enabled``; None otherwise (free text then gets a grammar hint)."""
    if not config.llm.enabled:
        return None
    return Proposer(config.llm, store, **kwargs)
