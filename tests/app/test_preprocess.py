"""``torchrec-multihash preprocess``: TSV days -> TorchRec's npy layout, equal to what the TSV reader
gives; resumable per day; bad lines named; the npy files train."""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_multihash.app import preprocess as pp
from torchrec_multihash.app.config import load_config
from torchrec_multihash.app.data import make_data
from torchrec_multihash.datasets.synthetic import write_criteo_tsv

from tests.helpers.cli import train

SIZES = [1000 + 37 * i for i in range(26)]
SIZES_ARGS = ["--sizes", *map(str, SIZES)]


def _run(inputs, out, *extra):
    return pp.main([*map(str, inputs), "--out-dir", str(out), "--quiet", *SIZES_ARGS, *extra])


def _cfg(fmt, train_paths, *extra):
    sets = [
        f"data.format={fmt}",
        f"data.train={train_paths}",
        f"data.test={train_paths}",
        "train.batch_size=64",
        f"embeddings.num_embeddings_per_feature={SIZES}",
    ]
    return load_config("configs/criteo_kaggle_hash.yaml", [*sets, *extra])


def _batches(cfg, rank, world, tmp):
    return [(b.dense_features, b.sparse_features.values(), b.labels) for b in make_data(cfg, rank, world, tmp).train(0, 0)]


def _samples(batches):
    """(dense, ids, label) of every sample of the batches."""
    out = []
    for dense, ids, labels in batches:
        ids = ids.view(26, -1).t()
        out += [(tuple(dense[i].tolist()), tuple(ids[i].tolist()), labels[i].item()) for i in range(len(labels))]
    return out


def _same(a, b):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


def _days(src: Path, tmp: Path, split: int, gz: bool = False):
    lines = src.read_bytes().splitlines(keepends=True)
    out = []
    for day, part in enumerate([lines[:split], lines[split:]]):
        p = tmp / f"day_{day}" if not gz else tmp / f"day_{day}.gz"
        p.write_bytes(gzip.compress(b"".join(part)) if gz else b"".join(part))
        out.append(p)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_npy_equals_tsv_reader_on_real_rows(shared_data, tmp_path, gz):
    tsv = _days(shared_data / "criteo_kaggle_900/train.txt", tmp_path, 500, gz)
    assert _run(tsv, tmp_path / "npy") == 0
    npy = [str(tmp_path / "npy" / f"day_{d}_dense.npy") for d in (0, 1)]
    npy_cfg, tsv_cfg = _cfg("criteo_npy", npy), _cfg("criteo_tsv", [str(p) for p in tsv])
    _same(_batches(npy_cfg, 0, 1, tmp_path), _batches(tsv_cfg, 0, 1, tmp_path))
    # on 2 ranks each splits the rows its own way (TorchRec's pipe by rows, the TSV reader by bytes):
    # over the ranks, distinct samples of the same rows, all but the last partial batch of each
    everything = _samples(_batches(tsv_cfg, 0, 1, tmp_path))
    for cfg in (npy_cfg, tsv_cfg):
        union = [s for rank in (0, 1) for s in _samples(_batches(cfg, rank, 2, tmp_path))]
        assert len(set(union)) == len(union) > 900 - 2 * 64 and set(union) <= set(everything)
    sparse = np.load(npy[0].replace("dense", "sparse"))
    assert sparse.dtype == np.int32 and sparse.shape == (500, 26)
    labels = np.load(npy[0].replace("dense", "labels"))
    assert labels.dtype == np.int32 and labels.shape == (500, 1)


def test_npy_equals_tsv_reader_on_generated_file_in_small_chunks(tmp_path):
    src = tmp_path / "day_0.tsv"
    write_criteo_tsv(src, 3000, seed=3)
    assert _run([src], tmp_path / "npy", "--chunk-lines", "333") == 0
    npy = [str(tmp_path / "npy" / "day_0_dense.npy")]
    _same(_batches(_cfg("criteo_npy", npy), 0, 1, tmp_path), _batches(_cfg("criteo_tsv", [str(src)]), 0, 1, tmp_path))
    assert np.load(npy[0]).shape == (3000, 13)


def test_vocabulary_is_built_once_and_saved_beside(shared_data, tmp_path):
    src = shared_data / "criteo_kaggle_900/train.txt"
    assert pp.main([str(src), "--out-dir", str(tmp_path), "--quiet", "--ids", "vocabulary"]) == 0
    record = json.loads((tmp_path / "preprocess.json").read_text())
    sparse = np.load(tmp_path / "train_sparse.npy")
    assert (sparse.max(axis=0) < np.array(record["sizes"])).all() and (tmp_path / "vocabulary.json").is_file()
    cfg = load_config(None, ["data.format=criteo_tsv", f"data.train=[{src}]", f"data.test=[{src}]", "data.ids=vocabulary", "train.batch_size=100"])
    cfg.model.dense_in_features = 13
    tsv = [b.sparse_features.values().view(26, -1).t() for b in make_data(cfg, 0, 1, tmp_path / "run").train(0, 0)]
    assert torch.equal(torch.cat(tsv), torch.from_numpy(sparse).long())
    # another id mapping in the same folder is refused
    assert _run([src], tmp_path) == 2


def test_resume_skips_finished_days_and_redoes_a_half_written_one(shared_data, tmp_path, monkeypatch, capsys):
    tsv = _days(shared_data / "criteo_kaggle_900/train.txt", tmp_path, 500)
    out = tmp_path / "npy"
    real = pp.convert_day

    def dies_on_day_1(src, *a, **k):
        if src.name == "day_1":
            (out / ".day_1_dense.npy.part").write_bytes(b"half")
            raise KeyboardInterrupt
        return real(src, *a, **k)

    monkeypatch.setattr(pp, "convert_day", dies_on_day_1)
    with pytest.raises(KeyboardInterrupt):
        _run(tsv, out)
    assert (out / "day_0_dense.npy").is_file() and not (out / "day_1_dense.npy").exists()
    mtime = (out / "day_0_dense.npy").stat().st_mtime_ns
    monkeypatch.setattr(pp, "convert_day", real)
    capsys.readouterr()
    assert _run(tsv, out) == 0
    assert "day_0: done before (500 rows), skipped" in capsys.readouterr().err
    assert (out / "day_0_dense.npy").stat().st_mtime_ns == mtime and len(np.load(out / "day_1_dense.npy")) == 400
    # a day whose files were damaged after it finished is redone
    (out / "day_1_sparse.npy").write_bytes(b"junk")
    assert _run(tsv, out) == 0
    assert "day_1: 400 rows" in capsys.readouterr().err and len(np.load(out / "day_1_sparse.npy")) == 400
    # a changed source is redone
    shutil.copy(tsv[0], tmp_path / "x")
    tsv[1].write_bytes((tmp_path / "x").read_bytes())
    assert _run(tsv, out) == 0 and len(np.load(out / "day_1_dense.npy")) == 500


def test_bad_line_is_named_and_leaves_no_finished_day(shared_data, tmp_path, capsys):
    lines = (shared_data / "criteo_kaggle_900/train.txt").read_bytes().splitlines(keepends=True)
    src = tmp_path / "day_0"
    src.write_bytes(b"".join(lines[:2] + [b"1\tx\n"] + lines[2:10]))
    assert _run([src], tmp_path / "npy") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{src}:3: expected 40 tab-separated columns" in err
    assert not (tmp_path / "npy" / "day_0_dense.npy").exists()
    assert not list((tmp_path / "npy").glob(".*.part"))  # nor a half-written one
    assert _run([src], tmp_path / "npy", "--skip-bad-lines", "1") == 0
    assert len(np.load(tmp_path / "npy" / "day_0_labels.npy")) == 10


@pytest.mark.slow
def test_tiny_train_on_preprocessed_days_with_a_1tb_config(shared_data, tmp_path):
    tsv = _days(shared_data / "criteo_kaggle_900/train.txt", tmp_path, 500)
    assert pp.main([*map(str, tsv), "--out-dir", str(tmp_path / "npy"), "--quiet", "--config", "configs/criteo_1tb_hash.yaml"]) == 0
    days = [str(tmp_path / "npy" / f"day_{d}_dense.npy") for d in (0, 1)]
    small = ["model.embedding_dim=4", "model.dense_arch_layer_sizes=[16,4]", "model.over_arch_layer_sizes=[16,1]", "train.batch_size=64"]
    sets = [a for s in [f"data.train={days}", f"data.test={days[1:]}", *small] for a in ("--set", s)]
    r, _ = train(tmp_path / "run", *sets, config="configs/criteo_1tb_hash.yaml")  # it trains on CUDA: none here
    assert r.returncode == 2 and "train.device is cuda but no CUDA device is visible" in r.stderr and "Traceback" not in r.stderr
    r, m = train(tmp_path / "run", *sets, "--set", "train.device=auto", config="configs/criteo_1tb_hash.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    assert m["steps"] == 900 // 64 and m["test_samples"] == 400
