"""Reactor stalls while a get_transfers answer is decoded: anonticket.jsonslices vs json.loads.

    .venv/bin/python bench/decode.py [--entries 15000] [--runs 5] [--pretty] [--no-hostile]

A callLater(0) chain runs beside the decoding on the real reactor and records the gap between
its runs: the longest gap is the longest time the reactor could not answer anything (an HTTP
request, a timer).  The sliced decoder (what WalletClient.get_transfers uses) runs through
``run_sliced``; json.loads (what it did before) runs in one reactor callback.  Entries have the
shape monero-wallet-rpc 0.18 returns.  A second table decodes the answer of issue #10: ~20 MiB of
``{}`` in ``in``, which the sliced decoder refuses after 20,000 entries (too_large).

Columns: "max stall" is the longest gap (wall clock); "max slice" the most CPU time this
process used within one gap, less the garbage collector's share: the longest piece of decoding
itself, free of what other processes and collections add to the wall clock (a full collection
walks every tracked object of the process, and any allocation of containers may trigger one).
As in the daemon, the start-up heap is frozen first (anonticket.tap.freeze_startup_heap).
Figures vary with the machine and its load: compare the rows, not runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from anonticket.jsonslices import TooManyEntries, rpc_answer, run_sliced
from anonticket.wallet import MAX_TRANSFER_ENTRIES


def transfer(i: int) -> dict[str, Any]:
    amount = 1_500_000_000_000 + i
    return {
        "address": "4" + "A" * 94,
        "amount": amount,
        "amounts": [amount],
        "confirmations": 12,
        "double_spend_seen": False,
        "fee": 30_660_000,
        "height": 1000 + i // 10,
        "locked": False,
        "note": "",
        "payment_id": f"{i:016x}",
        "subaddr_index": {"major": 0, "minor": 0},
        "subaddr_indices": [{"major": 0, "minor": 0}],
        "suggested_confirmations_threshold": 1,
        "timestamp": 1_700_000_000 + i,
        "txid": f"{i:064x}",
        "type": "in",
        "unlock_time": 0,
    }


class Gaps:
    """A callLater(0) chain recording the time between its runs, the CPU time this process
    used within each, and how much of it the garbage collector took."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.gaps: list[tuple[float, float, float]] = []  # (gap, CPU, collecting), in s
        self._last = time.perf_counter()
        self._cpu = time.process_time()
        self._collecting = 0.0
        self._collection_started = 0.0
        self._call: Any = None

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._collection_started = time.perf_counter()
        else:
            self._collecting += time.perf_counter() - self._collection_started

    def start(self) -> None:
        gc.callbacks.append(self._gc)
        self._last, self._cpu = time.perf_counter(), time.process_time()
        self._call = self._reactor.callLater(0, self._tick)

    def _tick(self) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.gaps.append((now - self._last, cpu - self._cpu, self._collecting))
        self._last, self._cpu, self._collecting = now, cpu, 0.0
        self._call = self._reactor.callLater(0, self._tick)

    def stop(self) -> None:
        self._tick()  # the gap up to the end of the decoding counts too
        self._call.cancel()
        gc.callbacks.remove(self._gc)


# Both put the decoded entries in `keep` (nothing: too_large) and return their count.  Freeing
# them takes time (~15 ms for 15,000 entries, ~0.4 s for 7 million `{}`) wherever the last
# reference goes, and that is not decoding: measure() drops them after its last tick.  (Not
# through the Deferred's result either: deferLater's Deferred and its DelayedCall form a cycle,
# which would free them at some later collection, inside the next measurement.)


async def sliced(reactor: Any, body: bytes, keep: list[Any]) -> int:
    try:
        answer = await run_sliced(reactor, rpc_answer(body, ("in", "pool"), MAX_TRANSFER_ENTRIES))
    except TooManyEntries:
        return -1
    keep.append(answer)
    return len(answer.arrays["in"])


async def loads(reactor: Any, body: bytes, keep: list[Any]) -> int:
    from twisted.internet.task import deferLater

    def decode() -> int:
        keep.append(json.loads(body))
        return len(keep[0]["result"]["in"])

    # One callback on the reactor, as WalletClient._decode ran it.
    count: int = await deferLater(reactor, 0, decode)
    return count


Run = tuple[float, float, float, float, int]


async def measure(
    reactor: Any, decoder: Callable[[Any, bytes, list[Any]], Any], body: bytes
) -> Run:
    """Longest gap, most CPU time in a gap less its collections, median gap, wall time (all
    in s), and the entries decoded (-1: too_large)."""
    gc.collect()
    gaps = Gaps(reactor)
    gaps.start()
    started = time.perf_counter()
    keep: list[Any] = []
    count: int = await decoder(reactor, body, keep)
    wall = time.perf_counter() - started
    gaps.stop()
    keep.clear()
    longest = max(gap for gap, _, _ in gaps.gaps)
    work = max(cpu - collecting for _, cpu, collecting in gaps.gaps)
    median = statistics.median(gap for gap, _, _ in gaps.gaps)
    return longest, work, median, wall, count


def table(title: str, rows: list[tuple[str, list[Run]]]) -> None:
    print(f"\n{title}")
    heads = ("max stall ms", "max slice ms", "median gap", "turns", "wall ms", "entries/s")
    print(f"{'decoder':<10}" + "".join(f"{h:>13}" for h in heads))
    for name, runs in rows:
        longest, work, median, wall = (
            statistics.median(r[i] for r in runs) * 1e3 for i in range(4)
        )
        count = runs[0][4]
        turns = round(wall / median) if median else 0
        rate = f"{count / wall * 1e3:,.0f}" if count > 0 else "too_large"
        cells = (f"{longest:.1f}", f"{work:.1f}", f"{median:.2f}", str(turns))
        print(f"{name:<10}" + "".join(f"{c:>13}" for c in cells) + f"{wall:>13.1f}{rate:>13}")


async def run(reactor: Any, args: argparse.Namespace) -> None:
    entries = [transfer(i) for i in range(args.entries)]
    document = {"id": "0", "jsonrpc": "2.0", "result": {"in": entries}}
    body = json.dumps(document, indent=2 if args.pretty else None).encode()
    del entries, document
    print(f"{args.entries} entries, {len(body) / 1e6:.1f} MB; medians of {args.runs} runs")
    gc.collect()
    gc.freeze()  # as the daemon does once started
    results: dict[str, list[Run]] = {"sliced": [], "json.loads": []}
    for _ in range(args.runs):
        results["sliced"].append(await measure(reactor, sliced, body))
        results["json.loads"].append(await measure(reactor, loads, body))
    table("valid answer", list(results.items()))
    if not args.hostile:
        return
    head, piece, tail = b'{"id": "0", "jsonrpc": "2.0", "result": {"in": [', b"{},", b"{}]}}"
    hostile = head + piece * ((20 << 20) // len(piece)) + tail
    # json.loads of it takes ~1 s and ~500 MB: three runs at most.
    runs = min(args.runs, 3)
    results = {"sliced": [], "json.loads": []}
    for _ in range(runs):
        results["sliced"].append(await measure(reactor, sliced, hostile))
        results["json.loads"].append(await measure(reactor, loads, hostile))
    table(
        f"issue #10: {len(hostile) / 1e6:.1f} MB of {{}}; medians of {runs} runs",
        list(results.items()),
    )


def main() -> None:
    from twisted.internet import reactor as installed  # noqa: TID251 - an entry point
    from twisted.internet.defer import Deferred

    reactor: Any = installed
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=15_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pretty", action="store_true", help="indented JSON, as epee may send")
    parser.add_argument("--no-hostile", dest="hostile", action="store_false")
    args = parser.parse_args()
    failures: list[Any] = []

    def done(result: object) -> None:
        if result is not None:
            failures.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run(reactor, args)).addBoth(done))
    reactor.run()
    if failures:
        failures[0].raiseException()


if __name__ == "__main__":
    main()
