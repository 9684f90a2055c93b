"""The benchmark still runs (bench/bench.py --quick): no figure is checked, only that every
piece works end to end (seeding, the daemon, wrk and its Lua script, the baseline, the table),
a spend scenario and its exactly-once check on the internal site included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (bench/run installs it)"
)
def test_quick_bench_prints_its_table():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--scenarios", "unknown,introspect,spend-hot"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| ") and "scenario" in line)
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns == [
        "scenario",
        "conns",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "base req/s",
        "base p99 ms",
        "ratio",
        "p99/base",
        "tuned req/s",
        "tuned p99 ms",
        "ratio tuned",
        "p99/tuned",
        "peak RSS MB",
        "others CPU",
        "targets",
    ]
    rows = {
        cells[0]: cells
        for line in lines
        if line.startswith("| ") and line != header
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == {"unknown", "introspect", "spend-hot"}
    for scenario, cells in rows.items():
        assert cells[1] == ("64" if scenario == "spend-hot" else "16")
        assert float(cells[2].replace(",", "")) > 0  # requests/s
        assert cells[5] == "0", result.stdout  # errors: every answer was the expected one
        assert float(cells[10].replace(",", "")) > 0  # the tuned baseline ran too
    assert "unknown @ 16: 404/payment_not_found" in result.stdout
    assert "introspect @ 16: 200/active" in result.stdout
    assert "spend-hot @ 64: 200/active" in result.stdout
    check = next(line for line in lines if "exactly once: the hot token" in line)
    assert check.endswith(": exact"), check
