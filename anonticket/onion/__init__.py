"""The public site as a Tor v3 onion service.

The address comes from our own key, not from tor (:mod:`.key`), so it is known before tor runs
(``anonticket-onion-address``) and stays the same across restarts and across tors.  The service
is *ephemeral* (:mod:`.add_onion`): it lives only as long as our control connection, so a dead
daemon never leaves an address that points at nothing, and a lost connection means creating it
again (:mod:`.service`, one :mod:`.session` per try).

Tor is launched (the default: the OS's ``tor``, DataDirectory ``<data-dir>/tor``,
:mod:`.process`) or attached to (``--tor-control``).  The site listens where only tor needs to
reach it (:mod:`.sockets`).

Whatever answers on the control port must prove it is tor (SAFECOOKIE with tor's own cookie
file, never a file of ours) before it gets anything but a nonce, and ADD_ONION, which carries
the private key, goes only over a connection so proven: see :mod:`anonticket.torcontrol`.
"""

from anonticket.onion.add_onion import (
    DescriptorWatch,
    OnionDefenses,
    OnionError,
    add_onion_command,
    parse_service_id,
)
from anonticket.onion.key import (
    HOSTNAME_FILE,
    ONION_KEY_FILE,
    SEED_BYTES,
    add_onion_key_blob,
    load_or_create_onion_key,
    onion_address,
    print_address_main,
)
from anonticket.onion.service import OnionService
from anonticket.onion.session import OnionTimeouts

__all__ = [
    "HOSTNAME_FILE",
    "ONION_KEY_FILE",
    "SEED_BYTES",
    "DescriptorWatch",
    "OnionDefenses",
    "OnionError",
    "OnionService",
    "OnionTimeouts",
    "add_onion_command",
    "add_onion_key_blob",
    "load_or_create_onion_key",
    "onion_address",
    "parse_service_id",
    "print_address_main",
]
