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


class Combine(nn.Module):
    """Composes the parts of each feature (add, mult or concat) and pools them into a KeyedTensor.

    Add and concat commute with pooling, so their parts arrive pooled (sum of q plus sum of r);
    mult does not, so its parts arrive per id and the product is taken per id before pooling:
    sum_i w_i * q[x_i] * r[x_i]. MEAN divides the weighted sum by the number of ids in the bag
    (as FBGEMM does); an empty bag gives zeros.
    """

    def __init__(self, outputs: List[OutputSpec], is_weighted: bool) -> None:
        super().__init__()
        self._outputs = outputs
        self._is_weighted = is_weighted
        self._keys = [o.name for o in outputs]
        self._dims = [o.dim for o in outputs]
        self._needs_features = any(o.per_id or o.pooling == PoolingType.MEAN for o in outputs)
        # per-id outputs composed together: same group (one dim) and number of parts; fixed at
        # construction so the forward only looks them up
        batches: Dict[tuple, List[OutputSpec]] = {}
        for o in outputs:
            if o.per_id:
                batches.setdefault((o.group, len(o.sub_features)), []).append(o)
        self._per_id_batches = list(batches.items())

    def _per_id_pooled(
        self, outputs: List[OutputSpec], by_key: Dict[str, JaggedTensor], rows_by_sub: Dict[str, JaggedTensor], batch_size: int
    ) -> List[torch.Tensor]:
        """Sum-pooled per-id products of ``outputs`` (one per-id group, one dim): the parts of all
        features are multiplied in one go and pooled with one ``index_add`` into [features x bags]."""
        num_parts = len(outputs[0].sub_features)
        parts = [torch.cat([rows_by_sub[o.sub_features[k]].values() for o in outputs]).float() for k in range(num_parts)]
        rows = parts[0]
        for p in parts[1:]:
            rows = rows * p
        if self._is_weighted:
            rows = rows * torch.cat([by_key[o.feature].weights() for o in outputs]).unsqueeze(1)
        lengths = torch.cat([by_key[o.feature].lengths() for o in outputs])
        bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=rows.device), lengths, output_size=rows.size(0))
        pooled = torch.zeros(lengths.numel(), rows.size(1), dtype=rows.dtype, device=rows.device).index_add(0, bag, rows)
        return list(pooled.view(len(outputs), batch_size, -1).unbind(0))

    def forward(
        self,
        features: KeyedJaggedTensor,
        pooled: Dict[str, KeyedTensor],
        per_id: Dict[str, Dict[str, JaggedTensor]],
    ) -> KeyedTensor:
        batch_size = features.stride()
        by_key: Dict[str, JaggedTensor] = features.to_dict() if self._needs_features else {}
        pooled_parts: Dict[str, Dict[str, torch.Tensor]] = {g: kt.to_dict() for g, kt in pooled.items()}
        per_id_out: Dict[str, torch.Tensor] = {}
        for (group, _), outs in self._per_id_batches:
            per_id_out.update(zip([o.name for o in outs], self._per_id_pooled(outs, by_key, per_id[group], batch_size)))
        results: List[torch.Tensor] = []
        for o in self._outputs:
            if o.per_id:
                out = per_id_out[o.name]
            else:
                parts = [pooled_parts[o.group][s] for s in o.sub_features]
                if len(parts) == 1:
                    out = parts[0]
                elif o.operation == "concat":
                    out = torch.cat(parts, dim=1)
                else:  # add
                    out = torch.stack(parts).sum(0)
            if o.pooling == PoolingType.MEAN:
                lengths = by_key[o.feature].lengths()
                out = out / lengths.clamp(min=1).unsqueeze(1).to(out.dtype)
            results.append(out)
        return KeyedTensor(
            keys=self._keys,
            length_per_key=self._dims,
            values=torch.cat(results, dim=1),
        )
