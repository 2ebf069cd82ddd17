"""Turns TorchRec EmbeddingBagConfigs into multi-hash configs at a target memory reduction."""

import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.modules.config import OPERATIONS, MultiHashConfigError, MultiHashEmbeddingBagConfig, logical_fields
from torchrec_multihash.modules.strategies import TOLERANCE, StrategyName, parse_strategy, strategy_class

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


def to_multihash_configs(
    configs: Sequence[EmbeddingBagConfig],
    compression: float,
    strategy: Union[str, StrategyName] = StrategyName.QR,
    operation: str = "mult",
    threshold: int = DEFAULT_THRESHOLD,
    num_partitions: Optional[int] = None,
    overrides: Optional[Dict[str, Dict[str, object]]] = None,
    strict: bool = False,
) -> List[MultiHashEmbeddingBagConfig]:
    """Converts TorchRec configs to multi-hash configs that shrink each table by ``compression``.

    Tables with at most ``threshold`` rows stay full. ``overrides`` maps a table name to
    MultiHashEmbeddingBagConfig fields that replace the chosen ones. A table the strategy cannot
    shrink enough gets the strategy's smallest configuration and a warning (an error if ``strict``).

    Example: ``MultiHashEmbeddingBagCollection(to_multihash_configs(ebc_configs, compression=4))``
    """
    name = _check_arguments(strategy, operation, compression)
    cls = strategy_class(name)
    overrides = dict(overrides or {})
    unknown = set(overrides) - {c.name for c in configs}
    if unknown:
        raise MultiHashConfigError(f"overrides name unknown table(s) {sorted(unknown)}")
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise MultiHashConfigError(f"threshold must be an int (rows), got {threshold!r}")
    k = cls.default_partitions if num_partitions is None else num_partitions
    try:
        cls.check_num_partitions(k)
    except ValueError as e:
        raise MultiHashConfigError(str(e)) from None
    out: List[MultiHashEmbeddingBagConfig] = []
    short: List[str] = []
    for c in configs:
        fields: Dict[str, Any] = dict(strategy=StrategyName.FULL, operation=operation)
        if name != StrategyName.FULL and c.num_embeddings > threshold and compression > 1:
            s = cls.sized_for(c.num_embeddings, c.embedding_dim, compression, operation, k)
            if s.factor * (1 + TOLERANCE) < compression * (1 - 1e-9):
                short.append(f"{c.name} (N={c.num_embeddings}): {s.factor:.2f}x")
            fields.update(strategy=name, **s.fields)
        fields.update(overrides.get(c.name, {}))
        out.append(MultiHashEmbeddingBagConfig(**logical_fields(c), **fields))
    if short:
        msg = f"strategy '{name}' cannot shrink these tables {compression}x; they use its smallest configuration instead: {', '.join(short)}"
        if strict:
            raise MultiHashConfigError(msg)
        warnings.warn(msg, stacklevel=2)
    return out


def stack_add_tables(
    tables: List[MultiHashEmbeddingBagConfig], keep: Sequence[str] = (), option: str = "stack_parts"
) -> List[MultiHashEmbeddingBagConfig]:
    """Sets ``stack_parts`` on every table that adds several partitions (its parts stored as one
    table), except those named in ``keep``; the others are left as they are (mult, concat, tables
    kept full). Warns when no table is stacked: ``option`` (what the user set) then changes nothing."""
    for t in tables:
        if t.name not in keep and t.operation == "add" and t.strategy_impl().is_composed():
            t.stack_parts = True
            t.validate()
    if not any(t.stack_parts for t in tables):
        warnings.warn(
            f"{option} is set but no table adds several partitions (operation add on qr, generalized_qr or crt), "
            "so no table is stacked: it changes nothing here",
            stacklevel=3,
        )
    return tables
