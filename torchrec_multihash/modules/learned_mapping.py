"""A learned id -> row mapping, held as buffers and looked up on the device.

Two layouts: *dense* (``mapping_ids == num_embeddings``, the default) stores one row per id and
indexes it directly (int16 rows when they fit, else int32: 2 or 4 bytes per id); *sparse* stores
its known ids sorted (int32 below 2^31), with a row each, and finds an id with ``searchsorted``
(6 bytes per stored id with int16 rows). Ids the mapping does not store go through a hash into the
last ``fallback_rows`` rows; with ``fallback_rows == mapping_rows`` into every row (the hashing
trick), stored ids then being free to go to any row.
It is fitted from data by ``torchrec_multihash.learned.fit`` and travels with the model: its
buffers are part of the state dict (and of distributed checkpoints), with a ``shape`` entry written
from the config, and a mapping of another shape is refused on load.

A mapping is *set* once ``assign()`` ran or a state dict holding a fitted mapping was loaded
(a Python flag, so checking it costs no host sync). Until then forward refuses to run: a mapping
never fitted, or zeroed when ``DistributedModelParallel`` materialised a module built on the
``meta`` device, is never used silently.
"""

from typing import Any, Callable, Dict, List

import torch
from torch import nn

from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.modules.config import MultiHashConfigError, MultiHashEmbeddingBagConfig
from torchrec_multihash.modules.mapping_shape import MappingShape

NO_MAPPING = [0, 0, 0, 0]  # the ``shape`` entry a state dict holds for a mapping never set


class UnfittedMappingError(MultiHashError, RuntimeError):
    """A learned table was looked up before its mapping was set (fitted and assigned, or loaded)."""


def unfitted_message(table: str) -> str:
    """What a lookup of a learned table without a mapping is told: the table, and how to fit one."""
    return (
        f"learned table '{table}' has no mapping yet (it would send every id to its fallback rows): fit one "
        "with `torchrec-multihash fit-hash --config CONFIG --out DIR` and train with embeddings.mapping=DIR "
        "(or torchrec_multihash.apply_mappings(module, torchrec_multihash.load_mappings(DIR))), or from Python with "
        "torchrec_multihash.fit_learned_mappings(module, batches, num_dense=...); "
        "or load a state dict / checkpoint that holds one. A module built on the meta device gets it "
        "after it is materialised (e.g. by DistributedModelParallel)"
    )


class LearnedMapping(nn.Module):
    """Maps ids in [0, num_embeddings) to rows in [0, rows).

    Buffers: ``ids`` (sparse layout: the stored ids, sorted, unused slots hold ``num_embeddings``;
    empty in the dense layout) and ``rows`` (the row of each stored id; dense: of every id). The
    state dict adds ``shape`` (num_embeddings, rows, fallback_rows, mapping_ids), from the config
    (``NO_MAPPING`` while the mapping is not set). ``is_set`` says whether forward may run.
    """

    ids: torch.Tensor
    rows: torch.Tensor

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
        self.known_rows = s.known_rows()
        self.register_buffer("ids", torch.full((s.stored_ids(),), s.num_embeddings, dtype=s.id_dtype, device=device))
        self.register_buffer("rows", torch.zeros(s.mapping_ids, dtype=s.row_dtype, device=device))
        self.is_set = False  # by assign() and by loading a fitted mapping; never read from a tensor
        self._unfitted = unfitted_message(config.name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows (int64) of ``ids`` (int64, already checked to lie in [0, num_embeddings));
        ``UnfittedMappingError`` while the mapping is not set (on meta, where only shapes are
        inferred, a mapping is never needed)."""
        if not self.is_set and not ids.is_meta:
            raise UnfittedMappingError(self._unfitted)
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
        (in [0, rows - fallback_rows), or [0, rows) when shared); at most ``mapping_ids`` of them. Every other id takes the
        fallback hash. Refused on the meta device (materialising would zero it)."""
        self.check_materialised()
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
            if int(rows.min()) < 0 or int(rows.max()) >= self.known_rows:
                reserved = "" if s.shared else f" (the last {s.fallback_rows} of {s.rows} rows are for unknown ids)"
                raise MultiHashConfigError(f"table '{self.table}': mapped rows must lie in [0, {self.known_rows}){reserved}")
        order = torch.argsort(ids.long())
        sorted_ids = ids.long()[order]
        if sorted_ids.numel() > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
            raise MultiHashConfigError(f"table '{self.table}': the mapping lists an id twice")
        if self.dense:
            everything = torch.arange(s.num_embeddings, device=self.rows.device)
            self.rows.copy_(self.fallback_start + torch.remainder(everything, s.fallback_rows))
            self.rows[ids.long().to(self.rows.device)] = rows.to(self.rows)
        else:
            n = ids.numel()
            self.ids.fill_(s.num_embeddings)
            self.ids[:n] = sorted_ids.to(self.ids)
            self.rows.zero_()
            self.rows[:n] = rows.long()[order].to(self.rows)
        self.is_set = True

    def check_materialised(self) -> None:
        """Raises MultiHashConfigError on the meta device, where a mapping cannot be assigned."""
        if self.rows.is_meta:
            raise MultiHashConfigError(
                f"table '{self.table}': cannot assign a mapping on the meta device (materialising the module, "
                "e.g. by DistributedModelParallel, would zero it); assign it after the module is materialised"
            )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "LearnedMapping":
        """``to()`` and the like; a mapping moved to the meta device is lost, so no longer set."""
        super()._apply(fn, recurse)
        if self.rows.is_meta:
            self.is_set = False
        return self

    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        shape = self.expected.as_list() if self.is_set else NO_MAPPING
        destination[prefix + "shape"] = torch.tensor(shape, dtype=torch.int64, device=self.rows.device)

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
        """Loads ``ids`` and ``rows`` if the state dict's ``shape`` is this table's (the mapping is
        then set); refuses another shape; leaves the mapping as it is if the state dict holds none."""
        shape = state_dict.get(prefix + "shape")
        if shape is None:  # no mapping to check, so none loaded
            missing_keys.extend(prefix + k for k in ("ids", "rows", "shape") if prefix + k not in state_dict)
            return
        saved = shape.tolist()
        if saved == NO_MAPPING:  # saved before a mapping was set: nothing to load
            return
        if saved != self.expected.as_list():
            raise MultiHashConfigError(
                f"table '{self.table}': the learned mapping being loaded was made for {MappingShape(*saved).describe()}, "
                f"but this table has {self.expected.describe()}"
            )
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "shape" in unexpected_keys:
            unexpected_keys.remove(prefix + "shape")
        loaded = len(error_msgs) == errors and all(prefix + k in state_dict for k in ("ids", "rows"))
        if loaded and not self.rows.is_meta:
            self.is_set = True
