"""The monitor: turn the wallet's confirmed incoming transfers into redeemable payments.

Each poll (a LoopingCall on the injected clock) asks the operator's monero-wallet-rpc to
``refresh`` (its own auto-refresh runs only every 20 s), reads its height H, then reads
``get_transfers`` with ``in`` and ``pool`` over heights ``(lower, H]`` — ``min_height`` is
*exclusive* in monero-wallet-rpc — where ``lower`` is the stored cursor or the start of the
re-check window ``H - 2N``, whichever is lower.

* A transfer at height h is confirmed when ``H - h >= N`` (the wallet's own count); until then,
  and while it is in the pool, it is recorded as pending so redeem can answer 202.
* The cursor is the last height whose transfers are recorded as final; it is stored in the same
  transaction as the batch, so a crash means a re-read (harmless: rows are keyed by transfer
  identity), never a skipped block.
* Every poll re-reads the last 2N blocks and the pool: a credited transfer the wallet no longer
  reports is flagged (a metric and a log line), never credited twice.
* Coinbase, locked (``unlock_time != 0``), double-spent, all-zero-PID and malformed entries are
  skipped; dust and 64-hex legacy payment ids are recorded but never redeemable.  No entry can
  make a poll fail.
* A failing wallet (down, hung, HTTP errors, garbage) costs one log line and a metric per
  attempt; attempts back off exponentially with jitter (capped), the cursor does not move, and
  the rest of the daemon does not notice.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Generator, Mapping
from typing import Any, Final, Protocol

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from anonticket.metrics import Metrics
from anonticket.store import Store
from anonticket.store.records import PaymentStatus, RecordResult, Transfer
from anonticket.wallet import WalletClient, WalletError

# Heights per get_transfers call while catching up: bounds one answer's size and one
# transaction's length without slowing a catch-up much.
MAX_SPAN: Final = 1000
BACKOFF_CAP: Final = 300.0
STOP_GRACE: Final = 5.0
_SKIP_MEMORY: Final = 10_000

log = Logger()


class Wallet(Protocol):
    """What the monitor needs from monero-wallet-rpc (:class:`anonticket.wallet.WalletClient`)."""

    async def refresh(self) -> dict[str, Any]: ...

    async def get_height(self) -> int: ...

    async def get_transfers(self, min_height: int, max_height: int) -> list[dict[str, Any]]: ...


class Skip(str):
    """Why an entry is not recorded (a metric label)."""


def classify(
    entry: Mapping[str, Any], wallet_height: int, min_confirmations: int, min_amount: int
) -> Transfer | Skip:
    """One get_transfers entry → the Transfer to record, or why it is skipped.  Never raises."""
    try:
        return _classify(entry, wallet_height, min_confirmations, min_amount)
    except (KeyError, TypeError, ValueError, AttributeError):
        return Skip("malformed")


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("not a non-negative integer")
    return value


def _classify(
    entry: Mapping[str, Any], wallet_height: int, min_confirmations: int, min_amount: int
) -> Transfer | Skip:
    kind = entry.get("type")
    if kind == "block":
        return Skip("coinbase")
    if kind not in ("in", "pool"):
        return Skip("other_type")
    txid = bytes.fromhex(entry["txid"])
    if len(txid) != 32:
        return Skip("malformed")
    if entry.get("double_spend_seen"):
        return Skip("double_spend")
    if _int(entry.get("unlock_time", 0)) != 0:
        return Skip("locked")
    sub = entry.get("subaddr_index") or {}
    major, minor = _int(sub.get("major", 0)), _int(sub.get("minor", 0))
    amount = _int(entry["amount"])
    pid_text = entry.get("payment_id", "")
    if not isinstance(pid_text, str) or len(pid_text) not in (16, 64):
        return Skip("malformed")
    pid = bytes.fromhex(pid_text)
    if not any(pid):
        # Wallets put a dummy all-zero id on ordinary payments: anyone could "redeem" it.
        return Skip("no_payment_id")
    if kind == "pool":
        height, status = 0, PaymentStatus.PENDING
    else:
        height = _int(entry["height"])
        if height == 0 or height > wallet_height:
            return Skip("malformed")
        confirmed = wallet_height - height >= min_confirmations
        status = PaymentStatus.UNCLAIMED if confirmed else PaymentStatus.PENDING
    if len(pid) == 32:
        # Cleartext on chain: whoever watches the mempool could redeem it first.
        status = PaymentStatus.LEGACY
    elif amount < min_amount:
        status = PaymentStatus.DUST
    return Transfer(txid, major, minor, pid, amount, height, status)


class Monitor:
    """One poll of the wallet, and the state the rest of the daemon reads from it."""

    def __init__(
        self,
        store: Store,
        wallet: Wallet,
        metrics: Metrics,
        clock: IReactorTime,
        *,
        min_confirmations: int,
        min_amount: int,
        start_height: int,
        poll_interval: float,
    ) -> None:
        self._store = store
        self._wallet = wallet
        self.metrics = metrics
        self._clock = clock
        self._n = min_confirmations
        self._min_amount = min_amount
        self._start_height = start_height
        self.poll_interval = poll_interval
        self._last_success: float | None = None
        # Skipped entries are re-read on every poll of the window; count each once.
        self._skipped_seen: OrderedDict[tuple[str, Skip], None] = OrderedDict()

    def last_success(self) -> float | None:
        return self._last_success

    async def poll(self) -> None:
        """Read the wallet and record what it reports.  Raises on any failure (caller backs off)."""
        m = self.metrics
        started = self._clock.seconds()
        await self._timed("refresh", self._wallet.refresh())
        height = await self._timed("get_height", self._wallet.get_height())
        state = await self._store.monitor_state()
        cursor = state.cursor if state.cursor is not None else max(self._start_height - 1, 0)
        if cursor > height:
            log.warn(
                "the wallet's height {height} is below the stored cursor {cursor}: "
                "is it still syncing, or a different wallet?",
                height=height,
                cursor=cursor,
            )
        safe = height - self._n  # every height <= safe is confirmed
        window = max(0, height - 2 * self._n)  # re-check (window, height] and the pool
        lower = min(cursor, window)
        while True:
            upper = min(height, lower + MAX_SPAN)
            entries = await self._timed("get_transfers", self._wallet.get_transfers(lower, upper))
            transfers = self._classify_all(entries, height)
            final = upper == height
            cursor = max(cursor, min(upper, safe))
            result = await self._store.record_transfers(
                transfers,
                now=int(self._clock.seconds()),
                cursor=cursor,
                wallet_height=height,
                recheck_from=max(window, lower) if final else None,
            )
            self._count(result)
            if final:
                break
            lower = upper
        self._last_success = self._clock.seconds()
        m.wallet_height.set(height)
        m.monitor_cursor.set(cursor)
        m.monitor_lag.set(max(0, safe - cursor))
        m.monitor_last_success.set(self._last_success)
        m.monitor_poll_duration.observe(self._last_success - started)

    async def _timed(self, method: str, call: Any) -> Any:
        started = self._clock.seconds()
        try:
            return await call
        finally:
            self.metrics.wallet_rpc_duration.labels(method).observe(self._clock.seconds() - started)

    def _classify_all(self, entries: list[dict[str, Any]], height: int) -> list[Transfer]:
        transfers = []
        for entry in entries:
            outcome = classify(entry, height, self._n, self._min_amount)
            if isinstance(outcome, Transfer):
                transfers.append(outcome)
            else:
                self._count_skip(entry, outcome)
        return transfers

    def _count_skip(self, entry: Mapping[str, Any], reason: Skip) -> None:
        key = (str(entry.get("txid", "")) if isinstance(entry, Mapping) else "", reason)
        if key in self._skipped_seen:
            return
        self._skipped_seen[key] = None
        if len(self._skipped_seen) > _SKIP_MEMORY:
            self._skipped_seen.popitem(last=False)
        self.metrics.monitor_transfers.labels("skipped").inc()
        self.metrics.monitor_skipped.labels(str(reason)).inc()

    def _count(self, result: RecordResult) -> None:
        labels = {
            PaymentStatus.UNCLAIMED: "credited",
            PaymentStatus.PENDING: "pending",
            PaymentStatus.DUST: "dust",
            PaymentStatus.LEGACY: "legacy",
        }
        for status, count in result.changed.items():
            if status in labels:
                self.metrics.monitor_transfers.labels(labels[status]).inc(count)
        if result.flagged:
            self.metrics.monitor_flagged.inc(result.flagged)
            log.warn(
                "{count} credited transfers are no longer reported by the wallet (a reorg "
                "deeper than --min-confirmations?); flagged, not credited again",
                count=result.flagged,
            )
        if result.forgotten:
            log.info(
                "{count} pending transfers left the wallet's report (reorg or dropped from "
                "the pool); forgotten until seen again",
                count=result.forgotten,
            )


class WalletService(Service):
    """Owns the wallet client's persistent connections: closes them when the daemon stops."""

    name = "wallet"

    def __init__(self, wallet: WalletClient) -> None:
        self.wallet = wallet

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return ensureDeferred(self.wallet.close())


class MonitorService(Service):
    """Runs :meth:`Monitor.poll` every poll interval; a failed poll backs off, never stops."""

    name = "monitor"

    def __init__(self, monitor: Monitor, clock: IReactorTime, rng: random.Random | None = None):
        self.monitor = monitor
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[LoopingCall] | None = None
        self._current: Deferred[None] | None = None
        self._failures = 0
        self._not_before = 0.0

    @property
    def poll_interval(self) -> float:
        return self.monitor.poll_interval

    def last_success(self) -> float | None:
        return self.monitor.last_success()

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop_done = self._loop.start(self.monitor.poll_interval, now=True)
        log.info(
            "monitor started: polling the wallet every {interval}s", interval=self.poll_interval
        )

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.stop()
        # A poll in flight gets a few seconds to finish its batch, then is cancelled (a batch
        # is one transaction: cancelling never leaves half of it behind).
        done, current = self._loop_done, self._current
        assert done is not None
        if current is not None:
            timer = self._clock.callLater(STOP_GRACE, current.cancel)
            try:
                yield done
            finally:
                if timer.active():
                    timer.cancel()
        else:
            yield done
        log.info("monitor stopped")

    def _tick(self) -> Deferred[None] | None:
        if self._clock.seconds() < self._not_before:
            return None
        d: Deferred[None] = ensureDeferred(self.monitor.poll())
        d.addCallbacks(self._succeeded, self._failed)
        self._current = d

        def forget(result: None) -> None:
            self._current = None

        d.addBoth(forget)
        return d

    def _succeeded(self, _: None) -> None:
        self.monitor.metrics.monitor_polls.labels("ok").inc()
        if self._failures:
            log.info("wallet poll succeeded after {count} failures", count=self._failures)
        self._failures = 0
        self._not_before = 0.0

    def _failed(self, failure: Any) -> None:
        if failure.check(CancelledError) and not self.running:
            return  # stopping
        self._failures += 1
        ceiling = min(BACKOFF_CAP, self.poll_interval * 2**self._failures)
        delay = self._rng.uniform(self.poll_interval, max(self.poll_interval, ceiling))
        self._not_before = self._clock.seconds() + delay
        error = failure.value
        outcome: str
        if isinstance(error, WalletError):
            outcome, detail = error.kind, str(error)
        elif failure.check(CancelledError):
            outcome, detail = "cancelled", "poll cancelled"
        else:
            # A store failure or a bug: the type is enough to act on and carries no data.
            outcome, detail = "error", type(error).__name__
        self.monitor.metrics.monitor_polls.labels(outcome).inc()
        log.warn(
            "wallet poll failed ({outcome}): {detail}; next attempt in {delay:.0f}s",
            outcome=outcome,
            detail=detail,
            delay=delay,
        )
