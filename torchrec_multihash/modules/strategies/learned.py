"""``learned``: a mapping learned from data sends each id to one of ``mapping_rows`` rows
(Ghaemmaghami et al. 2022); ids it does not know hash into ``fallback_rows`` reserved rows."""

import math
from typing import List, Tuple

from torchrec_multihash.modules.mapping_shape import INT16_MAX, MappingShape
from torchrec_multihash.modules.strategies.base import TOLERANCE, Sizing, Strategy
from torchrec_multihash.modules.strategies.names import StrategyName
from torchrec_multihash.modules.strategies.registry import register


@register(StrategyName.LEARNED)
class LearnedHash(Strategy):
    """One table of ``mapping_rows`` rows (default ``ceil(N / num_collisions)``), looked up by the
    row the id transform's ``LearnedMapping`` gives each id."""

    uses = ("num_collisions",)

    def sizes(self) -> List[int]:
        return [self.domain]

    def suffixes(self) -> List[str]:
        return [""]  # the logical table's own name: constraints keyed by it apply

    def partition_spec(self) -> List[Tuple[int, int]]:
        return [(1, 0)]  # ids are already mapped to rows

    @classmethod
    def sized_for(cls, num_embeddings: int, dim: int, compression: float, operation: str, num_partitions: int) -> Sizing:
        """Rows and mapping within the budget: a row per id (dense) while that costs at most half of
        it, int32 rows only past the int16 limit; else the hottest ids only (sparse), half each."""
        n, row_bytes = num_embeddings, dim * 4
        budget = n * row_bytes / compression * (1 + TOLERANCE)

        def sizing(rows: int, ids: int) -> Sizing:
            cost = rows * row_bytes + MappingShape(n, rows, 1, ids).nbytes()
            return Sizing({"mapping_rows": rows, "mapping_ids": None if ids == n else ids}, n * row_bytes / cost)

        def dense_rows(rows_hint: int) -> int:
            return math.floor((budget - MappingShape(n, rows_hint, 1, n).nbytes()) / row_bytes)

        if MappingShape(n, 2, 1, n).nbytes() <= budget / 2:
            r16 = dense_rows(2)
            if 2 <= r16 <= INT16_MAX:
                return sizing(r16, n)
            if r16 > INT16_MAX:  # int32 rows pay off only well past the int16 limit
                r32 = dense_rows(INT16_MAX + 1)
                fits = r32 > INT16_MAX and MappingShape(n, r32, 1, n).nbytes() <= budget / 2
                return sizing(r32, n) if fits else sizing(INT16_MAX, n)
        per_id = MappingShape(n, 2, 1, 1).nbytes() - MappingShape(n, 2, 1, 0).nbytes()
        rows = max(2, math.floor(budget / 2 / row_bytes))
        return sizing(rows, max(1, min(n, math.floor(budget / 2 / per_id))))
