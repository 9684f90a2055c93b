"""twistd plugin: ``twistd anonticket``.  All wiring lives in :mod:`anonticket.tap`."""

from twisted.application.service import ServiceMaker

anonticket = ServiceMaker(
    "anonticket",
    "anonticket.tap",
    "Pay Monero, get an anonymous service token (onion API + wallet monitor).",
    "anonticket",
)
