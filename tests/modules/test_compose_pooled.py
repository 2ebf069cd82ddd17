"""``compose="pooled"``: the original DLRM code's Q-R (each partition pooled, then multiplied),
exact against sums computed by hand and against ``NaiveQREmbeddingBags``; refused with MEAN."""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash import MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig, PoolingType
from torchrec_multihash.app.config import ConfigError, load_config
from torchrec_multihash.app.model import build_tables
from torchrec_multihash.bench.naive_qr import NaiveQREmbeddingBags
from torchrec_multihash.modules.config import MultiHashConfigError

N, D, M = 100, 4, 8


def qr_table(**kw):
    return MultiHashEmbeddingBagConfig(name="t", num_embeddings=N, embedding_dim=D, feature_names=["f"], num_collisions=M, **kw)


def kjt(weighted=False):
    # bags: [3, 99, 42], [], [7], [64, 65]
    values = torch.tensor([3, 99, 42, 7, 64, 65])
    lengths = torch.tensor([3, 0, 1, 2])
    weights = torch.tensor([0.5, 2.0, 1.5, 3.0, 1.0, 0.25]) if weighted else None
    return KeyedJaggedTensor(keys=["f"], values=values, lengths=lengths, weights=weights)


def by_hand(q, r, features):
    """(sum_i w_i q[x // m]) * (sum_i w_i r[x % m]) per bag."""
    jt = features.to_dict()["f"]
    w = jt.weights() if features.weights_or_none() is not None else torch.ones(jt.values().numel())
    out, start = [], 0
    for n in jt.lengths().tolist():
        ids, ws = jt.values()[start : start + n], w[start : start + n]
        start += n
        pq = (ws[:, None] * q[ids // M]).sum(0)
        pr = (ws[:, None] * r[ids % M]).sum(0)
        out.append(pq * pr)
    return torch.stack(out)


@pytest.mark.parametrize("weighted", [False, True])
def test_pooled_composition_is_pooled_quotient_times_pooled_remainder(weighted):
    torch.manual_seed(0)
    ebc = MultiHashEmbeddingBagCollection([qr_table(compose="pooled")], is_weighted=weighted)
    w = ebc.sub_table_weights()
    q, r = w["t"].detach().clone().requires_grad_(True), w["t__r"].detach().clone().requires_grad_(True)
    features = kjt(weighted)
    out = ebc(features).values()
    ref = by_hand(q, r, features)
    torch.testing.assert_close(out, ref)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(w["t"].grad, q.grad)
    torch.testing.assert_close(w["t__r"].grad, r.grad)
    # the sub-tables sit in the pooled EBC, not in a per-id EmbeddingCollection
    assert list(ebc.pooled) == ["pooled"] and not ebc.per_id


def test_pooled_composition_equals_the_original_dlrm_qr_embedding_bag():
    torch.manual_seed(0)
    ebc = MultiHashEmbeddingBagCollection([qr_table(compose="pooled")])
    naive = NaiveQREmbeddingBags([EmbeddingBagConfig(name="t", num_embeddings=N, embedding_dim=D, feature_names=["f"])], collisions=M)
    with torch.no_grad():
        w = ebc.sub_table_weights()
        naive.q[0].weight.copy_(w["t"])
        naive.r[0].weight.copy_(w["t__r"])
    torch.testing.assert_close(ebc(kjt()).values(), naive(kjt()).values())


def test_per_id_default_differs_on_multi_id_bags_and_agrees_on_one_id_bags():
    torch.manual_seed(0)
    per_id = MultiHashEmbeddingBagCollection([qr_table()])
    pooled = MultiHashEmbeddingBagCollection([qr_table(compose="pooled")])
    with torch.no_grad():  # the same sub-table weights (their modules differ: per-id and pooled lookups)
        for name, w in pooled.sub_table_weights().items():
            w.copy_(per_id.sub_table_weights()[name])
    a, b = per_id(kjt()).values(), pooled(kjt()).values()
    torch.testing.assert_close(a[1:3], b[1:3])  # the empty bag and the one-id bag
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[3], b[3])


def test_pooled_composition_refuses_mean_and_bad_names():
    with pytest.raises(MultiHashConfigError, match="table 't'.*compose='pooled'.*SUM"):
        qr_table(compose="pooled", pooling=PoolingType.MEAN)
    with pytest.raises(MultiHashConfigError, match="table 't'.*compose must be one of"):
        qr_table(compose="pooled_first")


def test_app_embeddings_compose_reaches_every_compressed_table():
    cfg = load_config(
        None,
        ["embeddings.num_embeddings_per_feature=[1000,50]", "embeddings.threshold=100", "embeddings.compose=pooled", "model.embedding_dim=8"],
    )
    cfg.model.dense_arch_layer_sizes = [8]
    tables = build_tables(cfg)
    assert [t.compose for t in tables] == ["pooled", "pooled"]
    assert tables[0].strategy_impl().looks_up_per_id() is False
    with pytest.raises(ConfigError, match="embeddings.compose"):
        load_config(None, ["embeddings.compose=first"])


def test_run_records_name_a_changed_composition_and_keep_older_records_valid():
    from torchrec_multihash.app.provenance import differences, tables_record

    per_id, pooled = load_config(None, []), load_config(None, ["embeddings.compose=pooled"])
    assert "embeddings.compose" not in tables_record(per_id)  # as recorded before the key existed
    assert differences(tables_record(per_id), tables_record(pooled)) == ['embeddings.compose: null then, "pooled" now']
    assert differences(tables_record(pooled), tables_record(per_id)) == ['embeddings.compose: "pooled" then, not set now']
    mch = load_config(None, ["embeddings.strategy=mch"])
    lfu, dist = tables_record(mch), tables_record(load_config(None, ["embeddings.strategy=mch", "embeddings.mch_eviction=distance_lfu"]))
    assert differences(lfu, dist) == ['embeddings.mch_eviction: "lfu" then, "distance_lfu" now']
