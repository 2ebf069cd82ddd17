"""The Criteo TSV reader on real rows (../shared/data/criteo_kaggle_900) and on malformed input."""

import gzip
import math

import pytest
import torch
from torchrec import EmbeddingBagConfig

from torchrec_multihash import MultiHashEmbeddingBagCollection
from torchrec_multihash.datasets.criteo_tsv import DEFAULT_SPARSE_NAMES, CriteoFormatError, read_rows
from torchrec_multihash.datasets.id_mapping import HashingIds, Vocabulary
from torchrec_multihash.modules.convert import to_multihash_configs

from tests.helpers.cli import train
from tests.helpers.criteo import batches


@pytest.fixture
def kaggle(shared_data):
    return shared_data / "criteo_kaggle_900"


def first_line(path):
    with open(path) as f:
        return f.readline().rstrip("\n").split("\t")


def test_reads_real_rows(kaggle):
    rows = list(read_rows([kaggle / "train.txt"]))
    assert len(rows) == 900
    assert abs(sum(r.label for r in rows) / 900 - 0.196) < 0.001
    raw = first_line(kaggle / "train.txt")
    r = rows[0]
    for i in range(13):
        x = raw[1 + i]
        assert r.dense[i] == pytest.approx(0.0 if x == "" else math.log1p(max(int(x), 0)))
    for i in range(26):
        x = raw[14 + i]
        assert r.sparse[i] == (None if x == "" else int(x, 16))
    assert any(v is None for row in rows for v in row.sparse)  # empty categoricals occur
    unlabeled = list(read_rows([kaggle / "test_unlabeled.txt"], labeled=False))
    assert len(unlabeled) == 100 and unlabeled[0].label is None


def test_gz_and_several_files(kaggle, tmp_path):
    lines = (kaggle / "train.txt").read_text().splitlines(keepends=True)
    with gzip.open(tmp_path / "day_0.gz", "wt") as f:
        f.writelines(lines[:500])
    (tmp_path / "day_1.txt").write_text("".join(lines[500:]))
    rows = list(read_rows([tmp_path / "day_0.gz", tmp_path / "day_1.txt"]))
    assert [r.sparse for r in rows] == [r.sparse for r in read_rows([kaggle / "train.txt"])]


def test_truncated_gz(kaggle, tmp_path):
    data = gzip.compress((kaggle / "train.txt").read_bytes())
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CriteoFormatError, match=r"cut.gz: truncated or corrupt gzip after line \d+"):
        list(read_rows([tmp_path / "cut.gz"]))


GOOD = "\t".join(["1"] + ["3"] * 13 + ["68fd1e64"] * 26)


@pytest.mark.parametrize(
    "bad,message",
    [
        ("\t".join(GOOD.split("\t")[:-1]), r"bad.txt:2: expected 40 tab-separated columns .* found 39"),
        (GOOD.replace("68fd1e64", "zz-not-hex", 1), r"bad.txt:2: categorical feature C1 is not a hex string: 'zz-not-hex'"),
        (GOOD.replace("\t3\t", "\t3.5\t", 1), r"bad.txt:2: integer feature I1 is not an integer: '3.5'"),
        ("2" + GOOD[1:], r"bad.txt:2: label must be 0 or 1, got '2'"),
    ],
)
def test_malformed_lines(tmp_path, bad, message):
    (tmp_path / "bad.txt").write_text(GOOD + "\n" + bad + "\n")
    with pytest.raises(CriteoFormatError, match=message):
        list(read_rows([tmp_path / "bad.txt"]))


def test_negative_ints_are_clamped_and_missing_file_is_an_error(tmp_path):
    (tmp_path / "neg.txt").write_text(GOOD.replace("\t3\t", "\t-2\t", 1) + "\n")
    (row,) = read_rows([tmp_path / "neg.txt"])
    assert row.dense[0] == 0.0 and row.dense[1] == pytest.approx(math.log(4))
    with pytest.raises(CriteoFormatError, match="no such file"):
        list(read_rows([tmp_path / "missing.txt"]))


def test_hashing_and_vocabulary_ids(kaggle, tmp_path):
    rows = list(read_rows([kaggle / "train.txt"]))
    h = HashingIds([1000] * 26)
    assert h(0, rows[0].sparse[0]) == rows[0].sparse[0] % 1000 and h(5, None) == 0
    vocab = Vocabulary.build(rows, 26, min_count=2)
    # ids follow falling frequency; values seen once, and missing ones, are out of vocabulary
    counts = {}
    for r in rows:
        if r.sparse[0] is not None:
            counts[r.sparse[0]] = counts.get(r.sparse[0], 0) + 1
    top = max(counts, key=lambda v: (counts[v], -v))
    assert vocab(0, top) == 1
    once = next(v for v, n in counts.items() if n == 1)
    assert vocab(0, once) == Vocabulary.OOV and vocab(0, None) == Vocabulary.OOV
    assert vocab.sizes()[0] == sum(1 for n in counts.values() if n >= 2) + 1
    vocab.save(tmp_path / "vocab.json")
    again = Vocabulary.load(tmp_path / "vocab.json")
    assert again.ids == vocab.ids and again.min_count == 2
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="junk.json: not a vocabulary file"):
        Vocabulary.load(tmp_path / "junk.json")


def test_batches_feed_the_module(kaggle):
    rows = read_rows([kaggle / "train.txt"])
    vocab_sizes = [10_000] * 26
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", num_embeddings=n, embedding_dim=8, feature_names=[f]) for f, n in zip(DEFAULT_SPARSE_NAMES, vocab_sizes)
    ]
    ebc = MultiHashEmbeddingBagCollection(to_multihash_configs(tables, 4))
    got = list(batches(rows, 256, DEFAULT_SPARSE_NAMES, HashingIds(vocab_sizes)))
    assert [b.labels.numel() for b in got] == [256, 256, 256, 132]
    b = got[0]
    assert b.dense_features.shape == (256, 13) and b.sparse_features.keys() == DEFAULT_SPARSE_NAMES
    assert ebc(b.sparse_features).values().shape == (256, 26 * 8)
    assert torch.equal(b.sparse_features["C3"].values()[:1], torch.tensor([int(first_line(kaggle / "train.txt")[16], 16) % 10_000]))


@pytest.mark.slow
def test_train_on_torchrec_npy_layout(kaggle, tmp_path):
    """TorchRec's preprocessed .npy layout (what torchrec.datasets.criteo reads) trains too."""
    from torchrec.datasets.criteo import BinaryCriteoUtils

    prefix = tmp_path / "day_0"
    BinaryCriteoUtils.tsv_to_npys(str(kaggle / "train.txt"), f"{prefix}_dense.npy", f"{prefix}_sparse.npy", f"{prefix}_labels.npy")
    npy = ["--set", "data.format=criteo_npy", "--set", "train.batch_size=128"]
    r, m = train(
        tmp_path / "npy",
        *npy,
        "--set",
        f"data.train={prefix}_dense.npy",
        "--set",
        f"data.test={prefix}_dense.npy",
        config="configs/criteo_kaggle_qr.yaml",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert m["steps"] == 900 // 128 and m["test_samples"] == 900
    r, _ = train(
        tmp_path / "tsv",
        *npy,
        "--set",
        f"data.train={kaggle / 'train.txt'}",
        "--set",
        f"data.test={kaggle / 'train.txt'}",
        config="configs/criteo_kaggle_qr.yaml",
    )
    assert r.returncode == 2 and "is not a *_dense.npy file" in r.stderr


def npy_days(kaggle, tmp_path, split=500):
    """The 900 Kaggle rows as two days of TorchRec's .npy layout (rows :split and split:)."""
    from torchrec.datasets.criteo import BinaryCriteoUtils

    lines = (kaggle / "train.txt").read_text().splitlines(keepends=True)
    dense = []
    for day, part in enumerate([lines[:split], lines[split:]]):
        (tmp_path / f"day_{day}.txt").write_text("".join(part))
        prefix = tmp_path / f"day_{day}"
        BinaryCriteoUtils.tsv_to_npys(str(prefix) + ".txt", f"{prefix}_dense.npy", f"{prefix}_sparse.npy", f"{prefix}_labels.npy")
        dense.append(f"{prefix}_dense.npy")
    return dense


@pytest.mark.slow
@pytest.mark.distributed
def test_npy_two_processes_train(kaggle, tmp_path):
    days = npy_days(kaggle, tmp_path)
    r, m = train(
        tmp_path,
        "--set",
        "data.format=criteo_npy",
        "--set",
        f"data.train={days}",
        "--set",
        f"data.test={days}",
        "--set",
        "train.batch_size=64",
        nproc=2,
        config="configs/criteo_kaggle_qr.yaml",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # 14 full global batches of 64, 7 per rank; the test set counts every row (the last batch padded)
    assert m["world_size"] == 2 and m["steps"] == 7 and m["test_samples"] == 900


def test_npy_ranks_split_rows_and_nan_names_file_and_row(kaggle, tmp_path):
    import numpy as np

    from torchrec_multihash.app.config import load_config
    from torchrec_multihash.app.data import make_data

    days = npy_days(kaggle, tmp_path)
    cfg = load_config("configs/criteo_kaggle_qr.yaml", ["data.format=criteo_npy", f"data.train={days}", f"data.test={days}", "train.batch_size=64"])

    def dense(rank, world):
        return [b.dense_features for b in make_data(cfg, rank, world, tmp_path).train(0, 0)]

    one = dense(0, 1)
    ranks = [dense(0, 2), dense(1, 2)]
    assert len(one) == 14 and all(torch.equal(one[2 * i + r], ranks[r][i]) for r in (0, 1) for i in range(7))
    # a NaN in day_1 row 100 (global row 600, batch 9: rank 1's 5th) stops rank 1 there, naming it
    arr = np.load(days[1])
    arr[100, 4] = np.nan
    np.save(days[1], arr)
    assert len(dense(0, 2)) == 7
    with pytest.raises(CriteoFormatError, match=r"day_1_dense.npy row 100: dense features are not finite \(NaN or inf\)"):
        dense(1, 2)


def test_a_line_longer_than_any_criteo_line_is_a_bad_line_not_terabytes():
    from torchrec_multihash.datasets.batching import parse_lines

    good = ("1\t" + "\t".join(["5"] * 13) + "\t" + "\t".join(["68fd1e64"] * 26) + "\n").encode()
    huge = ("0\t" + "\t".join(["5"] * 13) + "\t" + "a" * 5_000_000 + "\t" + "\t".join(["68fd1e64"] * 25) + "\n").encode()
    block, bad = parse_lines([("day.tsv", 1, good), ("day.tsv", 2, huge), ("day.tsv", 3, good)])
    assert block is not None and len(block.labels) == 2  # the good lines, parsed (the vectorized parse would size every row by the field)
    assert bad == [f"day.tsv:2: the line is {len(huge):,} bytes long, more than any Criteo line (at most 65,536)"]
