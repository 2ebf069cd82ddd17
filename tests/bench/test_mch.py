"""Strategy mch: TorchRec's MCH remapper (ManagedCollisionEmbeddingBagCollection) as a baseline.
Its bytes as documented (remapper state measured from the state dict), its lookups, training on
one rank, checkpoints, and the refusals: more ranks, export, bad names."""

import math

import pytest
import torch
from torch import nn
from torchrec.models.dlrm import DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash.app.config import ConfigError, load_config
from torchrec_multihash.app.export import load_trained_model
from torchrec_multihash.app.model import build_model, build_tables, check_mch_world, embedding_module
from torchrec_multihash.bench.mch import MCHEmbeddingBagCollection, mch_rows, state_cost
from torchrec_multihash.bench.mch_sharding import mch_sharders
from torchrec_multihash.bench.quality import method_overrides
from torchrec_multihash.distributed.checkpoint import read_index
from torchrec_multihash.distributed.sharding import shard_model
from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.inference import export_model, quantize_embeddings
from torchrec_multihash.modules.config import MultiHashConfigError

from tests.helpers.cli import SMALL, run_cli, train
from tests.helpers.distributed import run_multiprocess

D = 16


def tables():
    return [
        EmbeddingBagConfig(name="t_a", num_embeddings=20_000, embedding_dim=D, feature_names=["a"]),
        EmbeddingBagConfig(name="t_b", num_embeddings=100, embedding_dim=D, feature_names=["b"]),
    ]


def state_dict_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("eviction,per_row", [("lfu", 24), ("distance_lfu", 32)])
def test_remapper_state_is_int64_per_row_plus_a_fixed_part(eviction, per_row):
    row, fixed = state_cost(eviction)
    # sorted raw ids, their slots, counts (and last access): 8 bytes each; 1025 output segments + the iteration
    assert (row, fixed) == (per_row, 8 * 1025 + 8)


@pytest.mark.parametrize("eviction", ["lfu", "distance_lfu"])
def test_bytes_sizing_fits_rows_and_state_in_the_budget_and_counts_them_exactly(eviction):
    m = MCHEmbeddingBagCollection(tables(), compression=8, eviction=eviction, threshold=200)
    big, small = m.tables()
    per_row, fixed = state_cost(eviction)
    budget = 20_000 * D * 4 / 8
    assert big.rows * (D * 4 + per_row) + fixed <= budget < (big.rows + 1) * (D * 4 + per_row) + fixed
    assert (big.weight_bytes, big.state_bytes) == (big.rows * D * 4, big.rows * per_row + fixed)
    assert small.rows == 0 and small.weight_bytes == 100 * D * 4 and small.state_bytes == 0  # at most the threshold: full
    assert m.memory_bytes() == state_dict_bytes(m)  # everything it keeps, nothing else
    assert m.full_memory_bytes() == (20_000 + 100) * D * 4


def test_rows_sizing_gives_the_hashing_tricks_rows_and_counts_the_state_on_top():
    m = MCHEmbeddingBagCollection(tables(), compression=8, sizing="rows", threshold=200)
    big = m.tables()[0]
    assert big.rows == math.ceil(20_000 / 8) == mch_rows(20_000, D, 8, "lfu", "rows")
    assert m.memory_bytes() == state_dict_bytes(m) > m.full_memory_bytes() / 8


def test_lookups_give_held_ids_their_own_slot_and_the_rest_the_last_one():
    torch.manual_seed(0)
    m = MCHEmbeddingBagCollection(tables()[:1], compression=100, threshold=200)  # 52 rows
    rows = m.tables()[0].rows
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.tensor([7, 7, 7, 123, 123, 19_999]), lengths=torch.tensor([1, 1, 1, 1, 1, 1]))
    m.train()
    m(kjt)  # the first step admits the ids (eviction_interval 1)
    m.eval()
    out = m(KeyedJaggedTensor(keys=["a"], values=torch.tensor([7, 123, 19_999, 5]), lengths=torch.tensor([1, 1, 1, 1]))).values()
    w = m.mch._embedding_module.embedding_bags["t_a"].weight
    remapper = m.mch._managed_collision_collection._managed_collision_modules["t_a"]
    held = dict(zip(remapper._mch_sorted_raw_ids.tolist(), remapper._mch_remapped_ids_mapping.tolist()))
    slots = [held[7], held[123], held[19_999]]
    assert len(set(slots)) == 3 and rows - 1 not in slots
    torch.testing.assert_close(out[:3], w[slots].detach())
    assert 5 not in held
    torch.testing.assert_close(out[3], w[rows - 1].detach())  # an id it does not hold: the last slot


def _cfg(*extra):
    return load_config(None, ["embeddings.strategy=mch", "embeddings.num_embeddings_per_feature=[20000,100]", "embeddings.threshold=200", *extra])


def test_app_builds_the_mch_module_at_the_configured_compression():
    cfg = _cfg("embeddings.compression=4", "embeddings.mch_eviction=distance_lfu")
    model = build_model(cfg)
    ebc = embedding_module(model)
    assert isinstance(ebc, MCHEmbeddingBagCollection)
    assert ebc.tables()[0].rows == mch_rows(20_000, 64, 4, "distance_lfu")
    dense = torch.randn(3, 13)
    kjt = KeyedJaggedTensor(keys=["C1", "C2"], values=torch.tensor([1, 2, 3, 4, 5, 6]), lengths=torch.ones(6, dtype=torch.long))
    assert model(dense, kjt).shape == (3, 1)


def test_refusals_name_the_problem():
    with pytest.raises(ConfigError, match="embeddings.mch_eviction must be one of \\['lfu', 'distance_lfu'\\], got 'lru'"):
        _cfg("embeddings.mch_eviction=lru")
    with pytest.raises(ConfigError, match="embeddings.mch_sizing"):
        _cfg("embeddings.mch_sizing=all")
    with pytest.raises(MultiHashConfigError, match="MCH eviction must be one of"):
        MCHEmbeddingBagCollection(tables(), 4, eviction="lru")
    with pytest.raises(ConfigError, match="runs on one rank only, got 2.*row-wise"):
        check_mch_world(_cfg(), 2)
    check_mch_world(_cfg(), 1)
    with pytest.raises(ConfigError, match="export does not support embeddings.strategy mch"):
        load_trained_model(_cfg(), "nowhere")
    model = build_model(_cfg())
    for fn, name in ((export_model, "export_model"), (quantize_embeddings, "quantize_embeddings")):
        with pytest.raises(MultiHashError, match=f"{name} does not support TorchRec's MCH tables"):
            fn(model)
    with pytest.raises(ConfigError, match="strategy mch has no multi-hash tables"):
        build_tables(_cfg())


def test_quality_methods_stand_for_the_right_settings():
    assert method_overrides("mch_distance_lfu") == ["embeddings.strategy=mch", "embeddings.mch_eviction=distance_lfu", "embeddings.mch_sizing=bytes"]
    assert "embeddings.mch_sizing=rows" in method_overrides("mch_rows")
    assert "embeddings.compose=pooled" in method_overrides("naive_qr")
    assert method_overrides("qr") == ["embeddings.strategy=qr"]


def test_plan_prints_the_mch_bytes_and_refuses_more_ranks():
    common = [
        "plan",
        "--set",
        "embeddings.strategy=mch",
        "--set",
        "embeddings.num_embeddings_per_feature=[20000,100]",
        "--set",
        "embeddings.threshold=200",
    ]
    r = run_cli(*common, "--config", "configs/quickstart.yaml", "--world-size", "1", "--compute-device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    m = MCHEmbeddingBagCollection(
        [EmbeddingBagConfig(name=f"t_C{i + 1}", num_embeddings=n, embedding_dim=D, feature_names=[f"C{i + 1}"]) for i, n in enumerate([20_000, 100])],
        8,
        threshold=200,
    )
    assert "remapper" in r.stdout and f"{m.tables()[0].rows:,}" in r.stdout
    r = run_cli(*common, "--config", "configs/quickstart.yaml", "--world-size", "2")
    assert r.returncode == 2 and "one rank only" in r.stderr


MCH_RUN = [*SMALL, "--set", "embeddings.strategy=mch", "--set", "embeddings.num_embeddings_per_feature=[20000,5000,1000,100]"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """MCH_RUN from start to end with a checkpoint every 40 steps (process, metrics): the run that
    trains on one rank and the uninterrupted run a resumed one must equal."""
    return train(tmp_path_factory.mktemp("mch_straight"), *MCH_RUN, "--set", "train.checkpoint_every=40")


@pytest.mark.slow
def test_trains_on_one_rank_and_counts_its_bytes(straight_run):
    r, m = straight_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert m["steps"] == 117 and m["auc"] > 0.56  # it learns (base rate: 0.5)
    cfg = load_config("configs/quickstart.yaml", [s for s in MCH_RUN if s != "--set" and "=" in s])
    ebc = embedding_module(DLRMTrain(build_model(cfg, device=torch.device("meta"))))
    assert m["embedding_bytes"] == ebc.memory_bytes() and m["full_embedding_bytes"] == ebc.full_memory_bytes()


@pytest.mark.slow
def test_two_ranks_are_refused(tmp_path):
    r, _ = train(tmp_path, *MCH_RUN, nproc=2)
    assert r.returncode != 0 and "runs on one rank only" in r.stderr


@pytest.mark.slow
def test_checkpoint_holds_the_remapper_and_resume_equals_a_straight_run(tmp_path, straight_run):
    common = [*MCH_RUN, "--set", "train.checkpoint_every=40"]
    r, first = train(tmp_path / "a", *common, "--set", "train.max_steps=40", "--set", f"train.output_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-3000:]
    entries = read_index(tmp_path / "run" / "checkpoint").state_dict_metadata
    assert any(k.endswith("_mch_sorted_raw_ids") for k in entries) and any(k.endswith("_mch_counts") for k in entries)
    r, resumed = train(tmp_path / "b", *common, "--set", f"train.output_dir={tmp_path / 'run'}", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    r, straight = straight_run  # *common, uninterrupted
    assert r.returncode == 0, r.stderr[-3000:]
    assert resumed["steps"] == straight["steps"] == 117
    assert resumed["auc"] == pytest.approx(straight["auc"], abs=1e-6)
    assert resumed["logloss"] == pytest.approx(straight["logloss"], abs=1e-6)


def _evict_resets_rows(rank, world_size):
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = MCHEmbeddingBagCollection(tables()[:1], compression=100, threshold=200, device=torch.device("meta"))

        def forward(self, kjt):
            return self.ebc(kjt).values().sum()

    dmp = shard_model(Wrap(), torch.device("cpu"), 0.1, make_sharders=mch_sharders)
    sharded = dmp.module.ebc.mch
    assert type(sharded).__name__ == "CPUShardedManagedCollisionEmbeddingBagCollection"
    assert dmp.plan.plan["ebc.mch"]["t_a"].sharding_type == "row_wise"
    tbe, _ = sharded._table_to_tbe_and_index["t_a"]
    weight, (momentum,) = tbe.split_embedding_weights()[0], tbe.split_optimizer_states()[0]
    with torch.no_grad():
        weight.fill_(100.0)
        momentum.fill_(1.0)
    sharded._evict({"t_a": torch.tensor([1, 3])})
    bound = 1 / math.sqrt(20_000)  # the logical table's init range
    assert (weight[[1, 3]].abs() <= bound).all() and (momentum[[1, 3]] == 0).all()
    keep = [i for i in range(weight.size(0)) if i not in (1, 3)]
    assert (weight[keep] == 100).all() and (momentum[keep] == 1).all()
    first = weight[[1, 3]].clone()
    sharded._evict({"t_a": torch.tensor([1, 3])})  # same iteration, same seed: the same draw
    torch.testing.assert_close(weight[[1, 3]], first)


@pytest.mark.slow
def test_cpu_sharder_resets_evicted_rows_weights_and_optimizer_state():
    run_multiprocess(_evict_resets_rows, 1)


def _remaps_as_unsharded(rank, world_size):
    class Wrap(nn.Module):
        def __init__(self, device):
            super().__init__()
            self.ebc = MCHEmbeddingBagCollection(tables(), compression=100, threshold=200, device=device)

        def forward(self, kjt):
            return self.ebc(kjt).values().sum()

    dmp = shard_model(Wrap(torch.device("meta")), torch.device("cpu"), 0.1, make_sharders=mch_sharders)
    plain = Wrap(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for _ in range(6):  # skewed ids, more distinct ones than the 52 rows: admissions and evictions
        a = (torch.rand(64, generator=g) ** 4 * 20_000).long()
        b = torch.randint(0, 100, (64,), generator=g)
        kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.cat([a, b]), lengths=torch.ones(128, dtype=torch.long))
        dmp(kjt).backward()
        plain(kjt)
    sharded = dmp.module.ebc.mch._managed_collision_collection._managed_collision_modules["t_a"]
    reference = plain.ebc.mch._managed_collision_collection._managed_collision_modules["t_a"]
    for name in ("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping", "_mch_counts"):
        torch.testing.assert_close(getattr(sharded, name), getattr(reference, name), msg=name)
    assert (reference._mch_sorted_raw_ids < 2**62).sum() == 51  # full: every slot but the miss row holds an id


@pytest.mark.slow
def test_sharded_remapper_admits_and_evicts_as_torchrecs_unsharded_module():
    run_multiprocess(_remaps_as_unsharded, 1)


def test_the_baseline_is_not_part_of_the_public_sharders():
    # TorchRec's MCH is a benchmark baseline: its CPU sharder comes with mch_sharders(), not sharders()
    import torchrec_multihash
    from torchrec_multihash.bench.mch_sharding import MCHSharder

    assert not any(isinstance(s, MCHSharder) for s in torchrec_multihash.sharders())
    assert sum(isinstance(s, MCHSharder) for s in mch_sharders()) == 1
