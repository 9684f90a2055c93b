"""The one-command demo: a private Monero chain, a shop's view-only wallet, a payer, the
anonticket daemon, and a payment redeemed for a token — every step printed as it happens.

Run it with ``scripts/demo`` (which sets things up first).  ``--serve`` keeps everything running
afterwards so you can try the API yourself; Ctrl-C cleans up.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemonproc import CLIENT, Daemon  # noqa: E402 - after the path tweak above
from tests.monero_regtest import Regtest, available  # noqa: E402

N = 10
XMR = 10**12
LOGIN = ("monitor", "demo-password")
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def step(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def note(text: str) -> None:
    print(f"{DIM}{text}{RESET}", flush=True)


def run_client(*args: str) -> tuple[int, str]:
    print(f"$ anonticket-client {shlex.join(args)}", flush=True)
    result = subprocess.run([*CLIENT, *args], capture_output=True, text=True, timeout=120)
    out = (result.stdout + result.stderr).rstrip()
    print(out, flush=True)
    return result.returncode, result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true", help="keep running after the tour")
    args = parser.parse_args()
    if not available():
        print("demo: monerod and monero-wallet-rpc are missing (apt-get install monero)")
        return 1
    work = Path(tempfile.mkdtemp(prefix="anonticket-demo-"))
    started = time.monotonic()
    step("1. A private Monero chain (monerod --regtest --offline, on 127.0.0.1 only)")
    with Regtest(work / "chain") as rt:
        print(f"monerod answers on {rt.daemon_address}")
        step("2. Wallets: the shop, its view-only twin (no spend key), and a payer")
        shop = rt.wallet("shop")
        watch = rt.view_only_wallet(shop, "shop-watch", login=LOGIN)
        payer = rt.wallet("payer")
        print(f"shop address:      {shop.address}")
        print(f"view-only wallet:  {watch.url} (HTTP Digest login {LOGIN[0]}:***)")
        note("mining 100 blocks to the payer so it has coins to spend ...")
        height = rt.fund(payer)
        print(
            f"chain height {height}; payer balance "
            f"{payer.call('get_balance')['unlocked_balance'] / XMR:.0f} XMR unlocked"
        )

        step("3. The anonticket daemon, reading the view-only wallet")
        daemon = Daemon(
            work / "data",
            "--wallet-rpc",
            watch.url,
            "--wallet-rpc-login",
            ":".join(LOGIN),
            "--min-confirmations",
            str(N),
            "--poll-interval",
            "1",
            "--start-height",
            str(height - 1),
        )
        print(
            "$ twistd -n --pidfile= anonticket --public tcp:...:interface=127.0.0.1 "
            "--internal tcp:...:interface=127.0.0.1 "
            f"--wallet-rpc {watch.url} --wallet-rpc-login {LOGIN[0]}:*** "
            f"--min-confirmations {N}"
        )
        daemon.start()
        try:
            daemon.wait_for_height(height)
            print(f"public site   {daemon.public_url}   (in production: an onion service)")
            print(f"internal site {daemon.internal_url}   (metrics, revocation, health)")

            step("4. The user makes a payment ID and an integrated address, on their machine")
            code, out = run_client("new", "--address", shop.address)
            assert code == 0
            pid = out.split("payment id:")[1].split()[0]
            address = out.split("integrated address:")[1].split()[0]

            step("5. The user pays 1.5 XMR to that address from any wallet")
            txid = payer.transfer(address, 3 * XMR // 2)
            print(f"payer: transfer sent (tx {txid[:16]}...); the payment id is encrypted on chain")
            time.sleep(2)

            step("6. Redeeming too early: the payment is seen but not confirmed")
            run_client("redeem", pid, "--url", daemon.public_url)

            step(f"7. The chain moves on: {N} blocks")
            height = rt.mine(N)
            daemon.wait_for_height(height)
            print(f"chain height {height}: the payment has {N} confirmations")

            step("8. Redeem the payment ID for a service token")
            code, out = run_client("redeem", pid, "--url", daemon.public_url)
            assert code == 0, out
            token = out.split("service token:")[1].split()[0]
            note("Retrying (say, after a dropped Tor circuit) returns the same token:")
            run_client("redeem", pid, "--url", daemon.public_url)

            step("9. The service that sells access checks the token")
            run_client("status", token, "--url", daemon.public_url)

            step("10. The operator's view: health and metrics on the internal site")
            print(json.dumps(daemon.health()))
            for line in daemon.get("/metrics")[1].decode().splitlines():
                if line.startswith(
                    (
                        "anonticket_redeem_requests_total",
                        "anonticket_monitor_transfers_total",
                        "anonticket_wallet_height",
                    )
                ):
                    print(line)
            note(f"(the demo took {time.monotonic() - started:.0f} s)")

            step("Running it against your own wallet")
            print(
                "Start monero-wallet-rpc with a view-only wallet (docs/wallet.md), then:\n"
                "  .venv/bin/twistd -n --pidfile= anonticket \\\n"
                "      --wallet-rpc http://127.0.0.1:18083 --wallet-rpc-login USER:PASSWORD \\\n"
                "      --public tcp:8080:interface=127.0.0.1 \\\n"
                "      --internal tcp:9180:interface=127.0.0.1\n"
                "and put your tor's onion service in front of port 8080 (docs/operations.md)."
            )
            if args.serve:
                step("Serving; Ctrl-C stops everything")
                print(f"try: anonticket-client status {token} --url {daemon.public_url}")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
        finally:
            step("Cleaning up: the daemon gets SIGTERM, the chain and wallets are stopped")
            daemon.stop()
    shutil.rmtree(work, ignore_errors=True)
    print("done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
