"""The bytes of RFC 9578 issuance protocol 1 (VOPRF(P-384, SHA-384)) and of an RFC 9577 token.

    TokenRequest  = token_type (2) | truncated_token_key_id (1) | blinded_msg (49)
    TokenResponse = evaluate_msg (49) | evaluate_proof (96)
    Token         = token_type (2) | nonce (32) | challenge_digest (32) | token_key_id (32)
                    | authenticator (48)

The token's VOPRF input is the token without its authenticator.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Final

TOKEN_TYPE: Final = 0x0001
ELEMENT: Final = 49  # a compressed P-384 point
PROOF: Final = 96  # c | s, two scalars
AUTHENTICATOR: Final = 48  # SHA-384
REQUEST_SIZE: Final = 2 + 1 + ELEMENT
RESPONSE_SIZE: Final = ELEMENT + PROOF
TOKEN_SIZE: Final = 2 + 32 + 32 + 32 + AUTHENTICATOR
REQUEST_MEDIA: Final = "application/private-token-request"
RESPONSE_MEDIA: Final = "application/private-token-response"
DIRECTORY_MEDIA: Final = "application/private-token-issuer-directory"


def b64url(data: bytes) -> str:
    """base64url without padding, as the batch form and RFC 9577 headers write it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def from_b64url(text: str) -> bytes:
    """base64url, padded or not (RFC 9578's directory pads; most clients do not)."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class WireError(ValueError):
    """Bytes that are not what they should be; the message is safe to show."""


def token_key_id(public_key: bytes) -> bytes:
    """RFC 9578: SHA-256 of the serialized public key."""
    return hashlib.sha256(public_key).digest()


@dataclass(frozen=True, slots=True)
class TokenRequest:
    truncated_key_id: int
    blinded: bytes

    @classmethod
    def parse(cls, data: bytes) -> TokenRequest:
        if len(data) != REQUEST_SIZE:
            raise WireError(f"a TokenRequest is {REQUEST_SIZE} bytes")
        if int.from_bytes(data[:2], "big") != TOKEN_TYPE:
            raise WireError("only token type 1 (VOPRF(P-384, SHA-384)) is issued here")
        return cls(data[2], data[3:])

    def serialize(self) -> bytes:
        return TOKEN_TYPE.to_bytes(2, "big") + bytes([self.truncated_key_id]) + self.blinded


def token_response(element: bytes, proof: bytes) -> bytes:
    return element + proof


@dataclass(frozen=True, slots=True)
class Token:
    nonce: bytes
    challenge_digest: bytes
    key_id: bytes
    authenticator: bytes

    @classmethod
    def parse(cls, data: bytes) -> Token:
        if len(data) != TOKEN_SIZE or int.from_bytes(data[:2], "big") != TOKEN_TYPE:
            raise WireError(f"a type-1 token is {TOKEN_SIZE} bytes starting 0x0001")
        return cls(data[2:34], data[34:66], data[66:98], data[98:])

    @property
    def input(self) -> bytes:
        """What the authenticator is the VOPRF output of."""
        return TOKEN_TYPE.to_bytes(2, "big") + self.nonce + self.challenge_digest + self.key_id

    def serialize(self) -> bytes:
        return self.input + self.authenticator
