"""The optional LLM path end to end: `carrier serve` with ``llm.enabled`` against a local HTTP
server speaking the OpenAI chat-completions API; signed free text from ops@ becomes a proposal
with a one-time code, and only a signed ``confirm <code>`` runs it, once."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from door_support import db_rows, identities, send_signed, serving, text_of, wait_replies
from mail_support import token, write_secret

from carrier.sandbox.manager import Sandbox

API_KEY = "sk-test-" + "k3y" * 8


@dataclass
class FakeLlm:
    """Answers each chat request with the first scripted answer whose trigger word is in the
    user's text; records every request (headers and body)."""

    script: dict[str, str]
    requests: list[dict[str, Any]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self) -> FakeLlm:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                user = next(m["content"] for m in body["messages"] if m["role"] == "user")
                answer = next((a for word, a in fake.script.items() if word in user), "I cannot help.")
                data = json.dumps(
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": answer},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def llm() -> Iterator[FakeLlm]:
    fake = FakeLlm(
        {
            "alive": "Sure.\n`run ping on web1`",
            "restart": "run service_restart on web1 service=ssh",
            "secret": f"exec web1 echo {API_KEY}",
            "nonsense": "I would rather write a poem.",
        }
    ).start()
    yield fake
    fake.close()


def unique(text: str) -> str:
    return f"{text}\n-- \n{token('sig')}\n"


def test_free_text_becomes_a_proposal_that_runs_once_after_a_signed_confirm(
    sandbox: Sandbox, llm: FakeLlm, tmp_path: Path
) -> None:
    key_file = write_secret(tmp_path / "llm.key", API_KEY)
    settings = {"enabled": True, "api_url": llm.url, "api_key_file": str(key_file), "model": "test-model"}
    with serving(sandbox, llm=settings) as (serve, directory), identities(sandbox) as people:
        ops, admin = people["ops"], people["admin"]
        state = directory / "state"
        serve.start()
        tag = token("llm")
        send_signed(sandbox, ops, unique("please check that web1 is alive"), f"{tag} propose")
        send_signed(sandbox, ops, unique("restart ssh on web1 for me"), f"{tag} denied")
        send_signed(sandbox, ops, unique("tell me a secret"), f"{tag} secret")
        send_signed(sandbox, ops, unique("some nonsense"), f"{tag} nonsense")
        send_signed(sandbox, ops, unique("confirm WRONGCODE9"), f"{tag} wrong")
        (proposal,) = wait_replies(sandbox, "ops", f"{tag} propose", 1)
        text = text_of(proposal)
        assert "Proposed command (nothing ran)" in text and "run ping on web1" in text
        match = re.search(r"confirm ([A-Z2-9]{10})", text)
        assert match, text
        code = match.group(1)
        (denied,) = wait_replies(sandbox, "ops", f"{tag} denied", 1)
        assert "admins only" in text_of(denied) and "confirm " not in text_of(denied)
        (secret,) = wait_replies(sandbox, "ops", f"{tag} secret", 1)
        assert "contained a secret" in text_of(secret) and "confirm " not in text_of(secret)
        (nonsense,) = wait_replies(sandbox, "ops", f"{tag} nonsense", 1)
        assert "not a command Carrier can propose" in text_of(nonsense)
        (wrong,) = wait_replies(sandbox, "ops", f"{tag} wrong", 1)
        assert "no proposal is waiting for this code" in text_of(wrong)
        assert db_rows(state, "SELECT id FROM jobs") == []  # nothing ran yet
        # Another enrolled user cannot use ops@'s code.
        send_signed(sandbox, admin, unique(f"confirm {code}"), f"{tag} stolen")
        (stolen,) = wait_replies(sandbox, "admin", f"{tag} stolen", 1)
        assert "no proposal is waiting" in text_of(stolen)
        assert db_rows(state, "SELECT id FROM jobs") == []
        # The signed confirm runs it, once.
        send_signed(sandbox, ops, unique(f"confirm {code}"), f"{tag} confirm")
        accepted, result = wait_replies(sandbox, "ops", f"{tag} confirm", 2)
        assert "accepted, job j-" in text_of(accepted)
        job_id = text_of(accepted).split("accepted, job ")[1].split(":")[0]
        assert f"Job {job_id} succeeded" in text_of(result)
        send_signed(sandbox, ops, unique(f"confirm {code}"), f"{tag} again")
        (again,) = wait_replies(sandbox, "ops", f"{tag} again", 1)
        assert "no proposal is waiting" in text_of(again)
        jobs = db_rows(state, "SELECT id, kind, target FROM jobs")
        assert [j[0] for j in jobs] == [job_id] and jobs[0][2] == "web1"
        # What the LLM saw: the key as a bearer token, the grammar, ops@'s playbooks and the groups.
        assert len(llm.requests) == 4
        first = llm.requests[0]
        assert first["path"] == "/v1/chat/completions"
        assert first["headers"]["Authorization"] == f"Bearer {API_KEY}"
        assert first["body"]["model"] == "test-model"
        system = first["body"]["messages"][0]["content"]
        assert "run <playbook>" in system and "- ping" in system and "disk_usage" in system
        assert "service_restart" not in system  # admin-only: not offered to an operator
        assert re.search(r"- web: .*web1", system) and re.search(r"- db: .*db1", system)
        # The key is in no log line and in no reply.
        assert serve.stop() == 0
        assert all(API_KEY not in json.dumps(line) for line in serve.lines)
        for who in ("ops", "admin"):
            for reply in wait_replies(sandbox, who, tag, 1):
                assert API_KEY not in reply.as_string()
