"""From a stock EmbeddingBagCollection to ours and back: configs and weights carried over, composed
embeddings of single ids against the naive reference, full tables materialised."""

import warnings

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash import (
    MultiHashEmbeddingBagCollection,
    MultiHashEmbeddingBagConfig,
    composed_embeddings,
    from_embedding_bag_collection,
    to_embedding_bag_collection,
)

from tests.helpers.reference import reference_forward


def stock(weighted):
    torch.manual_seed(0)
    mean = PoolingType.SUM if weighted else PoolingType.MEAN  # torch's EmbeddingBag weights SUM bags only
    return EmbeddingBagCollection(
        [
            EmbeddingBagConfig(name="big", num_embeddings=5_000, embedding_dim=8, feature_names=["a"]),
            EmbeddingBagConfig(name="small", num_embeddings=50, embedding_dim=8, feature_names=["b"], pooling=mean),
        ],
        is_weighted=weighted,
    )


def test_from_a_stock_ebc_keeps_its_tables_and_the_weights_of_full_ones():
    ebc = stock(weighted=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = from_embedding_bag_collection(ebc, compression=4, strategy="qr", operation="add")
    assert [c.name for c in ours.embedding_bag_configs()] == ["big", "small"] and not ours.is_weighted()
    assert [c.strategy for c in ours.multihash_configs()] == ["qr", "full"]  # 50 rows stay full
    assert [c.pooling for c in ours.multihash_configs()] == [PoolingType.SUM, PoolingType.MEAN]
    assert torch.equal(ours.sub_table_weights()["small"], ebc.embedding_bags["small"].weight)
    # compression 1: every table full, same weights, same outputs as the stock module
    ebc = stock(weighted=True)
    same = from_embedding_bag_collection(ebc, compression=1)
    assert same.is_weighted()
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 4_999, 7, 3, 49]), lengths=torch.tensor([2, 1, 1, 1]), weights=torch.rand(5))
    torch.testing.assert_close(same(kjt).values(), ebc(kjt).values())


def test_composed_embeddings_are_the_reference_rows_and_materialise_into_a_plain_ebc():
    cfgs = [
        MultiHashEmbeddingBagConfig(name="t", num_embeddings=300, embedding_dim=4, feature_names=["f", "g"], strategy="qr", num_collisions=7),
        MultiHashEmbeddingBagConfig(
            name="u", num_embeddings=300, embedding_dim=4, feature_names=["g"], strategy="crt", moduli=[17, 19], operation="concat", dims=[2, 2]
        ),
    ]
    ours = MultiHashEmbeddingBagCollection(cfgs)
    ids = torch.tensor([0, 5, 299, 123])
    one_each = KeyedJaggedTensor(keys=["f", "g"], values=torch.cat([ids, ids]), lengths=torch.ones(8, dtype=torch.long))
    want = reference_forward(cfgs, ours.sub_table_weights(), one_each)
    torch.testing.assert_close(composed_embeddings(ours, "t", ids), want["f"])
    # "g" is looked up by both tables: the reference keys it by feature, the module by feature@table
    u_only = KeyedJaggedTensor(keys=["g"], values=ids, lengths=torch.ones(4, dtype=torch.long))
    torch.testing.assert_close(composed_embeddings(ours, "u", ids), reference_forward(cfgs[1:], ours.sub_table_weights(), u_only)["g"])
    plain = to_embedding_bag_collection(ours, batch_size=64)
    torch.testing.assert_close(plain.embedding_bags["t"].weight[ids], want["f"])
    bags = KeyedJaggedTensor(keys=["f", "g"], values=torch.tensor([3, 9, 250, 1, 2]), lengths=torch.tensor([2, 1, 1, 1]))
    torch.testing.assert_close(plain(bags).values(), ours(bags).values(), atol=1e-6, rtol=1e-5)
