"""Configuration of one logical multi-hash embedding table."""

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Type, Union

from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.modules.mapping_shape import MappingShape
from torchrec_multihash.modules.strategies import (
    Compose,
    Operation,
    Strategy,
    StrategyName,
    parse_strategy,
    registered_strategies,
    strategy_class,
)

OPERATIONS = tuple(str(o) for o in Operation)
COMPOSITIONS = tuple(str(c) for c in Compose)
POOLINGS = (PoolingType.SUM, PoolingType.MEAN)
DEFAULT_NUM_COLLISIONS = 4  # as the original DLRM code's --qr-collisions
SIZE_FIELDS = ("num_collisions", "moduli")
MAPPING_FIELDS = ("mapping_rows", "mapping_ids", "fallback_rows")
SIZING_FIELDS = SIZE_FIELDS + MAPPING_FIELDS  # what a strategy's sizing sets (``Strategy.sized_for``)


class MultiHashConfigError(MultiHashError, ValueError):
    """A multi-hash table configuration that cannot work; the message names the table."""


# the rows' precisions a table may take, by the name configs use
ROW_PRECISIONS = {"fp32": DataType.FP32, "fp16": DataType.FP16}
# the EmbeddingBagConfig fields that describe a logical table (what converting to and from
# TorchRec's configs carries over)
LOGICAL_FIELDS = (
    "name",
    "num_embeddings",
    "embedding_dim",
    "feature_names",
    "pooling",
    "data_type",
    "weight_init_min",
    "weight_init_max",
    "init_fn",
)
# the other EmbeddingBagConfig fields, with the value a multi-hash table needs (TorchRec's default):
# pruning, positions, virtual (key-value) tables and the rest have no meaning for composed rows, so a
# config converted with another value is refused, naming the field, never silently dropped
UNSUPPORTED_FIELDS: Dict[str, Any] = {
    "num_embeddings_post_pruning": None,
    "need_pos": False,
    "input_dim": None,
    "total_num_buckets": None,
    "use_virtual_table": False,
    "virtual_table_eviction_policy": None,
    "enable_embedding_update": False,
    "stash_weights": False,
}


def logical_fields(config: EmbeddingBagConfig) -> Dict[str, Any]:
    """The logical table's fields of ``config`` (a copy of its feature names); MultiHashConfigError
    names a field set that a multi-hash table cannot carry (``UNSUPPORTED_FIELDS``)."""
    odd = {k: getattr(config, k, v) for k, v in UNSUPPORTED_FIELDS.items() if getattr(config, k, v) != v}
    if odd:
        raise MultiHashConfigError(
            f"table '{config.name}': EmbeddingBagConfig field(s) {odd} have no multi-hash equivalent; "
            f"leave them at TorchRec's defaults ({ {k: UNSUPPORTED_FIELDS[k] for k in odd} })"
        )
    fields = {k: getattr(config, k) for k in LOGICAL_FIELDS}
    fields["feature_names"] = list(config.feature_names)
    return fields


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass
class MultiHashEmbeddingBagConfig(EmbeddingBagConfig):
    """A logical embedding table of ``num_embeddings`` rows stored as several small sub-tables.

    Fields of TorchRec's ``EmbeddingBagConfig`` keep their meaning for the *logical* table
    (``num_embeddings`` ids, ``embedding_dim`` output width, ``feature_names``, ``pooling``,
    ``data_type``; ``weight_init_min/max`` give the init range of the logical table, which the
    sub-tables are scaled to reproduce; an ``init_fn``, if given, is applied to every sub-table).
    Defaults are filled in on construction, so the fields hold what the table uses.

    Args:
        strategy: a ``StrategyName`` (or its string): "full" (one table of N rows), "hash" (hashing
            trick, ``ceil(N / num_collisions)`` rows, any int64 id accepted), "qr" (quotient
            ``x // m`` and remainder ``x % m``), "generalized_qr" (mixed-radix digits with radices
            ``moduli``), "crt" (``x mod m_j`` for pairwise coprime ``moduli``) or "learned" (a
            mapping learned from data, see ``torchrec-multihash fit-hash``, sends each id to one of
            ``mapping_rows`` rows; ids it does not know hash into ``fallback_rows`` reserved rows),
            or the name of a strategy you registered (docs/strategies.md).
        operation: how the per-partition rows of one id are combined: "add", "mult" (element-wise)
            or "concat". Ignored by single-table strategies (full, hash, learned).
        num_collisions: qr: m, the rows of the remainder table; hash and learned: N / rows (default 4).
        moduli: generalized_qr: radices m1..mk with prod >= N; crt: pairwise coprime moduli, prod >= N.
        dims: concat only: one dim per partition, summing to ``embedding_dim`` (DeepRec's ``dims``);
            default: ``embedding_dim`` split as evenly as possible.
        mapping_rows: rows of the learned mapping's output. With strategy "learned" it defaults to
            ``ceil(N / num_collisions)``; set on qr, generalized_qr or crt, ids first go through a
            learned mapping into ``mapping_rows`` rows, which the partitions then split.
        mapping_ids: how many ids the learned mapping stores; default N, every id (see
            ``MappingShape`` for the layouts and their bytes, counted in ``memory_bytes()``).
        fallback_rows: rows reserved for ids the mapping does not store (or did not see when
            fitted); default 1 when it stores every id, else ``max(1, mapping_rows // 8)``. Equal
            to ``mapping_rows``: no row is reserved, unstored ids take the hashing trick's row
            ``id % mapping_rows`` and stored ids go to any row (storing none is the hashing trick).
        max_ids_per_bag: the most ids a bag of this table's features holds, if known. 1 declares the
            features one-hot (Criteo's categorical features): pooled and per-id rows are then the
            same, so a mult table is looked up pooled, like add, instead of per id (much faster;
            its sub-tables sit in the pooled EmbeddingBagCollection). Checked in eager mode with
            the ids (``validate_ids``): a bag of more ids is an error naming the feature.
        compose: how mult composes a bag: "per_id" (default; ``sum_i w_i q[x_i] * r[x_i]``, an
            id's embedding is the same in every bag) or "pooled", the original DLRM code's
            ``QREmbeddingBag``: each partition pooled first, then the pooled vectors multiplied,
            ``(sum_i w_i q[x_i]) * (sum_i w_i r[x_i])`` (per-sample weights on every partition, as
            there). The same for one-id bags (unweighted); looked up like a one-hot table, in the
            pooled EmbeddingBagCollection, for bags of any size. SUM pooling only. No effect on add,
            concat or single-table strategies, where pooling commutes with the composition.
        stack_parts: add of several partitions: store the parts as ONE TorchRec table
            (``<name>__parts``: the largest part's rows with the small parts' rows spread evenly
            among them, so that row-wise shards each hold their share of them) and look each id
            up as one bag holding its k rows, so that the table's SUM pooling is the add: one
            pooled output per bag instead of k (FBGEMM's cost is per bag). Same results and bytes.
            None (default): stacked for an add whose parts share one dim and init range; True:
            stacked (an error where it cannot be); False: the parts as separate tables, which the
            planner can place apart (e.g. a data_parallel replica of a tiny remainder table).
    """

    strategy: Union[StrategyName, str] = StrategyName.QR
    operation: Union[Operation, str] = Operation.MULT
    num_collisions: Optional[int] = None
    moduli: Optional[List[int]] = None
    dims: Optional[List[int]] = None
    mapping_rows: Optional[int] = None
    mapping_ids: Optional[int] = None
    fallback_rows: Optional[int] = None
    max_ids_per_bag: Optional[int] = None
    compose: Union[Compose, str] = Compose.PER_ID
    stack_parts: Optional[bool] = None

    def __post_init__(self) -> None:
        # Unlike EmbeddingBagConfig we keep ``init_fn`` None unless the user set one: the sub-tables'
        # default init is derived from the logical table's range (see initialization.py).
        self.validate()

    def fail(self, msg: str) -> None:
        """Raises MultiHashConfigError naming this table."""
        raise MultiHashConfigError(f"table '{self.name}': {msg}")

    def strategy_impl(self) -> Strategy:
        """The strategy object of this table: its sub-tables, partition and bytes."""
        return strategy_class(self.strategy)(self)

    def has_mapping(self) -> bool:
        """True when ids go through a learned id -> row mapping first."""
        return self.strategy == StrategyName.LEARNED or self.mapping_rows is not None

    def mapping_shape(self) -> Optional[MappingShape]:
        """The learned mapping's shape, or None for a table without one."""
        if not self.has_mapping():
            return None
        assert self.mapping_rows and self.fallback_rows and self.mapping_ids
        return MappingShape(self.num_embeddings, self.mapping_rows, self.fallback_rows, self.mapping_ids)

    def domain_name(self) -> str:
        """What the partitions split, for messages."""
        return "mapping_rows" if self.has_mapping() else "num_embeddings"

    def validate(self) -> None:
        """Checks the configuration and fills in defaults; raises MultiHashConfigError naming the
        table otherwise."""
        self._validate_logical()
        try:
            self.strategy = parse_strategy(self.strategy)
        except MultiHashError as e:
            self.fail(str(e))
        cls = strategy_class(self.strategy)
        self._validate_size_fields(cls.uses)
        self._validate_mapping_fields(cls)
        self._fill_defaults(cls.uses)
        self._validate_mapping()
        self.strategy_impl().validate()
        self._validate_dims()
        self._validate_stack_parts()

    def _validate_logical(self) -> None:
        if not self.name:
            raise MultiHashConfigError("MultiHashEmbeddingBagConfig needs a non-empty name")
        for key in ("num_embeddings", "embedding_dim"):
            if not _positive_int(getattr(self, key)):
                self.fail(f"{key} must be a positive int, got {getattr(self, key)!r}")
        if not self.feature_names:
            self.fail("feature_names is empty: name the KJT feature(s) that look up this table")
        if len(set(self.feature_names)) != len(self.feature_names):
            self.fail(f"feature_names has duplicates: {self.feature_names}")
        if self.max_ids_per_bag is not None and not _positive_int(self.max_ids_per_bag):
            self.fail(f"max_ids_per_bag must be a positive int (1: one-hot bags) or None, got {self.max_ids_per_bag!r}")
        if self.operation not in OPERATIONS:
            self.fail(f"operation must be one of {OPERATIONS}, got {self.operation!r}")
        self.operation = Operation(self.operation)
        if self.compose not in COMPOSITIONS:
            self.fail(f"compose must be one of {COMPOSITIONS}, got {self.compose!r}")
        self.compose = Compose(self.compose)
        if self.compose == "pooled" and self.pooling != PoolingType.SUM:
            self.fail(
                f"compose='pooled' multiplies pooled sums (the original DLRM QREmbeddingBag); with pooling={self.pooling} "
                "it would not be the mean of anything: use PoolingType.SUM or compose='per_id'"
            )
        if self.pooling not in POOLINGS:
            self.fail(f"pooling must be PoolingType.SUM or PoolingType.MEAN, got {self.pooling!r}")
        lo, hi = self.get_weight_init_min(), self.get_weight_init_max()
        if hi < lo:
            self.fail(f"weight_init_max={hi} is below weight_init_min={lo}")

    def _validate_size_fields(self, uses: tuple) -> None:
        for key in SIZE_FIELDS:
            if getattr(self, key) is not None and key not in uses:
                takers = [n for n in registered_strategies() if key in strategy_class(n).uses]
                self.fail(f"{key} is not used by strategy '{self.strategy}' (it is for {', '.join(takers)}); remove it")
        if self.num_collisions is not None and not _positive_int(self.num_collisions):
            self.fail(f"num_collisions must be an int >= 1, got {self.num_collisions!r}")

    def _validate_mapping_fields(self, cls: Type[Strategy]) -> None:
        for key in MAPPING_FIELDS:
            v = getattr(self, key)
            if v is not None and not _positive_int(v):
                self.fail(f"{key} must be a positive int, got {v!r}")
        used = [k for k in MAPPING_FIELDS if getattr(self, k) is not None]
        if used and not self.has_mapping():
            follow = [n for n in registered_strategies() if strategy_class(n).follows_mapping]
            self.fail(f"{used} only apply to a learned mapping: use strategy 'learned', or set mapping_rows on one of {follow}")
        if self.mapping_rows is not None and self.strategy != StrategyName.LEARNED and not cls.follows_mapping:
            self.fail(f"mapping_rows cannot be combined with strategy '{self.strategy}'")

    def _fill_defaults(self, uses: tuple) -> None:
        if "num_collisions" in uses and self.num_collisions is None:
            self.num_collisions = DEFAULT_NUM_COLLISIONS
        if not self.has_mapping():
            return
        if self.mapping_rows is None:
            assert self.num_collisions is not None
            self.mapping_rows = -(-self.num_embeddings // self.num_collisions)
        if self.mapping_ids is None:
            self.mapping_ids = self.num_embeddings
        if self.fallback_rows is None:
            # dense: ids unseen when fitting share one "unknown" row (as a vocabulary's
            # out-of-vocabulary id); sparse: the many unstored ids need more
            dense = self.mapping_ids == self.num_embeddings
            self.fallback_rows = 1 if dense else max(1, self.mapping_rows // 8)

    def _validate_mapping(self) -> None:
        shape = self.mapping_shape()
        if shape is None:
            return
        if shape.rows < 2:
            self.fail(f"a learned mapping needs at least 2 rows (one for unknown ids), got {shape.rows}")
        if shape.fallback_rows > shape.rows:
            self.fail(f"fallback_rows={shape.fallback_rows} exceeds mapping_rows={shape.rows} (equal: unstored ids hash over every row)")
        if shape.mapping_ids > self.num_embeddings:
            self.fail(f"mapping_ids={shape.mapping_ids} exceeds num_embeddings={self.num_embeddings}")

    def _validate_dims(self) -> None:
        if self.dims is None:
            return
        impl = self.strategy_impl()
        if self.operation != "concat" or not impl.is_composed():
            self.fail(
                "dims is only used with operation='concat' on a multi-partition strategy "
                f"(got strategy='{self.strategy}', operation='{self.operation}')"
            )
        k = impl.num_partitions()
        if len(self.dims) != k:
            self.fail(f"dims {self.dims} has {len(self.dims)} entries but strategy '{self.strategy}' has {k} partitions")
        if any(not _positive_int(d) for d in self.dims):
            self.fail(f"dims must be positive ints, got {self.dims}")
        if sum(self.dims) != self.embedding_dim:
            self.fail(f"concat dims {self.dims} add up to {sum(self.dims)}, not embedding_dim={self.embedding_dim}")

    def _validate_stack_parts(self) -> None:
        if self.stack_parts is not None and not isinstance(self.stack_parts, bool):
            self.fail(f"stack_parts must be a bool or None (stacked where it can be), got {self.stack_parts!r}")
        if not self.stack_parts:
            return
        if self.operation != "add" or not self.strategy_impl().is_composed():
            self.fail(
                "stack_parts=True stores the parts of an add in one table (its pooling adds them): it needs "
                f"operation='add' on a multi-partition strategy, got strategy='{self.strategy}', operation='{self.operation}'"
            )


# the fields a multi-hash table adds to TorchRec's EmbeddingBagConfig (strategy, operation, sizes, ...): what
# the converter's overrides may set
TABLE_FIELDS = tuple(f.name for f in dataclasses.fields(MultiHashEmbeddingBagConfig) if f.name not in EmbeddingBagConfig.__dataclass_fields__)
