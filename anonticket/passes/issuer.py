"""The issuer's keys and the two things it does with them: evaluate a blinded request (issuance)
and recompute a token's authenticator (verification).

The VOPRF is RFC 9497's P384-SHA384 from the ``voprf`` package (Rust's ``voprf`` crate; its
RFC 9497 test vectors pass in tests/test_passes.py).  Keys are derived, never stored one by one:
the key of period *n* (of ``--pass-key-lifetime`` seconds) is RFC 9497 DeriveKeyPair(seed,
info + " #n"), so every node with the same ``pass.key`` has the same keys at the same time, and
rotation needs no coordination.  Issuance uses the current period's key; verification accepts it
and the previous one (the grace period: a pass bought just before a rotation still works).
With a lifetime of 0 the key is DeriveKeyPair(seed, info) itself and never rotates.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from voprf import p384

from anonticket.keys import DataDirError, load_or_create_key_file, read_private_file
from anonticket.passes.wire import WireError, token_key_id

KEY_FILE: Final = "pass.key"
DEFAULT_INFO: Final = "anonticket pass key"
_SEED_BYTES: Final = 32  # what the voprf package's DeriveKeyPair takes


def valid_point(blinded: bytes) -> bool:
    """Whether ``blinded`` is a compressed point of P-384 the evaluator accepts."""
    try:
        point = p384.BlindedInput.deserialize(blinded)
    except Exception:  # the library raises its own ValueError subclasses
        return False
    # voprf 0.2 accepts some non-canonical prefixes (0x05 for 0x03/0x02: it keeps the low bit);
    # only the one encoding of a point is taken, as RFC 9497's DeserializeElement requires.
    return bool(point.serialize() == blinded)


@dataclass(frozen=True)
class IssuerKey:
    period: int
    not_before: int | None  # when the key became current (None: it never rotates)
    public_key: bytes  # 49 bytes, compressed
    key_id: bytes  # SHA-256 of public_key
    evaluator: p384.Evaluator

    @property
    def truncated_key_id(self) -> int:
        return self.key_id[-1]

    def evaluate(self, blinded: bytes) -> bytes:
        """A TokenResponse for one blinded element: evaluate_msg | evaluate_proof (the voprf
        package serializes the proof first: reordered here)."""
        if not valid_point(blinded):
            raise WireError("blinded_msg is not a point of P-384")
        element = p384.BlindedInput.deserialize(blinded)
        output = self.evaluator.evaluate(element).serialize()
        proof, evaluated = output[:96], output[96:]
        return evaluated + proof

    def verifies(self, token_input: bytes, authenticator: bytes) -> bool:
        expected = self.evaluator.evaluate_known_input(token_input)
        return hmac.compare_digest(expected, authenticator)


class IssuerKeys:
    def __init__(self, seed: bytes, info: str, lifetime: int) -> None:
        if len(seed) != _SEED_BYTES:
            raise ValueError(f"the pass key seed must be {_SEED_BYTES} bytes")
        self._seed = seed
        self._info = info
        self.lifetime = lifetime
        self._cache: OrderedDict[int, IssuerKey] = OrderedDict()

    def _period(self, now: float) -> int:
        return 0 if self.lifetime == 0 else int(now) // self.lifetime

    def key(self, period: int) -> IssuerKey:
        known = self._cache.get(period)
        if known is not None:
            return known
        info = self._info if self.lifetime == 0 else f"{self._info} #{period}"
        evaluator = p384.Evaluator.from_seed(self._seed, info.encode("utf-8"))
        public = evaluator.public_key.serialize()
        key = IssuerKey(
            period,
            None if self.lifetime == 0 else period * self.lifetime,
            public,
            token_key_id(public),
            evaluator,
        )
        self._cache[period] = key
        while len(self._cache) > 4:  # the current, the previous, and a spare
            self._cache.popitem(last=False)
        return key

    def current(self, now: float) -> IssuerKey:
        return self.key(self._period(now))

    def accepted(self, now: float) -> list[IssuerKey]:
        """The keys a pass may verify under now: the current one and, in its grace period,
        the previous one."""
        period = self._period(now)
        if self.lifetime == 0 or period == 0:
            return [self.key(period)]
        return [self.key(period), self.key(period - 1)]


def load_keys(data_dir: Path, key_file: Path | None, lifetime: int) -> IssuerKeys:
    """The issuer's keys from ``--pass-key-file`` or ``<data-dir>/pass.key`` (made at first
    start, 0600).  Either is JSON: ``{"seed": "<64 hex>", "info": "<text>"}``."""
    if key_file is None:
        template = json.dumps({"seed": "0" * 64, "info": DEFAULT_INFO})
        raw, _ = load_or_create_key_file(
            data_dir / KEY_FILE,
            lambda: json.dumps({"seed": secrets.token_hex(32), "info": DEFAULT_INFO}).encode(),
            size=len(template),
            if_lost="restore it from backup: every pass issued with it stops verifying without it",
        )
        path = data_dir / KEY_FILE
    else:
        path = key_file
        raw = read_private_file(key_file, 4096)
    return _parse(path, raw, lifetime)


def _parse(path: Path, raw: bytes, lifetime: int) -> IssuerKeys:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        value = None
    if isinstance(value, dict) and "sk" in value:
        raise DataDirError(
            f"{path}: a raw scalar (sk) cannot be loaded: the voprf library derives every key "
            'with RFC 9497 DeriveKeyPair; give {"seed": "<64 hex>", "info": "<text>"}'
        )
    seed_hex = value.get("seed") if isinstance(value, dict) else None
    info = value.get("info") if isinstance(value, dict) else None
    try:
        seed = bytes.fromhex(seed_hex) if isinstance(seed_hex, str) and seed_hex.isascii() else b""
    except ValueError:
        seed = b""
    if len(seed) != _SEED_BYTES or not isinstance(info, str) or len(info) > 1000:
        raise DataDirError(
            f'{path}: expected JSON {{"seed": "<{2 * _SEED_BYTES} hex>", "info": "<text>"}}'
        )
    return IssuerKeys(seed, info, lifetime)
