from twisted.internet.task import Clock

from anonticket.store.negcache import NegativeCache

A = b"\xa1" * 16  # PID tags
B = b"\xb2" * 16


def test_entries_expire_after_the_ttl():
    clock = Clock()
    cache = NegativeCache(clock, ttl=0.5)
    cache.add(A)
    assert A in cache and B not in cache
    clock.advance(0.49)
    assert A in cache
    clock.advance(0.02)
    assert A not in cache


def test_discard_makes_a_paid_pid_visible_at_once():
    cache = NegativeCache(Clock(), ttl=0.5)
    cache.add(A)
    cache.discard(A)
    assert A not in cache


def test_size_is_bounded_and_oldest_go_first():
    clock = Clock()
    cache = NegativeCache(clock, ttl=10, max_entries=3)
    pids = [(i + 1).to_bytes(16, "big") for i in range(5)]
    for pid in pids:
        cache.add(pid)
    assert len(cache) == 3
    assert pids[0] not in cache and pids[1] not in cache and pids[4] in cache


def test_expired_entries_are_dropped_when_new_ones_arrive():
    clock = Clock()
    cache = NegativeCache(clock, ttl=0.5)
    cache.add(A)
    clock.advance(1)
    cache.add(B)
    assert len(cache) == 1


def test_zero_ttl_disables_the_cache():
    cache = NegativeCache(Clock(), ttl=0)
    cache.add(A)
    assert A not in cache and len(cache) == 0
