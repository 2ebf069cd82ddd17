"""``learned``: a mapping learned from data sends each id to one of ``mapping_rows`` rows
(Ghaemmaghami et al. 2022); ids it does not know hash into ``fallback_rows`` reserved rows."""

import math
from typing import Optional, Tuple

from torchrec_multihash.modules.mapping_shape import INT16_MAX, MappingShape
from torchrec_multihash.modules.strategies.base import TOLERANCE, SingleTableStrategy, Sizing
from torchrec_multihash.modules.strategies.names import StrategyName
from torchrec_multihash.modules.strategies.registry import register

DENSE_SHARE = 0.5  # a row per id while that costs at most this share of the budget
# else the hottest ids' entries get this share, and 1 / FALLBACK_DIVISOR of the rows hold the ids not
# stored; measured on MovieLens at 64x: shares 0.3 / 0.5 gave AUC 0.715 / 0.727, a quarter of the rows
# for the fallback 0.726, every row shared with the hash (fallback_rows == mapping_rows) 0.696
SPARSE_SHARE = 0.5
FALLBACK_DIVISOR = 8


@register(StrategyName.LEARNED)
class LearnedHash(SingleTableStrategy):
    """One table of ``mapping_rows`` rows (default ``ceil(N / num_collisions)``), looked up by the
    row the id transform's ``LearnedMapping`` gives each id."""

    uses = ("num_collisions",)

    def rows(self) -> int:
        return self.domain  # ids are already mapped to rows

    @classmethod
    def sized_for(cls, num_embeddings: int, dim: int, compression: float, operation: str, num_partitions: int) -> Sizing:
        """Rows and mapping within the budget: a row per id (dense) while that costs at most
        ``DENSE_SHARE`` of it, int32 rows only past the int16 limit; else (sparse) the hottest ids
        only, their entries (int32 id, int16 row: 6 bytes) ``SPARSE_SHARE`` of it."""
        budget = num_embeddings * dim * 4 / compression * (1 + TOLERANCE)
        dense = _dense_sizing(num_embeddings, dim * 4, budget)
        return dense if dense is not None else _sparse_sizing(num_embeddings, dim * 4, budget)


def _sizing(n: int, row_bytes: int, rows: int, ids: int, fallback_rows: int) -> Sizing:
    fields = {"mapping_rows": rows, "mapping_ids": None if ids == n else ids, "fallback_rows": None if ids == n else fallback_rows}
    return Sizing(fields, n * row_bytes / (rows * row_bytes + MappingShape(n, rows, fallback_rows, ids).nbytes()))


def _dense_sizing(n: int, row_bytes: int, budget: float) -> Optional[Sizing]:
    """A row per id (int16 rows, or int32 where they pay off), or None if that costs too much."""

    def rows_left(rows_hint: int) -> int:
        return math.floor((budget - MappingShape(n, rows_hint, 1, n).nbytes()) / row_bytes)

    if MappingShape(n, 2, 1, n).nbytes() > budget * DENSE_SHARE:
        return None
    r16 = rows_left(2)
    if r16 < 2:
        return None
    if r16 <= INT16_MAX:
        return _sizing(n, row_bytes, r16, n, 1)
    r32 = rows_left(INT16_MAX + 1)  # int32 rows pay off only well past the int16 limit
    fits = r32 > INT16_MAX and MappingShape(n, r32, 1, n).nbytes() <= budget * DENSE_SHARE
    return _sizing(n, row_bytes, r32 if fits else INT16_MAX, n, 1)


def _sparse_sizing(n: int, row_bytes: int, budget: float) -> Sizing:
    """The hottest ids' entries take ``SPARSE_SHARE`` of the budget, the rows the rest."""

    def split(rows_hint: int) -> Tuple[int, int]:
        entry = MappingShape(n, rows_hint, 1, 1).nbytes() - MappingShape(n, rows_hint, 1, 0).nbytes()
        ids = max(1, min(n - 1, math.floor(budget * SPARSE_SHARE / entry)))
        return max(2, math.floor((budget - MappingShape(n, rows_hint, 1, ids).nbytes()) / row_bytes)), ids

    rows, ids = split(2)
    if rows > INT16_MAX:  # int16 rows cannot address them all: int32 entries, or int16's most rows
        r32, ids32 = split(INT16_MAX + 1)
        rows, ids = (r32, ids32) if r32 > INT16_MAX else (INT16_MAX, ids)
    return _sizing(n, row_bytes, rows, ids, max(1, rows // FALLBACK_DIVISOR))
