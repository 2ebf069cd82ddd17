"""The vectorised vocabulary count: the same vocabulary as counting row by row, split over
processes or not, and Misra-Gries' guarantee once a feature has more values than it holds."""

import re
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


def _vocabulary_on_ranks(rank, world_size, files, out, skip_bad_lines):
    """Rank body: the run's vocabulary, or the error; each rank writes what it got."""
    import json

    from torchrec_multihash.app.config import load_config
    from torchrec_multihash.app.vocabulary import run_vocabulary

    sets = [f"data.train={[str(f) for f in files]}", f"data.test={[str(files[0])]}", "data.ids=vocabulary", f"data.skip_bad_lines={skip_bad_lines}"]
    cfg = load_config("configs/criteo_kaggle_qr.yaml", sets)
    try:
        ids = run_vocabulary(cfg, 26, rank, world_size, out).ids
        got = {"ids": [[int(v) for v in sorted(m, key=m.__getitem__)] for m in ids]}
    except CriteoFormatError as e:
        got = {"error": str(e)}
    (out / f"rank{rank}.json").write_text(json.dumps(got))


def _vocabularies_on_ranks(rank, world_size, runs):
    """``_vocabulary_on_ranks`` for each of ``runs`` (files, out, skip_bad_lines) in turn, in one
    group of processes (a spawn each would cost more than the counting)."""
    for files, out, skip_bad_lines in runs:
        _vocabulary_on_ranks(rank, world_size, files, out, skip_bad_lines)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_count_their_shares_and_get_rank_0s_vocabulary(shared_data, tmp_path):
    """Each rank counts its own byte range; the merged vocabulary is the whole file's, on both ranks,
    saved once. A bad line in rank 1's share stops both ranks with its file:line (no rank hangs)."""
    import json

    from tests.helpers.distributed import run_multiprocess

    lines = (shared_data / "criteo_kaggle_900" / "train.txt").read_bytes().splitlines(keepends=True)
    good = tmp_path / "good.txt"
    good.write_bytes(b"".join(lines))
    want = [sorted(m, key=m.__getitem__) for m in Vocabulary.build(read_rows([good]), 26).ids]
    bad = tmp_path / "bad" / "bad.txt"
    bad.parent.mkdir()
    bad.write_bytes(b"".join(lines[:800] + [b"x\n"] + lines[800:]))
    assert rank_share([bad], 1, 2).spans[0].start < sum(map(len, lines[:800]))  # line 801 is rank 1's
    run_multiprocess(_vocabularies_on_ranks, 2, [([good], tmp_path, 0), ([bad], bad.parent, 0)])
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1] == {"ids": want} and (tmp_path / "vocabulary.json").is_file()
    for r in (0, 1):
        error = json.loads((bad.parent / f"rank{r}.json").read_text())["error"]
        assert re.search(r"bad.txt:801: expected 40 tab-separated columns", error), error
    assert not (bad.parent / "vocabulary.json").exists()
