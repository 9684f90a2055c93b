"""The onion's key, the address derived from it, and ``anonticket-onion-address``.

``<data-dir>/onion.key`` holds a 32-byte Ed25519 seed (0600), so the ``.onion`` is known before
tor runs and stays the same across restarts and across tors.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import nacl.signing

from anonticket.keys import DataDirError, fsync_dir, load_or_create_key_file

__all__ = [
    "HOSTNAME_FILE",
    "ONION_KEY_FILE",
    "SEED_BYTES",
    "add_onion_key_blob",
    "load_or_create",
    "load_or_create_onion_key",
    "onion_address",
    "print_address_main",
    "write_hostname",
]

ONION_KEY_FILE: Final = "onion.key"
HOSTNAME_FILE: Final = "onion_hostname"
SEED_BYTES: Final = 32
_VERSION: Final = b"\x03"


def load_or_create_onion_key(data_dir: Path) -> bytes:
    """The 32-byte Ed25519 seed in ``<data-dir>/onion.key``, made (0600, fsynced) if missing."""
    return load_or_create(data_dir)[0]


def load_or_create(data_dir: Path) -> tuple[bytes, bool]:
    """The seed, and whether it was made just now."""
    return load_or_create_key_file(
        data_dir / ONION_KEY_FILE,
        lambda: bytes(nacl.signing.SigningKey.generate()),
        size=SEED_BYTES,
        # Whoever read it can impersonate the onion service; a new one is a new address.
        if_lost="restore it from backup, or move it away to get a new .onion address",
    )


def onion_address(seed: bytes) -> str:
    """The v3 ``.onion`` address of the key made from *seed* (rend-spec-v3, "encoding onion")."""
    pub = bytes(nacl.signing.SigningKey(seed).verify_key)
    checksum = hashlib.sha3_256(b".onion checksum" + pub + _VERSION).digest()[:2]
    return base64.b32encode(pub + checksum + _VERSION).decode("ascii").lower() + ".onion"


def add_onion_key_blob(seed: bytes) -> str:
    """ADD_ONION's ``ED25519-V3:`` key: the expanded secret key (clamped SHA-512 of the seed)."""
    if len(seed) != SEED_BYTES:
        raise ValueError("an Ed25519 seed is 32 bytes")
    h = bytearray(hashlib.sha512(seed).digest())
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    return "ED25519-V3:" + base64.b64encode(bytes(h)).decode("ascii")


def write_hostname(data_dir: Path, address: str) -> None:
    """``<data-dir>/onion_hostname``, replaced atomically (0644): readers never see a
    half-written address."""
    path = data_dir / HOSTNAME_FILE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(address + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


# -- the admin command ----------------------------------------------------------------------


def print_address_main(argv: Sequence[str] | None = None) -> None:
    """``anonticket-onion-address``: print the .onion address from the data directory's key.

    It never makes a key unasked (an operator checking the address of a restored data
    directory must not get a new one); with ``--create`` it makes a missing one, in an existing
    data directory, owned by that directory's owner, so a key made by root for the daemon's
    user is one the daemon can read."""
    env = os.environ.get("ANONTICKET_DATA_DIR", "").strip()
    parser = argparse.ArgumentParser(
        prog="anonticket-onion-address",
        description="Print the .onion address of the public site from <data-dir>/onion.key. "
        "Tor is not needed. The daemon makes the key at its first start; --create makes it now.",
    )
    parser.add_argument(
        "--data-dir",
        default=env or "./anonticket-data",
        help="data directory (env ANONTICKET_DATA_DIR; default ./anonticket-data)",
    )
    parser.add_argument(
        "--create",
        action="store_true",
        help="make the key if the data directory has none (owned by the directory's owner)",
    )
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir.strip() or "./anonticket-data")
    key = data_dir / ONION_KEY_FILE
    try:
        if not os.path.lexists(key):
            if not args.create:
                raise DataDirError(
                    f"no onion key in {data_dir} yet: the daemon makes it at its first start, "
                    "--create makes it now (or restore onion.key from backup)"
                )
            if not data_dir.is_dir():
                raise DataDirError(
                    f"{data_dir} does not exist: create it as the daemon's user first "
                    "(or start the daemon once)"
                )
        seed, created = load_or_create(data_dir)
        if created:
            _give_to_directory_owner(key, data_dir)
    except DataDirError as e:
        raise SystemExit(f"anonticket-onion-address: {e}") from None
    if created:
        print(
            f"created a new onion key in {key}; back it up: it is the address",
            file=sys.stderr,
        )
    print(onion_address(seed))


def _give_to_directory_owner(key: Path, data_dir: Path) -> None:
    """Run as root for a daemon that runs as another user: the key must be that user's."""
    owner = data_dir.stat()
    if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
        os.chown(key, owner.st_uid, owner.st_gid, follow_symlinks=False)
