"""What ``GET /healthz`` on the internal site says: the store, the monitor and the onion, each
"ok" or why not, and the status (200, or 503 with the reasons) an orchestrator acts on."""

from __future__ import annotations

from typing import Any, Protocol

from anonticket.store.records import MonitorState
from anonticket.web.public import rfc3339


class MonitorHealth(Protocol):
    """What /healthz needs from the wallet monitor."""

    @property
    def poll_interval(self) -> float: ...

    def last_success(self) -> float | None:
        """Reactor time of the last poll that completed, or None before the first."""

    def height_note(self) -> str | None:
        """Why the last poll did not take the wallet's height as reported, if it did not."""

    def trusted_height(self) -> int | None:
        """The height the last successful poll acted on, if any."""


class OnionHealth(Protocol):
    """What /healthz needs from the onion service."""

    def health(self) -> dict[str, Any]:
        """``state``, ``bootstrap_percent``, ``bootstrap_summary`` and ``problem``."""


def onion_problem(tor: dict[str, Any]) -> str | None:
    """Why the onion is not reachable, in words an operator acts on; None when published."""
    state = tor["state"]
    if state == "published":
        return None
    if state == "bootstrapping":
        percent = tor["bootstrap_percent"]
        text = f"tor is bootstrapping ({percent} %): it cannot reach the Tor network yet"
    elif state == "publishing":
        text = "the onion service is waiting for tor to upload its descriptor"
    elif state == "failed":
        text = "the onion service failed and is being retried (see the log)"
    else:
        text = "tor is starting"
    if tor.get("problem"):
        text += f"; tor says: {tor['problem']}"
    return text


def health_answer(
    state: MonitorState | None,
    monitor: MonitorHealth | None,
    onion: OnionHealth | None,
    now: float,
    min_confirmations: int,
) -> tuple[dict[str, Any], int]:
    """The body and status of /healthz; ``state`` is None when the store is not answering."""
    problems: list[str] = []
    if state is None:
        problems.append("store is not answering")
        state = MonitorState(cursor=None, wallet_height=None)
    body: dict[str, Any] = {
        "store": "error" if problems else "ok",
        "wallet_height": state.wallet_height,
        "cursor": state.cursor,
        # Confirmed blocks not yet processed: 0 when the monitor is caught up.
        "lag": (
            None
            if state.wallet_height is None or state.cursor is None
            else max(0, state.wallet_height - min_confirmations - state.cursor)
        ),
    }
    if monitor is None:
        body["monitor"] = "disabled"
    else:
        last = monitor.last_success()
        limit = 3 * monitor.poll_interval
        body["last_poll"] = None if last is None else rfc3339(int(last))
        # What the monitor made of the wallet's height: "ok", or why it did not trust it,
        # and the height it acts on (confirmations and the lag count from it).
        body["height_check"] = monitor.height_note() or "ok"
        trusted = monitor.trusted_height()
        body["trusted_height"] = trusted
        if trusted is not None and state.cursor is not None:
            body["lag"] = max(0, trusted - min_confirmations - state.cursor)
        if last is None:
            body["monitor"] = "starting"
            problems.append("the monitor has not completed a poll yet")
        elif now - last > limit:
            body["monitor"] = "stale"
            problems.append(f"no successful wallet poll in the last {limit:g} seconds")
        else:
            body["monitor"] = "ok"
    if onion is None:
        body["tor"] = {"state": "disabled"}  # the public site is not an onion
    else:
        body["tor"] = tor = onion.health()
        # Unpublished, no client can reach the public site: the daemon is not serving.
        problem = onion_problem(tor)
        if problem is not None:
            problems.append(problem)
    body["status"] = "unavailable" if problems else "ok"
    if problems:
        body["reason"] = "; ".join(problems)
    return body, 503 if problems else 200
