"""Learned hash functions: the mapping module, clustering, fitting from data, saving and loading."""

import json
import re

import pytest
import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_multihash
from torchrec_multihash import (
    MultiHashConfigError,
    MultiHashEmbeddingBagCollection,
    MultiHashEmbeddingBagConfig,
    UnfittedMappingError,
    fit_learned_mappings,
)
from torchrec_multihash.datasets.synthetic import SyntheticCriteo
from torchrec_multihash.distributed import load_checkpoint, save_checkpoint
from torchrec_multihash.learned.clustering import balanced_clusters
from torchrec_multihash.learned.counting import count_ids
from torchrec_multihash.learned.fit import FitInputError, FitOptions, apply_mappings, assign_rows, fit_mappings, load_mappings, save_mappings
from torchrec_multihash.modules.convert import to_multihash_configs

from tests.helpers import sharded_model as sm
from tests.helpers.cli import SMALL, run_cli, train
from tests.helpers.distributed import run_multiprocess


def learned(name="t", n=1000, **kw):
    kw.setdefault("num_collisions", 10)
    return MultiHashEmbeddingBagConfig(name=name, num_embeddings=n, embedding_dim=8, feature_names=[f"f_{name}"], strategy="learned", **kw)


def test_balanced_clusters_separate_blobs_and_balance_weight():
    g = torch.Generator().manual_seed(0)
    # two far-apart blobs, two clusters: each blob is one cluster
    x = torch.cat([torch.randn(100, 3, generator=g), torch.randn(60, 3, generator=g) + 50])
    c = balanced_clusters(x, torch.cat([torch.ones(100), torch.ones(60) * 100 / 60]), 2)
    assert c[:100].unique().numel() == 1 and c[100:].unique().numel() == 1 and c[0] != c[100]
    # many clusters: all used, and each carries about 1/k of the weight
    x, w = torch.randn(5000, 4, generator=g), torch.rand(5000, generator=g) + 0.5
    c = balanced_clusters(x, w, 37)
    assert c.unique().numel() == 37
    per = torch.zeros(37, dtype=torch.float64).index_add_(0, c, w.double())
    assert per.max() / per.mean() < 1.1
    # fewer points than clusters: every point alone
    assert balanced_clusters(torch.randn(5, 2), torch.ones(5), 10).unique().numel() == 5


def test_assign_rows_hot_ids_own_rows_unseen_ids_fallback():
    cfg = learned(n=1000, num_collisions=10, fallback_rows=10)  # 100 rows, 90 for known ids
    counts = torch.zeros(1000, dtype=torch.long)
    counts[:500] = 1
    counts[7], counts[3] = 10_000, 5_000  # far hotter than an average row's traffic
    f = assign_rows(cfg, counts, torch.randn(1000, 5), FitOptions())
    assert f.ids[:2].tolist() == [7, 3] and f.rows[:2].tolist() == [0, 1] and f.stats["own_rows"] == 2
    assert set(f.ids.tolist()) == set(range(500))  # every seen id, none unseen
    assert not (f.rows[2:] < 2).any() and f.rows.max() < 90
    ebc = MultiHashEmbeddingBagCollection([cfg])
    apply_mappings(ebc, {"t": f})
    m = ebc.learned_mappings()["t"]
    assert m(torch.tensor([7, 3])).tolist() == [0, 1]
    unseen = torch.arange(500, 1000)
    assert torch.equal(m(unseen), 90 + unseen % 10)


def test_a_shared_mapping_that_stores_no_id_is_the_hashing_trick():
    """fallback_rows == mapping_rows: unstored ids take the hashing trick's row, id mod rows, so
    a mapping with nothing stored looks up exactly what a hashed table of as many rows does."""
    shared = learned(n=1000, mapping_rows=100, mapping_ids=10, fallback_rows=100)
    hashed = MultiHashEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=8, feature_names=["f_t"], strategy="hash", num_collisions=10)
    a, b = MultiHashEmbeddingBagCollection([shared]), MultiHashEmbeddingBagCollection([hashed])
    a.learned_mappings()["t"].assign(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    ids = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.learned_mappings()["t"](ids), hashed.strategy_impl().partition(ids)[0])
    (wa,) = [v for k, v in a.state_dict().items() if k.endswith(".weight")]
    (wb,) = [v for k, v in b.state_dict().items() if k.endswith(".weight")]
    wa.copy_(wb)
    kjt = KeyedJaggedTensor.from_lengths_sync(["f_t"], ids, torch.full((100,), 3))
    assert torch.equal(a(kjt).values(), b(kjt).values())
    # its stored ids may go to any row, and take it over the hash
    a.learned_mappings()["t"].assign(torch.tensor([5, 17]), torch.tensor([99, 3]))
    assert a.learned_mappings()["t"](torch.tensor([5, 17, 105])).tolist() == [99, 3, 5]
    with pytest.raises(MultiHashConfigError, match=r"mapped rows must lie in \[0, 100\)"):
        a.learned_mappings()["t"].assign(torch.tensor([5]), torch.tensor([100]))


def test_a_shared_fit_puts_hot_ids_on_the_rows_hash_traffic_loads_least():
    cfg = learned(n=1000, mapping_rows=100, mapping_ids=20, fallback_rows=100)
    counts = torch.zeros(1000, dtype=torch.long)
    counts[:600] = torch.arange(600) % 5 + 1  # rows 0..99 get unequal hash traffic from ids 20..599
    counts[7], counts[3] = 10_000, 5_000
    f = assign_rows(cfg, counts, torch.randn(1000, 5), FitOptions())
    stored = set(f.ids.tolist())
    load = [sum(int(counts[i]) for i in range(600) if i % 100 == r and i not in stored) for r in range(100)]
    least = sorted(range(100), key=lambda r: (load[r], r))
    assert f.ids[:2].tolist() == [7, 3] and f.rows[:2].tolist() == least[:2] and f.stats["own_rows"] == 2
    assert len(stored) == 20 and f.rows.max() < 100 and f.rows.unique().numel() == 20
    ebc = MultiHashEmbeddingBagCollection([cfg])
    apply_mappings(ebc, {"t": f})
    m = ebc.learned_mappings()["t"]
    others = torch.tensor([i for i in range(1000) if i not in stored])
    assert torch.equal(m(others), others % 100)  # every id the mapping does not store: the hashing trick


def test_fitted_mapping_groups_ids_that_behave_alike():
    """On synthetic data whose labels depend on hidden id clusters, ids that share a learned row
    have far closer true effects than ids that share a hashed row."""
    sizes = [20000]
    syn = SyntheticCriteo(sizes, num_dense=13, seed=0, feature_names=["C1"])
    tables = [
        MultiHashEmbeddingBagConfig(name="t_C1", num_embeddings=20000, embedding_dim=16, feature_names=["C1"], strategy="learned", num_collisions=16)
    ]
    fitted = fit_mappings(tables, lambda: syn.batches(1024, 400, start=0, step=1), 13, FitOptions())
    f = fitted["t_C1"]
    counts = count_ids(tables, syn.batches(1024, 400, start=0, step=1))["t_C1"]

    def unexplained(rows):  # access-weighted variance of the true effect within rows / overall
        score = syn._cluster_scores[0][syn.clusters(0, f.ids)].double()
        w = counts[f.ids].double()
        r = int(rows.max()) + 1
        mean = torch.zeros(r, dtype=torch.float64).index_add(0, rows, w * score) / torch.zeros(r, dtype=torch.float64).index_add(0, rows, w).clamp(
            min=1e-12
        )
        return float((w * (score - mean[rows]) ** 2).sum() / (w * (score - (w * score).sum() / w.sum()) ** 2).sum())

    learned_u, hashed_u = unexplained(f.rows.long()), unexplained(torch.remainder(f.ids, tables[0].mapping_rows))
    assert learned_u < 0.75 * hashed_u, (learned_u, hashed_u)


def test_mapping_travels_in_the_state_dict_and_refuses_another_shape():
    a = MultiHashEmbeddingBagCollection([learned(), learned("u", n=500, mapping_ids=100)])
    for _name, m in a.learned_mappings().items():
        n = m.expected.num_embeddings
        m.assign(torch.arange(0, n, 7)[:90], torch.arange(min(90, len(range(0, n, 7)))) % 20)
    b = MultiHashEmbeddingBagCollection([learned(), learned("u", n=500, mapping_ids=100)])
    kjt = KeyedJaggedTensor.from_lengths_sync(["f_t", "f_u"], torch.tensor([0, 7, 14, 5, 499, 21]), torch.tensor([2, 1, 2, 1]))
    b.load_state_dict(a.state_dict())
    # same rows for every id, so equal outputs once the weights are equal too
    assert torch.equal(a(kjt).values(), b(kjt).values())
    for other, what in [(learned(num_collisions=20), "rows=50"), (learned(fallback_rows=3), "fallback_rows=3")]:
        c = MultiHashEmbeddingBagCollection([other, learned("u", n=500, mapping_ids=100)])
        with pytest.raises(MultiHashConfigError, match=f"table 't'.*{what}"):
            c.load_state_dict(a.state_dict(), strict=False)


def test_saved_mapping_loads_and_refuses_another_config(tmp_path):
    cfg = learned()
    counts = torch.randint(0, 5, (1000,))
    f = assign_rows(cfg, counts, torch.randn(1000, 5), FitOptions())
    save_mappings(tmp_path, {"t": f}, {"note": 1})
    back = load_mappings(tmp_path)
    assert torch.equal(back["t"].ids, f.ids) and torch.equal(back["t"].rows.long(), f.rows.long())
    assert json.loads((tmp_path / "mapping.json").read_text())["tables"]["t"]["stored_ids"] == f.stats["stored_ids"]
    with pytest.raises(MultiHashConfigError, match="table 't'.*made for num_embeddings=1000, rows=100.*this table has num_embeddings=1000, rows=200"):
        apply_mappings(MultiHashEmbeddingBagCollection([learned(num_collisions=5)]), back)
    with pytest.raises(MultiHashConfigError, match="no fitted mapping for learned table"):
        apply_mappings(MultiHashEmbeddingBagCollection([learned("other")]), back)
    with pytest.raises(MultiHashConfigError, match="no fitted mapping there"):
        load_mappings(tmp_path / "nowhere")


@pytest.mark.parametrize("compression", [4, 16])
def test_converter_counts_the_mapping_in_the_budget(compression):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    plain = [EmbeddingBagConfig(name="t", num_embeddings=100_000, embedding_dim=16, feature_names=["f"])]
    (cfg,) = to_multihash_configs(plain, compression, strategy="learned")
    ebc = MultiHashEmbeddingBagCollection([cfg], device=torch.device("meta"))
    assert compression * 0.98 < ebc.full_memory_bytes() / ebc.memory_bytes() <= compression * 1.02


@pytest.mark.parametrize(
    "n,ids,rows,entry",
    [
        # 1M ids, dim 16, 64x: a budget of 1,000,000 * 64 / 64 * 1.02 = 1,020,000 bytes, less than a
        # dense mapping's 2 bytes per id; half of it buys 510,000 // 6 entries (int32 id, int16 row),
        # the rest (1,020,000 - 85,000 * 6 - 32) // 64 rows
        (1_000_000, 85_000, 7_968, 6),
        # 10M ids: 79,687 rows, past int16: entries of 8 bytes, 5,100,000 // 8 of them
        (10_000_000, 637_500, 79_687, 8),
    ],
)
def test_sparse_sizing_against_a_hand_computation(n, ids, rows, entry):
    plain = [EmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=16, feature_names=["f"])]
    (cfg,) = to_multihash_configs(plain, 64, strategy="learned")
    assert (cfg.mapping_ids, cfg.mapping_rows, cfg.fallback_rows) == (ids, rows, rows // 8)
    ebc = MultiHashEmbeddingBagCollection([cfg], device=torch.device("meta"))
    assert ebc.memory_bytes() == rows * 64 + ids * entry + 32 <= n * 64 / 64 * 1.02
    m = ebc.learned_mappings()["t"]
    assert m.ids.dtype == torch.int32 and m.rows.element_size() == entry - 4


def test_sparse_and_shared_mappings_survive_a_checkpoint_round_trip(tmp_path):
    def make():
        return MultiHashEmbeddingBagCollection(
            [learned(n=1000, mapping_rows=100, mapping_ids=50), learned("u", n=500, mapping_rows=40, mapping_ids=20, fallback_rows=40)]
        )

    a = make()
    g = torch.Generator().manual_seed(0)
    for m in a.learned_mappings().values():
        s = m.expected
        m.assign(torch.randperm(s.num_embeddings, generator=g)[: s.mapping_ids], torch.randint(0, s.known_rows(), (s.mapping_ids,), generator=g))
        assert m.rows.dtype == torch.int16
    save_checkpoint(tmp_path / "ckpt", a)
    b = make()
    load_checkpoint(tmp_path / "ckpt", b)
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key
    kjt = KeyedJaggedTensor.from_lengths_sync(["f_t", "f_u"], torch.arange(0, 1000, 37)[:24] % 500, torch.full((8,), 3))
    assert torch.equal(a(kjt).values(), b(kjt).values())


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(strategy="hash", mapping_rows=10), "mapping_rows cannot be combined with strategy 'hash'"),
        (dict(strategy="qr", mapping_ids=10), "only apply to a learned mapping"),
        (dict(strategy="learned", num_collisions=10, fallback_rows=101), "fallback_rows=101 exceeds mapping_rows=100"),
        (dict(strategy="learned", mapping_ids=2000), "exceeds num_embeddings"),
        (dict(strategy="qr", mapping_rows=10, num_collisions=10), "smaller than mapping_rows=10"),
        (dict(strategy="crt", mapping_rows=100, moduli=[3, 5]), "product 15 < mapping_rows=100"),
    ],
)
def test_bad_learned_configs(kw, match):
    with pytest.raises(MultiHashConfigError, match=match):
        MultiHashEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=8, feature_names=["f"], **kw)


@pytest.mark.slow
def test_fit_hash_command_then_train_with_the_mapping(tmp_path):
    small = [
        "--config",
        "configs/quickstart.yaml",
        "--set",
        "embeddings.strategy=learned",
        "--set",
        "data.train_samples=30000",
        "--set",
        "data.test_samples=4096",
        "--set",
        "train.batch_size=512",
        "--set",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    r = run_cli("fit-hash", *small, "--out", str(tmp_path / "map"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "t_C1:" in r.stdout and (tmp_path / "map" / "mapping.pt").is_file()
    out = tmp_path / "m.json"
    r = run_cli("train", *small, "--set", f"embeddings.mapping={tmp_path / 'map'}", "--metrics-out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(out.read_text())
    # the mapping is paid for out of the 8x budget (t_C2 lands at 10x: 32,767 rows is the most that
    # int16 row indices address, and int32 ones would cost more than the rows they add)
    assert 7.8 < m["full_embedding_bytes"] / m["embedding_bytes"] < 8.5
    assert m["auc"] > 0.55
    # a mapping fitted for another compression is refused, naming the table
    r = run_cli("train", *small, "--set", "embeddings.compression=4", "--set", f"embeddings.mapping={tmp_path / 'map'}")
    assert r.returncode == 2 and "table 't_C1'" in r.stderr and "fit again" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_train_on_two_processes_fits_the_mapping_first(tmp_path):
    r, m = train(tmp_path, *SMALL, "--set", "embeddings.strategy=learned", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fitting the learned tables' mapping" in r.stdout
    assert (tmp_path / "run" / "mapping" / "mapping.pt").is_file()
    assert m["world_size"] == 2 and m["auc"] > 0.55
    report = json.loads((tmp_path / "run" / "mapping" / "mapping.json").read_text())
    assert report["tables"]["t_C1"]["own_rows"] > 0 and report["tables"]["t_C1"]["shared_rows"] > 0


def two_learned_tables(device=None):
    """The issue's case: a stock config list converted to learned tables, nothing fitted."""
    plain = [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=1000, embedding_dim=8, feature_names=[f]) for f in ("C1", "C2")]
    return MultiHashEmbeddingBagCollection(to_multihash_configs(plain, 4, strategy="learned"), device=device)


def kjt_c1_c2():
    return KeyedJaggedTensor.from_lengths_sync(["C1", "C2"], torch.tensor([0, 7, 14, 5, 999, 21]), torch.tensor([2, 1, 2, 1]))


def test_an_unfitted_learned_table_refuses_to_look_up_and_says_how_to_fit():
    ebc = two_learned_tables()
    with pytest.raises(UnfittedMappingError, match=r"learned table 't_C1' has no mapping yet.*fit-hash.*fit_learned_mappings") as raised:
        ebc(kjt_c1_c2())
    named = re.findall(r"torchrec_multihash\.(\w+)\(", str(raised.value))  # what it tells the user to call exists
    assert {"apply_mappings", "load_mappings", "fit_learned_mappings"} <= set(named)
    assert all(callable(getattr(torchrec_multihash, name, None)) for name in named), named
    # one table set is not enough: the other is named
    m = ebc.learned_mappings()
    m["t_C1"].assign(torch.tensor([7, 14]), torch.tensor([0, 1]))
    with pytest.raises(UnfittedMappingError, match="'t_C2'"):
        ebc(kjt_c1_c2())
    m["t_C2"].assign(torch.tensor([5]), torch.tensor([3]))
    assert ebc(kjt_c1_c2()).values().shape == (2, 16)


def test_a_loaded_fitted_mapping_is_set_and_a_state_dict_without_one_sets_nothing():
    fitted = two_learned_tables()
    for m in fitted.learned_mappings().values():
        m.assign(torch.tensor([7, 14, 5]), torch.tensor([0, 1, 2]))
    b = two_learned_tables()
    b.load_state_dict(fitted.state_dict())
    assert torch.equal(b(kjt_c1_c2()).values(), fitted(kjt_c1_c2()).values())
    # an unfitted module's state dict holds no mapping: its shape entry says so, and loading it
    # leaves an unfitted module unfitted and a fitted one as it was
    empty = two_learned_tables().state_dict()
    assert empty["pooled.pooled.transform.mappings.t_C1.shape"].tolist() == [0, 0, 0, 0]
    c = two_learned_tables()
    c.load_state_dict(empty)
    with pytest.raises(UnfittedMappingError, match="'t_C1'"):
        c(kjt_c1_c2())
    b.load_state_dict(empty)  # the weights are the empty module's; the mapping stays
    for name, m in b.learned_mappings().items():
        assert torch.equal(m.rows, fitted.learned_mappings()[name].rows)
    b(kjt_c1_c2())


def test_the_shape_comes_from_the_config_and_a_meta_mapping_cannot_be_set():
    ebc = two_learned_tables()
    ebc.learned_mappings()["t_C1"].assign(torch.tensor([7]), torch.tensor([0]))
    key = "pooled.pooled.transform.mappings.t_C1.shape"
    assert ebc.state_dict()[key].tolist() == ebc.learned_mappings()["t_C1"].expected.as_list()
    # what DistributedModelParallel does to a module built on meta: zeroed buffers; nothing to zero the shape
    for b in ebc.buffers():
        b.zero_()
    assert ebc.state_dict()[key].tolist() == ebc.learned_mappings()["t_C1"].expected.as_list()
    # assigned on meta, a mapping would be zeroed by materialisation: refused; moved to meta, it is lost
    with pytest.raises(MultiHashConfigError, match="table 't_C1': cannot assign a mapping on the meta device"):
        two_learned_tables(device=torch.device("meta")).learned_mappings()["t_C1"].assign(torch.tensor([7]), torch.tensor([0]))
    ebc.to(torch.device("meta")).to_empty(device=torch.device("cpu"))
    with pytest.raises(UnfittedMappingError, match="'t_C1'"):
        ebc(kjt_c1_c2())


def _fit_data():
    syn = SyntheticCriteo([1000, 1000], num_dense=13, seed=0, feature_names=["C1", "C2"])
    return list(syn.batches(256, 12))


def test_one_call_fits_and_assigns_like_fit_mappings_then_apply_mappings():
    batches = _fit_data()
    options = FitOptions(dim=2)
    expected = two_learned_tables()
    apply_mappings(expected, fit_mappings(expected.multihash_configs(), lambda: batches, 13, options))
    ebc = two_learned_tables()
    fitted = fit_learned_mappings(ebc, batches, num_dense=13, options=options)
    assert sorted(fitted) == ["t_C1", "t_C2"]
    assert all(torch.equal(a, b) for a, b in zip(ebc.buffers(), expected.buffers()))
    # a DLRM holding the module, batches from a callable
    model = DLRM(embedding_bag_collection=two_learned_tables(), dense_in_features=13, dense_arch_layer_sizes=[8], over_arch_layer_sizes=[4, 1])
    fit_learned_mappings(model, lambda: iter(batches), num_dense=13, options=options)
    assert all(torch.equal(a, b) for a, b in zip(model.sparse_arch.embedding_bag_collection.buffers(), expected.buffers()))
    assert model(batches[0].dense_features, batches[0].sparse_features).shape == (256, 1)


def test_one_call_fit_refuses_batches_it_can_read_only_once():
    batches = _fit_data()
    with pytest.raises(FitInputError, match="one-shot iterator.*reads the batches twice.*list, a DataLoader, or a zero-argument callable"):
        fit_learned_mappings(two_learned_tables(), (b for b in batches), num_dense=13)
    once = iter(batches)
    with pytest.raises(FitInputError, match="12 batches on the first pass and 0 on the second"):
        fit_learned_mappings(two_learned_tables(), lambda: once, num_dense=13)
    with pytest.raises(FitInputError, match="no batch"):
        fit_learned_mappings(two_learned_tables(), [], num_dense=13)
    with pytest.raises(MultiHashConfigError, match="holds no learned table"):
        fit_learned_mappings(torch.nn.Linear(2, 2), batches, num_dense=13)


def _dmp_on_meta_keeps_the_mapping(rank, world_size, path):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}
    reference = sm.build_model(seed=0)  # on the CPU, its mappings assigned
    batch = next(sm.batches(rank, world_size, 1))
    dmp, _, _ = sm.shard_with(sm.build_model(seed=0, device=torch.device("meta")), "table_wise", world_size, fused)
    ebc = next(m for m in dmp.modules() if isinstance(m, MultiHashEmbeddingBagCollection))
    with pytest.raises(UnfittedMappingError, match="'t_f5'"):  # zeroed by the materialisation: not used
        dmp(batch)
    sm.assign_mappings(ebc, seed=0)
    save_checkpoint(path, dmp)
    loaded, _, _ = sm.shard_with(sm.build_model(seed=1, device=torch.device("meta")), "column_wise", world_size, fused)
    load_checkpoint(path, loaded)
    want = {k: v for k, v in reference.state_dict().items() if ".mappings." in k}
    assert len(want) == 6 and want["model.sparse_arch.embedding_bag_collection.pooled.pooled.transform.mappings.t_f5.shape"].tolist() == [
        400,
        100,
        20,
        400,
    ]
    for state in (dmp.state_dict(), loaded.state_dict()):
        for key, value in want.items():
            assert torch.equal(state[key], value), key
    torch.testing.assert_close(loaded(batch)[1][1], dmp(batch)[1][1])


@pytest.mark.slow
@pytest.mark.distributed
def test_dmp_on_meta_then_assigned_mapping_survives_a_checkpoint(tmp_path):
    run_multiprocess(_dmp_on_meta_keeps_the_mapping, 2, tmp_path / "ckpt")
    # and on one process, unsharded: the shape and rows of the fitted mapping
    one = sm.build_model(seed=2)
    load_checkpoint(tmp_path / "ckpt", one)
    for key, value in sm.build_model(seed=0).state_dict().items():
        if ".mappings." in key:
            assert torch.equal(one.state_dict()[key], value), key


@pytest.mark.slow
def test_issue_12_learned_training_resumes_from_its_checkpoint(tmp_path, shared_data):
    # the first 25,600 MovieLens training rows (100 steps of 256, of which 80 are run) and 2,000 test
    # rows: reading, fitting and evaluating all of them would cost more than the training checked here
    data = shared_data / "movielens_100k_ctr"
    for name, rows in (("train.txt", 25_600), ("test.txt", 2_000)):
        with open(data / name, "rb") as f:
            (tmp_path / name).write_bytes(b"".join(f.readline() for _ in range(rows)))
    common = [
        "--config",
        "configs/movielens_100k_ctr_full.yaml",
        "--set",
        "embeddings.strategy=learned",
        "--set",
        f"data.train={tmp_path / 'train.txt'}",
        "--set",
        f"data.test={tmp_path / 'test.txt'}",
    ]
    r = run_cli("fit-hash", *common, "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr[-3000:]
    run = [
        *common,
        "--set",
        f"embeddings.mapping={tmp_path / 'm'}",
        "--set",
        "train.checkpoint_every=20",
        "--set",
        f"train.output_dir={tmp_path / 'r'}",
    ]
    r = run_cli("train", *run, "--set", "train.max_steps=60")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", *run, "--set", "train.max_steps=80", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from" in r.stdout and "after 80 steps" in r.stdout, r.stdout[-2000:]
