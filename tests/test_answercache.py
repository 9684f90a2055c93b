"""The answer caches: what the public site answers from memory, and how they stay in step with
every payment, top-up and revoke — made here, or by another node on the same database."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from anonticket import store as store_module
from anonticket.config import ConfigError
from anonticket.domain import PaymentId
from anonticket.metrics import Metrics
from anonticket.store import Store, answers
from anonticket.store.answercache import FRESH_FOR, AnswerCache
from anonticket.store.changes import NumberedRows
from anonticket.store.records import (
    NotFound,
    Overloaded,
    PaymentStatus,
    Pending,
    Redeemed,
    TokenRecord,
)
from anonticket.tap import build

from .conftest import _url, daemon_config, get_json, post_json, reactor, transfer
from .rawhttp import parse_response, raw_request

PID = PaymentId.parse("0123456789abcdef")


def fresh_cache(size: int = 3) -> tuple[AnswerCache[str], Clock]:
    clock = Clock()
    cache: AnswerCache[str] = AnswerCache(clock, size)
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


def test_numbered_rows_tell_late_commits_from_rows_already_applied():
    rows = NumberedRows(overlap=10)
    assert rows.fresh([(1, b"a"), (3, b"c")]) == [b"a", b"c"]
    assert rows.upto == 3 and rows.since == 0
    assert rows.fresh([(1, b"a"), (3, b"c")]) == []  # an idle re-read of the overlap
    assert rows.fresh([(1, b"a"), (2, b"b"), (3, b"c"), (4, b"d")]) == [b"b", b"d"]
    assert rows.fresh(list(enumerate([b"x"] * 30))[5:]) == [b"x"] * 25
    assert rows.upto == 29 and rows.since == 19
    assert rows.fresh([(25, b"x"), (29, b"x")]) == []


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
    result = await store.redeem(pid, 2)
    assert isinstance(result, Redeemed)
    return result.token


async def look_up(store: Store, token) -> TokenRecord:
    """What the public site asks: the store's token answer (memory, else the database, which
    then fills the memory).  Every token looked up here was issued: never unknown."""
    answer = store.token_answer(token)
    record = await answer if isinstance(answer, Deferred) else answer
    assert not isinstance(record, Overloaded)  # only refused with admit=True
    assert record is not None
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
    assert a.token_answers.get(a.tagger.token_tag(token.raw)) is not None


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
    ticket = b.token_answers.ticket()
    before = await b.token_status(token, tag=tag)  # read before the revoke commits ...
    await a.revoke(token, None, None, now=7)
    await b.sync_tokens()  # ... the change is applied ...
    b.token_answers.put(tag, before, ticket)  # ... and then the old answer arrives: dropped
    assert b.token_answers.get(tag) is None
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
    assert b._token_changes.upto == 50
    assert (await look_up(b, first)).balance == 1
    assert (await look_up(b, late)).balance == 100
    # An idle re-read of the overlap applies nothing: an answer read meanwhile is kept.
    ticket = b.token_answers.ticket()
    await b.sync_tokens()
    assert b.token_answers.ticket() == ticket
    stamp(a, late, 49, balance=999)  # ... number 49, taken earlier, commits after it
    await b.sync_tokens()
    assert (await look_up(b, late)).balance == 999
    assert (await look_up(b, first)).balance == 1


@pytest_twisted.ensureDeferred
async def test_a_full_page_of_changes_keeps_the_cache_quiet_until_caught_up(nodes, monkeypatch):
    a, b = nodes
    monkeypatch.setattr(answers, "_SYNC_PAGE", 2)
    pids = [PaymentId((i + 1).to_bytes(8, "big")) for i in range(3)]
    tokens = [await issue(a, p, i + 1) for i, p in enumerate(pids)]
    for token in tokens:
        await look_up(b, token)
    b._token_changes = NumberedRows()
    for token in tokens:
        await a.revoke(token, None, None, now=5)
    b.token_answers.unsynced()
    await b.sync_tokens()  # two of the three changes: not in step yet
    assert b.token_answers.get(b.tagger.token_tag(tokens[0].raw)) is None
    await b.sync_tokens()
    await b.sync_tokens()
    for token in tokens:
        assert (await look_up(b, token)).revoked_at == 5


@pytest_twisted.ensureDeferred
async def test_a_failing_sync_does_not_keep_the_cache_answering(nodes, monkeypatch):
    a, b = nodes
    clock = Clock()
    clock.advance(reactor.seconds())
    b.token_answers = AnswerCache(clock, 10)
    b.token_answers.synced(clock.seconds())
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
    assert b.token_answers.get(tag) is None


def count_trips(store: Store) -> list[object]:
    """Record every operation that goes to the database thread."""
    trips: list[object] = []
    run = store._run

    def counted(fn, *args):
        trips.append(fn)
        return run(fn, *args)

    store._run = counted  # type: ignore[method-assign]  # a test wraps the instance method
    return trips


@pytest_twisted.ensureDeferred
async def test_a_settled_redeem_is_answered_again_without_the_database(nodes):
    a, _ = nodes
    await a.record_transfers([transfer(PID.raw, 1, amount=70)], now=1)
    trips = count_trips(a)
    first = await a.redeem(PID, 2)
    assert first.first_claim and len(trips) == 1
    for _ in range(3):
        assert await a.redeem(PID, 3) == Redeemed(first.token, 70, first_claim=False)
    assert len(trips) == 1


@pytest_twisted.ensureDeferred
async def test_a_payment_recorded_here_evicts_the_pid_at_once(nodes):
    a, _ = nodes
    await issue(a, PID, 1, amount=70)
    await a.redeem(PID, 3)  # settled: cached
    await a.record_transfers([transfer(PID.raw, 2, amount=5)], now=4)
    again = await a.redeem(PID, 5)
    assert again.topped_up and again.balance == 75


@pytest_twisted.ensureDeferred
async def test_a_pid_with_a_pending_payment_is_never_answered_from_memory(nodes):
    a, _ = nodes
    await issue(a, PID, 1, amount=70)
    await a.record_transfers([transfer(PID.raw, 2, amount=5, status=PaymentStatus.PENDING)], now=3)
    trips = count_trips(a)
    for _ in range(2):
        assert (await a.redeem(PID, 4)).balance == 70
    assert len(trips) == 2
    # It confirms: the monitor records the same transfer again, now unclaimed.
    await a.record_transfers([transfer(PID.raw, 2, amount=5)], now=5)
    assert (await a.redeem(PID, 6)).balance == 75


@pytest_twisted.ensureDeferred
async def test_a_pid_with_a_reversed_unclaimed_payment_is_not_settled(nodes):
    a, _ = nodes
    await issue(a, PID, 1, amount=70)  # claimed at height 100
    await a.record_transfers([transfer(PID.raw, 2, amount=5, height=150)], now=3)
    pooled = transfer(PID.raw, 2, amount=5, height=0, status=PaymentStatus.PENDING)
    await a.record_transfers([pooled], now=4)  # back in the pool before anyone redeemed it
    trips = count_trips(a)
    for _ in range(2):
        assert (await a.redeem(PID, 5)).balance == 70  # the reversed one waits
    assert len(trips) == 2


@pytest_twisted.ensureDeferred
async def test_a_reversal_evicts_both_answers_here_at_once_and_on_another_node_at_its_sync(nodes):
    a, b = nodes
    token = await issue(a, PID, 1, amount=70)
    for node in (a, b):
        await node.sync_known()
        assert (await node.redeem(PID, 3)).balance == 70  # now settled: kept in memory
        assert (await look_up(node, token)).balance == 70
    trips_a, trips_b = count_trips(a), count_trips(b)
    assert (await a.redeem(PID, 3)).balance == 70 and (await b.redeem(PID, 3)).balance == 70
    assert trips_a == trips_b == []
    # The chain takes the payment back: a's monitor records the reversal.
    result = await a.record_transfers([], now=4, recheck=(90, 110))
    assert result.reversed == {"claimed": 1}
    assert (await a.redeem(PID, 5)).balance == 0
    assert (await look_up(a, token)).status == "suspended"
    # b learns it from the token's change number at its next sync, for both answers.
    await b.sync_tokens()
    assert (await b.redeem(PID, 6)).balance == 0
    assert (await look_up(b, token)).status == "suspended"


@pytest_twisted.ensureDeferred
async def test_another_nodes_new_payment_evicts_at_the_next_sync(nodes):
    a, b = nodes
    await issue(a, PID, 1, amount=70)
    await b.sync_known()
    assert (await b.redeem(PID, 3)).balance == 70  # settled: cached on b
    await a.record_transfers([transfer(PID.raw, 2, amount=5)], now=4)  # a's monitor
    assert (await b.redeem(PID, 5)).balance == 70  # until b's sync: the old answer
    await b.sync_known()
    topped = await b.redeem(PID, 6)
    assert topped.topped_up and topped.balance == 75


@pytest_twisted.ensureDeferred
async def test_a_redeem_read_across_an_eviction_is_not_cached(nodes):
    a, _ = nodes
    await issue(a, PID, 1, amount=70)
    a.redeem_answers.clear()
    d = a.redeem(PID, 3)  # the read is on its way to the database thread ...
    a.redeem_answers.invalidate([b"another pid's tag"])  # ... when a payment is recorded
    assert (await d).balance == 70
    assert a.redeem_answers.get(a.tagger.pid_tag(PID.raw)) is None


@pytest_twisted.ensureDeferred
async def test_unsettled_answers_are_not_cached(nodes):
    a, _ = nodes
    assert isinstance(await a.redeem(PID, 1), NotFound)
    await a.record_transfers([transfer(PID.raw, 1, status=PaymentStatus.PENDING)], now=1)
    assert isinstance(await a.redeem(PID, 2), Pending)
    assert len(a.redeem_answers) == 0


# --- the public site ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_cached_answer_is_the_same_bytes_without_a_database_trip(daemon, http):
    await daemon.store.record_transfers([transfer(PID.raw, 1, amount=77)], now=1)
    _, body, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PID.hex})
    path = f"/api/v1/token/{body['service_token']}"
    port = int(daemon.public_url.rsplit(":", 1)[1])
    trips = count_trips(daemon.store)
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
async def test_answer_cache_zero_always_asks_the_database(tmp_path, http):
    root = build(daemon_config(tmp_path, **{"answer-cache": "0"}), reactor, Metrics())
    root.startService()
    try:
        store = root.getServiceNamed("store").store
        token = await issue(store, PID, 1)
        url = f"{_url(root.getServiceNamed('public-site'))}/api/v1/token/{token.hex}"
        for _ in range(2):
            code, body, _ = await get_json(http, url)
            assert code == 200 and body["status"] == "active"
        assert len(store.token_answers) == 0
    finally:
        await root.stopService()


def test_answer_cache_option(tmp_path):
    assert daemon_config(tmp_path).answer_cache == 20_000
    assert daemon_config(tmp_path, **{"answer-cache": "0"}).answer_cache == 0
    with pytest.raises(ConfigError, match="--answer-cache: expected a whole number"):
        daemon_config(tmp_path, **{"answer-cache": "many"})
