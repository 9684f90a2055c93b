"""Monero address handling: Keccak-256, Monero's block base58, and address parsing.

Monero checksums addresses with the *original* Keccak-256 submission (padding byte 0x01),
not the standardised FIPS-202 SHA3-256 that ``hashlib.sha3_256`` implements (padding byte
0x06). The two produce entirely different digests, so a small pure-Python Keccak-f[1600]
lives here rather than pulling in a third-party dependency.

Monero's base58 also differs from Bitcoin's: it encodes fixed 8-byte blocks independently,
so a 69-byte address is always 95 characters and an integrated one always 106.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "NETWORK_BYTES",
    "Address",
    "AddressError",
    "Kind",
    "Network",
    "b58decode",
    "b58encode",
    "keccak256",
    "make_integrated_address",
    "parse_address",
    "split_integrated_address",
]


class AddressError(ValueError):
    """Raised for any malformed, corrupted or unsuitable Monero address or encoding."""


# --------------------------------------------------------------------------- Keccak-256

_MASK64 = (1 << 64) - 1
_RATE = 136  # bytes; capacity 512 bits gives the 256-bit security level

_ROUND_CONSTANTS = (
    0x0000000000000001, 0x0000000000008082, 0x800000000000808A, 0x8000000080008000,
    0x000000000000808B, 0x0000000080000001, 0x8000000080008081, 0x8000000000008009,
    0x000000000000008A, 0x0000000000000088, 0x0000000080008009, 0x000000008000000A,
    0x000000008000808B, 0x800000000000008B, 0x8000000000008089, 0x8000000000008003,
    0x8000000000008002, 0x8000000000000080, 0x000000000000800A, 0x800000008000000A,
    0x8000000080008081, 0x8000000000008080, 0x0000000080000001, 0x8000000080008008,
)  # fmt: skip

# Rotation offsets indexed by lane x + 5*y.
_ROTATIONS = (
    0, 1, 62, 28, 27,
    36, 44, 6, 55, 20,
    3, 10, 43, 25, 39,
    41, 45, 15, 21, 8,
    18, 2, 61, 56, 14,
)  # fmt: skip

# Precomputed rho+pi placement so the round loop is a flat pass: lane i moves to
# _PI_DEST[i] after rotating by _ROTATIONS[i].
_PI_DEST = tuple(y + 5 * ((2 * x + 3 * y) % 5) for y in range(5) for x in range(5))
_PI_SRC_ROT = tuple((x + 5 * y, _ROTATIONS[x + 5 * y]) for y in range(5) for x in range(5))


def _rotl(v: int, n: int) -> int:
    return ((v << n) | (v >> (64 - n))) & _MASK64 if n else v


def _keccak_f(a: list[int]) -> None:
    """Apply the 24-round Keccak-f[1600] permutation to 25 lanes in place."""
    for rc in _ROUND_CONSTANTS:
        # theta
        c = [a[x] ^ a[x + 5] ^ a[x + 10] ^ a[x + 15] ^ a[x + 20] for x in range(5)]
        d = [c[(x - 1) % 5] ^ _rotl(c[(x + 1) % 5], 1) for x in range(5)]
        for i in range(25):
            a[i] ^= d[i % 5]
        # rho and pi
        b = [0] * 25
        for (src, rot), dest in zip(_PI_SRC_ROT, _PI_DEST, strict=True):
            b[dest] = _rotl(a[src], rot)
        # chi
        for y in range(0, 25, 5):
            row = b[y : y + 5]
            for x in range(5):
                a[y + x] = row[x] ^ (~row[(x + 1) % 5] & row[(x + 2) % 5])
        # iota
        a[0] ^= rc


def _sponge(data: bytes, pad: int) -> bytes:
    """Keccak[c=512] sponge with a 256-bit output and the given domain padding byte."""
    # Multi-rate padding: the pad byte, zeros, then 0x80 in the last byte of the block (the
    # two may share one byte). Keccak-256 and SHA3-256 differ only in ``pad``, which lets
    # the tests check this permutation against hashlib.sha3_256.
    padded = bytearray(data)
    padded.append(pad)
    padded.extend(b"\x00" * (-len(padded) % _RATE))
    padded[-1] |= 0x80

    state = [0] * 25
    for off in range(0, len(padded), _RATE):
        for i in range(_RATE // 8):
            state[i] ^= int.from_bytes(padded[off + 8 * i : off + 8 * i + 8], "little")
        _keccak_f(state)
    return b"".join(lane.to_bytes(8, "little") for lane in state[:4])


def keccak256(data: bytes) -> bytes:
    """Return the original Keccak-256 digest (pad byte 0x01), as used by Monero."""
    return _sponge(data, 0x01)


# --------------------------------------------------------------------------- base58

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {ch: i for i, ch in enumerate(_ALPHABET)}
_FULL_BLOCK = 8
_FULL_ENCODED = 11
# Encoded length of a block of n bytes, n = 0..8.
_ENCODED_LEN = (0, 2, 3, 5, 6, 7, 9, 10, 11)
_DECODED_LEN = {enc: n for n, enc in enumerate(_ENCODED_LEN)}


def _encode_block(block: bytes) -> str:
    num = int.from_bytes(block, "big")
    chars: list[str] = []
    while num:
        num, rem = divmod(num, 58)
        chars.append(_ALPHABET[rem])
    width = _ENCODED_LEN[len(block)]
    return "".join(reversed(chars)).rjust(width, _ALPHABET[0])


def _decode_block(chunk: str, size: int) -> bytes:
    num = 0
    for ch in chunk:
        digit = _INDEX.get(ch)
        if digit is None:
            raise AddressError(f"invalid base58 character {ch!r}")
        num = num * 58 + digit
    # An 11-char chunk can represent up to 58**11 > 2**64, so out-of-range values must be
    # refused rather than silently truncated.
    if num >> (8 * size):
        raise AddressError(f"base58 block {chunk!r} overflows {size} bytes")
    return num.to_bytes(size, "big")


def b58encode(data: bytes) -> str:
    """Encode bytes with Monero's block-wise base58."""
    return "".join(
        _encode_block(data[i : i + _FULL_BLOCK]) for i in range(0, len(data), _FULL_BLOCK)
    )


def b58decode(s: str) -> bytes:
    """Decode Monero block-wise base58, raising AddressError on any malformed input."""
    if not isinstance(s, str):
        raise AddressError(f"base58 input must be str, not {type(s).__name__}")
    full, tail = divmod(len(s), _FULL_ENCODED)
    tail_size = _DECODED_LEN.get(tail)
    if tail_size is None:
        raise AddressError(f"invalid base58 length {len(s)}: final block of {tail} chars")
    out = bytearray()
    for i in range(full):
        chunk = s[i * _FULL_ENCODED : (i + 1) * _FULL_ENCODED]
        out += _decode_block(chunk, _FULL_BLOCK)
    if tail:
        out += _decode_block(s[full * _FULL_ENCODED :], tail_size)
    return bytes(out)


# --------------------------------------------------------------------------- addresses

Network = Literal["mainnet", "testnet", "stagenet"]
Kind = Literal["standard", "integrated", "subaddress"]

NETWORK_BYTES: dict[Network, dict[Kind, int]] = {
    "mainnet": {"standard": 18, "integrated": 19, "subaddress": 42},
    "testnet": {"standard": 53, "integrated": 54, "subaddress": 63},
    "stagenet": {"standard": 24, "integrated": 25, "subaddress": 36},
}
_BY_NET_BYTE: dict[int, tuple[Network, Kind]] = {
    byte: (net, kind) for net, kinds in NETWORK_BYTES.items() for kind, byte in kinds.items()
}

_KEY_LEN = 32
_PID_LEN = 8
_CHECKSUM_LEN = 4


@dataclass(frozen=True)
class Address:
    """A decoded Monero address. ``payment_id`` is set exactly when kind is integrated."""

    network: Network
    kind: Kind
    spend_key: bytes
    view_key: bytes
    payment_id: bytes | None = None

    def __post_init__(self) -> None:
        if self.network not in NETWORK_BYTES:
            raise AddressError(f"unknown network {self.network!r}")
        if self.kind not in get_args(Kind):
            raise AddressError(f"unknown address kind {self.kind!r}")
        if len(self.spend_key) != _KEY_LEN or len(self.view_key) != _KEY_LEN:
            raise AddressError(f"spend and view keys must be {_KEY_LEN} bytes")
        if self.kind == "integrated":
            if self.payment_id is None or len(self.payment_id) != _PID_LEN:
                raise AddressError(f"integrated address needs a {_PID_LEN}-byte payment id")
        elif self.payment_id is not None:
            raise AddressError(f"a {self.kind} address cannot carry a payment id")

    def encode(self) -> str:
        """Serialise back to the base58 address string, recomputing the checksum."""
        body = bytes([NETWORK_BYTES[self.network][self.kind]]) + self.spend_key + self.view_key
        if self.payment_id is not None:
            body += self.payment_id
        return b58encode(body + keccak256(body)[:_CHECKSUM_LEN])


def parse_address(s: str) -> Address:
    """Decode and validate a Monero address string of any kind on any network."""
    raw = b58decode(s)
    if not raw:
        raise AddressError("empty address")
    found = _BY_NET_BYTE.get(raw[0])
    if found is None:
        raise AddressError(f"unknown network byte {raw[0]}")
    network, kind = found
    expected = 1 + 2 * _KEY_LEN + _CHECKSUM_LEN + (_PID_LEN if kind == "integrated" else 0)
    if len(raw) != expected:
        raise AddressError(f"{network} {kind} address must be {expected} bytes, got {len(raw)}")
    body, checksum = raw[:-_CHECKSUM_LEN], raw[-_CHECKSUM_LEN:]
    if keccak256(body)[:_CHECKSUM_LEN] != checksum:
        raise AddressError("address checksum mismatch")
    return Address(
        network=network,
        kind=kind,
        spend_key=body[1 : 1 + _KEY_LEN],
        view_key=body[1 + _KEY_LEN : 1 + 2 * _KEY_LEN],
        payment_id=body[1 + 2 * _KEY_LEN :] if kind == "integrated" else None,
    )


def make_integrated_address(standard: str, payment_id: bytes) -> str:
    """Combine a standard (primary) address with an 8-byte payment id."""
    base = parse_address(standard)
    if base.kind != "standard":
        # Wallets cannot derive an integrated address from a subaddress, and nesting
        # payment ids is meaningless, so only a primary address is a valid base.
        raise AddressError(f"integrated addresses need a standard base address, got {base.kind}")
    if len(payment_id) != _PID_LEN:
        raise AddressError(f"payment id must be exactly {_PID_LEN} bytes, got {len(payment_id)}")
    if not any(payment_id):
        # The wallet uses an all-zero id as its "no payment id" dummy, so funds sent with it
        # could not be told apart from unattributed ones.
        raise AddressError("payment id must not be all zero (reserved as 'no payment id')")
    integrated = Address(
        network=base.network,
        kind="integrated",
        spend_key=base.spend_key,
        view_key=base.view_key,
        payment_id=bytes(payment_id),
    )
    return integrated.encode()


def split_integrated_address(s: str) -> tuple[str, bytes]:
    """Return the standard address and 8-byte payment id inside an integrated address."""
    addr = parse_address(s)
    if addr.kind != "integrated" or addr.payment_id is None:
        raise AddressError(f"expected an integrated address, got {addr.kind}")
    standard = Address(
        network=addr.network,
        kind="standard",
        spend_key=addr.spend_key,
        view_key=addr.view_key,
    )
    return standard.encode(), addr.payment_id
