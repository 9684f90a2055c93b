"""The user's side of passes (``anonticket-client passes``): build the token requests, finish the
passes from the issuer's answers (its proofs checked), and keep them in an owner-only file.

A pass is RFC 9577's Token for one TokenChallenge; the service tells its users which challenge it
sends (by default: token type 1, this issuer's host name, no redemption context, no origin
info - a challenge every user of the issuer shares, so a pass names nobody).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from voprf import p384

from anonticket.passes.wire import TOKEN_TYPE, TokenRequest, b64url, from_b64url, token_key_id

STORE_VERSION: Final = 1
PUBLIC_KEY_SIZE: Final = 49  # a compressed P-384 point, the token key of type 1


class PassError(Exception):
    """Something about passes went wrong; the message is one line for the user."""


def token_challenge(
    issuer_name: str, redemption_context: bytes = b"", origin_info: str = ""
) -> bytes:
    """RFC 9577 TokenChallenge: token_type, issuer_name<1..2^16-1>, redemption_context<0..32>,
    origin_info<0..2^16-1>."""
    name, origins = issuer_name.encode("ascii"), origin_info.encode("ascii")
    if not 1 <= len(name) < 2**16 or len(redemption_context) not in (0, 32):
        raise PassError("a challenge needs an issuer name and a 0- or 32-byte context")
    return (
        TOKEN_TYPE.to_bytes(2, "big")
        + len(name).to_bytes(2, "big")
        + name
        + bytes([len(redemption_context)])
        + redemption_context
        + len(origins).to_bytes(2, "big")
        + origins
    )


def choose_token_key(directory: object, now: float) -> bytes:
    """The key to ask with, from an issuer directory (RFC 9578 section 4): among the
    ``token-keys`` of our token type whose ``not-before`` has passed, the most recent one.
    A key of another type, or one announced for later, is never used."""
    entries = directory.get("token-keys") if isinstance(directory, dict) else None
    usable: list[tuple[float, bytes]] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("token-type") != TOKEN_TYPE:
            continue
        not_before = entry.get("not-before", 0)
        if isinstance(not_before, bool) or not isinstance(not_before, int | float):
            continue
        try:
            key = from_b64url(str(entry.get("token-key", "")))
        except ValueError:
            continue
        if not_before <= now and len(key) == PUBLIC_KEY_SIZE:
            usable.append((not_before, key))
    if not usable:
        raise PassError("the issuer directory names no token key of type 1 in use now")
    return max(usable, key=lambda found: found[0])[1]


@dataclass
class Blinded:
    """One pass in the making: the client state, the token input and its request."""

    client: p384.Client
    token_input: bytes
    request: bytes


def blind(public_key: bytes, challenge: bytes, count: int) -> list[Blinded]:
    key_id = token_key_id(public_key)
    digest = hashlib.sha256(challenge).digest()
    made = []
    for _ in range(count):
        token_input = TOKEN_TYPE.to_bytes(2, "big") + secrets.token_bytes(32) + digest + key_id
        client, blinded = p384.Client.blind(token_input)
        request = TokenRequest(key_id[-1], blinded.serialize()).serialize()
        made.append(Blinded(client, token_input, request))
    return made


def finish(made: Blinded, response: bytes, public_key: bytes) -> bytes:
    """The pass (Token) from the issuer's TokenResponse, or PassError if its proof fails."""
    if len(response) != 49 + 96:
        raise PassError("the issuer's answer is not a TokenResponse")
    try:
        # The voprf package reads the proof first; RFC 9578 puts the element first.
        output = p384.VerifiableOutput.deserialize(response[49:] + response[:49])
        authenticator = made.client.finalize(output, p384.PublicKey.deserialize(public_key))
    except Exception:
        raise PassError("the issuer's proof does not verify: passes refused") from None
    return made.token_input + authenticator


class PassStore:
    """Unused and used passes in one JSON file, owner-only, replaced whole on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return {"version": STORE_VERSION, "passes": []}
        except (OSError, ValueError) as e:
            raise PassError(f"cannot read {self.path}: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
            raise PassError(f"{self.path} is not a pass store")
        return data

    def save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, json.dumps(data, indent=1).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)

    def add(self, issuer: str, passes: list[bytes]) -> int:
        data = self.load()
        data["passes"] += [{"issuer": issuer, "token": b64url(p), "used": False} for p in passes]
        self.save(data)
        return sum(1 for p in data["passes"] if not p.get("used"))

    def take(self, issuer: str | None) -> str | None:
        """One unused pass (of ``issuer``, if given), marked used before it is returned: a
        crash after this loses a pass rather than showing it twice."""
        data = self.load()
        for entry in data["passes"]:
            if not entry.get("used") and (issuer is None or entry.get("issuer") == issuer):
                entry["used"] = True
                self.save(data)
                return str(entry["token"])
        return None
