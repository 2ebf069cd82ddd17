"""``stack_parts``: an add table's parts stored as one TorchRec table, each id's rows one bag (its
SUM pooling is the add). Exact against the per-id reference and against the same tables unstacked,
traced and scripted, sharded like the unsharded module, refused where it cannot work (other
operations, constraints on a part, checkpoints of the other layout), reached from the app's config
and the bench (a DLRM learning with it: tests/modules/test_dlrm.py)."""

import dataclasses
import itertools
import warnings

import pytest
import torch
import torchrec
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.models.dlrm import DLRM
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash import (
    CheckpointError,
    MultiHashEmbeddingBagCollection,
    MultiHashEmbeddingBagConfig,
    PoolingType,
    load_checkpoint,
    save_checkpoint,
    sub_table_constraints,
)
from torchrec_multihash.modules.config import MultiHashConfigError
from torchrec_multihash.modules.strategies.base import stacked_part_rows, stacked_rows

from tests.helpers import ROOT
from tests.helpers import sharded_model as sm
from tests.helpers.distributed import run_multiprocess
from tests.helpers.reference import reference_forward
from tests.modules.test_one_hot import make_kjt as one_hot_kjt
from tests.modules.test_reference import make_configs
from tests.modules.test_reference import make_kjt as multi_hot_kjt

N, D = 50, 8
ADD_STRATEGIES = ["qr", "crt", "generalized_qr"]


def stacked(cfgs, **kw):
    return [dataclasses.replace(c, stack_parts=True, **kw) for c in cfgs]


def configs_and_kjt(strategy, pooling, weighted, one_hot):
    """Two add tables (one of them shared by two features), stacked; one-hot or multi-hot bags,
    the first bag of every feature empty."""
    plain = [dataclasses.replace(c, stack_parts=False) for c in make_configs(strategy, "add", pooling)]
    if one_hot:
        plain = [dataclasses.replace(c, max_ids_per_bag=1) for c in plain]
    kjt = one_hot_kjt(plain, weighted) if one_hot else multi_hot_kjt(plain, weighted)
    return plain, stacked(plain), kjt


def leaf_copies(weights):
    return {n: w.detach().clone().requires_grad_(True) for n, w in weights.items()}


CASES = list(itertools.product(ADD_STRATEGIES, [PoolingType.SUM, PoolingType.MEAN], [False, True], [False, True]))


@pytest.mark.parametrize("strategy,pooling,weighted,one_hot", CASES, ids=lambda v: str(v).replace("PoolingType.", ""))
def test_forward_and_gradients_equal_the_reference_and_the_unstacked_module(strategy, pooling, weighted, one_hot):
    torch.manual_seed(0)
    plain, cfgs, kjt = configs_and_kjt(strategy, pooling, weighted, one_hot)
    ebc = MultiHashEmbeddingBagCollection(cfgs, is_weighted=weighted)
    # one table per logical table, holding every part's rows, looked up pooled
    assert [c.name for c in ebc.sub_table_configs()] == ["t_a__parts", "t_bc__parts"]
    assert [c.num_embeddings for c in ebc.sub_table_configs()] == [sum(c.strategy_impl().sizes()) for c in cfgs]
    assert [c.feature_names for c in ebc.sub_table_configs()] == [["a__parts"], ["b__parts", "c__parts"]]
    assert not ebc.per_id and list(ebc.sub_table_weights()) == ["t_a__parts", "t_bc__parts"]
    assert sorted(ebc.part_weights()) == sorted(s.name for c in cfgs for s in c.strategy_impl().sub_tables())

    kt = ebc(kjt)
    assert kt.keys() == ["a", "b", "c"]
    parts = leaf_copies(ebc.part_weights())
    ref = reference_forward(cfgs, parts, kjt)
    for f in kt.keys():
        torch.testing.assert_close(kt.to_dict()[f], ref[f], rtol=1e-5, atol=1e-6, msg=f)

    # the same tables unstacked, given the same part weights
    unstacked = MultiHashEmbeddingBagCollection(plain, is_weighted=weighted)
    with torch.no_grad():
        for name, w in unstacked.sub_table_weights().items():
            w.copy_(ebc.part_weights()[name])
    other = unstacked(kjt)
    assert other.keys() == kt.keys()
    torch.testing.assert_close(kt.values(), other.values(), rtol=1e-5, atol=1e-6)

    upstream = torch.randn_like(kt.values())
    (kt.values() * upstream).sum().backward()
    (torch.cat([ref[f] for f in kt.keys()], dim=1) * upstream).sum().backward()
    (other.values() * upstream).sum().backward()
    for c in cfgs:
        grad = ebc.sub_table_weights()[f"{c.name}__parts"].grad
        assert grad is not None, c.name
        for s, placed in zip(c.strategy_impl().sub_tables(), c.strategy_impl().stacked_rows()):  # each part's rows
            mine = grad.index_select(0, stacked_part_rows(placed, s.num_embeddings))
            torch.testing.assert_close(mine, parts[s.name].grad, rtol=1e-5, atol=1e-6, msg=s.name)
            torch.testing.assert_close(mine, unstacked.sub_table_weights()[s.name].grad, rtol=1e-5, atol=1e-6, msg=s.name)


def test_each_id_is_one_bag_of_its_parts_rows_spread_through_the_stacked_table():
    cfg = MultiHashEmbeddingBagConfig(
        name="t", num_embeddings=100, embedding_dim=4, feature_names=["f"], strategy="qr", num_collisions=8, operation="add"
    )
    ebc = MultiHashEmbeddingBagCollection([cfg], is_weighted=True)  # an add is stacked by default
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([3, 99, 42, 7]), lengths=torch.tensor([1, 2, 0, 1]), weights=torch.tensor([1.0, 2, 3, 4]))
    out = ebc.pooled["pooled"].transform(kjt)
    # 13 quotient rows, 8 remainder rows spread among them: remainder u after the first (u + 1) * 13 // 8
    # quotient rows (1, 3, 4, 6, 8, 9, 11, 13): at 1, 4, 6, 9, 12, 14, 17, 20; id x -> [x // 8, x % 8], moved
    assert out.keys() == ["f__parts"]
    assert out.values().tolist() == [0, 9, 19, 9, 8, 6, 0, 20]
    assert out.lengths().tolist() == [2, 4, 0, 2]
    assert out.weights().tolist() == [1.0, 1, 2, 2, 3, 3, 4, 4]
    parts = ebc.part_weights()  # copies of the parts' rows of the stacked weight
    stacked = ebc.sub_table_weights()["t__parts"]
    assert parts["t"].shape == (13, 4) and parts["t__r"].shape == (8, 4)
    torch.testing.assert_close(parts["t__r"], stacked[[1, 4, 6, 9, 12, 14, 17, 20]])
    torch.testing.assert_close(parts["t"], stacked[[0, 2, 3, 5, 7, 8, 10, 11, 13, 15, 16, 18, 19]])


@pytest.mark.parametrize("sizes", [[13, 8], [50_000, 9], [1000, 3, 3], [7, 11], [4, 5, 6], [100, 1], [3, 9, 2]])
def test_the_stacked_rows_hold_every_part_once_and_spread_the_small_parts_evenly(sizes):
    """Every row of the stacked table belongs to exactly one part's row; the small parts' rows
    spread so that a row-wise cut into 2, 4 or 8 equal runs gives each run its share (within two
    rows)."""
    placed = stacked_rows(sizes)
    rows = [stacked_part_rows(p, n) for p, n in zip(placed, sizes)]
    assert torch.cat(rows).sort().values.tolist() == list(range(sum(sizes)))
    big = sizes.index(max(sizes))
    small = torch.cat([r for i, r in enumerate(rows) if i != big])
    total = sum(sizes)
    for shards in (2, 4, 8):
        per_shard = torch.bincount(small * shards // total, minlength=shards)
        assert per_shard.max() - per_shard.min() <= 2, (shards, per_shard.tolist())


def test_init_bytes_and_passthrough_are_those_of_the_unstacked_tables():
    plain = [dataclasses.replace(c, stack_parts=False) for c in make_configs("crt", "add", PoolingType.SUM)] + [
        MultiHashEmbeddingBagConfig(name="t_full", num_embeddings=N, embedding_dim=D, feature_names=["d"], strategy="full")
    ]
    cfgs = stacked(plain[:2]) + plain[2:]
    ours, theirs = MultiHashEmbeddingBagCollection(cfgs), MultiHashEmbeddingBagCollection(plain)
    assert ours.memory_bytes() == theirs.memory_bytes()
    stacked_cfg = ours.sub_table_configs()[0]
    part_cfgs = {c.name: c for c in theirs.sub_table_configs()}
    # the parts' init range (add: all parts share it), SUM pooling whatever the table's
    assert (stacked_cfg.weight_init_min, stacked_cfg.weight_init_max) == (part_cfgs["t_a"].weight_init_min, part_cfgs["t_a"].weight_init_max)
    assert stacked_cfg.pooling == PoolingType.SUM
    w = ours.sub_table_weights()["t_a__parts"]
    assert w.min() >= stacked_cfg.weight_init_min and w.max() <= stacked_cfg.weight_init_max
    # every output one sub-feature: the lookup's KeyedTensor passes through as it is
    assert ours.combine._passthrough and not theirs.combine._passthrough
    mean = MultiHashEmbeddingBagCollection(stacked(make_configs("qr", "add", PoolingType.MEAN)))
    assert not mean.combine._passthrough  # MEAN divides by the bags' lengths afterwards


TRACE_TABLES = [
    MultiHashEmbeddingBagConfig(
        name="a", num_embeddings=1000, embedding_dim=D, feature_names=["f0", "f1"], strategy="qr", num_collisions=9, operation="add", stack_parts=True
    ),
    MultiHashEmbeddingBagConfig(
        name="b", num_embeddings=1000, embedding_dim=D, feature_names=["f4"], strategy="crt", moduli=[31, 37], operation="add", pooling=PoolingType.MEAN, stack_parts=True
    ),
    MultiHashEmbeddingBagConfig(name="c", num_embeddings=1000, embedding_dim=D, feature_names=["f2"], strategy="qr", num_collisions=9),  # mult, per id
    MultiHashEmbeddingBagConfig(
        name="d", num_embeddings=1000, embedding_dim=D, feature_names=["f3"], strategy="qr", num_collisions=5, mapping_rows=60, mapping_ids=100, operation="add", stack_parts=True
    ),
]  # fmt: skip


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_traced_and_scripted_models_give_the_eager_outputs(weighted):
    torch.manual_seed(0)
    ebc = MultiHashEmbeddingBagCollection(TRACE_TABLES, is_weighted=weighted)
    mapping = ebc.learned_mappings()["d"]
    ids = torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:100]
    mapping.assign(ids, torch.randint(0, mapping.expected.known_rows(), (100,)))
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=3, dense_arch_layer_sizes=[D], over_arch_layer_sizes=[4, 1])
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 4, (5 * 3,), generator=g)
    lengths[0] = 0
    values = torch.randint(0, 1000, (int(lengths.sum()),), generator=g)
    kjt = KeyedJaggedTensor(
        keys=["f0", "f1", "f2", "f3", "f4"], values=values, lengths=lengths, weights=torch.rand(values.numel(), generator=g) if weighted else None
    )
    dense = torch.randn(3, 3)
    eager = model(dense, kjt)
    traced = torchrec.fx.symbolic_trace(model)
    assert "check" not in traced.code
    for m in (traced, torch.jit.script(traced), torch.jit.script(model)):
        torch.testing.assert_close(m(dense, kjt), eager, atol=0, rtol=0)
    # and TorchRec's quantized inference path
    from torchrec_multihash.inference import quantize_embeddings

    quantized = quantize_embeddings(model, torch.qint8, row_alignment=4)
    want = quantized(dense, kjt)
    torch.testing.assert_close(torch.jit.script(torchrec.fx.symbolic_trace(quantized))(dense, kjt), want, atol=0, rtol=0)
    assert (want - eager).abs().max() < 0.05


@pytest.mark.parametrize(
    "kw,why",
    [
        (dict(operation="mult"), "operation='mult'"),
        (dict(operation="concat"), "operation='concat'"),
        (dict(operation="add", strategy="full", num_collisions=None), "strategy='full'"),
        (dict(operation="add", strategy="hash"), "strategy='hash'"),
        (dict(operation="add", strategy="learned"), "strategy='learned'"),
    ],
    ids=["mult", "concat", "full", "hash", "learned"],
)
def test_stack_parts_needs_an_add_of_several_partitions(kw, why):
    args = dict(name="t_x", num_embeddings=N, embedding_dim=D, feature_names=["x"], strategy="qr", num_collisions=5, stack_parts=True)
    args.update(kw)
    args = {k: v for k, v in args.items() if v is not None}
    with pytest.raises(
        MultiHashConfigError, match=rf"table 't_x': stack_parts=True .* needs operation='add' on a multi-partition strategy, got .*{why}"
    ):
        MultiHashEmbeddingBagConfig(**args)
    with pytest.raises(MultiHashConfigError, match="table 't_x': stack_parts must be a bool"):
        MultiHashEmbeddingBagConfig(name="t_x", num_embeddings=N, embedding_dim=D, feature_names=["x"], operation="add", stack_parts="yes")
    # unset: stacked where it can be (an add of several partitions), else not
    assert MultiHashEmbeddingBagConfig(name="t_x", num_embeddings=N, embedding_dim=D, feature_names=["x"]).stack_parts is None
    assert not MultiHashEmbeddingBagConfig(name="t_x", num_embeddings=N, embedding_dim=D, feature_names=["x"]).strategy_impl().is_stacked()
    add = MultiHashEmbeddingBagConfig(name="t_x", num_embeddings=N, embedding_dim=D, feature_names=["x"], operation="add")
    assert add.strategy_impl().is_stacked()


def test_constraints_reach_the_stacked_table_and_refuse_its_parts():
    # Q-R of 1000 ids, m = 10: parts of 100 and 10 rows, stacked: 110
    plain = MultiHashEmbeddingBagConfig(
        name="t", num_embeddings=1000, embedding_dim=D, feature_names=["f"], num_collisions=10, operation="add", stack_parts=False
    )
    table = dataclasses.replace(plain, stack_parts=True)
    row_wise = {"t": ParameterConstraints(sharding_types=["row_wise"])}
    # the logical table's constraint applies to the stacked table; the small-table rule reads its rows
    out = sub_table_constraints([table], row_wise, small_table_rows=100)
    assert list(out) == ["t__parts"] and out["t__parts"].sharding_types == ["row_wise"]
    assert sub_table_constraints([table], row_wise, small_table_rows=110)["t__parts"].sharding_types == ["table_wise"]
    assert sub_table_constraints([plain], row_wise, small_table_rows=100)["t__r"].sharding_types == ["table_wise"]
    # keyed by the stacked table's own name: taken as it is
    own = {"t__parts": ParameterConstraints(sharding_types=["column_wise"])}
    assert sub_table_constraints([table], own)["t__parts"].sharding_types == ["column_wise"]
    with pytest.raises(ValueError, match=r"constraints name 't__r', a part of table 't', whose parts are stacked .*constrain 't__parts'"):
        sub_table_constraints([table], {"t__r": ParameterConstraints(sharding_types=["table_wise"])})


def test_the_plan_report_names_each_stacked_table_with_its_logical_table():
    from torchrec.distributed.planner import Topology

    from torchrec_multihash.distributed import describe_plan, plan_model

    cfgs = stacked(make_configs("qr", "add", PoolingType.SUM)) + [
        MultiHashEmbeddingBagConfig(name="t_d", num_embeddings=N, embedding_dim=D, feature_names=["d"], num_collisions=5)
    ]
    meta = torch.device("meta")
    ebc = MultiHashEmbeddingBagCollection(cfgs, device=meta)
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=3, dense_arch_layer_sizes=[D], over_arch_layer_sizes=[4, 1], dense_device=meta)
    topo = Topology(world_size=2, compute_device="cuda", hbm_cap=2**30)
    report = describe_plan(plan_model(model, topo, sub_table_constraints(cfgs), batch_size=64), model, topo)
    assert {s.table: s.logical_table for s in report.shards} == {"t_a__parts": "t_a", "t_bc__parts": "t_bc", "t_d": "t_d", "t_d__r": "t_d"}
    assert sum(s.bytes for s in report.shards) == ebc.memory_bytes()


def _one(stack_parts, seed=0):
    torch.manual_seed(seed)
    cfg = MultiHashEmbeddingBagConfig(
        name="t_C1", num_embeddings=1000, embedding_dim=D, feature_names=["C1"], num_collisions=8, operation="add", stack_parts=stack_parts
    )
    return MultiHashEmbeddingBagCollection([cfg])


@pytest.mark.parametrize("saved_stacked", [False, True], ids=["unstacked_into_stacked", "stacked_into_unstacked"])
def test_a_state_dict_or_checkpoint_of_the_other_layout_is_refused(tmp_path, saved_stacked):
    saved, loading = _one(saved_stacked), _one(not saved_stacked, seed=1)
    before = {k: v.clone() for k, v in loading.state_dict().items()}
    why = "set stack_parts=False on the table to load it" if not saved_stacked else r"stack_parts=False here\): leave stack_parts unset"
    for strict in (True, False):
        with pytest.raises(MultiHashConfigError, match=rf"table 't_C1': .*{why}"):
            loading.load_state_dict(saved.state_dict(), strict=strict)
    save_checkpoint(tmp_path / "ckpt", saved)
    with pytest.raises(CheckpointError, match="stack_parts differs"):
        load_checkpoint(tmp_path / "ckpt", loading)
    for k, v in loading.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k
    # the same layout loads
    same = _one(saved_stacked, seed=2)
    load_checkpoint(tmp_path / "ckpt", same)
    for k, v in same.state_dict().items():
        assert torch.equal(v, saved.state_dict()[k]), k


def test_the_app_config_stacks_the_add_tables_it_builds():

    from torchrec_multihash.app.config import load_config
    from torchrec_multihash.app.model import build_constraints, build_model, build_tables, multihash_module
    from torchrec_multihash.app.provenance import tables_record

    quickstart = ROOT / "configs/quickstart.yaml"
    # unset: the tables' default, stacked; false: none stacked but an override's
    default = {t.name: t for t in build_tables(load_config(quickstart, ["embeddings.operation=add"]))}
    assert default["t_C1"].stack_parts is None and default["t_C1"].strategy_impl().is_stacked()
    off = {
        t.name: t
        for t in build_tables(
            load_config(quickstart, ["embeddings.operation=add", "embeddings.stack_parts=false", "embeddings.overrides={t_C2: {stack_parts: true}}"])
        )
    }
    assert not off["t_C1"].strategy_impl().is_stacked() and off["t_C2"].strategy_impl().is_stacked()
    cfg = load_config(quickstart, ["embeddings.operation=add", "embeddings.stack_parts=true", "embeddings.overrides={t_C2: {stack_parts: false}}"])
    tables = {t.name: t for t in build_tables(cfg)}
    # compressed add tables stacked, but t_C2 (its override) and the small tables kept full
    assert tables["t_C1"].stack_parts and tables["t_C5"].stack_parts and not tables["t_C2"].stack_parts
    assert tables["t_C13"].strategy == "full" and not tables["t_C13"].stack_parts
    ebc = multihash_module(build_model(cfg, device=torch.device("meta")))
    names = [c.name for c in ebc.sub_table_configs()]
    assert "t_C1__parts" in names and "t_C2__r" in names and "t_C1__r" not in names
    # the small-table rule reads the stacked tables' rows: t_C10's (500 ids) are few, t_C1's not
    constraints = build_constraints(cfg, list(tables.values()))
    assert constraints["t_C10__parts"].sharding_types == ["table_wise"]
    assert "data_parallel" not in constraints["t_C1__parts"].sharding_types
    # recorded with the tables' keys when set (it changes what a checkpoint holds), absent when not
    assert tables_record(cfg)["embeddings.stack_parts"] is True
    assert "embeddings.stack_parts" not in tables_record(load_config(quickstart))
    # no add table to stack: a warning, the tables unchanged
    mult = load_config(quickstart, ["embeddings.stack_parts=true"])
    with pytest.warns(UserWarning, match="embeddings.stack_parts is set but no table adds several partitions"):
        assert not any(t.stack_parts for t in build_tables(mult))
    # an override that stacks its own table: no warning, that table stacked
    over = load_config(quickstart, ["embeddings.stack_parts=true", "embeddings.overrides={t_C1: {operation: add, stack_parts: true}}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stacked = {t.name: t for t in build_tables(over)}
    assert stacked["t_C1"].strategy_impl().is_stacked()
    # the library says so in its own words (no YAML key)
    from torchrec_multihash import stack_add_tables

    with pytest.warns(UserWarning, match="stack_add_tables: no table adds several partitions"):
        assert not any(t.stack_parts for t in stack_add_tables(build_tables(load_config(quickstart))))


def test_the_bench_method_stacks_the_compressed_tables_by_default():
    from torchrec_multihash.bench.step_time import METHODS, build
    from torchrec_multihash.bench.workload import BenchSpec

    assert METHODS["qr_add_unstacked"] == ("qr", "add", False) and METHODS["qr_add"].stack_parts is None
    spec = BenchSpec.one_hot(quick=True)
    module, plain = build("qr_add", spec, torch.device("cpu")), build("qr_add_unstacked", spec, torch.device("cpu"))
    composed = [c.name for c in module.multihash_configs() if c.strategy_impl().is_composed()]
    assert composed and all(c.strategy_impl().is_stacked() for c in module.multihash_configs() if c.name in composed)
    assert len(module.sub_table_configs()) == len(plain.sub_table_configs()) - len(composed)
    assert module.memory_bytes() == plain.memory_bytes()


# sharded == unsharded: the stacked tables under each sharding type, 2 processes (gloo)
LR = 0.1
STEPS = 3


def _check_sharded(rank, world_size, sharding_type):
    ref = sm.build_model(seed=0, stacked=True)
    model = sm.build_model(seed=1, stacked=True)  # another init: the copy below must set every weight
    ebc = model.model.sparse_arch.embedding_bag_collection
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fbgemm's CPU kernels' notes
        dmp, plan, _ = sm.shard_with(model, sharding_type, world_size, {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR})
    types = {t: ps.sharding_type for mod in plan.plan.values() for t, ps in mod.items()}
    assert sorted(types) == sorted(c.name for c in ebc.sub_table_configs())
    stacked_names = [n for n in types if n.endswith("__parts")]
    assert len(stacked_names) == 4 and all(types[n] == sharding_type for n in stacked_names), types
    if sharding_type == "row_wise":  # the stacked rows really split over both ranks
        ranks = {t: ps.ranks for mod in plan.plan.values() for t, ps in mod.items()}
        assert all(sorted(ranks[n]) == list(range(world_size)) for n in stacked_names), ranks
    opt = sm.start_from(dmp, ref, LR)
    per_rank = [list(sm.batches(r, world_size, STEPS)) for r in range(world_size)]
    sm.train_side_by_side(dmp, ref, opt, per_rank, rank, LR, label=f"stacked, {sharding_type}")
    assert sm.assert_state_equal(dmp.state_dict(), ref.state_dict()) >= len(types) / world_size


def _sharded_worker(rank, world_size, sharding_types):
    for sharding_type in sharding_types:  # several in one process group: one start-up
        _check_sharded(rank, world_size, sharding_type)


@pytest.mark.slow
@pytest.mark.distributed
def test_stacked_tables_sharded_equal_unsharded():
    run_multiprocess(_sharded_worker, 2, ("table_wise", "column_wise", "row_wise", "data_parallel"))


def _pipelined_worker(rank, world_size):
    from tests.distributed.test_pipeline import _train

    plain, plain_losses, _ = _train(rank, world_size, pipelined=False, stacked=True)
    piped, piped_losses, pipeline = _train(rank, world_size, pipelined=True, stacked=True)
    # one lookup group (every table pooled), its transform run in the pipeline's input-dist stage
    assert [p._fqn for p in pipeline._pipelined_postprocs] == ["model.sparse_arch.embedding_bag_collection.pooled.pooled.transform"]
    sm.assert_trained_alike(piped, plain, piped_losses, plain_losses)


@pytest.mark.slow
@pytest.mark.distributed
def test_stacked_tables_train_pipelined_as_in_the_plain_loop():
    run_multiprocess(_pipelined_worker, 2)
