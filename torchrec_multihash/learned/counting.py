"""Access frequencies of the ids of learned tables, counted in one streaming pass."""

from typing import Dict, Iterable, Sequence

import torch
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from tqdm import tqdm


def count_ids(
    tables: Sequence[EmbeddingBagConfig], batches: Iterable[Batch], show_progress: bool = False, desc: str = "fit-hash: counting ids"
) -> Dict[str, torch.Tensor]:
    """Per table, how often each id in [0, num_embeddings) occurs over all its features.

    Memory is one int64 counter per id of the table (bounded by the config, not by the data);
    ids outside the table's range are an error naming the feature.
    """
    counts = {t.name: torch.zeros(t.num_embeddings, dtype=torch.int64) for t in tables}
    features = {f: t for t in tables for f in t.feature_names}
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not show_progress):
        jts = batch.sparse_features.to_dict()
        for f, t in features.items():
            if f not in jts:
                raise KeyError(f"the data has no feature '{f}' (table '{t.name}'); its features are {list(jts)}")
            ids = jts[f].values().long()
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= t.num_embeddings):
                bad = ids[(ids < 0) | (ids >= t.num_embeddings)][0].item()
                raise ValueError(f"feature '{f}' (table '{t.name}'): id {bad} is outside [0, {t.num_embeddings})")
            # index_add costs O(ids); a bincount over the whole table would cost O(table) per batch
            counts[t.name].index_add_(0, ids, torch.ones_like(ids))
    return counts
