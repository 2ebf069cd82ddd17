"""TorchRec's MCH remapper as a baseline: an EmbeddingBagCollection-like module whose large tables
are a ``ManagedCollisionEmbeddingBagCollection`` (``MCHManagedCollisionModule`` per table, LFU or
distance-LFU eviction), sized to the same bytes as the multi-hash strategies.

An MCH table of ``rows`` rows keeps, besides its ``rows x dim`` weights, the remapper's state:
per row the sorted raw ids, the slot of each and the eviction policy's metadata (int64 each: 24
bytes a row with LFU, 32 with distance-LFU), and a fixed part per table (its output segments and
iteration counter, about 8 KiB). ``state_cost`` measures both from the module's state dict. Sized
by ``"bytes"`` the rows and the state together fit in ``N x dim x 4 / compression``; by
``"rows"`` the table gets ``ceil(N / compression)`` rows, as the hashing trick, and the state comes
on top. Slot ``rows - 1`` takes every id the remapper does not hold (as TorchRec's module does);
ids get slots at the remapper's evictions, every ``eviction_interval`` training steps.

Tables of at most ``threshold`` rows stay full, in a plain EmbeddingBagCollection, as with the
other strategies. One rank only in this project's app (``bench/mch_sharding.py``).
"""

import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHEvictionPolicy,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_multihash.modules.config import MultiHashConfigError
from torchrec_multihash.modules.convert import DEFAULT_THRESHOLD

EVICTIONS = ("lfu", "distance_lfu")
SIZINGS = ("bytes", "rows")
MIN_ROWS = 2  # one slot for held ids, one for the rest


def eviction_policy(name: str) -> MCHEvictionPolicy:
    """TorchRec's eviction policy called ``name`` (lfu | distance_lfu)."""
    if name == "lfu":
        return LFU_EvictionPolicy()
    if name == "distance_lfu":
        return DistanceLFU_EvictionPolicy()
    raise MultiHashConfigError(f"MCH eviction must be one of {list(EVICTIONS)}, got {name!r}")


def remapper(rows: int, eviction: str, eviction_interval: int, device: torch.device, name: Optional[str] = None) -> MCHManagedCollisionModule:
    """One table's MCH remapper: raw ids -> ``rows`` slots."""
    return MCHManagedCollisionModule(
        zch_size=rows, device=device, eviction_policy=eviction_policy(eviction), eviction_interval=eviction_interval, name=name
    )


def state_bytes(rows: int, eviction: str) -> int:
    """Bytes of the state dict of a remapper of ``rows`` slots (built on the meta device)."""
    m = remapper(rows, eviction, 1, torch.device("meta"))
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


@functools.lru_cache(maxsize=None)
def state_cost(eviction: str) -> Tuple[int, int]:
    """(bytes per row, fixed bytes per table) of the remapper's state, measured."""
    one, two = state_bytes(1, eviction), state_bytes(2, eviction)
    return two - one, one - (two - one)


def mch_rows(num_embeddings: int, dim: int, compression: float, eviction: str, sizing: str = "bytes", weight_bytes: int = 4) -> int:
    """Rows of an MCH table for a logical table of ``num_embeddings x dim`` at ``compression``."""
    if sizing == "rows":
        rows = math.ceil(num_embeddings / compression)
    elif sizing == "bytes":
        per_row, fixed = state_cost(eviction)
        rows = math.floor((num_embeddings * dim * weight_bytes / compression - fixed) / (dim * weight_bytes + per_row))
    else:
        raise MultiHashConfigError(f"MCH sizing must be one of {list(SIZINGS)}, got {sizing!r}")
    return max(MIN_ROWS, rows)


@dataclass(frozen=True)
class MCHTable:
    """What one logical table became: its rows and bytes (rows 0: kept full)."""

    name: str
    num_embeddings: int
    rows: int
    weight_bytes: int
    state_bytes: int


@torch.fx.wrap
def _regroup(kts: List[KeyedTensor], keys: List[str], dims: List[int]) -> KeyedTensor:
    """The pooled outputs of ``kts`` as one KeyedTensor with ``keys`` in that order."""
    if len(kts) == 1 and kts[0].keys() == keys:
        return kts[0]
    values = KeyedTensor.regroup(kts, [keys])[0]
    return KeyedTensor(keys=keys, length_per_key=dims, values=values)


class MCHEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """Logical tables (plain ``EmbeddingBagConfig``) as TorchRec MCH tables: KJT in, KeyedTensor
    out keyed by feature, as ``EmbeddingBagCollection`` (a drop-in for DLRM's sparse arch).

    Args:
        tables: the logical tables (their ``num_embeddings`` is the id range).
        compression: memory reduction of each table over ``threshold`` rows.
        eviction: "lfu" or "distance_lfu".
        eviction_interval: training steps between the remapper's admissions and evictions.
        sizing: "bytes" (rows and remapper state within the budget) or "rows" (N / compression rows).
        threshold: tables of at most this many rows stay full.
        device: where the tables live ("meta" for deferred init under DMP).
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        compression: float,
        eviction: str = "lfu",
        eviction_interval: int = 1,
        sizing: str = "bytes",
        threshold: int = DEFAULT_THRESHOLD,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if not tables:
            raise MultiHashConfigError("MCHEmbeddingBagCollection needs at least one table")
        eviction_policy(eviction)  # a clear error for a bad name, before anything is built
        if eviction_interval < 1:
            raise MultiHashConfigError(f"MCH eviction_interval must be >= 1, got {eviction_interval}")
        device = torch.device(device) if device is not None else torch.get_default_device()
        self._device = device
        self._logical = list(tables)
        self._keys = [f for t in tables for f in t.feature_names]
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        self._tables: List[MCHTable] = []
        managed: List[EmbeddingBagConfig] = []
        full: List[EmbeddingBagConfig] = []
        remappers: Dict[str, MCHManagedCollisionModule] = {}
        for t in tables:
            bytes_per_value = DATA_TYPE_NUM_BITS[t.data_type] // 8
            if t.num_embeddings <= threshold:
                full.append(t)
                self._tables.append(MCHTable(t.name, t.num_embeddings, 0, t.num_embeddings * t.embedding_dim * bytes_per_value, 0))
                continue
            rows = mch_rows(t.num_embeddings, t.embedding_dim, compression, eviction, sizing, bytes_per_value)
            managed.append(
                EmbeddingBagConfig(
                    name=t.name,
                    num_embeddings=rows,
                    embedding_dim=t.embedding_dim,
                    feature_names=list(t.feature_names),
                    pooling=t.pooling,
                    data_type=t.data_type,
                    # the logical table's init range, as the hashing trick's table (evicted rows are drawn again from it)
                    weight_init_min=t.get_weight_init_min(),
                    weight_init_max=t.get_weight_init_max(),
                )
            )
            remappers[t.name] = remapper(rows, eviction, eviction_interval, device, name=t.name)
            self._tables.append(MCHTable(t.name, t.num_embeddings, rows, rows * t.embedding_dim * bytes_per_value, state_bytes(rows, eviction)))
        self.mch: Optional[ManagedCollisionEmbeddingBagCollection] = None
        self.full: Optional[EmbeddingBagCollection] = None
        if managed:
            ebc = EmbeddingBagCollection(tables=managed, device=device)
            self.mch = ManagedCollisionEmbeddingBagCollection(ebc, ManagedCollisionCollection(remappers, managed))
        if full:
            self.full = EmbeddingBagCollection(tables=full, device=device)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        kts: List[KeyedTensor] = []
        if self.mch is not None:
            kts.append(self.mch(features)[0])
        if self.full is not None:
            kts.append(self.full(features))
        return _regroup(kts, self._keys, self._dims)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The logical tables (what DLRM reads its dims and features from)."""
        return list(self._logical)

    def tables(self) -> List[MCHTable]:
        """Each logical table's rows and bytes."""
        return list(self._tables)

    def is_weighted(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return self._device

    def memory_bytes(self) -> int:
        """Bytes of the tables' weights and the remappers' state (their state dicts)."""
        return sum(t.weight_bytes + t.state_bytes for t in self._tables)

    def full_memory_bytes(self) -> int:
        """Bytes the same logical tables would take uncompressed (N x D each)."""
        return sum(t.num_embeddings * t.embedding_dim * DATA_TYPE_NUM_BITS[t.data_type] // 8 for t in self._logical)
