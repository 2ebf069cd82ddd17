"""The parameter-free module that composes sub-table lookups into one pooled embedding per feature."""

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor


@dataclass
class OutputSpec:
    """How the output embedding of one logical feature is built.

    ``group`` is the lookup group whose output holds the parts: for a pooled group (an inner
    EmbeddingBagCollection, SUM pooling) the parts are already pooled per bag; for a per-id group
    (an inner EmbeddingCollection) they are one row per id, composed per id and then pooled.
    """

    name: str  # output key (the feature name, or feature@table for a feature in several tables)
    feature: str  # the KJT key it reads lengths and weights from
    group: str
    per_id: bool
    sub_features: List[str]
    operation: str
    pooling: PoolingType
    dim: int


@torch.fx.wrap
def _sum_bags(rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums consecutive ``rows`` into bags of ``lengths`` rows ([bags, dim]; an empty bag is 0)."""
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=rows.device), lengths, output_size=rows.size(0))
    pooled = torch.zeros(lengths.numel(), rows.size(1), dtype=rows.dtype, device=rows.device)
    return pooled.index_add(0, bag, rows)


class Combine(nn.Module):
    """Composes the parts of each feature (add, mult or concat) and pools them into a KeyedTensor.

    Add and concat commute with pooling, so their parts arrive pooled (sum of q plus sum of r);
    mult does not, so its parts arrive per id and the product is taken per id before pooling:
    sum_i w_i * q[x_i] * r[x_i]. MEAN divides the weighted sum by the number of ids in the bag
    (as FBGEMM does); an empty bag gives zeros. The forward reads plain lists (fx-traceable,
    scriptable).
    """

    _keys: List[str]
    _dims: List[int]
    _features: List[str]
    _groups: List[str]
    _per_id: List[bool]
    _subs: List[List[str]]
    _concat: List[bool]
    _mean: List[bool]
    _batch_groups: List[str]
    _batch_outputs: List[List[int]]

    def __init__(self, outputs: List[OutputSpec], is_weighted: bool) -> None:
        super().__init__()
        self._is_weighted = is_weighted
        self._keys = [o.name for o in outputs]
        self._dims = [o.dim for o in outputs]
        self._features = [o.feature for o in outputs]
        self._groups = [o.group for o in outputs]
        self._per_id = [o.per_id for o in outputs]
        self._subs = [list(o.sub_features) for o in outputs]
        self._concat = [o.operation == "concat" for o in outputs]
        self._mean = [o.pooling == PoolingType.MEAN for o in outputs]
        self._needs_features = any(o.per_id or o.pooling == PoolingType.MEAN for o in outputs)
        # per-id outputs composed together: same group (one dim) and number of parts
        batches: Dict[tuple, List[int]] = {}
        for i, o in enumerate(outputs):
            if o.per_id:
                batches.setdefault((o.group, len(o.sub_features)), []).append(i)
        self._batch_groups = [g for g, _ in batches]
        self._batch_outputs = list(batches.values())

    def _per_id_pooled(
        self, outputs: List[int], by_key: Dict[str, JaggedTensor], rows_by_sub: Dict[str, JaggedTensor], batch_size: int
    ) -> torch.Tensor:
        """Sum-pooled per-id products of ``outputs`` (one per-id group, one dim), [outputs, batch,
        dim]: the parts of all features are multiplied in one go and pooled with one ``index_add``."""
        rows = torch.cat([rows_by_sub[self._subs[o][0]].values() for o in outputs]).float()
        for k in range(1, len(self._subs[outputs[0]])):
            rows = rows * torch.cat([rows_by_sub[self._subs[o][k]].values() for o in outputs]).float()
        if self._is_weighted:
            rows = rows * torch.cat([by_key[self._features[o]].weights() for o in outputs]).unsqueeze(1)
        lengths = torch.cat([by_key[self._features[o]].lengths() for o in outputs])
        return _sum_bags(rows, lengths).view(len(outputs), batch_size, -1)

    def _pooled_output(self, o: int, pooled_parts: Dict[str, Dict[str, torch.Tensor]]) -> torch.Tensor:
        """Output ``o`` from its parts, pooled by the inner EmbeddingBagCollection."""
        parts = [pooled_parts[self._groups[o]][s] for s in self._subs[o]]
        if len(parts) == 1:
            return parts[0]
        if self._concat[o]:
            return torch.cat(parts, dim=1)
        return torch.stack(parts).sum(0)  # add

    def forward(
        self,
        features: KeyedJaggedTensor,
        pooled: Dict[str, KeyedTensor],
        per_id: Dict[str, Dict[str, JaggedTensor]],
    ) -> KeyedTensor:
        batch_size = features.stride()
        by_key: Dict[str, JaggedTensor] = features.to_dict() if self._needs_features else {}
        pooled_parts: Dict[str, Dict[str, torch.Tensor]] = {}
        for g, kt in pooled.items():
            pooled_parts[g] = kt.to_dict()
        per_id_out: Dict[int, torch.Tensor] = {}
        for b in range(len(self._batch_groups)):
            outs = self._batch_outputs[b]
            composed = self._per_id_pooled(outs, by_key, per_id[self._batch_groups[b]], batch_size)
            for k in range(len(outs)):
                per_id_out[outs[k]] = composed[k]
        results: List[torch.Tensor] = []
        for o in range(len(self._keys)):
            out = per_id_out[o] if self._per_id[o] else self._pooled_output(o, pooled_parts)
            if self._mean[o]:
                out = out / by_key[self._features[o]].lengths().clamp(min=1).unsqueeze(1).to(out.dtype)
            results.append(out)
        return KeyedTensor(keys=self._keys, length_per_key=self._dims, values=torch.cat(results, dim=1))
