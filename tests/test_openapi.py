"""The OpenAPI 3.1 documents of both sites (docs/api.md) and the code cannot drift apart.

* Each document is valid OpenAPI 3.1 (openapi-spec-validator), names the running version, and
  is the same bytes in docs/, in the package and on the internal site.
* Every route of each site's Klein app is in its document, and the document has no other.
* Every error code the web layer can answer is in a document, under its status.
* Schemathesis runs against a live daemon, both sites, with real data: a chain of genuine
  monerod and monero-wallet-rpc, real payments (redeemed, pending, below the minimum), failed
  webhook events, passes bought from the issuer.  No answer may be a 5xx or differ from the
  document (status, content type, body schema, headers), and the success paths must be taken.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from openapi_spec_validator import validate
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

import anonticket
from anonticket.config import from_options
from anonticket.passes.client import blind, finish, token_challenge
from anonticket.passes.wire import b64url, from_b64url
from anonticket.web.internal import OPENAPI_INTERNAL, OPENAPI_PUBLIC, InternalAPI
from anonticket.web.public import PublicAPI

from .conftest import get_json, post_json, reactor, running_daemon
from .monero_regtest import Regtest, WalletRPC, available, free_port

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "anonticket" / "web"
DOCUMENTS = {"public": PACKAGE / OPENAPI_PUBLIC, "internal": PACKAGE / OPENAPI_INTERNAL}
APPS = {"public": PublicAPI.app, "internal": InternalAPI.app}
ST = str(Path(sys.executable).parent / "st")
HOOKS = Path(__file__).resolve().parent / "openapi_hooks.py"

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def document(site: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DOCUMENTS[site].read_bytes())
    return loaded


@pytest.mark.parametrize("site", DOCUMENTS)
def test_each_document_is_valid_openapi_3_1_of_this_version(site):
    doc = document(site)
    validate(doc)  # the OpenAPI 3.1 meta-schema and every Schema Object against its dialect
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["version"] == anonticket.__version__


@pytest.mark.parametrize("site", DOCUMENTS)
def test_docs_keeps_the_packaged_documents(site):
    copy = REPO / "docs" / DOCUMENTS[site].name
    assert copy.read_bytes() == DOCUMENTS[site].read_bytes()


def klein_routes(site: str) -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every route of the site's Klein app.  HEAD comes with every
    GET (Werkzeug adds it) and is described once for all in the documents."""
    routes = set()
    for rule in APPS[site].url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                routes.add((method.lower(), path))
    return routes


def documented_routes(site: str) -> set[tuple[str, str]]:
    paths = document(site)["paths"]
    return {(method, path) for path, item in paths.items() for method in item if method in METHODS}


@pytest.mark.parametrize("site", DOCUMENTS)
def test_every_route_is_documented_and_the_document_has_no_other(site):
    routes, documented = klein_routes(site), documented_routes(site)
    assert routes  # the introspection found the app's routes
    missing, extra = sorted(routes - documented), sorted(documented - routes)
    assert not missing, f"routes of the {site} site missing from its document: {missing}"
    assert not extra, f"documented on the {site} site, but no such route: {extra}"


def documented_codes() -> set[tuple[str, str]]:
    """(status, code) of every error answer in the documents."""
    found: set[tuple[str, str]] = set()

    def codes(schema: Any, doc: dict[str, Any]) -> Iterator[str]:
        if isinstance(schema, dict):
            if "$ref" in schema:
                target: Any = doc
                for part in schema["$ref"].removeprefix("#/").split("/"):
                    target = target[part]
                yield from codes(target, doc)
            code = schema.get("properties", {}).get("code", {})
            yield from code.get("enum", [code["const"]] if "const" in code else [])
            for key in ("oneOf", "anyOf", "allOf"):
                for sub in schema.get(key, []):
                    yield from codes(sub, doc)

    for site in DOCUMENTS:
        doc = document(site)
        for item in doc["paths"].values():
            for method, operation in item.items():
                if method not in METHODS:
                    continue
                for status, response in operation["responses"].items():
                    if "$ref" in response:
                        response = doc["components"]["responses"][response["$ref"].split("/")[-1]]
                    for media in response.get("content", {}).values():
                        found.update((status, c) for c in codes(media.get("schema"), doc))
    return found


# An error answer in the web layer: ApiError(status, "code", ...) or a literal JSON error.
_API_ERROR = re.compile(r'ApiError\(\s*(\d{3}),\s*"([a-z_]+)"')
_RAW_ERROR = re.compile(r'error_body\(\s*"([a-z_]+)"')
# Statuses of the literal answers written by hand in anonticket/web/request.py and channel.py.
_RAW_STATUS = {
    "body_too_large": "413",
    "request_timeout": "408",
    "bad_request": "400",
    "internal_error": "500",
    "method_not_allowed": "405",
}
# Answers no operation owns (see the documents' description): 405 for a method the path does
# not take, 404 for an unknown path; 500 is a bug, never an answer to document; "http_error"
# is a Werkzeug HTTP error other than 404/405, which no route raises.
_NOT_PER_OPERATION = {
    ("405", "method_not_allowed"),
    ("500", "internal_error"),
    ("404", "not_found"),
}


def test_every_error_code_of_the_web_layer_is_documented_under_its_status():
    web = {source.name: source.read_text() for source in (REPO / "anonticket" / "web").glob("*.py")}
    raised: set[tuple[str, str]] = set()
    for text in web.values():
        raised.update(_API_ERROR.findall(text))
        raised.update((_RAW_STATUS[c], c) for c in _RAW_ERROR.findall(text))
    # The Host/Origin guard's refusals are 403s.
    raised.update(("403", c) for c in re.findall(r'return "([a-z_]+)", "', web["guard.py"]))
    # Parse errors of domain values are 400s.
    domain = (REPO / "anonticket" / "domain.py").read_text()
    raised.update(("400", c) for c in re.findall(r'super\(\).__init__\("([a-z_]+)"', domain))
    # A spend's refusals are 409s; a version mismatch is a 412.
    refusals = re.search(r"_REFUSALS: Final = \{(.*?)\n\}", web["spending.py"], re.S)
    assert refusals is not None
    raised.update(("409", c) for c in re.findall(r'\(\s*"([a-z_]+)"', refusals.group(1)))
    literal = set(re.findall(r'"code": "([a-z_]+)"', "".join(web.values())))
    assert literal == {"version_mismatch"}, "a new literal error answer: give its status here"
    raised.add(("412", "version_mismatch"))
    assert len(raised) > 35  # the patterns still find the code's errors
    documented = documented_codes()
    missing = sorted(raised - documented - _NOT_PER_OPERATION)
    assert not missing, f"error answers not in a document: {missing}"
    assert ("404", "not_found") in documented  # a route whose parameter held a "/"


@pytest_twisted.ensureDeferred
async def test_the_internal_site_serves_both_documents_and_the_public_site_neither(daemon, http):
    for path, site in (
        ("/api/v1/openapi.json", "internal"),
        ("/api/v1/openapi-public.json", "public"),
    ):
        response = await http.get(daemon.internal_url + path, timeout=10)
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
        assert await response.content() == DOCUMENTS[site].read_bytes()
        code, body, _ = await get_json(http, daemon.public_url + path)
        assert (code, body["code"]) == (404, "not_found")


# ---------------------------------------------------------------------------------------------
# Schemathesis against a live daemon with real data.

XMR = 10**12
CONFIRMATIONS = 2
MIN_AMOUNT = XMR // 10
PRICE = 1000
# Payment IDs of the chain's payments: redeemed (two tokens), below --min-amount, pending.
SPENDER, REVOKED, DUST, PENDING = (f"{n:016x}" for n in (0xA11CE, 0xB0B, 0xD057, 0x9E9D))
MAX_EXAMPLES = 20
SEED = 14
# A refusal of invalid data may also be 413: a batch of too many requests is too large a body.
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428"]
"""
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "negative_data_rejection",
    )
)


@dataclass
class Chain:
    rt: Regtest
    merchant: WalletRPC


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    """A regtest chain whose merchant wallet got: a payment to each of two PIDs (confirmed), one
    below --min-amount (confirmed) and one still in the pool."""
    if not available():
        pytest.skip("monerod/monero-wallet-rpc not installed")
    with Regtest() as rt:
        payer, merchant = rt.wallet("payer"), rt.wallet("merchant")
        rt.fund(payer)
        paid = [
            payer.transfer(merchant.make_integrated_address(pid), amount)
            for pid, amount in ((SPENDER, XMR), (REVOKED, XMR), (DUST, MIN_AMOUNT // 2))
        ]
        for txid in paid:
            rt.confirm(txid, CONFIRMATIONS)
        payer.refresh()
        payer.transfer(merchant.make_integrated_address(PENDING), XMR)  # never mined
        yield Chain(rt, merchant)


async def until(probe: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.2, lambda: None)


async def seed(daemon: Any, http: Any) -> dict[str, Any]:
    """Real data on the daemon, for the hooks to swap into generated cases."""

    async def redeemed(pid: str) -> Any:
        code, body, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": pid})
        return body["service_token"] if code == 200 else None

    spender = await until(lambda: redeemed(SPENDER), "the monitor to credit the payments")
    revoked = await redeemed(REVOKED)
    code, body, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PENDING})
    assert (code, body["status"]) == (202, "pending")
    code, body, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": DUST})
    assert (code, body["code"]) == (404, "below_minimum")
    internal = daemon.internal_url
    code, _, _ = await post_json(http, f"{internal}/api/v1/token/{revoked}/revoke", {})
    assert code == 200

    # Passes: the issuer's key for the hooks' own token requests, and passes bought here for
    # the verification route (each verifies once).
    response = await http.get(daemon.public_url + "/.well-known/private-token-issuer-directory")
    key = from_b64url(json.loads(await response.content())["token-keys"][0]["token-key"])
    made = blind(key, token_challenge("openapi.test"), 4)
    code, bought, _ = await post_json(
        http,
        daemon.public_url + "/api/v1/passes",
        {"requests": [b64url(m.request) for m in made]},
        {"Authorization": f"Bearer {spender}", "Idempotency-Key": "seed"},
    )
    assert code == 200
    passes = [
        b64url(finish(m, from_b64url(r), key))
        for m, r in zip(made, bought["responses"], strict=True)
    ]

    # Every event so far is refused by a receiver that is not there and fails after one retry.
    async def failed() -> Any:
        _, body, _ = await get_json(http, internal + "/api/v1/webhooks/failed")
        return [e["id"] for e in body["events"]] if len(body["events"]) >= 4 else None

    await until(failed, "webhook events to fail")
    return {
        "tokens": {"spender": spender, "revoked": revoked},
        "pids": [SPENDER, REVOKED, DUST, PENDING],
        "issuer_key": b64url(key),
        "passes": passes,
        "internal_url": internal,
    }


async def schemathesis(site: str, url: str, seeds: Path, work: Path) -> dict[str, Any]:
    """``st run`` of the site's document against ``url``; its JSON report, the statuses seen and
    the terminal output."""
    seen = work / f"{site}-seen.txt"
    report = work / f"{site}-report.json"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work),
        "SCHEMATHESIS_HOOKS": str(HOOKS),
        "ANONTICKET_OPENAPI_SEEDS": str(seeds),
        "ANONTICKET_OPENAPI_SEEN": str(seen),
    }
    config = work / f"{site}-schemathesis.toml"
    config.write_text(CONFIG)
    args = [
        "--config-file",
        str(config),
        "run",
        str(DOCUMENTS[site]),
        "--url",
        url,
        "--checks",
        CHECKS,
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--phases",
        "examples,coverage,fuzzing",
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
        "--suppress-health-check",
        "all",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    started = time.monotonic()
    out, err, code = await getProcessOutputAndValue(ST, args, env=env, path=str(work))
    elapsed = time.monotonic() - started
    output = (out + err).decode("utf-8", "replace")
    statuses = Counter(seen.read_text().splitlines()) if seen.exists() else Counter()
    return {
        "code": code,
        "output": output,
        "report": json.loads(report.read_text()) if report.exists() else {},
        "statuses": statuses,
        "elapsed": elapsed,
    }


def ran(result: dict[str, Any], method: str, path: str, status: int) -> bool:
    statuses: Counter[str] = result["statuses"]
    return statuses[f"{method} {path} {status}"] > 0


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_schemathesis_finds_both_sites_as_documented(chain, tmp_path, http):
    options: dict[str, object] = {
        "data-dir": str(tmp_path / "data"),
        "public": "tcp:0:interface=127.0.0.1",
        "internal": "tcp:0:interface=127.0.0.1",
        "wallet-rpc": chain.merchant.url,
        "min-confirmations": str(CONFIRMATIONS),
        "min-amount": str(MIN_AMOUNT),
        "poll-interval": "0.5",
        "pass-price": str(PRICE),
        "webhook-url": f"http://127.0.0.1:{free_port()}/events",  # nothing listens there
        "webhook-retry-schedule": "1",
    }
    async with running_daemon(from_options(options, environ={}), tmp_path / "data") as daemon:
        seeds = tmp_path / "seeds.json"
        seeds.write_text(json.dumps(await seed(daemon, http)))
        # Both at once: each run is mostly schemathesis's own work, in its own process.
        internal, public = await gatherResults(
            [
                Deferred.fromCoroutine(schemathesis(site, url, seeds, tmp_path))
                for site, url in (("internal", daemon.internal_url), ("public", daemon.public_url))
            ]
        )
    results = {"internal": internal, "public": public}
    for site, result in results.items():  # shown with -s: what the report gives as figures
        cases = result["report"].get("test_cases", {}).get("generated")
        print(f"schemathesis, {site} site: {cases} cases in {result['elapsed']:.1f}s")
    for site, result in results.items():
        assert result["code"] == 0, f"schemathesis on the {site} site:\n{result['output'][-20000:]}"
        operations = result["report"]["operations"]
        assert operations["tested"] == len(documented_routes(site)), operations
    # The success paths were taken, not only the refusals.
    for result, method, path, status in (
        (public, "POST", "/api/v1/redeem", 200),
        (public, "POST", "/api/v1/redeem", 202),
        (public, "GET", "/api/v1/token/{token}", 200),
        (public, "POST", "/api/v1/passes/token-request", 200),
        (public, "POST", "/api/v1/passes", 200),
        (public, "GET", "/.well-known/private-token-issuer-directory", 200),
        (internal, "GET", "/api/v1/token/{token}", 200),
        (internal, "POST", "/api/v1/token/{token}/spend", 200),
        (internal, "POST", "/api/v1/token/{token}/spend", 409),
        (internal, "GET", "/api/v1/token/{token}/ledger", 200),
        (internal, "POST", "/api/v1/token/{token}/revoke", 200),
        (internal, "POST", "/api/v1/token/{token}/unrevoke", 200),
        (internal, "GET", "/api/v1/token/{token}/revocations", 200),
        (internal, "POST", "/api/v1/passes/verify", 200),
        (internal, "POST", "/api/v1/passes/verify", 409),
        (internal, "GET", "/api/v1/webhooks/failed", 200),
        (internal, "POST", "/api/v1/webhooks/failed/{event_id}/retry", 200),
        (internal, "GET", "/healthz", 200),
    ):
        assert ran(result, method, path, status), f"no {status} for {method} {path}"
