"""A learned id -> row mapping, held as buffers and looked up on the device.

Two layouts: *dense* (``mapping_ids == num_embeddings``, the default) stores one row per id and
indexes it directly (int16 rows when they fit, else int32: 2 or 4 bytes per id); *sparse* stores
its known ids sorted, with one int32 row each, and finds an id with ``searchsorted`` (8 bytes per
stored id). Ids the mapping does not store go through a hash into the last ``fallback_rows`` rows.
It is fitted from data by ``torchrec_multihash.learned.fit`` and travels with the model: its
buffers are part of the state dict (and of distributed checkpoints), and a mapping of another
shape is refused on load.
"""

from typing import Any, Dict, List

import torch
from torch import nn

from torchrec_multihash.modules.config import MultiHashConfigError, MultiHashEmbeddingBagConfig
from torchrec_multihash.modules.mapping_shape import MappingShape


class LearnedMapping(nn.Module):
    """Maps ids in [0, num_embeddings) to rows in [0, rows).

    Buffers: ``ids`` (sparse layout: the stored ids, sorted, unused slots hold ``num_embeddings``;
    empty in the dense layout), ``rows`` (the row of each stored id; dense: of every id) and
    ``shape`` (num_embeddings, rows, fallback_rows, mapping_ids). A new mapping sends every id through
    the fallback hash, so a table works (as a hashing trick) before a fitted mapping is loaded.
    """

    ids: torch.Tensor
    rows: torch.Tensor
    shape: torch.Tensor

    def __init__(self, config: MultiHashEmbeddingBagConfig, device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        shape = config.mapping_shape()
        if shape is None:
            config.fail("has no learned mapping (strategy 'learned', or mapping_rows on a partitioned strategy)")
        assert shape is not None
        self.table = config.name
        self.expected = s = shape
        self.dense = s.dense
        self.fallback_start = s.rows - s.fallback_rows
        self.fallback_rows = s.fallback_rows
        self.register_buffer("ids", torch.full((s.stored_ids(),), s.num_embeddings, dtype=s.id_dtype, device=device))
        self.register_buffer("rows", torch.zeros(s.mapping_ids, dtype=s.row_dtype, device=device))
        self.register_buffer("shape", torch.tensor(s.as_list(), dtype=torch.int64, device=device))
        with torch.no_grad():
            none = torch.zeros(0, dtype=torch.long, device=device)  # on the module's device, whatever the context's
            self.assign(none, none)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows (int64) of ``ids`` (int64, already checked to lie in [0, num_embeddings))."""
        if self.dense:
            return self.rows[ids].long()
        keys = ids.to(self.ids.dtype)
        pos = torch.searchsorted(self.ids, keys).clamp_(max=self.ids.numel() - 1)
        known = self.ids[pos] == keys
        fallback = self.fallback_start + torch.remainder(ids, self.fallback_rows)
        return torch.where(known, self.rows[pos].long(), fallback)

    @torch.no_grad()
    def assign(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Sets the mapping: ``ids[i]`` (distinct, in [0, num_embeddings)) goes to ``rows[i]``
        (in [0, rows - fallback_rows)); at most ``mapping_ids`` of them. Every other id takes the
        fallback hash."""
        s = self.expected
        if ids.shape != rows.shape or ids.dim() != 1:
            raise MultiHashConfigError(f"table '{self.table}': ids and rows must be 1-d tensors of one length")
        if ids.numel() > s.mapping_ids:
            raise MultiHashConfigError(
                f"table '{self.table}': the mapping has {ids.numel()} ids but the table stores at most mapping_ids={s.mapping_ids}"
            )
        if ids.numel():
            if int(ids.min()) < 0 or int(ids.max()) >= s.num_embeddings:
                raise MultiHashConfigError(f"table '{self.table}': mapping ids must lie in [0, {s.num_embeddings})")
            if int(rows.min()) < 0 or int(rows.max()) >= self.fallback_start:
                raise MultiHashConfigError(
                    f"table '{self.table}': mapped rows must lie in [0, {self.fallback_start}) "
                    f"(the last {s.fallback_rows} of {s.rows} rows are for unknown ids)"
                )
        order = torch.argsort(ids.long())
        sorted_ids = ids.long()[order]
        if sorted_ids.numel() > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
            raise MultiHashConfigError(f"table '{self.table}': the mapping lists an id twice")
        if self.dense:
            everything = torch.arange(s.num_embeddings, device=self.rows.device)
            self.rows.copy_(self.fallback_start + torch.remainder(everything, s.fallback_rows))
            self.rows[ids.long().to(self.rows.device)] = rows.to(self.rows)
            return
        n = ids.numel()
        self.ids.fill_(s.num_embeddings)
        self.ids[:n] = sorted_ids.to(self.ids)
        self.rows.zero_()
        self.rows[:n] = rows.long()[order].to(self.rows)

    def _load_from_state_dict(
        self,
        state_dict: Dict[str, Any],
        prefix: str,
        local_metadata: Dict[str, Any],
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
    ) -> None:
        shape = state_dict.get(prefix + "shape")
        if shape is not None and shape.tolist() != self.expected.as_list():
            got = MappingShape(*shape.tolist())
            raise MultiHashConfigError(
                f"table '{self.table}': the learned mapping being loaded was made for {got.describe()}, but this table has {self.expected.describe()}"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
