"""Vocabulary counting in bounded memory: exact while the distinct values fit, the true heavy
hitters kept when a stream has far more distinct values than the bound."""

import random
from collections import Counter
from types import SimpleNamespace

import pytest

from torchrec_multihash.datasets.heavy_hitters import HeavyHitters
from torchrec_multihash.datasets.id_mapping import Vocabulary


def stream(seed=0):
    """20 heavy values (5000 + 100 i times each) among 100,000 values seen once, shuffled."""
    heavy = {10**9 + i: 5000 + 100 * i for i in range(20)}
    values = [v for v, n in heavy.items() for _ in range(n)] + list(range(100_000))
    random.Random(seed).shuffle(values)
    return heavy, values


def test_bounded_and_keeps_the_heavy_hitters():
    heavy, values = stream()
    hh = HeavyHitters(capacity=50)
    for i in range(0, len(values), 1000):
        hh.update(values[i : i + 1000])
        assert len(hh) <= 2 * 50  # memory bounded by the capacity, not by the 100,020 distinct values
    assert hh.pruned and hh.seen == len(values)
    top = hh.most_common(20)
    assert {v for v, _ in top} == set(heavy)
    # each count is under the true one by at most seen / (capacity + 1)
    assert all(0 <= heavy[v] - n <= len(values) / 51 for v, n in top)


def test_exact_while_the_distinct_values_fit():
    values = [random.Random(1).randrange(150) for _ in range(20_000)]
    hh = HeavyHitters(capacity=100)
    hh.update(values[:7000])
    hh.update(values[7000:])
    assert not hh.pruned and hh.counts == Counter(values)
    assert hh.most_common(3, min_count=1) == sorted(Counter(values).items(), key=lambda vn: (-vn[1], vn[0]))[:3]
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        HeavyHitters(0)


def test_vocabulary_with_max_size():
    heavy, values = stream(2)
    vocab = Vocabulary.build((SimpleNamespace(sparse=[v, None]) for v in values), 2, max_size=20, chunk=997)
    assert set(vocab.ids[0]) == set(heavy) and vocab.sizes() == [21, 1]
    assert vocab(0, 123) == Vocabulary.OOV and vocab(0, 10**9 + 19) != Vocabulary.OOV
    # the bound does not change a vocabulary that fits: same ids as exact counting
    small = [SimpleNamespace(sparse=[v % 300]) for v in values[:50_000]]
    exact = Counter(r.sparse[0] for r in small)
    want = {v: i + 1 for i, (v, _) in enumerate(sorted(exact.items(), key=lambda vn: (-vn[1], vn[0])))}
    assert Vocabulary.build(small, 1, max_size=300).ids[0] == want
