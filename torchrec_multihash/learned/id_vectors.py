"""Low-dimensional vectors of ids, learned by a short run of a small model.

The model is a factorization machine over all sparse features (plus a linear term of the dense
ones), trained for one pass on the click labels: ``logit = b + w.dense + sum_f lin_f +
sum_{f<g} <v_f, v_g>``. Ids whose vectors end up close interact with the other features alike,
so sharing a row costs the big model little. We chose an FM over a short DLRM run because it is
the smallest model whose id vectors are shaped by the interactions DLRM models, and it trains on
CPU in one streaming pass with sparse updates; over a label-only statistic (an id's CTR) because
that is one number, blind to *which* users or items an id goes with.
"""

import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from torchrec_multihash.modules.config import MultiHashEmbeddingBagConfig

CONTEXT_ROWS = 1 << 17  # rows of the FM tables of features that are not being fitted (ids mod this)


@dataclass
class VectorOptions:
    dim: int = 4
    lr: float = 0.05
    seed: int = 0


class FactorizationMachine(nn.Module):
    """FM over jagged features; one sparse table of all features' rows, column 0 the linear term."""

    bases: torch.Tensor  # a buffer: each feature's first row in ``table``

    def __init__(self, rows_per_feature: Dict[str, int], num_dense: int, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.features = list(rows_per_feature)
        self.rows = rows_per_feature
        bases, total = [], 0
        for f in self.features:
            bases.append(total)
            total += rows_per_feature[f]
        self.register_buffer("bases", torch.tensor(bases, dtype=torch.long))
        self.table = nn.EmbeddingBag(total, dim + 1, mode="sum", sparse=True)
        nn.init.normal_(self.table.weight, std=0.01, generator=generator)
        self.dense = nn.Linear(num_dense, 1)
        bound = 1 / num_dense**0.5  # nn.Linear's default range, drawn from ``generator``
        for p in self.dense.parameters():
            nn.init.uniform_(p, -bound, bound, generator=generator)

    def forward(self, batch: Batch) -> torch.Tensor:
        kjt = batch.sparse_features
        jts = kjt.to_dict()
        values, lengths = [], []
        for i, f in enumerate(self.features):
            jt = jts[f]
            values.append(torch.remainder(jt.values().long(), self.rows[f]) + self.bases[i])
            lengths.append(jt.lengths())
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(torch.cat(lengths).long())
        out = self.table(torch.cat(values), offsets[:-1]).view(len(self.features), kjt.stride(), -1)
        linear, v = out[..., 0].sum(0), out[..., 1:]
        pairs = 0.5 * (v.sum(0).pow(2).sum(-1) - v.pow(2).sum((0, -1)))
        return self.dense(batch.dense_features).squeeze(-1) + linear + pairs


def _train_fm(
    fitted: Dict[str, MultiHashEmbeddingBagConfig],
    batches: Iterable[Batch],
    num_dense: int,
    options: VectorOptions,
    generator: torch.Generator,
    show_progress: bool,
) -> Optional[FactorizationMachine]:
    """One pass of an FM over ``batches`` (None if there are none); sparse Adagrad on the table."""
    model: Optional[FactorizationMachine] = None
    optimizers: List[torch.optim.Optimizer] = []  # sparse (the table), dense
    for batch in tqdm(batches, desc="fit-hash: id vectors (FM)", unit="batch", disable=not show_progress):
        if model is None:  # the features come from the first batch
            rows = {f: (fitted[f].num_embeddings if f in fitted else CONTEXT_ROWS) for f in batch.sparse_features.keys()}
            model = FactorizationMachine(rows, num_dense, options.dim, generator)
            optimizers = [
                torch.optim.Adagrad([model.table.weight], lr=options.lr),
                torch.optim.Adagrad(model.dense.parameters(), lr=options.lr),
            ]
        logit = model(batch)
        loss = nn.functional.binary_cross_entropy_with_logits(logit, batch.labels.float())
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
    return model


def learn_id_vectors(
    tables: List[MultiHashEmbeddingBagConfig],
    batches: Iterable[Batch],
    num_dense: int,
    options: VectorOptions,
    show_progress: bool = False,
) -> Dict[str, torch.Tensor]:
    """One pass of an FM over ``batches``; returns each table's id vectors ([num_embeddings, dim + 1]:
    the id's linear weight, then its factors; the mean over the table's features). Memory:
    2 x (dim + 1) floats per id (weights and Adagrad state)."""
    generator = torch.Generator().manual_seed(options.seed)
    fitted = {f: t for t in tables for f in t.feature_names}
    with warnings.catch_warnings():
        # torch's sparse Adagrad notes on every step that it skips sparse-tensor invariant checks
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        model = _train_fm(fitted, batches, num_dense, options, generator, show_progress)
    vectors: Dict[str, torch.Tensor] = {}
    for t in tables:
        parts = []
        for f in t.feature_names:
            if model is None:
                parts.append(torch.zeros(t.num_embeddings, options.dim + 1))
                continue
            i = model.features.index(f)
            start = int(model.bases[i])
            parts.append(model.table.weight.detach()[start : start + t.num_embeddings])
        vectors[t.name] = torch.stack(parts).mean(0)
    return vectors
