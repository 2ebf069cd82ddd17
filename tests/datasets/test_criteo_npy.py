"""The npy training reader: TorchRec's pipe's batches, any data position in O(1), a seeded
shuffled order that a resume reproduces, and DataLoader workers that keep the order."""

import numpy as np
import pytest
import torch
from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe

from torchrec_multihash.datasets.criteo_npy import NpyTrainBatches, npy_train_batches

KEYS = [f"C{i + 1}" for i in range(26)]
HASHES = [1000 + i for i in range(26)]


def _days(tmp_path, rows=(700, 500, 333)):
    """Days of random rows in TorchRec's npy layout; their dense paths."""
    g = np.random.default_rng(0)
    out = []
    for d, n in enumerate(rows):
        p = tmp_path / f"day_{d}"
        np.save(f"{p}_dense.npy", g.random((n, 13), dtype=np.float32))
        np.save(f"{p}_sparse.npy", g.integers(0, 2**31 - 1, (n, 26), dtype=np.int32))
        np.save(f"{p}_labels.npy", g.integers(0, 2, (n, 1), dtype=np.int32))
        out.append(str(p))
    return [[f"{p}_dense.npy", f"{p}_sparse.npy", f"{p}_labels.npy"] for p in out]


def _same(a, b):
    assert torch.equal(a.dense_features, b.dense_features)
    assert torch.equal(a.sparse_features.values().long(), b.sparse_features.values().long())
    assert torch.equal(a.sparse_features.lengths().int(), b.sparse_features.lengths().int())
    assert torch.equal(a.labels.float(), b.labels.float())


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_batches_are_torchrec_pipes(tmp_path, world_size):
    triplets = _days(tmp_path)
    for rank in range(world_size):
        pipe = InMemoryBinaryCriteoIterDataPipe(
            "train", *[[t[i] for t in triplets] for i in range(3)], batch_size=64, rank=rank, world_size=world_size,
            drop_last=True, mmap_mode=True, hashes=HASHES,
        )  # fmt: skip
        theirs = list(pipe)
        ours = list(NpyTrainBatches(triplets, 64, rank, world_size, KEYS, HASHES))
        assert len(ours) == len(theirs) == len(NpyTrainBatches(triplets, 64, rank, world_size, KEYS, HASHES)) > 0
        for a, b in zip(ours, theirs):
            _same(a, b)  # batches spanning two days included (700 = 10 * 64 + 60)


def test_a_resume_reads_what_an_uninterrupted_run_would_shuffled_or_not(tmp_path):
    triplets = _days(tmp_path)
    for seed in (None, 7):
        whole = list(NpyTrainBatches(triplets, 32, 1, 2, KEYS, HASHES, epoch=1, shuffle_seed=seed))
        resumed = list(NpyTrainBatches(triplets, 32, 1, 2, KEYS, HASHES, epoch=1, skip=9, shuffle_seed=seed))
        assert len(resumed) == len(whole) - 9
        for a, b in zip(resumed, whole[9:]):
            _same(a, b)
    # shuffled: another order each epoch, the same batches in all; every rank draws the same order
    plain = NpyTrainBatches(triplets, 32, 0, 1, KEYS, HASHES)
    e0, e1 = (NpyTrainBatches(triplets, 32, 0, 1, KEYS, HASHES, epoch=e, shuffle_seed=7).order() for e in (0, 1))
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == plain.order().tolist() and e0.tolist() != e1.tolist() != plain.order().tolist()
    ranks = [NpyTrainBatches(triplets, 32, r, 2, KEYS, HASHES, shuffle_seed=7).order() for r in (0, 1)]
    two = NpyTrainBatches(triplets, 32, 0, 2, KEYS, HASHES, shuffle_seed=7)  # 46 whole batches of 2 ranks (47 of 1)
    assert sorted(np.concatenate(ranks).tolist()) == list(range(two.num_batches)) and two.num_batches == 46


@pytest.mark.slow
def test_workers_keep_the_order(tmp_path):
    triplets = _days(tmp_path)
    one = list(NpyTrainBatches(triplets, 32, 0, 1, KEYS, HASHES, skip=3, shuffle_seed=1))
    two = list(npy_train_batches(NpyTrainBatches(triplets, 32, 0, 1, KEYS, HASHES, skip=3, shuffle_seed=1), num_workers=2))
    assert len(one) == len(two)
    for a, b in zip(one, two):
        _same(a, b)


def test_position_is_found_without_reading_what_comes_before(tmp_path, monkeypatch):
    triplets = _days(tmp_path)
    data = NpyTrainBatches(triplets, 16, 0, 1, KEYS, HASHES, skip=60)
    built = []
    real = NpyTrainBatches._batch
    monkeypatch.setattr(NpyTrainBatches, "_batch", lambda self, arrays, b: built.append(b) or real(self, arrays, b))
    next(iter(data))
    assert built == [60]  # the first batch built is the resumed one


def test_shuffle_is_for_npy_and_is_part_of_the_run_record():
    from torchrec_multihash.app.config import ConfigError, load_config
    from torchrec_multihash.app.provenance import data_record

    with pytest.raises(ConfigError, match="data.shuffle orders criteo_npy's batches; data.format synthetic is read in its own order"):
        load_config("configs/quickstart.yaml", ["data.shuffle=true"])
    cfg = load_config("configs/criteo_1tb_qr.yaml", ["data.shuffle=true"])
    assert data_record(cfg)["data.shuffle"] is True  # a resume under another order is refused, naming it
    assert "data.shuffle" not in data_record(load_config("configs/criteo_1tb_qr.yaml"))


def _make(tmp_path, **kw):
    """One day of 64 rows; ``kw`` replaces an array (dense, sparse or labels) or writes raw bytes."""
    g = np.random.default_rng(0)
    arrays = {
        "dense": g.random((64, 13), dtype=np.float32),
        "sparse": g.integers(0, 1000, (64, 26), dtype=np.int32),
        "labels": g.integers(0, 2, (64, 1), dtype=np.int32),
    }
    arrays.update(kw)
    for part, a in arrays.items():
        path = tmp_path / f"day_0_{part}.npy"
        path.write_bytes(a) if isinstance(a, bytes) else np.save(path, a)
    return str(tmp_path / "day_0_dense.npy")


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            {"sparse": np.ones((64, 26), dtype=np.float32)},
            r"day_0_sparse.npy: expected 26 column\(s\) of integers \(rows x 26\), got float32 \(64, 26\)",
        ),
        ({"labels": np.ones(64, dtype=np.int32)}, r"day_0_labels.npy: expected 1 column\(s\) of integers \(rows x 1\), got int32 \(64,\)"),
        ({"dense": np.ones((64, 12), dtype=np.float32)}, r"day_0_dense.npy: expected 13 column\(s\) of floats"),
        ({"dense": np.array([{"a": 1}] * 64, dtype=object)}, r"day_0_dense.npy is not an npy array of TorchRec's Criteo layout"),
        ({"sparse": b"these are not npy bytes"}, r"day_0_sparse.npy is not an npy array of TorchRec's Criteo layout"),
    ],
)
def test_npy_files_of_another_layout_are_named(tmp_path, kw, message):
    from torchrec_multihash.app.config import load_config
    from torchrec_multihash.app.data import make_data
    from torchrec_multihash.datasets.criteo_tsv import CriteoFormatError

    day = _make(tmp_path, **kw)
    cfg = load_config("configs/criteo_kaggle_qr.yaml", ["data.format=criteo_npy", f"data.train=[{day}]", f"data.test={day}", "train.batch_size=16"])
    with pytest.raises(CriteoFormatError, match=message):
        make_data(cfg, 0, 1, tmp_path)


def test_negative_ids_and_other_table_sizes_are_refused(tmp_path):
    import json

    from torchrec_multihash.app.config import ConfigError, load_config
    from torchrec_multihash.app.data import make_data
    from torchrec_multihash.datasets.criteo_tsv import CriteoFormatError

    sparse = np.random.default_rng(1).integers(0, 1000, (64, 26), dtype=np.int32)
    sparse[37, 5] = -4
    day = _make(tmp_path, sparse=sparse)
    sets = ["data.format=criteo_npy", f"data.train=[{day}]", f"data.test={day}", "train.batch_size=16"]
    cfg = load_config("configs/criteo_kaggle_qr.yaml", sets)
    batches = make_data(cfg, 0, 1, tmp_path).train(0, 0)
    assert len([next(batches), next(batches)]) == 2  # rows 0-31 are fine
    with pytest.raises(CriteoFormatError, match=r"day_0_dense.npy row 37: negative sparse id\(s\) \[-4\]"):
        next(batches)
    # the test files too (TorchRec's pipe, which applied the modulo before we saw the ids)
    tests = make_data(cfg, 0, 1, tmp_path).test()
    sizes = np.array(cfg.embeddings.num_embeddings_per_feature)
    want = torch.from_numpy((sparse[:16] % sizes).T.reshape(-1)).long()  # hashed mod the sizes, feature-major
    assert torch.equal(next(tests).sparse_features.values(), want)
    with pytest.raises(CriteoFormatError, match=r"day_0_dense.npy row 37: negative sparse id\(s\) \[-4\]"):
        list(tests)
    # a folder preprocessed for other table sizes: its ids would wrap modulo these
    (tmp_path / "preprocess.json").write_text(json.dumps({"ids": "hashing", "sizes": [7] * 26, "labeled": True}))
    with pytest.raises(ConfigError, match=r"was preprocessed for table sizes \[7, 7,.*but embeddings.num_embeddings_per_feature is"):
        make_data(cfg, 0, 1, tmp_path)
    sizes = cfg.embeddings.num_embeddings_per_feature
    (tmp_path / "preprocess.json").write_text(json.dumps({"ids": "hashing", "sizes": sizes, "labeled": True}))
    make_data(cfg, 0, 1, tmp_path)  # the sizes it was made for
