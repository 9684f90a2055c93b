"""Seed a data directory for the benchmark exactly as the monitor records payments (bench only).

    seed.py DATA_DIR OUT_DIR --payments N --claimed M [--list-max K]

Every payment is one confirmed 1 XMR transfer to its own random PID, recorded through
``Store.record_transfers`` in batches (as one monitor poll records a span of blocks).  The first
M PIDs are then redeemed through ``Store.redeem``, the way the public site claims them.  Writes,
one hex value a line, for the wrk scripts:

* ``OUT_DIR/unclaimed.txt``: PIDs still redeemable (at most K of them; the rest stay unlisted);
* ``OUT_DIR/claimed.txt`` and ``OUT_DIR/tokens.txt``: the redeemed PIDs and their tokens;
* ``OUT_DIR/hot.txt``: the first of those tokens alone, the one the spend-hot scenario spends
  from (each token holds 1 XMR, 10^12 atomic units: the bench's spends never use it up).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import react

from anonticket.domain import PaymentId
from anonticket.store import Store
from anonticket.store.records import PaymentStatus, Redeemed, Transfer

BATCH = 10_000  # transfers per record_transfers call: one transaction, like one monitor span
PER_BLOCK = 10  # transfers per block height
AMOUNT = 10**12  # 1 XMR


def new_pids(count: int) -> list[bytes]:
    blob = os.urandom(8 * count)
    pids = [blob[i : i + 8] for i in range(0, len(blob), 8)]
    # An all-zero id means "no payment id" and is never recorded; 1 in 2^64, but be exact.
    return [pid if any(pid) else b"\x01" * 8 for pid in pids]


async def seed(
    reactor: Any, data_dir: Path, out: Path, payments: int, claimed: int, keep: int
) -> None:
    store = Store(reactor, f"sqlite:///{data_dir / 'anonticket.sqlite3'}", data_dir)
    store.open()
    out.mkdir(parents=True, exist_ok=True)
    now = int(time.time())
    top = (payments - 1) // PER_BLOCK + 1
    started = time.monotonic()
    redeemable: list[bytes] = []
    to_claim: list[bytes] = []
    try:
        for start in range(0, payments, BATCH):
            pids = new_pids(min(BATCH, payments - start))
            status, height = PaymentStatus.UNCLAIMED, start // PER_BLOCK + 1
            transfers = [
                Transfer(os.urandom(32), 0, 0, pid, AMOUNT, height + i // PER_BLOCK, status)
                for i, pid in enumerate(pids)
            ]
            await store.record_transfers(transfers, now=now, cursor=top, wallet_height=top + 10)
            for pid in pids:
                if len(to_claim) < claimed:
                    to_claim.append(pid)
                elif len(redeemable) < keep:
                    redeemable.append(pid)
        recorded = time.monotonic()
        tokens: list[str] = []
        for start in range(0, len(to_claim), 1000):
            chunk = to_claim[start : start + 1000]
            results = await gatherResults([store.redeem(PaymentId(p), now) for p in chunk])
            for result in results:
                assert isinstance(result, Redeemed) and result.first_claim, result
                tokens.append(result.token.hex)
        finished = time.monotonic()
    finally:
        store.close()
    (out / "unclaimed.txt").write_text("".join(p.hex() + "\n" for p in redeemable))
    (out / "claimed.txt").write_text("".join(p.hex() + "\n" for p in to_claim))
    (out / "tokens.txt").write_text("".join(t + "\n" for t in tokens))
    (out / "hot.txt").write_text(tokens[0] + "\n")
    print(
        f"seeded {payments:,} payments in {recorded - started:.1f} s "
        f"({payments / max(recorded - started, 1e-9):,.0f}/s), "
        f"redeemed {len(tokens):,} in {finished - recorded:.1f} s",
        file=sys.stderr,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--payments", type=int, required=True)
    parser.add_argument("--claimed", type=int, required=True)
    parser.add_argument("--list-max", type=int, default=10**9)
    args = parser.parse_args()
    if args.claimed > args.payments:
        parser.error("--claimed exceeds --payments")
    react(
        lambda reactor: ensureDeferred(
            seed(reactor, args.data_dir, args.out_dir, args.payments, args.claimed, args.list_max)
        )
    )


if __name__ == "__main__":
    main()
