"""Per-rank Criteo TSV loading: each rank parses only its batches, in DataLoader workers or not,
and gets exactly the batches of 'parse everything, keep every world_size-th batch'."""

import gzip

import pytest
import torch

from torchrec_multihash.datasets.batching import batches
from torchrec_multihash.datasets.criteo_loader import CriteoBatchDataset, criteo_batches
from torchrec_multihash.datasets.criteo_tsv import DEFAULT_SPARSE_NAMES, BadLines, CriteoFormatError, read_rows
from torchrec_multihash.datasets.id_mapping import HashingIds

TO_ID = HashingIds([1000] * 26)


@pytest.fixture
def files(shared_data, tmp_path):
    """The 900 Kaggle rows over a .gz and a plain file, with blank lines (not counted) between."""
    lines = (shared_data / "criteo_kaggle_900" / "train.txt").read_text().splitlines(keepends=True)
    lines.insert(10, "\n")
    lines.insert(300, "\r\n")
    with gzip.open(tmp_path / "day_0.gz", "wt", newline="") as f:
        f.writelines(lines[:401])
    (tmp_path / "day_1.txt").write_text("".join(lines[401:]) + "\n")
    return [tmp_path / "day_0.gz", tmp_path / "day_1.txt"]


def same(a, b):
    return (
        torch.equal(a.dense_features, b.dense_features) and torch.equal(a.labels, b.labels)
        and a.sparse_features.keys() == b.sparse_features.keys()
        and torch.equal(a.sparse_features.values(), b.sparse_features.values())
        and torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())
    )


@pytest.mark.parametrize("world_size,bs,drop_last", [(1, 128, False), (2, 64, True), (3, 50, False), (2, 128, False)])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_rank_batches_equal_every_nth_batch(files, world_size, bs, drop_last, num_workers):
    everything = list(batches(read_rows(files), bs, DEFAULT_SPARSE_NAMES, TO_ID, drop_last=drop_last))
    assert sum(b.labels.numel() for b in everything) == (900 // bs * bs if drop_last else 900)
    for rank in range(world_size):
        for skip in (0, 2):
            ds = CriteoBatchDataset(files, bs, DEFAULT_SPARSE_NAMES, TO_ID, rank, world_size, skip, drop_last)
            got = list(criteo_batches(ds, BadLines(), num_workers))
            want = everything[rank::world_size][skip:]
            assert len(got) == len(want) and all(same(a, b) for a, b in zip(got, want)), (rank, skip)


def test_other_ranks_lines_are_not_parsed(shared_data, tmp_path):
    """Rank 1 of 3 never parses the lines of other ranks' batches: they may even be garbage."""
    path = shared_data / "criteo_kaggle_900" / "train.txt"
    lines = path.read_text().splitlines(keepends=True)
    garbled = [line if (i // 100) % 3 == 1 else "not\ta criteo line\n" for i, line in enumerate(lines)]
    (tmp_path / "garbled.txt").write_text("".join(garbled))
    ds = CriteoBatchDataset([tmp_path / "garbled.txt"], 100, DEFAULT_SPARSE_NAMES, TO_ID, rank=1, world_size=3)
    got = list(criteo_batches(ds, BadLines()))
    want = list(batches(read_rows([path]), 100, DEFAULT_SPARSE_NAMES, TO_ID))[1::3]
    assert len(got) == 3 and all(same(a, b) for a, b in zip(got, want))
    with pytest.raises(CriteoFormatError, match=r"garbled.txt:1: expected 40 tab-separated columns"):
        list(criteo_batches(CriteoBatchDataset([tmp_path / "garbled.txt"], 100, DEFAULT_SPARSE_NAMES, TO_ID, rank=0, world_size=3), BadLines()))


GOOD = ["1"] + ["3", "", "-2"] + ["7"] * 10 + ["68fd1e64", ""] + ["0a1b2c3d"] * 24


@pytest.mark.parametrize(
    "change,vectorized",
    [
        ({}, True),
        ({15: "1f"}, False),  # not 8 hex digits: parsed line by line, to the same values
        ({15: "0x68fd1e"}, False),
        ({2: "+5"}, True),
    ],
)
@pytest.mark.parametrize("labeled", [True, False])
def test_block_parse_equals_line_parse(change, vectorized, labeled):
    from torchrec_multihash.datasets.batching import lines_to_batch, rows_to_batch
    from torchrec_multihash.datasets.criteo_tsv import parse_block, parse_line
    from torchrec_multihash.datasets.id_mapping import Vocabulary

    fields = [change.get(i, v) for i, v in enumerate(GOOD)]
    text = ["\t".join(fields[0 if labeled else 1:]), "\t".join(GOOD[0 if labeled else 1:])]
    raw = [(t + "\r\n").encode() for t in text]
    assert (parse_block(raw, labeled) is not None) == vectorized
    rows = [parse_line(t, "f", i + 1, labeled) for i, t in enumerate(text)]
    for to_id in (TO_ID, Vocabulary.build(rows[:1], 26)):
        batch, bad = lines_to_batch([("f", i + 1, r) for i, r in enumerate(raw)], DEFAULT_SPARSE_NAMES, to_id, labeled)
        assert bad == [] and same(batch, rows_to_batch(rows, DEFAULT_SPARSE_NAMES, to_id))
