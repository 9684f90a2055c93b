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
    # A tag whose bits were all set already (a false positive) does not count: close to, never
    # above, one a tag.
    assert MIN_CAPACITY * 0.98 < known.count <= MIN_CAPACITY and not known.full
    extra = 0
    while not known.full:
        known.add(os.urandom(16))
        extra += 1
    assert extra <= MIN_CAPACITY * 0.02 + 1


def test_the_same_tag_added_again_and_again_counts_once():
    """Every poll re-reads its window and every sync its overlap: a filter that counted them
    would report itself full after a few hundred polls and be rebuilt from the whole table."""
    known = KnownTags()
    tags = [os.urandom(16) for _ in range(100)]
    for _ in range(1_000):
        for tag in tags:
            known.add(tag)
    assert known.count == 100 and not known.full


def test_an_empty_filter_knows_nothing():
    known = KnownTags()
    assert os.urandom(16) not in known and "not bytes" not in known
