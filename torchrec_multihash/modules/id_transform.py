"""The parameter-free module that rewrites a KJT of logical features into sub-table lookups.

It sits in front of an ordinary TorchRec ``EmbeddingBagCollection`` / ``EmbeddingCollection``.
Being parameter-free, ``TrainPipelineSparseDist(pipeline_postproc=True)`` runs it in the
input-dist stage of the pipeline, overlapped with compute.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.modules.learned_mapping import LearnedMapping
from torchrec_multihash.modules.strategies import Strategy


class InvalidInputError(MultiHashError, ValueError):
    """An input KJT that the module cannot look up; the message names feature, table and id."""


@dataclass
class FeatureLookup:
    """How one logical feature of one table is turned into sub-features."""

    feature: str
    table: str
    num_embeddings: int
    strategy: Strategy  # the table's id -> rows partition
    sub_features: List[str]
    mapping: Optional[LearnedMapping] = None  # learned id -> row, applied before the partitions


def check_feature_keys(keys: Sequence[str], required: Sequence[str], known: Optional[Sequence[str]]) -> None:
    """Raises InvalidInputError for features the module needs but the KJT lacks, or (if ``known``
    is given) KJT keys that no table of the module looks up."""
    missing = sorted(set(required) - set(keys))
    if missing:
        msg = f"the KJT has no feature(s) {missing}, which the module's tables look up; its keys are {list(keys)}"
        raise InvalidInputError(msg)
    known_set = set(known) if known is not None else None
    unknown = [k for k in keys if k not in known_set] if known_set is not None else []
    if unknown:
        raise InvalidInputError(
            f"the KJT has feature(s) {unknown} that no table of this MultiHashEmbeddingBagCollection "
            f"looks up (known: {list(known or [])}); pass strict_features=False to ignore extra features"
        )


def check_id_ranges(lookups: Sequence[FeatureLookup], jts: Sequence[JaggedTensor]) -> None:
    """Raises InvalidInputError if an id lies outside [0, num_embeddings) of its table.

    One host sync for all features: their min and max are gathered and read together.
    """
    checked = [(lk, jt.values()) for lk, jt in zip(lookups, jts) if not lk.strategy.accepts_any_id]
    checked = [(lk, v) for lk, v in checked if v.numel() > 0 and v.device.type != "meta"]  # meta has no ids to read
    if not checked:
        return
    bounds = torch.stack([torch.stack(torch.aminmax(v)) for _, v in checked]).tolist()
    for (lk, values), (lo, hi) in zip(checked, bounds):
        if lo < 0 or hi >= lk.num_embeddings:
            bad = ((values < 0) | (values >= lk.num_embeddings)).nonzero()[0].item()
            raise InvalidInputError(
                f"feature '{lk.feature}' (table '{lk.table}', num_embeddings={lk.num_embeddings}): "
                f"id {values[bad].item()} at position {bad} of the feature's values is outside "
                f"[0, {lk.num_embeddings}); use strategy='hash' for unbounded ids"
            )


class IdTransform(nn.Module):
    """Maps a KJT of logical features to a KJT of sub-features, one per partition.

    Feature ``C1`` of a Q-R table becomes ``C1__q`` (ids ``x // m``) and ``C1__r`` (ids ``x % m``),
    with the same lengths and per-sample weights. Tables with a learned mapping first map ids to
    rows; the mappings (buffers, no parameters) are children of the transform, in ``mappings``.

    Args:
        lookups: the logical features this transform handles.
        is_weighted: copy the KJT's per-sample weights to every sub-feature.
        validate_ids: check ids lie in [0, num_embeddings) (one host sync per batch).
        known_features: if given, KJT keys outside it are an error.
    """

    def __init__(
        self,
        lookups: List[FeatureLookup],
        is_weighted: bool = False,
        validate_ids: bool = True,
        known_features: Optional[List[str]] = None,
    ) -> None:
        super().__init__()
        self._lookups = lookups
        self._is_weighted = is_weighted
        self._validate_ids = validate_ids
        self._known_features = known_features
        self._required = sorted({lk.feature for lk in lookups})
        self.mappings = nn.ModuleDict({lk.table: lk.mapping for lk in lookups if lk.mapping is not None})

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        check_feature_keys(features.keys(), self._required, self._known_features)
        if self._is_weighted and features.weights_or_none() is None:
            raise InvalidInputError("the module is weighted (is_weighted=True) but the KJT has no weights")
        by_key: Dict[str, JaggedTensor] = features.to_dict()
        jts = [by_key[lk.feature] for lk in self._lookups]
        if self._validate_ids:
            check_id_ranges(self._lookups, jts)

        keys: List[str] = []
        values: List[torch.Tensor] = []
        lengths: List[torch.Tensor] = []
        weights: List[torch.Tensor] = []
        for lk, jt in zip(self._lookups, jts):
            ids = jt.values().long()
            if lk.mapping is not None:
                ids = lk.mapping(ids)
            for sub, part in zip(lk.sub_features, lk.strategy.partition(ids)):
                keys.append(sub)
                values.append(part)
                lengths.append(jt.lengths())
                if self._is_weighted:
                    weights.append(jt.weights())
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.cat(values),
            lengths=torch.cat(lengths),
            weights=torch.cat(weights) if self._is_weighted else None,
            stride=features.stride(),
        )
