import os

from anonticket.store.known import MIN_CAPACITY, KnownTags


def test_no_false_negatives_and_few_false_positives_at_capacity():
    known = KnownTags(capacity=MIN_CAPACITY)
    tags = [os.urandom(16) for _ in range(MIN_CAPACITY)]
    for tag in tags:
        known.add(tag)
    assert all(tag in known for tag in tags)
    strangers = [os.urandom(16) for _ in range(20_000)]
    false_positives = sum(tag in known for tag in strangers)
    assert false_positives / len(strangers) < 0.02
    assert not known.full
    known.add(os.urandom(16))
    assert known.full


def test_an_empty_filter_knows_nothing():
    known = KnownTags()
    assert os.urandom(16) not in known and "not bytes" not in known
