"""Forward outputs and gradients equal a naive per-id reference for every configuration."""

import itertools

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash import MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig, PoolingType

from tests.helpers.reference import part_grads, reference_forward

N = 50
D = 8
STRATEGY_ARGS = {
    "full": {},
    "hash": {"num_collisions": 3},
    "qr": {"num_collisions": 7},
    "generalized_qr": {"moduli": [3, 4, 5]},
    "crt": {"moduli": [5, 7, 3]},
}
CONCAT_DIMS = {"qr": [3, 5], "generalized_qr": [2, 3, 3], "crt": [4, 2, 2]}


def make_configs(strategy, operation, pooling, explicit_dims=True):
    """Two tables; an add's parts as separate tables (stack_parts=False: test_stacked_parts.py
    checks the stacked default against the same reference)."""

    def cfg(name, features, n):
        args = dict(STRATEGY_ARGS[strategy])
        if operation == "add" and strategy in ("qr", "crt", "generalized_qr"):
            args["stack_parts"] = False
        if operation == "concat" and strategy in CONCAT_DIMS and explicit_dims:
            args["dims"] = CONCAT_DIMS[strategy]
        return MultiHashEmbeddingBagConfig(
            name=name,
            num_embeddings=n,
            embedding_dim=D,
            feature_names=features,
            strategy=strategy,
            operation=operation,
            pooling=pooling,
            **args,
        )

    # one single-feature table and one shared table (two features, one set of sub-tables)
    return [cfg("t_a", ["a"], N), cfg("t_bc", ["b", "c"], N - 3)]


def make_kjt(cfgs, weighted, batch=6, seed=0, hash_ids=False):
    g = torch.Generator().manual_seed(seed)
    keys, values, lengths, weights = [], [], [], []
    for c in cfgs:
        for f in c.feature_names:
            lens = torch.randint(0, 4, (batch,), generator=g)
            lens[0] = 0  # an empty bag
            n = int(lens.sum())
            if hash_ids:
                ids = torch.randint(-(2**62), 2**62, (n,), generator=g)
            else:
                ids = torch.randint(0, c.num_embeddings, (n,), generator=g)
                if n >= 2:
                    ids[0], ids[1] = 0, c.num_embeddings - 1  # both ends of the range
            keys.append(f)
            values.append(ids)
            lengths.append(lens)
            weights.append(torch.rand(n, generator=g) + 0.5)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        weights=torch.cat(weights) if weighted else None,
    )


CASES = list(itertools.product(STRATEGY_ARGS, ["add", "mult", "concat"], [PoolingType.SUM, PoolingType.MEAN], [False, True]))


@pytest.mark.parametrize("strategy,operation,pooling,weighted", CASES)
def test_forward_and_grad_match_reference(strategy, operation, pooling, weighted):
    torch.manual_seed(0)
    cfgs = make_configs(strategy, operation, pooling)
    ebc = MultiHashEmbeddingBagCollection(cfgs, is_weighted=weighted)
    kjt = make_kjt(cfgs, weighted, hash_ids=strategy == "hash")

    kt = ebc(kjt)
    assert kt.keys() == ["a", "b", "c"]
    assert kt.values().shape == (6, 3 * D)

    weights = {n: w.detach().clone().requires_grad_(True) for n, w in ebc.sub_table_weights().items()}
    ref = reference_forward(cfgs, weights, kjt)
    got = kt.to_dict()
    for f in ["a", "b", "c"]:
        torch.testing.assert_close(got[f], ref[f], rtol=1e-5, atol=1e-6)

    upstream = torch.randn_like(kt.values())
    (kt.values() * upstream).sum().backward()
    ref_out = torch.cat([ref[f] for f in ["a", "b", "c"]], dim=1)
    (ref_out * upstream).sum().backward()
    for name, w in ebc.sub_table_weights().items():
        assert w.grad is not None, name
        torch.testing.assert_close(w.grad, weights[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_concat_default_dims_split_evenly():
    cfg = MultiHashEmbeddingBagConfig(
        name="t",
        num_embeddings=100,
        embedding_dim=7,
        feature_names=["f"],
        strategy="generalized_qr",
        moduli=[5, 5, 4],
        operation="concat",
    )
    assert cfg.strategy_impl().dims() == [3, 2, 2]
    ebc = MultiHashEmbeddingBagCollection([cfg])
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([0, 99, 42]), lengths=torch.tensor([1, 2]))
    ref = reference_forward([cfg], ebc.sub_table_weights(), kjt)
    torch.testing.assert_close(ebc(kjt).to_dict()["f"], ref["f"])


def test_feature_in_two_tables_gets_table_suffixed_key():
    a = MultiHashEmbeddingBagConfig(name="t1", num_embeddings=30, embedding_dim=4, feature_names=["f"], num_collisions=5)
    b = MultiHashEmbeddingBagConfig(name="t2", num_embeddings=30, embedding_dim=4, feature_names=["f"], strategy="full")
    ebc = MultiHashEmbeddingBagCollection([a, b])
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([3, 29, 7]), lengths=torch.tensor([2, 1]))
    kt = ebc(kjt)
    assert kt.keys() == ["f@t1", "f@t2"]
    w = ebc.sub_table_weights()
    ref1 = reference_forward([a], w, kjt)["f"]
    ref2 = reference_forward([b], w, kjt)["f"]
    torch.testing.assert_close(kt.to_dict()["f@t1"], ref1)
    torch.testing.assert_close(kt.to_dict()["f@t2"], ref2)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
@pytest.mark.parametrize("strategy,operation", [("qr", "mult"), ("qr", "add"), ("full", "add")])
def test_narrow_int_ids_and_unordered_keys(strategy, operation, dtype):
    """int32 and int16 ids (TorchRec's EBC takes both), keys in another order than the tables'."""
    cfgs = make_configs(strategy, operation, PoolingType.SUM)
    ebc = MultiHashEmbeddingBagCollection(cfgs)
    kjt = make_kjt(cfgs, weighted=False)
    d = kjt.to_dict()
    order = ["c", "a", "b"]
    shuffled = KeyedJaggedTensor.from_jt_dict({k: d[k] for k in order})
    shuffled = KeyedJaggedTensor(keys=shuffled.keys(), values=shuffled.values().to(dtype), lengths=shuffled.lengths())
    torch.testing.assert_close(ebc(shuffled).values(), ebc(kjt).values())


LEARNED_CASES = [
    # a learned mapping alone, and a learned mapping followed by each partition of the mapped rows
    ("learned", {"num_collisions": 3, "mapping_ids": 12, "fallback_rows": 3}),
    ("learned", {"num_collisions": 5}),  # dense layout: a row per id
    ("qr", {"mapping_rows": 20, "num_collisions": 4, "mapping_ids": 30}),
    ("qr", {"mapping_rows": 20, "num_collisions": 4, "mapping_ids": 30, "fallback_rows": 20}),  # shared with the hash
    ("generalized_qr", {"mapping_rows": 24, "moduli": [2, 3, 4], "fallback_rows": 5}),
    ("crt", {"mapping_rows": 30, "moduli": [5, 7]}),
]


@pytest.mark.parametrize("operation", ["add", "mult", "concat"])
@pytest.mark.parametrize("strategy,args", LEARNED_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(LEARNED_CASES)])
def test_learned_mapping_matches_reference(strategy, args, operation):
    torch.manual_seed(1)
    cfgs = [
        MultiHashEmbeddingBagConfig(
            name=name, num_embeddings=n, embedding_dim=D, feature_names=fs, strategy=strategy, operation=operation, pooling=PoolingType.SUM, **args
        )
        for name, fs, n in [("t_a", ["a"], N), ("t_bc", ["b", "c"], N - 3)]
    ]
    ebc = MultiHashEmbeddingBagCollection(cfgs, is_weighted=True)
    g = torch.Generator().manual_seed(2)
    mappings = {}
    for c in cfgs:
        # a random mapping of some ids; the rest take the fallback rows
        known = torch.randperm(c.num_embeddings, generator=g)[: min(c.mapping_ids - 1, 2 * c.num_embeddings // 3)]
        rows = torch.randint(0, c.mapping_shape().known_rows(), (known.numel(),), generator=g)
        ebc.learned_mappings()[c.name].assign(known, rows)
        mappings[c.name] = dict(zip(known.tolist(), rows.tolist()))
    kjt = make_kjt(cfgs, weighted=True, batch=8)
    kt = ebc(kjt)
    weights = {n: w.detach().clone().requires_grad_(True) for n, w in ebc.part_weights().items()}  # add: stacked
    ref = reference_forward(cfgs, weights, kjt, mappings)
    for f in ["a", "b", "c"]:
        torch.testing.assert_close(kt.to_dict()[f], ref[f], rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(kt.values())
    (kt.values() * upstream).sum().backward()
    (torch.cat([ref[f] for f in ["a", "b", "c"]], dim=1) * upstream).sum().backward()
    for name, grad in part_grads(ebc).items():
        torch.testing.assert_close(grad, weights[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    # the mapping is counted in memory_bytes: sparse, 4-byte ids and 2-byte rows per stored id;
    # dense, a 2-byte row per id
    table_bytes = sum(c.num_embeddings * c.embedding_dim * 4 for c in ebc.sub_table_configs())
    per_id = 2 if cfgs[0].mapping_ids == cfgs[0].num_embeddings else 6
    assert ebc.memory_bytes() == table_bytes + sum(per_id * c.mapping_ids + 32 for c in cfgs)
