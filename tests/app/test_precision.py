"""fp16 rows: half the bytes a value, sized for the bytes, trained by FBGEMM's fused optimizer,
checkpointed, exported and quantized like fp32 ones."""

import pytest
import torch
import torch.distributed as dist
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash import MultiHashConfigError, MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig, to_multihash_configs
from torchrec_multihash.app.config import ConfigError, load_config
from torchrec_multihash.app.model import build_tables
from torchrec_multihash.distributed import shard_model

from tests.helpers.cli import SMALL, run_cli, train
from tests.helpers.distributed import run_multiprocess

QUICKSTART = "configs/quickstart.yaml"


def _bytes(tables):
    return sum(t.strategy_impl().memory_bytes() for t in tables)


def test_fp16_rows_are_sized_for_the_bytes_of_the_compression():
    fp32 = build_tables(load_config(QUICKSTART, ["embeddings.compression=8"]))
    fp16 = build_tables(load_config(QUICKSTART, ["embeddings.compression=8", "embeddings.precision=fp16"]))
    at4 = build_tables(load_config(QUICKSTART, ["embeddings.compression=4"]))
    # the rows of 4x, each half the bytes: the bytes of 8x
    for a, b in zip(fp16, at4):
        assert a.data_type == DataType.FP16 and b.data_type == DataType.FP32
        assert (a.strategy, a.num_collisions) == (b.strategy, b.num_collisions)
        assert a.strategy_impl().memory_bytes() * 2 == b.strategy_impl().memory_bytes()
    assert _bytes(fp16) == pytest.approx(_bytes(fp32), rel=0.02)
    # the reference of every reduction is the fp32 full tables: full fp16 tables are 2x smaller
    full16 = MultiHashEmbeddingBagCollection(build_tables(load_config(QUICKSTART, ["embeddings.strategy=full", "embeddings.precision=fp16"])))
    assert full16.full_memory_bytes() == 2 * full16.memory_bytes()
    msg = "embeddings: compression 1.5 with FP16 rows: those rows alone make a table 2x smaller than in fp32; give a compression of at least 2"
    with pytest.raises(ConfigError, match=msg):
        build_tables(load_config(QUICKSTART, ["embeddings.compression=1.5", "embeddings.precision=fp16"]))
    with pytest.raises(ConfigError, match=r"embeddings.precision must be one of \['fp32', 'fp16'\]"):
        load_config(QUICKSTART, ["embeddings.precision=bf16"])


def test_the_converter_sizes_fp16_rows_against_fp32_tables():
    plain = [
        EmbeddingBagConfig(name="t_big", num_embeddings=100_000, embedding_dim=16, feature_names=["big"]),
        EmbeddingBagConfig(name="t_small", num_embeddings=50, embedding_dim=16, feature_names=["small"]),
    ]
    half = to_multihash_configs(plain, 8, data_type=DataType.FP16)
    assert [c.data_type for c in half] == [DataType.FP16, DataType.FP16]
    assert half[0].num_collisions == 4 and half[1].strategy == "full"  # 4x the rows, each half the bytes
    assert half[0].strategy_impl().memory_bytes() == pytest.approx(100_000 * 16 * 4 / 8, rel=0.01)
    full = to_multihash_configs(plain, 2, strategy="full", data_type=DataType.FP16)
    assert MultiHashEmbeddingBagCollection(full).full_memory_bytes() == 2 * MultiHashEmbeddingBagCollection(full).memory_bytes()
    assert [c.data_type for c in to_multihash_configs(plain, 8)] == [DataType.FP32, DataType.FP32]  # unchanged without it
    with pytest.raises(MultiHashConfigError, match="compression 1.5 with FP16 rows"):
        to_multihash_configs(plain, 1.5, data_type=DataType.FP16)


def _twin_step(rank, world_size):
    # the same tables in fp32 and in fp16 (fp16 values, so that both start equal), sharded, three
    # fused row-wise Adagrad steps on the same batches: fp16 rows follow the fp32 ones to within
    # the rounding of each step (FBGEMM's CPU kernels round to nearest: no stochastic rounding)
    def module(data_type):
        torch.manual_seed(0)
        c = MultiHashEmbeddingBagConfig(name="t", num_embeddings=5000, embedding_dim=8, feature_names=["f"], num_collisions=16, data_type=data_type)
        return MultiHashEmbeddingBagCollection([c], device=torch.device("meta"))

    g = torch.Generator().manual_seed(1)
    batches = [KeyedJaggedTensor.from_lengths_sync(["f"], torch.randint(0, 5000, (96,), generator=g), torch.full((32,), 3)) for _ in range(3)]
    models = {}
    for dt in (DataType.FP32, DataType.FP16):
        models[dt] = shard_model(module(dt), torch.device("cpu"), embedding_lr=0.05)
    start = {}
    for dt, m in models.items():
        for k, v in m.state_dict().items():
            local = v.local_shards()[0].tensor if hasattr(v, "local_shards") else v
            with torch.no_grad():
                if dt == DataType.FP32:
                    start[k] = torch.randn(local.shape, generator=torch.Generator().manual_seed(len(k))).half().float() * 0.1
                local.copy_(start[k])
    upstream = torch.randn(32, 8, generator=g)
    for b in batches:
        for m in models.values():
            (m(b).values() * upstream).sum().backward()
    for k in start:
        w32, w16 = (models[dt].state_dict()[k] for dt in (DataType.FP32, DataType.FP16))
        w32, w16 = (w.local_shards()[0].tensor if hasattr(w, "local_shards") else w for w in (w32, w16))
        assert w16.dtype == torch.float16 and w32.dtype == torch.float32
        moved = float((w32 - start[k]).abs().max())
        off = float((w16.float() - w32).abs().max())
        assert moved > 0.04 and off < 2e-3, (k, moved, off)
    dist.barrier()


def test_fp16_tables_train_like_fp32_within_rounding():
    run_multiprocess(_twin_step, 1)


@pytest.mark.slow
def test_fp16_run_checkpoints_resumes_and_exports(tmp_path):
    fp16 = ["--set", "embeddings.precision=fp16", "--set", "embeddings.compression=8", *SMALL, "--set", "train.checkpoint_every=50"]
    r, m = train(tmp_path, *fp16)
    assert r.returncode == 0, r.stderr[-3000:]
    assert m is not None and m["auc"] > 0.6  # it learns
    assert m["full_embedding_bytes"] / m["embedding_bytes"] == pytest.approx(8, rel=0.05)
    # the row-wise Adagrad's state, one fp32 value a row, reported beside the rows
    tables = build_tables(load_config(QUICKSTART, ["embeddings.precision=fp16", "embeddings.compression=8"]))
    assert m["optimizer_state_bytes"] == 4 * sum(c.num_embeddings for c in MultiHashEmbeddingBagCollection(tables).sub_table_configs())
    # a run of other precision is refused to resume the fp16 checkpoint, naming the key
    r, _ = train(tmp_path, *fp16[2:], "--resume", "auto")
    assert r.returncode == 2 and "embeddings.precision" in r.stderr, r.stderr[-2000:]
    common = ["--config", QUICKSTART, *fp16, "--set", f"train.output_dir={tmp_path / 'run'}"]
    for dtype in ("int8", "int4"):
        r = run_cli("export", *common, "--out", str(tmp_path / f"m_{dtype}.pt"), "--dtype", dtype, "--evaluate")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "trained (fp16 rows)" in r.stdout
        trained, exported = (float(line.split("AUC ")[1].split(",")[0]) for line in r.stdout.splitlines() if " test AUC " in line)
        assert abs(trained - exported) < 0.01 and trained == pytest.approx(m["auc"], abs=1e-4)
