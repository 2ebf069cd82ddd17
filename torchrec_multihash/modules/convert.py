"""Turns TorchRec EmbeddingBagConfigs into multi-hash configs at a target memory reduction."""

import difflib
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, DataType, EmbeddingBagConfig

from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.modules.config import (
    LOGICAL_FIELDS,
    OPERATIONS,
    SIZING_FIELDS,
    MultiHashConfigError,
    MultiHashEmbeddingBagConfig,
    logical_fields,
)
from torchrec_multihash.modules.strategies import TOLERANCE, Sizing, StrategyName, parse_strategy, strategy_class

# tables with at most this many rows stay full, as in the original DLRM code (--qr-threshold)
DEFAULT_THRESHOLD = 200


def _check_arguments(strategy: Union[str, StrategyName], operation: str, compression: float) -> Union[StrategyName, str]:
    try:
        name = parse_strategy(strategy)
    except MultiHashError as e:
        raise MultiHashConfigError(str(e)) from None
    if operation not in OPERATIONS:
        raise MultiHashConfigError(f"operation must be one of {OPERATIONS}, got {operation!r}")
    if isinstance(compression, bool) or not compression >= 1:
        raise MultiHashConfigError(f"compression must be >= 1, got {compression!r}")
    return name


def check_overrides(overrides: Mapping[str, Mapping[str, Any]], tables: Sequence[str]) -> None:
    """Refuses overrides of tables not in ``tables`` (naming the closest ones and the tables there
    are), of the logical table's fields (they come from the converted config), and of no field."""
    unknown = [name for name in overrides if name not in tables]
    if unknown:
        close = [m for name in unknown for m in difflib.get_close_matches(name, tables, n=1)]
        hint = f" (did you mean {', '.join(repr(m) for m in close)}?)" if close else ""
        raise MultiHashConfigError(f"overrides name unknown table(s) {sorted(unknown)}{hint}; the tables are {list(tables)}")
    fields = MultiHashEmbeddingBagConfig.__dataclass_fields__
    for name, own in overrides.items():
        logical = [k for k in own if k in LOGICAL_FIELDS]
        if logical:
            raise MultiHashConfigError(
                f"the override of table '{name}' sets {logical}: the logical table's, which come from the config converted; set them there"
            )
        bad = [k for k in own if k not in fields]
        if bad:
            raise MultiHashConfigError(f"the override of table '{name}' sets {bad}, which are not MultiHashEmbeddingBagConfig fields")


def _override_sizing(
    c: EmbeddingBagConfig, own: Mapping[str, Any], compression: float, operation: str, num_partitions: Optional[int]
) -> Optional[Tuple[Union[StrategyName, str], Sizing]]:
    """The strategy the override of table ``c`` names, sized for ``compression`` (None: full)."""
    try:
        name = parse_strategy(own["strategy"])
    except MultiHashError as e:
        raise MultiHashConfigError(f"table '{c.name}': {e}") from None
    cls = strategy_class(name)
    k = cls.default_partitions if num_partitions is None else num_partitions
    try:
        cls.check_num_partitions(k)
    except ValueError as e:
        size = f"give its size in the override ({', '.join(cls.uses)})" if cls.uses else "leave num_partitions out"
        raise MultiHashConfigError(f"table '{c.name}': num_partitions={k} does not suit the strategy its override names: {e}; {size}") from None
    if name == StrategyName.FULL:
        return None
    return name, cls.sized_for(c.num_embeddings, c.embedding_dim, compression, own.get("operation", operation), k)


def _rows_compression(compression: float, data_type: Optional[DataType], strategy: str) -> float:
    """How many times fewer rows a table gets: ``compression`` less what rows of ``data_type`` save."""
    if data_type is None:
        return compression
    ratio = 32 / DATA_TYPE_NUM_BITS[data_type]
    if compression < ratio and strategy != StrategyName.FULL:
        raise MultiHashConfigError(
            f"compression {compression:g} with {data_type.name} rows: those rows alone make a table {ratio:g}x smaller than in fp32; "
            f"give a compression of at least {ratio:g}"
        )
    return max(1.0, compression / ratio)


def _larger_than_full(c: EmbeddingBagConfig, own: Mapping[str, object], converted: MultiHashEmbeddingBagConfig) -> List[str]:
    """``[what is wrong]`` if the sizes an override gave make ``converted`` larger than ``c`` full."""
    mine = converted.strategy_impl().memory_bytes()
    full = MultiHashEmbeddingBagConfig(**logical_fields(c), strategy=StrategyName.FULL).strategy_impl().memory_bytes()
    if mine <= full:
        return []
    given = ", ".join(f"{k}={own[k]}" for k in SIZING_FIELDS if k in own)
    return [f"{c.name} ({converted.strategy}, {given}): {mine:,} bytes against {full:,} for the full table"]


def to_multihash_configs(
    configs: Sequence[EmbeddingBagConfig],
    compression: float,
    strategy: Union[str, StrategyName] = StrategyName.QR,
    operation: str = "mult",
    threshold: int = DEFAULT_THRESHOLD,
    num_partitions: Optional[int] = None,
    overrides: Optional[Dict[str, Dict[str, object]]] = None,
    strict: bool = False,
    data_type: Optional[DataType] = None,
) -> List[MultiHashEmbeddingBagConfig]:
    """Converts TorchRec configs to multi-hash configs that shrink each table by ``compression``.

    ``data_type`` (e.g. ``DataType.FP16``) gives every table rows of that type, sized so that its
    bytes are ``compression`` times below the same table in fp32: fp16 rows take half the bytes, so
    the tables shrink half as much in rows (``compression`` 2: full tables in fp16). Without it each
    table keeps its config's type and shrinks ``compression`` times in rows.

    Tables with at most ``threshold`` rows stay full. ``overrides`` maps a table name to
    MultiHashEmbeddingBagConfig fields that replace the chosen ones: an override naming a strategy
    gets that strategy sized for ``compression`` (whatever the table's rows), with its ``operation``
    if it gives one; an override giving a size field (``num_collisions``, ``moduli``, ``mapping_rows``,
    ``mapping_ids``, ``fallback_rows``) sizes the table itself: none of the chosen size fields is
    kept. A table the strategy cannot shrink enough gets the strategy's smallest configuration and a
    warning (an error if ``strict``).

    Example: ``MultiHashEmbeddingBagCollection(to_multihash_configs(ebc_configs, compression=4))``
    """
    name = _check_arguments(strategy, operation, compression)
    cls = strategy_class(name)
    rows_compression = _rows_compression(compression, data_type, name)
    overrides = dict(overrides or {})
    check_overrides(overrides, [c.name for c in configs])
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise MultiHashConfigError(f"threshold must be an int (rows), got {threshold!r}")
    k = cls.default_partitions if num_partitions is None else num_partitions
    try:
        cls.check_num_partitions(k)
    except ValueError as e:
        raise MultiHashConfigError(str(e)) from None
    out: List[MultiHashEmbeddingBagConfig] = []
    short: List[str] = []
    larger: List[str] = []  # tables an override's sizes make larger than full
    for c in configs:
        own = overrides.get(c.name, {})
        fields: Dict[str, Any] = dict(strategy=StrategyName.FULL, operation=operation)
        sized: Optional[Tuple[Union[StrategyName, str], Sizing]] = None
        if any(key in own for key in SIZING_FIELDS):  # sized by the user: the config's strategy unless it names one
            fields.update(strategy=name)
        elif "strategy" in own:
            sized = _override_sizing(c, own, rows_compression, operation, num_partitions)
        elif name != StrategyName.FULL and c.num_embeddings > threshold and rows_compression > 1:
            sized = (name, cls.sized_for(c.num_embeddings, c.embedding_dim, rows_compression, str(own.get("operation", operation)), k))
        if sized is not None:
            table_strategy, s = sized
            if s.factor * (1 + TOLERANCE) < rows_compression * (1 - 1e-9):
                short.append(f"{c.name} (N={c.num_embeddings}{'' if table_strategy == name else f', {table_strategy}'}): {s.factor:.2f}x")
            fields.update(strategy=table_strategy, **s.fields)
        fields.update(own)
        logical = logical_fields(c)
        if data_type is not None:
            logical["data_type"] = data_type
        out.append(MultiHashEmbeddingBagConfig(**logical, **fields))
        if any(key in own for key in SIZING_FIELDS):
            larger += _larger_than_full(c, own, out[-1])
    if larger:
        warnings.warn(f"the sizes an override gives make these tables larger than uncompressed: {'; '.join(larger)}", stacklevel=2)
    if short:
        msg = (
            f"strategy '{name}' (or the one a table's override names) cannot shrink these tables {compression}x"
            f"{'' if rows_compression == compression else f' ({rows_compression:g}x in rows)'}; "
            f"they use its smallest configuration instead: {', '.join(short)}"
        )
        if strict:
            raise MultiHashConfigError(msg)
        warnings.warn(msg, stacklevel=2)
    return out


def adds_parts(t: MultiHashEmbeddingBagConfig) -> bool:
    """Whether ``t`` adds several partitions: what ``stack_parts`` can store as one table."""
    return t.operation == "add" and t.strategy_impl().is_composed()


def stack_add_tables(tables: List[MultiHashEmbeddingBagConfig], keep: Sequence[str] = ()) -> List[MultiHashEmbeddingBagConfig]:
    """Sets ``stack_parts`` on every table that adds several partitions (its parts stored as one
    table), except those named in ``keep``; the others are left as they are (mult, concat, tables
    kept full). Warns when no table is stacked."""
    for t in tables:
        if t.name not in keep and adds_parts(t):
            t.stack_parts = True
            t.validate()
    if not any(t.stack_parts for t in tables):
        warnings.warn(
            "stack_add_tables: no table adds several partitions (operation add on a multi-partition strategy), "
            "so no table is stacked: it changes nothing here",
            stacklevel=2,
        )
    return tables
