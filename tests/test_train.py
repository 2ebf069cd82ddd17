"""The training app end to end: synthetic data on 1 and 2 processes, real MovieLens CTR data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEYS = {"auc", "logloss", "ne", "embedding_bytes", "full_embedding_bytes", "train_samples_per_s", "steps", "world_size"}


def train(tmp_path, *args, nproc=1, config="configs/quickstart.yaml"):
    out = tmp_path / "metrics.json"
    common = ["--config", config, "--metrics-out", str(out), "--set", f"train.output_dir={tmp_path / 'run'}", *args]
    tmp_path.mkdir(parents=True, exist_ok=True)
    if nproc == 1:
        cmd = [sys.executable, "-m", "torchrec_multihash.cli", "train", *common]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "-m", "torchrec_multihash.cli", "train", *common]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return r, (json.loads(out.read_text()) if out.exists() else None)


SMALL = ["--set", "data.train_samples=60000", "--set", "data.test_samples=8192", "--set", "train.batch_size=512"]


def test_synthetic_data_is_deterministic_and_finite():
    import torch
    from torchrec_multihash.datasets.synthetic import SyntheticCriteo

    a, b = SyntheticCriteo([10**6, 100], seed=3), SyntheticCriteo([10**6, 100], seed=3)
    for i in range(200):  # enough draws that a log(0) would have shown up
        x, y = a.batch(2048, i), b.batch(2048, i)
        assert torch.isfinite(x.dense_features).all()
        assert torch.equal(x.sparse_features.values(), y.sparse_features.values()) and torch.equal(x.labels, y.labels)
    ids = torch.arange(10**6)
    # the hidden clusters are a function of the id alone, and all are used
    assert torch.equal(a.clusters(0, ids), b.clusters(0, ids)) and a.clusters(0, ids).unique().numel() == 64


def test_synthetic_one_process_learns_and_writes_metrics(tmp_path):
    r, m = train(tmp_path, *SMALL, "--set", "train.eval_every=50")
    assert r.returncode == 0, r.stderr[-3000:]
    assert KEYS <= set(m)
    assert m["steps"] == 117 and m["world_size"] == 1
    assert m["full_embedding_bytes"] / m["embedding_bytes"] > 7
    assert m["auc"] > 0.58  # the hidden clusters are learnable (base rate gives 0.5)
    assert [h["step"] for h in m["eval_history"]] == [50, 100]
    assert "Test AUC" in r.stdout and "Run outputs in" in r.stdout


def test_synthetic_two_processes(tmp_path):
    # evaluation in the middle of training must not collide with batches in flight
    r, m = train(tmp_path, *SMALL, "--set", "train.eval_every=25", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert m["world_size"] == 2 and m["steps"] == 58
    assert [h["step"] for h in m["eval_history"]] == [25, 50]
    assert m["auc"] > 0.55


def test_movielens_full_and_qr(tmp_path, shared_data):
    cfg = "configs/movielens_100k_ctr_full.yaml"
    data = ["--set", f"data.train={shared_data / 'movielens_100k_ctr/train.txt'}", "--set", f"data.test={shared_data / 'movielens_100k_ctr/test.txt'}"]
    r, full = train(tmp_path / "full", *data, config=cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert full["auc"] > 0.775  # reference (shared/data/README.md): about 0.787
    r, qr = train(tmp_path / "qr", *data, "--set", "embeddings.strategy=qr", "--set", "embeddings.compression=4", config=cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 3.9 < qr["full_embedding_bytes"] / qr["embedding_bytes"] < 4.1  # a quarter of the memory
    assert qr["full_embedding_bytes"] == full["full_embedding_bytes"]
    assert qr["auc"] > 0.76


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "train.batchsize=3"], "unknown key(s) ['train.batchsize']"),
        (["--set", "data.format=parquet"], "data.format must be one of"),
        (["--set", "data.format=criteo_tsv", "--set", "data.train=/nope.txt", "--set", "data.test=/nope.txt"], "data.train: no such file(s) ['/nope.txt']"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, args, message):
    r, _ = train(tmp_path, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_checkpoint_then_resume_continues_where_it_stopped(tmp_path):
    """2 ranks: 20 steps and a checkpoint, then --resume to the end == one uninterrupted run."""
    common = [*SMALL, "--set", "train.checkpoint_every=20"]
    r, first = train(tmp_path / "a", *common, "--set", "train.max_steps=20", "--set", f"train.output_dir={tmp_path / 'run'}", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert first["steps"] == 20 and (tmp_path / "run" / "checkpoint" / ".metadata").is_file()
    r, resumed = train(tmp_path / "b", *common, "--set", f"train.output_dir={tmp_path / 'run'}", "--resume", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from" in r.stdout and "step 20" in r.stdout
    r, straight = train(tmp_path / "c", *common, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert resumed["steps"] == straight["steps"] == 58
    assert resumed["logloss"] == pytest.approx(straight["logloss"], abs=1e-6)
    assert resumed["auc"] == pytest.approx(straight["auc"], abs=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    r, _ = train(tmp_path, *SMALL, "--resume")
    assert r.returncode == 2 and "--resume: no checkpoint in" in r.stderr and "Traceback" not in r.stderr
