"""Planner constraints on sub-tables, derived from constraints on logical tables."""

import warnings
from dataclasses import replace
from typing import Dict, Iterable, List, Optional, Sequence

from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType

from torchrec_multihash.modules.config import MultiHashEmbeddingBagConfig

# Sub-tables at most this many rows (a Q-R remainder table, small CRT moduli) are tiny and hot:
# every id reads one of their rows. Splitting them buys nothing; keep them whole or replicate them.
DEFAULT_SMALL_TABLE_ROWS = 10_000
DEFAULT_SMALL_TABLE_SHARDING_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.DATA_PARALLEL.value)

# Sharding types for the per-id lookups of mult tables (a TorchRec EmbeddingCollection), and the
# closest one for those it lacks. Its sharder also offers data_parallel, but in torchrec 1.8 a
# data-parallel EmbeddingCollection returns rows of the wrong ids (seen on CPU/gloo: values split
# as if batch-major; tests/test_sharded.py caught it), so those tables go table-wise instead.
_PER_ID_TYPES = [
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.ROW_WISE.value,
]
_PER_ID_FALLBACK = {
    ShardingType.DATA_PARALLEL.value: ShardingType.TABLE_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value: ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_ROW_WISE.value: ShardingType.ROW_WISE.value,
    ShardingType.GRID_SHARD.value: ShardingType.ROW_WISE.value,
}


def _fit_per_id(types: List[str], where: str) -> List[str]:
    kept = [t for t in types if t in _PER_ID_TYPES]
    if kept:
        return kept
    mapped = sorted({_PER_ID_FALLBACK.get(t, ShardingType.TABLE_WISE.value) for t in types})
    warnings.warn(
        f"{where}: sharding types {types} are not offered for per-id (mult) lookups, which TorchRec's EmbeddingCollection holds; using {mapped}",
        stacklevel=3,
    )
    return mapped


def _check_sharding_types(constraints: Dict[str, ParameterConstraints]) -> None:
    """Raises ValueError for a sharding type TorchRec does not know (the planner would drop the table's options)."""
    known = [t.value for t in ShardingType]
    for name, c in constraints.items():
        unknown = [t for t in c.sharding_types or [] if t not in known]
        if unknown:
            raise ValueError(f"table '{name}': unknown sharding type(s) {unknown}; TorchRec's are {known}")


def sub_table_constraints(
    tables: Sequence[MultiHashEmbeddingBagConfig],
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
    small_table_rows: int = DEFAULT_SMALL_TABLE_ROWS,
    small_table_sharding_types: Optional[Iterable[str]] = DEFAULT_SMALL_TABLE_SHARDING_TYPES,
) -> Dict[str, ParameterConstraints]:
    """Turns constraints keyed by logical table ("t_C1 must be row-wise") into constraints keyed
    by sub-table (``t_C1``, ``t_C1__r``), the names the planner sees.

    - A logical table's constraint applies to each of its sub-tables.
    - Sub-tables of at most ``small_table_rows`` rows get ``small_table_sharding_types``
      (default: table-wise or data-parallel, never split); pass None to leave them alone.
    - A constraint keyed by a sub-table name is taken as is and wins over both.
    - Sharding types an EmbeddingCollection lacks (mult tables) map to the closest it has.
    """
    constraints = dict(constraints or {})
    by_sub = {s.name: t for t in tables for s in t.strategy_impl().sub_tables()}
    unknown = set(constraints) - {t.name for t in tables} - set(by_sub)
    if unknown:
        raise ValueError(
            f"constraints name unknown table(s) {sorted(unknown)}; known logical tables: {[t.name for t in tables]}, sub-tables: {sorted(by_sub)}"
        )
    _check_sharding_types(constraints)
    out: Dict[str, ParameterConstraints] = {}
    for t in tables:
        impl = t.strategy_impl()
        for sub_table in impl.sub_tables():
            sub = sub_table.name
            if sub in constraints and sub != t.name:
                out[sub] = constraints[sub]
                continue
            c = replace(constraints[t.name]) if t.name in constraints else None
            if small_table_sharding_types is not None and impl.is_composed() and sub_table.num_embeddings <= small_table_rows:
                c = c or ParameterConstraints()
                c.sharding_types = list(small_table_sharding_types)
            if impl.looks_up_per_id():
                c = c or ParameterConstraints(sharding_types=list(_PER_ID_TYPES))
                c.sharding_types = _fit_per_id(list(c.sharding_types or _PER_ID_TYPES), f"table '{t.name}'")
            if c is not None:
                out[sub] = c
    return out
