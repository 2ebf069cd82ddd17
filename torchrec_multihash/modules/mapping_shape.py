"""The shape of a learned id -> row mapping: its sizes, its layout in memory, and its bytes."""

from dataclasses import dataclass
from typing import List

import torch

INT16_MAX = 2**15 - 1
INT32_MAX = 2**31 - 1
SHAPE_BYTES = 4 * 8  # the ``shape`` entry of the mapping's state dict: four int64


@dataclass(frozen=True)
class MappingShape:
    """What a mapping must agree on to be loaded into a table, and how it is stored.

    Dense (``mapping_ids == num_embeddings``): one row per id. Sparse: the stored ids, sorted
    (int32, int64 past 2^31 - 1), with a row each. Rows are int16 while ``rows`` fit, else int32.
    ``fallback_rows == rows`` (*shared*): ids the mapping does not store hash over every row, as
    the hashing trick does, and stored ids may go to any row; else the last ``fallback_rows`` rows
    are theirs alone.
    """

    num_embeddings: int
    rows: int
    fallback_rows: int
    mapping_ids: int

    @property
    def dense(self) -> bool:
        return self.mapping_ids == self.num_embeddings

    @property
    def id_dtype(self) -> torch.dtype:
        return torch.int32 if self.num_embeddings <= INT32_MAX else torch.int64

    @property
    def row_dtype(self) -> torch.dtype:
        return torch.int16 if self.rows <= INT16_MAX else torch.int32

    @property
    def shared(self) -> bool:
        """Unstored ids hash over every row (the hashing trick's rows), stored ids' rows included."""
        return self.fallback_rows == self.rows

    def known_rows(self) -> int:
        """Rows a stored id may be mapped to: ``[0, known_rows())``."""
        return self.rows if self.shared else self.rows - self.fallback_rows

    def stored_ids(self) -> int:
        """Entries of the ``ids`` buffer (none in the dense layout: the id is the index)."""
        return 0 if self.dense else self.mapping_ids

    def nbytes(self) -> int:
        """Bytes of the mapping's state dict entries (buffers and shape): the one formula for what a mapping costs."""
        id_bytes = torch.empty(0, dtype=self.id_dtype).element_size()
        row_bytes = torch.empty(0, dtype=self.row_dtype).element_size()
        return self.stored_ids() * id_bytes + self.mapping_ids * row_bytes + SHAPE_BYTES

    def as_list(self) -> List[int]:
        return [self.num_embeddings, self.rows, self.fallback_rows, self.mapping_ids]

    def describe(self) -> str:
        return f"num_embeddings={self.num_embeddings}, rows={self.rows}, fallback_rows={self.fallback_rows}, mapping_ids={self.mapping_ids}"
