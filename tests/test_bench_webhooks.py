"""The webhook benchmark still runs (bench/webhooks.py, tiny sizes): no figure is judged, only
that every piece works end to end (seeding, the real daemon, the receiver it starts and stops,
the three storms and the drain) and that its correctness checks pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "webhooks.py"


def test_webhook_bench_prints_its_results():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--events", "60", "--latency", "5", "--clients", "2"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = result.stdout.splitlines()
    for prefix in (
        "latency redeem (receiver up, one change at a time, n=5): answer->event p50 ",
        "latency spend (receiver up, one change at a time, n=5): answer->event p50 ",
        "storm receiver up: 60 changes (54 redeems, 6 spends) by 2 clients in ",
        "storm receiver down: 60 changes (54 redeems, 6 spends) by 2 clients in ",
        "drain: 60 events waited while the receiver was down for ",
        "storm receiver up again: 60 changes (54 redeems, 6 spends) by 2 clients in ",
        "storm side by side (changes/s; redeem answer p50/p99 ms): receiver up ",
        "check events: 190 written, every one arrived at least once: yes; ",
        "check order: ",
        "check signatures: ",
    ):
        assert any(line.startswith(prefix) for line in lines), (prefix, output)
    assert "check FAILED" not in result.stdout, output
    drain = next(line for line in lines if line.startswith("drain: "))
    assert " events/s " in drain and " deliveries of 60 webhook-ids" in drain, drain
    order = next(line for line in lines if line.startswith("check order: "))
    assert "in version order: yes" in order, order
    signatures = next(line for line in lines if line.startswith("check signatures: "))
    assert signatures.endswith(" 0 bad") and not signatures.startswith("check signatures: 0 "), (
        signatures
    )
