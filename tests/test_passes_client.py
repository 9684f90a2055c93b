"""The client picks the issuer's key as RFC 9578 section 4 says, never just the first one."""

from __future__ import annotations

import base64

import pytest

from anonticket.passes.client import PassError, choose_token_key

OLD = b"\x02" + b"\x01" * 48
NEW = b"\x03" + b"\x02" * 48
LATER = b"\x02" + b"\x03" * 48


def entry(key: bytes, token_type: int = 1, not_before: object = None) -> dict[str, object]:
    found: dict[str, object] = {
        "token-type": token_type,
        "token-key": base64.urlsafe_b64encode(key).decode(),
    }
    if not_before is not None:
        found["not-before"] = not_before
    return found


def test_the_most_recent_key_in_use_is_chosen_whatever_the_order() -> None:
    directory = {
        "token-keys": [
            entry(LATER, not_before=2_000),  # announced, not in use yet
            entry(NEW, token_type=2, not_before=900),  # another token type (RSA blind sigs)
            entry(OLD, not_before=100),
            entry(NEW, not_before=500),
        ]
    }
    assert choose_token_key(directory, now=1_000) == NEW
    assert choose_token_key(directory, now=2_000) == LATER
    assert choose_token_key({"token-keys": [entry(OLD)]}, now=0) == OLD  # no not-before


@pytest.mark.parametrize(
    "directory",
    [
        {},
        {"token-keys": []},
        {"token-keys": "x"},
        [],
        {"token-keys": [entry(OLD, token_type=2)]},
        {"token-keys": [entry(OLD, not_before=5_000)]},
        {"token-keys": [entry(OLD, not_before="soon")]},
        {"token-keys": [entry(OLD, not_before=True)]},
        {"token-keys": [entry(OLD[:48])]},  # not a P-384 point's size
        {"token-keys": [{"token-type": 1, "token-key": "***"}]},
        {"token-keys": [None, 7]},
    ],
)
def test_no_usable_key_is_one_clear_error(directory: object) -> None:
    with pytest.raises(PassError, match="names no token key of type 1 in use now"):
        choose_token_key(directory, now=1_000)
