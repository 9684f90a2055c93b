import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anonticket.domain import (
    PID_ALL_ZERO,
    PID_LEGACY,
    PID_NON_HEX,
    PID_NOT_TEXT,
    PID_WRONG_LENGTH,
    TOKEN_NON_HEX,
    TOKEN_WRONG_LENGTH,
    DomainError,
    InvalidPaymentId,
    InvalidToken,
    PaymentId,
    ServiceToken,
    derive_service_token,
)

HEX = "0123456789abcdefABCDEF"


def test_token_vector_of_the_spec():
    token = derive_service_token(PaymentId.parse("0123456789abcdef"), "tx1")
    assert token.hex == "369e0f7c09124783e45fa6a6b7588733e362e2917f36fb7036f49284c1952fa9"


def test_token_is_sha3_of_pid_bar_txid():
    txid = "ab" * 32
    token = derive_service_token(PaymentId.parse("00000000000000ff"), txid.upper())
    assert token.raw == hashlib.sha3_256(f"00000000000000ff|{txid}".encode()).digest()


def test_pid_is_case_insensitive_and_canonical_lowercase():
    assert PaymentId.parse("ABCDEFAB12345678").hex == "abcdefab12345678"
    assert PaymentId.parse("ABCDEFAB12345678") == PaymentId.parse("abcdefab12345678")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("deadbeef", PID_WRONG_LENGTH),
        ("", PID_WRONG_LENGTH),
        ("0123456789abcdef0", PID_WRONG_LENGTH),
        ("z" * 16, PID_NON_HEX),
        ("0123456789abcdeg", PID_NON_HEX),
        (" 123456789abcdef", PID_NON_HEX),
        ("0123456789abcde\u0663", PID_NON_HEX),  # an Arabic-Indic digit: int() would take it
        ("0" * 16, PID_ALL_ZERO),
        ("ab" * 32, PID_LEGACY),
        (12345, PID_NOT_TEXT),
        (None, PID_NOT_TEXT),
    ],
)
def test_pid_rejections_have_distinct_stable_messages(text, message):
    with pytest.raises(InvalidPaymentId) as e:
        PaymentId.parse(text)
    assert str(e.value) == message
    assert e.value.code == "invalid_pid"


def test_all_zero_and_legacy_messages_differ_from_each_other_and_length():
    assert len({PID_ALL_ZERO, PID_LEGACY, PID_WRONG_LENGTH, PID_NON_HEX}) == 4


def test_pid_repr_hides_the_secret():
    pid = PaymentId.parse("0123456789abcdef")
    assert "0123" not in repr(pid) and "0123" not in str(pid)


def test_token_parse_and_reject():
    text = "AB" * 32
    assert ServiceToken.parse(text).hex == "ab" * 32
    with pytest.raises(InvalidToken) as e:
        ServiceToken.parse("ab" * 31)
    assert str(e.value) == TOKEN_WRONG_LENGTH
    with pytest.raises(InvalidToken) as e:
        ServiceToken.parse("zz" * 32)
    assert str(e.value) == TOKEN_NON_HEX
    assert "abab" not in repr(ServiceToken.parse(text))


@given(st.text(max_size=80))
def test_pid_parser_parses_to_canonical_form_or_rejects(text):
    try:
        pid = PaymentId.parse(text)
    except DomainError as e:
        assert e.code == "invalid_pid"
        assert str(e) in {PID_ALL_ZERO, PID_LEGACY, PID_NON_HEX, PID_WRONG_LENGTH}
    else:
        assert len(text) == 16 and pid.hex == text.lower()
        assert PaymentId.parse(pid.hex) == pid


@given(st.text(alphabet=HEX, min_size=16, max_size=16))
def test_every_nonzero_16_hex_string_is_a_pid(text):
    if int(text, 16) == 0:
        with pytest.raises(InvalidPaymentId):
            PaymentId.parse(text)
    else:
        assert PaymentId.parse(text).raw == bytes.fromhex(text)


@given(st.one_of(st.text(max_size=130), st.text(alphabet=HEX, min_size=64, max_size=64)))
def test_token_parser_parses_to_canonical_form_or_rejects(text):
    try:
        token = ServiceToken.parse(text)
    except DomainError as e:
        assert e.code == "invalid_token"
        assert str(e) in {TOKEN_WRONG_LENGTH, TOKEN_NON_HEX}
    else:
        assert token.hex == text.lower()


@given(st.binary(min_size=8, max_size=8).filter(any), st.text(min_size=1, max_size=64))
def test_derivation_is_deterministic_and_pid_sensitive(raw, txid):
    txid = txid.encode().hex()
    pid = PaymentId(raw)
    other = PaymentId(bytes([raw[0] ^ 1]) + raw[1:]) if any(bytes([raw[0] ^ 1]) + raw[1:]) else None
    assert derive_service_token(pid, txid) == derive_service_token(pid, txid)
    if other is not None:
        assert derive_service_token(other, txid) != derive_service_token(pid, txid)
