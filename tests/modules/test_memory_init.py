"""memory_bytes is exact; composed embeddings start at a standard TorchRec table's scale."""

import math

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import DataType

from torchrec_multihash import MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig


def test_memory_bytes_qr_example_from_the_spec():
    c = MultiHashEmbeddingBagConfig(name="t", num_embeddings=1_000_000, embedding_dim=16, feature_names=["f"], strategy="qr", num_collisions=8)
    ebc = MultiHashEmbeddingBagCollection([c])
    assert ebc.memory_bytes() == (125_000 + 8) * 16 * 4
    assert ebc.memory_bytes() == sum(p.numel() * p.element_size() for p in ebc.parameters())
    assert ebc.full_memory_bytes() == 1_000_000 * 16 * 4


def test_memory_bytes_on_meta_device_and_mixed_strategies():
    cfgs = [
        MultiHashEmbeddingBagConfig(
            name="a",
            num_embeddings=10**7,
            embedding_dim=16,
            feature_names=["a"],
            strategy="crt",
            moduli=[3001, 3333],
            operation="concat",
            dims=[10, 6],
        ),
        MultiHashEmbeddingBagConfig(name="b", num_embeddings=10**6, embedding_dim=16, feature_names=["b"], strategy="hash", num_collisions=10),
        MultiHashEmbeddingBagConfig(name="c", num_embeddings=1000, embedding_dim=16, feature_names=["c"], strategy="full", data_type=DataType.FP16),
    ]
    ebc = MultiHashEmbeddingBagCollection(cfgs, device=torch.device("meta"))
    assert ebc.memory_bytes() == (3001 * 10 + 3333 * 6) * 4 + 100_000 * 16 * 4 + 1000 * 16 * 2


def composed_std(c, n_ids=20000):
    torch.manual_seed(0)
    ebc = MultiHashEmbeddingBagCollection([c])
    ids = torch.randint(0, c.num_embeddings, (n_ids,))
    out = ebc(KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.ones(n_ids, dtype=torch.long)))
    return out.values().mean().item(), out.values().std().item()


@pytest.mark.parametrize(
    "kw",
    [
        dict(strategy="qr", num_collisions=50, operation="mult"),
        dict(strategy="qr", num_collisions=50, operation="add"),
        dict(strategy="qr", num_collisions=50, operation="concat"),
        dict(strategy="generalized_qr", moduli=[20, 20, 250], operation="mult"),
        dict(strategy="crt", moduli=[99, 1013], operation="add"),
        dict(strategy="hash", num_collisions=10),
    ],
)
def test_composed_embeddings_have_standard_scale(kw):
    n = 100_000
    c = MultiHashEmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=16, feature_names=["f"], **kw)
    mean, std = composed_std(c)
    standard = math.sqrt(1.0 / n) / math.sqrt(3)  # std of U(-sqrt(1/N), sqrt(1/N))
    assert abs(mean) < 0.1 * standard
    assert 0.85 * standard < std < 1.15 * standard, (std, standard)


def test_user_init_range_is_reproduced_for_mult():
    c = MultiHashEmbeddingBagConfig(
        name="t",
        num_embeddings=10_000,
        embedding_dim=16,
        feature_names=["f"],
        strategy="qr",
        num_collisions=100,
        operation="mult",
        weight_init_min=0.0,
        weight_init_max=0.2,
    )
    mean, std = composed_std(c)
    assert abs(mean - 0.1) < 0.01 and abs(std - 0.2 / math.sqrt(12)) < 0.01 * 0.6


def test_embedding_bag_configs_are_the_logical_tables():
    c = MultiHashEmbeddingBagConfig(name="t", num_embeddings=10**6, embedding_dim=16, feature_names=["f", "g"], strategy="qr", num_collisions=8)
    ebc = MultiHashEmbeddingBagCollection([c])
    (logical,) = ebc.embedding_bag_configs()
    assert type(logical) is EmbeddingBagConfig
    assert (logical.name, logical.num_embeddings, logical.embedding_dim, logical.feature_names) == ("t", 10**6, 16, ["f", "g"])
    assert [s.name for s in ebc.sub_table_configs()] == ["t", "t__r"]
    assert [s.feature_names for s in ebc.sub_table_configs()] == [["f", "g"], ["f__r", "g__r"]]
