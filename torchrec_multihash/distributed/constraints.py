"""Planner constraints on sub-tables, derived from constraints on logical tables."""

from dataclasses import replace
from typing import Dict, Iterable, List, Optional, Sequence

from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import DataType

from torchrec_multihash.modules.config import MultiHashEmbeddingBagConfig
from torchrec_multihash.modules.multihash_embedding_bag import MultiHashEmbeddingBagCollection
from torchrec_multihash.modules.strategies import stacked_table_name

# Sub-tables at most this many rows (a Q-R remainder table, small CRT moduli) are tiny and hot:
# every id reads one of their rows. Splitting them buys nothing; keep them whole.
DEFAULT_SMALL_TABLE_ROWS = 10_000
DEFAULT_SMALL_TABLE_SHARDING_TYPES = (ShardingType.TABLE_WISE.value,)
# Every sharding type but data_parallel. A data_parallel table is a dense parameter, which the fused
# optimizer that trains the sharded tables leaves to the dense layers' optimizer: the parts of one
# logical table would be trained by two optimizers at two learning rates (docs/benchmarks.md, issue 26:
# on one data set that cost Q-R 0.004 AUC at 8x, on MovieLens it gained 0.004). Only a constraint
# that names data_parallel, or data_parallel=True, replicates a table.
SHARDED_TYPES = tuple(t.value for t in ShardingType if t != ShardingType.DATA_PARALLEL)


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
    data_parallel: bool = False,
) -> Dict[str, ParameterConstraints]:
    """Turns constraints keyed by logical table ("t_C1 must be row-wise") into constraints keyed
    by sub-table (``t_C1``, ``t_C1__r``), the names the planner sees.

    - A logical table's constraint applies to each of its sub-tables.
    - Sub-tables of a composed table with at most ``small_table_rows`` rows get
      ``small_table_sharding_types`` (default: table-wise, never split); pass None to leave them alone.
    - No table is replicated (``data_parallel``) unless a constraint lists data_parallel or
      ``data_parallel`` is True (then small fp32 sub-tables may be too; never fp16 ones, whose
      replicas the dense optimizer would train in fp16): every table then stays with the fused optimizer that
      ``sharders(fused_params=...)`` gives the sharded tables (a replica would be trained by the
      dense layers' optimizer instead, unlike the other parts of its table).
    - A constraint keyed by a sub-table name is taken as is and wins over all of these.
    - A table with stacked parts has one sub-table, ``<table>__parts`` (its rows: all the
      parts'); a constraint keyed by one of its parts' names is an error naming it.
    """
    constraints = dict(constraints or {})
    by_sub = {s.name: t for t in tables for s in t.strategy_impl().stored_tables()}
    stacked_parts = {s.name: t for t in tables if t.strategy_impl().is_stacked() for s in t.strategy_impl().sub_tables()}
    for name in sorted(set(constraints) & set(stacked_parts) - {t.name for t in tables}):
        t = stacked_parts[name]
        raise ValueError(
            f"constraints name '{name}', a part of table '{t.name}', whose parts are stacked in one table (stack_parts): "
            f"constrain '{stacked_table_name(t.name)}' (or '{t.name}') instead"
        )
    unknown = set(constraints) - {t.name for t in tables} - set(by_sub)
    if unknown:
        raise ValueError(
            f"constraints name unknown table(s) {sorted(unknown)}; known logical tables: {[t.name for t in tables]}, sub-tables: {sorted(by_sub)}"
        )
    _check_sharding_types(constraints)
    out: Dict[str, ParameterConstraints] = {}
    for t in tables:
        impl = t.strategy_impl()
        for sub_table in impl.stored_tables():
            sub = sub_table.name
            if sub in constraints and sub != t.name:
                out[sub] = constraints[sub]
                continue
            c = replace(constraints[t.name]) if t.name in constraints else ParameterConstraints()
            asked = c.sharding_types is not None
            # a replica of fp16 rows would be trained by the dense optimizer in fp16 (its state underflows: NaN)
            replicate = data_parallel and t.data_type == DataType.FP32
            if small_table_sharding_types is not None and impl.is_composed() and sub_table.num_embeddings <= small_table_rows:
                c.sharding_types = list(small_table_sharding_types)
                if replicate and ShardingType.DATA_PARALLEL.value not in c.sharding_types:
                    c.sharding_types.append(ShardingType.DATA_PARALLEL.value)
            elif not asked and not replicate:
                c.sharding_types = list(SHARDED_TYPES)
            out[sub] = c
    return out


def model_constraints(model: nn.Module, data_parallel: bool = False) -> Dict[str, ParameterConstraints]:
    """``sub_table_constraints`` for every MultiHashEmbeddingBagCollection in ``model``: the
    constraints ``shard_model`` and ``plan_model`` use when given none."""
    tables: List[MultiHashEmbeddingBagConfig] = []
    for m in model.modules():
        if isinstance(m, MultiHashEmbeddingBagCollection):
            tables += m.multihash_configs()
    return sub_table_constraints(tables, data_parallel=data_parallel) if tables else {}
