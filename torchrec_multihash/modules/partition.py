"""Complementary partitions: maps an id to one row index per sub-table."""

import math
from typing import List

import torch

from torchrec_multihash.modules.config import MultiHashEmbeddingBagConfig


class Partitioner:
    """Computes, for int64 ids, the row of each sub-table of one logical table.

    All arithmetic is integer (floor division and remainder on int64), never float.
    """

    def __init__(self, config: MultiHashEmbeddingBagConfig) -> None:
        self.strategy: str = config.strategy
        self.num_embeddings: int = config.num_embeddings
        # a learned table's partitions split its mapped rows, not its ids
        self.sizes: List[int] = config.partition_sizes()
        # Mixed-radix place values for generalized_qr: 1, m1, m1*m2, ...
        self.place_values: List[int] = [math.prod(self.sizes[:i]) for i in range(len(self.sizes))]

    @property
    def checks_range(self) -> bool:
        """Whether ids must lie in [0, num_embeddings); the hashing trick takes any int64."""
        return self.strategy != "hash"

    def __call__(self, ids: torch.Tensor) -> List[torch.Tensor]:
        if self.strategy in ("full", "learned"):  # learned: ids are already mapped rows
            return [ids]
        if self.strategy == "hash":
            return [torch.remainder(ids, self.sizes[0])]
        if self.strategy == "qr":
            m = self.sizes[1]
            return [torch.div(ids, m, rounding_mode="floor"), torch.remainder(ids, m)]
        if self.strategy == "generalized_qr":
            return [
                torch.remainder(torch.div(ids, p, rounding_mode="floor"), m)
                for p, m in zip(self.place_values, self.sizes)
            ]
        if self.strategy == "crt":
            return [torch.remainder(ids, m) for m in self.sizes]
        raise AssertionError(f"unknown strategy {self.strategy}")
