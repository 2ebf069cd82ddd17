"""Variable-batch KJTs (TorchRec's VBE: a batch size per key and inverse indices): the module gives
what it gives for the plain batch they stand for, as TorchRec's EBC does, forward and backward,
for every strategy and operation, SUM and MEAN, weighted, one-hot, stacked, traced and scripted."""

import itertools
from typing import List, Optional

import pytest
import torch
import torchrec
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash import InvalidInputError, MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig, PoolingType

N = 40
D = 8
BATCH = 5
KIND = {
    "full": dict(strategy="full"),
    "hash": dict(strategy="hash", num_collisions=3),
    "qr_add": dict(strategy="qr", operation="add", num_collisions=6),
    "qr_add_stacked": dict(strategy="qr", operation="add", num_collisions=6, stack_parts=True),
    "qr_mult": dict(strategy="qr", operation="mult", num_collisions=6),
    "qr_mult_pooled": dict(strategy="qr", operation="mult", num_collisions=6, compose="pooled"),
    "qr_concat": dict(strategy="qr", operation="concat", num_collisions=6),
    "generalized_qr": dict(strategy="generalized_qr", operation="mult", moduli=[3, 4, 4]),
    "crt": dict(strategy="crt", operation="add", moduli=[5, 9]),
}


def configs(kind: str, pooling: PoolingType, one_hot: bool = False) -> List[MultiHashEmbeddingBagConfig]:
    """A single-feature table (one-hot if asked), a shared table of two features, and a full table."""
    args = dict(KIND[kind])
    if pooling == PoolingType.MEAN:
        args.pop("stack_parts", None)
        if args.get("compose") == "pooled":
            args.pop("compose")
    return [
        MultiHashEmbeddingBagConfig(
            name="t_a", num_embeddings=N, embedding_dim=D, feature_names=["a"], pooling=pooling, max_ids_per_bag=1 if one_hot else None, **args
        ),
        MultiHashEmbeddingBagConfig(name="t_bc", num_embeddings=N - 3, embedding_dim=D, feature_names=["b", "c"], pooling=pooling, **args),
        MultiHashEmbeddingBagConfig(name="t_d", num_embeddings=7, embedding_dim=4, feature_names=["d"], pooling=pooling, strategy="full"),
    ]


def vbe_batch(weighted: bool, one_hot_key: Optional[str] = None, seed: int = 0):
    """A variable-batch KJT (keys b, a, d, c: not in table order; a batch size per key, some bags
    empty) and the plain KJT of ``BATCH`` samples it stands for, built bag by bag."""
    g = torch.Generator().manual_seed(seed)
    keys = ["b", "a", "d", "c"]
    strides = {"b": 3, "a": 5, "d": 1, "c": 2}
    rows = {"a": N, "b": N - 3, "c": N - 3, "d": 7}
    bags, bag_weights, inverse = {}, {}, []
    for k in keys:
        bags[k] = []
        bag_weights[k] = []
        for _ in range(strides[k]):
            n = 1 if k == one_hot_key else int(torch.randint(0, 4, (1,), generator=g))
            bags[k].append(torch.randint(0, rows[k], (n,), generator=g))
            bag_weights[k].append(torch.rand(n, generator=g) + 0.5)
        if k != one_hot_key and strides[k] > 1:
            bags[k][0] = torch.zeros(0, dtype=torch.long)  # an empty bag
            bag_weights[k][0] = torch.zeros(0)
        inverse.append(torch.randint(0, strides[k], (BATCH,), generator=g))
        inverse[-1][0] = strides[k] - 1
    vbe = KeyedJaggedTensor(
        keys=keys,
        values=torch.cat([b for k in keys for b in bags[k]]),
        weights=torch.cat([w for k in keys for w in bag_weights[k]]) if weighted else None,
        lengths=torch.tensor([b.numel() for k in keys for b in bags[k]]),
        stride_per_key_per_rank=[[strides[k]] for k in keys],
        inverse_indices=(keys, torch.stack(inverse)),
    )
    picked = [(k, int(i)) for k, inv in zip(keys, inverse) for i in inv]
    plain = KeyedJaggedTensor(
        keys=keys,
        values=torch.cat([bags[k][i] for k, i in picked]),
        weights=torch.cat([bag_weights[k][i] for k, i in picked]) if weighted else None,
        lengths=torch.tensor([bags[k][i].numel() for k, i in picked]),
    )
    return vbe, plain


CASES = list(itertools.product(KIND, [PoolingType.SUM, PoolingType.MEAN], [False, True], [False, True]))


@pytest.mark.parametrize("kind,pooling,weighted,one_hot", CASES)
def test_variable_batch_gives_the_plain_batchs_outputs_and_gradients(kind, pooling, weighted, one_hot):
    torch.manual_seed(0)
    module = MultiHashEmbeddingBagCollection(configs(kind, pooling, one_hot), is_weighted=weighted)
    vbe, plain = vbe_batch(weighted, one_hot_key="a" if one_hot else None)
    got = module(vbe)
    want = module(plain)
    assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
    assert got.values().shape == (BATCH, 3 * D + 4)
    torch.testing.assert_close(got.values(), want.values())
    upstream = torch.randn_like(got.values())
    grads = []
    for out in (got, want):
        module.zero_grad()
        (out.values() * upstream).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize("weighted", [False, True])
def test_full_tables_give_the_stock_ebcs_variable_batch_output(weighted):
    ours = MultiHashEmbeddingBagCollection(configs("full", PoolingType.SUM), is_weighted=weighted)
    stock = EmbeddingBagCollection(
        [
            EmbeddingBagConfig(name=c.name, num_embeddings=c.num_embeddings, embedding_dim=c.embedding_dim, feature_names=c.feature_names)
            for c in ours.embedding_bag_configs()
        ],
        is_weighted=weighted,
    )
    with torch.no_grad():
        for config, sub in zip(ours.embedding_bag_configs(), ours.sub_table_configs()):
            ours.sub_table_weights()[sub.name].copy_(stock.embedding_bags[config.name].weight)
    vbe, _ = vbe_batch(weighted)
    got, want = ours(vbe), stock(vbe)
    assert got.keys() == want.keys()
    torch.testing.assert_close(got.values(), want.values())


@pytest.mark.parametrize("kind", ["qr_add", "qr_mult", "generalized_qr"])
def test_traced_and_scripted_modules_take_variable_batches(kind):
    module = MultiHashEmbeddingBagCollection(configs(kind, PoolingType.SUM), is_weighted=True)
    vbe, plain = vbe_batch(True)
    want = module(plain).values()
    traced = torchrec.fx.symbolic_trace(module)
    scripted = torch.jit.script(traced)
    for m in (traced, scripted):
        torch.testing.assert_close(m(vbe).values(), want)


def test_variable_batch_without_inverse_indices_or_with_bad_ones_is_refused():
    module = MultiHashEmbeddingBagCollection(configs("qr_mult", PoolingType.SUM))
    vbe, _ = vbe_batch(False)
    keys, (names, inverse) = vbe.keys(), vbe.inverse_indices()
    common = dict(keys=keys, values=vbe.values(), lengths=vbe.lengths(), stride_per_key_per_rank=vbe.stride_per_key_per_rank())
    with pytest.raises(InvalidInputError, match="no inverse_indices"):
        module(KeyedJaggedTensor(**common))
    with pytest.raises(InvalidInputError, match=r"no inverse indices for feature\(s\) \['c'\]"):
        module(KeyedJaggedTensor(**common, inverse_indices=(names[:3], inverse[:3])))
    bad = inverse.clone()
    bad[2, 1] = 1  # key d has one bag
    with pytest.raises(InvalidInputError, match=r"feature 'd': its inverse indices must lie in \[0, 1\)"):
        module(KeyedJaggedTensor(**common, inverse_indices=(names, bad)))


def _sharded_worker(rank: int, world_size: int, sharding_type: str) -> None:
    from torchrec.distributed.planner.types import ParameterConstraints

    from torchrec_multihash.distributed.sharding import shard_model

    from tests.helpers import sharded_model as sm

    torch.manual_seed(0)  # the same weights on every rank
    tables = configs("qr_mult", PoolingType.SUM) + [
        MultiHashEmbeddingBagConfig(
            name="t_e", num_embeddings=N, embedding_dim=D, feature_names=["e"], strategy="qr", operation="add", num_collisions=6
        )
    ]
    ref = MultiHashEmbeddingBagCollection(tables, is_weighted=True)
    module = MultiHashEmbeddingBagCollection(tables, is_weighted=True)
    module.load_state_dict(ref.state_dict())
    constraints = {c.name: ParameterConstraints(sharding_types=[sharding_type]) for c in module.sub_table_configs()}
    dmp = shard_model(module, torch.device("cpu"), embedding_lr=0.1, constraints=constraints)
    start = dmp.state_dict()  # sharding re-initializes the tables: the reference's weights again
    sm.copy_into_sharded(start, ref.state_dict())
    dmp.load_state_dict(start)
    vbe, plain = vbe_batch(True, seed=rank)
    # key e, absent from vbe_batch: the plain batch's bag b as its own bag b (no repetition)
    e_ids = torch.arange(BATCH) % N
    vbe = KeyedJaggedTensor(
        keys=vbe.keys() + ["e"],
        values=torch.cat([vbe.values(), e_ids]),
        weights=torch.cat([vbe.weights(), torch.ones(BATCH)]),
        lengths=torch.cat([vbe.lengths(), torch.ones(BATCH, dtype=torch.long)]),
        stride_per_key_per_rank=vbe.stride_per_key_per_rank() + [[BATCH]],
        inverse_indices=(vbe.keys() + ["e"], torch.cat([vbe.inverse_indices()[1], torch.arange(BATCH).unsqueeze(0)])),
    )
    plain = KeyedJaggedTensor(
        keys=plain.keys() + ["e"],
        values=torch.cat([plain.values(), e_ids]),
        weights=torch.cat([plain.weights(), torch.ones(BATCH)]),
        lengths=torch.cat([plain.lengths(), torch.ones(BATCH, dtype=torch.long)]),
    )
    got = dmp(vbe).values()
    torch.testing.assert_close(got, ref(plain).values())
    torch.testing.assert_close(got, dmp(plain).values())


def _sharded_workers(rank: int, world_size: int) -> None:
    for sharding_type in ("table_wise", "column_wise"):  # one process group: one start-up
        _sharded_worker(rank, world_size, sharding_type)


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_module_takes_variable_batches():
    from tests.helpers.distributed import run_multiprocess

    run_multiprocess(_sharded_workers, 2)
