"""Turns TorchRec EmbeddingBagConfigs into multi-hash configs at a target memory reduction."""

import math
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_multihash.modules.config import (
    OPERATIONS,
    STRATEGIES,
    MultiHashConfigError,
    MultiHashEmbeddingBagConfig,
)

DEFAULT_THRESHOLD = 200  # tables with at most this many rows stay full, as in the original DLRM code
DEFAULT_PARTITIONS = {"qr": 2, "generalized_qr": 3, "crt": 2}


@dataclass
class Sizing:
    """The size parameters chosen for one table, and the reduction they give."""

    num_collisions: Optional[int] = None
    moduli: Optional[List[int]] = None
    factor: float = 1.0
    mapping_rows: Optional[int] = None
    mapping_ids: Optional[int] = None


def _rows_cost(sizes: Sequence[int], dims: Sequence[int]) -> int:
    return sum(r * d for r, d in zip(sizes, dims))


def _split_dims(dim: int, k: int, operation: str) -> List[int]:
    if operation != "concat":
        return [dim] * k
    base, extra = divmod(dim, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def _coprime_after(start: int, others: Iterable[int]) -> int:
    m = max(start, 2)
    while any(math.gcd(m, o) != 1 for o in others):
        m += 1
    return m


def _candidates(strategy: str, n: int, k: int) -> Iterator[List[int]]:
    """Partition sizes in order of growing small partitions (the big partition takes the rest)."""
    limit = math.ceil(n ** (1.0 / k)) + 1  # past N^(1/k) the tables only grow again
    for m in range(2, max(2, limit) + 1):
        if strategy == "qr":
            yield [math.ceil(n / m), m]
        elif strategy == "generalized_qr":
            # radices between m^(k-1) and (m+1)^(k-1), one step at a time
            for j in range(k - 1):
                small = [m + 1] * j + [m] * (k - 1 - j)
                yield small + [math.ceil(n / math.prod(small))]
        else:  # crt: k-1 small pairwise-coprime moduli from m up, one large one coprime to them
            small: List[int] = []
            for _ in range(k - 1):
                small.append(_coprime_after(small[-1] + 1 if small else m, small))
            yield small + [_coprime_after(math.ceil(n / math.prod(small)), small)]


TOLERANCE = 0.02  # a table may miss the target factor by this much (Q-R with m=4 is ~4x, not 5x)


def _learned_sizes(n: int, dim: int, compression: float, tolerance: float, elem_bytes: int = 4) -> Sizing:
    """Rows of a learned table such that rows and mapping together take 1/compression of the full
    table's bytes: a row index per id (2 or 4 bytes) when that costs at most half the budget, else
    the hottest ids only (8 bytes each) in half the budget."""
    budget = n * dim * elem_bytes / compression * (1 + tolerance)
    row_bytes, int16_rows = dim * elem_bytes, 2**15 - 1

    def sizing(rows: int, per_id: int) -> Sizing:
        return Sizing(mapping_rows=rows, factor=n * row_bytes / (rows * row_bytes + per_id * n))

    if 2 * n <= budget / 2:
        r2 = math.floor((budget - 2 * n) / row_bytes)
        if 2 <= r2 <= int16_rows:
            return sizing(r2, 2)
        r4 = math.floor((budget - 4 * n) / row_bytes)
        if r2 > int16_rows:  # int32 rows pay off only past the int16 limit
            return sizing(r4, 4) if r4 > int16_rows and 4 * n <= budget / 2 else sizing(int16_rows, 2)
    rows = max(2, math.floor(budget / 2 / (dim * elem_bytes)))
    ids = max(1, min(n, math.floor(budget / 2 / 8)))
    return Sizing(mapping_rows=rows, mapping_ids=ids, factor=n * dim * elem_bytes / (rows * dim * elem_bytes + 8 * ids))


def choose_sizes(
    n: int, dim: int, compression: float, strategy: str, operation: str, num_partitions: int,
    tolerance: float = TOLERANCE,
) -> Sizing:
    """Smallest collision parameter whose sub-tables use at most 1/compression of N x dim
    (within ``tolerance``: Q-R with m = 4 gives N/4 + 4 rows, which counts as 4x).

    If the strategy cannot reach the target (Q-R of N rows needs at least ~2 sqrt(N) rows), returns
    the smallest configuration it has, whose ``factor`` says what it reaches.
    """
    full = n * dim
    budget = full / compression * (1 + tolerance)
    if strategy == "learned":
        return _learned_sizes(n, dim, compression, tolerance)
    if strategy == "hash":
        c = max(1, math.floor(compression))
        while math.ceil(n / c) * dim > budget and c < n:
            c += 1
        return Sizing(num_collisions=c, factor=full / (math.ceil(n / c) * dim))
    k = num_partitions
    dims = _split_dims(dim, k, operation)
    best: Optional[Sizing] = None
    best_cost = math.inf
    for sizes in _candidates(strategy, n, k):
        cost = _rows_cost(sizes, dims)
        sizing = Sizing(
            num_collisions=sizes[1] if strategy == "qr" else None,
            moduli=None if strategy == "qr" else sizes,
            factor=full / cost,
        )
        if cost <= budget:
            return sizing
        if cost < best_cost:
            best, best_cost = sizing, cost
    assert best is not None
    return best


def to_multihash_configs(
    configs: Sequence[EmbeddingBagConfig],
    compression: float,
    strategy: str = "qr",
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
    if strategy not in STRATEGIES:
        raise MultiHashConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if operation not in OPERATIONS:
        raise MultiHashConfigError(f"operation must be one of {OPERATIONS}, got {operation!r}")
    if not compression >= 1:
        raise MultiHashConfigError(f"compression must be >= 1, got {compression!r}")
    overrides = dict(overrides or {})
    unknown = set(overrides) - {c.name for c in configs}
    if unknown:
        raise MultiHashConfigError(f"overrides name unknown table(s) {sorted(unknown)}")
    k = num_partitions or DEFAULT_PARTITIONS.get(strategy, 1)
    if strategy == "qr" and k != 2:
        raise MultiHashConfigError("qr has exactly 2 partitions; use generalized_qr for more")

    out: List[MultiHashEmbeddingBagConfig] = []
    short: List[str] = []
    for c in configs:
        base = dict(
            name=c.name, num_embeddings=c.num_embeddings, embedding_dim=c.embedding_dim,
            feature_names=list(c.feature_names), pooling=c.pooling, data_type=c.data_type,
            weight_init_min=c.weight_init_min, weight_init_max=c.weight_init_max,
        )
        if strategy == "full" or c.num_embeddings <= threshold or compression == 1:
            fields = dict(strategy="full", operation=operation)
        else:
            s = choose_sizes(c.num_embeddings, c.embedding_dim, compression, strategy, operation, k)
            if s.factor * (1 + TOLERANCE) < compression * (1 - 1e-9):
                short.append(f"{c.name} (N={c.num_embeddings}): {s.factor:.2f}x")
            fields = dict(strategy=strategy, operation=operation, num_collisions=s.num_collisions, moduli=s.moduli)
            if strategy == "learned":
                fields.update(mapping_rows=s.mapping_rows, mapping_ids=s.mapping_ids)
        fields.update(overrides.get(c.name, {}))
        out.append(MultiHashEmbeddingBagConfig(**base, **fields))
    if short:
        msg = (
            f"strategy {strategy!r} cannot shrink these tables {compression}x; they use its "
            f"smallest configuration instead: {', '.join(short)}"
        )
        if strict:
            raise MultiHashConfigError(msg)
        warnings.warn(msg, stacklevel=2)
    return out
