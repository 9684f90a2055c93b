"""Passes with an independent implementation (issue #16 item 7): Cloudflare's privacypass-ts and
voprf-ts (TypeScript, tests/interop/client.mjs, installed by scripts/setup) buy passes from the
daemon and finalize them, verifying the issuer's proofs; the service verifies them once.  The
other way round, their issuer answers our client and the daemon verifies the pass, and their
code derives the same keys from pass.key and recomputes the daemon's authenticators."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from collections.abc import Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from anonticket.passes.client import token_challenge
from anonticket.passes.wire import Token, TokenRequest, b64url, from_b64url, token_key_id

from .conftest import get_json, post_json, reactor
from .test_passes import (
    AMOUNT,
    PRICE,
    blind,
    directory,
    finalize,
    funded_token,
    key_file,
    pass_daemon,
)

INTEROP = Path(__file__).parent / "interop"
NODE = shutil.which("node")
SEED = "5e" * 32
INFO = "interop"
LIFETIME = 86400  # a rotating key: its RFC 9497 info is "interop #<period>"
DIRECTORY_PATH = "/.well-known/private-token-issuer-directory"
T = TypeVar("T")

pytestmark = pytest.mark.skipif(
    NODE is None,
    reason="node is not installed: scripts/setup installs Debian's nodejs and npm and runs "
    "npm ci in tests/interop",
)


async def client(*args: str) -> tuple[int, str, str]:
    """Run tests/interop/client.mjs; (exit code, stdout, stderr)."""
    assert NODE is not None
    if not (INTEROP / "node_modules" / "@cloudflare" / "privacypass-ts").is_dir():
        pytest.fail("tests/interop/node_modules is missing: run scripts/setup")
    out, err, code = await getProcessOutputAndValue(
        NODE,
        [str(INTEROP / "client.mjs"), *args],
        env={"PATH": os.environ.get("PATH", os.defpath)},
        path=str(INTEROP),
        reactor=reactor,
    )
    return code, out.decode(), err.decode()


async def concurrently(*runs: Coroutine[Any, Any, T]) -> list[T]:
    return await gatherResults([ensureDeferred(run) for run in runs], consumeErrors=True)


def padded(data: bytes) -> str:
    """base64url with padding, as RFC 9578 writes keys and privacypass-ts parses them."""
    return base64.urlsafe_b64encode(data).decode()


@asynccontextmanager
async def issuer(tmp_path: Path):
    """The daemon selling passes under keys derived from SEED and INFO, rotated daily."""
    extra = {
        "pass-key-file": str(key_file(tmp_path, SEED, INFO)),
        "pass-key-lifetime": str(LIFETIME),
    }
    async with pass_daemon(tmp_path, **extra) as daemon:
        yield daemon


async def current_info(daemon, http) -> tuple[bytes, str]:
    """The directory's key and the RFC 9497 info it is derived with."""
    public_key, body = await directory(daemon, http)
    return public_key, f"{INFO} #{body['token-keys'][0]['not-before'] // LIFETIME}"


@pytest_twisted.ensureDeferred
async def test_passes_bought_with_privacypass_ts_verify_once(tmp_path, http):
    async with issuer(tmp_path) as daemon:
        public_key, info = await current_info(daemon, http)
        token = await funded_token(daemon, http)
        url = daemon.public_url + DIRECTORY_PATH
        # The service's RFC 9577 challenge (built by anonticket's client code), as
        # docs/passes.md tells it to send one.
        challenge = token_challenge(
            urlsplit(daemon.public_url).netloc, os.urandom(32), "service.example"
        )
        offer = f'PrivateToken challenge="{padded(challenge)}", token-key="{padded(public_key)}"'
        ways = (
            ["--www-authenticate", offer],
            ["--www-authenticate", offer],
            ["--issuer-name", "issuer.example", "--origin-info", "a.example,b.example"],
        )
        runs = [
            client("buy", url, "--token", token, "--idempotency-key", f"interop-{i}", *way)
            for i, way in enumerate(ways)
        ]
        bought = []
        for code, out, err in await concurrently(*runs):
            assert code == 0, err
            bought.append(json.loads(out))
        for answer in bought:
            the_pass = Token.parse(from_b64url(answer["token"]))
            assert the_pass.key_id == token_key_id(public_key)
            digest = hashlib.sha256(from_b64url(answer["challenge"])).hexdigest()
            assert the_pass.challenge_digest.hex() == answer["challenge_digest"] == digest
        assert [from_b64url(a["challenge"]) == challenge for a in bought] == [True, True, False]
        assert from_b64url(bought[2]["challenge"]).endswith(b"\x00\x13a.example,b.example")
        assert len({Token.parse(from_b64url(a["token"])).nonce for a in bought}) == 3
        _, view, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
        assert view["balance"] == AMOUNT - 3 * PRICE

        tokens = [a["token"] for a in bought]
        previous = f"{INFO} #{int(info.rsplit('#', 1)[1]) - 1}"
        theirs, stale, reused = await concurrently(
            # Their code recomputes the authenticators with the key it derives from pass.key.
            client("verify", "--seed", SEED, "--info", info, *tokens),
            client("verify", "--seed", SEED, "--info", previous, tokens[0]),
            # A used Idempotency-Key with a new request: refused (422), and the client fails.
            client("buy", url, "--token", token, "--idempotency-key", "interop-0", *ways[0]),
        )
        assert theirs[:2] == (0, "valid\n" * 3), theirs
        assert stale[:2] == (1, "invalid\n"), stale
        code, out, err = reused
        assert (code, out) == (2, "") and "422" in err and "idempotency_key_reused" in err
        verify = daemon.internal_url + "/api/v1/passes/verify"
        for answer in bought:
            # The service takes the token from their Authorization header (padded base64url).
            header = re.fullmatch(
                r'PrivateToken token="([A-Za-z0-9_-]+=*)"', answer["authorization"]
            )
            assert header is not None, answer["authorization"]
            code, body, _ = await post_json(http, verify, {"token": header[1]})
            assert (code, body) == (200, {"status": "valid"})
            code, body, _ = await post_json(http, verify, {"token": answer["token"]})
            assert (code, body["code"]) == (409, "pass_already_used")


@pytest_twisted.ensureDeferred
async def test_their_issuer_answers_our_client_and_the_daemon_verifies_the_pass(tmp_path, http):
    async with issuer(tmp_path) as daemon:
        public_key, info = await current_info(daemon, http)
        state, token_input, request = blind(public_key)
        code, out, err = await client("issue", "--seed", SEED, "--info", info, b64url(request))
        assert code == 0, err
        # The voprf package verifies their proof against the directory's key.
        the_pass = finalize(state, token_input, from_b64url(out.strip()), public_key)
        verify = daemon.internal_url + "/api/v1/passes/verify"
        code, body, _ = await post_json(http, verify, {"token": b64url(the_pass)})
        assert (code, body) == (200, {"status": "valid"})
        # A request for another key is not answered.
        wrong = TokenRequest(token_key_id(public_key)[-1] ^ 1, request[3:]).serialize()
        code, out, err = await client("issue", "--seed", SEED, "--info", info, b64url(wrong))
        assert (code, out) == (2, "") and "another key" in err


class Tampering(Resource):
    """The daemon's issuer behind a proxy that changes one byte of each TokenResponse."""

    isLeaf = True

    def __init__(self, http, upstream: str, flip: int) -> None:
        super().__init__()
        self.http, self.upstream, self.flip = http, upstream, flip
        self.url = ""

    def render(self, request):
        ensureDeferred(self.answer(request))
        return NOT_DONE_YET

    async def answer(self, request) -> None:
        content: bytes | bytearray
        if request.method == b"GET":
            response = await self.http.get(self.upstream + DIRECTORY_PATH)
            body = json.loads(await response.content())
            body["issuer-request-uri"] = self.url + "/request"
            content = json.dumps(body).encode()
        else:
            names = (b"content-type", b"authorization", b"idempotency-key")
            response = await self.http.post(
                self.upstream + "/api/v1/passes/token-request",
                data=request.content.read(),
                headers={name: request.getHeader(name) for name in names},
            )
            content = bytearray(await response.content())
            content[self.flip] ^= 1
        request.setResponseCode(response.code)
        request.setHeader(b"content-type", response.headers.getRawHeaders(b"content-type")[0])
        request.write(bytes(content))
        request.finish()


@pytest_twisted.ensureDeferred
async def test_a_response_that_does_not_prove_its_key_fails_their_client(tmp_path, http):
    async with issuer(tmp_path) as daemon:
        token = await funded_token(daemon, http)
        ports, runs = [], []
        # The evaluated element's sign (0x02/0x03: still a point, the wrong one), the last byte
        # of the proof's c, of its s.
        for flip in (0, 49 + 47, 144):
            proxy = Tampering(http, daemon.public_url, flip)
            ports.append(reactor.listenTCP(0, Site(proxy), interface="127.0.0.1"))
            proxy.url = f"http://127.0.0.1:{ports[-1].getHost().port}"
            url = proxy.url + DIRECTORY_PATH
            runs.append(client("buy", url, "--token", token, "--idempotency-key", f"t{flip}"))
        try:
            results = await concurrently(*runs)
        finally:
            for port in ports:
                await port.stopListening()
        for code, out, err in results:
            assert (code, out) == (2, ""), err
            assert "client.mjs: proof failed" in err.splitlines(), err


@pytest_twisted.ensureDeferred
async def test_the_directory_key_is_padded_base64url_as_rfc_9578_says(tmp_path, http):
    async with issuer(tmp_path) as daemon:
        token = await funded_token(daemon, http)
        url = daemon.public_url + DIRECTORY_PATH
        code, _, err = await client(
            "buy", url, "--token", token, "--idempotency-key", "s", "--strict-directory"
        )
        assert code == 0, err
