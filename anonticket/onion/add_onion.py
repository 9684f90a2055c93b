"""The ADD_ONION line, tor's answer to it, and the HS_DESC events that follow (all pure).

DoS defenses, as checked against tor 0.4.9.11 (tests/test_onion_tor.py):

* proof of work (``PoWDefensesEnabled``, ``PoWQueueRate``, ``PoWQueueBurst``) and a cap on
  concurrent streams per rendezvous circuit (``MaxStreams`` + ``Flags=MaxStreamsCloseCircuit``)
  are ADD_ONION keywords, so they apply whichever tor we use;
* the intro-point DoS defense has no ADD_ONION keyword (tor: "Unrecognized keyword argument"),
  and its torrc options are refused without a preceding ``HiddenServiceDir``, so no ephemeral
  service can have it, launched tor or not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from twisted.internet import defer

__all__ = [
    "DescriptorWatch",
    "OnionDefenses",
    "OnionError",
    "add_onion_command",
    "parse_service_id",
    "tor_error_text",
]

_TARGET: Final = re.compile(r"unix:/[A-Za-z0-9._/+@~-]+|127\.0\.0\.1:\d{1,5}|\[::1\]:\d{1,5}")
_KEY_BLOB: Final = re.compile(r"ED25519-V3:\S+")


class OnionError(Exception):
    """A tor step failed; the message is one line and never holds key material."""


@dataclass(frozen=True)
class OnionDefenses:
    """DoS defenses sent with ADD_ONION (all accepted and range-checked by tor 0.4.9.11).

    ``max_streams`` caps *concurrent* streams (HTTP connections) on one rendezvous circuit; a
    client that goes over it loses the circuit (``MaxStreamsCloseCircuit``) and must pay for a
    new one, which PoW makes expensive under attack.  An API client needs a handful; 32 leaves
    room for an integrator's connection pool.  0 means no cap.  The PoW queue values are tor's
    own defaults, spelled out so an operator sees what is in force.
    """

    pow: bool = True
    pow_queue_rate: int = 250
    pow_queue_burst: int = 2500
    max_streams: int = 32
    close_circuit_on_max_streams: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.max_streams <= 65535:
            raise ValueError("max_streams must be 0..65535")
        if not 0 <= self.pow_queue_rate <= self.pow_queue_burst:
            # tor checks this for torrc services but not for ADD_ONION
            raise ValueError("PoW queue rate must be 0..burst")


def add_onion_command(
    key_blob: str, virtual_port: int, target: str, defenses: OnionDefenses = OnionDefenses()
) -> str:
    """The ADD_ONION line for our key, one port and the defenses.  It holds the private key:
    send it, never log it."""
    if not 1 <= virtual_port <= 65535:
        raise ValueError(f"virtual port {virtual_port} is not 1..65535")
    if not _TARGET.fullmatch(target):
        raise ValueError(f"unsupported onion target {target!r}")
    words = ["ADD_ONION", key_blob]
    if defenses.max_streams and defenses.close_circuit_on_max_streams:
        words.append("Flags=MaxStreamsCloseCircuit")
    if defenses.max_streams:
        words.append(f"MaxStreams={defenses.max_streams}")
    if defenses.pow:
        words += [
            "PoWDefensesEnabled=1",
            f"PoWQueueRate={defenses.pow_queue_rate}",
            f"PoWQueueBurst={defenses.pow_queue_burst}",
        ]
    words.append(f"Port={virtual_port},{target}")
    return " ".join(words)


def parse_service_id(reply: object) -> str:
    """The ``ServiceID`` of tor's answer to ADD_ONION (txtorcon hands over the text lines)."""
    for line in str(reply).splitlines():
        key, _, value = line.strip().partition("=")
        if key == "ServiceID" and value:
            return value
    raise OnionError("tor's answer to ADD_ONION holds no ServiceID")


class DescriptorWatch:
    """Follows the HS_DESC events of one service; :attr:`uploaded` fires at the first upload
    an HSDir accepted.  Tor keeps retrying failed uploads and re-uploads on its own."""

    def __init__(self, service_id: str) -> None:
        self.service_id = service_id
        self.uploaded: defer.Deferred[None] = defer.Deferred()
        self.attempts = 0
        self.failures = 0

    def __call__(self, event: str) -> None:
        # "UPLOAD <id> <auth> <hsdir> ...", "UPLOADED <id> ...", "FAILED <id> ... REASON=..."
        fields = event.split()
        if len(fields) < 2 or fields[1] != self.service_id:
            return
        if fields[0] == "UPLOAD":
            self.attempts += 1
        elif fields[0] == "FAILED":
            self.failures += 1
        elif fields[0] == "UPLOADED" and not self.uploaded.called:
            self.uploaded.callback(None)


def tor_error_text(error: BaseException) -> str:
    """One line for the log about a failed tor step, with any key material scrubbed
    (txtorcon puts the whole pending command, key included, into its disconnect errors)."""
    if isinstance(error, defer.TimeoutError):
        return "timed out"
    text = (str(error) or type(error).__name__).strip().splitlines()[0][:500]
    return _KEY_BLOB.sub("ED25519-V3:[scrubbed]", text)
