"""Plain values that cross the store's boundary (no SQL here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from anonticket.domain import ServiceToken


class PaymentStatus(IntEnum):
    """Stored as a small integer; the numbers are part of the schema."""

    PENDING = 0  # seen (pool or mined) without enough confirmations
    UNCLAIMED = 1  # confirmed and redeemable
    CLAIMED = 2  # credited to the PID's token
    DUST = 3  # below --min-amount: recorded, never redeemable
    LEGACY = 4  # 64-hex cleartext payment id: recorded, never redeemable


@dataclass(frozen=True, slots=True)
class Transfer:
    """One incoming transfer as the monitor records it."""

    txid: bytes  # 32 bytes
    subaddr_major: int
    subaddr_minor: int
    pid: bytes  # 8 bytes, or 32 for a legacy payment id
    amount: int
    height: int  # 0 while in the pool
    status: PaymentStatus

    def __repr__(self) -> str:
        # Never let a PID or an amount reach a log line through a repr.
        return f"Transfer(status={self.status.name})"


@dataclass(frozen=True, slots=True)
class Redeemed:
    token: ServiceToken
    balance: int
    first_claim: bool  # True for the claim that issued the token ("success")
    topped_up: bool = False  # this redeem added later payments to an existing token


@dataclass(frozen=True, slots=True)
class Pending:
    height: int  # highest block height among the PID's pending payments; 0 = only in the pool
    wallet_height: int | None  # the wallet's height at the last poll, if any


@dataclass(frozen=True, slots=True)
class BelowMinimum:
    """Every payment to this PID was dust."""


@dataclass(frozen=True, slots=True)
class NotFound:
    pass


RedeemResult = Redeemed | Pending | BelowMinimum | NotFound


@dataclass(frozen=True, slots=True)
class TokenRecord:
    balance: int
    issued_at: int
    revoked_at: int | None
    revoke_reason: str | None
    abuse_score: int

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class RecordResult:
    """What a batch changed: rows that entered each status, credited rows flagged as gone
    from the wallet, and pending rows forgotten because the wallet dropped them."""

    changed: dict[PaymentStatus, int] = field(default_factory=dict)
    flagged: int = 0
    forgotten: int = 0


@dataclass(frozen=True, slots=True)
class MonitorState:
    cursor: int | None
    wallet_height: int | None
