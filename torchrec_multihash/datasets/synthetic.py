"""A synthetic Criteo-like data set: power-law ids with latent clusters, labels from a known model.

Nothing is stored: every batch is computed from (seed, batch index), so any size is free and the
same seed gives the same data. Ids of one feature are ranked by popularity (id 0 is the hottest,
as after a vocabulary pass); each id belongs to one of ``num_clusters`` hidden clusters (a hash of
the id), and the label depends on the clusters of the sample's ids (plus a small effect of the id
itself and the dense features). Ids of one cluster behave alike, so a learned hash has structure
to find that a random hash destroys.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash.datasets.criteo_tsv import NUM_DENSE

_P = 2_147_483_647  # 2^31 - 1: (id * a + b) stays inside int64 for ids below 2^32


def _hash(ids: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """A cheap universal hash of int64 ids into [0, 2^31 - 1)."""
    return torch.remainder(torch.remainder(ids, _P) * a + b, _P)


@dataclass
class SyntheticCriteo:
    """Deterministic batches of a Criteo-like CTR problem.

    Args:
        num_embeddings_per_feature: id range of each sparse feature.
        num_clusters: hidden clusters per feature.
        skew: id popularity exponent; id = floor(N * u^skew), u uniform (larger: more skewed).
        cluster_weight / id_weight / dense_weight: scale of each part of the true logit.
    """

    num_embeddings_per_feature: List[int]
    num_dense: int = NUM_DENSE
    num_clusters: int = 64
    skew: float = 3.0
    cluster_weight: float = 1.0
    id_weight: float = 0.3
    dense_weight: float = 0.3
    bias: float = -1.0
    seed: int = 0
    feature_names: Optional[List[str]] = None
    _cluster_scores: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.num_embeddings_per_feature)
        if any(v > 2**32 for v in self.num_embeddings_per_feature):
            raise ValueError("synthetic ids must be below 2^32")
        self.feature_names = self.feature_names or [f"C{i + 1}" for i in range(n)]
        g = torch.Generator().manual_seed(self.seed)
        # each feature's clusters get scores; features matter unequally
        importance = torch.rand(n, generator=g) + 0.25
        self._cluster_scores = torch.randn(n, self.num_clusters, generator=g) * importance.unsqueeze(1)
        self._cluster_scores *= self.cluster_weight / importance.norm()
        self._dense_w = torch.randn(self.num_dense, generator=g) * self.dense_weight / self.num_dense**0.5
        self._hash_ab = torch.randint(1, _P, (n, 4), generator=g).tolist()

    def clusters(self, feature: int, ids: torch.Tensor) -> torch.Tensor:
        """The hidden cluster of each id of ``feature``."""
        a, b, _, _ = self._hash_ab[feature]
        return _hash(ids, a, b) % self.num_clusters

    def true_logits(self, dense: torch.Tensor, ids: List[torch.Tensor]) -> torch.Tensor:
        logit = self.bias + (dense @ self._dense_w)
        for f, x in enumerate(ids):
            _, _, a, b = self._hash_ab[f]
            own = _hash(x, a, b).double() / _P - 0.5  # the id's own small effect
            logit = logit + self._cluster_scores[f][self.clusters(f, x)] + self.id_weight * own.float()
        return logit

    def batch(self, batch_size: int, index: int) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * index + 1)
        # exponential counts (mean 10) through log(1 + x); 1 - u lies in (0, 1], so no log(0) = inf
        u = torch.rand(batch_size, self.num_dense, generator=g)
        dense = torch.log1p(-torch.log1p(-u) * 10.0)
        ids = [
            (torch.rand(batch_size, generator=g, dtype=torch.float64).pow(self.skew) * n).long().clamp(max=n - 1)
            for n in self.num_embeddings_per_feature
        ]
        logits = self.true_logits(dense, ids)
        labels = torch.bernoulli(torch.sigmoid(logits), generator=g)
        assert self.feature_names is not None  # set by __post_init__
        kjt = KeyedJaggedTensor(
            keys=list(self.feature_names),
            values=torch.cat(ids),
            lengths=torch.ones(batch_size * len(ids), dtype=torch.int32),
            stride=batch_size,
        )
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels)

    def batches(self, batch_size: int, num_batches: int, start: int = 0, step: int = 1) -> Iterator[Batch]:
        """Batches start, start + step, ... (a rank r of W takes start=r, step=W)."""
        for i in range(num_batches):
            yield self.batch(batch_size, start + i * step)


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
            cats = (b.sparse_features.values().view(26, n).t() * 2654435761 % 2**32).tolist()
            empty = (torch.rand(n, 39, generator=g) < 0.05).tolist()
            for i in range(n):
                fields = [str(int(b.labels[i]))]
                fields += ["" if empty[i][j] else str(v) for j, v in enumerate(ints[i])]
                fields += ["" if empty[i][13 + j] else f"{v:08x}" for j, v in enumerate(cats[i])]
                f.write("\t".join(fields) + "\n")
