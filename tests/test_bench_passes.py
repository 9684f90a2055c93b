"""bench/passes.py keeps working: a tiny run prints its rate and latency lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "passes.py"


def test_the_pass_benchmark_runs_and_prints_its_figures():
    done = subprocess.run(
        [sys.executable, str(BENCH), "--seconds", "0.2", "--purchases", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("in process, one core: ") for line in lines), done.stdout
    for prefix in ("daemon, one pass", "daemon, batch of 100", "daemon, verification"):
        assert any(line.startswith(prefix) and " p50 " in line for line in lines), done.stdout
