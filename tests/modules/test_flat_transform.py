"""The id transform's flat path (all features mapped at once, eager mode) equals its per-feature
path (what scripted and traced modules run) exactly, and the module's outputs and gradients equal
the naive reference."""

import random
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash import MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig, PoolingType
from torchrec_multihash.modules import id_transform
from torchrec_multihash.modules.id_transform import IdTransform, InvalidInputError

from tests.helpers.reference import reference_forward
from tests.helpers.sharded_model import assign_mappings

D = 4


def mixed_configs(pooling: PoolingType):
    """Pooled tables of several strategies (and sizes) in one module, a feature in two tables."""

    def t(name, features, n, **kw):
        return MultiHashEmbeddingBagConfig(name=name, num_embeddings=n, embedding_dim=D, feature_names=features, pooling=pooling, **kw)

    return [
        t("q1", ["a"], 50, strategy="qr", num_collisions=7, operation="add", stack_parts=False),
        t("q2", ["b", "c"], 40, strategy="qr", num_collisions=6, operation="concat", dims=[1, 3]),
        t("h", ["d"], 30, strategy="hash", num_collisions=4),
        t("f", ["e"], 20, strategy="full"),
        t("g", ["a"], 60, strategy="generalized_qr", moduli=[3, 4, 5], operation="add", stack_parts=False),
        t("c", ["f"], 35, strategy="crt", moduli=[5, 7], operation="add", stack_parts=False),
        t("m", ["g"], 45, strategy="qr", num_collisions=5, operation="mult", max_ids_per_bag=1),  # one-hot mult: pooled
        t("q3", ["h"], 50, strategy="qr", num_collisions=7, operation="add", stack_parts=False),  # as q1: its divisors are plain ints
    ]


def mixed_kjt(cfgs, weighted: bool, batch: int = 5, order=None, int32: bool = False, extra: bool = False) -> KeyedJaggedTensor:
    """A KJT of the tables' features (in ``order``; with an unknown one if ``extra``), empty bags included."""
    g = torch.Generator().manual_seed(0)
    size = {}
    for c in cfgs:
        for f in c.feature_names:
            size[f] = min(size.get(f, c.num_embeddings), c.num_embeddings)
    keys = order or sorted(size)
    if extra:
        keys = [*keys, "unknown"]
    values, lengths, weights = [], [], []
    for f in keys:
        one_hot = f == "g"
        lens = torch.ones(batch, dtype=torch.long) if one_hot else torch.randint(0, 4, (batch,), generator=g)
        if not one_hot:
            lens[1] = 0
        n = int(lens.sum())
        ids = torch.randint(-(2**40), 2**40, (n,), generator=g) if f == "d" else torch.randint(0, size.get(f, 10), (n,), generator=g)
        values.append(ids)
        lengths.append(lens)
        weights.append(torch.rand(n, generator=g) + 0.5)
    v = torch.cat(values)
    return KeyedJaggedTensor(keys=keys, values=v.int() if int32 else v, lengths=torch.cat(lengths), weights=torch.cat(weights) if weighted else None)


def per_feature(transform: IdTransform, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The transform's per-feature path (its flat plan switched off)."""
    flat = transform._flat
    transform._flat = None
    try:
        return transform(kjt)
    finally:
        transform._flat = flat


def assert_same_kjt(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> None:
    assert a.keys() == b.keys()
    assert a.stride() == b.stride()
    assert torch.equal(a.lengths(), b.lengths())
    assert a.values().dtype == b.values().dtype and torch.equal(a.values(), b.values())
    assert (a.weights_or_none() is None) == (b.weights_or_none() is None)
    if a.weights_or_none() is not None:
        assert torch.equal(a.weights(), b.weights())
    for k, jt in b.to_dict().items():  # the length per key it may carry agrees
        assert torch.equal(a.to_dict()[k].values(), jt.values())


def assert_flat_gradients_equal(ebc: MultiHashEmbeddingBagCollection, transform: IdTransform, kjt: KeyedJaggedTensor, out) -> None:
    """The sub-tables' gradients of ``out`` (``ebc(kjt)`` by the flat path) equal the per-feature path's."""
    up = torch.randn_like(out.values())
    out.values().backward(up)
    w = ebc.sub_table_weights()
    grads = {k: v.grad.clone() for k, v in w.items()}
    for v in w.values():
        v.grad = None
    flat = transform._flat
    transform._flat = None
    try:
        ebc(kjt).values().backward(up)
    finally:
        transform._flat = flat
    for k, v in w.items():
        torch.testing.assert_close(v.grad, grads[k], msg=k)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize(
    "order,int32,extra",
    [(None, False, False), (["h", "g", "f", "e", "d", "c", "b", "a"], True, False), (None, False, True)],
    ids=["in-order", "reordered-int32", "extra-key"],
)
def test_flat_path_equals_per_feature_path_and_reference(weighted, pooling, order, int32, extra):
    cfgs = mixed_configs(pooling)
    ebc = MultiHashEmbeddingBagCollection(cfgs, is_weighted=weighted, strict_features=not extra)
    transform = ebc.pooled["pooled"].transform
    assert transform._flat is not None and len(transform._flat.groups) > 1
    kjt = mixed_kjt(cfgs, weighted, order=order, int32=int32, extra=extra)
    assert_same_kjt(transform(kjt), per_feature(transform, kjt))
    out = ebc(kjt)
    w = ebc.sub_table_weights()
    ref = reference_forward(cfgs, w, KeyedJaggedTensor.from_jt_dict({k: v for k, v in kjt.to_dict().items() if k != "unknown"}))
    got = out.to_dict()
    for c in cfgs:
        for f in c.feature_names:
            name = f if sum(f in c2.feature_names for c2 in cfgs) == 1 else f"{f}@{c.name}"
            torch.testing.assert_close(got[name], ref[f] if name == f else reference_forward([c], w, kjt)[f])
    assert_flat_gradients_equal(ebc, transform, kjt, out)


def test_flat_path_all_bags_empty():
    cfgs = mixed_configs(PoolingType.SUM)
    ebc = MultiHashEmbeddingBagCollection(cfgs, is_weighted=True)
    transform = ebc.pooled["pooled"].transform
    keys = sorted({f for c in cfgs for f in c.feature_names})
    lengths = torch.zeros(len(keys) * 3, dtype=torch.long)
    kjt = KeyedJaggedTensor(keys=keys, values=torch.zeros(0, dtype=torch.long), lengths=lengths, weights=torch.zeros(0))
    assert_same_kjt(transform(kjt), per_feature(transform, kjt))
    assert torch.equal(ebc(kjt).values(), torch.zeros(3, sum(D for c in cfgs for _ in c.feature_names)))


@pytest.mark.parametrize("int32", [False, True])
def test_flat_path_single_group_of_equal_tables_needs_no_per_id_parameters(int32):
    cfgs = [
        MultiHashEmbeddingBagConfig(
            name=f"t{i}", num_embeddings=50, embedding_dim=D, feature_names=[f"f{i}"], num_collisions=7, operation="add", stack_parts=False
        )
        for i in range(3)
    ]
    ebc = MultiHashEmbeddingBagCollection(cfgs)
    transform = ebc.pooled["pooled"].transform
    assert len(transform._flat.groups) == 1 and transform._flat.params == []
    kjt = mixed_kjt(cfgs, weighted=False, int32=int32)
    assert_same_kjt(transform(kjt), per_feature(transform, kjt))


def test_add_and_mult_parts_come_as_column_blocks():
    """Add and mult tables' sub-features come part by part (every first part of a group, then every
    second), concat's feature by feature, in the transform's KJT and in the inner EBC alike: each
    part of an add or mult group is one column block of the lookup's output, composed by one op over
    contiguous rows."""
    cfgs = mixed_configs(PoolingType.SUM)
    ebc = MultiHashEmbeddingBagCollection(cfgs)
    transform = ebc.pooled["pooled"].transform
    keys = transform._sub_keys
    assert keys[:4] == ["a@q1", "h", "a@q1__r", "h__r"]  # add Q-R of one partition (q1, q3): quotients, then remainders
    assert keys[4:8] == ["b", "b__r", "c", "c__r"]  # concat: each feature's parts side by side, as in its output
    assert keys[-2:] == ["g", "g__r"]  # one-hot mult, alone in its group
    inner = [f for c in ebc.pooled["pooled"].tables.embedding_bag_configs() for f in c.feature_names]
    # the inner EBC's features in the same order, but for the concat table of two features (a
    # TorchRec table's features are consecutive)
    assert inner == keys[:4] + ["b", "c", "b__r", "c__r"] + keys[8:]
    kt = ebc.pooled["pooled"](mixed_kjt(cfgs, weighted=False))
    assert kt.keys() == inner
    # add tables only: the flat transform's segments are already in that order, no permute
    adds = MultiHashEmbeddingBagCollection([c for c in cfgs if c.operation == "add" and c.strategy == "qr"]).pooled["pooled"].transform
    assert adds._sub_keys == ["a", "h", "a__r", "h__r"] and adds._flat.perm == list(range(adds._flat.segments))

    mult = [
        MultiHashEmbeddingBagConfig(name=f"m{i}", num_embeddings=50, embedding_dim=D, feature_names=[f"f{i}"], num_collisions=7, operation="mult")
        for i in range(3)
    ]
    per_id = MultiHashEmbeddingBagCollection(mult).per_id["per_id_d4"]
    assert per_id.transform._sub_keys == ["f0", "f1", "f2", "f0__r", "f1__r", "f2__r"]
    assert [f for c in per_id.tables.embedding_bag_configs() for f in c.feature_names] == per_id.transform._sub_keys


def test_concat_and_single_tables_keep_the_features_order_so_the_output_is_the_lookups_own():
    """Without add or mult tables, the sub-features come feature by feature in the tables' order,
    each feature's parts side by side: the inner EBC's output is already the module's, no copy."""

    def t(name, n, **kw):
        return MultiHashEmbeddingBagConfig(name=name, num_embeddings=n, embedding_dim=D, feature_names=[f"f{name}"], **kw)

    cfgs = [
        t("0", 50, num_collisions=7, operation="concat", dims=[2, 2]),
        t("1", 20, strategy="full"),
        t("2", 40, num_collisions=6, operation="concat"),
        t("3", 30, strategy="hash", num_collisions=4),
    ]
    ebc = MultiHashEmbeddingBagCollection(cfgs)
    assert ebc.pooled["pooled"].transform._sub_keys == ["f0", "f0__r", "f1", "f2", "f2__r", "f3"]
    looked_up = []
    ebc.pooled["pooled"].tables.register_forward_hook(lambda m, i, o: looked_up.append(o))
    out = ebc(mixed_kjt(cfgs, weighted=False))
    assert out.values().data_ptr() == looked_up[0].values().data_ptr()


@pytest.mark.parametrize(
    "feature,value,message",
    [
        ("a", 50, "feature 'a' (table 'q1', num_embeddings=50): id 50 at position"),
        ("e", -1, "feature 'e' (table 'f', num_embeddings=20): id -1 at position"),
        ("g", None, "feature 'g' (table 'm', max_ids_per_bag=1): bag 0 holds 2 ids"),
    ],
)
def test_flat_path_raises_the_per_feature_errors(feature, value, message):
    cfgs = mixed_configs(PoolingType.SUM)
    ebc = MultiHashEmbeddingBagCollection(cfgs)
    d = mixed_kjt(cfgs, weighted=False).to_dict()
    jt = d[feature]
    if value is None:  # a bag of two ids in a one-hot feature
        lengths = jt.lengths().clone()
        lengths[0], lengths[1] = 2, 0
        d[feature] = type(jt)(values=jt.values(), lengths=lengths)
    else:
        values = jt.values().clone()
        values[-1] = value
        d[feature] = type(jt)(values=values, lengths=jt.lengths())
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ebc(KeyedJaggedTensor.from_jt_dict(d))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("order,int32", [(None, False), (["c", "b", "a", "e"], True)], ids=["in-order", "reordered-int32"])
def test_flat_exploded_path_equals_per_feature_path_and_reference(weighted, order, int32):
    def t(name, features, n, **kw):
        return MultiHashEmbeddingBagConfig(name=name, num_embeddings=n, embedding_dim=D, feature_names=features, operation="mult", **kw)

    cfgs = [
        t("q1", ["a", "b"], 50, strategy="qr", num_collisions=7),
        t("q2", ["c"], 40, strategy="qr", num_collisions=6, pooling=PoolingType.MEAN),
        t("g", ["e"], 60, strategy="generalized_qr", moduli=[3, 4, 5]),
        t("c", ["a"], 35, strategy="crt", moduli=[5, 7]),
    ]
    ebc = MultiHashEmbeddingBagCollection(cfgs, is_weighted=weighted)
    transform = ebc.per_id["per_id_d4"].transform
    assert transform._flat is not None and len(transform._flat.groups) > 1
    kjt = mixed_kjt(cfgs, weighted, order=order, int32=int32)
    assert_same_kjt(transform(kjt), per_feature(transform, kjt))
    w = ebc.sub_table_weights()
    got = ebc(kjt).to_dict()
    for c in cfgs:
        for f in c.feature_names:
            name = f if f != "a" else f"a@{c.name}"
            torch.testing.assert_close(got[name], reference_forward([c], w, kjt)[f])


def test_flat_path_on_cpu_only_up_to_its_id_limit(monkeypatch):
    cfgs = mixed_configs(PoolingType.SUM)
    ebc = MultiHashEmbeddingBagCollection(cfgs)
    transform = ebc.pooled["pooled"].transform
    kjt = mixed_kjt(cfgs, weighted=False)
    assert transform._flat_applies(kjt)
    monkeypatch.setattr(id_transform, "FLAT_CPU_MAX_IDS", kjt.values().numel() - 1)
    assert not transform._flat_applies(kjt)
    assert_same_kjt(transform(kjt), per_feature(transform, kjt))


def test_flat_path_passes_a_kjt_on_without_any_op_when_there_is_nothing_to_check():
    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    full = [c for c in mixed_configs(PoolingType.SUM) if c.strategy == "full"]
    kjt = mixed_kjt(full, weighted=False)
    for validate, expect_ops in ((False, False), (True, True)):
        transform = MultiHashEmbeddingBagCollection(full, validate_ids=validate).pooled["pooled"].transform
        with Ops() as seen:
            assert transform(kjt) is kjt
        assert bool(seen.ops) == expect_ops, seen.ops  # validate_ids: the checks' ops


def stacked_mixed_configs(pooling: PoolingType):
    """``mixed_configs`` with its add tables' parts stacked (``stack_parts``): stacked Q-R of two
    sizes, generalized Q-R and CRT next to unstacked concat, hash, full and one-hot mult."""
    return [replace(c, stack_parts=True) if c.operation == "add" and c.strategy != "full" else c for c in mixed_configs(pooling)]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("order,int32", [(None, False), (["h", "g", "f", "e", "d", "c", "b", "a"], True)], ids=["in-order", "reordered-int32"])
def test_flat_path_of_stacked_parts_equals_per_feature_path_and_reference(weighted, order, int32):
    cfgs = stacked_mixed_configs(PoolingType.SUM)
    assert sum(bool(c.stack_parts) for c in cfgs) == 4
    ebc = MultiHashEmbeddingBagCollection(cfgs, is_weighted=weighted)
    transform = ebc.pooled["pooled"].transform
    assert transform._flat is not None and any(g.stacked for g in transform._flat.groups)
    kjt = mixed_kjt(cfgs, weighted, order=order, int32=int32)
    assert_same_kjt(transform(kjt), per_feature(transform, kjt))
    out = ebc(kjt)
    parts = ebc.part_weights()
    got = out.to_dict()
    for c in cfgs:
        for f in c.feature_names:
            name = f if sum(f in c2.feature_names for c2 in cfgs) == 1 else f"{f}@{c.name}"
            torch.testing.assert_close(got[name], reference_forward([c], parts, kjt)[f])
    assert_flat_gradients_equal(ebc, transform, kjt, out)


_KINDS = {  # a table's strategy and operation, by kind
    "qr_add": dict(num_collisions=7, operation="add", stack_parts=False),
    "qr_mult": dict(num_collisions=7, operation="mult"),
    "qr_concat": dict(num_collisions=7, operation="concat"),
    "gqr_add": dict(strategy="generalized_qr", moduli=[3, 4, 5], operation="add", stack_parts=False),
    "gqr_mult": dict(strategy="generalized_qr", moduli=[3, 4, 5], operation="mult"),
    "crt_add": dict(strategy="crt", moduli=[7, 9], operation="add", stack_parts=False),
    "full": dict(strategy="full"),
    "hash": dict(strategy="hash", num_collisions=4),
    "stacked": dict(num_collisions=7, operation="add", stack_parts=True),
    "one_hot_mult": dict(num_collisions=7, operation="mult", max_ids_per_bag=1),
    "learned_add": dict(num_collisions=5, operation="add", mapping_rows=30, stack_parts=False),
    "learned_mult": dict(num_collisions=5, operation="mult", mapping_rows=30),
}


@pytest.mark.parametrize("seed", range(24))
def test_random_modules_flat_path_equals_per_feature_path_and_reference(seed):
    """Random mixes of strategies and operations, tables of several features and features in
    several tables, SUM and MEAN, weighted or not, KJT keys in any order: in every lookup group
    the sub-features' keys, sources and parts agree, the flat path gives the per-feature path's
    KJT and gradients, and the outputs are the reference's."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cfgs = []
    for t in range(rng.randint(2, 7)):
        kind = _KINDS[rng.choice(sorted(_KINDS))]
        one_hot = kind.get("max_ids_per_bag") == 1
        pooling = PoolingType.SUM if kind.get("stack_parts") and rng.random() < 0.5 else rng.choice([PoolingType.SUM, PoolingType.MEAN])
        features = rng.sample(["g"] if one_hot else list("abcefh"), 1 if one_hot else rng.choice([1, 1, 2, 3]))
        cfgs.append(MultiHashEmbeddingBagConfig(name=f"t{t}", num_embeddings=50, embedding_dim=D, feature_names=features, pooling=pooling, **kind))
    weighted = rng.random() < 0.5
    ebc = MultiHashEmbeddingBagCollection(cfgs, is_weighted=weighted)
    assign_mappings(ebc, seed)
    keys = sorted({f for c in cfgs for f in c.feature_names})
    rng.shuffle(keys)
    kjt = mixed_kjt(cfgs, weighted, order=keys)
    for group in [*ebc.pooled.values(), *ebc.per_id.values()]:
        transform = group.transform
        inner = [f for c in group.tables.embedding_bag_configs() for f in c.feature_names]
        assert sorted(inner) == sorted(transform._sub_keys)
        for j, key in enumerate(transform._sub_keys):
            lookup = transform._sub_source[j]
            assert key in transform._lookups[lookup].sub_features
            assert all(transform._source[p] == lookup for p in transform._sub_parts[j])
        if transform._flat is not None:
            assert_same_kjt(transform(kjt), per_feature(transform, kjt))
    out = ebc(kjt)
    got, parts = out.to_dict(), ebc.part_weights()
    mappings = {name: dict(zip(range(50), m(torch.arange(50)).tolist())) for name, m in ebc.learned_mappings().items()}
    for c in cfgs:
        for f in c.feature_names:
            name = f if sum(f in c2.feature_names for c2 in cfgs) == 1 else f"{f}@{c.name}"
            torch.testing.assert_close(got[name], reference_forward([c], parts, kjt, mappings)[f], msg=f"{c.name} {f}")
    flat = next((g.transform for g in ebc.pooled.values() if g.transform._flat is not None), None)
    if flat is not None and not ebc.per_id:
        assert_flat_gradients_equal(ebc, flat, kjt, out)
