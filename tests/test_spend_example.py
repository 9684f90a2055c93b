"""docs/examples/spend.py, the service's side in docs/spending.md, run against a live daemon."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

from .conftest import reactor
from .test_spend import issue_token

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "spend.py"


async def run(*args: str) -> tuple[int, str]:
    # A child process, not subprocess.run: the daemon answering it runs on this reactor.
    out, err, code = await getProcessOutputAndValue(
        sys.executable, [str(EXAMPLE), *args], reactor=reactor
    )
    assert err == b"", err
    return code, out.decode()


@pytest_twisted.ensureDeferred
async def test_the_example_sells_once_and_replays_a_retry(daemon, http):
    token = await issue_token(daemon, http)
    internal = ["--internal", daemon.internal_url]
    code, out = await run(token, "300", "8412", *internal)
    assert code == 0 and out.startswith("sold: spend ") and "balance 700" in out
    code, again = await run(token, "300", "8412", *internal)
    assert code == 0 and again.strip() == out.strip() + " (answer replayed)"
    code, out = await run(token, "800", "8413", *internal)
    assert (code, out.strip()) == (1, "refused: insufficient_balance, balance 700")
    code, out = await run(token, "1", "8412", *internal)
    assert (code, out.strip()) == (2, "error 422: idempotency_key_reused")
