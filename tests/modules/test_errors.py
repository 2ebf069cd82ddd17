"""Bad configurations and bad inputs raise errors that name the problem."""

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_multihash import (
    InvalidInputError,
    MultiHashConfigError,
    MultiHashEmbeddingBagCollection,
    MultiHashEmbeddingBagConfig,
)


def cfg(**kw):
    base = dict(name="t_C1", num_embeddings=100, embedding_dim=8, feature_names=["C1"])
    base.update(kw)
    return MultiHashEmbeddingBagConfig(**base)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(strategy="lsh"), "strategy must be one of"),
        (dict(operation="mul"), "operation must be one of"),
        (dict(operation="concat", dims=[3, 4]), r"add up to 7, not embedding_dim=8"),
        (dict(operation="concat", dims=[4, 2, 2]), "has 3 entries but strategy 'qr' has 2"),
        (dict(operation="mult", dims=[4, 4]), "dims is only used with operation='concat'"),
        (dict(strategy="full", operation="concat", dims=[8]), "dims is only used"),
        (dict(num_embeddings=0), "num_embeddings must be a positive int"),
        (dict(embedding_dim=-1), "embedding_dim must be a positive int"),
        (dict(feature_names=[]), "feature_names is empty"),
        (dict(feature_names=["a", "a"]), "duplicates"),
        (dict(strategy="full", num_collisions=4), "num_collisions is not used"),
        (dict(pooling="max"), "pooling must be"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(MultiHashConfigError, match=match) as e:
        cfg(**kw)
    assert "t_C1" in str(e.value)


def test_module_rejects_duplicate_names_and_plain_configs():
    with pytest.raises(MultiHashConfigError, match="repeated"):
        MultiHashEmbeddingBagCollection([cfg(), cfg(feature_names=["C2"])])
    with pytest.raises(MultiHashConfigError, match="to_multihash_configs"):
        MultiHashEmbeddingBagCollection([EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4, feature_names=["f"])])
    with pytest.raises(MultiHashConfigError, match="at least one table"):
        MultiHashEmbeddingBagCollection([])


@pytest.mark.parametrize("strategy", ["full", "qr", "generalized_qr", "crt"])
@pytest.mark.parametrize("bad", [-1, 100, 2**40])
def test_out_of_range_ids(strategy, bad):
    extra = {"generalized_qr": dict(moduli=[5, 5, 4]), "crt": dict(moduli=[9, 13])}.get(strategy, {})
    ebc = MultiHashEmbeddingBagCollection([cfg(strategy=strategy, **extra), cfg(name="t_C2", feature_names=["C2"])])
    kjt = KeyedJaggedTensor(keys=["C2", "C1"], values=torch.tensor([5, 1, 2, bad]), lengths=torch.tensor([1, 1, 1, 1]))
    with pytest.raises(InvalidInputError) as e:
        ebc(kjt)
    msg = str(e.value)
    assert "feature 'C1'" in msg and "table 't_C1'" in msg and f"id {bad}" in msg and "[0, 100)" in msg


@pytest.mark.parametrize("bad", [-1, 100, 2**40])
@pytest.mark.parametrize("sizes", [(100, 100), (100, 200)])
def test_out_of_range_ids_of_full_tables_passed_on_as_they_are(bad, sizes, monkeypatch):
    """Full tables, a KJT of exactly their features (passed on as it is; a large CPU batch's path):
    one reduction checks every id where the tables share their size, the per-feature check names it."""
    monkeypatch.setattr("torchrec_multihash.modules.id_transform.FLAT_CPU_MAX_IDS", 0)
    ebc = MultiHashEmbeddingBagCollection(
        [cfg(strategy="full", num_embeddings=sizes[0]), cfg(name="t_C2", feature_names=["C2"], strategy="full", num_embeddings=sizes[1])]
    )
    good = KeyedJaggedTensor(keys=["C1", "C2"], values=torch.tensor([5, 99, 2, 0]), lengths=torch.tensor([1, 1, 1, 1]))
    assert ebc.pooled["pooled"].transform(good) is good
    kjt = KeyedJaggedTensor(keys=["C1", "C2"], values=torch.tensor([5, bad, 2, 0]), lengths=torch.tensor([1, 1, 1, 1]))
    with pytest.raises(InvalidInputError) as e:
        ebc(kjt)
    msg = str(e.value)
    assert "feature 'C1'" in msg and "table 't_C1'" in msg and f"id {bad}" in msg and "[0, 100)" in msg


def test_hash_accepts_any_int64():
    ebc = MultiHashEmbeddingBagCollection([cfg(strategy="hash", num_collisions=3)])
    ids = torch.tensor([-(2**63), -1, 0, 99, 100, 2**63 - 1])
    out = ebc(KeyedJaggedTensor(keys=["C1"], values=ids, lengths=torch.ones(6, dtype=torch.long)))
    w = ebc.sub_table_weights()["t_C1"]
    torch.testing.assert_close(out.values(), w[[x % 34 for x in ids.tolist()]])


def test_validate_ids_false_skips_the_check_for_speed():
    ebc = MultiHashEmbeddingBagCollection([cfg(strategy="qr", num_collisions=10)], validate_ids=False)
    # 105 // 10 = 10 is past the quotient table's 10 rows: without validation it is the user's job
    with pytest.raises((IndexError, RuntimeError), match=r"(?i)index"):  # TorchRec's lookup fails on row 10
        ebc(KeyedJaggedTensor(keys=["C1"], values=torch.tensor([105]), lengths=torch.tensor([1])))


def test_missing_and_unknown_features():
    ebc = MultiHashEmbeddingBagCollection([cfg(), cfg(name="t_C2", feature_names=["C2"])])
    with pytest.raises(InvalidInputError, match=r"no feature\(s\) \['C2'\]"):
        ebc(KeyedJaggedTensor(keys=["C1"], values=torch.tensor([1]), lengths=torch.tensor([1])))
    kjt = KeyedJaggedTensor(keys=["C1", "C2", "C9"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1]))
    with pytest.raises(InvalidInputError, match=r"\['C9'\].*strict_features=False"):
        ebc(kjt)
    lenient = MultiHashEmbeddingBagCollection([cfg(), cfg(name="t_C2", feature_names=["C2"])], strict_features=False)
    assert lenient(kjt).keys() == ["C1", "C2"]


def test_weighted_module_needs_weights():
    ebc = MultiHashEmbeddingBagCollection([cfg()], is_weighted=True)
    with pytest.raises(InvalidInputError, match="no weights"):
        ebc(KeyedJaggedTensor(keys=["C1"], values=torch.tensor([1]), lengths=torch.tensor([1])))


def test_converter_errors():
    from torchrec_multihash import to_multihash_configs

    tables = [EmbeddingBagConfig(name="t", num_embeddings=10_000, embedding_dim=16, feature_names=["f"])]
    with pytest.raises(MultiHashConfigError, match="compression must be >= 1"):
        to_multihash_configs(tables, 0.5)
    with pytest.raises(MultiHashConfigError, match="unknown table"):
        to_multihash_configs(tables, 4, overrides={"nope": {}})
    with pytest.raises(MultiHashConfigError, match="cannot shrink"):
        to_multihash_configs(tables, 1000, strict=True)
    with pytest.warns(UserWarning, match=r"t \(N=10000\): 50.00x"):
        to_multihash_configs(tables, 1000)
