"""The monitor driven by the in-process stand-in wallet, on the test's own clock.

The stand-in is for rules and faults (heights that lie, reorgs by hand, garbage); normal
operation is proven against the real monero-wallet-rpc in tests/test_e2e_monero.py and
tests/test_reorg_e2e.py.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from anonticket.metrics import Metrics
from anonticket.monitor import BACKOFF_CAP, Monitor, MonitorService

from .fakewallet import reply

PID = "0123456789abcdef"
TXID = "ab" * 32


def entry(**over: Any) -> dict[str, Any]:
    base = {
        "type": "in",
        "txid": TXID,
        "payment_id": PID,
        "amount": 2 * 10**12,
        "height": 100,
        "unlock_time": 0,
        "double_spend_seen": False,
        "subaddr_index": {"major": 0, "minor": 0},
    }
    base.update(over)
    return base


class Chain:
    """A stand-in wallet's view of the chain for the monitor's rules: a height and incoming
    transfers, answered as monero-wallet-rpc answers ``get_transfers`` (``in`` entries with
    ``min_height < height <= max_height``, ``pool`` entries when asked).  ``heights`` queues
    one-off answers to ``get_height`` (a lying or confused wallet)."""

    def __init__(self, height: int, transfers: list[dict[str, Any]] | None = None) -> None:
        self.height = height
        self.transfers = list(transfers or [])
        self.heights: list[int] = []

    def __call__(self, request: Any, body: dict[str, Any]) -> Any:
        method, params = body["method"], body.get("params", {})
        if method == "get_height":
            height = self.heights.pop(0) if self.heights else self.height
            return reply({"height": height})(request, body)
        if method != "get_transfers":
            return reply({"blocks_fetched": 0})(request, body)
        lo, hi = params["min_height"], params["max_height"]

        def mined(e: dict[str, Any]) -> bool:
            height = e.get("height")
            # Garbage without a usable height is always in the answer: it must not matter.
            return not isinstance(height, int) or lo < height <= hi

        ins = [e for e in self.transfers if e.get("type") != "pool" and mined(e)]
        pool = [e for e in self.transfers if e.get("type") == "pool"] if params["pool"] else []
        return reply({"in": ins, "pool": pool})(request, body)


def transfers_asked(fake: Any) -> list[tuple[int, int, bool]]:
    return [
        (r["params"]["min_height"], r["params"]["max_height"], r["params"]["pool"])
        for r in fake.wallet.received
        if r["method"] == "get_transfers"
    ]


class Harness:
    def __init__(self, store: Any, fake: Any, **kw: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.metrics = Metrics()
        self.wallet = fake.client(timeout=kw.pop("timeout", 2.0), **kw.pop("wallet", {}))
        self.monitor = Monitor(
            store,
            self.wallet,
            self.metrics,
            self.clock,
            min_confirmations=kw.pop("min_confirmations", 10),
            min_amount=10**10,
            start_height=kw.pop("start_height", 0),
            poll_interval=5,
            # The poll schedule runs on the Clock; turns between slices of work on the reactor.
            turn=lambda: deferLater(reactor, 0, lambda: None),
        )
        self.service = MonitorService(self.monitor, self.clock, random.Random(1))
        self.store = store

    async def tick(self, seconds: float = 5) -> None:
        """Advance the clock past one poll interval and wait for the poll it started."""
        self.clock.advance(seconds)
        if self.service._current is not None:
            await self.service._current

    async def next_attempt(self, fake: Any) -> float:
        """Tick at the poll interval until the monitor asks the wallet again; the time waited."""
        asked, waited = len(fake.wallet.received), 0.0
        while len(fake.wallet.received) == asked:
            assert waited <= BACKOFF_CAP + 5, "the monitor stopped polling"
            await self.tick(5)
            waited += 5
        return waited

    def polls(self, outcome: str) -> float:
        count: float = self.metrics.monitor_polls.labels(outcome)._value.get()
        return count
