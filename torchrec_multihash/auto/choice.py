"""Chooses each table's strategy, operation and size so that all tables fit one memory budget.

The budget is spent where it buys the most: a table's quality loss is estimated as the accesses
that fall outside its ``N / compression`` hottest ids (ids beyond the rows it can give out), and
tables are compressed less, one halving at a time, where that estimate falls most per byte. A
table that needs no more rows than it gets stays full; a compressed table is learned while its
mapping costs at most half of its bytes (ids that cluster share rows), else Q-R mult (every id
keeps a unique representation however hard the table is compressed). With both precisions, the
tables are sized for fp16 rows (half the bytes a value: twice the rows), then fp32 is bought back,
table by table, with the bytes the budget has left.
"""

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, EmbeddingBagConfig

from torchrec_multihash.auto.statistics import TableStatistics
from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.modules.config import ROW_PRECISIONS, MultiHashEmbeddingBagConfig
from torchrec_multihash.modules.convert import check_overrides, to_multihash_configs
from torchrec_multihash.modules.strategies import TOLERANCE, StrategyName, registered_strategies, strategy_class
from torchrec_multihash.modules.strategies.base import ceil_div

# the compressions a table may get; each step halves its bytes
LEVELS = tuple(2.0**i for i in range(0, 13))
# the strategies ``auto`` picks from by default, in order of preference where they apply
DEFAULT_CANDIDATES = (StrategyName.LEARNED, StrategyName.QR)


def _compressing() -> List[str]:
    """The registered strategies that compress a table, learned included."""
    return [n for n in registered_strategies() if strategy_class(n).compresses]


class AutoChoiceError(MultiHashError, ValueError):
    """A budget or candidate list the automatic choice cannot work with."""


@dataclass
class TableChoice:
    """What ``auto`` chose for one table, and why."""

    table: str
    strategy: str
    operation: str
    compression: float  # the level it was sized for (1: full)
    bytes: int  # weights and mapping, exact
    coverage: float  # share of the table's training accesses on its N / compression hottest ids
    reason: str
    precision: str = "fp32"  # of its rows: fp32 | fp16

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TableChoice":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d or k != "precision"})


def full_bytes(c: EmbeddingBagConfig) -> int:
    return c.num_embeddings * c.embedding_dim * DATA_TYPE_NUM_BITS[c.data_type] // 8


def with_precision(c: EmbeddingBagConfig, precision: str) -> EmbeddingBagConfig:
    """``c`` with rows of ``precision`` (fp32 | fp16)."""
    if precision not in ROW_PRECISIONS:
        raise AutoChoiceError(f"unknown precision {precision!r}; choose from {list(ROW_PRECISIONS)}")
    return replace(c, data_type=ROW_PRECISIONS[precision])


def _sized(c: EmbeddingBagConfig, strategy: str, level: float) -> MultiHashEmbeddingBagConfig:
    with warnings.catch_warnings():  # a level past what the strategy reaches is seen in its bytes
        warnings.simplefilter("ignore")
        return to_multihash_configs([c], level, strategy=strategy, operation="mult", threshold=0)[0]


@dataclass
class _Option:
    """One table at one level: the strategy the rule picks there and what it costs."""

    level: float
    strategy: str
    bytes: int
    loss: int  # accesses outside the N / level hottest ids
    why: str
    precision: str = "fp32"


def _strategy_at(c: EmbeddingBagConfig, level: float, candidates: Sequence[str]) -> Tuple[str, str]:
    """The strategy for ``c`` compressed ``level`` times, and why."""
    if StrategyName.LEARNED in candidates:
        sized = _sized(c, StrategyName.LEARNED, level)
        shape = sized.mapping_shape()
        assert shape is not None
        share = shape.nbytes() / max(1, sized.strategy_impl().memory_bytes())
        # a row for every id, at most half the bytes: past that it stores only the hottest ids,
        # and Q-R beats it (MovieLens 64x: 0.727 against 0.757 AUC)
        if shape.mapping_ids == c.num_embeddings and share <= 0.5:
            return StrategyName.LEARNED, f"learned: its mapping is {share:.0%} of its bytes, so ids that behave alike share rows"
        why = f"a learned mapping would be {share:.0%} of its bytes" + (
            "" if shape.mapping_ids == c.num_embeddings else " and store only the hottest ids"
        )
    else:
        why = "learned is not a candidate"
    for name in candidates:  # the first other one that compresses, in the order given
        if name == StrategyName.LEARNED or not strategy_class(name).compresses:
            continue
        impl = _sized(c, name, level).strategy_impl()
        if impl.num_partitions() == 1:  # one table: no operation, and ids share its rows
            ids = ceil_div(c.num_embeddings, impl.sizes()[0])
            trick = "the hashing trick, " if name == StrategyName.HASH else ""
            return name, f"{name} ({why}): {trick}about {ids} ids to a row, which they share"
        return name, f"{name} mult ({why}): every id keeps its own {'pair' if name == StrategyName.QR else 'combination'} of rows"
    raise AutoChoiceError(f"candidates {list(candidates)} hold no strategy that compresses this table ({why}); add one of {_compressing()}")


def _options(c: EmbeddingBagConfig, stats: TableStatistics, candidates: Sequence[str], precision: str) -> List[_Option]:
    """The table's options in rows of ``precision``, from full to the most compressed its strategies reach, bytes falling."""
    return [_Option(o.level, o.strategy, o.bytes, o.loss, o.why, precision) for o in _levels(with_precision(c, precision), stats, candidates)]


def _buy_back_fp32(configs: Sequence[EmbeddingBagConfig], chosen: Dict[str, _Option], left: int, statistics: Mapping[str, TableStatistics]) -> None:
    """Turns fp16 tables of ``chosen`` into fp32 ones at the same size while ``left`` bytes allow,
    the tables read most per byte first (what fp32 buys is precision, not rows)."""
    costs = {}
    for c in configs:
        o = chosen.get(c.name)
        if o is not None and o.precision == "fp16":
            nbytes = full_bytes(c) if o.level == 1 else _sized(c, o.strategy, o.level).strategy_impl().memory_bytes()
            costs[c.name] = (nbytes, nbytes - o.bytes)
    for name in sorted(costs, key=lambda n: (-statistics[n].accesses / max(1, costs[n][1]), n)):
        nbytes, cost = costs[name]
        if cost <= left:
            o = chosen[name]
            chosen[name] = _Option(o.level, o.strategy, nbytes, o.loss, o.why + "; fp32 rows: bought back with bytes the budget had left")
            left -= cost


def _levels(c: EmbeddingBagConfig, stats: TableStatistics, candidates: Sequence[str]) -> List[_Option]:
    """The table's options at its precision from full to the most compressed its strategies reach, bytes falling."""
    out = [_Option(1.0, StrategyName.FULL, full_bytes(c), 0, "full")]
    for level in LEVELS[1:]:
        strategy, why = _strategy_at(c, level, candidates)
        nbytes = _sized(c, strategy, level).strategy_impl().memory_bytes()
        loss = stats.accesses - stats.top_accesses(math.ceil(c.num_embeddings / level))
        if nbytes < out[-1].bytes:
            out.append(_Option(level, strategy, nbytes, loss, why))
        elif full_bytes(c) * (1 + TOLERANCE) < level * nbytes:  # short of the level: the strategy's smallest configuration
            break
        elif nbytes == out[-1].bytes and len(out) > 1:  # a coarse step (generalized_qr's 4x at 2x) that meets this level too
            out[-1] = _Option(level, strategy, nbytes, loss, why)
    return out


def _allocate(options: Dict[str, List[_Option]], budget: int) -> Dict[str, int]:
    """Index into each table's options: start at the smallest, then repeatedly take the step
    (one level less compressed) with the largest fall in loss per byte that still fits."""
    at = {name: len(opts) - 1 for name, opts in options.items()}
    spent = sum(opts[-1].bytes for opts in options.values())
    while True:
        best: Optional[Tuple[float, str]] = None
        for name in sorted(options):
            i, opts = at[name], options[name]
            if i == 0:
                continue
            gain, cost = opts[i].loss - opts[i - 1].loss, opts[i - 1].bytes - opts[i].bytes
            if gain <= 0 or spent + cost > budget:
                continue
            if best is None or gain / cost > best[0]:
                best = (gain / cost, name)
        if best is None:
            return at
        name = best[1]
        spent += options[name][at[name] - 1].bytes - options[name][at[name]].bytes
        at[name] -= 1


def _reason(c: EmbeddingBagConfig, stats: TableStatistics, option: _Option) -> str:
    rows = math.ceil(c.num_embeddings / option.level)
    seen = f"{stats.seen_ids:,} of its {c.num_embeddings:,} ids seen, {stats.accesses:,} accesses"
    rows_in = "" if option.precision == "fp32" else f", in {option.precision} (half the bytes a value)"
    if option.level == 1:
        bought = option.why.partition("; ")[2]
        return f"full{rows_in}: {seen}; compressing it saved fewer bytes per access lost than the other tables" + (f"; {bought}" if bought else "")
    cover = stats.coverage(rows)
    return f"{option.level:g}x fewer rows{rows_in}: {seen}; its {rows:,} hottest ids carry {cover:.1%} of them; {option.why}"


def choose_tables(
    configs: Sequence[EmbeddingBagConfig],
    statistics: Mapping[str, TableStatistics],
    budget_bytes: int,
    threshold: int,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    precisions: Sequence[str] = ("fp32",),
) -> List[TableChoice]:
    """One choice per table of ``configs`` (same order) within ``budget_bytes`` in all, mappings
    included, each table's rows in one of ``precisions`` (fp32, fp16: half the bytes a value).
    Tables of at most ``threshold`` rows stay full (fp16 only where it is the one precision); a
    budget below the smallest the strategies reach gives that smallest configuration, with a
    warning (``torchrec-multihash`` refuses it)."""
    bad = [p for p in precisions if p not in ROW_PRECISIONS]
    if bad or not precisions:
        raise AutoChoiceError(f"unknown precision(s) {bad or list(precisions)}; choose from {list(ROW_PRECISIONS)}")
    small_precision = "fp16" if list(precisions) == ["fp16"] else "fp32"
    unknown = [s for s in candidates if s not in registered_strategies()]
    if unknown:
        raise AutoChoiceError(f"candidates: unknown strategies {unknown}; choose from {registered_strategies()}")
    missing = [c.name for c in configs if c.num_embeddings > threshold and c.name not in statistics]
    if missing:
        raise AutoChoiceError(f"no access statistics for table(s) {missing}")
    small = {c.name: full_bytes(with_precision(c, small_precision)) for c in configs if c.num_embeddings <= threshold}
    # with both precisions: the sizes chosen for fp16 rows (twice the rows a byte; measured on MovieLens,
    # full tables in fp16 lose 0.0003 AUC), then fp32 bought back with what the budget has left
    first = "fp16" if "fp16" in precisions else "fp32"
    options = {c.name: _options(c, statistics[c.name], candidates, first) for c in configs if c.name not in small}
    at = _allocate(options, budget_bytes - sum(small.values()))
    chosen = {name: options[name][i] for name, i in at.items()}
    if first == "fp16" and "fp32" in precisions:
        _buy_back_fp32(configs, chosen, budget_bytes - sum(small.values()) - sum(o.bytes for o in chosen.values()), statistics)
    least = sum(small.values()) + sum(opts[-1].bytes for opts in options.values())
    if least > budget_bytes:
        warnings.warn(
            f"strategy auto: a budget of {budget_bytes:,} bytes is below the least these tables take, {least:,} bytes: "
            "every table gets its strategies' smallest configuration (the small ones stay full)",
            stacklevel=2,
        )
    out = []
    for c in configs:
        if c.name in small:
            out.append(
                TableChoice(
                    c.name,
                    StrategyName.FULL,
                    "mult",
                    1.0,
                    small[c.name],
                    1.0,
                    f"full: {c.num_embeddings} rows, at most the threshold {threshold}",
                    small_precision,
                )
            )
            continue
        stats, option = statistics[c.name], chosen[c.name]
        rows = math.ceil(c.num_embeddings / option.level)
        reason = _reason(c, stats, option)
        coverage = round(stats.coverage(rows), 6)
        out.append(TableChoice(c.name, str(option.strategy), "mult", option.level, option.bytes, coverage, reason, option.precision))
    return out


def auto_configs(
    configs: Sequence[EmbeddingBagConfig],
    choices: Sequence[TableChoice],
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> List[MultiHashEmbeddingBagConfig]:
    """The multi-hash configs of ``choices`` (``overrides``: fields of yours that replace them)."""
    by_name = {ch.table: ch for ch in choices}
    check_overrides(overrides or {}, [c.name for c in configs])
    missing = [c.name for c in configs if c.name not in by_name]
    if missing:
        raise AutoChoiceError(f"the automatic choice has no entry for table(s) {missing}: it was made for other tables")
    out = []
    for c in configs:
        ch = by_name[c.name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sized = to_multihash_configs(
                [c],
                ch.compression,
                strategy=ch.strategy,
                operation=ch.operation,
                threshold=0,
                overrides={c.name: dict((overrides or {}).get(c.name, {}))},
            )
        sized[0].data_type = with_precision(c, ch.precision).data_type
        out.append(sized[0])
    return out
