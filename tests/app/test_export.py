"""``torchrec-multihash export``: a trained run as one TorchScript file with quantized tables that
plain torch + torchrec + fbgemm_gpu load and run, with the trained model's quality."""

import re
import sys

import fbgemm_gpu  # noqa: F401  the ops an exported file calls, for torch.jit.load
import pytest
import torch
import torchrec  # noqa: F401

from tests.helpers.cli import SMALL, run, run_cli, train

# a fresh interpreter in which this package cannot be imported: the file must run without it
LOAD_WITHOUT_PACKAGE = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchrec_multihash":
            raise ImportError("torchrec_multihash must not be needed to serve")
sys.meta_path.insert(0, Block())
import torch, torchrec, fbgemm_gpu  # noqa: F401  what a serving host has
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
model = torch.jit.load(sys.argv[1])
batch = torch.load(sys.argv[2])
kjt = KeyedJaggedTensor(keys=batch["keys"], values=batch["values"], lengths=batch["lengths"])
torch.save(model(batch["dense"], kjt), sys.argv[3])
"""


@pytest.mark.slow
def test_exported_int8_model_runs_without_the_package_and_matches_the_quantized_model(tmp_path):
    from torchrec_multihash.app.config import load_config
    from torchrec_multihash.app.export import load_trained_model
    from torchrec_multihash.datasets.synthetic import SyntheticCriteo
    from torchrec_multihash.inference import quantize_embeddings

    overrides = [*SMALL, "--set", "train.max_steps=30", "--set", "train.checkpoint_every=30", "--set", "embeddings.strategy=qr"]
    r, _ = train(tmp_path, *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "model.pt"
    common = ["--config", "configs/quickstart.yaml", "--set", f"train.output_dir={tmp_path / 'run'}", *overrides]
    r = run_cli("export", *common, "--out", str(out), "--dtype", "int8")
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"Embedding bytes: ([\d,]+) exported vs ([\d,]+) trained", r.stdout)
    assert m and int(m[1].replace(",", "")) < int(m[2].replace(",", "")), r.stdout

    cfg = load_config("configs/quickstart.yaml", [o for o in overrides if o != "--set"] + [f"train.output_dir={tmp_path / 'run'}"])
    eager = quantize_embeddings(load_trained_model(cfg, tmp_path / "run" / "checkpoint"), torch.qint8).eval()
    b = SyntheticCriteo(cfg.embeddings.num_embeddings_per_feature, seed=5).batch(64, 0)
    kjt = b.sparse_features
    torch.save({"keys": kjt.keys(), "values": kjt.values(), "lengths": kjt.lengths(), "dense": b.dense_features}, tmp_path / "batch.pt")
    r = run([sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(out), str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt")])
    assert r.returncode == 0, r.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), eager(b.dense_features, kjt))


def _reported_and_stored(r, out) -> tuple:
    """The embedding bytes ``export`` printed, and those its TorchScript file holds: the quantized
    rows are the file's uint8 tensors (the others are FBGEMM's weights_tys, a byte per table)."""
    m = re.search(r"Embedding bytes: ([\d,]+) exported", r.stdout)
    assert m, r.stdout
    return int(m[1].replace(",", "")), sum(t.numel() for t in torch.jit.load(str(out)).state_dict().values() if t.dtype == torch.uint8)


@pytest.mark.slow
def test_int8_export_keeps_the_movielens_auc_and_reports_the_bytes_it_stores(tmp_path, shared_data):
    """int8 keeps the AUC; int4 rows are half of int8's (dim 16: 8 + 4 bytes of scale and bias against
    16 + 4, each padded to 16): the reported bytes are those in the TorchScript file, not the
    state_dict's unpacked int4 views."""
    d = shared_data / "movielens_100k_ctr"
    overrides = ["--set", f"data.train={d / 'train.txt'}", "--set", f"data.test={d / 'test.txt'}", "--set", "embeddings.strategy=qr"]
    overrides += ["--set", "embeddings.compression=8", "--set", "train.checkpoint_every=100000"]
    config = "configs/movielens_100k_ctr_full.yaml"
    r, metrics = train(tmp_path, *overrides, config=config)
    assert r.returncode == 0, r.stderr[-3000:]
    common = ["--config", config, "--set", f"train.output_dir={tmp_path / 'run'}", *overrides]
    r = run_cli("export", *common, "--out", str(tmp_path / "int8.pt"), "--evaluate")
    assert r.returncode == 0, r.stderr[-3000:]
    aucs = {name: float(v) for name, v in re.findall(r"(trained|exported)\s+test AUC ([\d.]+)", r.stdout)}
    assert aucs["trained"] == pytest.approx(metrics["auc"], abs=1e-4)  # the checkpoint is the trained model
    assert abs(aucs["exported"] - aucs["trained"]) <= 0.002, r.stdout
    assert aucs["trained"] > 0.74
    reported, stored = {}, {}
    reported["int8"], stored["int8"] = _reported_and_stored(r, tmp_path / "int8.pt")
    for name, options in (("int4", ["--dtype", "int4"]), ("int4_align4", ["--dtype", "int4", "--row-alignment", "4"])):
        out = tmp_path / f"{name}.pt"
        r = run_cli("export", *common, *options, "--out", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        reported[name], stored[name] = _reported_and_stored(r, out)
    for name in reported:
        assert reported[name] <= stored[name] <= reported[name] + 64, (name, reported[name], stored[name])
    assert 0.48 < reported["int4"] / reported["int8"] < 0.52, reported
    assert reported["int4_align4"] < 0.8 * reported["int4"], reported  # 12-byte rows instead of 16


def test_export_without_a_checkpoint_is_a_clear_error(tmp_path):
    r = run_cli("export", "--config", "configs/quickstart.yaml", "--set", f"train.output_dir={tmp_path}", "--out", str(tmp_path / "m.pt"))
    assert r.returncode == 2 and "no checkpoint in" in r.stderr and "Traceback" not in r.stderr, r.stderr
