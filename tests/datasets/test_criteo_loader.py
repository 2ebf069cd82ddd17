"""Per-rank Criteo TSV loading: each rank parses only its batches, in DataLoader workers or not,
and gets exactly the batches of 'parse its share of the files (``tsv_ranges``), keep its batches';
over the ranks, every sample once."""

import gzip

import pytest
import torch

from torchrec_multihash.datasets.criteo_loader import CriteoBatchDataset, criteo_batches
from torchrec_multihash.datasets.criteo_tsv import DEFAULT_SPARSE_NAMES, BadLines, CriteoFormatError, read_rows
from torchrec_multihash.datasets.id_mapping import HashingIds
from torchrec_multihash.datasets.tsv_ranges import rank_share

from tests.helpers.cli import train
from tests.helpers.criteo import batches

TO_ID = HashingIds([1000] * 26)


@pytest.fixture(params=["gz", "plain"])
def files(request, shared_data, tmp_path):
    """The 900 Kaggle rows over two files (the first gzipped or not), with blank lines (not counted) between."""
    lines = (shared_data / "criteo_kaggle_900" / "train.txt").read_text().splitlines(keepends=True)
    lines.insert(10, "\n")
    lines.insert(300, "\r\n")
    if request.param == "gz":
        with gzip.open(tmp_path / "day_0.gz", "wt", newline="") as f:
            f.writelines(lines[:401])
    else:
        (tmp_path / "day_0.txt").write_text("".join(lines[:401]), newline="")
    (tmp_path / "day_1.txt").write_text("".join(lines[401:]) + "\n")
    return [tmp_path / ("day_0.gz" if request.param == "gz" else "day_0.txt"), tmp_path / "day_1.txt"]


def same(a, b):
    return (
        torch.equal(a.dense_features, b.dense_features)
        and torch.equal(a.labels, b.labels)
        and a.sparse_features.keys() == b.sparse_features.keys()
        and torch.equal(a.sparse_features.values(), b.sparse_features.values())
        and torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())
    )


def samples(batch_list):
    """The batches' samples as (label, dense, ids) tuples."""
    out = []
    for b in batch_list:
        ids = b.sparse_features.values().view(26, -1).t()
        out += [(b.labels[i].item(), tuple(b.dense_features[i].tolist()), tuple(ids[i].tolist())) for i in range(b.labels.numel())]
    return out


@pytest.mark.parametrize("world_size,bs,drop_last", [(1, 128, False), (2, 64, True), (3, 50, False), (2, 128, False), (4, 32, False)])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.filterwarnings("ignore::torchrec_multihash.datasets.tsv_ranges.SharedReadWarning")
def test_rank_batches_are_its_shares_batches_and_every_sample_once(files, world_size, bs, drop_last, num_workers):
    everything = samples(batches(read_rows(files), bs, DEFAULT_SPARSE_NAMES, TO_ID))
    assert len(everything) == 900
    union = []
    for rank in range(world_size):
        share = rank_share(files, rank, world_size, warn=False)
        mine = list(batches(read_rows(share.spans), bs, DEFAULT_SPARSE_NAMES, TO_ID, drop_last=drop_last))[share.slot :: share.slots]
        for skip in (0, 2):
            ds = CriteoBatchDataset(files, bs, DEFAULT_SPARSE_NAMES, TO_ID, rank, world_size, skip, drop_last)
            got = list(criteo_batches(ds, BadLines(), num_workers))
            assert len(got) == len(mine[skip:]) and all(same(a, b) for a, b in zip(got, mine[skip:])), (rank, skip)
            union += samples(got) if skip == 0 else []
    if not drop_last:
        assert sorted(union) == sorted(everything)  # every sample once over the ranks
    else:
        assert len(union) > 900 - world_size * bs and set(union) <= set(everything)


def test_other_ranks_lines_are_not_read(shared_data, tmp_path):
    """Rank 1 of 3 never parses the lines of other ranks' shares: they may even be garbage."""
    path = shared_data / "criteo_kaggle_900" / "train.txt"
    (span,) = rank_share([path], 1, 3).spans
    garbled, offset = [], 0
    for line in path.read_bytes().splitlines(keepends=True):  # same length: the shares stay where they are
        garbled.append(line if span.start <= offset < span.end else b"x" * (len(line) - 1) + b"\n")
        offset += len(line)
    (tmp_path / "garbled.txt").write_bytes(b"".join(garbled))
    ds = CriteoBatchDataset([tmp_path / "garbled.txt"], 100, DEFAULT_SPARSE_NAMES, TO_ID, rank=1, world_size=3)
    got = list(criteo_batches(ds, BadLines()))
    want = list(batches(read_rows([span]), 100, DEFAULT_SPARSE_NAMES, TO_ID))
    assert len(got) == len(want) == 4 and all(same(a, b) for a, b in zip(got, want))
    with pytest.raises(CriteoFormatError, match=r"garbled.txt:1: expected 40 tab-separated columns"):
        list(criteo_batches(CriteoBatchDataset([tmp_path / "garbled.txt"], 100, DEFAULT_SPARSE_NAMES, TO_ID, rank=0, world_size=3), BadLines()))


GOOD = ["1"] + ["3", "", "-2"] + ["7"] * 10 + ["68fd1e64", ""] + ["0a1b2c3d"] * 24


@pytest.mark.parametrize(
    "change,vectorized",
    [
        ({}, True),
        ({15: "1f"}, False),  # not 8 hex digits: parsed line by line, to the same values
        ({15: "68FD1E640A"}, False),  # 10 digits, upper case
    ],
)
@pytest.mark.parametrize("labeled", [True, False])
def test_block_parse_equals_line_parse(change, vectorized, labeled):
    from torchrec_multihash.datasets.batching import lines_to_batch, rows_to_batch
    from torchrec_multihash.datasets.criteo_tsv import parse_block, parse_line
    from torchrec_multihash.datasets.id_mapping import Vocabulary

    fields = [change.get(i, v) for i, v in enumerate(GOOD)]
    text = ["\t".join(fields[0 if labeled else 1 :]), "\t".join(GOOD[0 if labeled else 1 :])]
    raw = [(t + "\r\n").encode() for t in text]
    assert (parse_block(raw, labeled) is not None) == vectorized
    rows = [parse_line(t, "f", i + 1, labeled) for i, t in enumerate(text)]
    for to_id in (TO_ID, Vocabulary.build(rows[:1], 26)):
        batch, bad = lines_to_batch([("f", i + 1, r) for i, r in enumerate(raw)], DEFAULT_SPARSE_NAMES, to_id, labeled)
        assert bad == [] and same(batch, rows_to_batch(rows, DEFAULT_SPARSE_NAMES, to_id))


@pytest.fixture
def bad_file(shared_data, tmp_path):
    """Kaggle rows with 3 bad lines: 71 and 72 in batch 1 of 64 of rank 0 of 2, 751 in rank 1's share."""
    lines = (shared_data / "criteo_kaggle_900" / "train.txt").read_text().splitlines(keepends=True)
    lines[70] = "garbage\n"
    lines[71] = lines[71].replace("\t", "\tzz", 1)
    lines[750] = "2" + lines[750][1:]
    (tmp_path / "bad.txt").write_text("".join(lines))
    return tmp_path / "bad.txt"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_lines_are_skipped_counted_per_rank_and_limited(bad_file, num_workers):
    from torchrec_multihash.datasets.criteo_tsv import BadLineWarning

    def run(rank, limit):
        bad = BadLines(limit)
        ds = CriteoBatchDataset([bad_file], 64, DEFAULT_SPARSE_NAMES, TO_ID, rank, 2, drop_last=True, tolerate_corrupt=limit > 0)
        return [b.labels.numel() for b in criteo_batches(ds, bad, num_workers)], bad.count

    n0 = len(list(read_rows(rank_share([bad_file], 0, 2).spans, bad_lines=BadLines(2, warn_first=0)))) + 2  # rank 0's lines
    assert 72 < n0 < 750
    with pytest.warns(BadLineWarning, match=r"skipped bad line \(2 so far\): .*bad.txt:72: integer feature I1 is not an integer: 'zz4'"):
        sizes0, count0 = run(0, 3)
    # rank 1's share starts mid-file: its bad line is named by its line in the file all the same
    with pytest.warns(BadLineWarning, match=r"skipped bad line \(1 so far\): .*bad.txt:751: label must be 0 or 1, got '2'"):
        sizes1, count1 = run(1, 3)
    assert (count0, count1) == (2, 1)  # each rank counts the bad lines of its own batches
    assert sizes0 == [64, 62] + [64] * (n0 // 64 - 2)
    assert sizes1 == [63 if i == (750 - n0) // 64 else 64 for i in range((900 - n0) // 64)]
    with pytest.raises(CriteoFormatError, match=r"2 bad lines, more than data.skip_bad_lines=1; the last: .*bad.txt:72"):
        run(0, 1)
    with pytest.raises(CriteoFormatError, match=r"bad.txt:71: expected 40 tab-separated columns .* found 1$"):
        run(0, 0)
    with pytest.raises(CriteoFormatError, match=r"bad.txt:751: label must be 0 or 1"):
        run(1, 0)


def test_truncated_gz_ends_its_file_when_skipping(shared_data, tmp_path):
    from torchrec_multihash.datasets.criteo_tsv import BadLineWarning, LineStream

    lines = (shared_data / "criteo_kaggle_900" / "train.txt").read_bytes()
    data = gzip.compress(lines)
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "next.txt").write_bytes(lines)
    files = [tmp_path / "cut.gz", tmp_path / "next.txt"]
    readable = LineStream(files[:1], tolerate_corrupt=True).skip(10**6)
    assert 0 < readable < 900
    # no skipping: the batches before the cut are used, then the run stops
    got = []
    with pytest.raises(CriteoFormatError, match=rf"cut.gz: truncated or corrupt gzip after line {readable} "):
        for b in criteo_batches(CriteoBatchDataset(files, 32, DEFAULT_SPARSE_NAMES, TO_ID), BadLines()):
            got.append(b)
    assert len(got) == readable // 32
    # skipping: the file ends there, reported once over the ranks (by the one given it), and the next file is read
    counts, samples = [], 0
    for rank in (0, 1):
        bad = BadLines(5)
        reads_cut = [s.path for s in rank_share(files, rank, 2).spans] == [files[0]]
        with pytest.warns(BadLineWarning, match="cut.gz: truncated") if reads_cut else _no_warning():
            samples += sum(
                b.labels.numel()
                for b in criteo_batches(CriteoBatchDataset(files, 32, DEFAULT_SPARSE_NAMES, TO_ID, rank, 2, tolerate_corrupt=True), bad)
            )
        counts.append(bad.count)
    assert sum(counts) == 1 and samples == readable + 900
    rows = BadLines(5)
    assert len(list(read_rows(files, bad_lines=rows))) == readable + 900 and rows.count == 1


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def check():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield

    return check()


@pytest.mark.slow
@pytest.mark.distributed
def test_train_two_ranks_with_bad_lines(bad_file, tmp_path):
    """End to end on 2 ranks: skipped lines are summed over the ranks; without skipping the rank
    that meets the bad line stops with its file:line and the other stops too (no hang)."""
    common = ["--set", f"data.train={bad_file}", "--set", f"data.test={bad_file}", "--set", "train.batch_size=64"]
    r, m = train(
        tmp_path / "skip", *common, "--set", "data.skip_bad_lines=5", "--set", "data.ids=vocabulary", nproc=2, config="configs/criteo_kaggle_qr.yaml"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from torchrec_multihash.datasets.criteo_tsv import LineStream

    lines = [len(LineStream(rank_share([bad_file], rank, 2).spans).take(10**6)) for rank in (0, 1)]
    assert sum(lines) == 900 and m["skipped_lines"] == 3 and m["skipped_test_lines"] == 3 and m["steps"] == min(lines) // 64 == 6
    assert "bad lines skipped: 3 in training" in r.stdout
    # (torchrun ends the other rank as soon as one fails: it may not get to print its own line)
    r, _ = train(tmp_path / "stop", *common, nproc=2, config="configs/criteo_kaggle_qr.yaml")
    assert r.returncode != 0
    assert "torchrec-multihash train: " + str(bad_file) + ":71: expected 40 tab-separated columns" in r.stderr


def test_data_wait_and_measure_loader(shared_data, tmp_path):
    import time

    from torchrec_multihash.app.config import load_config
    from torchrec_multihash.app.data_timing import DataWait, measure_loader

    def slow():
        for x in (1, None, 3):
            time.sleep(0.05)
            yield x

    wait = DataWait()
    assert list(wait.timed(slow())) == [1, None, 3]
    assert 0.15 <= wait.seconds < 1.0
    path = shared_data / "criteo_kaggle_900" / "train.txt"
    cfg = load_config(
        "configs/criteo_kaggle_qr.yaml", [f"data.train={path}", f"data.test={path}", "train.batch_size=128", f"train.output_dir={tmp_path}"]
    )
    m = measure_loader(cfg, batches=3, rank=1, world_size=2)
    assert m["samples"] == 3 * 128 and m["samples_per_s"] > 0
    assert measure_loader(cfg, batches=100, rank=1, world_size=2)["samples"] == 3 * 128  # 7 batches: rank 1 has 3
