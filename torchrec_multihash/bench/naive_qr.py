"""The baseline of the original DLRM code (facebookresearch/dlrm, not part of this repository: the
``QREmbeddingBag`` of its tricks/qr_embedding_bag.py, as its dlrm_s_pytorch.py uses it): per table,
two ``torch.nn.EmbeddingBag`` (quotient and remainder) with sparse gradients, combined per id by
element-wise product, trained with a standard sparse optimizer."""

from typing import List

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


class NaiveQREmbeddingBags(nn.Module):
    """One Q-R pair of sparse ``nn.EmbeddingBag`` per table (mult, SUM pooling), looped over in
    Python, as the original code does (its semantics too: pooled first, then multiplied)."""

    def __init__(self, tables: List[EmbeddingBagConfig], collisions: int) -> None:
        super().__init__()
        self.features = [t.feature_names[0] for t in tables]
        self.collisions = collisions
        self.dim = tables[0].embedding_dim
        self.q = nn.ModuleList()
        self.r = nn.ModuleList()
        self.remainder_rows: List[int] = []  # rows of each table's remainder bag (its modulus)
        for t in tables:
            m = collisions if t.num_embeddings > collisions else 1
            self.remainder_rows.append(m)
            self.q.append(nn.EmbeddingBag(-(-t.num_embeddings // m), t.embedding_dim, mode="sum", sparse=True))
            self.r.append(nn.EmbeddingBag(m, t.embedding_dim, mode="sum", sparse=True))

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        jts = kjt.to_dict()
        pooled = []
        for f, q, r, m in zip(self.features, self.q, self.r, self.remainder_rows):
            jt = jts[f]
            ids = jt.values().long()
            offsets = jt.offsets()[:-1].long()
            # as QREmbeddingBag: pool each partition, then multiply the pooled vectors (for a
            # multi-hot bag that is not the sum of per-id products our module computes)
            pooled.append(q(torch.div(ids, m, rounding_mode="floor"), offsets) * r(torch.remainder(ids, m), offsets))
        return KeyedTensor(keys=self.features, length_per_key=[self.dim] * len(self.features), values=torch.cat(pooled, 1))
