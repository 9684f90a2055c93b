"""Tests for anonticket.address: Keccak-256, Monero base58 and address handling."""

from __future__ import annotations

import hashlib
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anonticket.address import (
    NETWORK_BYTES,
    Address,
    AddressError,
    Kind,
    Network,
    _sponge,
    b58decode,
    b58encode,
    keccak256,
    make_integrated_address,
    parse_address,
    split_integrated_address,
)

PRIMARY = (
    "4ADT1BtbxqEWeMKp9GgPr2NeyJXXtNxvoDawpyA4WpzFcGcoHUvXeijE66DNfohE9r1bQYaBiQjEtKE7CtkTdLwi"
    "DznFzra"
)
PAYMENT_ID = bytes.fromhex("0123456789abcdef")
INTEGRATED = (
    "4Kv81zi6a6kWeMKp9GgPr2NeyJXXtNxvoDawpyA4WpzFcGcoHUvXeijE66DNfohE9r1bQYaBiQjEtKE7CtkTdLwi"
    "LEgreQtSJKWTyvJ8n1"
)
ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
NETWORKS: tuple[Network, ...] = get_args(Network)
KINDS: tuple[Kind, ...] = get_args(Kind)

keys = st.binary(min_size=32, max_size=32)
nonzero_pids = st.binary(min_size=8, max_size=8).filter(any)


def _with_checksum(body: bytes) -> str:
    return b58encode(body + keccak256(body)[:4])


# --------------------------------------------------------------------------- keccak


@pytest.mark.parametrize(
    ("data", "digest"),
    [
        (b"", "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"),
        (b"abc", "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45"),
        (
            b"The quick brown fox jumps over the lazy dog",
            "4d741b6f1eb29cb2a9b9911c82f56fa8d73b04959d3d9d222895df6c0b28aa15",
        ),
    ],
)
def test_keccak256_known_vectors(data: bytes, digest: str) -> None:
    assert keccak256(data).hex() == digest


def test_keccak256_is_not_fips_sha3() -> None:
    assert keccak256(b"abc") != hashlib.sha3_256(b"abc").digest()


@pytest.mark.parametrize("length", [0, 1, 134, 135, 136, 137, 271, 272, 273, 500])
def test_sponge_matches_hashlib_sha3_across_block_boundaries(length: int) -> None:
    # SHA3-256 is the same sponge with pad byte 0x06, so agreeing with hashlib on multi-block
    # inputs cross-checks the permutation and absorption that keccak256 relies on.
    data = bytes(range(256)) * 2
    data = data[:length]
    assert _sponge(data, 0x06) == hashlib.sha3_256(data).digest()


@given(st.binary(max_size=700))
def test_sponge_matches_hashlib_sha3_property(data: bytes) -> None:
    assert _sponge(data, 0x06) == hashlib.sha3_256(data).digest()


def test_keccak256_rate_boundary_lengths_differ() -> None:
    digests = {keccak256(b"a" * n) for n in (135, 136, 137)}
    assert len(digests) == 3
    assert all(len(d) == 32 for d in digests)


# --------------------------------------------------------------------------- base58


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        (b"", ""),
        (b"\x00", "11"),
        (b"\x01", "12"),
        (b"\x39", "1z"),
        (b"\x3a", "21"),
        (b"\xff", "5Q"),
        (b"\x00" * 8, "1" * 11),
        (b"\x00" * 9, "1" * 13),
        (b"\xff" * 8, "jpXCZedGfVQ"),
    ],
)
def test_b58_known_vectors(raw: bytes, encoded: str) -> None:
    assert b58encode(raw) == encoded
    assert b58decode(encoded) == raw


@given(st.binary(max_size=100))
def test_b58_round_trip(data: bytes) -> None:
    assert b58decode(b58encode(data)) == data


@given(st.binary(max_size=100))
def test_b58_encoded_length_rule(data: bytes) -> None:
    full, tail = divmod(len(data), 8)
    expected = 11 * full + [0, 2, 3, 5, 6, 7, 9, 10, 11][tail]
    encoded = b58encode(data)
    assert len(encoded) == expected
    assert set(encoded) <= set(ALPHABET)


@pytest.mark.parametrize("bad", ["0", "O", "I", "l", "+", " ", "é"])
def test_b58_rejects_characters_outside_alphabet(bad: str) -> None:
    with pytest.raises(AddressError, match="invalid base58 character"):
        b58decode("1" + bad)


@pytest.mark.parametrize("length", [1, 4, 8, 12, 15, 19])
def test_b58_rejects_impossible_final_block_length(length: int) -> None:
    with pytest.raises(AddressError, match="invalid base58 length"):
        b58decode("1" * length)


@pytest.mark.parametrize("chunk", ["zzzzzzzzzzz", "5R", "zz", "zzz", "1" * 11 + "zzzzz"])
def test_b58_rejects_block_overflow(chunk: str) -> None:
    with pytest.raises(AddressError, match="overflows"):
        b58decode(chunk)


def test_b58_accepts_block_maxima() -> None:
    assert b58decode("jpXCZedGfVQ") == b"\xff" * 8
    assert b58decode("5Q") == b"\xff"


@given(st.text(max_size=40))
def test_b58decode_any_text_returns_bytes_or_address_error(s: str) -> None:
    try:
        result = b58decode(s)
    except AddressError:
        return
    assert isinstance(result, bytes)
    # Each decodable string has exactly one encoding, so it must re-encode to itself.
    assert b58encode(result) == s


@given(st.text(alphabet=ALPHABET, max_size=40))
def test_b58decode_alphabet_text_is_canonical_or_rejected(s: str) -> None:
    try:
        result = b58decode(s)
    except AddressError:
        return
    assert b58encode(result) == s


def test_b58decode_rejects_non_str() -> None:
    with pytest.raises(AddressError):
        b58decode(b"11")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- network table


def test_network_table() -> None:
    assert NETWORK_BYTES == {
        "mainnet": {"standard": 18, "integrated": 19, "subaddress": 42},
        "testnet": {"standard": 53, "integrated": 54, "subaddress": 63},
        "stagenet": {"standard": 24, "integrated": 25, "subaddress": 36},
    }
    assert set(NETWORKS) == {"mainnet", "testnet", "stagenet"}
    assert set(KINDS) == {"standard", "integrated", "subaddress"}


# --------------------------------------------------------------------------- parse / encode


def test_parse_primary_vector() -> None:
    addr = parse_address(PRIMARY)
    assert addr.network == "mainnet"
    assert addr.kind == "standard"
    assert len(addr.spend_key) == 32
    assert len(addr.view_key) == 32
    assert addr.payment_id is None
    assert addr.encode() == PRIMARY


def test_parse_integrated_vector() -> None:
    addr = parse_address(INTEGRATED)
    primary = parse_address(PRIMARY)
    assert len(INTEGRATED) == 106
    assert addr.network == "mainnet"
    assert addr.kind == "integrated"
    assert addr.payment_id == PAYMENT_ID
    assert addr.spend_key == primary.spend_key
    assert addr.view_key == primary.view_key
    assert addr.encode() == INTEGRATED


def test_make_integrated_address_vector() -> None:
    assert make_integrated_address(PRIMARY, PAYMENT_ID) == INTEGRATED


def test_split_integrated_address_vector() -> None:
    assert split_integrated_address(INTEGRATED) == (PRIMARY, PAYMENT_ID)


def test_checksum_corruption_rejected() -> None:
    corrupted = PRIMARY[:50] + ("z" if PRIMARY[50] != "z" else "y") + PRIMARY[51:]
    with pytest.raises(AddressError, match="checksum"):
        parse_address(corrupted)


def test_every_single_char_change_rejected() -> None:
    for pos, original in enumerate(PRIMARY):
        replacement = "2" if original != "2" else "3"
        with pytest.raises(AddressError):
            parse_address(PRIMARY[:pos] + replacement + PRIMARY[pos + 1 :])


def test_unknown_network_byte_rejected() -> None:
    body = bytes([0x99]) + bytes(range(64))
    with pytest.raises(AddressError, match="unknown network byte"):
        parse_address(_with_checksum(body))


def test_wrong_length_for_kind_rejected() -> None:
    # A standard net byte followed by integrated-sized content, checksum still valid.
    body = bytes([18]) + bytes(range(72))
    with pytest.raises(AddressError, match="must be 69 bytes"):
        parse_address(_with_checksum(body))
    # An integrated net byte with only standard-sized content.
    body = bytes([19]) + bytes(range(64))
    with pytest.raises(AddressError, match="must be 77 bytes"):
        parse_address(_with_checksum(body))


@pytest.mark.parametrize("s", ["", "1", PRIMARY[:-1], PRIMARY + "1", INTEGRATED[:95]])
def test_truncated_or_malformed_rejected(s: str) -> None:
    with pytest.raises(AddressError):
        parse_address(s)


@given(st.text(max_size=120))
def test_parse_address_any_text_parses_or_address_error(s: str) -> None:
    try:
        addr = parse_address(s)
    except AddressError:
        return
    assert addr.encode() == s


@settings(max_examples=50)
@given(st.text(alphabet=ALPHABET, min_size=95, max_size=106))
def test_parse_address_alphabet_text_parses_or_address_error(s: str) -> None:
    try:
        addr = parse_address(s)
    except AddressError:
        return
    assert addr.encode() == s


@settings(max_examples=50)
@given(net_byte=st.integers(0, 255), payload=st.binary(max_size=80))
def test_parse_address_checksummed_payloads(net_byte: int, payload: bytes) -> None:
    # Valid checksums get past the first line of defence, exercising the net-byte and
    # length checks.
    s = _with_checksum(bytes([net_byte]) + payload)
    try:
        addr = parse_address(s)
    except AddressError:
        return
    assert NETWORK_BYTES[addr.network][addr.kind] == net_byte
    assert addr.encode() == s


@settings(max_examples=30)
@given(network=st.sampled_from(NETWORKS), kind=st.sampled_from(KINDS), spend=keys, view=keys)
def test_address_encode_parse_round_trip(
    network: Network, kind: Kind, spend: bytes, view: bytes
) -> None:
    pid = PAYMENT_ID if kind == "integrated" else None
    addr = Address(network=network, kind=kind, spend_key=spend, view_key=view, payment_id=pid)
    encoded = addr.encode()
    assert len(encoded) == (106 if kind == "integrated" else 95)
    assert parse_address(encoded) == addr


def test_address_constructor_validates() -> None:
    key = bytes(32)
    with pytest.raises(AddressError, match="keys"):
        Address(network="mainnet", kind="standard", spend_key=bytes(31), view_key=key)
    with pytest.raises(AddressError, match="payment id"):
        Address(network="mainnet", kind="integrated", spend_key=key, view_key=key)
    with pytest.raises(AddressError, match="cannot carry"):
        Address(
            network="mainnet", kind="standard", spend_key=key, view_key=key, payment_id=PAYMENT_ID
        )
    with pytest.raises(AddressError, match="unknown network"):
        Address(network="moon", kind="standard", spend_key=key, view_key=key)  # type: ignore[arg-type]


def test_address_is_frozen() -> None:
    addr = parse_address(PRIMARY)
    with pytest.raises(AttributeError):
        addr.kind = "subaddress"  # type: ignore[misc]


# --------------------------------------------------------------------------- integrated


def test_integrated_as_base_rejected() -> None:
    with pytest.raises(AddressError, match="standard base address, got integrated"):
        make_integrated_address(INTEGRATED, PAYMENT_ID)


def test_subaddress_as_base_rejected() -> None:
    primary = parse_address(PRIMARY)
    sub = Address(
        network="mainnet",
        kind="subaddress",
        spend_key=primary.spend_key,
        view_key=primary.view_key,
    ).encode()
    assert sub[0] == "8"
    with pytest.raises(AddressError, match="standard base address, got subaddress"):
        make_integrated_address(sub, PAYMENT_ID)


def test_all_zero_payment_id_rejected() -> None:
    with pytest.raises(AddressError, match="all zero"):
        make_integrated_address(PRIMARY, bytes(8))


@pytest.mark.parametrize("pid", [b"", b"\x01" * 7, b"\x01" * 9, b"\x01" * 32])
def test_wrong_length_payment_id_rejected(pid: bytes) -> None:
    with pytest.raises(AddressError, match="exactly 8 bytes"):
        make_integrated_address(PRIMARY, pid)


def test_split_rejects_non_integrated() -> None:
    with pytest.raises(AddressError, match="expected an integrated address, got standard"):
        split_integrated_address(PRIMARY)


def test_split_rejects_garbage() -> None:
    with pytest.raises(AddressError):
        split_integrated_address("not an address")


@settings(max_examples=40)
@given(network=st.sampled_from(NETWORKS), spend=keys, view=keys, pid=nonzero_pids)
def test_make_then_split_round_trip(
    network: Network, spend: bytes, view: bytes, pid: bytes
) -> None:
    standard = Address(network=network, kind="standard", spend_key=spend, view_key=view).encode()
    integrated = make_integrated_address(standard, pid)
    parsed = parse_address(integrated)
    assert parsed.kind == "integrated"
    assert parsed.network == network
    assert split_integrated_address(integrated) == (standard, pid)
