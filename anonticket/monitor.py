"""The monitor: turn the wallet's confirmed incoming transfers into redeemable payments, and
take back what the chain takes back.

Each poll (a LoopingCall on the injected clock) asks the operator's monero-wallet-rpc to
``refresh`` (its own auto-refresh runs only every 20 s), reads its height, and reads
``get_transfers`` over height spans (``min_height`` is *exclusive* in monero-wallet-rpc): a
bounded catch-up above the cursor, the re-check window and the pool, and one span of a
background sweep of older heights (see :meth:`Monitor.poll`; rules in docs/monitor.md).

* The height is checked, not trusted: the monitor acts on the lower of this poll's and the
  previous poll's report (:func:`check_height`).
* A transfer at height h is confirmed when ``T - h >= N``; until then, and while it is in the
  pool, it is recorded as pending so redeem can answer 202.
* The cursor is the last height whose transfers are recorded as final; it is stored in the same
  transaction as the read that reached it, so a crash means a re-read (harmless: rows are keyed
  by transfer identity), never a skipped block.
* A credited transfer the window's report has back in the pool, unconfirmed or not at all is
  reversed (taken off its token, or no longer redeemable) and restored when confirmed again.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from anonticket.metrics import Metrics
from anonticket.store import Store
from anonticket.store.records import PaymentStatus, RecordResult, Transfer
from anonticket.wallet import WalletClient, WalletError

# Heights per get_transfers call while catching up or sweeping: bounds one answer's size and
# one transaction's length without slowing a catch-up much.  An answer over the wallet client's
# entry limit is read again in halves.
MAX_SPAN: Final = 1000
# Catch-up spans per poll: a poll's work stays bounded whatever height the wallet claims.
CATCHUP_SPANS: Final = 20
# Entries classified per reactor turn (each takes a few microseconds).
CLASSIFY_SLICE: Final = 1000
# The sweep aims at about this many entries a poll: its span (at most MAX_SPAN blocks) halves
# after a fuller read and doubles after an emptier one, so a wallet with a million transfers
# costs a few milliseconds a poll, not a full span of them.
SWEEP_ENTRIES: Final = 1000
BACKOFF_CAP: Final = 300.0
STOP_GRACE: Final = 5.0
_SKIP_MEMORY: Final = 10_000

log = Logger()


class Wallet(Protocol):
    """What the monitor needs from monero-wallet-rpc (:class:`anonticket.wallet.WalletClient`)."""

    async def refresh(self) -> dict[str, Any]: ...

    async def get_height(self) -> int: ...

    async def get_transfers(
        self, min_height: int, max_height: int, *, pool: bool = True
    ) -> list[dict[str, Any]]: ...

    async def identify(self) -> str: ...


class Skip(str):
    """Why an entry is not recorded (a metric label)."""


def classify(
    entry: Mapping[str, Any],
    wallet_height: int,
    min_confirmations: int,
    min_amount: int,
    *,
    reported: int | None = None,
) -> Transfer | Skip:
    """One get_transfers entry → the Transfer to record, or why it is skipped.  Never raises.

    ``wallet_height`` is the height confirmations are counted from (the trusted one);
    ``reported``, if higher, the wallet's own: a mined entry above it is malformed, one between
    the two is pending."""
    try:
        ceiling = wallet_height if reported is None else max(wallet_height, reported)
        return _classify(entry, wallet_height, ceiling, min_confirmations, min_amount)
    except (KeyError, TypeError, ValueError, AttributeError):
        return Skip("malformed")


def _non_negative(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("not a non-negative integer")
    return value


def _classify(
    entry: Mapping[str, Any],
    wallet_height: int,
    ceiling: int,
    min_confirmations: int,
    min_amount: int,
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
    if _non_negative(entry.get("unlock_time", 0)) != 0:
        return Skip("locked")
    sub = entry.get("subaddr_index") or {}
    major, minor = _non_negative(sub.get("major", 0)), _non_negative(sub.get("minor", 0))
    amount = _non_negative(entry["amount"])
    pid_text = entry.get("payment_id", "")
    if not isinstance(pid_text, str) or len(pid_text) not in (16, 64):
        return Skip("malformed")
    pid = bytes.fromhex(pid_text)
    if not any(pid):
        # Wallets put a dummy all-zero id on ordinary payments: anyone could "redeem" it.
        return Skip("no_payment_id")
    confirmed = False
    if kind == "pool":
        height, status = 0, PaymentStatus.PENDING
    else:
        height = _non_negative(entry["height"])
        if height == 0 or height > ceiling:
            return Skip("malformed")
        # Above the trusted height (read ahead of it) is not confirmed yet.
        confirmed = wallet_height - height >= min_confirmations
        status = PaymentStatus.UNCLAIMED if confirmed else PaymentStatus.PENDING
    if len(pid) == 32:
        # Cleartext on chain: whoever watches the mempool could redeem it first.
        status = PaymentStatus.LEGACY
    elif amount < min_amount:
        status = PaymentStatus.DUST
    return Transfer(txid, major, minor, pid, amount, height, status, confirmed)


@dataclass(frozen=True, slots=True)
class Heights:
    """What one poll makes of the wallet's height."""

    reported: int  # what get_height answered
    trusted: int  # what the monitor acts on: never above the previous poll's report
    note: str | None  # why the reported height was not taken as it is, if it was not


def check_height(reported: int, previous: int | None, trusted: int | None = None) -> Heights:
    """Trust a height only once two polls in a row have seen it.

    A wallet's height decides what is confirmed and how far the cursor moves, so one wrong
    answer must not credit an unconfirmed transfer or move the cursor past unread blocks: the
    monitor acts on the lower of this poll's and the previous poll's report.  A rise is
    believed one poll later (one poll interval of latency); a one-off spike is never believed;
    a height that goes backwards is believed at once (the cursor goes back with it, see
    :meth:`Monitor.poll`), since re-reading blocks costs time but never money.

    ``previous`` is the previous poll's report, ``trusted`` what it acted on (a fall back to
    it after a spike is no news).
    """
    if previous is None or reported == previous:
        return Heights(reported, reported, None)
    if reported < previous:
        if reported >= (previous if trusted is None else trusted):
            return Heights(reported, reported, None)
        return Heights(
            reported,
            reported,
            f"the wallet's height went back from {trusted or previous} to {reported} (a "
            "rescan, a restored or replaced wallet, or a wrong answer): re-reading from there",
        )
    note = None
    if reported - previous > MAX_SPAN:
        note = (
            f"the wallet's height rose from {previous} to {reported} in one poll: not "
            "trusted until the next poll reports it again"
        )
    return Heights(reported, previous, note)


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
        turn: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        """``turn`` gives the reactor a turn between slices of work (default: a call on
        ``clock`` after 0 s; tests driving the poll schedule with a Clock pass the reactor's)."""
        self._store = store
        self._wallet = wallet
        self.metrics = metrics
        self._clock = clock
        self._n = min_confirmations
        self._min_amount = min_amount
        self._floor = max(start_height - 1, 0)  # min_height is exclusive: start_height is read
        self.poll_interval = poll_interval
        self._last_success: float | None = None
        self._height_note: str | None = None
        self._trusted: int | None = None
        self._sweep_span = MAX_SPAN
        self._turn = turn or (lambda: deferLater(clock, 0, lambda: None))
        # Skipped entries are re-read on every poll of the window; count each once.
        self._skipped_seen: OrderedDict[tuple[str, Skip], None] = OrderedDict()

    @property
    def wallet(self) -> Wallet:
        return self._wallet

    def last_success(self) -> float | None:
        return self._last_success

    def height_note(self) -> str | None:
        """Why the last poll did not take the wallet's height as reported (for /healthz)."""
        return self._height_note

    def trusted_height(self) -> int | None:
        """The height the last successful poll acted on (None before the first)."""
        return self._trusted

    async def poll(self) -> None:
        """Read the wallet and record what it reports.  Raises on any failure (caller backs off).

        Three reads, each recorded in its own transaction with the state it reached:

        1. catch-up: heights above the cursor and below the re-check window, at most
           :data:`CATCHUP_SPANS` spans of :data:`MAX_SPAN` blocks a poll;
        2. the re-check window ``(T - 2N, T]`` (T the trusted height, so anchored at the lower
           of the previous and the current tip) plus up to one span read ahead, and the pool:
           the complete report of those heights, so a credited transfer missing from it is
           reversed whatever the new tip's height;
        3. the sweep: one span of older heights, going round from ``--start-height`` to the
           window, so a transfer the wallet reports late (a rescan, a restored or replaced
           wallet) is credited within one round.
        """
        m = self.metrics
        started = self._clock.seconds()
        await self._timed("refresh", self._wallet.refresh())
        reported = await self._timed("get_height", self._wallet.get_height())
        state = await self._store.monitor_state()
        heights = check_height(reported, state.wallet_height, state.trusted_height)
        self._note(heights)
        trusted = heights.trusted
        safe = trusted - self._n  # every height <= safe is confirmed
        window = max(self._floor, trusted - 2 * self._n)
        cursor = self._floor if state.cursor is None else state.cursor
        if cursor > max(safe, self._floor):
            # The wallet is behind the cursor (rescanning, restored, replaced): what it has not
            # scanned again is not final any more, so read it again as it comes back.
            cursor = max(safe, self._floor)
        # 1. catch-up
        lower, spans = cursor, 0
        while lower < window and spans < CATCHUP_SPANS:
            upper = min(window, lower + MAX_SPAN)
            entries = await self._read(lower, upper, pool=False)
            cursor = max(cursor, min(upper, safe))
            await self._record(entries, heights, cursor=cursor)
            lower, spans = upper, spans + 1
        # 2. the window, the pool and a little ahead
        top = min(reported, trusted + MAX_SPAN)
        entries = await self._read(window, top, pool=True)
        if lower >= window:  # caught up: the cursor follows the confirmed heights
            cursor = max(cursor, safe)
        await self._record(
            entries,
            heights,
            cursor=cursor,
            wallet_height=reported,
            trusted_height=trusted,
            recheck=(window, top),
        )
        # 3. the sweep
        sweep = self._floor if state.sweep is None else state.sweep
        if lower >= window:
            sweep = min(max(sweep, self._floor), window)
            if sweep < window:
                upper = min(window, sweep + self._sweep_span)
                entries = await self._read(sweep, upper, pool=False)
                if len(entries) > SWEEP_ENTRIES:
                    self._sweep_span = max(1, self._sweep_span // 2)
                elif len(entries) < SWEEP_ENTRIES // 4:
                    self._sweep_span = min(MAX_SPAN, self._sweep_span * 2)
                # Round again from the start once the window is reached.
                await self._record(entries, heights, sweep=upper if upper < window else self._floor)
        self._last_success = self._clock.seconds()
        self._trusted = trusted
        m.wallet_height.set(reported)
        m.monitor_cursor.set(cursor)
        m.monitor_lag.set(max(0, safe - cursor))
        m.monitor_last_success.set(self._last_success)
        m.monitor_poll_duration.observe(self._last_success - started)

    def _note(self, heights: Heights) -> None:
        if heights.note is not None:
            reason = "backwards" if heights.trusted == heights.reported else "jump"
            self.metrics.monitor_height_refusals.labels(reason).inc()
            if heights.note != self._height_note:
                log.warn("{note}", note=heights.note)
        self._height_note = heights.note

    async def _read(self, lower: int, upper: int, *, pool: bool) -> list[dict[str, Any]]:
        """get_transfers for heights ``(lower, upper]``; an answer over the wallet client's entry
        limit is read again in two halves, down to one block."""
        try:
            result: list[dict[str, Any]] = await self._timed(
                "get_transfers", self._wallet.get_transfers(lower, upper, pool=pool)
            )
            return result
        except WalletError as error:
            if error.kind != "too_large" or upper - lower < 2:
                raise
        middle = lower + (upper - lower) // 2
        log.info(
            "the wallet's answer for heights ({lower}, {upper}] was too large: reading it in "
            "two halves",
            lower=lower,
            upper=upper,
        )
        return await self._read(lower, middle, pool=pool) + await self._read(
            middle, upper, pool=pool
        )

    async def _record(
        self,
        entries: list[dict[str, Any]],
        heights: Heights,
        *,
        cursor: int | None = None,
        wallet_height: int | None = None,
        trusted_height: int | None = None,
        recheck: tuple[int, int] | None = None,
        sweep: int | None = None,
    ) -> None:
        transfers = await self._classify_all(entries, heights.trusted, heights.reported)
        result = await self._store.record_transfers(
            transfers,
            now=int(self._clock.seconds()),
            cursor=cursor,
            wallet_height=wallet_height,
            trusted_height=trusted_height,
            recheck=recheck,
            sweep=sweep,
        )
        self._count(result)

    async def _timed(self, method: str, call: Any) -> Any:
        started = self._clock.seconds()
        try:
            return await call
        finally:
            self.metrics.wallet_rpc_duration.labels(method).observe(self._clock.seconds() - started)

    async def _classify_all(
        self, entries: list[dict[str, Any]], height: int, reported: int
    ) -> list[Transfer]:
        transfers = []
        for start in range(0, len(entries), CLASSIFY_SLICE):
            if start:
                # Let the sites answer between slices: a long answer is classified in turns of
                # a few milliseconds, never in one block of the reactor.
                await self._turn()
            for entry in entries[start : start + CLASSIFY_SLICE]:
                outcome = classify(entry, height, self._n, self._min_amount, reported=reported)
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
        for state, count in result.reversed.items():
            self.metrics.monitor_reversals.labels(state).inc(count)
            log.warn(
                "{count} {state} transfers were taken back by the chain (a reorganisation or a "
                "double spend) and reversed: {what}",
                count=count,
                state=state,
                what=(
                    "their amounts are off their tokens until confirmed again"
                    if state == "claimed"
                    else "not redeemable until confirmed again"
                ),
            )
        for state, count in result.restored.items():
            self.metrics.monitor_restorations.labels(state).inc(count)
            log.info(
                "{count} reversed {state} transfers are confirmed again and restored",
                count=count,
                state=state,
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
        self._polled = False  # a first successful poll is logged once
        self._identified = False  # what answers at --wallet-rpc is asked once
        self._not_before = 0.0

    @property
    def poll_interval(self) -> float:
        return self.monitor.poll_interval

    def last_success(self) -> float | None:
        return self.monitor.last_success()

    def height_note(self) -> str | None:
        return self.monitor.height_note()

    def trusted_height(self) -> int | None:
        return self.monitor.trusted_height()

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop_done = self._loop.start(self.monitor.poll_interval, now=True)
        log.info(
            "monitor started: polling the wallet every {interval}s", interval=self.poll_interval
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
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
                await done
            finally:
                if timer.active():
                    timer.cancel()
        else:
            await done
        log.info("monitor stopped")

    def _tick(self) -> Deferred[None] | None:
        if self._clock.seconds() < self._not_before:
            return None
        d: Deferred[None] = ensureDeferred(self.monitor.poll())
        d.addCallbacks(self._succeeded, self._failed)
        d.addCallback(lambda _: ensureDeferred(self._identify_once()))
        self._current = d

        def forget(result: None) -> None:
            self._current = None

        d.addBoth(forget)
        return d

    def _succeeded(self, _: None) -> None:
        self.monitor.metrics.monitor_polls.labels("ok").inc()
        if not self._polled:
            # The line an operator looks for after a start: the wallet answers (heights are
            # public chain data; no payment detail is logged).
            self._polled = True
            log.info(
                "first wallet poll succeeded: the monitor acts on chain height {height}",
                height=self.monitor.trusted_height(),
            )
        elif self._failures:
            log.info("wallet poll succeeded after {count} failures", count=self._failures)
        self._failures = 0
        self._not_before = 0.0

    async def _identify_once(self) -> None:
        """After the first poll, once: warn when --wallet-rpc is not what it should be.  Part
        of the tick, so stopping waits for it like for a poll."""
        if self._identified or not self.running:
            return
        self._identified = True
        try:
            kind = await self.monitor.wallet.identify()
        except CancelledError:
            return
        except Exception:  # a warning is not worth stopping the poll loop for
            log.failure("could not tell what answers at --wallet-rpc")
            return
        if kind == "spend_capable":
            log.warn(
                "the wallet at --wallet-rpc can spend (it holds the spend key): anonticket "
                "needs only a view-only wallet, and with this one whoever takes over this "
                "machine takes the funds too (docs/wallet.md)"
            )
        elif kind == "monerod":
            log.warn(
                "--wallet-rpc answers like monerod, not monero-wallet-rpc: point it at the "
                "view-only wallet's RPC port (docs/wallet.md)"
            )
        elif kind == "view_only":
            log.info("the wallet at --wallet-rpc is view-only, as it should be")

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
