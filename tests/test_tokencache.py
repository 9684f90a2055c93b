"""The token cache: what the public site answers from memory, and how it stays in step with every
top-up and revoke — made here, or by another node on the same database."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from anonticket import store as store_module
from anonticket.config import ConfigError
from anonticket.domain import PaymentId
from anonticket.metrics import Metrics
from anonticket.store import Store
from anonticket.store.tokencache import FRESH_FOR, TokenCache
from anonticket.tap import build

from .conftest import _url, daemon_config, get_json, post_json, reactor, transfer
from .rawhttp import parse_response, raw_request

PID = PaymentId.parse("0123456789abcdef")


def fresh_cache(size: int = 3) -> tuple[TokenCache[str], Clock]:
    clock = Clock()
    cache: TokenCache[str] = TokenCache(clock, size)
    cache.synced(clock.seconds())
    return cache, clock


def test_a_value_put_with_a_current_ticket_is_returned():
    cache, _ = fresh_cache()
    cache.put(b"a", "A", cache.ticket())
    assert cache.get(b"a") == "A" and cache.get(b"b") is None


def test_an_answer_read_across_an_eviction_is_not_stored():
    """The race the ticket exists for: read (old state), a change is applied, then the put."""
    cache, _ = fresh_cache()
    ticket = cache.ticket()
    cache.invalidate([b"someone-else"])
    cache.put(b"a", "old", ticket)
    assert cache.get(b"a") is None
    cache.put(b"a", "new", cache.ticket())
    assert cache.get(b"a") == "new"


def test_invalidate_and_clear_evict():
    cache, _ = fresh_cache()
    for tag in (b"a", b"b"):
        cache.put(tag, tag.decode(), cache.ticket())
    cache.invalidate([b"a"])
    assert cache.get(b"a") is None and cache.get(b"b") == "b"
    cache.clear()
    assert len(cache) == 0


def test_the_size_is_a_bound_and_the_oldest_entry_goes_first():
    cache, _ = fresh_cache(size=3)
    for tag in (b"a", b"b", b"c", b"d"):
        cache.put(tag, tag.decode(), cache.ticket())
    assert len(cache) == 3
    assert cache.get(b"a") is None and cache.get(b"d") == "d"
    cache.put(b"b", "b2", cache.ticket())  # a refresh of a present entry evicts nothing
    assert len(cache) == 3 and cache.get(b"c") == "c"


def test_size_zero_stores_nothing():
    cache, _ = fresh_cache(size=0)
    cache.put(b"a", "A", cache.ticket())
    assert cache.get(b"a") is None and len(cache) == 0


def test_without_a_recent_sync_the_cache_stops_answering():
    cache, clock = fresh_cache()
    cache.put(b"a", "A", cache.ticket())
    clock.advance(FRESH_FOR - 0.5)
    assert cache.get(b"a") == "A"
    clock.advance(1)  # no sync for longer than FRESH_FOR
    assert cache.get(b"a") is None
    cache.synced(clock.seconds())
    assert cache.get(b"a") == "A"
    cache.unsynced()
    assert cache.get(b"a") is None


# --- the store: two nodes on one database (SQLite file or PostgreSQL) -----------------------


@pytest.fixture
def nodes(database_url, tmp_path):
    a = Store(reactor, database_url, tmp_path)
    a.open()
    b = Store(reactor, database_url, tmp_path)
    b.open()
    yield a, b
    b.close()
    a.close()


async def issue(store: Store, pid: PaymentId, txid: int, amount: int = 100):
    await store.record_transfers([transfer(pid.raw, txid, amount=amount)], now=1)
    return (await store.redeem(pid, 2)).token


async def look_up(store: Store, token) -> object:
    """What the public site does: the cache, else the database, then fill the cache."""
    tag = store.tagger.token_tag(token.raw)
    hit = store.tokens.get(tag)
    if hit is not None:
        return hit
    ticket = store.tokens.ticket()
    record = await store.token_status(token, tag=tag)
    store.tokens.put(tag, record, ticket)
    return record


@pytest_twisted.ensureDeferred
async def test_a_revoke_on_this_node_evicts_at_once(nodes):
    a, _ = nodes
    token = await issue(a, PID, 1)
    assert (await look_up(a, token)).revoked_at is None
    await a.revoke(token, "abuse", None, now=5)
    assert (await look_up(a, token)).revoked_at == 5


@pytest_twisted.ensureDeferred
async def test_a_top_up_on_this_node_evicts_at_once(nodes):
    a, _ = nodes
    token = await issue(a, PID, 1, amount=100)
    assert (await look_up(a, token)).balance == 100
    await a.record_transfers([transfer(PID.raw, 2, amount=50)], now=3)
    assert (await a.redeem(PID, 4)).topped_up
    assert (await look_up(a, token)).balance == 150


@pytest_twisted.ensureDeferred
async def test_a_retry_without_new_payments_keeps_the_entry(nodes):
    a, _ = nodes
    token = await issue(a, PID, 1)
    await look_up(a, token)
    assert not (await a.redeem(PID, 3)).topped_up
    assert a.tokens.get(a.tagger.token_tag(token.raw)) is not None


@pytest_twisted.ensureDeferred
async def test_another_nodes_revoke_and_top_up_are_seen_at_the_next_sync(nodes):
    a, b = nodes
    other = PaymentId.parse("fedcba9876543210")
    revoked, topped = await issue(a, PID, 1), await issue(a, other, 2)
    await b.sync_known()
    assert (await look_up(b, revoked)).revoked_at is None
    assert (await look_up(b, topped)).balance == 100
    await a.revoke(revoked, None, None, now=7)
    await a.record_transfers([transfer(other.raw, 3, amount=11)], now=8)
    await a.redeem(other, 9)
    # Until b's sync loop runs, b may answer what it had (at most FRESH_FOR seconds old) ...
    assert (await look_up(b, revoked)).revoked_at is None
    await b.sync_tokens()
    # ... and from then on the new state.
    assert (await look_up(b, revoked)).revoked_at == 7
    assert (await look_up(b, topped)).balance == 111


@pytest_twisted.ensureDeferred
async def test_a_read_that_raced_another_nodes_change_is_not_cached(nodes):
    a, b = nodes
    token = await issue(a, PID, 1)
    tag = b.tagger.token_tag(token.raw)
    ticket = b.tokens.ticket()
    before = await b.token_status(token, tag=tag)  # read before the revoke commits ...
    await a.revoke(token, None, None, now=7)
    await b.sync_tokens()  # ... the change is applied ...
    b.tokens.put(tag, before, ticket)  # ... and then the old answer arrives: dropped
    assert b.tokens.get(tag) is None
    assert (await look_up(b, token)).revoked_at == 7


def stamp(store: Store, token, seq: int, balance: int) -> None:
    """Commit a change with a chosen change number, as a transaction on another node would."""
    conn = store._dialect.connect()
    try:
        conn.execute(
            store._dialect.sql(
                "UPDATE tokens SET balance = ?, changed_seq = ? WHERE token_tag = ?"
            ),
            (balance, seq, store.tagger.token_tag(token.raw)),
        )
        conn.commit()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_lower_change_number_committed_late_is_still_seen(nodes):
    """On PostgreSQL a sequence number is taken at update and visible at commit: a change
    can appear below the highest number already read.  The sync re-reads an overlap."""
    a, b = nodes
    first, late = await issue(a, PID, 1), await issue(a, PaymentId.parse("fedcba9876543210"), 2)
    stamp(a, first, 50, balance=1)  # number 50 commits first ...
    await b.sync_tokens()
    assert b._changes_upto == 50
    assert (await look_up(b, first)).balance == 1
    assert (await look_up(b, late)).balance == 100
    # An idle re-read of the overlap applies nothing: an answer read meanwhile is kept.
    ticket = b.tokens.ticket()
    await b.sync_tokens()
    assert b.tokens.ticket() == ticket
    stamp(a, late, 49, balance=999)  # ... number 49, taken earlier, commits after it
    await b.sync_tokens()
    assert (await look_up(b, late)).balance == 999
    assert (await look_up(b, first)).balance == 1


@pytest_twisted.ensureDeferred
async def test_a_full_page_of_changes_keeps_the_cache_quiet_until_caught_up(nodes, monkeypatch):
    a, b = nodes
    monkeypatch.setattr(store_module, "_CHANGE_PAGE", 2)
    pids = [PaymentId((i + 1).to_bytes(8, "big")) for i in range(3)]
    tokens = [await issue(a, p, i + 1) for i, p in enumerate(pids)]
    for token in tokens:
        await look_up(b, token)
    b._changes_upto, b._recent_changes = 0, set()
    for token in tokens:
        await a.revoke(token, None, None, now=5)
    b.tokens.unsynced()
    await b.sync_tokens()  # two of the three changes: not in step yet
    assert b.tokens.get(b.tagger.token_tag(tokens[0].raw)) is None
    await b.sync_tokens()
    await b.sync_tokens()
    for token in tokens:
        assert (await look_up(b, token)).revoked_at == 5


@pytest_twisted.ensureDeferred
async def test_a_failing_sync_does_not_keep_the_cache_answering(nodes, monkeypatch):
    a, b = nodes
    clock = Clock()
    clock.advance(reactor.seconds())
    b.tokens = TokenCache(clock, 10)
    b.tokens.synced(clock.seconds())
    token = await issue(a, PID, 1)
    await look_up(b, token)
    tag = b.tagger.token_tag(token.raw)

    def broken(*args):
        raise store_module.DatabaseError("database unreachable")

    monkeypatch.setattr(store_module.queries, "token_changes_since", broken)
    for _ in range(5):
        clock.advance(1)
        with pytest.raises(store_module.DatabaseError):
            await b.sync_tokens()
    assert b.tokens.get(tag) is None


# --- the public site ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_cached_answer_is_the_same_bytes_without_a_database_trip(daemon, http):
    await daemon.store.record_transfers([transfer(PID.raw, 1, amount=77)], now=1)
    _, body, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PID.hex})
    path = f"/api/v1/token/{body['service_token']}"
    port = int(daemon.public_url.rsplit(":", 1)[1])
    trips: list[object] = []
    run = daemon.store._run
    daemon.store._run = lambda fn, *args: (trips.append(fn), run(fn, *args))[1]  # type: ignore[method-assign]
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    first = parse_response(await raw_request(reactor, port, request))
    assert len(trips) == 1
    second = parse_response(await raw_request(reactor, port, request))
    assert len(trips) == 1  # answered from the cache
    for answer in (first, second):
        answer[1].pop("date")
    assert first == second
    assert first[0] == 200 and b'"balance":77' in first[2]
    assert first[1]["cache-control"] == "no-store" and "server" not in first[1]
    active = {"outcome": "active"}
    assert daemon.metrics.registry.get_sample_value("anonticket_token_lookups_total", active) == 2


@pytest_twisted.ensureDeferred
async def test_revoke_and_top_up_show_at_once_on_the_public_site(daemon, http):
    await daemon.store.record_transfers([transfer(PID.raw, 1, amount=10)], now=1)
    _, body, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PID.hex})
    token = body["service_token"]
    url = f"{daemon.public_url}/api/v1/token/{token}"
    assert (await get_json(http, url))[1]["balance"] == 10
    await daemon.store.record_transfers([transfer(PID.raw, 2, amount=5)], now=2)
    await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PID.hex})
    assert (await get_json(http, url))[1]["balance"] == 15
    await post_json(http, f"{daemon.internal_url}/api/v1/token/{token}/revoke", {})
    code, status, _ = await get_json(http, url)
    assert code == 200 and status["status"] == "revoked" and status["balance"] == 15


@pytest_twisted.ensureDeferred
async def test_token_cache_zero_always_asks_the_database(tmp_path, http):
    root = build(daemon_config(tmp_path, **{"token-cache": "0"}), reactor, Metrics())
    root.startService()
    try:
        store = root.getServiceNamed("store").store
        token = await issue(store, PID, 1)
        url = f"{_url(root.getServiceNamed('public-site'))}/api/v1/token/{token.hex}"
        for _ in range(2):
            code, body, _ = await get_json(http, url)
            assert code == 200 and body["status"] == "active"
        assert len(store.tokens) == 0
    finally:
        await root.stopService()


def test_token_cache_option(tmp_path):
    assert daemon_config(tmp_path).token_cache == 50_000
    assert daemon_config(tmp_path, **{"token-cache": "0"}).token_cache == 0
    with pytest.raises(ConfigError, match="--token-cache: expected a whole number"):
        daemon_config(tmp_path, **{"token-cache": "many"})
