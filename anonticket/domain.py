"""Domain values: payment IDs, service tokens and the token derivation.

Raw strings from the network enter the domain only through :meth:`PaymentId.parse` and
:meth:`ServiceToken.parse` ("parse, don't validate"): whoever holds one of these values holds a
canonical, valid one, so handlers and the store never pass strings around.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

PID_HEX_LENGTH: Final = 16
LEGACY_PID_HEX_LENGTH: Final = 64
TOKEN_HEX_LENGTH: Final = 64

_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")


class DomainError(ValueError):
    """A value from outside failed to parse.

    ``code`` is a stable machine-readable code and ``str(error)`` a stable human message; both are
    safe to show a client because neither echoes the input.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidPaymentId(DomainError):
    def __init__(self, message: str) -> None:
        super().__init__("invalid_pid", message)


class InvalidToken(DomainError):
    def __init__(self, message: str) -> None:
        super().__init__("invalid_token", message)


PID_WRONG_LENGTH: Final = "invalid payment id: payment id must be exactly 16 hex characters"
PID_NON_HEX: Final = "invalid payment id: payment id contains non-hex characters"
PID_ALL_ZERO: Final = (
    "invalid payment id: 0000000000000000 means 'no payment id' to Monero wallets and is never "
    "redeemable"
)
PID_LEGACY: Final = (
    "invalid payment id: 64-hex legacy payment ids are public on chain and never redeemable; "
    "pay to an integrated address built from a 16-hex payment id"
)
PID_NOT_TEXT: Final = "invalid payment id: payment id must be a string"
TOKEN_WRONG_LENGTH: Final = "invalid token: service token must be exactly 64 hex characters"
TOKEN_NON_HEX: Final = "invalid token: service token contains non-hex characters"


def _is_hex(text: str) -> bool:
    # str.isascii() first: int(x, 16) and bytes.fromhex accept some non-ASCII digits and spaces.
    return text.isascii() and all(c in _HEX_DIGITS for c in text)


@dataclass(frozen=True, slots=True)
class PaymentId:
    """The 8-byte payment ID of an integrated address (encrypted on chain)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != PID_HEX_LENGTH // 2:
            raise InvalidPaymentId(PID_WRONG_LENGTH)
        if not any(self.raw):
            raise InvalidPaymentId(PID_ALL_ZERO)

    @classmethod
    def parse(cls, text: object) -> PaymentId:
        """Parse client input: 16 hex characters, any case, not all zero."""
        if not isinstance(text, str):
            raise InvalidPaymentId(PID_NOT_TEXT)
        if len(text) == LEGACY_PID_HEX_LENGTH and _is_hex(text):
            raise InvalidPaymentId(PID_LEGACY)
        if len(text) != PID_HEX_LENGTH:
            raise InvalidPaymentId(PID_WRONG_LENGTH)
        if not _is_hex(text):
            raise InvalidPaymentId(PID_NON_HEX)
        return cls(bytes.fromhex(text))

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def __repr__(self) -> str:
        # A PID is a bearer secret until it is redeemed: keep it out of reprs (and so of logs).
        return "PaymentId(<redacted>)"


@dataclass(frozen=True, slots=True)
class ServiceToken:
    """A 32-byte service token, shown to clients as 64 lowercase hex characters."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != TOKEN_HEX_LENGTH // 2:
            raise InvalidToken(TOKEN_WRONG_LENGTH)

    @classmethod
    def parse(cls, text: object) -> ServiceToken:
        if not isinstance(text, str) or len(text) != TOKEN_HEX_LENGTH:
            raise InvalidToken(TOKEN_WRONG_LENGTH)
        if not _is_hex(text):
            raise InvalidToken(TOKEN_NON_HEX)
        return cls(bytes.fromhex(text))

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ServiceToken):
            return NotImplemented
        return hmac.compare_digest(self.raw, other.raw)

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return "ServiceToken(<redacted>)"


def derive_service_token(pid: PaymentId, txid_hex: str) -> ServiceToken:
    """``SHA3-256(ascii(pid_hex) + "|" + ascii(txid_hex))``: the token of the PID's first payment.

    Deterministic, so a retried redeem (a dropped Tor circuit) always yields the same token, and
    the store need not keep the token itself, only a keyed tag of it.
    """
    digest = hashlib.sha3_256(f"{pid.hex}|{txid_hex.lower()}".encode("ascii")).digest()
    return ServiceToken(digest)
