"""The README's first command keeps working: the demo's tour runs to the end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .monero_regtest import available

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not available(), reason="monerod/monero-wallet-rpc not installed")
def test_demo_runs_end_to_end():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "pending:  0 of 10 confirmations" in out
    assert "status:         success" in out and "status:         already_claimed" in out
    assert "status:      active" in out
    assert "Traceback" not in out + result.stderr
    assert out.rstrip().endswith("done.")
