"""Trust layer: Carrier's signature verification vs raw ``gpg --verify`` on the same mail and keyring.

Carrier's path = parse the MIME, slice and canonicalise the signed part, write the detached
signature to the private temp dir, python-gnupg's ``--verify``, judge the status lines. The
baseline is one ``gpg --verify sig -`` process on the already-sliced bytes (what any verifier must
at least do). Rounds alternate between the two so a noisy machine moves both; medians are reported.
Also: token checks and policy decisions per second (no baseline: absolute rates).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from timing_support import timed

from carrier.auth import pgp
from carrier.auth.keyring import Keyring
from carrier.auth.policy import HostRef, Identity, Request, decide
from carrier.auth.tokens import Tokens
from carrier.config import Role
from carrier.store import Store

MAILS = 30
ROUNDS = 5
THREADS = 4
NO_PASS = ["--pinentry-mode", "loopback", "--passphrase", ""]


def _gpg(home: Path, *args: str, data: bytes = b"") -> bytes:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--quiet", *args], input=data,
                          capture_output=True, check=True, timeout=60).stdout


def _entity(i: int) -> bytes:
    return (b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
            + f"status j-aaaaaaaaaaaa {i}\r\n".encode())


def _mail(entity: bytes, sig: bytes) -> bytes:
    return (b'From: ops@example.test\r\nTo: carrier@example.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n'
            b'Content-Type: multipart/signed; micalg=pgp-sha256; protocol="application/pgp-signature"; '
            b'boundary="b"\r\n\r\n--b\r\n' + entity + b"\r\n--b\r\nContent-Type: application/pgp-signature"
            b"\r\n\r\n" + sig.replace(b"\n", b"\r\n") + b"\r\n--b--\r\n")


def main() -> str:
    root = Path(tempfile.mkdtemp(prefix="cb-", dir="/var/tmp"))
    root.chmod(0o700)
    user, state = root / "u", root / "s"
    user.mkdir(mode=0o700)
    keyring: Keyring | None = None
    try:
        _gpg(user, *NO_PASS, "--quick-generate-key", "Ops <ops@example.test>", "ed25519", "sign", "never")
        fpr = _gpg(user, "--with-colons", "--list-keys").decode().split("\nfpr:::::::::")[1].split(":")[0]
        keyring = Keyring.for_state_dir(state / "gnupg", state)
        keyring.gpg.import_keys(_gpg(user, "--armor", "--export", fpr))
        items = []
        for i in range(MAILS):
            entity = _entity(i)
            sig = _gpg(user, *NO_PASS, "--armor", "--detach-sign", data=entity)
            items.append((entity, sig, _mail(entity, sig)))
        sig_files = []
        for i, (_, sig, _) in enumerate(items):
            path = root / f"sig{i}.asc"
            path.write_bytes(sig)
            sig_files.append(path)
        kr = keyring

        def carrier_run() -> None:
            for _, _, raw in items:
                pgp.verify_mail(kr, raw, fpr)

        def gpg_run() -> None:
            for (entity, _, _), path in zip(items, sig_files, strict=True):
                subprocess.run(["gpg", "--homedir", str(kr.home), "--batch", "--status-fd", "2", "--verify",
                                str(path), "-"], input=entity, capture_output=True, check=True)

        def threaded(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                threads = [threading.Thread(target=fn) for _ in range(THREADS)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            return run

        times: dict[str, list[float]] = {"carrier": [], "gpg": [], "carrier_mt": [], "gpg_mt": []}
        for _ in range(ROUNDS):
            times["carrier"].append(timed(carrier_run))
            times["gpg"].append(timed(gpg_run))
            times["carrier_mt"].append(timed(threaded(carrier_run)))
            times["gpg_mt"].append(timed(threaded(gpg_run)))
        med = {k: statistics.median(v) for k, v in times.items()}
        one = {k: med[k] / MAILS * 1000 for k in ("carrier", "gpg")}
        rate = {k: MAILS * THREADS / med[k] for k in ("carrier_mt", "gpg_mt")}

        with Store.open(state / "db") as store:
            tokens = Tokens(store, roles={"operator"}, default_ttl=3600, max_ttl=3600)
            issued = tokens.issue("ops@example.test", "operator")
            started = time.perf_counter()
            for _ in range(500):
                tokens.check(issued.token)
            token_rate = 500 / (time.perf_counter() - started)
        roles = {"operator": Role(playbooks=("deploy_*",), hosts="web:!db", exec=True, pty=True)}
        who = Identity("ops@example.test", "operator", "mail")
        request = Request("exec", (HostRef("web1", ("web",)), HostRef("web2", ("web",))), command="uptime")
        started = time.perf_counter()
        for _ in range(20000):
            decide(who, request, roles, strict_commands=True)
        decide_rate = 20000 / (time.perf_counter() - started)
    finally:
        if keyring is not None:
            keyring.stop_agent()
        subprocess.run(["gpgconf", "--homedir", str(user), "--kill", "all"], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)

    return "\n".join([
        "### Trust layer: signature verification (auth)",
        "",
        f"{MAILS} PGP/MIME mails (ed25519) per round, median of {ROUNDS} rounds, same keyring on both sides.",
        "",
        "| what | Carrier (`verify_mail`) | baseline (`gpg --verify` process) | ratio (time) |",
        "|---|---|---|---|",
        f"| one verification, sequential | {one['carrier']:.1f} ms | {one['gpg']:.1f} ms | "
        f"{one['carrier'] / one['gpg']:.2f}x |",
        f"| {THREADS} threads at once | {rate['carrier_mt']:.0f} verifications/s | {rate['gpg_mt']:.0f} /s | "
        f"{rate['gpg_mt'] / rate['carrier_mt']:.2f}x |",
        "",
        f"Without a baseline: token check (hash lookup + last-use write) {token_rate:,.0f}/s; "
        f"policy `decide` {decide_rate:,.0f}/s.",
    ])


if __name__ == "__main__":
    print(main())
