"""The vectorised vocabulary count: the same vocabulary as counting row by row, split over
processes or not, and Misra-Gries' guarantee once a feature has more values than it holds."""

from collections import Counter

import numpy as np
import pytest

from torchrec_multihash.datasets.criteo_tsv import BadLines, CriteoFormatError, ParsedBlock, read_rows
from torchrec_multihash.datasets.id_mapping import Vocabulary
from torchrec_multihash.datasets.tsv_ranges import rank_share
from torchrec_multihash.datasets.value_counts import ValueCounts, count_values


def _vocabulary(counts, min_count, max_size=1_000_000):
    return Vocabulary.from_values([counts.most_common(f, max_size, min_count) for f in range(26)], min_count)


@pytest.mark.parametrize("min_count,max_size", [(1, 1_000_000), (2, 1_000_000), (1, 7)])
def test_counted_vocabulary_equals_the_row_by_row_one(shared_data, min_count, max_size):
    path = shared_data / "criteo_kaggle_900" / "train.txt"
    exact = Vocabulary.build(read_rows([path]), 26, min_count=min_count).ids
    want = [{v: i for v, i in m.items() if i <= max_size} for m in exact]  # the max_size most frequent
    assert _vocabulary(count_values([path], 26, 1_000_000, block_lines=128), min_count, max_size).ids == want
    # split over 3 processes, by byte ranges or by blocks of lines: the merged counts are the same
    for world in (2, 3):
        shares = [count_values(rank_share([path], r, world).spans, 26, 1_000_000, block_lines=100) for r in range(world)]
        blocks = [count_values([path], 26, 1_000_000, block_lines=100, slot=r, slots=world) for r in range(world)]
        for parts in (shares, blocks):
            total = parts[0]
            for other in parts[1:]:
                total.merge(other)
            assert _vocabulary(total, min_count, max_size).ids == want
    assert max(len(m) for m in want) == (7 if max_size == 7 else 638 if min_count == 1 else 153)


def test_a_bad_line_stops_the_count_naming_it_or_is_left_out(shared_data, tmp_path):
    lines = (shared_data / "criteo_kaggle_900" / "train.txt").read_bytes().splitlines(keepends=True)
    (tmp_path / "bad.txt").write_bytes(b"".join(lines[:500] + [b"x\n"] + lines[500:]))
    with pytest.raises(CriteoFormatError, match=r"bad.txt:501: expected 40 tab-separated columns"):
        count_values([tmp_path / "bad.txt"], 26, 1000)
    skipped = BadLines(1, warn_first=0)
    got = _vocabulary(count_values([tmp_path / "bad.txt"], 26, 1_000_000, skipped), 1).ids
    assert skipped.count == 1 and got == Vocabulary.build(read_rows([shared_data / "criteo_kaggle_900" / "train.txt"]), 26).ids


def test_beyond_capacity_counts_keep_the_misra_gries_bound():
    """Zipf-like values, 50x more distinct than held: every value seen more than n / (capacity + 1)
    times is kept, its count under the true one by at most that much."""
    rng = np.random.default_rng(0)
    values = (rng.zipf(1.3, 200_000) % 100_000).astype(np.int64)
    capacity = 1000
    counts = ValueCounts(1, capacity)
    for part in np.array_split(values, 37):
        counts.add(ParsedBlock(np.zeros(len(part)), np.zeros((len(part), 13)), part[:, None], np.zeros((len(part), 1), dtype=bool)))
    counts.done()
    exact, bound = Counter(values.tolist()), len(values) / (capacity + 1)
    held = dict(zip(counts.values[0].tolist(), counts.counts[0].tolist()))
    assert counts.pruned and len(held) <= 2 * capacity
    for v, n in exact.items():
        assert held.get(v, 0) <= n and (n <= bound or n - held[v] <= bound), v


@pytest.mark.slow
def test_counting_in_two_processes_gives_the_same_vocabulary(shared_data, tmp_path):
    from torchrec_multihash.datasets.value_counts import count_values_in_processes

    lines = (shared_data / "criteo_kaggle_900" / "train.txt").read_bytes().splitlines(keepends=True)
    files = [tmp_path / "day_0.txt", tmp_path / "day_1.txt"]
    files[0].write_bytes(b"".join(lines[:200]))
    files[1].write_bytes(b"".join(lines[200:]))
    one = _vocabulary(count_values_in_processes(files, 26, 1_000_000, 1), 2).ids
    assert _vocabulary(count_values_in_processes(files, 26, 1_000_000, 2), 2).ids == one
    assert one == Vocabulary.build(read_rows(files), 26, min_count=2).ids
