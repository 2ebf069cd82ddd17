"""Distinct ids get distinct partition tuples: exhaustively for small N, sampled for large N."""

import pytest
import torch

from torchrec_multihash import MultiHashConfigError, MultiHashEmbeddingBagConfig

from tests.helpers.reference import partition_rows


def cfg(n, strategy, **kw):
    return MultiHashEmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=4, feature_names=["f"], strategy=strategy, **kw)


def tuples(c, ids):
    parts = c.strategy_impl().partition(ids)
    for p, size in zip(parts, c.strategy_impl().sizes()):
        assert int(p.min()) >= 0 and int(p.max()) < size, "row outside its sub-table"
    return torch.stack(parts, dim=1)


SMALL = [
    cfg(1000, "qr", num_collisions=7),
    cfg(1000, "qr", num_collisions=31),
    cfg(1000, "generalized_qr", moduli=[3, 7, 48]),
    cfg(1000, "generalized_qr", moduli=[10, 10, 10]),
    cfg(1001, "crt", moduli=[7, 11, 13]),
    cfg(1000, "crt", moduli=[8, 125]),
]


@pytest.mark.parametrize("c", SMALL, ids=lambda c: f"{c.strategy}-{c.strategy_impl().sizes()}")
def test_exhaustive_small(c):
    ids = torch.arange(c.num_embeddings)
    t = tuples(c, ids)
    assert torch.unique(t, dim=0).shape[0] == c.num_embeddings
    # and they agree with the pure-Python reference, id by id
    assert t.tolist() == [partition_rows(c, x) for x in range(c.num_embeddings)]


LARGE = [
    cfg(10**12, "qr", num_collisions=1000),
    cfg(2**62, "qr", num_collisions=2**20 + 7),
    cfg(10**12, "generalized_qr", moduli=[10**4, 10**4, 10**4]),
    cfg(10**12, "crt", moduli=[10007, 10009, 10037]),
]


@pytest.mark.parametrize("c", LARGE, ids=lambda c: f"{c.strategy}-{c.strategy_impl().sizes()}")
def test_sampled_large(c):
    g = torch.Generator().manual_seed(0)
    n = c.num_embeddings
    ids = torch.randint(0, n, (200_000,), generator=g, dtype=torch.int64)
    # adversarial neighbours: ids that share one partition's row with a sampled id
    shifts = [s for s in c.strategy_impl().sizes() if s < n] + [1]
    near = torch.cat([(ids + s) % n for s in shifts] + [torch.tensor([0, n - 1])])
    ids = torch.unique(torch.cat([ids, near]))
    t = tuples(c, ids)
    assert torch.unique(t, dim=0).shape[0] == ids.numel()
    sample = ids[:: max(1, ids.numel() // 500)].tolist()
    assert tuples(c, torch.tensor(sample)).tolist() == [partition_rows(c, x) for x in sample]


def test_qr_uses_integer_division_for_large_ids():
    # float division (the original DLRM code's (ids / m).long()) gets these wrong
    c = cfg(2**62, "qr", num_collisions=3)
    x = 2**60 + 1
    q, r = c.strategy_impl().partition(torch.tensor([x]))
    assert (int(q), int(r)) == divmod(x, 3)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(strategy="generalized_qr", moduli=[3, 4, 5]), "product 60 < num_embeddings=100"),
        (dict(strategy="crt", moduli=[4, 6, 9]), "pairwise coprime"),
        (dict(strategy="crt", moduli=[7, 11]), "product 77 < num_embeddings=100"),
        (dict(strategy="generalized_qr", moduli=[200]), "at least 2"),
        (dict(strategy="qr", num_collisions=100), "must be smaller than num_embeddings"),
        (dict(strategy="qr", num_collisions=0), "num_collisions must be an int >= 1"),
        (dict(strategy="qr", moduli=[10, 10]), "moduli is not used"),
    ],
)
def test_non_complementary_configs_are_refused(kw, match):
    with pytest.raises(MultiHashConfigError, match=match) as e:
        cfg(100, **kw)
    assert "table 't'" in str(e.value)
