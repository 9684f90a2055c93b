"""Signing keys of the webhooks, kept in the data directory, and the signatures themselves.

Standard Webhooks 1.0: the signed content is ``"<webhook-id>.<webhook-timestamp>.<body>"``;
``v1`` is HMAC-SHA256 with the secret written as ``whsec_<base64>`` (what a receiver is given),
``v1a`` Ed25519 with the public key written as ``whpk_<base64>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path
from typing import Final, Protocol

import nacl.signing
import nacl.utils

from anonticket.keys import DataDirError, fsync_dir, load_or_create_key_file

SECRET_FILE: Final = "webhook.secret"  # whsec_..., for v1 (HMAC-SHA256)
SIGNING_KEY_FILE: Final = "webhook.key"  # whsk_..., for v1a (Ed25519)
PUBLIC_KEY_FILE: Final = "webhook.pub"  # whpk_..., the receivers' copy of the Ed25519 key
SCHEMES: Final = ("hmac", "ed25519")
_KEY_BYTES: Final = 32


class Signer(Protocol):
    def sign(self, event_id: str, timestamp: int, body: bytes) -> str:
        """The ``webhook-signature`` header's value."""


def _content(event_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{event_id}.{timestamp}.".encode("ascii") + body


class HmacSigner:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def sign(self, event_id: str, timestamp: int, body: bytes) -> str:
        mac = hmac.new(self._key, _content(event_id, timestamp, body), hashlib.sha256).digest()
        return "v1," + base64.b64encode(mac).decode("ascii")


class Ed25519Signer:
    def __init__(self, seed: bytes) -> None:
        self._key = nacl.signing.SigningKey(seed)

    @property
    def public_key(self) -> str:
        return "whpk_" + base64.b64encode(bytes(self._key.verify_key)).decode("ascii")

    def sign(self, event_id: str, timestamp: int, body: bytes) -> str:
        signature = self._key.sign(_content(event_id, timestamp, body)).signature
        return "v1a," + base64.b64encode(signature).decode("ascii")


def _encoded(prefix: str) -> bytes:
    return (prefix + base64.b64encode(nacl.utils.random(_KEY_BYTES)).decode("ascii")).encode()


def _decoded(path: Path, text: bytes, prefix: str) -> bytes:
    """The key bytes of ``<prefix><base64 of 32 bytes>``, or a one-line error."""
    try:
        if not text.startswith(prefix.encode()):
            raise ValueError(prefix)
        key = base64.b64decode(text[len(prefix) :], validate=True)
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        raise DataDirError(f"{path} must hold {prefix}<base64 of {_KEY_BYTES} bytes>")
    return key


def _key(data_dir: Path, name: str, prefix: str, if_lost: str) -> bytes:
    """The 32 key bytes kept as ``<prefix><base64>`` in ``name``, made at first start."""
    path = data_dir / name
    text, _ = load_or_create_key_file(
        path, lambda: _encoded(prefix), size=len(_encoded(prefix)), if_lost=if_lost
    )
    return _decoded(path, text, prefix)


def load_signer(data_dir: Path, scheme: str) -> tuple[Signer, str | None]:
    """The signer of ``scheme``, its key made at first start (0600, never overwritten); with
    Ed25519 also the public key, written to ``webhook.pub`` for the receivers' operators."""
    if scheme == "hmac":
        lost = "a new one is made at start if it is gone (then give it to the receivers)"
        return HmacSigner(_key(data_dir, SECRET_FILE, "whsec_", lost)), None
    lost = "a new one is made at start if it is gone (then give receivers webhook.pub)"
    signer = Ed25519Signer(_key(data_dir, SIGNING_KEY_FILE, "whsk_", lost))
    _write_public(data_dir / PUBLIC_KEY_FILE, signer.public_key)
    return signer, signer.public_key


def _write_public(path: Path, text: str) -> None:
    """Written whole or not at all (a temporary file renamed over it)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, text.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise DataDirError(f"cannot write {path}: {e.strerror}") from None
