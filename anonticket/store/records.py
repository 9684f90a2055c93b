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

    CREDIT = 0  # a claimed payment (at the first redeem or a top-up)
    SPEND = 1  # the service took this much (POST /api/v1/token/{token}/spend)
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
    version: int = 1  # grows by one with every change of the token
    spent: int = 0  # what spends took

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def credited(self) -> int:
        """Every claimed payment: the balance with spends and unrestored reversals added back."""
        return self.balance + self.spent + self.reversed

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


class SpendOutcome(IntEnum):
    """What a spend did, stored with its Idempotency-Key; the numbers are part of the schema."""

    SPENT = 0
    INSUFFICIENT_BALANCE = 1
    TOKEN_REVOKED = 2
    TOKEN_SUSPENDED = 3


@dataclass(frozen=True, slots=True)
class SpendRequest:
    """One spend as the service asked for it; ``key`` is the Idempotency-Key, ``if_match`` the
    version the service expects (None: whatever it is now)."""

    token: ServiceToken
    amount: int
    memo: str | None
    key: bytes
    if_match: int | None = None
    extra: bytes = b""  # what else a repeated key must repeat (a pass purchase's requests)

    def __repr__(self) -> str:
        # Never let a token, key, amount or memo reach a log line through a repr.
        return "SpendRequest()"


@dataclass(frozen=True, slots=True)
class SpendAnswer:
    """A spend's answer, remembered under its key: the token's balance and version after it
    (as they were, for a refusal), the spend's id when it was made.  ``replayed``: given again
    for a repeated key, not made now."""

    outcome: SpendOutcome
    balance: int
    version: int
    spend_id: str | None = None
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class VersionMismatch:
    """If-Match named another version than the token has (not remembered)."""

    version: int
    balance: int


@dataclass(frozen=True, slots=True)
class KeyReused:
    """The Idempotency-Key was used before for another token, amount or memo."""


@dataclass(frozen=True, slots=True)
class KeyInUse:
    """A request with this Idempotency-Key is still being answered."""


SpendResult = SpendAnswer | VersionMismatch | KeyReused | KeyInUse | NotFound


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: int
    kind: LedgerKind
    amount: int
    at: int
    spend_id: str | None = None
    memo: str | None = None
