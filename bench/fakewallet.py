"""A stand-in monero-wallet-rpc for the monitor ingest benchmark (bench only).

    fakewallet.py PORT STATS_FILE --transfers N --heights H [--confirmations C]

Serves ``refresh``, ``get_height`` and ``get_transfers`` over JSON-RPC (no login) for a wallet
that has received N confirmed transfers, each to its own random PID, spread evenly over blocks
1..H; its height is H + C, so all of them are confirmed for ``--min-confirmations`` <= C.
Entries have the shape monero-wallet-rpc 0.18 returns (see tests/test_classify.py ``entry()``),
and ``filter_by_height`` works as in the real wallet: ``min_height`` exclusive, ``max_height``
inclusive.  Entries are serialised once at start, so answering costs little next to what the
daemon does with them.  The wall-clock time of the first call goes to STATS_FILE (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

ADDRESS = "4" + "A" * 94  # the wallet's primary address; its value plays no role


def entries(transfers: int, heights: int, wallet_height: int) -> list[list[bytes]]:
    """Serialised ``in`` entries by height (index 0 is unused)."""
    by_height: list[list[bytes]] = [[] for _ in range(heights + 1)]
    for i in range(transfers):
        height = 1 + i * heights // transfers
        amount = 1_500_000_000_000 + i
        entry = {
            "address": ADDRESS,
            "amount": amount,
            "amounts": [amount],
            "confirmations": wallet_height - height,
            "double_spend_seen": False,
            "fee": 30_660_000,
            "height": height,
            "locked": False,
            "note": "",
            "payment_id": os.urandom(8).hex(),
            "subaddr_index": {"major": 0, "minor": 0},
            "subaddr_indices": [{"major": 0, "minor": 0}],
            "suggested_confirmations_threshold": 1,
            "timestamp": 1_700_000_000 + 120 * height,
            "txid": os.urandom(32).hex(),
            "type": "in",
            "unlock_time": 0,
        }
        by_height[height].append(json.dumps(entry).encode())
    return by_height


class WalletRPC(Resource):
    isLeaf = True

    def __init__(self, by_height: list[list[bytes]], wallet_height: int, stats: Path) -> None:
        super().__init__()
        self._by_height = by_height
        self._height = wallet_height
        self._stats = stats
        self._first: float | None = None

    def render_POST(self, request: Request) -> bytes:
        if self._first is None:
            self._first = time.time()
            self._stats.write_text(json.dumps({"first_call": self._first}))
        assert request.content is not None
        call = json.loads(request.content.read())
        method, params = call.get("method"), call.get("params") or {}
        result: bytes
        if method == "refresh":
            result = b'{"blocks_fetched": 0, "received_money": false}'
        elif method == "get_height":
            result = b'{"height": %d}' % self._height
        elif method == "get_transfers":
            result = self._transfers(params)
        else:
            return self._reply(call, b"null", b'{"code": -32601, "message": "Method not found"}')
        return self._reply(call, result)

    def _transfers(self, params: dict[str, Any]) -> bytes:
        low, high = 0, len(self._by_height) - 1
        if params.get("filter_by_height"):
            low = int(params.get("min_height", 0)) + 1  # exclusive
            high = min(high, int(params.get("max_height", high)))  # inclusive
        found = [e for h in range(max(low, 1), high + 1) for e in self._by_height[h]]
        # The real wallet leaves out an empty list altogether; there is never a pool here.
        return b'{"in": [' + b", ".join(found) + b"]}" if found else b"{}"

    def _reply(self, call: dict[str, Any], result: bytes, error: bytes | None = None) -> bytes:
        ident = json.dumps(call.get("id", "0")).encode()
        tail = b'"error": ' + error if error is not None else b'"result": ' + result
        return b'{"id": ' + ident + b', "jsonrpc": "2.0", ' + tail + b"}"


class QuietSite(Site):
    noisy = False

    def log(self, request: object) -> None:
        pass


def main() -> None:
    from twisted.internet import reactor as installed  # noqa: TID251 - an entry point

    reactor: Any = installed

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("stats", type=Path)
    parser.add_argument("--transfers", type=int, default=100_000)
    parser.add_argument("--heights", type=int, default=10_000)
    parser.add_argument("--confirmations", type=int, default=10)
    args = parser.parse_args()
    wallet_height = args.heights + args.confirmations
    by_height = entries(args.transfers, args.heights, wallet_height)
    site = QuietSite(WalletRPC(by_height, wallet_height, args.stats))
    reactor.listenTCP(args.port, site, interface="127.0.0.1")
    print("listening", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
