"""One-hot tables (``max_ids_per_bag=1``): mult looked up pooled, exact against the per-id
reference, refused on a bag of several ids, traced and scripted, sharded like the unsharded module;
and the combine's reading of a sharded EBC's regrouped output."""

import dataclasses
import itertools

import pytest
import torch
import torchrec
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_multihash import InvalidInputError, MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig, PoolingType
from torchrec_multihash.modules.combine import _column_runs, _compose_pooled
from torchrec_multihash.modules.config import MultiHashConfigError

from tests.helpers.distributed import run_multiprocess
from tests.helpers.reference import reference_forward
from tests.modules.test_reference import STRATEGY_ARGS, make_configs

N, D = 50, 8


def one_hot(cfgs):
    return [dataclasses.replace(c, max_ids_per_bag=1) for c in cfgs]


def multi_hot_mult_table():
    """A mult table of multi-hot bags next to the one-hot ones: looked up per id."""
    return MultiHashEmbeddingBagConfig(name="t_m", num_embeddings=N, embedding_dim=D, feature_names=["m"], num_collisions=6)


def make_kjt(cfgs, weighted, batch=7, seed=0):
    """One-hot bags (some empty) for one-hot tables, bags of 0-3 ids for the others."""
    g = torch.Generator().manual_seed(seed)
    keys, values, lengths = [], [], []
    for c in cfgs:
        for f in c.feature_names:
            lens = torch.randint(0, 2 if c.max_ids_per_bag == 1 else 4, (batch,), generator=g)
            lens[0] = 0
            n = int(lens.sum())
            ids = torch.randint(-(2**62), 2**62, (n,), generator=g) if c.strategy == "hash" else torch.randint(0, c.num_embeddings, (n,), generator=g)
            keys.append(f)
            values.append(ids)
            lengths.append(lens)
    v = torch.cat(values)
    return KeyedJaggedTensor(keys=keys, values=v, lengths=torch.cat(lengths), weights=torch.rand(v.numel(), generator=g) + 0.5 if weighted else None)


def assert_matches_reference(ebc, cfgs, kjt):
    kt = ebc(kjt)
    weights = {n: w.detach().clone().requires_grad_(True) for n, w in ebc.sub_table_weights().items()}
    ref = reference_forward(cfgs, weights, kjt)
    keys = kt.keys()
    for k in keys:
        torch.testing.assert_close(kt.to_dict()[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    upstream = torch.randn_like(kt.values())
    (kt.values() * upstream).sum().backward()
    (torch.cat([ref[k] for k in keys], dim=1) * upstream).sum().backward()
    for name, w in ebc.sub_table_weights().items():
        assert w.grad is not None, name
        torch.testing.assert_close(w.grad, weights[name].grad, rtol=1e-5, atol=1e-6, msg=name)


CASES = list(itertools.product(STRATEGY_ARGS, ["add", "mult", "concat"], [PoolingType.SUM, PoolingType.MEAN], [False, True]))


@pytest.mark.parametrize("strategy,operation,pooling,weighted", CASES)
def test_one_hot_tables_match_the_per_id_reference(strategy, operation, pooling, weighted):
    torch.manual_seed(0)
    cfgs = one_hot(make_configs(strategy, operation, pooling)) + [multi_hot_mult_table()]
    ebc = MultiHashEmbeddingBagCollection(cfgs, is_weighted=weighted)
    # one-hot tables of every operation are looked up pooled; the multi-hot mult table per id
    assert set(ebc.per_id["per_id_d8"].tables.embedding_bags) == {"t_m", "t_m__r"}
    assert not {"t_m", "t_m__r"} & set(ebc.pooled["pooled"].tables.embedding_bags)
    assert_matches_reference(ebc, cfgs, make_kjt(cfgs, weighted))


def test_declared_one_hot_gives_what_the_per_id_lookup_gives():
    torch.manual_seed(0)
    cfgs = make_configs("generalized_qr", "mult", PoolingType.SUM)
    per_id = MultiHashEmbeddingBagCollection(cfgs, is_weighted=True)
    pooled = MultiHashEmbeddingBagCollection(one_hot(cfgs), is_weighted=True)
    assert not pooled.per_id and per_id.per_id
    with torch.no_grad():
        for name, w in pooled.sub_table_weights().items():
            w.copy_(per_id.sub_table_weights()[name])
    kjt = make_kjt(one_hot(cfgs), weighted=True)
    torch.testing.assert_close(pooled(kjt).values(), per_id(kjt).values())


def test_a_bag_of_several_ids_is_refused_naming_the_feature():
    cfgs = one_hot(make_configs("qr", "mult", PoolingType.SUM))
    ebc = MultiHashEmbeddingBagCollection(cfgs)
    kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.tensor([1, 2, 3, 4, 5]), lengths=torch.tensor([1, 0, 1, 2, 0, 1]))
    with pytest.raises(InvalidInputError, match=r"feature 'b' \(table 't_bc', max_ids_per_bag=1\): bag 1 holds 2 ids; a table declared one-hot"):
        ebc(kjt)
    # a larger bound is checked too; validate_ids=False skips every check of the data
    three = [dataclasses.replace(c, max_ids_per_bag=3) for c in make_configs("qr", "add", PoolingType.SUM)]
    kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.arange(6), lengths=torch.tensor([1, 0, 4, 0, 1, 0]))
    with pytest.raises(InvalidInputError, match=r"feature 'b' .*max_ids_per_bag=3\): bag 0 holds 4 ids"):
        MultiHashEmbeddingBagCollection(three)(kjt)
    assert MultiHashEmbeddingBagCollection(three, validate_ids=False)(kjt).values().shape == (2, 3 * D)


@pytest.mark.parametrize("bad", [0, -1, 1.0, True])
def test_max_ids_per_bag_must_be_a_positive_int(bad):
    with pytest.raises(MultiHashConfigError, match="table 't': max_ids_per_bag must be a positive int"):
        MultiHashEmbeddingBagConfig(name="t", num_embeddings=N, embedding_dim=D, feature_names=["f"], max_ids_per_bag=bad)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_one_hot_tables_trace_and_script_with_the_eager_outputs(weighted):
    torch.manual_seed(0)
    cfgs = one_hot(make_configs("qr", "mult", PoolingType.MEAN)) + one_hot(make_configs("crt", "add", PoolingType.SUM))[:1] + [multi_hot_mult_table()]
    cfgs[2] = dataclasses.replace(cfgs[2], name="t_x", feature_names=["x"])
    ebc = MultiHashEmbeddingBagCollection(cfgs, is_weighted=weighted)
    kjt = make_kjt(cfgs, weighted)
    eager = ebc(kjt).values()
    traced = torchrec.fx.symbolic_trace(ebc)
    assert "check" not in traced.code
    for m in (traced, torch.jit.script(traced), torch.jit.script(ebc)):
        torch.testing.assert_close(m(kjt).values(), eager, atol=0, rtol=0)
    by_key = kjt.to_dict()
    lengths = torch.zeros(kjt.stride(), dtype=torch.long)
    lengths[3] = 2
    by_key["a"] = JaggedTensor(values=torch.tensor([1, 2]), lengths=lengths, weights=torch.ones(2) if weighted else None)
    with pytest.raises(InvalidInputError, match="feature 'a' .*bag 3 holds 2 ids"):
        ebc(KeyedJaggedTensor.from_jt_dict(by_key))  # the traced module leaves the eager checks in place


def test_pooled_outputs_are_composed_where_torchrec_put_their_parts():
    """Runs of outputs whose parts advance by one stride are one op over strided views, read in any
    key order (a sharded EBC groups its keys by sharding type), forward and gradient."""
    keys = ["a_q", "b_q", "c", "a_r", "b_r", "d_0", "d_1", "e_0", "f_0", "e_1", "f_1"]
    widths = [4, 4, 4, 4, 4, 3, 5, 2, 2, 2, 2]
    # mult, mult, as is, concat of unequal parts, two concats of equal parts
    outputs = [["a_q", "a_r"], ["b_q", "b_r"], ["c"], ["d_1", "d_0"], ["e_0", "e_1"], ["f_0", "f_1"]]
    ops = [2, 2, 0, 0, 0, 0]
    runs = _column_runs(KeyedTensor(keys=keys, length_per_key=widths, values=torch.zeros(1, 36)), outputs, ops)
    # each run flat: op, n, k, dim, out, then (src, stride) of each part
    assert [[*r[:5], *(v for sv in zip(r.srcs, r.strides) for v in sv)] for r in runs] == [
        [2, 2, 2, 4, 0, 0, 4, 12, 4],  # a and b: q at 0 and 4, r at 12 and 16, one product
        [0, 1, 1, 4, 8, 8, 4],
        [0, 1, 1, 5, 12, 23, 5],  # d: one copy per part
        [0, 1, 1, 3, 17, 20, 3],
        [3, 2, 2, 2, 20, 28, 2, 32, 2],  # e and f: one side-by-side copy
    ]
    values = torch.randn(3, 36, dtype=torch.double, requires_grad=True)
    by_key = dict(zip(keys, values.split(widths, dim=1)))
    naive = torch.cat(
        [by_key["a_q"] * by_key["a_r"], by_key["b_q"] * by_key["b_r"], by_key["c"], by_key["d_1"], by_key["d_0"]]
        + [by_key["e_0"], by_key["e_1"], by_key["f_0"], by_key["f_1"]],
        dim=1,
    )
    kt = KeyedTensor(keys=keys, length_per_key=widths, values=values)
    fused = _compose_pooled(kt, outputs, ops, 28)
    torch.testing.assert_close(fused, naive, atol=0, rtol=0)
    upstream = torch.randn(3, 28, dtype=torch.double)
    (g_naive,) = torch.autograd.grad(naive, values, upstream)
    (g_fused,) = torch.autograd.grad(fused, values, upstream)
    torch.testing.assert_close(g_fused, g_naive, atol=0, rtol=0)
    # add of three parts, and columns no output reads (zero gradient there)
    add = [["a_q", "a_r", "c"]]
    (g_add,) = torch.autograd.grad(_compose_pooled(kt, add, [1], 4), values, upstream[:, :4])
    expected = torch.zeros_like(values)
    for s in (0, 8, 12):
        expected[:, s : s + 4] = upstream[:, :4]
    torch.testing.assert_close(g_add, expected, atol=0, rtol=0)
    torch.autograd.gradcheck(lambda v: _compose_pooled(KeyedTensor(keys=keys, length_per_key=widths, values=v), outputs, ops, 28), (values,))
    scripted = torch.jit.script(_compose_pooled)
    torch.testing.assert_close(scripted(kt, outputs, ops, 28), naive, atol=0, rtol=0)
    # single parts and concats already in TorchRec's order: the lookup's output itself, no copy
    in_order = KeyedTensor(keys=["c", "e_0", "e_1", "d_0", "d_1"], length_per_key=[4, 2, 2, 3, 5], values=values[:, :16])
    assert _compose_pooled(in_order, [["c"], ["e_0", "e_1"], ["d_0", "d_1"]], [0, 0, 0], 16) is in_order.values()
    assert _compose_pooled(in_order, [["c"], ["e_1", "e_0"], ["d_0", "d_1"]], [0, 0, 0], 16) is not in_order.values()


# sharded == unsharded: one-hot mult tables in the pooled EBC, its sub-tables placed by several
# sharding types at once, so TorchRec's sharded EBC regroups its output keys by sharding type
VOCAB = [300, 120, 200, 50, 400]
SHARDING = {"t_f0": "column_wise", "t_f0__r": "table_wise", "t_f1": "table_wise", "t_f1__p0": "data_parallel", "t_f1__p1": "column_wise"}


def sharded_tables():
    def t(i, **kw):
        return MultiHashEmbeddingBagConfig(name=f"t_f{i}", num_embeddings=VOCAB[i], embedding_dim=16, feature_names=[f"f{i}"], **kw)

    return [
        t(0, strategy="qr", num_collisions=7, max_ids_per_bag=1),
        t(1, strategy="generalized_qr", moduli=[4, 5, 6], pooling=PoolingType.MEAN, max_ids_per_bag=1),
        t(2, strategy="qr", operation="add", num_collisions=5, max_ids_per_bag=1),
        t(3, strategy="full"),
        t(4, strategy="qr", num_collisions=9),  # the toy data's multi-hot feature: per id
    ]


def sharded_model(seed):
    torch.manual_seed(seed)
    ebc = MultiHashEmbeddingBagCollection(sharded_tables())
    return DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 16], over_arch_layer_sizes=[8, 1]))


def _sharded_worker(rank, world_size):
    import torch.distributed as dist
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    from torchrec_multihash import sharders
    from torchrec_multihash.datasets.synthetic import SyntheticCriteo

    from tests.helpers import sharded_model as sm

    lr, steps = 0.1, 3
    ref, model = sharded_model(0), sharded_model(1)
    ebc = model.model.sparse_arch.embedding_bag_collection
    names = [c.name for c in ebc.sub_table_configs()]
    constraints = {n: ParameterConstraints(sharding_types=[SHARDING.get(n, "table_wise")], min_partition=8) for n in names}
    shard = sharders(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": lr})
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu"), constraints=constraints)
    plan = planner.collective_plan(model, shard, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, plan=plan, sharders=shard, device=torch.device("cpu"))
    types = {t: ps.sharding_type for mod in plan.plan.values() for t, ps in mod.items()}
    assert types == {n: SHARDING.get(n, "table_wise") for n in names}
    opt = sm.start_from(dmp, ref, lr)
    task = SyntheticCriteo.toy(VOCAB, seed=3, max_bag=3)
    per_rank = [[task.batch(8, i * world_size + r) for i in range(steps)] for r in range(world_size)]
    sharded_ebc = dmp.module.model.sparse_arch.embedding_bag_collection
    out_keys = sharded_ebc.pooled["pooled"](per_rank[rank][0].sparse_features).keys()
    in_order = [key for parts in sharded_ebc.combine._pooled_keys for key in parts]
    assert out_keys != in_order and sorted(out_keys) == sorted(in_order)  # grouped by sharding type
    sm.train_side_by_side(dmp, ref, opt, per_rank, rank, lr)
    assert sm.assert_state_equal(dmp.state_dict(), ref.state_dict()) >= len(names) // world_size


@pytest.mark.slow
@pytest.mark.distributed
def test_one_hot_mult_sharded_over_several_types_equals_unsharded():
    run_multiprocess(_sharded_worker, 2)
