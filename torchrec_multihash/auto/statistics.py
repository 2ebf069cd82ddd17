"""What the automatic choice knows of each table: its ids' access counts, from one streaming pass."""

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Sequence

import torch
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_multihash.learned.counting import count_ids


@dataclass
class TableStatistics:
    """One table's access counts, hottest id first (``sorted_counts``, seen ids only)."""

    name: str
    num_embeddings: int
    sorted_counts: torch.Tensor  # int64, descending

    @classmethod
    def from_counts(cls, name: str, counts: torch.Tensor) -> "TableStatistics":
        seen = counts[counts > 0]
        return cls(name, counts.numel(), torch.sort(seen, descending=True).values)

    @property
    def accesses(self) -> int:
        return int(self.sorted_counts.sum())

    @property
    def seen_ids(self) -> int:
        return self.sorted_counts.numel()

    def top_accesses(self, ids: int) -> int:
        """Accesses of the ``ids`` hottest ids."""
        return int(self.sorted_counts[: max(0, ids)].sum())

    def coverage(self, ids: int) -> float:
        """Share of the table's accesses that fall on its ``ids`` hottest ids (1.0 if none)."""
        total = self.accesses
        return self.top_accesses(ids) / total if total else 1.0

    def summary(self) -> Dict[str, Any]:
        """Plain figures for reports and the saved choice."""
        once = int((self.sorted_counts == 1).sum())
        return {
            "num_embeddings": self.num_embeddings,
            "accesses": self.accesses,
            "seen_ids": self.seen_ids,
            "ids_seen_once": once,
            "top_1pct_coverage": round(self.coverage(max(1, self.num_embeddings // 100)), 4),
        }


def table_statistics(tables: Sequence[EmbeddingBagConfig], batches: Iterable[Batch], show_progress: bool = False) -> Dict[str, TableStatistics]:
    """Per table, its ids' access counts over ``batches`` (all of the table's features)."""
    counts = count_ids(list(tables), batches, show_progress=show_progress, desc="auto: counting ids")
    return {name: TableStatistics.from_counts(name, c) for name, c in counts.items()}
