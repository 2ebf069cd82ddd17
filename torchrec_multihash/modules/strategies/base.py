"""The interface every strategy implements: how a logical table is stored as sub-tables and how
an id finds its row in each."""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, NamedTuple, Optional, Protocol, Tuple

import torch
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, DataType

from torchrec_multihash.modules.initialization import composed_init_ranges
from torchrec_multihash.modules.mapping_shape import MappingShape

# a table may miss a converter's target factor by this much (Q-R with m = 4 is ~4x, not 5x)
TOLERANCE = 0.02


def sub_table_name(table: str, suffix: str) -> str:
    """The name of a sub-table (``t_C1`` + ``__r``): what the planner and checkpoints see."""
    return table + suffix


STACKED_SUFFIX = "__parts"


def stacked_table_name(table: str) -> str:
    """The name of the one table that holds a stacked table's parts (``t_C1__parts``)."""
    return sub_table_name(table, STACKED_SUFFIX)


class StackedRows(NamedTuple):
    """Where a part's rows lie in its stacked table: row ``r`` at ``(r * mul + add) // div + r +
    shift``."""

    mul: int
    add: int
    div: int
    shift: int


def place_rows(r: torch.Tensor, mul: int, add: int, div: int, shift: int) -> torch.Tensor:
    """Rows ``r`` of a part moved to its rows of the stacked table (``StackedRows``' fields)."""
    return torch.div(r * mul + add, div, rounding_mode="floor") + r + shift


def stacked_part_rows(placed: StackedRows, rows: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The rows of the stacked table that hold a part's ``rows`` rows, in order."""
    return place_rows(torch.arange(rows, device=device), *placed)


def stacked_rows(sizes: List[int]) -> List[StackedRows]:
    """Each part's rows in the stacked table of parts of ``sizes`` rows: the largest part's ``n``
    rows in order, and the other parts' ``s`` rows, one part after another, spread evenly among
    them (small row ``u`` after the first ``(u + 1) * n // s`` large rows), so that row-wise
    sharding, which cuts the table into equal runs of rows, gives every shard its share of the
    small parts' rows, each read by every id, instead of putting them all on the last shard."""
    big = sizes.index(max(sizes))
    n, s = sizes[big], sum(sizes) - sizes[big]
    placed: List[StackedRows] = []
    before = 0  # small rows of the parts before this one
    for i, rows in enumerate(sizes):
        if i == big:  # large row a after the (a + 1) * s // n - ... small rows: ((a + 1) * s - 1) // n
            placed.append(StackedRows(s, s - 1, n, 0))
            continue
        placed.append(StackedRows(n, (before + 1) * n, s, before))  # small row u = before + r at (u + 1) * n // s + u
        before += rows
    return placed


def sub_feature_name(feature: str, suffix: str, table: Optional[str] = None) -> str:
    """The KJT key a sub-table is looked up with (``C1`` + ``__r``); ``table`` is given for a
    feature that several tables look up (``C1@t_a__r``)."""
    return (feature if table is None else f"{feature}@{table}") + suffix


@dataclass(frozen=True)
class SubTable:
    """One physical sub-table of a logical table."""

    name: str  # the sub-table's name, e.g. t_C1__r
    suffix: str  # what it appends to the table's and features' names, e.g. __r
    num_embeddings: int
    embedding_dim: int
    init_range: Tuple[float, float]  # uniform [min, max] of its initial weights


@dataclass
class Sizing:
    """Config fields a strategy chose to shrink a table, and the reduction they give."""

    fields: Dict[str, Any] = field(default_factory=dict)
    factor: float = 1.0


class TableSettings(Protocol):
    """What a strategy reads of its logical table: a ``MultiHashEmbeddingBagConfig``'s fields."""

    name: str
    num_embeddings: int
    embedding_dim: int
    data_type: DataType
    operation: str
    compose: str
    num_collisions: Optional[int]
    moduli: Optional[List[int]]
    dims: Optional[List[int]]
    mapping_rows: Optional[int]
    max_ids_per_bag: Optional[int]
    stack_parts: Optional[bool]

    def fail(self, msg: str) -> None: ...

    def mapping_shape(self) -> Optional[MappingShape]: ...

    def domain_name(self) -> str: ...

    def get_weight_init_min(self) -> float: ...

    def get_weight_init_max(self) -> float: ...


class Strategy(ABC):
    """How one logical table (a ``MultiHashEmbeddingBagConfig``) is split into sub-tables.

    A subclass gives the sub-table sizes and names and the id -> row partition; the rest (dims,
    init ranges, bytes, per-id lookups) follows from them and the table's operation. Register a
    subclass with ``@register(name)`` (``strategies/registry.py``).
    """

    name: ClassVar[str]  # set by ``@register``
    uses: ClassVar[Tuple[str, ...]] = ()  # the size fields it reads: "num_collisions", "moduli"
    accepts_any_id: ClassVar[bool] = False  # True: any int64 id is valid, not only [0, N)
    follows_mapping: ClassVar[bool] = False  # a learned mapping may come first (mapping_rows)
    default_partitions: ClassVar[int] = 1  # for the converter
    compresses: ClassVar[bool] = True  # False: a table of N rows (full), which auto offers as its baseline

    def __init__(self, config: TableSettings) -> None:
        self.config = config

    @property
    def domain(self) -> int:
        """The index space the partitions split: a learned table's mapped rows, else its ids."""
        c = self.config
        return c.mapping_rows if c.mapping_rows is not None else c.num_embeddings

    @abstractmethod
    def sizes(self) -> List[int]:
        """Rows of each sub-table, in partition order."""

    @abstractmethod
    def suffixes(self) -> List[str]:
        """Suffix of each sub-table's and sub-feature's name: ``""`` for the main (largest)
        partition, which so carries the logical table's name, as TorchRec's planner constraints
        and plans name it; ``__r``, ``__p0``, ... for the others."""

    @abstractmethod
    def partition_spec(self) -> List[Tuple[int, int]]:
        """``(divisor, modulus)`` of each sub-table: an id's row is ``(x // divisor) % modulus``
        (modulus 0: no remainder). Plain integers, so the id transform stays traceable and
        scriptable."""

    def partition(self, ids: torch.Tensor) -> List[torch.Tensor]:
        """Row of each sub-table for int64 ``ids`` (integer arithmetic only)."""
        return [partition_rows(ids, d, m) for d, m in self.partition_spec()]

    @classmethod
    @abstractmethod
    def sized_for(cls, num_embeddings: int, dim: int, compression: float, operation: str, num_partitions: int) -> Sizing:
        """The smallest configuration within ``1 / compression`` of ``N x dim`` (``TOLERANCE``
        allowed), or the smallest it has when none is (its ``factor`` says what it reaches)."""

    @classmethod
    def check_num_partitions(cls, k: int) -> None:
        """Raises ValueError if the strategy cannot have ``k`` partitions (single-table
        strategies ignore ``k``)."""
        return None

    def validate(self) -> None:
        """Checks the strategy's own fields; ``self.config.fail(msg)`` on a problem."""
        return None

    def num_partitions(self) -> int:
        return len(self.sizes())

    def is_composed(self) -> bool:
        """True when an id's embedding is built from several sub-table rows."""
        return self.num_partitions() > 1

    def looks_up_per_id(self) -> bool:
        """True for mult of several partitions: the product is taken per id, before pooling, so
        the sub-tables are looked up per id (bags of one id) -- unless the table is one-hot
        (``max_ids_per_bag=1``), where a bag's pooled rows are its id's rows, or composes pooled
        partitions (``compose="pooled"``, the original DLRM code's Q-R)."""
        return self.is_composed() and self.config.operation == "mult" and not self.one_hot() and self.config.compose != "pooled"

    def one_hot(self) -> bool:
        """True when the table declares bags of at most one id (``max_ids_per_bag=1``)."""
        return self.config.max_ids_per_bag == 1

    def dims(self) -> List[int]:
        """Embedding dim of each sub-table: the table's, or its split for concat."""
        c, k = self.config, self.num_partitions()
        if k > 1 and c.operation == "concat" and c.dims is not None:
            return list(c.dims)
        dims = split_dims(c.embedding_dim, k, c.operation)
        if min(dims) == 0:
            c.fail(f"embedding_dim={c.embedding_dim} is too small to concat {k} partitions")
        return dims

    def init_ranges(self) -> List[Tuple[float, float]]:
        """Uniform [min, max] of each sub-table, chosen so that composed embeddings have the mean
        and variance of a standard table of N rows (see ``initialization.py``)."""
        return composed_init_ranges(self.config, self.num_partitions(), self.config.operation)

    def sub_tables(self) -> List[SubTable]:
        """The physical sub-tables, in partition order."""
        c = self.config
        return [
            SubTable(sub_table_name(c.name, s), s, rows, dim, r)
            for s, rows, dim, r in zip(self.suffixes(), self.sizes(), self.dims(), self.init_ranges())
        ]

    def is_stacked(self) -> bool:
        """True when the parts are stored as one table: ``stack_parts`` True, or unset (None) on an
        add of several partitions of one dim and init range."""
        c = self.config
        if c.stack_parts is None:
            return c.operation == "add" and self.is_composed() and self.stackable()
        return bool(c.stack_parts) and self.is_composed()

    def stackable(self) -> bool:
        """Whether the parts can be one table: one dim and one init range."""
        subs = self.sub_tables()
        return len({s.init_range for s in subs}) == 1 and {s.embedding_dim for s in subs} == {self.config.embedding_dim}

    def stacked_rows(self) -> List[StackedRows]:
        """Where each part's rows lie in the stacked table (``stacked_rows``)."""
        return stacked_rows(self.sizes())

    def stacked_table(self) -> SubTable:
        """The one table holding every sub-table's rows, in partition order (``stack_parts``)."""
        c = self.config
        subs = self.sub_tables()
        ranges = {s.init_range for s in subs}
        dims = {s.embedding_dim for s in subs}
        if len(ranges) != 1 or dims != {c.embedding_dim}:
            c.fail(f"stack_parts needs parts of one dim and one init range, got dims {sorted(dims)} and ranges {sorted(ranges)}")
        rows = sum(s.num_embeddings for s in subs)
        return SubTable(stacked_table_name(c.name), STACKED_SUFFIX, rows, c.embedding_dim, subs[0].init_range)

    def stored_tables(self) -> List[SubTable]:
        """The tables a module holds for this logical table (what the planner and checkpoints see):
        the stacked one (``stack_parts``), else the sub-tables."""
        return [self.stacked_table()] if self.is_stacked() else self.sub_tables()

    def memory_bytes(self) -> int:
        """Bytes of the sub-tables' weights and of the learned mapping in front of them, if any."""
        c = self.config
        bits = DATA_TYPE_NUM_BITS[c.data_type]
        tables = sum(rows * dim * bits // 8 for rows, dim in zip(self.sizes(), self.dims()))
        shape = c.mapping_shape()
        return tables + (shape.nbytes() if shape is not None else 0)


class SingleTableStrategy(Strategy):
    """A strategy of one table, named as the logical table (so constraints keyed by its name apply),
    whose rows ``rows()`` gives; an id's row is the id (a mapping may have put it there) unless
    ``partition_spec`` says otherwise."""

    @abstractmethod
    def rows(self) -> int:
        """Rows of the one table."""

    def sizes(self) -> List[int]:
        return [self.rows()]

    def suffixes(self) -> List[str]:
        return [""]

    def partition_spec(self) -> List[Tuple[int, int]]:
        return [(1, 0)]


def partition_rows(ids: torch.Tensor, divisor: int, modulus: int) -> torch.Tensor:
    """``(ids // divisor) % modulus`` (floor division; no remainder when ``modulus`` is 0)."""
    rows = ids if divisor == 1 else torch.div(ids, divisor, rounding_mode="floor")
    return rows if modulus == 0 else torch.remainder(rows, modulus)


def split_dims(dim: int, k: int, operation: str) -> List[int]:
    """The sub-table dims of ``k`` partitions of width ``dim`` (as ``Strategy.dims`` defaults)."""
    if k == 1 or operation != "concat":
        return [dim] * k
    base, extra = divmod(dim, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def within_budget(cost: float, full: float, compression: float) -> bool:
    """Whether ``cost`` of ``full`` counts as a ``compression``-fold reduction."""
    return cost <= full / compression * (1 + TOLERANCE)


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` of positive ints, exact at any size."""
    return -(-a // b)
