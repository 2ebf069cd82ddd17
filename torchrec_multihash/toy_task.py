"""A small learnable CTR task with a known model, for the demo and the tests.

Ids are power-law distributed; every id of every feature has a hidden score, and the label is
drawn from sigmoid(sum of the scores of the sample's ids + a linear function of the dense
features). A model that learns the ids' embeddings can predict it; one that cannot, can't.
"""

from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class ToyCTRTask:
    """Deterministic batches of a synthetic CTR problem.

    Args:
        num_embeddings: vocabulary size of each sparse feature.
        num_dense: number of dense features.
        max_bag: the last sparse feature is multi-hot with 1..max_bag ids per sample.
        skew: power-law exponent of id popularity (larger: more skewed).
    """

    num_embeddings: List[int]
    num_dense: int = 4
    max_bag: int = 3
    skew: float = 1.5
    seed: int = 0

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.feature_names = [f"f{i}" for i in range(len(self.num_embeddings))]
        self._scores = [torch.randn(n, generator=g) * 1.5 for n in self.num_embeddings]
        self._dense_w = torch.randn(self.num_dense, generator=g) * 0.5

    def _ids(self, n: int, size: int, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(size, generator=g, dtype=torch.float64)
        return (u.pow(self.skew) * n).long().clamp(max=n - 1)

    def batch(self, batch_size: int, index: int) -> Batch:
        """Batch number ``index`` (the same for the same seed and index)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        dense = torch.randn(batch_size, self.num_dense, generator=g)
        logit = dense @ self._dense_w
        values, lengths = [], []
        last = len(self.num_embeddings) - 1
        for f, n in enumerate(self.num_embeddings):
            if f == last and self.max_bag > 1:
                lens = torch.randint(1, self.max_bag + 1, (batch_size,), generator=g)
            else:
                lens = torch.ones(batch_size, dtype=torch.long)
            ids = self._ids(n, int(lens.sum()), g)
            bag = torch.repeat_interleave(torch.arange(batch_size), lens)
            score = torch.zeros(batch_size).index_add(0, bag, self._scores[f][ids]) / lens
            logit = logit + score
            values.append(ids)
            lengths.append(lens)
        labels = torch.bernoulli(torch.sigmoid(logit), generator=g)
        kjt = KeyedJaggedTensor(
            keys=self.feature_names, values=torch.cat(values), lengths=torch.cat(lengths)
        )
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels)

    def batches(self, batch_size: int, num_batches: int, start: int = 0) -> Iterator[Batch]:
        for i in range(start, start + num_batches):
            yield self.batch(batch_size, i)

    def bayes_logloss(self, batch_size: int, index: int) -> Tuple[float, float]:
        """(log loss of the true model, log loss of predicting the base rate) on one batch."""
        b = self.batch(batch_size, index)
        # recompute the true logits
        logit = b.dense_features @ self._dense_w
        d = b.sparse_features.to_dict()
        for f, name in enumerate(self.feature_names):
            jt = d[name]
            bag = torch.repeat_interleave(torch.arange(batch_size), jt.lengths())
            logit = logit + torch.zeros(batch_size).index_add(0, bag, self._scores[f][jt.values()]) / jt.lengths()
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        p = b.labels.mean().clamp(1e-6, 1 - 1e-6)
        return float(bce(logit, b.labels)), float(bce(torch.logit(p).expand_as(logit), b.labels))
