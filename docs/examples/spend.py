"""Sell one purchase against an anonticket token: the service's side (docs/spending.md).

    python3 docs/examples/spend.py TOKEN AMOUNT ORDER-ID [--internal http://127.0.0.1:9180]

Standard library only.  The Idempotency-Key is derived from the service's own order id, so a
retry of the same order (after a timeout, a crash, a restart) can never charge twice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request


def call(method: str, url: str, body: dict | None = None, headers: dict | None = None):
    """One request; the status, the JSON body and the headers, whatever the status."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("the internal site's URL must be http:// or https://")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310 - checked above
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.load(response), response.headers
    except urllib.error.HTTPError as e:
        return e.code, json.load(e), e.headers


def sell(internal: str, token: str, amount: int, order_id: str) -> int:
    base = f"{internal}/api/v1/token/{token}"
    key = f"order-{order_id}"  # one key per purchase, the same for every retry of it
    for attempt in range(5):
        try:
            status, body, headers = call(
                "POST",
                f"{base}/spend",
                {"amount": amount, "memo": f"order {order_id}"},
                {"Idempotency-Key": key},
            )
        except (urllib.error.URLError, TimeoutError):
            time.sleep(2**attempt)  # no answer: the spend may or may not be made; retry
            continue
        replayed = headers.get("Idempotent-Replayed") == "true"
        if status == 200:
            print(
                f"sold: spend {body['spend_id']}, balance {body['balance']}"
                + (" (answer replayed)" if replayed else "")
            )
            return 0
        if status == 409 and body["code"] == "idempotency_key_in_use":
            time.sleep(1)  # the first attempt is still being answered
            continue
        if status == 409:  # insufficient_balance, token_revoked, token_suspended
            print(
                f"refused: {body['code']}"
                + (f", balance {body['balance']}" if "balance" in body else "")
            )
            return 1
        if status == 503:
            time.sleep(int(headers.get("Retry-After", "1")))
            continue
        print(f"error {status}: {body['code']}")  # 400, 404, 422: a bug or a bad token
        return 2
    print("no answer after 5 attempts; retry later with the same order id")
    return 3


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("token")
    parser.add_argument("amount", type=int)
    parser.add_argument("order_id")
    parser.add_argument("--internal", default="http://127.0.0.1:9180")
    args = parser.parse_args()
    return sell(args.internal, args.token, args.amount, args.order_id)


if __name__ == "__main__":
    sys.exit(main())
