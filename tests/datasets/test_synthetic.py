"""The synthetic data generator (demo, tests, train app, bench): deterministic, the distributions it
documents, multi-hot bags where asked, labels from its known model."""

import math

import pytest
import torch

from torchrec_multihash.bench.workload import BenchSpec
from torchrec_multihash.datasets.synthetic import SyntheticCriteo


def test_deterministic_and_finite():
    a, b = SyntheticCriteo([10**6, 100], seed=3), SyntheticCriteo([10**6, 100], seed=3)
    for i in range(200):  # enough draws that a log(0) would have shown up
        x, y = a.batch(2048, i), b.batch(2048, i)
        assert torch.isfinite(x.dense_features).all()
        assert torch.equal(x.sparse_features.values(), y.sparse_features.values()) and torch.equal(x.labels, y.labels)
    assert not torch.equal(a.batch(2048, 0).labels, a.batch(2048, 1).labels)
    ids = torch.arange(10**6)
    # the hidden clusters are a function of the id alone, and all are used
    assert torch.equal(a.clusters(0, ids), b.clusters(0, ids)) and a.clusters(0, ids).unique().numel() == 64


def test_the_train_apps_data_stays_the_same():
    """The training tests' thresholds were measured on this data: a change to the generator must
    leave the default (one-hot, power-law, unscattered) batches as they were."""
    b = SyntheticCriteo([1000, 50], seed=0).batch(6, 2)
    assert b.sparse_features.keys() == ["C1", "C2"]
    assert b.sparse_features.values().tolist() == [5, 26, 0, 27, 919, 294, 2, 0, 22, 10, 0, 31]
    assert b.sparse_features.lengths().tolist() == [1] * 12
    assert b.labels.tolist() == [0, 0, 0, 0, 0, 1]
    assert b.dense_features.shape == (6, 13)
    assert [round(x, 4) for x in b.dense_features[0, :3].tolist()] == [0.4564, 1.9263, 2.0907]


@pytest.mark.parametrize(
    "kw,p0,p1",
    [
        # power: id = floor(1000 u^3) is 0 when u < 1000^(-1/3) = 0.1, 1 when 0.1 <= u < 0.126
        ({"skew": 3.0}, 0.1, 2 ** (1 / 3) / 10 - 0.1),
        # zipf: id = floor(1000^u) - 1 is 0 when 1000^u < 2, 1 when 2 <= 1000^u < 3
        ({"id_distribution": "zipf"}, math.log(2) / math.log(1000), math.log(1.5) / math.log(1000)),
    ],
)
def test_id_distributions(kw, p0, p1):
    ids = SyntheticCriteo([1000], seed=0, **kw).batch(100_000, 0).sparse_features.values()
    assert 0 <= ids.min() and ids.max() < 1000
    assert (ids == 0).float().mean().item() == pytest.approx(p0, abs=0.004)
    assert (ids == 1).float().mean().item() == pytest.approx(p1, abs=0.004)


def test_scatter_renames_ids_without_changing_their_counts():
    plain = SyntheticCriteo([1000], seed=0).batch(20_000, 0).sparse_features.values()
    scattered = SyntheticCriteo([1000], seed=0, scatter=True).batch(20_000, 0).sparse_features.values()
    assert torch.equal(scattered, plain * 2_654_435_761 % 1000)
    assert torch.equal(plain.bincount(minlength=1000).sort().values, scattered.bincount(minlength=1000).sort().values)
    # the hot ids are no longer the first ones (id 0 stays: 0 * k = 0)
    assert sorted(scattered.bincount(minlength=1000).topk(10).indices.tolist())[1:4] != [1, 2, 3]


def test_multi_hot_features_have_bags_of_one_to_max_bag():
    syn = SyntheticCriteo([100, 200, 300], multi_hot_features=[0, 2], max_bag=5, seed=1)
    kjt = syn.batch(4000, 7).sparse_features.to_dict()
    for name, multi in [("C1", True), ("C2", False), ("C3", True)]:
        lengths = kjt[name].lengths()
        if multi:
            assert lengths.min() == 1 and lengths.max() == 5 and set(lengths.unique().tolist()) == {1, 2, 3, 4, 5}
        else:
            assert (lengths == 1).all()
    with pytest.raises(ValueError, match="feature indices below 3"):
        SyntheticCriteo([100, 200, 300], multi_hot_features=[3])


def test_labels_follow_the_known_model():
    """The true model's log loss is far below the base rate's (measured 0.33 against 0.67 on the toy
    task); and its probabilities are calibrated: the labels' mean matches them."""
    toy = SyntheticCriteo.toy([5000, 2000, 500, 100], seed=1)
    bayes, base = toy.bayes_logloss(4096, 1_000_000)
    assert bayes < 0.6 * base
    draw = toy._draw(50_000, 3)
    assert draw.labels.mean().item() == pytest.approx(torch.sigmoid(draw.logits).mean().item(), abs=0.01)


def test_bench_batches():
    """docs/benchmarks.md's workload: 26 tables, 3 multi-hot features of 1..20 ids, the rest one id."""
    spec = BenchSpec.quick()
    spec.steps, spec.warmup = 2, 1
    batches = spec.batches()
    assert len(batches) == 3 and not torch.equal(batches[0].values(), batches[1].values())
    d = batches[0].to_dict()
    assert list(d) == [f"C{i}" for i in range(1, 27)]
    for i, (_name, jt) in enumerate(d.items()):
        assert jt.lengths().numel() == spec.batch_size
        assert 0 <= jt.values().min() and jt.values().max() < spec.rows[i]
        if i < 3:
            assert jt.lengths().min() == 1 and jt.lengths().max() == 20
        else:
            assert (jt.lengths() == 1).all()
    assert [b.values().tolist() for b in BenchSpec.quick().batches()[:1]] == [batches[0].values().tolist()]
