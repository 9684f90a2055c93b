"""The data directory and the secret key that turns PIDs and tokens into stored tags.

A stolen database alone must let no one redeem a payment or use a token, so the store keeps
only keyed BLAKE2b tags of them.  The 32-byte key lives in ``<data-dir>/secret.key`` (0600),
made on first start; losing it makes every stored payment and token unreachable, so operators
back it up (docs/operations.md).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final

import nacl.encoding
import nacl.hash
import nacl.utils

SECRET_KEY_FILE: Final = "secret.key"
SECRET_KEY_BYTES: Final = 32
TAG_BYTES: Final = 16

_PID_PERSON: Final = b"anonticket.pid"
_TOKEN_PERSON: Final = b"anonticket.tok"


class DataDirError(Exception):
    """The data directory or the key file cannot be used; the message says why."""


def prepare_data_dir(path: Path) -> Path:
    """Create the data directory 0700, or tighten an existing one we own to 0700."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            # systemd's StateDirectory= makes 0755 by default; the directory holds keys.
            path.chmod(0o700)
    except OSError as e:
        raise DataDirError(f"--data-dir: cannot use {str(path)!r}: {e.strerror}") from None
    return path


def load_or_create_secret_key(data_dir: Path) -> bytes:
    """Read ``secret.key``, creating it (0600, written once, fsynced) on first start."""
    key, _ = load_or_create_key_file(
        data_dir / SECRET_KEY_FILE,
        lambda: nacl.utils.random(SECRET_KEY_BYTES),
        size=SECRET_KEY_BYTES,
        if_lost="restore it from backup",
    )
    return key


def load_or_create_key_file(
    path: Path, generate: Callable[[], bytes], *, size: int, if_lost: str
) -> tuple[bytes, bool]:
    """The key in *path*, or a new one from *generate* written there (0600, fsynced, with the
    directory).  Returns ``(key, created)``.  Refuses a key others can read, a symlink, or one
    of the wrong size, with a one-line :class:`DataDirError` ending in *if_lost*."""
    try:
        # O_EXCL: two starts racing on an empty data dir must not end up with two keys.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_key_file(path, size, if_lost), False
    except OSError as e:
        raise DataDirError(f"cannot create {path}: {e.strerror}") from None
    key = generate()
    written = False
    try:
        os.write(fd, key)
        os.fsync(fd)
        written = True
    finally:
        os.close(fd)
        if not written:
            path.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return key, True


def _read_key_file(path: Path, size: int, if_lost: str) -> bytes:
    key = read_private_file(path, size + 1)
    if len(key) != size:
        raise DataDirError(f"{path} must hold exactly {size} bytes; {if_lost}")
    return key


def read_private_file(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file only its owner may read (no symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise DataDirError(f"cannot read {path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode):
            raise DataDirError(f"{path} is not a regular file")
        if mode & 0o077:
            raise DataDirError(f"{path} is accessible to other users (mode {mode:o}); chmod 600 it")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_CHECK_PERSON: Final = b"anonticket-kchk"
_IDEMPOTENCY_PERSON: Final = b"anonticket.idem"
_FINGERPRINT_PERSON: Final = b"anonticket.fp"
_PASS_PERSON: Final = b"anonticket.pass"


class Tagger:
    """Keyed BLAKE2b tags: equal inputs give equal tags, the key is needed to test a guess."""

    def __init__(self, key: bytes) -> None:
        if len(key) != SECRET_KEY_BYTES:
            raise ValueError("secret key must be 32 bytes")
        self._key = key

    def pid_tag(self, pid: bytes) -> bytes:
        return self._tag(pid, _PID_PERSON)

    def token_tag(self, token: bytes) -> bytes:
        return self._tag(token, _TOKEN_PERSON)

    def idempotency_tag(self, key: bytes) -> bytes:
        """An Idempotency-Key as stored: a service's keys may carry its own order numbers."""
        return self._tag(key, _IDEMPOTENCY_PERSON)

    def fingerprint(
        self, token_tag: bytes, amount: int, memo: str | None, extra: bytes = b""
    ) -> bytes:
        """What a repeated Idempotency-Key must repeat: the token, the amount, the memo, and
        what else the request carries (``extra``: the digest of a pass purchase's requests)."""
        memo_bytes = b"\xff" if memo is None else b"\x00" + memo.encode("utf-8")
        data = token_tag + amount.to_bytes(8, "big") + len(memo_bytes).to_bytes(4, "big")
        return self._tag(data + memo_bytes + extra, _FINGERPRINT_PERSON)

    def pass_tag(self, nonce: bytes, key_id: bytes) -> bytes:
        """A used pass as stored: its nonce under the key that issued it."""
        return self._tag(nonce + key_id, _PASS_PERSON)

    def key_check(self) -> bytes:
        """What the database keeps to recognise this key (anonticket.store.keycheck)."""
        return self._tag(b"anonticket secret.key check", _CHECK_PERSON)

    def _tag(self, data: bytes, person: bytes) -> bytes:
        # The same keyed BLAKE2b as libsodium's (pynacl's nacl.hash.blake2b; a test checks they
        # agree), without a cffi round trip: this runs on the reactor thread for every request.
        return hashlib.blake2b(data, digest_size=TAG_BYTES, key=self._key, person=person).digest()
