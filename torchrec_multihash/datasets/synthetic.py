"""Synthetic CTR data: the one generator of the demo, the tests, the train app and the bench.

Nothing is stored: every batch is computed from (seed, batch index) with its own
``torch.Generator`` (no global seeding), so any size is free and the same seed gives the same data.

- Ids follow a power law. ``id_distribution="power"``: id = floor(N * u^skew), u uniform (larger
  ``skew``: more skewed); ``"zipf"``: id = floor(N^u) - 1, so P(id = x) ~ 1/(x + 1). Id 0 is the
  hottest (as after a vocabulary pass) unless ``scatter`` spreads the hot ids over the table
  (x -> x * 2654435761 mod N, a bijection for every N that is not a multiple of that prime).
- The features listed in ``multi_hot_features`` have bags of 1..``max_bag`` ids, the rest one id.
- Labels come from a known model: each id belongs to one of ``num_clusters`` hidden clusters (a
  hash of the id) whose score is the main part of the logit, plus a small effect of the id itself
  (another hash) and a linear function of the dense features (Criteo-like log counts); a bag
  contributes the mean over its ids. Ids of one cluster behave alike, so a learned hash has
  structure to find that a random hash destroys; ``bayes_logloss`` gives the log loss of the true
  model, the best any model can reach.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash.datasets.criteo_tsv import NUM_DENSE

_P = 2_147_483_647  # 2^31 - 1: (id * a + b) stays inside int64 for ids below 2^32
_KNUTH = 2_654_435_761  # a prime near 2^32 / golden ratio (Knuth's multiplicative hash)
ID_DISTRIBUTIONS = ("power", "zipf")


def _hash(ids: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """A cheap universal hash of int64 ids into [0, 2^31 - 1)."""
    return torch.remainder(torch.remainder(ids, _P) * a + b, _P)


def _bag_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of each bag of ``x`` (bags of ``lengths`` >= 1 consecutive values)."""
    if x.numel() == lengths.numel():  # bags of one id
        return x
    bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return torch.zeros(lengths.numel(), dtype=x.dtype).index_add(0, bag, x) / lengths.to(x.dtype)


@dataclass
class _Draw:
    dense: torch.Tensor
    ids: List[torch.Tensor]
    lengths: List[torch.Tensor]
    logits: torch.Tensor
    labels: torch.Tensor


@dataclass
class SyntheticCriteo:
    """Deterministic batches of a Criteo-like CTR problem (see the module's docstring).

    Args:
        num_embeddings_per_feature: id range of each sparse feature.
        num_dense: number of dense features.
        num_clusters: hidden clusters per feature.
        skew: exponent of the ``"power"`` id distribution.
        id_distribution: ``"power"`` or ``"zipf"``.
        scatter: spread the hot ids over the table instead of putting them first (id 0 stays).
        multi_hot_features: indices of the features with bags of 1..``max_bag`` ids.
        cluster_weight / id_weight / dense_weight / bias: scale of each part of the true logit.
        feature_names: the KJT keys (default C1, C2, ...).
    """

    num_embeddings_per_feature: List[int]
    num_dense: int = NUM_DENSE
    num_clusters: int = 64
    skew: float = 3.0
    id_distribution: str = "power"
    scatter: bool = False
    multi_hot_features: Sequence[int] = ()
    max_bag: int = 3
    cluster_weight: float = 1.0
    id_weight: float = 0.3
    dense_weight: float = 0.3
    bias: float = -1.0
    seed: int = 0
    feature_names: List[str] = field(default_factory=list)  # default C1, C2, ...
    _cluster_scores: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.num_embeddings_per_feature)
        if any(v > 2**32 for v in self.num_embeddings_per_feature):
            raise ValueError("synthetic ids must be below 2^32")
        if self.id_distribution not in ID_DISTRIBUTIONS:
            raise ValueError(f"id_distribution must be one of {ID_DISTRIBUTIONS}, got {self.id_distribution!r}")
        if not set(self.multi_hot_features) <= set(range(n)) or self.max_bag < 1:
            raise ValueError(f"multi_hot_features must be feature indices below {n} and max_bag >= 1")
        self.feature_names = list(self.feature_names) or [f"C{i + 1}" for i in range(n)]
        g = torch.Generator().manual_seed(self.seed)
        # each feature's clusters get scores; features matter unequally
        importance = torch.rand(n, generator=g) + 0.25
        self._cluster_scores = torch.randn(n, self.num_clusters, generator=g) * importance.unsqueeze(1)
        self._cluster_scores *= self.cluster_weight / importance.norm()
        self._dense_w = torch.randn(self.num_dense, generator=g) * self.dense_weight / self.num_dense**0.5
        self._hash_ab = torch.randint(1, _P, (n, 4), generator=g).tolist()

    @classmethod
    def toy(cls, num_embeddings_per_feature: List[int], seed: int = 0, num_dense: int = 4, max_bag: int = 3) -> "SyntheticCriteo":
        """A small task that ids explain well, for the demo and the tests: features f0, f1, ...,
        the last one multi-hot, milder skew (most ids are seen), strong cluster and id effects
        (the true model's log loss is about half the base rate's)."""
        return cls(
            num_embeddings_per_feature,
            num_dense=num_dense,
            skew=1.5,
            multi_hot_features=[len(num_embeddings_per_feature) - 1],
            max_bag=max_bag,
            cluster_weight=3.0,
            id_weight=3.0,
            bias=0.0,
            seed=seed,
            feature_names=[f"f{i}" for i in range(len(num_embeddings_per_feature))],
        )

    def clusters(self, feature: int, ids: torch.Tensor) -> torch.Tensor:
        """The hidden cluster of each id of ``feature``."""
        a, b, _, _ = self._hash_ab[feature]
        return _hash(ids, a, b) % self.num_clusters

    def true_logits(self, dense: torch.Tensor, ids: List[torch.Tensor], lengths: List[torch.Tensor]) -> torch.Tensor:
        """The logit of the known model for each sample (``ids[f]``: bags of ``lengths[f]`` ids)."""
        logit = self.bias + (dense @ self._dense_w)
        for f, (x, lens) in enumerate(zip(ids, lengths)):
            _, _, a, b = self._hash_ab[f]
            own = _hash(x, a, b).double() / _P - 0.5  # the id's own small effect
            cluster = self._cluster_scores[f][self.clusters(f, x)]
            logit = logit + _bag_mean(cluster, lens) + self.id_weight * _bag_mean(own, lens).float()
        return logit

    def _ids(self, n: int, size: int, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(size, generator=g, dtype=torch.float64)
        if self.id_distribution == "power":
            ids = (u.pow(self.skew) * n).long().clamp(max=n - 1)
        else:
            ids = torch.floor(torch.exp(u * math.log(n))).long() - 1
        return (ids * _KNUTH) % n if self.scatter else ids

    def _draw(self, batch_size: int, index: int) -> _Draw:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * index + 1)
        # exponential counts (mean 10) through log(1 + x); 1 - u lies in (0, 1], so no log(0) = inf
        u = torch.rand(batch_size, self.num_dense, generator=g)
        dense = torch.log1p(-torch.log1p(-u) * 10.0)
        ids, lengths = [], []
        for f, n in enumerate(self.num_embeddings_per_feature):
            if f in self.multi_hot_features:
                lens = torch.randint(1, self.max_bag + 1, (batch_size,), generator=g)
            else:
                lens = torch.ones(batch_size, dtype=torch.long)
            ids.append(self._ids(n, int(lens.sum()), g))
            lengths.append(lens)
        logits = self.true_logits(dense, ids, lengths)
        labels = torch.bernoulli(torch.sigmoid(logits), generator=g)
        return _Draw(dense, ids, lengths, logits, labels)

    def batch(self, batch_size: int, index: int) -> Batch:
        """Batch number ``index`` (the same for the same seed and index)."""
        d = self._draw(batch_size, index)
        kjt = KeyedJaggedTensor(
            keys=list(self.feature_names),
            values=torch.cat(d.ids),
            lengths=torch.cat(d.lengths).int(),
            stride=batch_size,
        )
        return Batch(dense_features=d.dense, sparse_features=kjt, labels=d.labels)

    def batches(self, batch_size: int, num_batches: int, start: int = 0, step: int = 1) -> Iterator[Batch]:
        """Batches start, start + step, ... (a rank r of W takes start=r, step=W)."""
        for i in range(num_batches):
            yield self.batch(batch_size, start + i * step)

    def bayes_logloss(self, batch_size: int, index: int) -> Tuple[float, float]:
        """(log loss of the true model, log loss of predicting the base rate) on batch ``index``:
        what a perfect model reaches, and what a model that learned nothing does."""
        d = self._draw(batch_size, index)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        p = d.labels.mean().clamp(1e-6, 1 - 1e-6)
        return float(bce(d.logits, d.labels)), float(bce(torch.logit(p).expand_as(d.logits), d.labels))


def write_criteo_tsv(path: Path, lines: int, seed: int = 0, vocab: int = 1_000_000) -> None:
    """Writes ``lines`` synthetic samples in the Criteo TSV layout (label, 13 integer counts, 26
    hex categoricals; one in 20 fields empty), e.g. to measure the reader on a file of any size."""
    syn = SyntheticCriteo([vocab] * 26, num_dense=NUM_DENSE, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for start in range(0, lines, 4096):
            b = syn.batch(min(4096, lines - start), start)
            n = b.labels.numel()
            ints = torch.expm1(b.dense_features).round().long().tolist()
            cats = (b.sparse_features.values().view(26, n).t() * _KNUTH % 2**32).tolist()
            empty = (torch.rand(n, 39, generator=g) < 0.05).tolist()
            for i in range(n):
                fields = [str(int(b.labels[i]))]
                fields += ["" if empty[i][j] else str(v) for j, v in enumerate(ints[i])]
                fields += ["" if empty[i][13 + j] else f"{v:08x}" for j, v in enumerate(cats[i])]
                f.write("\t".join(fields) + "\n")
