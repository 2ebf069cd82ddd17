"""Planning: sub-table constraints, and the plan command for topologies that do not exist here."""

import dataclasses
import json
import warnings

import pytest
import torch
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import DataType

from torchrec_multihash import MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig, sub_table_constraints
from torchrec_multihash.app.config import load_config
from torchrec_multihash.app.model import build_constraints, build_model, build_tables
from torchrec_multihash.cli import main
from torchrec_multihash.distributed import describe_plan, plan_model
from torchrec_multihash.distributed.constraints import SHARDED_TYPES

from tests.helpers.cli import run_cli

CONFIG = "configs/criteo_1tb_qr.yaml"


def cfg(name, **kw):
    return MultiHashEmbeddingBagConfig(name=name, num_embeddings=1_000_000, embedding_dim=16, feature_names=[name[2:]], **kw)


def test_sub_table_constraints():
    tables = [
        cfg("t_a", strategy="qr", operation="add", num_collisions=8, stack_parts=False),
        cfg("t_b", strategy="qr", operation="mult", num_collisions=8),
        cfg("t_c", strategy="full"),
    ]
    out = sub_table_constraints(
        tables, {"t_a": ParameterConstraints(sharding_types=["row_wise"]), "t_c": ParameterConstraints(sharding_types=["column_wise"])}
    )
    assert out["t_a"].sharding_types == ["row_wise"]
    assert out["t_a__r"].sharding_types == ["table_wise"]  # 8 rows: kept whole
    # every other type offered but data_parallel (a replica would be the dense optimizer's to train)
    assert out["t_b"].sharding_types == list(SHARDED_TYPES) and "data_parallel" not in SHARDED_TYPES
    assert out["t_b__r"].sharding_types == ["table_wise"]
    assert out["t_c"].sharding_types == ["column_wise"]
    # data_parallel=True: small fp32 sub-tables may be replicated, the others are left to the planner
    out = sub_table_constraints(tables, data_parallel=True)
    assert out["t_a__r"].sharding_types == ["table_wise", "data_parallel"] and out["t_b"].sharding_types is None
    # ... but never fp16 ones, which the dense optimizer would train in fp16
    half = [dataclasses.replace(t, data_type=DataType.FP16) for t in tables]
    out = sub_table_constraints(half, data_parallel=True)
    assert out["t_a__r"].sharding_types == ["table_wise"] and out["t_b"].sharding_types == list(SHARDED_TYPES)
    # a constraint that names data_parallel is kept as asked
    out = sub_table_constraints(tables, {"t_c": ParameterConstraints(sharding_types=["data_parallel"])})
    assert out["t_c"].sharding_types == ["data_parallel"]
    # a sub-table named explicitly wins; unknown names are errors
    out = sub_table_constraints(tables, {"t_a__r": ParameterConstraints(sharding_types=["row_wise"])})
    assert out["t_a__r"].sharding_types == ["row_wise"] and out["t_a"].sharding_types == list(SHARDED_TYPES)
    with pytest.raises(ValueError, match="unknown table"):
        sub_table_constraints(tables, {"t_zz": ParameterConstraints()})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = sub_table_constraints(tables, {"t_b": ParameterConstraints(sharding_types=["table_row_wise"])})
    assert out["t_b"].sharding_types == ["table_row_wise"] and not w  # kept as asked


@pytest.mark.parametrize("exclude_dp", [False, True])
def test_cuda_plan_of_16_ranks_places_every_sub_table(exclude_dp):
    c = load_config(CONFIG)
    if exclude_dp:
        c.embeddings.constraints = {f"t_C{i}": {"sharding_types": ["table_wise", "row_wise", "column_wise"]} for i in range(1, 27)}
    model = build_model(c, device=torch.device("meta"))
    tables = build_tables(c)
    constraints = build_constraints(c, tables)
    if exclude_dp:
        for k in constraints:
            constraints[k].sharding_types = [t for t in constraints[k].sharding_types if t != "data_parallel"]
    topo = Topology(world_size=16, local_world_size=8, compute_device="cuda", hbm_cap=80 * 1024**3)
    report = describe_plan(plan_model(model, topo, constraints, batch_size=8192), model, topo)
    ebc = model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, MultiHashEmbeddingBagCollection)
    assert sorted(s.table for s in report.shards) == sorted(c.name for c in ebc.sub_table_configs())
    assert report.embedding_bytes == ebc.memory_bytes()
    replicated = sum(s.bytes for s in report.shards if s.sharding_type == "data_parallel")
    assert sum(report.bytes_per_rank) == ebc.memory_bytes() + 15 * replicated
    if exclude_dp:
        assert replicated == 0 and sum(report.bytes_per_rank) == ebc.memory_bytes()
    for s in report.shards:
        assert s.ranks and sum(s.bytes_per_rank.values()) == s.bytes * (16 if s.sharding_type == "data_parallel" else 1)


@pytest.mark.slow
def test_plan_command_text_and_json():
    r = run_cli("plan", "--config", CONFIG, "--world-size", "16", "--local-world-size", "8", "--compute-device", "cuda", "--hbm-gib", "80")
    assert r.returncode == 0, r.stderr
    assert "Plan for 16 cuda ranks (2 node(s) x 8)" in r.stdout
    assert "t_C1__r" in r.stdout and "uncompressed" in r.stdout
    assert "WARNING" not in r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("t_C")]
    assert rows and all(row[3] in ("fused", "dense", "fused_uvm", "fused_uvm_caching") for row in rows), rows  # the kernel column


def test_plan_says_where_uvm_tables_live(capsys):
    """Little HBM: some tables go to UVM, and the text says where their weights live."""
    assert main(["plan", "--config", "configs/criteo_kaggle_qr.yaml", "--world-size", "2", "--hbm-gib", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "on a UVM kernel" in out and "live in host memory" in out, out[-2000:]
    rows = [line.split() for line in out.splitlines() if line.startswith("t_C")]
    assert {"fused", "fused_uvm_caching"} <= {row[3] for row in rows}, rows
    r = run_cli("plan", "--config", CONFIG, "--world-size", "2", "--compute-device", "cpu", "--json", "--set", "embeddings.compression=16")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["world_size"] == 2 and len(d["bytes_per_rank"]) == 2
    assert {"table", "sharding_type", "ranks", "bytes"} <= set(d["shards"][0])
    assert d["full_embedding_bytes"] / d["embedding_bytes"] > 14
    assert len(d["uncompressed"]["bytes_per_rank"]) == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--world-size", "3", "--local-world-size", "2"], "must be a positive multiple"),
        (["--world-size", "2", "--set", "embeddings.strategy=lsh"], "embeddings.strategy must be one of"),
        (["--world-size", "2", "--set", "embeddings.compresion=4"], "unknown key(s) ['embeddings.compresion']"),
        (["--world-size", "2", "--set", "train.batch_size=big"], "train.batch_size: expected int"),
        (
            ["--world-size", "2", "--set", "embeddings.constraints={t_C3: {sharding_type: [row_wise]}}"],
            "embeddings.constraints.t_C3: unknown key(s) ['sharding_type']; TorchRec's ParameterConstraints takes ['sharding_types'",
        ),
    ],
)
def test_plan_command_errors(args, message, capsys):
    assert main(["plan", "--config", CONFIG, *args]) == 2  # not an exception: no traceback
    err = capsys.readouterr().err
    assert err.startswith("torchrec-multihash plan: ") and message in err, err


def test_plan_of_learned_tables_counts_the_mapping_on_every_rank():
    ebc = MultiHashEmbeddingBagCollection(
        [
            MultiHashEmbeddingBagConfig(name="t_a", num_embeddings=1000, embedding_dim=8, feature_names=["a"], strategy="learned", num_collisions=10),
            MultiHashEmbeddingBagConfig(
                name="t_b",
                num_embeddings=600,
                embedding_dim=8,
                feature_names=["b"],
                strategy="qr",
                mapping_rows=100,
                num_collisions=10,
                mapping_ids=300,
            ),
        ],
        device=torch.device("meta"),
    )
    topo = Topology(world_size=2, compute_device="cpu")
    whole = {c.name: ParameterConstraints(sharding_types=["table_wise"]) for c in ebc.sub_table_configs()}
    report = describe_plan(plan_model(ebc, topo, whole), ebc, topo)
    # t_a: 1000 ids onto 100 rows, a row per id (dense layout): 1000 int16 rows = 2000 bytes;
    # t_b: its 300 hottest ids stored (sparse layout): 300 int32 ids + 300 int16 rows = 1800 bytes;
    # each mapping keeps its shape as 4 int64 = 32 bytes: 2032 + 1832
    assert report.mapping_bytes == 3864
    # tables: t_a 100 x 8 floats = 3200 bytes; t_b's 100 mapped rows as Q-R with 10 collisions:
    # q and r of 10 x 8 floats = 320 bytes each; every rank holds both mappings
    assert report.embedding_bytes == ebc.memory_bytes() == 3200 + 640 + 3864
    assert sorted((s.table, s.bytes) for s in report.shards) == [("t_a", 3200), ("t_b", 320), ("t_b__r", 320)]
    assert sum(report.bytes_per_rank) == 3200 + 640 + 2 * 3864
    assert min(report.bytes_per_rank) > 3864


def test_plan_of_the_criteo_config_with_learned_tables_places_every_mapping_on_every_rank():
    c = load_config(CONFIG)
    c.embeddings.strategy = "learned"
    model = build_model(c, device=torch.device("meta"))
    constraints = build_constraints(c, build_tables(c))
    topo = Topology(world_size=16, local_world_size=8, compute_device="cuda", hbm_cap=80 * 1024**3)
    report = describe_plan(plan_model(model, topo, constraints, batch_size=8192), model, topo)
    ebc = model.sparse_arch.embedding_bag_collection
    assert report.mapping_bytes > 0
    # memory_bytes counts each table and mapping once; the ranks hold 16 copies of the mappings
    # and of the replicated (data parallel) tables
    replicated = sum(s.bytes for s in report.shards if s.sharding_type == "data_parallel")
    assert sum(report.bytes_per_rank) == ebc.memory_bytes() + 15 * (replicated + report.mapping_bytes)


def test_stock_planner_constraints_keyed_by_logical_names_reach_the_main_sub_tables():
    """Users hand TorchRec's planner constraints named after their tables, as for a stock EBC: the
    main sub-table carries the logical name, so they apply without sub_table_constraints."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner

    from torchrec_multihash import sharders

    tables = [
        cfg("t_h", strategy="hash", num_collisions=4),
        cfg("t_q", strategy="qr", operation="add", num_collisions=8, stack_parts=False),
        cfg("t_m", strategy="qr", operation="mult", num_collisions=8),
        cfg("t_l", strategy="learned", num_collisions=4),
    ]
    model = MultiHashEmbeddingBagCollection(tables, device=torch.device("meta"))
    constraints = {t.name: ParameterConstraints(sharding_types=["column_wise"]) for t in tables}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"), constraints=constraints)
    plan = planner.plan(model, sharders())
    types = {table: ps.sharding_type for module_plan in plan.plan.values() for table, ps in module_plan.items()}
    assert {name: types[name] for name in ("t_h", "t_q", "t_m", "t_l")} == dict.fromkeys(("t_h", "t_q", "t_m", "t_l"), "column_wise")
    assert set(types) == {"t_h", "t_q", "t_q__r", "t_m", "t_m__r", "t_l"}


def test_plan_shows_our_warnings_and_hides_the_planners(capsys):
    """A compression the strategy cannot reach is said (as train says it); TorchRec's dry-run notes are not."""
    args = ["plan", "--config", "configs/quickstart.yaml", "--world-size", "1"]
    assert main([*args, "--set", "embeddings.compression=1000"]) == 0
    err = capsys.readouterr().err
    assert "torchrec-multihash plan: warning: strategy 'qr' (or the one a table's override names) cannot shrink these tables 1000.0x" in err
    assert main(args) == 0
    assert capsys.readouterr().err == ""


def test_a_plan_without_constraints_replicates_no_table():
    # TorchRec's planner, left alone, replicates the small remainder tables (data_parallel), where the
    # fused optimizer leaves them to the dense one; plan_model and shard_model default to model_constraints
    from torchrec.distributed.planner import EmbeddingShardingPlanner

    from torchrec_multihash import sharders
    from torchrec_multihash.bench.step_time import build
    from torchrec_multihash.bench.workload import BenchSpec

    module = build("qr_add_unstacked", BenchSpec.one_hot(quick=True), torch.device("meta"))
    topo = Topology(world_size=1, compute_device="cpu")

    def replicated(plan):
        return sorted(t for m in plan.plan.values() for t, ps in m.items() if ps.sharding_type == "data_parallel")

    assert len(replicated(EmbeddingShardingPlanner(topology=topo).plan(module, sharders()))) == 26
    assert replicated(plan_model(module, topo)) == []


@pytest.mark.slow
def test_plan_takes_the_table_sizes_from_the_data_as_train_does(shared_data, tmp_path):
    # the README's own MovieLens config gives no sizes (data.ids: vocabulary): plan counts them, as train does
    r = run_cli("plan", "--config", "configs/movielens_100k_ctr_full.yaml", "--set", f"train.output_dir={tmp_path}", "--world-size", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Plan for 1 cuda ranks" in r.stdout and "7.0 MiB multi-hash vs 7.0 MiB uncompressed" in r.stdout
