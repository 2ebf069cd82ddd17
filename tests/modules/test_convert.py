"""to_multihash_configs meets the target compression; the DeepRec entry point maps onto the module."""

import dataclasses
import warnings

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_multihash import (
    MultiHashConfigError,
    MultiHashEmbeddingBagCollection,
    get_multihash_variable,
    to_multihash_configs,
)
from torchrec_multihash.modules.strategies import registered_strategies, strategy_class

from tests.helpers.reference import reference_forward

SIZES = [150, 200, 201, 5_000, 1_000_000, 33_762_577]


def tables(dim=16):
    return [EmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=dim, feature_names=[f"f{i}"]) for i, n in enumerate(SIZES)]


@pytest.mark.parametrize("strategy", [n for n in registered_strategies() if strategy_class(n).compresses and n != "learned"])
@pytest.mark.parametrize("operation", ["mult", "concat"])
@pytest.mark.parametrize("compression", [2, 4, 16])
def test_each_large_table_shrinks_by_the_factor(strategy, operation, compression):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = to_multihash_configs(tables(), compression, strategy=strategy, operation=operation)
    for src, c in zip(tables(), out):
        ebc = MultiHashEmbeddingBagCollection([c], device=torch.device("meta"))
        if src.num_embeddings <= 200:
            assert c.strategy == "full" and ebc.memory_bytes() == ebc.full_memory_bytes()
        else:
            factor = ebc.full_memory_bytes() / ebc.memory_bytes()
            assert c.strategy == strategy
            if src.num_embeddings >= 5000:
                assert factor * 1.02 >= compression, (c.name, factor)
                if strategy in ("hash", "qr") and c.num_collisions > 2:
                    # the smallest number of collisions that meets the target
                    fewer = dataclasses.replace(c, num_collisions=c.num_collisions - 1)
                    smaller = MultiHashEmbeddingBagCollection([fewer], device=torch.device("meta"))
                    assert smaller.full_memory_bytes() / smaller.memory_bytes() * 1.02 < compression
                if operation == "mult" and compression >= 4:
                    slack = 1.6 if strategy == "generalized_qr" else 1.3  # coarser steps in k=3
                    assert factor < slack * compression, (c.name, factor)
            elif factor * 1.02 < compression:  # too small to reach it: warned, at the strategy's minimum
                assert any(f"{c.name} (N={c.num_embeddings})" in str(w.message) for w in caught)


def test_overrides_and_threshold():
    out = to_multihash_configs(tables(), 4, threshold=10_000, overrides={"t5": {"strategy": "hash", "num_collisions": 2}})
    assert [c.strategy for c in out] == ["full"] * 4 + ["qr", "hash"]
    assert out[5].strategy_impl().sizes() == [16_881_289]


def test_deeprec_entry_point():
    v = get_multihash_variable("item", num_embeddings=10_000, dims=[16], operation="mul")
    assert (v.strategy, v.operation, v.embedding_dim, v.strategy_impl().sizes()) == ("qr", "mult", 16, [100, 100])
    c = get_multihash_variable("user", num_embeddings=1000, dims=[10, 6], operation="concat", feature_names=["u"])
    assert c.strategy_impl().dims() == [10, 6] and c.strategy_impl().sizes() == [32, 32]
    ebc = MultiHashEmbeddingBagCollection([v, c])
    kjt = KeyedJaggedTensor(keys=["item", "u"], values=torch.tensor([9999, 0, 5, 999]), lengths=torch.tensor([2, 0, 1, 1]))
    got = ebc(kjt).to_dict()
    ref = reference_forward([v, c], ebc.sub_table_weights(), kjt)
    torch.testing.assert_close(got["item"], ref["item"])
    torch.testing.assert_close(got["u"], ref["u"])
    with pytest.raises(MultiHashConfigError, match="several entries, which means concat"):
        get_multihash_variable("x", 100, dims=[8, 8], operation="add")
    with pytest.raises(MultiHashConfigError, match="2 partitions"):
        get_multihash_variable("x", 100, dims=[8], num_of_partitions=3)


def test_overrides_of_the_logical_table_or_of_no_field_are_named():
    t = [EmbeddingBagConfig(name="t_item", num_embeddings=10_000, embedding_dim=16, feature_names=["item"])]
    with pytest.raises(MultiHashConfigError, match=r"override of table 't_item' sets \['num_embeddings'\]: the logical table's"):
        to_multihash_configs(t, 4, overrides={"t_item": {"num_embeddings": 10}})
    with pytest.raises(MultiHashConfigError, match=r"override of table 't_item' sets \['colisions'\], which are not"):
        to_multihash_configs(t, 4, overrides={"t_item": {"colisions": 2}})
    with pytest.raises(MultiHashConfigError, match=r"unknown table\(s\) \['item'\] \(did you mean 't_item'\?\); the tables are \['t_item'\]"):
        to_multihash_configs(t, 4, overrides={"item": {"strategy": "full"}})


def test_an_override_naming_a_strategy_is_sized_for_it():
    t = [EmbeddingBagConfig(name="t", num_embeddings=10_000, embedding_dim=16, feature_names=["f"])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full by the override's word: no "cannot shrink"
        assert to_multihash_configs(t, 4, overrides={"t": {"strategy": "full"}})[0].strategy == "full"
    (c,) = to_multihash_configs(t, 4, strategy="generalized_qr", num_partitions=3, overrides={"t": {"strategy": "crt"}})
    assert c.strategy == "crt" and len(c.moduli) == 3 and c.num_collisions is None
    with pytest.raises(MultiHashConfigError, match="table 't': num_partitions=3 does not suit the strategy its override names.*num_collisions"):
        to_multihash_configs(t, 4, strategy="generalized_qr", num_partitions=3, overrides={"t": {"strategy": "qr"}})
    with pytest.raises(MultiHashConfigError, match="table 't': strategy must be one of"):
        to_multihash_configs(t, 4, overrides={"t": {"strategy": "bogus"}})


def test_override_sizes_that_make_a_table_larger_than_full_are_warned_of():
    configs = [
        EmbeddingBagConfig(name="t_a", num_embeddings=1460, embedding_dim=16, feature_names=["a"]),
        EmbeddingBagConfig(name="t_b", num_embeddings=100_000, embedding_dim=16, feature_names=["b"]),
    ]
    overrides = {"t_a": {"strategy": "learned", "mapping_rows": 100_000}, "t_b": {"num_collisions": 4}}
    with pytest.warns(UserWarning, match=r"larger than uncompressed: t_a \(learned, mapping_rows=100000\): [\d,]+ bytes against 93,440") as caught:
        to_multihash_configs(configs, compression=4, strategy="qr", overrides=overrides)
    assert not any("t_b" in str(w.message) for w in caught)  # 4x smaller: not named


def test_every_embedding_bag_config_field_is_carried_or_refused_by_name():
    import torch
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from torchrec_multihash import MultiHashConfigError, MultiHashEmbeddingBagCollection, to_multihash_configs

    # the user's initializer reaches every sub-table (it was dropped: the default init ran instead)
    c = EmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=8, feature_names=["f"], init_fn=lambda w: torch.nn.init.constant_(w, 0.25))
    for op in ("add", "mult"):
        (t,) = to_multihash_configs([c], 8, operation=op, threshold=0)
        assert t.init_fn is c.init_fn
        weights = [v for v in MultiHashEmbeddingBagCollection([t]).state_dict().values() if v.is_floating_point()]
        assert weights and all(bool((w == 0.25).all()) for w in weights)
    # fields a composed table cannot carry are refused, naming them (not dropped)
    for field, value in [("need_pos", True), ("use_virtual_table", True), ("num_embeddings_post_pruning", 10), ("total_num_buckets", 4)]:
        odd = EmbeddingBagConfig(name="t_odd", num_embeddings=1000, embedding_dim=8, feature_names=["f"], **{field: value})
        with pytest.raises(
            MultiHashConfigError, match=rf"table 't_odd': EmbeddingBagConfig field\(s\) \{{'{field}': {value}\}} have no multi-hash equivalent"
        ):
            to_multihash_configs([odd], 8)
