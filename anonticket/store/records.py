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


class LedgerKind(IntEnum):
    """A ledger entry's kind, stored as a small integer; the numbers are part of the schema."""

    CREDIT = 0  # reserved for the ledger of credits and spends
    SPEND = 1  # reserved
    REVERSAL = 2  # a claimed transfer the chain took back: its amount left the balance
    RESTORATION = 3  # the same transfer confirmed again: its amount is back


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
    # Mined with enough confirmations, whatever the status says: a dust or legacy status comes
    # from the amount or the id, and a wallet has reported a credited transfer back in the pool
    # with amount 0 - the stored row follows this, never the report's amount.  None: as the
    # status says (unclaimed = confirmed).
    confirmed: bool | None = None

    @property
    def is_confirmed(self) -> bool:
        return self.status == PaymentStatus.UNCLAIMED if self.confirmed is None else self.confirmed

    def __repr__(self) -> str:
        # Never let a PID or an amount reach a log line through a repr.
        return f"Transfer(status={self.status.name})"


@dataclass(frozen=True, slots=True)
class Redeemed:
    token: ServiceToken
    balance: int
    first_claim: bool  # True for the claim that issued the token ("success")
    topped_up: bool = False  # this redeem added later payments to an existing token
    token_status: str = "active"  # the token's status after it: active, revoked or suspended


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
class Overloaded:
    """Not asked: too many operations wait on the database (``--admission-limit``)."""


def status_of(balance: int, revoked: bool, reversed_amount: int) -> str:
    """``revoked``; ``suspended`` while a reversal has taken the balance to zero or below
    (until the money is back, or a payment covers it); else ``active``."""
    if revoked:
        return "revoked"
    if balance < 0 or (reversed_amount > 0 and balance <= 0):
        return "suspended"
    return "active"


@dataclass(frozen=True, slots=True)
class TokenRecord:
    balance: int
    issued_at: int
    revoked_at: int | None
    revoke_reason: str | None
    abuse_score: int
    reversed: int = 0  # reversed and not restored

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def status(self) -> str:
        return status_of(self.balance, self.revoked_at is not None, self.reversed)


@dataclass(frozen=True, slots=True)
class RecordResult:
    """What a batch changed: rows that entered each status; credited transfers reversed and
    reversed ones restored, by claim state (``claimed``/``unclaimed``); pending rows forgotten
    because the wallet dropped them; and the tags whose in-memory answers are now stale."""

    changed: dict[PaymentStatus, int] = field(default_factory=dict)
    reversed: dict[str, int] = field(default_factory=dict)
    restored: dict[str, int] = field(default_factory=dict)
    forgotten: int = 0
    stale_pids: list[bytes] = field(default_factory=list)  # PID tags
    stale_tokens: list[bytes] = field(default_factory=list)  # token tags


@dataclass(frozen=True, slots=True)
class MonitorState:
    cursor: int | None
    wallet_height: int | None  # as the wallet last reported it (not necessarily trusted)
    trusted_height: int | None = None  # what the monitor acted on at that poll
    sweep: int | None = None  # where the background sweep of older heights goes on from
