"""What the routes of failed webhook events read and answer (the delivery itself is
:mod:`anonticket.webhook.delivery`)."""

from __future__ import annotations

import re
from typing import Any

from anonticket.store.outbox import FailedEvent
from anonticket.web.jsonio import ApiError
from anonticket.web.public import rfc3339

# The ids outbox.py makes; anything else cannot name an event and never reaches the database
# (PostgreSQL refuses a NUL byte in text: a 503 and a store error for any client's typo).
EVENT_ID = re.compile(r"msg_[0-9a-f]{32}")


def webhooks_disabled() -> ApiError:
    return ApiError(404, "webhooks_disabled", "no --webhook-url is set: there are no events")


def event_not_found() -> ApiError:
    return ApiError(404, "event_not_found", "no failed event has this id")


def failed_events_view(events: list[FailedEvent], limit: int) -> dict[str, Any]:
    """A page of failed events, oldest first, and the cursor of the next."""
    return {
        "events": [
            {
                "id": e.event_id,
                "type": e.type,
                "created_at": rfc3339(e.created_at),
                "attempts": e.attempts,
                "last_error": e.last_error,
            }
            for e in events
        ],
        "next": str(events[-1].row) if len(events) == limit else None,
    }
